"""``linear-jacobian`` with the exact-line neurons eliminated (:mod:`recurjac_scale.jacobian.linear_stable`).

The collapsed passes must give the bounds of the dense passes (:func:`bound_objectives_variants`, which run through
every live neuron) up to rounding, whichever neurons are eliminated; every slope variant alone must bound the true
objectives at sampled and hill-climbed points; and the rounding allowance of the precomputed maps must stay of the
order of the other allowances on a deep network (charged with the certified magnitudes of ``h`` and ``y``, not with
products of absolute weight matrices).
"""

from __future__ import annotations

import numpy as np
import pytest

from recurjac_scale.jacobian import derivative_bounds_for, jacobian_bounds
from recurjac_scale.jacobian import linear as lin
from recurjac_scale.jacobian import linear_stable
from recurjac_scale.jacobian.linear_stable import bound_gradient_variants
from recurjac_scale.layer_bounds.base import Region
from recurjac_scale.testing import hill_climb, random_network, sample_region

WIDTHS = (10, 48, 40, 32, 24, 16, 3)


def _setup(act, eps, seed=0, widths=WIDTHS, adaptive=0):
    rng = np.random.default_rng(seed)
    kw = {"alpha": 0.1} if act == "leaky_relu" else {}
    net = random_network(widths, act, rng, **kw)
    x0 = rng.uniform(0, 1, widths[0])
    jb = jacobian_bounds(net, x0, eps, np.inf, method="recurjac-b", outputs=0)
    netc = net.with_outputs(np.eye(widths[-1])[:1])
    region = Region.of(netc, x0, eps, np.inf)
    ctx = lin.linear_context(netc, region, jb.layer_bounds, derivative_bounds_for(netc, jb.layer_bounds),
                             adaptive=adaptive)
    H = ctx.H
    gl = [np.asarray(jb.states[H - 2 - k]["lower"][0], np.float64) for k in range(H - 1)]
    gu = [np.asarray(jb.states[H - 2 - k]["upper"][0], np.float64) for k in range(H - 1)]
    rb = lin.row_bounds(ctx, 0, gl, gu, lin.centre_gradients_ctx(ctx)[0])
    return netc, region, jb, ctx, rb, rng


def _pm(idx):
    idx = np.asarray(idx, dtype=np.int64)
    return np.concatenate([idx, idx]), np.concatenate([np.ones(idx.size), -np.ones(idx.size)])


def _assert_same(new, old):
    # same relaxations, other summation order and allowances: equal far below the widths
    scale = np.abs(old[np.isfinite(old)]).max()
    np.testing.assert_allclose(new, old, rtol=1e-9, atol=1e-11 * scale)


@pytest.mark.parametrize("act", ["relu", "leaky_relu", "hard_sigmoid", "sigmoid"])
def test_collapsed_passes_equal_the_dense_passes(act):
    """Entries (objectives on ``g(-1)``), the tightening objectives (unit objectives on ``g(k)``) and a general
    combination (a row-norm objective) against the dense passes on the equivalent objectives on ``y``; for the
    ReLU family, exact neurons are eliminated across several layers (the maps span more than one layer)."""
    netc, region, jb, ctx, rb, rng = _setup(act, 0.02)
    cl = ctx.compact["stable"]
    if act in ("relu", "leaky_relu"):
        assert sum(s.size for s in cl["S"]) > 50
        assert any(t >= 2 for t in cl["R_off"])  # a map from x through exact neurons of two layers or more
        assert cl["Top"][0] is not None
    W0 = np.asarray(netc.weights[0], np.float64)
    n0 = W0.shape[1]
    new = bound_gradient_variants(ctx, rb, -1, unit=_pm(np.arange(n0)))
    old = lin.bound_objectives_variants(ctx, rb, np.vstack([W0.T, -W0.T]), 0)
    assert np.isfinite(old).all()
    _assert_same(new, old)
    c = rng.uniform(-1, 1, (3, n0))
    _assert_same(bound_gradient_variants(ctx, rb, -1, c=c), lin.bound_objectives_variants(ctx, rb, c @ W0.T, 0))
    for k in range(ctx.H - 2):
        rows = cl["U"][k]
        if rows.size == 0:
            continue
        W = ctx.W[k + 1][:, rows].T
        new = bound_gradient_variants(ctx, rb, k, unit=_pm(rows))
        old = lin.bound_objectives_variants(ctx, rb, np.vstack([W, -W]), k + 1)
        _assert_same(new, old)


@pytest.mark.parametrize("act", ["relu", "leaky_relu"])
def test_elimination_share_does_not_change_the_bounds(monkeypatch, act):
    """Every exact neuron eliminated (share 0) or none (share above 1): the same entry bounds up to rounding."""
    netc, region, jb, ctx, rb, rng = _setup(act, 0.03, seed=1)
    db = derivative_bounds_for(netc, jb.layer_bounds)
    out = []
    for share in (0.0, 1.01):
        monkeypatch.setattr(linear_stable, "ELIMINATE_SHARE", share)
        c = lin.linear_context(netc, region, jb.layer_bounds, db, adaptive=0)
        n_s = sum(s.size for s in c.compact["stable"]["S"])
        assert (n_s > 0) == (share == 0.0)
        out.append(lin.entry_bounds(c, jb.states, jb.lower, jb.upper)[:2])
    for a, b in zip(out[0], out[1]):
        _assert_same(a, b)


def _grads(netc, X, i0):
    """``g(i0) = ∂f_0/∂h(i0)`` at the points ``X`` (``i0 = -1``: the Jacobian row), shape ``(n, d_{i0})``."""
    zs = netc.pre_activations(X)
    H = netc.n_layers
    g = np.repeat(np.asarray(netc.weights[H - 1], np.float64)[:1], X.shape[0], axis=0)
    for k in range(H - 2, i0, -1):
        g = (g * netc.activations[k].derivative(zs[k])) @ np.asarray(netc.weights[k], np.float64)
    return g


@pytest.mark.parametrize("act", ["relu", "leaky_relu"])
@pytest.mark.parametrize("i0", [-1, 0, 2])
def test_every_variant_alone_bounds_the_objectives(act, i0):
    """No intersection with RecurJac-B and no minimum over variants: each slope variant's collapsed bound of
    ``c · g(i0)`` is above its value at sampled points and at points hill-climbed on that objective."""
    netc, region, jb, ctx, rb, rng = _setup(act, 0.02, seed=5)
    U = ctx.compact["stable"]["U"]
    if i0 == -1:
        idx = np.arange(netc.weights[0].shape[1])
        C = np.vstack([np.eye(idx.size), -np.eye(idx.size), rng.uniform(-1, 1, (4, idx.size))])
    else:
        d = ctx.du[i0].size
        idx = U[i0][:6]
        assert idx.size >= 3
        E = np.zeros((idx.size, d))
        E[np.arange(idx.size), idx] = 1.0
        R = np.zeros((3, d))
        R[:, U[i0]] = rng.uniform(-1, 1, (3, U[i0].size))
        C = np.vstack([E, -E, R])
    X = sample_region(region, 3000, rng)
    for q in range(0, C.shape[0], 2):
        X = np.vstack([X, hill_climb(region, lambda Z, q=q: _grads(netc, Z, i0) @ C[q], rng, starts=2, steps=20,
                                     population=8)])
    reached = (_grads(netc, X, i0) @ C.T).max(axis=0)
    unit = _pm(idx)
    for v in ctx.variants:
        ub = np.concatenate([bound_gradient_variants(ctx, rb, i0, unit=unit, variants=(v,))[0],
                             bound_gradient_variants(ctx, rb, i0, c=C[2 * idx.size:], variants=(v,))[0]])
        assert (ub >= reached).all(), (v, np.flatnonzero(ub < reached))
        # and not vacuous: some bound is within half the reached value of it
        assert (ub - reached <= 0.5 * (np.abs(reached) + 1e-3)).any()


def test_allowance_stays_small_on_a_deep_network():
    """Seven hidden layers at a small radius (most neurons exact, maps through up to six layers): the largest
    allowance relative to the width of an entry stays below 1e-9 (charging the maps' rounding with products of
    absolute weight matrices instead of the certified magnitudes gave about 1e-5 here)."""
    netc, region, jb, ctx, rb, rng = _setup("relu", 0.002, seed=3, widths=(30, 200, 160, 128, 96, 64, 48, 32, 5))
    cl = ctx.compact["stable"]
    assert max(cl["R_off"]) >= 5
    lower, upper, worst, rows = lin.entry_bounds(ctx, jb.states, jb.lower, jb.upper)
    assert (upper - lower < jb.upper - jb.lower).any()
    assert 0.0 < worst < 1e-9


@pytest.mark.parametrize("act", ["relu", "leaky_relu"])
def test_single_step_maps_shared_by_both_passes(act):
    """Where a chain has one layer of exact neurons and ends at a layer without any, pass 1 takes pass 2's product
    (transposed) instead of computing its own: still the dense passes' bounds."""
    netc, region, jb, ctx, rb, rng = _setup(act, 0.08, seed=0)
    S = [s.size for s in ctx.compact["stable"]["S"]]
    assert S[0] > 0 and S[1] == 0 or any(S[i] > 0 and S[i + 1] == 0 for i in range(len(S) - 1))
    W0 = np.asarray(netc.weights[0], np.float64)
    n0 = W0.shape[1]
    _assert_same(bound_gradient_variants(ctx, rb, -1, unit=_pm(np.arange(n0))),
                 lin.bound_objectives_variants(ctx, rb, np.vstack([W0.T, -W0.T]), 0))
    rows = ctx.compact["stable"]["U"][0]
    W = ctx.W[1][:, rows].T
    _assert_same(bound_gradient_variants(ctx, rb, 0, unit=_pm(rows)),
                 lin.bound_objectives_variants(ctx, rb, np.vstack([W, -W]), 1))
