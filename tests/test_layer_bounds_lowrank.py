"""The low-rank chains (:mod:`recurjac_scale.layer_bounds.lowrank`) against the plain numpy chains and against
sampled and attacked pre-activations.

``lowrank=True`` forces the low-rank chains on every target layer (the default uses them only where they save
flops).  They compute the same linear forms as the other engines, grouped differently (a shared chain plus
corrections on the unstable neurons), so their bounds agree up to the order of summation and rounding
allowances: ``TOL`` (as in ``test_layer_bounds_fused.py``) is far below any change of the algorithm.
"""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest

from recurjac_scale.layer_bounds import Region, layer_bounds
from recurjac_scale.testing import neuron_attack_points, random_network, sample_region
from test_layer_bounds_fused import TOL, _assert_close, _cases, _outside

METHODS = [("crown", {}), ("crown", {"never_looser_than_fastlin": False}), ("fastlin", {}),
           ("crown", {"relu_lower": "parallel"})]


def _lowrank_module():
    # ``recurjac_scale.layer_bounds`` re-exports a function of the same name as the package, so import the module
    # through sys.modules (it is loaded by the package).
    return sys.modules["recurjac_scale.layer_bounds.lowrank"]


@pytest.mark.parametrize("zeroed_max", [0.0, 1.0, 0.1])
def test_lowrank_equals_the_numpy_chains(zeroed_max, rng, monkeypatch):
    """Both layouts of the shared GEMMs (copied shared columns, zeroed weight rows of the unstable neurons) and
    the default mix, on random ReLU and leaky-ReLU networks, every norm, radii from 0 to all-unstable."""
    monkeypatch.setattr(_lowrank_module(), "ZEROED_MAX", zeroed_max)
    n = 0
    for net, x0, p, eps in _cases(rng, ("relu", "leaky_relu"), 10):
        for m, opts in METHODS:
            new = layer_bounds(net, x0, eps, p, m, lowrank=True, **opts)
            old = layer_bounds(net, x0, eps, p, m, fused=False, **opts)
            _assert_close(new, old, f"{m} {opts} {net.widths} p={p} eps={eps}")
            n += 1
    assert n == 10 * 14 * len(METHODS)


def test_lowrank_default_within_old_default_and_fastlin(rng):
    """With the low-rank chains the default stays inside the previous default and Fast-Lin (rounding aside)."""
    worst_old = worst_fl = -math.inf
    for net, x0, p, eps in _cases(rng, ("relu", "leaky_relu"), 20):
        new = layer_bounds(net, x0, eps, p, "crown", lowrank=True)
        worst_old = max(worst_old, _outside(new, layer_bounds(net, x0, eps, p, "crown", fused=False)))
        worst_fl = max(worst_fl, _outside(new, layer_bounds(net, x0, eps, p, "fastlin", fused=False)))
    assert worst_old <= TOL, worst_old
    assert worst_fl <= TOL, worst_fl


@pytest.mark.parametrize("act,params", [("relu", {}), ("leaky_relu", {"alpha": 0.2})])
def test_lowrank_contains_sampled_and_attacked_pre_activations(act, params, rng):
    """Wider networks (rank of the corrections up to dozens), a few unstable neurons to all of them."""
    for trial in range(3):
        widths = [12, 40, 36, 30, 4][: 3 + trial]
        net = random_network(widths, act, rng, domain=(-1.0, 1.0) if trial % 2 else None, **params)
        x0 = rng.uniform(-0.8, 0.8, widths[0])
        for p, eps in ((1.0, 0.3), (2.0, 0.05), (math.inf, 0.02), (math.inf, 1e-3)):
            region = Region.of(net, x0, eps, p)
            X = np.vstack([sample_region(region, 300, rng), neuron_attack_points(net, region, rng, steps=10)])
            lb = layer_bounds(net, x0, eps, p, "crown", lowrank=True)
            for k, (z, lo, up) in enumerate(zip(net.pre_activations(X), lb.lower, lb.upper)):
                assert (z >= lo).all() and (z <= up).all(), (act, p, eps, k)


def test_lowrank_is_chosen_only_where_it_saves_flops(rng, monkeypatch):
    """On a wide network at a tiny radius (few unstable neurons) the automatic choice takes the low-rank chains
    for every target layer with two or more layers below it (with one, the fused engine already shares its only
    affine step); at a radius where most neurons are unstable it keeps the fused engine.  Both give the numpy
    chains' bounds."""
    mod = _lowrank_module()
    chosen = []
    plan = mod.plan

    def spy(*args, **kwargs):
        out = plan(*args, **kwargs)
        chosen.append(out is not None)
        return out

    net = random_network([64, 96, 96, 96, 5], "relu", rng, bias_scale=0.0)
    x0 = rng.uniform(-0.5, 0.5, 64)
    monkeypatch.setattr(sys.modules["recurjac_scale.layer_bounds.backsub"], "lowrank_plan", spy)
    for eps, expect in ((1e-6, [False, True, True]), (0.5, [False, False, False])):
        chosen.clear()
        new = layer_bounds(net, x0, eps, math.inf, "crown")
        assert chosen == expect, (eps, chosen)
        _assert_close(new, layer_bounds(net, x0, eps, math.inf, "crown", fused=False), f"eps={eps}")
