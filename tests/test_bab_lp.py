"""Certified LP tightening of branch-and-bound parts (recurjac_scale.bab.lp)."""

from __future__ import annotations

import math
from dataclasses import replace
from fractions import Fraction

import numpy as np
import pytest
from scipy.optimize import linprog

import recurjac_scale.bab.lp as lp_mod
from recurjac_scale.bab import bab_lipschitz
from recurjac_scale.bab.attack import region_walk
from recurjac_scale.bab.lp import certified_max, resolve_lp_mode, tighten_bounds
from recurjac_scale.bab.parts import BabProblem, _clip_and_phases, bound_part, relu_alphas
from recurjac_scale.errors import EmptyRegionError, InputError
from recurjac_scale.exact import exact_lipschitz
from recurjac_scale.layer_bounds import Region, layer_bounds
from recurjac_scale.network.model import Network
from recurjac_scale.testing import random_network, sample_region


def _exact_dual_value(c, A_ub, b_ub, A_eq, b_eq, lo, hi, lam, mu) -> Fraction:
    """``sum_i max(r_i lo_i, r_i hi_i) + lam.b_ub + mu.b_eq`` with ``r = c - A_ub^T lam - A_eq^T mu`` in exact
    rational arithmetic (the real-number value that weak duality makes an upper bound of the LP)."""
    F = Fraction
    lam = [F(float(v)) for v in np.maximum(lam, 0.0)]
    mu = [F(float(v)) for v in mu]
    total = sum((F(float(b)) * y for b, y in zip(b_ub, lam)), F(0)) + sum((F(float(b)) * y for b, y in zip(b_eq, mu)),
                                                                       F(0))
    for i in range(len(c)):
        r = F(float(c[i])) - sum((F(float(A_ub[k, i])) * lam[k] for k in range(len(lam))), F(0))
        r -= sum((F(float(A_eq[k, i])) * mu[k] for k in range(len(mu))), F(0))
        total += max(r * F(float(lo[i])), r * F(float(hi[i])))
    return total


def test_certified_max_is_above_the_exact_dual_value_and_tight(rng):
    """Random LPs with entries of mixed magnitudes and the solver's multipliers: the certified value is at least the
    exact (rational) value of the weak-duality bound at the same multipliers, itself >= the LP optimum; and it
    exceeds the solver's optimum by a rounding allowance only (the multipliers' signs and scaling are right)."""
    for _ in range(60):
        n, m, e = 4, 5, 2
        scale = 10.0 ** rng.integers(-3, 4, size=(m + e, n))
        A = rng.standard_normal((m + e, n)) * scale
        lo = -rng.uniform(0.1, 2, n)
        hi = rng.uniform(0.1, 2, n)
        y0 = rng.uniform(lo, hi)  # a feasible point
        b = A @ y0
        b_ub = b[:m] + rng.uniform(0, 1, m)
        A_ub, A_eq, b_eq = A[:m], A[m:], b[m:]
        c = rng.standard_normal(n)
        res = linprog(-c, A_ub=A_ub, b_ub=b_ub, A_eq=A_eq, b_eq=b_eq, bounds=np.column_stack([lo, hi]),
                      method="highs")
        assert res.status == 0
        lam, mu = -res.ineqlin.marginals, -res.eqlin.marginals
        v = certified_max(c, A_ub, b_ub, A_eq, b_eq, lo, hi, lam, mu)
        exact = _exact_dual_value(c, A_ub, b_ub, A_eq, b_eq, lo, hi, lam, mu)
        assert Fraction(v) >= exact
        assert v >= -res.fun and v - (-res.fun) <= 1e-7 * (1 + abs(res.fun))
        # any multipliers are sound (looser): the feasible point's value stays below
        assert certified_max(c, A_ub, b_ub, A_eq, b_eq, lo, hi, rng.uniform(0, 1, m), rng.standard_normal(e)) >= c @ y0
    assert certified_max(c, A_ub, b_ub, A_eq, b_eq, lo, hi, lam * np.nan, mu) == math.inf
    assert certified_max(c, A_ub, b_ub, A_eq, b_eq, lo, hi, lam + 1e308, mu) == math.inf  # overflow: no bound


def _in_part(net, X, splits):
    zs = net.pre_activations(X)
    return X[np.all([s * zs[k][:, j] >= 0 for k, j, s in splits], axis=0)]


@pytest.mark.parametrize("act,kw,highs", [("relu", {}, True), ("leaky_relu", {"alpha": 0.1}, True),
                                           ("relu", {}, False)])
def test_tightened_bounds_contain_the_part_and_tighten(act, kw, highs, monkeypatch, rng):
    """Parts given by splits that a sampled point satisfies: the LP bounds contain every pre-activation at the
    part's sampled points, and tighten some of the layer-bound method's intervals.  ``highs=False``: the linprog
    path (no warm start)."""
    if not highs:
        monkeypatch.setattr(lp_mod, "_highs_core", lambda: None)
    net = random_network((6, 12, 12, 10, 2), act, rng=rng, **kw).with_outputs(np.array([[1.0, -1.0]]))
    x0 = rng.uniform(0, 1, 6)
    eps = 0.3
    region = Region.of(net, x0, eps, "inf")
    lo, hi = region.box
    alphas = relu_alphas(net)
    root = layer_bounds(net, x0, eps, "inf")
    prob = BabProblem(network=net, x0=x0, eps=eps, p=math.inf, q=1.0, method="recurjac-b", layer_bound_method="crown",
                      root_lower=tuple(root.lower), root_upper=tuple(root.upper), split="neuron", alphas=alphas)
    unstable = [(k, j) for k in range(3) for j in np.flatnonzero((root.lower[k] < 0) & (root.upper[k] > 0))]
    X = sample_region(region, 20000, rng)
    zs = net.pre_activations(X)
    tightened = 0
    for t in range(8):
        i = int(rng.integers(len(X)))
        pick = rng.permutation(len(unstable))[: 2 + t]
        splits = [[int(k), int(j), 1 if zs[k][i, j] >= 0 else -1] for k, j in (unstable[s] for s in pick)]
        clip, _ = _clip_and_phases(prob, {"splits": splits})
        sub = layer_bounds(net, x0, eps, "inf", clip=clip)
        low, up = tighten_bounds(net, lo, hi, sub.lower, sub.upper, alphas, first_layer=0)
        pts = _in_part(net, sample_region(region, 20000, rng), splits)
        # attacked points: region walks (towards large gradient norms) from points of the part, kept if in it
        walked = [region_walk(net, region, 1.0, pts[s:s + 1], alphas=alphas, max_steps=5)[1] for s in range(3)]
        pts = np.vstack([pts, _in_part(net, np.vstack(walked), splits), X[i:i + 1]])
        assert len(pts) >= 5
        zp = net.pre_activations(pts)
        for k in range(3):
            assert np.all(zp[k] >= low[k]) and np.all(zp[k] <= up[k])
            assert np.all(low[k] >= sub.lower[k]) and np.all(up[k] <= sub.upper[k])
            tightened += int(np.sum(up[k] - low[k] < sub.upper[k] - sub.lower[k] - 1e-9))
    assert tightened >= 8


def test_lp_proves_a_part_empty_and_keeps_a_touching_one():
    """z_a = x, z_b = -x - 1/2 on x in [-1, 1]: the part {z_a >= 0, z_b >= 0} is empty although each clipped
    interval is not; with z_b = -x the two constraints meet at x = 0, and the part must stay."""
    for shift, empty in ((-0.5, True), (0.0, False)):
        net = Network([np.array([[1.0], [-1.0]]), np.array([[1.0, 1.0], [1.0, -1.0]]), np.array([[1.0, 1.0]])],
                      [np.array([0.0, shift]), np.zeros(2), np.zeros(1)], ["relu", "relu"])
        lower = [np.array([0.0, 0.0]), np.array([-3.0, -3.0]), np.array([-9.0])]
        upper = [np.array([1.0, 1.0 + shift]), np.array([3.0, 3.0]), np.array([9.0])]
        # the Farkas certificate from the elastic LP, on the first layer's system (x, z_0)
        data = lp_mod._build([np.asarray(w) for w in net.weights], [np.asarray(b) for b in net.biases],
                             np.array([-1.0]), np.array([1.0]), lower, upper, (0.0, 0.0), 0)
        assert lp_mod._certified_infeasible(*data[:6], 1) == empty
        if empty:
            with pytest.raises(EmptyRegionError):
                tighten_bounds(net, np.array([-1.0]), np.array([1.0]), lower, upper, (0.0, 0.0), first_layer=0)
        else:
            low, up = tighten_bounds(net, np.array([-1.0]), np.array([1.0]), lower, upper, (0.0, 0.0), first_layer=0)
            # x = 0 is the only point: z_a = z_b = 0, so the second layer is (0, 0)
            assert np.all(low[1] <= 0.0) and np.all(up[1] >= 0.0) and np.all(up[1] - low[1] < 1e-9)


@pytest.mark.parametrize("mode", ["splits", "all"])
def test_part_bounds_with_lp_hold_at_points_of_the_part(mode):
    """As tests/test_bab.py's part test, with the LP tightening: every part's bound is at least the exact gradient
    norm at a point of it (sampled and attacked points), and the tightening gives smaller bounds on some parts."""
    rng = np.random.default_rng(0)
    net = random_network((16, 16, 16, 10), rng=rng)
    x0 = rng.uniform(0.0, 1.0, 16)
    net = net.with_outputs(np.eye(10)[1:2])
    eps = 0.1
    lb = layer_bounds(net, x0, eps, "inf")
    base = BabProblem(network=net, x0=x0, eps=eps, p=math.inf, q=1.0, method="linear-jacobian",
                      layer_bound_method="crown", root_lower=tuple(lb.lower), root_upper=tuple(lb.upper),
                      split="neuron", alphas=relu_alphas(net))
    prob = replace(base, lp_tighten=mode)
    region = Region.of(net, x0, eps, "inf")
    X = sample_region(region, 4000, rng)
    norms = np.abs(net.jacobian(X)[:, 0, :]).sum(axis=1)
    top = X[np.argsort(-norms)[:40]]
    walked = np.vstack([region_walk(net, region, 1.0, top[i:i + 10], alphas=relu_alphas(net))[1] for i in (0, 20)])
    X = np.vstack([X, walked])
    norms = np.abs(net.jacobian(X)[:, 0, :]).sum(axis=1)
    assert norms.max() >= 13.8604 * (1 - 1e-4)  # the exact value of this instance (benchmarks/results/bab.md)
    unstable = [(k, j) for k in range(2) for j in np.flatnonzero((lb.lower[k] < 0) & (lb.upper[k] > 0))]
    better = 0
    for i in [len(X) - 2, len(X) - 1, *np.argsort(-norms)[:4]]:
        zs = net.pre_activations(X[i][None, :])
        for depth in (3, 8, len(unstable) - 2):
            pick = rng.permutation(len(unstable))[:depth]
            splits = [[int(k), int(j), 1 if zs[k][0, j] >= 0 else -1] for k, j in (unstable[t] for t in pick)]
            part = {"lo": None, "hi": None, "splits": splits, "depth": depth}
            res = bound_part(prob, part)
            assert res["bound"] is not None and res["bound"] >= norms[i] * (1 - 1e-12)
            better += res["bound"] < bound_part(base, part)["bound"] * (1 - 1e-3)
    assert better >= 3


@pytest.mark.parametrize("widths,act,kw,eps", [((4, 8, 6, 3), "relu", {}, 0.3),
                                               ((3, 6, 6, 2), "leaky_relu", {"alpha": 0.2}, 0.4)])
def test_bab_with_lp_never_below_the_exact_value(widths, act, kw, eps, rng):
    """The MIP's exact value: bab's upper bound with the LP tightening (every part, or parts with splits) stays
    at or above it at every round and closes on it."""
    net = random_network(widths, act, rng=rng, **kw)
    x0 = rng.uniform(0, 1, widths[0])
    ex = exact_lipschitz(net, x0, eps, "inf", outputs=1)
    assert ex.optimal and ex.validated
    for mode in ("splits", "all"):
        res = bab_lipschitz(net, x0, eps, "inf", outputs=1, time_budget=20, gap=1e-9, scheduler="synchronous",
                            lp_tighten=mode)
        assert all(h[1] >= ex.value * (1 - 1e-12) for h in res.history)
        assert res.lower <= ex.value * (1 + 1e-12)
        assert res.upper == pytest.approx(ex.value, rel=1e-9)


def test_bab_lp_option_default_and_bad_value(rng):
    net = random_network((3, 4, 2), rng=rng)
    with pytest.raises(InputError, match="lp_tighten"):
        bab_lipschitz(net, np.zeros(3), 0.1, "inf", lp_tighten="always", time_budget=1)
    alphas = relu_alphas(net)
    assert resolve_lp_mode(None, alphas, net) == "splits"
    assert resolve_lp_mode(" ALL ", alphas, net) == "all"
    assert resolve_lp_mode("all", None, net) == "off"  # not ReLU family
    wide = random_network((3, 300, 300, 2), rng=rng)  # 600 hidden neurons > LP_MAX_HIDDEN
    assert resolve_lp_mode(None, relu_alphas(wide), wide) == "off"
    many = random_network((65, 4, 2), rng=rng)  # 65 inputs > LP_MAX_INPUTS
    assert resolve_lp_mode(None, relu_alphas(many), many) == "off"
