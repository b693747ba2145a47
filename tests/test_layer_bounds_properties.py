"""Properties of the layer-bound methods: block invariance, float32, ordering, nesting, unstable counts, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest

from recurjac_scale.errors import InputError
from recurjac_scale.layer_bounds import LAYER_BOUND_METHODS, Region, count_unstable, layer_bounds
from recurjac_scale.layer_bounds.backsub import _sup_dot
from recurjac_scale.activations import get_activation
from recurjac_scale.testing import neuron_attack_points, random_network, sample_region


def _widths(lb):
    return [float(np.mean(u - l)) for l, u in zip(lb.lower, lb.upper)]


def test_registry_holds_the_three_methods():
    assert {"ibp", "fastlin", "crown"} <= set(LAYER_BOUND_METHODS)


@pytest.mark.parametrize("method,act", [("fastlin", "relu"), ("crown", "relu"), ("crown", "tanh"), ("crown", "softplus")])
def test_block_rows_do_not_change_the_result(method, act, rng):
    net = random_network([12, 37, 29, 41, 5], act, rng)
    x0 = rng.uniform(-1, 1, 12)
    for p in (1, 2, math.inf):
        ref = layer_bounds(net, x0, 0.05, p, method, block_rows=10_000)
        for br in (1, 3, 7, 16, 40):
            lb = layer_bounds(net, x0, 0.05, p, method, block_rows=br)
            for a, b in zip(ref.lower + ref.upper, lb.lower + lb.upper):
                np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("act", ["relu", "sigmoid", "elu"])
def test_float32_is_sound_and_close(act, rng):
    net = random_network([10, 30, 30, 30, 4], act, rng)
    x0 = rng.uniform(-1, 1, 10)
    region = Region.of(net, x0, 0.05, math.inf)
    X = np.vstack([sample_region(region, 5000, rng), neuron_attack_points(net, region, rng, neurons_per_layer=3)])
    zs = net.pre_activations(X)
    b64 = layer_bounds(net, x0, 0.05, math.inf, "crown")
    b32 = layer_bounds(net, x0, 0.05, math.inf, "crown", dtype=np.float32)
    assert "float32" in b32.rounding
    for z, l, u, l64, u64 in zip(zs, b32.lower, b32.upper, b64.lower, b64.upper):
        assert l.dtype == np.float64
        assert (z >= l).all() and (z <= u).all()
        # float32 allowances are wider, but not by much
        np.testing.assert_allclose(l, l64, atol=1e-3 * (1 + np.abs(l64).max()))
        np.testing.assert_allclose(u, u64, atol=1e-3 * (1 + np.abs(u64).max()))
    with pytest.raises(InputError):
        layer_bounds(net, x0, 0.05, math.inf, "crown", dtype=np.float16)


def test_eps_zero_collapses_to_the_forward_pass(rng):
    for act in ("relu", "tanh", "hard_sigmoid", "softplus"):
        net = random_network([8, 20, 20, 20, 3], act, rng)
        x0 = rng.uniform(-1, 1, 8)
        z0 = [z[0] for z in net.pre_activations(x0[None])]
        for m in ("ibp", "crown") + (("fastlin",) if act == "relu" else ()):
            lb = layer_bounds(net, x0, 0.0, 2, m)
            for z, l, u in zip(z0, lb.lower, lb.upper):
                assert (l <= z).all() and (z <= u).all()
                assert np.max(u - l) < 1e-12 * (1 + np.abs(z).max())


def test_ordering_crown_never_looser_than_fastlin_and_inside_ibp(rng):
    """CROWN is never looser than Fast-Lin on ReLU networks (beyond rounding), and on average inside IBP; the
    mean widths are printed (run with -s) for the report."""
    sums = {"ibp": 0.0, "fastlin": 0.0, "crown": 0.0}
    count = 0
    for trial in range(24):
        depth = 2 + trial % 5
        act = ("relu", "leaky_relu")[trial % 2]
        params = {"alpha": 0.2} if act == "leaky_relu" else {}
        widths = [8] + [int(rng.integers(8, 20)) for _ in range(depth)] + [4]
        net = random_network(widths, act, rng, **params)
        x0 = rng.uniform(-1, 1, 8)
        for p in (1, 2, math.inf):
            eps = {1: 0.5, 2: 0.2, math.inf: 0.05}[p]
            res = {m: layer_bounds(net, x0, eps, p, m) for m in sums}
            for k in range(net.n_layers):
                f, c = res["fastlin"], res["crown"]
                tol = 1e-12 * (1 + np.abs(f.upper[k]).max() + np.abs(f.lower[k]).max())
                assert (c.upper[k] <= f.upper[k] + tol).all()
                assert (c.lower[k] >= f.lower[k] - tol).all()
            for m in sums:
                sums[m] += float(np.mean(np.concatenate([u - l for l, u in zip(res[m].lower, res[m].upper)])))
            count += 1
    means = {m: s / count for m, s in sums.items()}
    print("mean widths on ReLU nets:", means)
    assert means["crown"] <= means["fastlin"] < means["ibp"]


@pytest.mark.parametrize("act", ["sigmoid", "tanh", "arctan", "elu", "softplus", "hard_sigmoid"])
def test_crown_inside_ibp_on_average(act, rng):
    tot_c = tot_i = 0.0
    for trial in range(6):
        net = random_network([8, 16, 16, 16, 4], act, rng)
        x0 = rng.uniform(-1, 1, 8)
        for p, eps in ((1, 0.5), (2, 0.2), (math.inf, 0.05)):
            c = layer_bounds(net, x0, eps, p, "crown")
            i = layer_bounds(net, x0, eps, p, "ibp")
            tot_c += sum(_widths(c))
            tot_i += sum(_widths(i))
            # intersect_ibp (default) makes it inside IBP for every neuron of layer 1 (same earlier bounds)
            assert (c.upper[1] <= i.upper[1] + 1e-12).all() and (c.lower[1] >= i.lower[1] - 1e-12).all()
    assert tot_c < tot_i


def test_crown_plain_adaptive_option(rng):
    net = random_network([8, 16, 16, 4], "relu", rng)
    x0 = rng.uniform(-1, 1, 8)
    full = layer_bounds(net, x0, 0.1, math.inf, "crown")
    plain = layer_bounds(net, x0, 0.1, math.inf, "crown", never_looser_than_fastlin=False, intersect_ibp=False)
    for a, b, c, d in zip(full.lower, full.upper, plain.lower, plain.upper):
        assert (a >= c - 1e-12).all() and (b <= d + 1e-12).all()
    with pytest.raises(InputError):
        layer_bounds(net, x0, 0.1, math.inf, "crown", relu_lower="steep")
    with pytest.raises(InputError):
        layer_bounds(net, x0, 0.1, math.inf, "ibp", relu_lower="adaptive")


def test_bounds_are_nested_in_eps_for_ibp(rng):
    net = random_network([6, 12, 12, 3], "tanh", rng)
    x0 = rng.uniform(-1, 1, 6)
    prev = None
    for eps in (0.0, 0.01, 0.1, 1.0, math.inf):
        lb = layer_bounds(net, x0, eps, math.inf, "ibp")
        if prev is not None:
            for a, b, c, d in zip(lb.lower, lb.upper, prev.lower, prev.upper):
                assert (a <= c).all() and (b >= d).all()
        prev = lb


def test_fastlin_rejects_general_activations(rng):
    net = random_network([4, 6, 2], "tanh", rng)
    with pytest.raises(InputError, match="crown"):
        layer_bounds(net, np.zeros(4), 0.1, math.inf, "fastlin")


def test_bad_arguments(rng):
    net = random_network([4, 6, 2], "relu", rng)
    with pytest.raises(InputError):
        layer_bounds(net, np.zeros(4), 0.1, 3, "crown")
    with pytest.raises(InputError):
        layer_bounds(net, np.zeros(4), -0.1, 2, "crown")
    with pytest.raises(InputError):
        layer_bounds(net, np.zeros(4), 0.1, 2, "deeppoly")
    with pytest.raises(InputError):
        layer_bounds(net, np.zeros(4), 0.1, 2, "crown", block_rows=0)


def test_unstable_counts_mean_what_users_expect():
    relu, sig, hs, ident = (get_activation(n) for n in ("relu", "sigmoid", "hard_sigmoid", "identity"))
    lo = np.array([-1.0, 0.0, -2.0, 1.0, -3.0])
    hi = np.array([1.0, 1.0, 0.0, 2.0, 3.0])
    assert count_unstable(relu, lo, hi) == 2  # [-1, 1], [-3, 3]; touching 0 is stable
    assert count_unstable(sig, lo, hi) == 2  # crosses 0
    assert count_unstable(hs, lo, hi) == 1  # only [-3, 3] contains a break point (-2.5 / 2.5)
    assert count_unstable(ident, lo, hi) == 0
    net = random_network([5, 9, 9, 3], "relu", np.random.default_rng(3))
    x0 = np.zeros(5)
    lb = layer_bounds(net, x0, 0.3, math.inf, "crown")
    assert len(lb.unstable) == 3
    for k in range(2):
        assert lb.unstable[k] == int(np.sum((lb.lower[k] < 0) & (lb.upper[k] > 0)))
    assert lb.unstable[-1] == 0  # identity output layer
    d = lb.to_dict()
    assert d["method"] == "crown" and d["unstable"] == list(lb.unstable) and "rounding" in d


def test_sup_dot_zero_times_inf_is_zero():
    A = np.array([[0.0, 1.0], [2.0, 0.0], [-1.0, 0.0]])
    v = np.array([np.inf, 3.0])
    out = _sup_dot(A, v)
    assert out[0] == 3.0 and out[1] == np.inf and out[2] == -np.inf
