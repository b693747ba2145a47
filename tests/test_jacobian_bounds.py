"""Soundness, exactness, ordering and nesting of the Jacobian bounds (ALGORITHM.md, "How to know it is right").

Every method x activation x norm: the exact Jacobian (``Network.jacobian``) at points of the region (random,
boundary, and found by search on single Jacobian entries) lies in ``[lower, upper]``.  The default run uses a few
thousand points per configuration; ``-m slow`` runs >= 10^4 per configuration on more and larger networks.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from recurjac_scale.errors import InputError, ShapeMismatchError
from recurjac_scale.jacobian import JACOBIAN_METHODS, jacobian_bounds
from recurjac_scale.layer_bounds import LayerBounds, Region, layer_bounds
from recurjac_scale.network import Network
from recurjac_scale.testing import jacobian_attack_points, random_network, sample_region

METHODS = sorted(JACOBIAN_METHODS)
ACTS = {
    "relu": {},
    "leaky_relu": {"alpha": 0.3},
    "sigmoid": {},
    "tanh": {},
    "arctan": {},
    "elu": {},
    "softplus": {},
    "hard_sigmoid": {},
}
NORMS = (1.0, 2.0, math.inf)


def _config(seed: int, act: str, *, big: bool = False, domain: bool = False):
    """A random network (depth 2-7, widths 5-64) and a centre; deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    depth = int(rng.integers(2, 8))  # affine layers
    hi = 65 if big else 24
    widths = [int(rng.integers(5, hi)) for _ in range(depth)] + [int(rng.integers(2, 6))]
    net = random_network(widths, act, rng, domain=(0.0, 1.0) if domain else None, **ACTS[act])
    x0 = rng.uniform(0.0, 1.0, widths[0]) if domain else rng.uniform(-0.5, 0.5, widths[0])
    return net, x0, rng


def _radius(p: float, n0: int, base: float) -> float:
    """Radii of comparable volume: the l_p ball of radius eps * n0^(1/p) covers a similar span."""
    return base if p == math.inf else base * n0 ** (1.0 / p)


def _points(net, region, rng, n_random, attack_entries, attack_steps):
    pts = [sample_region(region, n_random, rng)]
    if attack_entries:
        pts.append(jacobian_attack_points(net, region, rng, entries=attack_entries, steps=attack_steps))
    return np.vstack(pts)


def _assert_contains(res, net, X, what=""):
    J = np.einsum("mh,khn->kmn", res.outputs, net.jacobian(X))
    below = J < res.lower
    above = J > res.upper
    if below.any() or above.any():
        k = int(np.argmax((below | above).any(axis=(1, 2))))
        j, i = np.argwhere(below[k] | above[k])[0]
        raise AssertionError(
            f"{what}: exact Jacobian outside the bounds at point {k}, entry ({j}, {i}): "
            f"{J[k, j, i]!r} not in [{res.lower[j, i]!r}, {res.upper[j, i]!r}]"
        )


def _containment(method, act, p, seed, *, n_random, entries, steps, big=False, domain=False, base=(0.01, 0.1)):
    net, x0, rng = _config(seed, act, big=big, domain=domain)
    for b in base:
        eps = _radius(p, net.n_inputs, b)
        res = jacobian_bounds(net, x0, eps, p=p, method=method)
        assert res.lower.shape == (net.n_outputs, net.n_inputs)
        assert (res.lower <= res.upper).all()
        region = Region.of(net, x0, eps, p)
        X = _points(net, region, rng, n_random, entries, steps)
        _assert_contains(res, net, X, f"{method}/{act}/p={p}/eps={eps:g}/seed={seed}/domain={domain}")


@pytest.mark.parametrize("p", NORMS, ids=["l1", "l2", "linf"])
@pytest.mark.parametrize("act", sorted(ACTS))
@pytest.mark.parametrize("method", METHODS)
def test_containment(method, act, p):
    seed = METHODS.index(method) * 100 + sorted(ACTS).index(act) * 10 + NORMS.index(p)
    _containment(method, act, p, seed, n_random=1500, entries=1, steps=10, domain=(seed % 2 == 1))


@pytest.mark.slow
@pytest.mark.parametrize("domain", [False, True], ids=["nodomain", "domain"])
@pytest.mark.parametrize("p", NORMS, ids=["l1", "l2", "linf"])
@pytest.mark.parametrize("act", sorted(ACTS))
@pytest.mark.parametrize("method", METHODS)
def test_containment_sweep(method, act, p, domain):
    # >= 10^4 points per configuration: 2 networks x 2 radii x (3000 random/boundary + attack points).
    for seed in range(1000, 1002):
        _containment(method, act, p, seed, n_random=3000, entries=3, steps=20, big=True, domain=domain, base=(0.005, 0.1))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("act", ["relu", "sigmoid"])
def test_containment_ibp_layer_bounds_and_domain(method, act, rng):
    """Containment with IBP layer bounds and an input domain that clips the ball."""
    net = random_network([9, 16, 12, 4], act, rng, domain=(0.0, 1.0))
    x0 = np.clip(rng.uniform(-0.1, 1.1, 9), 0, 1)
    res = jacobian_bounds(net, x0, 0.4, method=method, layer_bounds="ibp")
    X = sample_region(Region.of(net, x0, 0.4), 3000, rng)
    _assert_contains(res, net, X, f"{method}/{act}/ibp/domain")


# -- exactness ----------------------------------------------------------------------------------------------------


def _abs_chain(net, x0):
    """|C W(H)| D(|σ'(z)|) ... |W(1)| at x0, computed directly: the scale of the rounding of J(x0)."""
    zs = net.pre_activations(x0[None, :])
    acts = net.layer_activations
    M = np.abs(net.weights[-1])
    for k in range(net.n_layers - 2, -1, -1):
        M = (M * np.abs(acts[k].derivative(zs[k][0]))[None, :]) @ np.abs(net.weights[k])
    return M


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("act", sorted(ACTS))
def test_exact_at_eps_zero(method, act):
    """eps = 0: lower == upper == J(x0) to 1e-12 relative to the absolute-value product of each row (the
    condition-free scale of a sum of products), given the point's own pre-activations as layer bounds; with the
    default (CROWN) layer bounds, whose outward rounding leaves ~1e-12-wide intervals, to 1e-9."""
    net, x0, rng = _config(7 + sorted(ACTS).index(act), act, big=True)
    J = net.jacobian(x0)
    scale = _abs_chain(net, x0).max(axis=1, keepdims=True)
    zs = [z[0] for z in net.pre_activations(x0[None, :])]
    exact_lb = LayerBounds(lower=tuple(zs), upper=tuple(zs), method="point", region=Region.of(net, x0, 0.0))
    for lb, rel in ((exact_lb, 1e-12), (None, 1e-9)):
        res = jacobian_bounds(net, x0, 0.0, method=method, layer_bounds=lb)
        assert (res.lower <= J).all() and (J <= res.upper).all()
        width = res.upper - res.lower
        assert (width <= rel * scale).all(), (rel, float(np.max(width / scale)))


@pytest.mark.parametrize("method", METHODS)
def test_no_hidden_layer_gives_W(method, rng):
    W = rng.normal(size=(4, 6))
    net = Network([W], [rng.normal(size=4)], [])
    for eps in (0.0, 0.3, math.inf):
        res = jacobian_bounds(net, rng.normal(size=6), eps, method=method)
        np.testing.assert_array_equal(res.lower, W)
        np.testing.assert_array_equal(res.upper, W)
    res = jacobian_bounds(net, np.zeros(6), 0.1, method=method, outputs=(2, 0))
    np.testing.assert_array_equal(res.lower, (W[2] - W[0])[None, :])


# -- ordering and nesting -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("act", ["relu", "leaky_relu"])
def test_recurjac_b_never_looser_than_fastlip(act, rng):
    widths_fl, widths_b = [], []
    for seed in range(6):
        net, x0, _ = _config(300 + seed, act, big=True)
        for eps in (0.01, 0.05, 0.2):
            lb = layer_bounds(net, x0, eps, method="ibp")
            fl = jacobian_bounds(net, x0, eps, method="fastlip", layer_bounds=lb)
            b = jacobian_bounds(net, x0, eps, method="recurjac-b", layer_bounds=lb)
            tol = 1e-12 * (1 + np.abs(fl.lower).max() + np.abs(fl.upper).max())
            assert (b.lower >= fl.lower - tol).all() and (b.upper <= fl.upper + tol).all(), (seed, eps)
            widths_fl.append(fl.width.mean())
            widths_b.append(b.width.mean())
    assert np.mean(widths_b) < np.mean(widths_fl)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("act", ["relu", "leaky_relu", "tanh", "sigmoid", "elu"])
def test_nested_in_eps(method, act):
    """Bounds for eps1 < eps2 are nested when the layer bounds are (IBP bounds intersected to be nested)."""
    net, x0, rng = _config(500 + sorted(ACTS).index(act), act)
    prev = None
    lbs = []
    for eps in (0.2, 0.05, 0.01, 0.0):
        lb = layer_bounds(net, x0, eps, method="ibp")
        if lbs:
            o = lbs[-1]
            lb = LayerBounds(
                lower=tuple(np.maximum(a, b) for a, b in zip(lb.lower, o.lower)),
                upper=tuple(np.minimum(a, b) for a, b in zip(lb.upper, o.upper)),
                method="ibp", region=lb.region,
            )
        lbs.append(lb)
        res = jacobian_bounds(net, x0, eps, method=method, layer_bounds=lb)
        if prev is not None:
            assert (res.lower >= prev.lower).all() and (res.upper <= prev.upper).all(), eps
        prev = res


# -- outputs, global bounds, options -------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_output_selections(method, rng):
    net = random_network([7, 12, 10, 5], "tanh", rng)
    x0 = rng.uniform(-0.5, 0.5, 7)
    full = jacobian_bounds(net, x0, 0.05, method=method)
    one = jacobian_bounds(net, x0, 0.05, method=method, outputs=3)
    assert one.lower.shape == (1, 7)
    # a single row is as tight as that row of the full bounds (the recursion is per row; F0/F1 rows are inputs)
    tol = 1e-9
    assert (one.lower >= full.lower[3] - tol).all() and (one.upper <= full.upper[3] + tol).all()
    margin = jacobian_bounds(net, x0, 0.05, method=method, outputs=(1, 4))
    assert (margin.lower <= full.upper[1] - full.lower[4] + tol).all()
    assert (margin.lower >= full.lower[1] - full.upper[4] - tol).all()
    C = rng.normal(size=(2, 5))
    mat = jacobian_bounds(net, x0, 0.05, method=method, outputs=C)
    X = sample_region(Region.of(net, x0, 0.05), 2000, rng)
    for r in (one, margin, mat):
        _assert_contains(r, net, X, f"{method} outputs")
    assert jacobian_bounds(net, x0, 0.05, method=method, outputs="all").lower.shape == (5, 7)
    assert np.array_equal(jacobian_bounds(net, x0, 0.05, method=method, outputs="1,4").lower, margin.lower)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("out_act", ["sigmoid", "relu"])
def test_output_activation(method, out_act, rng):
    net = random_network([6, 10, 8, 3], "tanh", rng, output_activation=out_act)
    x0 = rng.uniform(-0.5, 0.5, 6)
    for outputs in (None, 1, (0, 2)):
        res = jacobian_bounds(net, x0, 0.1, method=method, outputs=outputs)
        X = sample_region(Region.of(net, x0, 0.1), 2000, rng)
        _assert_contains(res, net, X, f"{method} output activation {out_act}")


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("act", ["relu", "sigmoid", "tanh", "hard_sigmoid"])
def test_global_bounds(method, act, rng):
    """eps = inf: without a domain the activations' global derivative ranges; with one, the domain's layer bounds."""
    net = random_network([5, 8, 7, 3], act, rng)
    x0 = rng.uniform(-0.5, 0.5, 5)
    res = jacobian_bounds(net, x0, math.inf, method=method)
    assert res.layer_bound_method == "global" and np.isfinite(res.lower).all() and np.isfinite(res.upper).all()
    X = np.vstack([rng.normal(scale=s, size=(1000, 5)) for s in (0.3, 3.0, 30.0)])
    _assert_contains(res, net, X, f"{method}/{act} global")
    netd = random_network([5, 8, 7, 3], act, np.random.default_rng(1), domain=(0.0, 1.0))
    resd = jacobian_bounds(netd, np.full(5, 0.5), math.inf, method=method)
    assert resd.layer_bound_method != "global"
    _assert_contains(resd, netd, sample_region(Region.of(netd, np.full(5, 0.5), math.inf), 3000, rng), "domain")
    local = jacobian_bounds(netd, np.full(5, 0.5), 0.05, method=method, layer_bounds=resd.layer_bound_method)
    assert local.width.mean() <= resd.width.mean() + 1e-12


@pytest.mark.parametrize("method", METHODS)
def test_float32_option_is_sound(method, rng):
    net = random_network([8, 20, 16, 4], "relu", rng)
    x0 = rng.uniform(-0.5, 0.5, 8)
    res = jacobian_bounds(net, x0, 0.05, method=method, dtype=np.float32)
    assert res.lower.dtype == np.float32 and res.dtype == "float32"
    X = sample_region(Region.of(net, x0, 0.05), 2000, rng)
    _assert_contains(res, net, X, f"{method} float32")
    r0 = jacobian_bounds(net, x0, 0.0, method=method, dtype=np.float32)
    J = net.jacobian(x0)
    assert (r0.lower <= J).all() and (J <= r0.upper).all()


@pytest.mark.parametrize("method", METHODS)
def test_float32_refuses_weights_beyond_its_range(method, rng):
    """Finite float64 weights that overflow float32 would make every bound infinite: a clear error instead (and
    float64 still runs)."""
    from recurjac_scale.errors import InputError

    net = random_network([5, 6, 4, 3], "relu", rng)
    W = [np.array(w) for w in net.weights]
    W[1] = W[1] * 1e300
    big = Network(W, [np.array(b) for b in net.biases], net.activations)
    x0 = rng.uniform(-0.5, 0.5, 5)
    with pytest.raises(InputError, match=r"weights of layer 2: \|w\| up to .* exceeds the float32 range"):
        jacobian_bounds(big, x0, 0.01, method=method, dtype=np.float32)
    with pytest.raises(InputError, match="float32 range"):
        jacobian_bounds(big, x0, 0.01, method=method, layer_bounds="ibp", dtype=np.float32)
    res = jacobian_bounds(big, x0, 0.0, method=method)
    J = big.jacobian(x0)
    assert (res.lower <= J).all() and (J <= res.upper).all()


def test_lazy_network_and_result_dict(rng):
    da = pytest.importorskip("dask.array")
    net = random_network([6, 9, 4], "relu", rng)
    lazy = Network([da.from_array(w, chunks=3) for w in net.weights], net.biases, net.activations)
    x0 = rng.uniform(-0.5, 0.5, 6)
    a = jacobian_bounds(net, x0, 0.1)
    b = jacobian_bounds(lazy, x0, 0.1)
    assert np.array_equal(a.lower, b.lower) and np.array_equal(a.upper, b.upper)
    d = a.to_dict()
    import json

    json.dumps(d)
    assert d["method"] == "recurjac-b" and d["shape"] == [4, 6] and set(d["timings"]) == {"layer_bounds", "jacobian", "compile"}
    assert len(a.unstable) == 1 and a.layer_bounds.lower[0].shape == (9,)


def test_errors(rng):
    net = random_network([4, 5, 3], "relu", rng)
    x0 = np.zeros(4)
    with pytest.raises(InputError, match="unknown Jacobian method"):
        jacobian_bounds(net, x0, 0.1, method="recurjac-x")
    with pytest.raises(InputError, match="out of range"):
        jacobian_bounds(net, x0, 0.1, outputs=3)
    with pytest.raises(InputError, match="c != j"):
        jacobian_bounds(net, x0, 0.1, outputs=(1, 1))
    with pytest.raises(ShapeMismatchError):
        jacobian_bounds(net, x0, 0.1, outputs=np.ones((2, 4)))
    with pytest.raises(InputError):
        jacobian_bounds(net, x0, -1.0)
    with pytest.raises(InputError, match="dtype"):
        jacobian_bounds(net, x0, 0.1, dtype=np.int32)
    with pytest.raises(ShapeMismatchError):
        jacobian_bounds(net, np.zeros(5), 0.1)
