"""Containment: every pre-activation at >= 10^4 points of S = B_p[x0, eps] ∩ D lies in [lower, upper].

Points: interior samples, box vertices (p = inf) / sphere points (p = 2) / signed scaled unit vectors (p = 1),
the centre, and points found by gradient steps that push single neurons up and down
(:func:`recurjac_scale.testing.neuron_attack_points`).  Random networks of every activation, depth 1-6 (hidden
layers), every p, eps in {0, 1e-3, 1e-2, 1e-1}, with and without an input domain, for every method that accepts
the activation.  The default run cycles the depths through the (p, eps) grid; ``-m slow`` runs the full product.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from recurjac_scale.activations import LeakyReLU
from recurjac_scale.layer_bounds import LAYER_BOUND_METHODS, Region, layer_bounds
from recurjac_scale.testing import neuron_attack_points, random_network, sample_region

ACTS = [
    ("relu", {}),
    ("leaky_relu", {"alpha": 0.3}),
    ("hard_sigmoid", {}),
    ("elu", {}),
    ("softplus", {}),
    ("sigmoid", {}),
    ("tanh", {}),
    ("arctan", {}),
    ("identity", {}),
]
IDS = [n if not p else f"{n}-{'-'.join(f'{k}{v}' for k, v in p.items())}" for n, p in ACTS]
NORMS = [1.0, 2.0, math.inf]
EPSS = [0.0, 1e-3, 1e-2, 1e-1]
N_POINTS = 10_000


def methods_for(net):
    names = ["ibp", "crown"]
    if all(isinstance(a, LeakyReLU) or a.is_identity for a in net.activations):
        names.append("fastlin")
    assert set(names) <= set(LAYER_BOUND_METHODS)
    return names


def make_case(rng, act, params, depth, with_domain, output_activation=None):
    n0 = int(rng.integers(4, 8))
    widths = [n0] + [int(rng.integers(5, 11)) for _ in range(depth)] + [int(rng.integers(2, 5))]
    # scale eps-relevant weights up so that eps = 0.1 makes many neurons unstable
    net = random_network(
        widths, act, rng, domain=(-1.0, 1.0) if with_domain else None, output_activation=output_activation, **params
    )
    x0 = rng.uniform(-1.0, 1.0, n0)
    if with_domain:  # put some coordinates on or near the boundary so that clipping matters
        k = rng.integers(0, n0, size=2)
        x0[k] = np.sign(x0[k]) * rng.uniform(0.97, 1.0, size=2)
    return net, x0


def points(net, region, rng, n=N_POINTS):
    X = sample_region(region, n, rng)
    if region.eps > 0:
        X = np.vstack([X, neuron_attack_points(net, region, rng, neurons_per_layer=3, steps=15)])
    return X


def assert_contained(net, lb, X, label=""):
    zs = net.pre_activations(X)
    assert len(zs) == len(lb.lower) == len(lb.upper)
    for k, (z, l, u) in enumerate(zip(zs, lb.lower, lb.upper)):
        assert l.shape == u.shape == (z.shape[1],)
        assert not np.isnan(l).any() and not np.isnan(u).any()
        assert (l <= u).all()
        # the float64 forward pass itself is only accurate to ~1e-15 relative
        tol = 1e-12 * (1.0 + np.abs(z).max())
        below = z < l - tol
        above = z > u + tol
        if below.any() or above.any():
            i, j = np.argwhere(below | above)[0]
            raise AssertionError(
                f"{label} {lb.method}: layer {k} neuron {j}: z = {z[i, j]!r} outside [{l[j]!r}, {u[j]!r}]"
            )


def run_case(rng, act, params, depth, p, eps, with_domain):
    net, x0 = make_case(rng, act, params, depth, with_domain)
    region = Region.of(net, x0, eps, p)
    X = points(net, region, rng)
    assert X.shape[0] >= N_POINTS
    results = {}
    for m in methods_for(net):
        lb = layer_bounds(net, x0, eps, p=p, method=m)
        assert_contained(net, lb, X, label=f"{act} depth={depth} p={p} eps={eps} domain={with_domain}")
        results[m] = lb
    if eps == 0:
        z0 = [z[0] for z in net.pre_activations(x0[None, :])]
        for lb in results.values():
            for z, l, u in zip(z0, lb.lower, lb.upper):
                np.testing.assert_allclose(l, z, rtol=1e-9, atol=1e-9)
                np.testing.assert_allclose(u, z, rtol=1e-9, atol=1e-9)
    return results


def _grid():
    """(p, eps, depth, domain) for the default run: every depth 1-6 appears for every activation."""
    combos = list(itertools.product(NORMS, EPSS))
    return [(p, eps, 1 + i % 6, i % 3 == 1) for i, (p, eps) in enumerate(combos)]


@pytest.mark.parametrize("act,params", ACTS, ids=IDS)
def test_containment_grid(act, params, rng):
    for p, eps, depth, dom in _grid():
        run_case(rng, act, params, depth, p, eps, dom)


@pytest.mark.slow
@pytest.mark.parametrize("act,params", ACTS, ids=IDS)
@pytest.mark.parametrize("depth", [1, 2, 3, 4, 5, 6])
def test_containment_full_sweep(act, params, depth, rng):
    for p, eps, dom in itertools.product(NORMS, EPSS, (False, True)):
        run_case(rng, act, params, depth, p, eps, dom)


@pytest.mark.parametrize("act", ["relu", "sigmoid", "softplus", "hard_sigmoid"])
def test_containment_output_activation_and_linear_net(act, rng):
    """A non-identity output activation (bounded as a layer) and a network with no hidden layer (exact)."""
    net = random_network([5, 8, 3], act, rng, output_activation="sigmoid")
    x0 = rng.uniform(-1, 1, 5)
    region = Region.of(net, x0, 0.1, math.inf)
    X = points(net, region, rng)
    for m in methods_for(net):
        assert_contained(net, layer_bounds(net, x0, 0.1, math.inf, m), X)
    lin = random_network([6, 4], act, rng)
    x0 = rng.uniform(-1, 1, 6)
    for p in NORMS:
        lbs = [layer_bounds(lin, x0, 0.05, p, m) for m in ("ibp", "fastlin", "crown")]
        # one affine layer: every method gives the exact range x0 -> W x0 + b +- eps ||W_r||_q
        W, b = lin.weights[0], lin.biases[0]
        q = {1.0: np.inf, 2.0: 2.0, math.inf: 1.0}[p]
        r = 0.05 * np.linalg.norm(W, ord=q, axis=1)
        for lb in lbs:
            np.testing.assert_allclose(lb.upper[0], W @ x0 + b + r, rtol=1e-12, atol=1e-12)
            np.testing.assert_allclose(lb.lower[0], W @ x0 + b - r, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("act,params", ACTS, ids=IDS)
def test_global_bounds_eps_inf(act, params, rng):
    """eps = inf: over the domain when there is one (finite, contained); without one, infinite where it must be
    and never NaN."""
    net, x0 = make_case(rng, act, params, 3, with_domain=True)
    region = Region.of(net, x0, math.inf, math.inf)
    X = sample_region(region, 4000, rng)
    for p in NORMS:
        for m in methods_for(net):
            lb = layer_bounds(net, x0, math.inf, p, m)
            for l, u in zip(lb.lower, lb.upper):
                assert np.isfinite(l).all() and np.isfinite(u).all()
            assert_contained(net, lb, X, label=f"eps=inf domain p={p}")
    net, x0 = make_case(rng, act, params, 3, with_domain=False)
    region = Region.of(net, x0, math.inf, math.inf)
    X = sample_region(region, 4000, rng)  # a box of radius 10 around x0
    for p in NORMS:
        for m in methods_for(net):
            lb = layer_bounds(net, x0, math.inf, p, m)
            assert_contained(net, lb, X, label=f"eps=inf no domain p={p}")
            # the first layer is unbounded (no zero weight rows)
            assert np.isneginf(lb.lower[0]).all() and np.isposinf(lb.upper[0]).all()
            if act in ("sigmoid", "tanh", "arctan", "hard_sigmoid"):
                for l, u in zip(lb.lower[1:], lb.upper[1:]):
                    assert np.isfinite(l).all() and np.isfinite(u).all()


def test_domain_is_used_for_every_norm(rng):
    """With a domain, a ball reaching outside it gives first-layer bounds no looser than without the domain (for
    IBP every layer, which is monotone in its input box), and strictly tighter for p = inf when clipped."""
    net = random_network([6, 10, 10, 3], "relu", rng, domain=(0.0, 1.0))
    free = net.__class__(net.weights, net.biases, net.activations)
    x0 = np.full(6, 0.02)
    for p in NORMS:
        for m in ("ibp", "fastlin", "crown"):
            a = layer_bounds(net, x0, 0.3, p, m)
            b = layer_bounds(free, x0, 0.3, p, m)
            n_check = len(a.lower) if m == "ibp" else 1
            for la, ua, lb_, ub in list(zip(a.lower, a.upper, b.lower, b.upper))[:n_check]:
                assert (la >= lb_ - 1e-12).all() and (ua <= ub + 1e-12).all()
            if p == math.inf:
                assert np.mean(a.upper[0] - a.lower[0]) < np.mean(b.upper[0] - b.lower[0])
