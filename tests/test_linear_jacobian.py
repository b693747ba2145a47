"""The ``linear-jacobian`` method: linear bound propagation through the gradient graph.

Containment of the exact Jacobian at sampled and attacked points (every activation, every norm, float32 weights),
never looser than RecurJac-B (and the plain oracle) on the same layer bounds, exact at ``eps = 0``, certified lines
of ``sigma'``, Lipschitz constants, registration (API, CLI, the engine's job).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from recurjac_scale.activations import get_activation
from recurjac_scale.cli import main
from recurjac_scale.errors import InputError
from recurjac_scale.jacobian import derivative_bounds_for, jacobian_bounds
from recurjac_scale.jacobian.derivative_lines import derivative_lines
from recurjac_scale.layer_bounds.base import Region
from recurjac_scale.lipschitz import lipschitz
from recurjac_scale.network.model import Network
from recurjac_scale.network.store import save_network
from recurjac_scale.testing import jacobian_attack_points, random_network, sample_region

from oracle_recurjac import oracle_bounds

ACTS = [
    ("relu", {}),
    ("leaky_relu", {"alpha": 0.1}),
    ("sigmoid", {}),
    ("tanh", {}),
    ("arctan", {}),
    ("elu", {"alpha": 0.7}),
    ("softplus", {}),
    ("hard_sigmoid", {"alpha": 1.0, "beta": 0.5}),  # break points at -0.5, 0.5: unstable neurons here
]
NORMS = [1.0, 2.0, math.inf]
# radii with a fair share of unstable neurons for each norm (an l1 ball is much smaller than an l-inf one)
EPS = {1.0: 0.6, 2.0: 0.3, math.inf: 0.12}


def _net(act, params, rng, widths=(5, 9, 8, 3), **kw):
    return random_network(widths, act, rng, **params, **kw)


def _contains(L, U, J, tol=0.0):
    """Every Jacobian in ``J`` (k, m, n_0) lies in [L, U]."""
    return bool(((J >= L - tol) & (J <= U + tol)).all())


@pytest.mark.parametrize("p", NORMS, ids=["p1", "p2", "pinf"])
@pytest.mark.parametrize("act,params", ACTS, ids=[a for a, _ in ACTS])
def test_contains_sampled_and_attacked_jacobians(act, params, p, rng):
    net = _net(act, params, rng)
    x0 = rng.uniform(-0.5, 0.5, size=5)
    eps = EPS[p]
    lj = jacobian_bounds(net, x0, eps, p, method="linear-jacobian")
    rb = jacobian_bounds(net, x0, eps, p, method="recurjac-b", layer_bounds=lj.layer_bounds)
    region = Region.of(net, x0, eps, p)
    X = np.vstack([sample_region(region, 3000, rng), jacobian_attack_points(net, region, rng, entries=4, steps=25)])
    J = net.jacobian(X)
    assert _contains(lj.lower, lj.upper, J)
    # never looser than RecurJac-B on the same layer bounds, and the region is not trivial
    assert (lj.lower >= rb.lower).all() and (lj.upper <= rb.upper).all()
    assert sum(lj.unstable) > 0


@pytest.mark.parametrize("act,params", ACTS, ids=[a for a, _ in ACTS])
def test_entry_attack_by_gradient_steps(act, params, rng):
    """Projected sign-gradient ascent / descent on single Jacobian entries (finite-difference gradients of the
    entry; the ReLU-family entries are piecewise constant, where the random search of the other test applies)."""
    net = _net(act, params, rng)
    x0 = rng.uniform(-0.5, 0.5, size=5)
    eps = 0.15
    lj = jacobian_bounds(net, x0, eps, math.inf, method="linear-jacobian")
    region = Region.of(net, x0, eps, math.inf)
    h = 1e-5
    for _ in range(4):
        i, j = int(rng.integers(3)), int(rng.integers(5))
        for sign in (1.0, -1.0):
            x = sample_region(region, 1, rng)[0]
            for it in range(30):
                E = np.eye(5) * h
                fp = net.jacobian(x[None, :] + E)[:, i, j]
                fm = net.jacobian(x[None, :] - E)[:, i, j]
                grad = (fp - fm) / (2 * h)
                x = np.clip(x + sign * eps / 8 * np.sign(grad), x0 - eps, x0 + eps)
                v = net.jacobian(x[None, :])[0, i, j]
                assert lj.lower[i, j] <= v <= lj.upper[i, j]


@pytest.mark.parametrize("act,params", ACTS[:4], ids=[a for a, _ in ACTS[:4]])
def test_exact_at_eps_zero(act, params, rng):
    net = _net(act, params, rng)
    x0 = rng.uniform(-0.5, 0.5, size=5)
    lj = jacobian_bounds(net, x0, 0.0, math.inf, method="linear-jacobian")
    J = net.jacobian(x0[None, :])[0]
    scale = np.abs(J).max()
    assert _contains(lj.lower, lj.upper, J[None])
    assert np.max(lj.upper - lj.lower) <= 1e-12 * scale


def test_tighter_than_recurjac_where_unstable(rng):
    """On ReLU networks with many unstable neurons the method is strictly tighter on most entries (the chord
    planes keep the gradients correlated) and gives a smaller l-inf Lipschitz constant than RecurJac-B and F0."""
    net = random_network((16, 16, 16, 10), "relu", np.random.default_rng(0))
    x0 = np.random.default_rng(0).uniform(0, 1, 16)
    for eps in (0.05, 0.1):
        lj = jacobian_bounds(net, x0, eps, math.inf, method="linear-jacobian", outputs=1)
        rb = jacobian_bounds(net, x0, eps, math.inf, method="recurjac-b", outputs=1, layer_bounds=lj.layer_bounds)
        assert np.mean((lj.upper - lj.lower) < (rb.upper - rb.lower) * 0.99) > 0.5
        # the rounding allowance is negligible against the widths it certifies
        assert float(lj.rounding.rsplit(": ", 1)[1]) < 1e-12
        vals = {m: lipschitz(net, x0, eps, math.inf, method=m, outputs=1).points[0].lipschitz
                for m in ("linear-jacobian", "recurjac-b", "recurjac-f0")}
        assert vals["linear-jacobian"] < 0.9 * min(vals["recurjac-b"], vals["recurjac-f0"])


def test_never_looser_than_the_oracle(rng):
    """Against the plain transcription of ALGORITHM.md (RecurJac-B) on the same derivative bounds."""
    for act in ("relu", "tanh"):
        net = _net(act, {}, rng, widths=(4, 7, 6, 5, 2))
        x0 = rng.uniform(-0.5, 0.5, size=4)
        lj = jacobian_bounds(net, x0, 0.2, math.inf, method="linear-jacobian")
        netc = net.with_outputs(np.eye(2))
        OL, OU = oracle_bounds("recurjac-b", netc.weights, np.eye(2), derivative_bounds_for(netc, lj.layer_bounds))
        tol = 1e-9 * np.abs(OU).max()
        assert (lj.lower >= OL - tol).all() and (lj.upper <= OU + tol).all()
        region = Region.of(net, x0, 0.2, math.inf)
        assert _contains(lj.lower, lj.upper, net.jacobian(sample_region(region, 2000, rng)))


def test_float32_weights(rng):
    base = _net("relu", {}, rng)
    net = Network([w.astype(np.float32) for w in base.weights], [b.astype(np.float32) for b in base.biases],
                  base.activations, input_spec=base.input_spec)
    x0 = rng.uniform(-0.5, 0.5, size=5)
    region = Region.of(net, x0, 0.1, math.inf)
    J = net.jacobian(sample_region(region, 3000, rng))
    for dtype in (np.float64, np.float32):
        lj = jacobian_bounds(net, x0, 0.1, math.inf, method="linear-jacobian", dtype=dtype)
        assert _contains(lj.lower, lj.upper, J)
        assert lj.lower.dtype == dtype


@pytest.mark.parametrize("act,params", ACTS[1:], ids=[a for a, _ in ACTS[1:]])
def test_derivative_lines_enclose_the_derivative(act, params, rng):
    a = get_activation(act, **params)
    n = 400
    c = rng.normal(0, 2, n)
    w = rng.exponential(1.5, n)
    l, u = c - w, c + w
    l[:5], u[:5] = -1e-3, 2e-3  # narrow intervals around the kink / peak
    dl, du = a.derivative_bounds(l, u)
    z0 = rng.uniform(l, u)
    for mode in ("centre", "area"):
        sl, tl, su, tu = derivative_lines(a, l, u, dl, du, z0, mode)
        t = np.linspace(0.0, 1.0, 201)
        Z = l[:, None] + t[None, :] * (u - l)[:, None]
        D = a.derivative(Z)
        assert (sl[:, None] * Z + tl[:, None] <= D).all()
        assert (su[:, None] * Z + tu[:, None] >= D).all()
        if act == "leaky_relu":  # both one-sided derivatives at the kink
            inside = (l < 0) & (u > 0)
            assert (tl[inside] <= params["alpha"]).all() and (tu[inside] >= 1.0).all()


@pytest.mark.parametrize("alpha", [0.0, 0.3])
def test_derivative_lines_respect_fixed_derivatives(alpha, rng):
    """Split neurons (branch-and-bound phases) come with derivative bounds narrower than the activation's range on
    [l, u]: held inactive on [l, 0] (dl = du = alpha) or active on [l, u] restricted to z >= 0 (dl = du = 1).  The
    lines must bound the fixed derivative at every z of the part (z <= 0, resp. z >= 0)."""
    act = get_activation("relu") if alpha == 0.0 else get_activation("leaky_relu", alpha=alpha)
    n = 200
    l = -rng.exponential(1.0, n) - 1e-3
    for u, d, part in ((np.zeros(n), alpha, lambda Z: Z <= 0), (rng.exponential(1.0, n) + 1e-3, 1.0,
                                                                 lambda Z: Z >= 0)):
        dl = du = np.full(n, d)
        for mode in ("centre", "area"):
            sl, tl, su, tu = derivative_lines(act, l, u, dl, du, rng.uniform(l, u), mode)
            Z = l[:, None] + np.linspace(0.0, 1.0, 101)[None, :] * (u - l)[:, None]
            inside = part(Z)
            assert ((sl[:, None] * Z + tl[:, None] <= d) | ~inside).all()
            assert ((su[:, None] * Z + tu[:, None] >= d) | ~inside).all()


@pytest.mark.parametrize("p", NORMS, ids=["p1", "p2", "pinf"])
def test_lipschitz_upper_bounds_the_gradient_norm(p, rng):
    net = _net("relu", {}, rng, widths=(6, 12, 10, 4))
    x0 = rng.uniform(0, 1, 6)
    eps = EPS[p] / 2
    res = lipschitz(net, x0, eps, p, method="linear-jacobian", outputs=2)
    rb = lipschitz(net, x0, eps, p, method="recurjac-b", outputs=2)
    region = Region.of(net, x0, eps, p)
    X = np.vstack([sample_region(region, 4000, rng), jacobian_attack_points(net, region, rng, entries=4, steps=20)])
    q = {1.0: math.inf, 2.0: 2.0, math.inf: 1.0}[p]
    sampled = np.linalg.norm(net.jacobian(X)[:, 2, :], ord=q, axis=1).max()
    assert sampled <= res.points[0].lipschitz <= rb.points[0].lipschitz * (1 + 1e-12)


def test_api_cli_and_engine_registration(tmp_path, rng, capsys):
    net = random_network((6, 10, 8, 3), "relu", rng, domain=(0.0, 1.0))
    path = tmp_path / "m.zarr"
    save_network(net, path)
    x = rng.uniform(0.1, 0.9, size=6)
    np.save(tmp_path / "x.npy", x)
    out = tmp_path / "b.npz"
    code = main(["bounds", str(path), "--input", str(tmp_path / "x.npy"), "--eps", "0.05", "--method",
                 "linear-jacobian", "-o", str(out)])
    assert code == 0, capsys.readouterr().err
    z = np.load(out, allow_pickle=False)
    assert str(z["method"]) == "linear-jacobian"
    region = Region.of(net, x, 0.05, math.inf)
    assert _contains(z["lower"], z["upper"], net.jacobian(sample_region(region, 2000, rng)))
    from recurjac_scale.engine.blocks import prepare_job

    job = prepare_job(net, x, 0.05, math.inf, "linear-jacobian")  # the engine runs it through its stage
    assert job.name == "linear-jacobian" and job.method.name == "recurjac-b" and job.stage is not None


@pytest.mark.parametrize("planes", ["auto", "mccormick"])
def test_product_planes_hold_at_every_vertex(planes, rng):
    """The planes of ``y = a g`` chosen by ``layer_planes`` hold at the four vertices of the box (a bilinear
    function minus a plane attains its extremes there), for gradient boxes of every sign pattern."""
    from recurjac_scale.jacobian import linear as lin

    net = _net("relu", {}, rng, widths=(5, 40, 3))
    x0 = rng.uniform(-0.5, 0.5, size=5)
    jb = jacobian_bounds(net, x0, 0.3, math.inf, method="recurjac-b")
    netc = net.with_outputs(np.eye(3))
    ctx = lin.linear_context(netc, Region.of(netc, x0, 0.3, math.inf), jb.layer_bounds,
                             derivative_bounds_for(netc, jb.layer_bounds))
    d = 40
    assert np.count_nonzero(ctx.dl[0] < ctx.du[0]) > 5
    for _ in range(20):
        l = rng.normal(0, 1, d) - rng.exponential(1, d) * rng.integers(0, 2, d)
        u = l + rng.exponential(1, d) * rng.integers(0, 2, d)
        g0 = rng.uniform(l, u)
        up, lo, ymax = lin.layer_planes(ctx, 0, l, u, g0, planes)
        for a in (ctx.dl[0], ctx.du[0]):
            for g in (l, u):
                y = a * g
                tol = 4 * np.finfo(float).eps * ymax  # a plane exact at a vertex, evaluated in floats (the
                # propagation's allowance covers this evaluation error)
                assert (up[0] * g + up[1] * a + up[2] >= y - tol).all()
                assert (lo[0] * g + lo[1] * a + lo[2] <= y + tol).all()
                assert (np.abs(y) <= ymax).all()


@pytest.mark.parametrize("p", [2.0, math.inf], ids=["p2", "pinf"])
def test_optimised_row_norms_are_sound_and_no_looser(p, rng):
    """The optimised row norms (torch steers the relaxation parameters, the certified numpy propagation evaluates
    them) bound the sampled and attacked gradient norms and are at most the plain ones."""
    pytest.importorskip("torch")
    from recurjac_scale.jacobian.linear_opt import optimised_row_norms

    net = random_network((8, 12, 12, 4), "leaky_relu", rng, alpha=0.1)
    x0 = rng.uniform(0, 1, 8)
    eps = EPS[p] / 2
    jl = jacobian_bounds(net, x0, eps, p, method="linear-jacobian", outputs=1)
    opt = optimised_row_norms(net, jl, seconds=5.0, steps=15)
    plain = lipschitz(net, x0, eps, p, method="linear-jacobian", outputs=1).points[0].lipschitz
    region = Region.of(net, x0, eps, p)
    X = np.vstack([sample_region(region, 4000, rng), jacobian_attack_points(net, region, rng, entries=4, steps=20)])
    q = {2.0: 2.0, math.inf: 1.0}[p]
    sampled = np.linalg.norm(net.jacobian(X)[:, 1, :], ord=q, axis=1).max()
    assert sampled <= opt[0] <= plain
    with pytest.raises(InputError, match="linear-jacobian result"):
        optimised_row_norms(net, jacobian_bounds(net, x0, eps, p, outputs=1))
