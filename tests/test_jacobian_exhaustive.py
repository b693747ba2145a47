"""Exhaustive ground truth on tiny piecewise-linear networks (ALGORITHM.md, "How to know it is right", 2).

For a ReLU / leaky-ReLU network with at most 12 hidden neurons and a polytope region (an l-inf box, or an l1 ball,
intersected with the domain box), every activation pattern the region admits is enumerated by a depth-first
search: a pattern (one sign per hidden neuron) is admitted iff the LP
``max t  s.t.  x in S,  s_r * z_r(x) >= t  for every neuron r`` (``z_r`` affine in ``x`` once the earlier layers'
pattern is fixed) has ``t* > 0`` (HiGHS via ``scipy.optimize.linprog``): the pattern holds on a full-dimensional
piece of S.  On that piece the Jacobian is exactly the product ``W(H) D(a_{H-1}) ... D(a_1) W(1)``, so the
elementwise range of the Jacobian over S (almost everywhere) is the min / max over the admitted patterns, and the
Lipschitz constant over the convex S is the max over admitted patterns of the pattern's operator norm.

Every Jacobian method x layer-bound method must give ``lower <= exact min`` and ``upper >= exact max``, and every
Lipschitz constant must be ``>= exact max norm``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.optimize import linprog

from recurjac_scale.layer_bounds.base import Region
from recurjac_scale.testing import random_network, sample_region

TOL_T = 1e-9  # a piece thinner than this (in pre-activation units) is ignored


def _region_constraints(region: Region):
    """LP pieces describing S over the variables (x (n0), t, [u (n0) for p = 1]): returns (A_ub, b_ub, bounds, nv)
    with the region's own constraints; the caller appends the pattern constraints on x and t."""
    n0 = region.x0.shape[0]
    lo, hi = region.box
    if not math.isfinite(region.eps) and region.lower is None:
        lo, hi = region.x0 - 10.0, region.x0 + 10.0
    bounds = [(float(a), float(b)) for a, b in zip(lo, hi)] + [(None, 1.0)]
    rows, rhs = [], []
    if region.p == 1.0 and math.isfinite(region.eps):
        # u_i >= |x_i - x0_i|, sum u <= eps
        nv = 2 * n0 + 1
        for i in range(n0):
            r = np.zeros(nv)
            r[i], r[n0 + 1 + i] = 1.0, -1.0
            rows.append(r)
            rhs.append(region.x0[i])
            r = np.zeros(nv)
            r[i], r[n0 + 1 + i] = -1.0, -1.0
            rows.append(r)
            rhs.append(-region.x0[i])
        r = np.zeros(nv)
        r[n0 + 1 :] = 1.0
        rows.append(r)
        rhs.append(region.eps)
        bounds += [(0.0, None)] * n0
    elif region.p != math.inf and math.isfinite(region.eps):
        raise ValueError("exhaustive enumeration needs a polytope region (p = 1 or inf)")
    else:
        nv = n0 + 1
    return rows, rhs, bounds, nv


def enumerate_patterns(network, region: Region, *, max_hidden: int = 12):
    """All activation patterns admitted by ``region`` (full-dimensional pieces), with their exact Jacobians.

    Returns
    -------
    jacobians : ndarray, shape (k, m, n_0)
        The Jacobian on each admitted piece.
    witnesses : ndarray, shape (k, n_0)
        A point strictly inside each piece (the LP optimum).
    """
    acts = network.activations
    for a in acts:
        assert a.name in ("relu", "leaky_relu"), "exhaustive enumeration is for piecewise-linear ReLU networks"
    assert network.output_activation.is_identity
    assert sum(network.widths[1:-1]) <= max_hidden
    ws = [np.asarray(w, dtype=np.float64) for w in network.weights]
    bs = [np.asarray(b, dtype=np.float64) for b in network.biases]
    n0 = network.n_inputs
    base_rows, base_rhs, bounds, nv = _region_constraints(region)
    c = np.zeros(nv)
    c[n0] = -1.0  # maximise t

    def solve(rows, rhs):
        res = linprog(c, A_ub=np.array(rows), b_ub=np.array(rhs), bounds=bounds, method="highs")
        if res.status != 0:
            return None
        return res.x if res.x[n0] > TOL_T else None

    results, witnesses = [], []

    def descend(layer, A, cvec, done, slopes, rows, rhs, x_wit):
        # A, cvec: z(layer) = A x + cvec for the current layer; `done` neurons of it are decided.
        n = A.shape[0]
        if done == n:
            a = np.array(slopes)
            h_A = a[:, None] * A
            h_c = a * cvec
            nA, nc = ws[layer + 1] @ h_A, ws[layer + 1] @ h_c + bs[layer + 1]
            if layer + 1 == len(acts):
                results.append(nA)
                witnesses.append(x_wit)
                return
            descend(layer + 1, nA, nc, 0, [], rows, rhs, x_wit)
            return
        alpha = getattr(acts[layer], "alpha", 0.0)
        for s, slope in ((1.0, 1.0), (-1.0, alpha)):
            r = np.zeros(nv)
            r[:n0] = -s * A[done]
            r[n0] = 1.0
            new_rows, new_rhs = rows + [r], rhs + [s * cvec[done]]
            x = solve(new_rows, new_rhs)
            if x is not None:
                descend(layer, A, cvec, done + 1, slopes + [slope], new_rows, new_rhs, x[:n0])

    if len(acts) == 0:
        return ws[0][None], region.x0[None]
    descend(0, ws[0], bs[0], 0, [], list(base_rows), list(base_rhs), region.x0)
    return np.array(results), np.array(witnesses)


def exact_norm(J: np.ndarray, p: float) -> float:
    """The p -> p operator norm of one Jacobian (the dual norm for one row)."""
    if J.shape[0] == 1:
        q = {1.0: np.inf, 2.0: 2, math.inf: 1}[p]
        return float(np.linalg.norm(J[0], ord=q))
    return float(np.linalg.norm(J, ord={1.0: 1, 2.0: 2, math.inf: np.inf}[p]))


def _tiny_net(widths, act, rng, domain=None):
    params = {"alpha": 0.2} if act == "leaky_relu" else {}
    return random_network(widths, act, rng, domain=domain, **params)


TINY_CASES = [
    # widths, activation, eps, p, domain
    ((3, 6, 4, 2), "relu", 0.3, math.inf, None),
    ((4, 5, 5, 3), "relu", 0.15, math.inf, (0.0, 1.0)),
    ((2, 4, 4, 4, 2), "relu", 0.5, math.inf, None),
    ((3, 8, 3), "leaky_relu", 0.4, math.inf, None),
    ((3, 6, 5, 2), "relu", 0.5, 1.0, None),
    ((2, 5, 4, 2), "relu", math.inf, math.inf, (-1.0, 1.0)),
    ((5, 12, 3), "relu", 0.2, math.inf, None),
    # small radii: few unstable neurons, bounds tight in many entries (a wrong sign case shows up here)
    ((3, 6, 4, 2), "relu", 0.05, math.inf, None),
    ((3, 6, 4, 2), "relu", 0.1, math.inf, None),
    ((6, 10, 2), "relu", 0.05, math.inf, (0.0, 1.0)),
    ((3, 5, 5, 2), "leaky_relu", 0.1, 1.0, None),
]


@pytest.fixture(scope="module")
def tiny_cases():
    """Networks, regions and their exhaustive ground truth (computed once per module)."""
    rng = np.random.default_rng(1234)
    out = []
    for widths, act, eps, p, domain in TINY_CASES:
        net = _tiny_net(widths, act, rng, domain)
        if domain is None:
            x0 = rng.uniform(-0.5, 0.5, size=widths[0])
        else:
            x0 = rng.uniform(domain[0], domain[1], size=widths[0])
        region = Region.of(net, x0, eps, p)
        Js, wit = enumerate_patterns(net, region)
        out.append((net, x0, eps, p, region, Js, wit))
    return out


# -- the ground truth itself --------------------------------------------------------------------------------


def test_enumeration_finds_every_sampled_pattern(tiny_cases, rng):
    """Every Jacobian met at sampled points of S is one of the enumerated pattern Jacobians, and every witness
    point's actual Jacobian is the pattern's."""
    for net, x0, eps, p, region, Js, wit in tiny_cases:
        assert len(Js) >= 1
        # witnesses lie in S and realise their pattern
        J_w = net.jacobian(wit)
        np.testing.assert_allclose(J_w, Js, rtol=1e-9, atol=1e-12)
        pts = sample_region(region, 3000, rng)
        J_s = net.jacobian(pts)
        flat = Js.reshape(len(Js), -1)
        for J in J_s.reshape(len(J_s), -1):
            d = np.abs(flat - J).max(axis=1)
            assert d.min() < 1e-9 * (1 + np.abs(J).max()), "a sampled Jacobian is missing from the enumeration"


def test_enumeration_sanity(rng):
    """Sanity of the ground truth: a wide box admits several patterns; a single point (eps = 0) admits exactly
    the pattern at x0."""
    net = _tiny_net((2, 3, 1), "relu", rng)
    region = Region.of(net, np.zeros(2), 5.0, math.inf)
    Js, _ = enumerate_patterns(net, region)
    # with eps = 5 around 0 every one of the 3 hyperplanes cuts the box: more than one pattern
    assert len(Js) > 1
    region0 = Region.of(net, np.zeros(2), 0.0, math.inf)
    Js0, _ = enumerate_patterns(net, region0)
    assert len(Js0) == 1
    np.testing.assert_allclose(Js0[0], net.jacobian(np.zeros(2)), rtol=1e-12)


# -- every method against the ground truth ------------------------------------------------------------------

from recurjac_scale.jacobian import JACOBIAN_METHODS, jacobian_bounds  # noqa: E402
from recurjac_scale.layer_bounds import LAYER_BOUND_METHODS  # noqa: E402
from recurjac_scale.lipschitz import lipschitz  # noqa: E402


@pytest.mark.parametrize("method", sorted(JACOBIAN_METHODS))
@pytest.mark.parametrize("lb", sorted(LAYER_BOUND_METHODS))
def test_bounds_enclose_exact_range(tiny_cases, method, lb):
    """``lower <= min`` and ``upper >= max`` of the Jacobian over every admitted activation pattern."""
    for case, (net, x0, eps, p, region, Js, wit) in enumerate(tiny_cases):
        res = jacobian_bounds(net, x0, eps, p, method=method, layer_bounds=lb)
        lo, hi = Js.min(axis=0), Js.max(axis=0)
        tol = 1e-13 * (1.0 + np.abs(Js).max())
        assert (res.lower <= lo + tol).all(), (case, method, lb, float((res.lower - lo).max()))
        assert (res.upper >= hi - tol).all(), (case, method, lb, float((hi - res.upper).max()))


@pytest.mark.parametrize("method", sorted(JACOBIAN_METHODS))
def test_lipschitz_above_exact_maximum(tiny_cases, method):
    """Every Lipschitz constant is >= the exact maximum, over the admitted patterns, of the gradient norm (which
    is the exact Lipschitz constant of a piecewise-linear map over the convex region), for all rows, one row and
    a margin."""
    for case, (net, x0, eps, p, region, Js, wit) in enumerate(tiny_cases):
        m = net.n_outputs
        for outputs, C in ((None, np.eye(m)), (m - 1, np.eye(m)[[m - 1]]), ((0, 1), np.eye(m)[[0]] - np.eye(m)[[1]])):
            exact = max(exact_norm(C @ J, p) for J in Js)
            res = lipschitz(net, x0, eps, p, method=method, layer_bounds="crown", outputs=outputs)
            pt = res.points[0]
            assert pt.lipschitz >= exact * (1 - 1e-13), (case, method, outputs, pt.lipschitz, exact)
            if pt.algorithm2 is not None:
                assert pt.algorithm2 >= exact * (1 - 1e-13)


def test_recurjac_tightness_report(tiny_cases):
    """Not a soundness check: RecurJac-B is never looser than Fast-Lip on these ReLU networks (mean width), and
    the bounds are not absurdly loose compared with the exact range (catches a method that returns +-inf)."""
    for net, x0, eps, p, region, Js, wit in tiny_cases:
        if net.activations[0].name != "relu":
            continue
        wb = jacobian_bounds(net, x0, eps, p, method="recurjac-b", layer_bounds="crown").width.mean()
        wf = jacobian_bounds(net, x0, eps, p, method="fastlip", layer_bounds="crown").width.mean()
        assert wb <= wf * (1 + 1e-12) + 1e-12  # (the rounding allowances differ between the methods)
        exact_w = (Js.max(axis=0) - Js.min(axis=0)).mean()
        assert np.isfinite(wb) and wb <= 50 * (exact_w + 1.0)
