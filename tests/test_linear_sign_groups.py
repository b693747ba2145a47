"""The l1 row norm of ``linear-jacobian`` by groups of coordinates with their signs enumerated
(:func:`recurjac_scale.jacobian.linear_rows.sign_group_norm`): above the gradient's l1 norm at sampled and
hill-climbed points (every group size, with and without coordinates left to the chords), and tighter than the chord
objective where entries straddle 0."""

from __future__ import annotations

import math

import numpy as np
import pytest

from recurjac_scale.jacobian import derivative_bounds_for, jacobian_bounds
from recurjac_scale.jacobian import linear as lin
from recurjac_scale.jacobian import linear_rows
from recurjac_scale.jacobian.linear_rows import row_norm_upper, sign_group_norm
from recurjac_scale.layer_bounds.base import Region
from recurjac_scale.lipschitz import lipschitz
from recurjac_scale.testing import hill_climb, random_network, sample_region


def _row(widths, act, eps, seed, out=0):
    rng = np.random.default_rng(seed)
    kw = {"alpha": 0.1} if act == "leaky_relu" else {}
    net = random_network(widths, act, rng, **kw)
    x0 = rng.uniform(0, 1, widths[0])
    jb = jacobian_bounds(net, x0, eps, math.inf, method="recurjac-b", outputs=out)
    netc = net.with_outputs(np.eye(widths[-1])[out:out + 1])
    region = Region.of(netc, x0, eps, math.inf)
    ctx = lin.linear_context(netc, region, jb.layer_bounds, derivative_bounds_for(netc, jb.layer_bounds))
    lo, up, _, rows = lin.entry_bounds(ctx, jb.states, jb.lower, jb.upper)
    return netc, region, ctx, rows[0], lo[0], up[0], rng


def _l1_reached(netc, region, rng):
    def obj(X):
        return np.abs(netc.jacobian(X)[:, 0, :]).sum(axis=1)

    X = np.vstack([sample_region(region, 4000, rng), hill_climb(region, obj, rng, starts=4, steps=30,
                                                                population=8)])
    return float(obj(X).max())


@pytest.mark.parametrize("act", ["relu", "leaky_relu", "sigmoid"])
@pytest.mark.parametrize("group,share", [(2, 4.0), (3, 4.0), (2, 1.0), (4, 0.5)])
def test_sign_groups_bound_the_l1_norm(monkeypatch, act, group, share):
    monkeypatch.setattr(linear_rows, "SIGN_SHARE", share)
    monkeypatch.setattr(linear_rows, "SIGN_MIN", 0)
    netc, region, ctx, rb, lo, up, rng = _row((8, 20, 16, 3), act, 1.0 if act == "sigmoid" else 0.25, seed=7)
    assert ((lo < 0) & (up > 0)).sum() >= 4  # straddling entries: the chords are loose, the groups matter
    bound = sign_group_norm(ctx, rb, lo, up, group)
    assert bound >= _l1_reached(netc, region, rng)


def test_sign_groups_tighter_than_the_chords():
    """On the 16-16-16-10 recipe of the benchmark (He-uniform, seed 0, x0 ~ U[0, 1], output 1) at eps 0.3 every entry
    straddles 0 and the chord objective is close to the sum of the entries' magnitudes; pairs of coordinates with
    their four sign patterns gain more than 10%, and the Lipschitz constant of the method is that smaller bound."""
    rng = np.random.default_rng(0)
    net = random_network((16, 16, 16, 10), "relu", rng)
    x0 = rng.uniform(0, 1, 16)
    jb = jacobian_bounds(net, x0, 0.3, math.inf, method="recurjac-b", outputs=1)
    netc = net.with_outputs(np.eye(10)[1:2])
    ctx = lin.linear_context(netc, Region.of(netc, x0, 0.3, math.inf), jb.layer_bounds,
                             derivative_bounds_for(netc, jb.layer_bounds))
    lo, up, _, rows = lin.entry_bounds(ctx, jb.states, jb.lower, jb.upper)
    chord = min(row_norm_upper(ctx, rows[0], lo[0], up[0], 1.0, v) for v in ctx.variants)
    pairs = sign_group_norm(ctx, rows[0], lo[0], up[0], 2)
    assert pairs < 0.9 * chord
    value = lipschitz(net, x0, 0.3, math.inf, method="linear-jacobian", outputs=1).points[0].lipschitz
    assert value <= pairs * (1 + 1e-12)


@pytest.mark.parametrize("group,share", [(2, 4.0), (3, 1.0)])
def test_sign_groups_exact_at_eps_zero(monkeypatch, group, share):
    """At ``eps = 0`` each group's best sign pattern is the sign vector of the gradient there: the bound is
    ``||J(x0)||_1`` up to rounding (every sign pattern must be tried: half of them would miss coordinates of negative
    sign)."""
    monkeypatch.setattr(linear_rows, "SIGN_SHARE", share)
    monkeypatch.setattr(linear_rows, "SIGN_MIN", 0)
    netc, region, ctx, rb, lo, up, rng = _row((9, 20, 16, 3), "relu", 0.0, seed=3)
    exact = float(np.abs(netc.jacobian(region.x0[None, :])[0, 0]).sum())
    assert (netc.jacobian(region.x0[None, :])[0, 0] < 0).sum() >= 3
    bound = sign_group_norm(ctx, rb, lo, up, group)
    assert exact <= bound <= exact * (1 + 1e-10)
