"""The fused back-substitution engine (the default) against the plain numpy chains (``fused=False``, the previous
default's engine), against Fast-Lin, and against sampled and attacked pre-activations.

The two engines compute the same products and differ only in the order in which sums add them (and, for a linear
relaxation, in running one chain for both bounds instead of two mirrored ones, which is exact).  So their bounds
agree to a few units of rounding: ``TOL`` below is that margin, ~1e4 times smaller than any real change of the
algorithm would make (each rounding allowance itself is ~1e-13 of the magnitudes here).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from recurjac_scale.layer_bounds import Region, layer_bounds
from recurjac_scale.testing import neuron_attack_points, random_network, sample_region

TOL = 1e-11
"""Relative margin (to 1 + |bound|) for bounds that differ only in the order of summation."""

EPS_BY_P = {1.0: (0.0, 1e-7, 0.05, 0.6, 4.0), 2.0: (1e-7, 0.02, 0.3, 2.0), math.inf: (1e-9, 1e-4, 0.02, 0.2, 1.0)}


def _cases(rng, acts, n_nets):
    """Random small networks: depth 1-5 hidden layers of width 2-12, with or without the domain [-1, 1]."""
    for i in range(n_nets):
        act = acts[i % len(acts)]
        params = {"alpha": float(rng.choice([0.05, 0.3]))} if act == "leaky_relu" else {}
        widths = [int(rng.integers(2, 9))] + [int(rng.integers(2, 13)) for _ in range(1 + i % 5)] + [
            int(rng.integers(1, 4))]
        domain = (-1.0, 1.0) if i % 3 == 0 else None
        net = random_network(widths, act, rng, domain=domain, **params)
        x0 = rng.uniform(-0.9, 0.9, widths[0])
        for p, radii in EPS_BY_P.items():
            for eps in radii:
                yield net, x0, p, eps


def _outside(a, b) -> float:
    """Largest excess of interval ``a`` outside ``b``, relative to ``1 + |b|`` (<= 0 when contained)."""
    worst = -math.inf
    for al, au, bl, bu in zip(a.lower, a.upper, b.lower, b.upper):
        sc = 1.0 + np.maximum(np.abs(bl), np.abs(bu))
        with np.errstate(invalid="ignore"):
            d = np.maximum((bl - al) / sc, (au - bu) / sc)
        d = np.where(np.isnan(d), 0.0, d)  # both infinite on the same side
        worst = max(worst, float(np.max(d)))
    return worst


def _assert_close(a, b, what):
    for k, (al, au, bl, bu) in enumerate(zip(a.lower, a.upper, b.lower, b.upper)):
        for x, y in ((al, bl), (au, bu)):
            same_inf = np.isinf(x) & (x == y)
            sc = 1.0 + np.abs(np.where(np.isfinite(y), y, 0.0))
            bad = ~same_inf & ~(np.abs(x - y) <= TOL * sc)
            assert not bad.any(), f"{what}: layer {k}: {x[bad][:3]} vs {y[bad][:3]}"


@pytest.mark.parametrize("acts", [("relu", "leaky_relu"), ("tanh", "sigmoid", "hard_sigmoid", "softplus")])
def test_fused_engine_equals_the_numpy_chains(acts, rng):
    """Every method, fused and unfused, on random networks: the same bounds up to the order of summation (the
    first affine step shared between chains, stacked chains, one chain for Fast-Lin's two bounds)."""
    methods = [("crown", {}), ("crown", {"never_looser_than_fastlin": False})]
    if "relu" in acts:
        methods += [("fastlin", {}), ("crown", {"relu_lower": "parallel"})]
    n = 0
    for net, x0, p, eps in _cases(rng, acts, 12):
        for m, opts in methods:
            new = layer_bounds(net, x0, eps, p, m, **opts)
            old = layer_bounds(net, x0, eps, p, m, fused=False, **opts)
            _assert_close(new, old, f"{m} {opts} {net.widths} p={p} eps={eps}")
            n += 1
    assert n >= 12 * 14 * len(methods)


def test_new_default_within_old_default_and_fastlin(rng):
    """The default (fused) is never looser than the previous default (``fused=False``: CROWN-Ada and Fast-Lin as
    separate numpy chains) nor than Fast-Lin alone (fused or not), beyond rounding-order differences."""
    worst_old = worst_fl = -math.inf
    for net, x0, p, eps in _cases(rng, ("relu", "leaky_relu"), 30):
        new = layer_bounds(net, x0, eps, p, "crown")
        old = layer_bounds(net, x0, eps, p, "crown", fused=False)
        worst_old = max(worst_old, _outside(new, old))
        for fused in (True, False):
            worst_fl = max(worst_fl, _outside(new, layer_bounds(net, x0, eps, p, "fastlin", fused=fused)))
    assert worst_old <= TOL, worst_old
    assert worst_fl <= TOL, worst_fl


@pytest.mark.parametrize("act,params", [("relu", {}), ("leaky_relu", {"alpha": 0.1}), ("tanh", {})])
def test_default_contains_sampled_and_attacked_pre_activations(act, params, rng):
    for trial in range(4):
        widths = [6, 14, 11, 9, 3][: 3 + trial % 3]
        net = random_network(widths, act, rng, domain=(-1.0, 1.0) if trial % 2 else None, **params)
        x0 = rng.uniform(-0.8, 0.8, widths[0])
        for p, eps in ((1.0, 0.5), (2.0, 0.15), (math.inf, 0.05), (math.inf, 1e-6)):
            region = Region.of(net, x0, eps, p)
            X = np.vstack([sample_region(region, 400, rng), neuron_attack_points(net, region, rng, steps=10)])
            lb = layer_bounds(net, x0, eps, p, "crown")
            for k, (z, lo, up) in enumerate(zip(net.pre_activations(X), lb.lower, lb.upper)):
                assert (z >= lo).all() and (z <= up).all(), (act, p, eps, k)


def test_float32_fused_is_sound_and_matches_unfused(rng):
    """float32 GEMMs: both engines are certified (contain the samples) and agree to float32 rounding."""
    net = random_network([10, 24, 24, 24, 4], "relu", rng, domain=(0.0, 1.0))
    x0 = rng.uniform(0.1, 0.9, 10)
    for p, eps in ((math.inf, 0.03), (2.0, 0.2)):
        region = Region.of(net, x0, eps, p)
        X = np.vstack([sample_region(region, 2000, rng), neuron_attack_points(net, region, rng, steps=10)])
        new = layer_bounds(net, x0, eps, p, "crown", dtype=np.float32)
        old = layer_bounds(net, x0, eps, p, "crown", dtype=np.float32, fused=False)
        for z, l, u, lo, uo in zip(net.pre_activations(X), new.lower, new.upper, old.lower, old.upper):
            assert (z >= l).all() and (z <= u).all()
            np.testing.assert_allclose(l, lo, rtol=0, atol=1e-5 * (1 + np.abs(lo).max()))
            np.testing.assert_allclose(u, uo, rtol=0, atol=1e-5 * (1 + np.abs(uo).max()))


def test_unbounded_regions_fall_back_to_the_numpy_chains(rng):
    """eps = inf without a domain: infinite intercepts; the fused engine leaves those chains to numpy."""
    net = random_network([5, 8, 8, 2], "relu", rng)
    x0 = rng.uniform(-1, 1, 5)
    new = layer_bounds(net, x0, math.inf, math.inf, "crown")
    old = layer_bounds(net, x0, math.inf, math.inf, "crown", fused=False)
    for a, b in zip(new.lower + new.upper, old.lower + old.upper):
        np.testing.assert_array_equal(a, b)
    assert np.isinf(new.upper[-1]).all()
