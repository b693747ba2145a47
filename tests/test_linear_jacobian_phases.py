"""linear-jacobian on branch-and-bound parts: with split neurons (``LayerBounds.phases`` and the matching clipped
layer bounds, as :mod:`recurjac_scale.bab.parts` builds them) its entry bounds and its Lipschitz bound hold at every
sampled point of the part.  A part with the opposite phases (a region that does not hold those points) is violated,
so the sampling does reach what the bound must cover."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

from recurjac_scale.jacobian import jacobian_bounds
from recurjac_scale.layer_bounds import layer_bounds
from recurjac_scale.lipschitz import lipschitz
from recurjac_scale.testing import random_network


def _forward(net, xs):
    """Exact Jacobian rows of output 0 and the pre-activations of a ReLU network at the points ``xs`` (N, n0)."""
    h, J, zs = xs, np.broadcast_to(np.eye(xs.shape[1]), (xs.shape[0], xs.shape[1], xs.shape[1])), []
    for k, (W, b) in enumerate(zip(net.weights, net.biases)):
        W = np.asarray(W, np.float64)
        z = h @ W.T + np.asarray(b, np.float64)
        if k == len(net.weights) - 1:
            return np.einsum("j,njk->nk", W[0], J), zs
        zs.append(z)
        J = np.einsum("nj,jk,nkl->njl", (z > 0).astype(np.float64), W, J)
        h = np.maximum(z, 0.0)


def _part_bounds(net, x0, eps, splits, lb0):
    lows = [np.array(v, np.float64) for v in lb0.lower]
    ups = [np.array(v, np.float64) for v in lb0.upper]
    phases = [np.zeros(v.size, np.int8) for v in lows]
    for k, j, s in splits:
        if s > 0:
            lows[k][j], phases[k][j] = max(lows[k][j], 0.0), 1
        else:
            ups[k][j], phases[k][j] = min(ups[k][j], 0.0), -1
    lb = layer_bounds(net, x0, eps, math.inf, "crown", clip=list(zip(lows, ups)))
    lb = replace(lb, phases=tuple(phases))
    jb = jacobian_bounds(net, x0, eps, math.inf, method="linear-jacobian", layer_bounds=lb, outputs=0)
    lip = lipschitz(net, x0, eps, math.inf, method="linear-jacobian", layer_bounds=lb, outputs=0)
    return np.asarray(jb.lower)[0], np.asarray(jb.upper)[0], float(lip.points[0].lipschitz)


def _violations(J, lo, up, lip):
    tol = 1e-9 * (1.0 + np.abs(J))
    return (J < lo - tol).any(axis=1) | (J > up + tol).any(axis=1) | (np.abs(J).sum(axis=1) > lip * (1 + 1e-9))


@pytest.mark.parametrize("flip", [False, True], ids=["part", "opposite-part"])
def test_linear_jacobian_holds_on_split_parts(flip):
    checked, violated_nets = 0, 0
    for seed in range(25):
        rng = np.random.default_rng(1000 + seed)
        depth = int(rng.integers(2, 5))
        widths = [int(rng.integers(2, 7))] + [int(rng.integers(3, 11)) for _ in range(depth)] + [2]
        net = random_network(widths, "relu", rng)
        x0 = rng.uniform(0.0, 1.0, widths[0])
        eps = float(rng.choice([0.05, 0.1, 0.3, 0.6]))
        lb0 = layer_bounds(net, x0, eps, math.inf, "crown")
        cand = [(k, j) for k in range(len(lb0.lower) - 1) for j in range(lb0.lower[k].size)
                if lb0.lower[k][j] < 0.0 < lb0.upper[k][j]]
        if not cand:
            continue
        pick = [cand[i] for i in rng.choice(len(cand), size=min(3, len(cand)), replace=False)]
        xs = x0 + rng.uniform(-eps, eps, size=(1500, widths[0]))
        J, zs = _forward(net, xs)
        ref = int(rng.integers(len(xs)))
        splits = [(k, j, 1 if zs[k][ref, j] > 0 else -1) for k, j in pick]
        inside = np.ones(len(xs), bool)
        for k, j, s in splits:
            inside &= (zs[k][:, j] > 0) if s > 0 else (zs[k][:, j] < 0)
        bounded = [(k, j, -s) for k, j, s in splits] if flip else splits
        try:
            lo, up, lip = _part_bounds(net, x0, eps, bounded, lb0)
        except Exception as exc:  # an opposite part can be empty
            assert flip and "empty" in str(exc).lower(), exc
            continue
        bad = _violations(J[inside], lo, up, lip)
        checked += int(inside.sum())
        violated_nets += int(bad.any())
        if not flip:
            assert not bad.any(), f"seed {1000 + seed}: linear-jacobian excludes a Jacobian of its part"
    assert checked > 5000
    if flip:
        assert violated_nets >= 3, "the sampled points never leave a wrong part's bounds: the check shows nothing"
