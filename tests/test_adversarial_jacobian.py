"""Adversarial soundness tests (red-team review): try hard to make a certified bound exclude the true value.

Every configuration is checked the same way (:func:`check_region`): points of the region (random, boundary,
found by search on single pre-activations and single Jacobian entries, plus hand-placed points: the centre,
domain corners, kinks) are evaluated exactly (``Network.pre_activations`` / ``Network.jacobian``) and must lie in
the certified pre-activation bounds of ``ibp``, ``fastlin`` (where supported) and ``crown``, and in the Jacobian
bounds of every registered method (row sharing forced off and on), with a rounding-size tolerance only for the
float64 reference itself.  No bound may ever be NaN.  Lipschitz constants must dominate the sampled gradient norms.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from recurjac_scale.activations import get_activation
from recurjac_scale.jacobian import JACOBIAN_METHODS, jacobian_bounds
from recurjac_scale.layer_bounds import LAYER_BOUND_METHODS, LayerBounds, Region, layer_bounds
from recurjac_scale.lipschitz import lipschitz
from recurjac_scale.network import Network
from recurjac_scale.network.model import InputSpec
from recurjac_scale.testing import (
    jacobian_attack_points,
    neuron_attack_points,
    random_network,
    sample_region,
)

METHODS = sorted(JACOBIAN_METHODS)
LB_METHODS = [m for m in ("ibp", "fastlin", "crown") if m in LAYER_BOUND_METHODS]
U64 = np.finfo(np.float64).eps


@pytest.fixture(params=["never", "always"])
def sharing(request, monkeypatch):
    """Force the dense per-row recursion or the variant with sharing across rows."""
    monkeypatch.setattr(
        "recurjac_scale.jacobian.recurjac_shared.SHARE_RATIO", 0.0 if request.param == "never" else math.inf
    )
    monkeypatch.setattr(
        "recurjac_scale.jacobian.recurjac_shared.UNSTABLE_FRACTION", 0.0 if request.param == "never" else math.inf
    )
    return request.param


def _abs_chain(net: Network, X: np.ndarray, C: np.ndarray) -> np.ndarray:
    """``|C| |W_H| D(sup sigma') ... |W_1|`` (a magnitude bound of every path sum): scale of the reference's
    own rounding error, shape (m, n_0)."""
    M = np.abs(np.asarray(net.weights[0]))
    for w, act in zip(net.weights[1:], net.layer_activations[:-1]):
        M = np.abs(np.asarray(w)) @ (act.derivative_range[1] * M)
    M = np.abs(C) @ (net.layer_activations[-1].derivative_range[1] * M)
    return M


def _points(net, region, rng, extra=(), attack=True, n=300):
    pts = [sample_region(region, n, rng), region.x0[None, :]]
    if attack and region.eps > 0:
        pts.append(neuron_attack_points(net, region, rng, neurons_per_layer=2, steps=8))
        pts.append(jacobian_attack_points(net, region, rng, entries=2, steps=8))
    for e in extra:
        pts.append(np.atleast_2d(e))
    return np.vstack(pts)


def _supported(lb_method, net):
    """fastlin is defined for the ReLU family only (the output activation becomes a hidden layer)."""
    if lb_method != "fastlin":
        return True
    return all(a.is_identity or type(a).__name__ in ("ReLU", "LeakyReLU") for a in net.layer_activations)


def check_region(net, x0, eps, p, rng, *, outputs=None, extra=(), methods=METHODS, lbs=LB_METHODS, attack=True,
                 dtype=np.float64, n=300, lipschitz_check=True):
    """Containment of pre-activations, Jacobians (and Lipschitz constants) over ``B_p[x0, eps] ∩ D``."""
    region = Region.of(net, x0, eps, p)
    X = _points(net, region, rng, extra, attack=attack, n=n)
    zs = net.pre_activations(X)
    Jfull = net.jacobian(X)  # (k, n_H, n_0)
    from recurjac_scale.jacobian.api import output_matrix

    C = output_matrix(outputs, net.n_outputs)
    J = np.einsum("mh,khn->kmn", C, Jfull)
    tol = 64 * U64 * sum(net.widths) * _abs_chain(net, X, C)
    for lbm in lbs:
        if not _supported(lbm, net):
            continue
        lb = layer_bounds(net, x0, eps, p, method=lbm)
        for k, z in enumerate(zs):
            lo, hi = lb.lower[k], lb.upper[k]
            assert not (np.isnan(lo).any() or np.isnan(hi).any()), (lbm, k)
            ztol = 1e-13 * (1 + np.abs(z))
            bad = (z < lo - ztol) | (z > hi + ztol)
            assert not bad.any(), f"{lbm}: layer {k} pre-activation escapes its bounds: {np.argwhere(bad)[:5]}"
        for meth in methods:
            r = jacobian_bounds(net, x0, eps, p, method=meth, layer_bounds=lbm, outputs=C, dtype=dtype)
            assert not (np.isnan(r.lower).any() or np.isnan(r.upper).any()), (lbm, meth)
            assert (r.lower <= r.upper).all(), (lbm, meth)
            bad = (J < r.lower - tol) | (J > r.upper + tol)
            if bad.any():
                i = np.argwhere(bad)[0]
                raise AssertionError(
                    f"{meth}/{lbm}: J{tuple(i[1:])}={J[tuple(i)]!r} at point {i[0]} outside "
                    f"[{r.lower[tuple(i[1:])]!r}, {r.upper[tuple(i[1:])]!r}]"
                )
    if lipschitz_check and dtype == np.float64 and eps > 0:
        q = {1.0: math.inf, 2.0: 2.0, math.inf: 1.0}[float(p)]
        for meth in methods:
            res = lipschitz(net, x0, eps, p, method=meth, layer_bounds=lbs[-1], outputs=C)
            L = res.points[0].lipschitz
            assert not math.isnan(L)
            if C.shape[0] == 1:
                g = np.linalg.norm(J[:, 0, :], ord=q, axis=1)
            else:
                g = np.array([np.linalg.norm(Jk, ord=p if p != 2 else 2) for Jk in J])
            assert (g <= L * (1 + 1e-12) + 1e-300).all(), (meth, g.max(), L)
    return X


def _mixed_scale_net(widths, act, rng, out_act=None, **kw):
    """Random weights whose rows and columns span 1e-3 .. 1e3, with duplicated and zero rows/columns."""
    ws, bs = [], []
    for a, b in zip(widths[:-1], widths[1:]):
        w = rng.normal(size=(b, a)) * 10.0 ** rng.uniform(-3, 3, size=(b, 1)) * 10.0 ** rng.uniform(-1.5, 1.5, size=(1, a))
        w /= math.sqrt(a)
        if b > 2:
            w[1] = w[0]  # duplicated row
            w[2] = 0.0  # zero row
        if a > 2:
            w[:, -1] = 0.0  # zero column
            w[:, -2] = w[:, 0]  # duplicated column
        ws.append(w)
        bs.append(rng.normal(size=b) * 10.0 ** rng.uniform(-3, 1, size=b))
    act = get_activation(act, **kw)
    return Network(ws, bs, [act] * (len(widths) - 2), output_activation=out_act)


ACT_PARAMS = {
    "relu": {},
    "leaky_relu_0": {"alpha": 0.0},
    "leaky_relu_1": {"alpha": 1.0},
    "leaky_relu": {"alpha": 0.1},
    "hard_sigmoid": {},
    "sigmoid": {},
    "tanh": {},
    "elu": {},
    "softplus": {},
    "arctan": {},
}


def _act(name):
    base = name.rsplit("_", 1)[0] if name.startswith("leaky_relu_") else name
    return base, ACT_PARAMS[name]


# -- mixed scales, duplicated / zero rows and columns ---------------------------------------------------------------


@pytest.mark.parametrize("act", list(ACT_PARAMS))
@pytest.mark.parametrize("p", [math.inf, 2, 1])
def test_mixed_scales(act, p, sharing, rng):
    base, kw = _act(act)
    net = _mixed_scale_net([6, 9, 8, 7, 3], base, rng, **kw)
    x0 = rng.normal(size=6)
    for eps in (1e-3, 0.3):
        check_region(net, x0, eps, p, rng, attack=(p == math.inf), n=200)


# -- kinks at the centre, l = 0 / u = 0 exactly ---------------------------------------------------------------------


def _kink_net(act_name, rng, widths=(5, 6, 6, 3), **kw):
    """Dyadic weights and biases placing half of every hidden layer's neurons exactly at a kink at x0 = 0 (and the
    others at dyadic offsets), so that interval arithmetic is exact."""
    act = get_activation(act_name, **kw)
    kinks = {"hard_sigmoid": (-2.5, 2.5)}.get(act_name, (0.0,))
    ws, bs = [], []
    x = np.zeros(widths[0])
    h = x
    for k, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        w = rng.integers(-2, 3, size=(b, a)) * 0.5
        z0 = w @ h
        target = np.where(np.arange(b) % 2 == 0, rng.choice(kinks, size=b), z0 + rng.integers(-2, 3, size=b) * 0.25)
        bias = target - z0
        ws.append(w)
        bs.append(bias)
        z = w @ h + bias
        h = act.value(z) if k < len(widths) - 2 else z
    net = Network(ws, bs, [act] * (len(widths) - 2))
    return net, x


@pytest.mark.parametrize("act", ["relu", "leaky_relu_0", "leaky_relu_1", "leaky_relu", "hard_sigmoid"])
def test_neurons_exactly_at_kinks(act, sharing, rng):
    base, kw = _act(act)
    net, x0 = _kink_net(base, rng, **kw)
    for eps in (0.0, 1e-12, 0.125, 0.25, 0.5):
        check_region(net, x0, eps, math.inf, rng, attack=eps > 0, n=200)
    # The left derivative at the kink (approached from z < 0) must be inside the eps > 0 bounds too.
    region = Region.of(net, x0, 0.125, math.inf)
    tiny = 1e-9
    pts = x0[None, :] + tiny * np.vstack([np.eye(5), -np.eye(5), np.ones((1, 5)), -np.ones((1, 5))])
    check_region(net, x0, 0.125, math.inf, rng, extra=pts, attack=False, n=50)
    assert region.eps == 0.125


@pytest.mark.parametrize("act", ["relu", "leaky_relu", "hard_sigmoid"])
def test_eps_exactly_making_bounds_touch_zero(act, rng):
    """First-layer neuron bounds with l == 0 or u == 0 exactly (dyadic data): the derivative interval must still
    contain the one-sided derivatives at the kink."""
    base, kw = _act(act)
    act_obj = get_activation(base, **kw)
    kink = -2.5 if base == "hard_sigmoid" else 0.0
    W1 = np.array([[1.0, -1.0, 0.5], [0.5, 0.5, 0.0], [-1.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
    x0 = np.array([0.5, 0.25, -0.5])
    z0 = W1 @ x0
    eps = 0.25
    # neuron 0: lower = kink; neuron 1: upper = kink; neuron 2: centre at kink; neuron 3: generic.
    b1 = np.array([kink - (z0[0] - eps * 2.5), kink - (z0[1] + eps * 1.0), kink - z0[2], 0.1])
    W2 = np.array([[1.0, -2.0, 0.5, 1.0], [-0.5, 1.0, 1.0, -1.0]])
    net = Network([W1, W2], [b1, np.zeros(2)], [act_obj])
    # IBP widens outward for rounding, so build the exact (dyadic) interval bounds by hand and pass them.
    rad = eps * np.abs(W1).sum(axis=1)
    lo1, hi1 = z0 + b1 - rad, z0 + b1 + rad
    assert lo1[0] == kink and hi1[1] == kink and lo1[2] < kink < hi1[2]
    region = Region.of(net, x0, eps, math.inf)
    big = np.full(2, 1e3)
    lb = LayerBounds(lower=(lo1, -big), upper=(hi1, big), method="exact", region=region)
    corners = x0 + eps * np.array(np.meshgrid(*[[-1.0, 1.0]] * 3)).reshape(3, -1).T
    X = np.vstack([corners, sample_region(region, 400, rng), x0[None, :]])
    z = net.pre_activations(X)[0]
    assert ((z >= lo1) & (z <= hi1)).all() and (z[:, 0] == kink).any() and (z[:, 1] == kink).any()
    J = net.jacobian(X)
    for meth in METHODS:
        r = jacobian_bounds(net, x0, eps, method=meth, layer_bounds=lb)
        assert ((J >= r.lower) & (J <= r.upper)).all(), meth
    check_region(net, x0, eps, math.inf, rng, extra=corners, n=100)


# -- domain box: centre on corners, balls intersected with the box ----------------------------------------------------


@pytest.mark.parametrize("p", [math.inf, 2, 1])
@pytest.mark.parametrize("act", ["relu", "tanh", "hard_sigmoid"])
def test_domain_corners(p, act, sharing, rng):
    net = random_network([5, 8, 7, 3], act, rng, domain=(0.0, 1.0), bias_scale=0.5)
    for x0 in (np.zeros(5), np.ones(5), np.array([0.0, 1.0, 0.0, 1.0, 0.5])):
        corners = np.array(np.meshgrid(*[[0.0, 1.0]] * 5)).reshape(5, -1).T
        region = Region.of(net, x0, 0.3, p)
        inside = corners[np.linalg.norm(corners - x0, ord=p, axis=1) <= 0.3]
        check_region(net, x0, 0.3, p, rng, extra=inside, attack=False, n=150)
        # eps = inf: the whole domain, every corner is in the region.
        check_region(net, x0, math.inf, p, rng, extra=corners, attack=False, n=150, lipschitz_check=False)
        assert region.lower is not None


# -- all stable / all unstable -------------------------------------------------------------------------------------


@pytest.mark.parametrize("act", ["relu", "leaky_relu", "tanh"])
def test_all_stable_and_all_unstable(act, sharing, rng):
    base, kw = _act(act)
    widths = [6, 10, 10, 10, 4]
    net = random_network(widths, base, rng, **kw)
    # All stable: huge positive biases, small radius.
    ws = [np.abs(w) for w in net.weights]
    stable = Network(ws, [np.full(n, 5.0) for n in widths[1:]], list(net.activations))
    x0 = np.full(6, 0.1)
    check_region(stable, x0, 1e-3, math.inf, rng, n=150)
    # All unstable: zero biases, x0 = 0, large radius.
    unstable = Network(list(net.weights), [np.zeros(n) for n in widths[1:]], list(net.activations))
    check_region(unstable, np.zeros(6), 1.0, math.inf, rng, n=200)


# -- saturation, extreme eps ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("act", ["sigmoid", "tanh", "arctan", "softplus", "elu"])
@pytest.mark.parametrize("zscale", [30.0, 700.0, 1e5])
def test_saturated_smooth_activations(act, zscale, rng):
    net = random_network([4, 6, 6, 2], act, rng)
    ws = [w * zscale for w in net.weights[:-1]] + [net.weights[-1]]
    bs = [rng.choice([-1.0, 1.0], size=b.shape) * zscale for b in net.biases[:-1]] + [net.biases[-1]]
    big = Network(ws, bs, list(net.activations))
    x0 = rng.uniform(-1, 1, 4)
    for eps in (0.0, 1e-12, 1e-3, 1.0):
        check_region(big, x0, eps, math.inf, rng, attack=eps > 0, n=100)


@pytest.mark.parametrize("act", ["relu", "sigmoid", "hard_sigmoid"])
def test_tiny_and_huge_eps(act, sharing, rng):
    net = random_network([5, 7, 6, 3], act, rng)
    x0 = rng.normal(size=5)
    for eps in (1e-12, 1e6, math.inf):
        for p in (math.inf, 2, 1):
            check_region(net, x0, eps, p, rng, attack=False, n=100, lipschitz_check=math.isfinite(eps))


# -- output selections, margins, output activations ----------------------------------------------------------------


@pytest.mark.parametrize("outputs", [None, 0, (2, 0), (1, None), "matrix"])
@pytest.mark.parametrize("out_act", [None, "sigmoid", "tanh", "relu"])
def test_outputs_and_output_activations(outputs, out_act, sharing, rng):
    net = random_network([6, 8, 7, 4], "relu", rng, output_activation=out_act)
    if outputs == "matrix":
        outputs = rng.normal(size=(3, 4))
        outputs[1] = 0.0  # a zero row
    x0 = rng.normal(size=6)
    check_region(net, x0, 0.1, math.inf, rng, outputs=outputs, n=150)


def test_single_row_and_single_input(rng):
    for widths in ([1, 5, 1], [1, 1, 1, 1], [7, 1, 1], [1, 4, 4, 6]):
        net = random_network(widths, "relu", rng)
        check_region(net, rng.normal(size=widths[0]), 0.5, math.inf, rng, n=100)


# -- eps = 0 exactness and nesting --------------------------------------------------------------------------------------


@pytest.mark.parametrize("act", ["relu", "tanh", "softplus"])
def test_eps_zero_exact_and_nesting(act, rng):
    net = random_network([6, 9, 8, 3], act, rng)
    x0 = rng.normal(size=6)
    J0 = net.jacobian(x0)
    scale = _abs_chain(net, None, np.eye(3))
    for meth in METHODS:
        r = jacobian_bounds(net, x0, 0.0, method=meth)
        assert np.all(r.upper - r.lower <= 1e-12 * (1 + scale)), meth
        assert np.all(r.lower <= J0 + 1e-14 * scale) and np.all(J0 <= r.upper + 1e-14 * scale)
    # Interval methods are inclusion-monotone: IBP layer bounds + Fast-Lip nest in eps.
    prev = None
    for eps in (0.0, 1e-6, 1e-3, 0.05, 0.5, 5.0):
        r = jacobian_bounds(net, x0, eps, method="fastlip", layer_bounds="ibp")
        if prev is not None:
            assert np.all(r.lower <= prev.lower + 1e-12 * scale) and np.all(r.upper >= prev.upper - 1e-12 * scale)
        prev = r


# -- float32 ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("act", ["relu", "leaky_relu", "tanh", "hard_sigmoid"])
def test_float32_option(act, sharing, rng):
    base, kw = _act(act)
    net = _mixed_scale_net([6, 9, 8, 7, 3], base, rng, **kw)
    x0 = rng.normal(size=6)
    check_region(net, x0, 0.05, math.inf, rng, dtype=np.float32, lbs=["crown"], n=200)
    net, x0 = _kink_net(base if base != "leaky_relu" else "relu", rng)
    check_region(net, x0, 0.25, math.inf, rng, dtype=np.float32, lbs=["ibp"], n=200)


# -- hypothesis sweep --------------------------------------------------------------------------------------------------

hyp = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


def _sweep(seed, depth, width, act, log_scale, eps_exp, p, bias_kind):
    rng = np.random.default_rng(seed)
    widths = [int(rng.integers(1, width + 1)) for _ in range(depth + 1)]
    widths[0] = max(widths[0], 1)
    base, kw = _act(act)
    net = random_network(widths, base, rng, **kw)
    ws = [w * 10.0 ** rng.uniform(-log_scale, log_scale, size=(w.shape[0], 1)) for w in net.weights]
    if bias_kind == "zero":
        bs = [np.zeros_like(b) for b in net.biases]
    elif bias_kind == "big":
        bs = [b * 100 for b in net.biases]
    else:
        bs = list(net.biases)
    net = Network(ws, bs, list(net.activations))
    x0 = np.zeros(widths[0]) if bias_kind == "zero" else rng.normal(size=widths[0])
    eps = 0.0 if eps_exp is None else 10.0 ** eps_exp
    check_region(net, x0, eps, p, rng, attack=False, n=60, lipschitz_check=False)


_STRATEGY = dict(
    seed=st.integers(0, 2**31),
    depth=st.integers(1, 4),
    width=st.integers(1, 7),
    act=st.sampled_from(list(ACT_PARAMS)),
    log_scale=st.sampled_from([0.0, 1.0, 3.0]),
    eps_exp=st.one_of(st.none(), st.integers(-12, 2)),
    p=st.sampled_from([math.inf, 2.0, 1.0]),
    bias_kind=st.sampled_from(["zero", "normal", "big"]),
)


@settings(max_examples=40, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))
@given(**_STRATEGY)
def test_hypothesis_sweep(seed, depth, width, act, log_scale, eps_exp, p, bias_kind):
    _sweep(seed, depth, width, act, log_scale, eps_exp, p, bias_kind)


@pytest.mark.slow
@settings(max_examples=600, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))
@given(**_STRATEGY)
def test_hypothesis_sweep_large(seed, depth, width, act, log_scale, eps_exp, p, bias_kind):
    _sweep(seed, depth, width, act, log_scale, eps_exp, p, bias_kind)
