"""The exact local Lipschitz constant by the activation-pattern MIP (recurjac_scale.exact), checked against brute
force over every activation pattern (each pattern's closed region tested for a point of the region by an LP
written here, its gradient multiplied out here)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy.optimize import linprog

from recurjac_scale import lipschitz
from recurjac_scale.errors import InputError, UnsupportedActivationError
from recurjac_scale.exact import exact_lipschitz
from recurjac_scale.testing import random_network


def _brute_force(net, x0, eps, p):
    """max over all patterns (every hidden neuron, both signs) whose closed region meets B_p[x0, eps] of the
    pattern's gradient norm; independent of the package's own helpers."""
    ws = [np.asarray(w, float) for w in net.weights]
    bs = [np.asarray(b, float) for b in net.biases]
    alphas = [getattr(a, "alpha", 0.0) for a in net.activations]
    n0 = ws[0].shape[1]
    widths = [w.shape[0] for w in ws[:-1]]
    q = 1.0 if p == math.inf else math.inf
    best = -1.0
    for bits in itertools.product((0, 1), repeat=sum(widths)):
        pats, off = [], 0
        for n in widths:
            pats.append(np.array(bits[off:off + n]))
            off += n
        # affine pre-activations under the pattern, and the constraints (2 d - 1) z >= 0
        A, c = np.eye(n0), np.zeros(n0)
        rows, rhs = [], []
        for k, d in enumerate(pats):
            A, c = ws[k] @ A, ws[k] @ c + bs[k]
            sgn = np.where(d > 0, -1.0, 1.0)  # -z <= 0 or z <= 0
            rows.append(sgn[:, None] * A)
            rhs.append(-sgn * c)
            slope = np.where(d > 0, 1.0, alphas[k])
            A, c = slope[:, None] * A, slope * c
        A_ub, b_ub = np.vstack(rows), np.concatenate(rhs)
        if p == math.inf:
            res = linprog(np.zeros(n0), A_ub=A_ub, b_ub=b_ub + 1e-12, bounds=list(zip(x0 - eps, x0 + eps)), method="highs")
        else:  # p = 1: x = x0 + dp - dm, sum(dp + dm) <= eps
            A1 = np.vstack([np.hstack([A_ub, -A_ub]), np.ones((1, 2 * n0))])
            b1 = np.append(b_ub + 1e-12 - A_ub @ x0, eps)
            res = linprog(np.zeros(2 * n0), A_ub=A1, b_ub=b1, bounds=[(0, None)] * (2 * n0), method="highs")
        if res.status != 0:
            continue
        g = ws[-1][0]
        for k in range(len(pats) - 1, -1, -1):
            g = ws[k].T @ (np.where(pats[k] > 0, 1.0, alphas[k]) * g)
        best = max(best, float(np.linalg.norm(g, ord=q)))
    return best


CASES = [
    ((3, 6, 2), "relu", math.inf, 1.0),
    ((3, 5, 2), "leaky_relu", math.inf, 1.0),
    ((3, 3, 3, 2), "relu", math.inf, 1.0),
    pytest.param((3, 3, 3, 2), "leaky_relu", math.inf, 1.2, marks=pytest.mark.slow),
    ((4, 5, 2), "relu", 1.0, 1.5),
    pytest.param((4, 7, 3), "relu", math.inf, 0.3, marks=pytest.mark.slow),
    pytest.param((3, 8, 2), "relu", math.inf, 0.5, marks=pytest.mark.slow),
    pytest.param((4, 7, 3), "leaky_relu", math.inf, 0.4, marks=pytest.mark.slow),
    pytest.param((3, 4, 4, 2), "relu", math.inf, 0.4, marks=pytest.mark.slow),
    ((3, 4, 3, 2), "leaky_relu", math.inf, 0.5),
    pytest.param((3, 3, 4, 2), "relu", 1.0, 2.5, marks=pytest.mark.slow),
]


@pytest.mark.parametrize("widths,act,p,eps", CASES)
def test_mip_equals_brute_force(widths, act, p, eps, rng):
    kw = {"alpha": 0.1} if act == "leaky_relu" else {}
    net = random_network(widths, act, rng=rng, **kw).with_outputs(np.eye(widths[-1])[:1])
    x0 = rng.uniform(0, 1, widths[0])
    res = exact_lipschitz(net, x0, eps, p)
    ref = _brute_force(net, x0, eps, p)
    assert res.optimal
    assert res.value == pytest.approx(ref, rel=1e-9)
    assert res.mip_objective == pytest.approx(ref, rel=1e-7)
    assert res.mip_bound >= ref * (1 - 1e-7)
    assert res.validated and res.interior_margin > 0
    assert res.attained == pytest.approx(ref, rel=1e-9)
    # the certified constant is an upper bound of the exact one, and some unstable neuron makes it strict
    cert = lipschitz(net, x0, eps, p).points[0].lipschitz
    assert cert >= ref * (1 - 1e-12)
    assert res.n_unstable >= 2
    # with the cuts of an attained lower bound (a point's gradient norm) and a certified upper bound, and with
    # linear-jacobian's sign bounds: the same value
    X = np.random.default_rng(1).uniform(-1, 1, (200, widths[0])) * eps / (widths[0] if p == 1.0 else 1) + x0
    seen = float(np.linalg.norm(net.jacobian(X)[:, 0, :], ord=1.0 if p == math.inf else math.inf, axis=1).max())
    assert seen <= ref * (1 + 1e-12)
    cut = exact_lipschitz(net, x0, eps, p, lower_bound=seen, upper_bound=cert, sign_method="linear-jacobian")
    assert cut.optimal and cut.value == pytest.approx(ref, rel=1e-9)


def test_mip_lower_bound_above_the_optimum_is_infeasible(rng):
    net = random_network((3, 6, 2), "relu", rng=rng)
    x0 = rng.uniform(0, 1, 3)
    ex = exact_lipschitz(net, x0, 1.0, "inf", outputs=0)
    assert ex.optimal
    with pytest.raises(InputError, match="no solution"):
        exact_lipschitz(net, x0, 1.0, "inf", outputs=0, lower_bound=ex.value * 1.01)


def test_mip_margin_output_and_domain(rng):
    """A margin f_c - f_j over a region cut by the input domain: still the brute-force value."""
    net = random_network((3, 6, 3), "relu", rng=rng, domain=(0.0, 1.0))
    x0 = np.array([0.05, 0.5, 0.97])
    res = exact_lipschitz(net, x0, 0.3, "inf", outputs=(0, 2))
    sub = net.with_outputs(np.array([[1.0, 0.0, -1.0]]))
    # brute force on the clipped box: shift the ball to the clipped box via a smaller radius per side
    lo, hi = np.maximum(x0 - 0.3, 0), np.minimum(x0 + 0.3, 1)
    X = np.random.default_rng(3).uniform(lo, hi, size=(20000, 3))
    best = float(np.abs(sub.jacobian(X)[:, 0, :]).sum(axis=1).max())
    assert res.optimal and res.validated
    assert res.value >= best - 1e-9
    assert np.all(res.x >= lo - 1e-12) and np.all(res.x <= hi + 1e-12)


def test_mip_bad_input(rng):
    net = random_network((3, 4, 2), "relu", rng=rng)
    x0 = np.zeros(3)
    with pytest.raises(InputError, match="p=2"):
        exact_lipschitz(net, x0, 0.1, 2)
    with pytest.raises(InputError, match="one output row"):
        exact_lipschitz(net, x0, 0.1, "inf", outputs="all")
    with pytest.raises(InputError, match="bounded region"):
        exact_lipschitz(net, x0, math.inf, "inf")
    with pytest.raises(UnsupportedActivationError, match="relu and leaky_relu"):
        exact_lipschitz(random_network((3, 4, 2), "tanh", rng=rng), x0, 0.1, "inf")


@pytest.mark.parametrize("stable_layer", [2, 1])
def test_mip_with_a_stable_hidden_layer_equals_brute_force(stable_layer, rng):
    """A hidden layer made stable (large biases): the backward pass gates g by pairwise products of binaries with
    the nearest layer above that has unstable neurons (not the layer right above); still the brute-force value."""
    from recurjac_scale.exact import _backward_plan

    net = random_network((3, 3, 3, 3, 2), "relu", rng=rng).with_outputs(np.eye(2)[:1])
    bs = [np.asarray(b, float).copy() for b in net.biases]
    bs[stable_layer] += 50.0  # every neuron active; the next layer's pre-activations are unchanged
    bs[stable_layer + 1] -= 50.0 * np.asarray(net.weights[stable_layer + 1], float).sum(axis=1)
    net = net._replace(biases=tuple(bs))
    x0 = rng.uniform(0, 1, 3)
    res = exact_lipschitz(net, x0, 1.0, "inf")
    lbs = lipschitz(net, x0, 1.0, "inf").points[0].lipschitz
    ref = _brute_force(net, x0, 1.0, math.inf)
    assert res.optimal and res.validated
    assert res.value == pytest.approx(ref, rel=1e-9)
    assert res.mip_bound >= ref * (1 - 1e-7)
    assert lbs >= ref * (1 - 1e-12)
    from recurjac_scale.layer_bounds import layer_bounds

    lb = layer_bounds(net, x0, 1.0, "inf", method="crown")
    unstable = [np.flatnonzero((lb.lower[k] < 0) & (lb.upper[k] > 0)) for k in range(3)]
    plan, above = _backward_plan(unstable)
    assert plan[stable_layer] is None and "pairs" in plan
