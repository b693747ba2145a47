"""Certified rounding against exact rational arithmetic (``fractions.Fraction``).

Small networks built to cancel (large weights of both signs, pairs of neurons whose contributions nearly cancel in
the next layer, several layers deep, near-zero Jacobian entries) are bounded by every method, in float64 and
float32, with dense and sparse (CSR) kernels, several blockings, sharing across rows forced on and off, and through
the execution engine.  The exact ALGORITHM.md recursion, computed in rationals from the same derivative bounds
(:func:`exact_bounds`), must lie inside the computed bounds (zero violations), and the computed bounds must lie
within their stated allowance of it (:mod:`recurjac_scale.jacobian.rounding`): certification costs at most the
allowance.  Products ``C W(H) S(H-1) ... S(1) W(1)`` for derivatives ``S`` drawn inside the bounds (vertices) must
lie inside them too.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest

from recurjac_scale.activations import get_activation
from recurjac_scale.jacobian import get_jacobian_method, run_chain
from recurjac_scale.jacobian.methods import final_allowance
from recurjac_scale.network.model import InputSpec, Network

METHODS = ("fastlip", "recurjac-b", "recurjac-f0", "recurjac-f1")
F = Fraction


# -- exact transcription of ALGORITHM.md (rationals) ----------------------------------------------------------------
def _q(a) -> np.ndarray:
    """A float array as an object array of exact Fractions."""
    a = np.asarray(a, dtype=np.float64)
    return np.array([F(float(x)) for x in a.ravel()], dtype=object).reshape(a.shape)


def _pos(a):
    return np.where(a > 0, a, F(0))


def _neg(a):
    return np.where(a < 0, a, F(0))


def _mm(a, b):
    """Exact product of object matrices (no float anywhere)."""
    out = np.empty((a.shape[0], b.shape[1]), dtype=object)
    for i in range(a.shape[0]):
        for k in range(b.shape[1]):
            s = F(0)
            for r in range(a.shape[1]):
                s += a[i, r] * b[r, k]
            out[i, k] = s
    return out


class _Exact:
    """ALGORITHM.md's recursion on ``P = A Σ_1 M_1 ... Σ_T M_T`` in rationals (tests/oracle_recurjac.py, exact)."""

    def __init__(self, A, mats, dl, du):
        self.A, self.mats, self.dl, self.du = A, mats, dl, du
        self.LB, self.UB = [A], [A]

    def bound_col(self, t, j, V, upper):
        dl, du = self.dl[t - 1], self.du[t - 1]
        Vp, Vn = _pos(V), _neg(V)
        if t == 1:
            a = self.A[j]
            ap, an = _pos(a), _neg(a)
            if upper:
                return _mm(((ap * du) + (an * dl))[None, :], Vp)[0] + _mm(((an * du) + (ap * dl))[None, :], Vn)[0]
            return _mm(((ap * dl) + (an * du))[None, :], Vp)[0] + _mm(((an * dl) + (ap * du))[None, :], Vn)[0]
        Lm, Um = self.LB[t - 1][j], self.UB[t - 1][j]
        d = Lm.shape[0]
        I = np.array([bool(Lm[r] < 0 < Um[r] and dl[r] < du[r]) for r in range(d)])
        P = np.array([bool(Lm[r] >= 0) for r in range(d)])
        N = np.array([bool(Um[r] <= 0) and not P[r] for r in range(d)])
        p = np.array([F(int(P[r] or not (I[r] or P[r] or N[r]))) for r in range(d)], dtype=object)
        n = np.array([F(int(N[r])) for r in range(d)], dtype=object)
        MI = np.array([F(int(I[r])) for r in range(d)], dtype=object)
        if upper:
            term1 = _mm((MI * Um * du)[None, :], Vp)[0] + _mm((MI * Lm * du)[None, :], Vn)[0]
            X = (p * du + n * dl)[:, None] * Vp + (p * dl + n * du)[:, None] * Vn
        else:
            term1 = _mm((MI * Lm * du)[None, :], Vp)[0] + _mm((MI * Um * du)[None, :], Vn)[0]
            X = (p * dl + n * du)[:, None] * Vp + (p * du + n * dl)[:, None] * Vn
        return term1 + self.bound_col(t - 1, j, _mm(self.mats[t - 2], X), upper)

    def run(self):
        for t in range(1, len(self.mats) + 1):
            V = self.mats[t - 1]
            R = self.A.shape[0]
            self.LB.append(np.stack([self.bound_col(t, j, V, False) for j in range(R)]))
            self.UB.append(np.stack([self.bound_col(t, j, V, True) for j in range(R)]))
        return self.LB[-1], self.UB[-1]

    def run_fastlip(self):
        L = U = self.A
        for t in range(1, len(self.mats) + 1):
            L, U = _interval_times(L, U, self.dl[t - 1][None, :], self.du[t - 1][None, :], self.mats[t - 1])
        return L, U


def _interval_times(L, U, dl, du, M):
    """``hull([L, U] [dl, du]) M`` exactly (midpoint-radius is exact for an interval times a point matrix)."""
    zl = np.where(L >= 0, L * dl, L * du)
    zu = np.where(U >= 0, U * du, U * dl)
    mid, rad = (zl + zu) / 2, (zu - zl) / 2
    absM = np.vectorize(abs, otypes=[object])(M)
    return _mm(mid, M) - _mm(rad, absM), _mm(mid, M) + _mm(rad, absM)


def exact_bounds(method, weights, db):
    """``(lower, upper)``, shape (m, n_0), of the exact ALGORITHM.md recursion (rationals), for float64 weights
    ``weights`` (output selection folded in) and derivative bounds ``db``."""
    W = [_q(w) for w in weights]
    d = [(_q(lo), _q(hi)) for lo, hi in db]
    H = len(W)
    if method in ("recurjac-b", "fastlip"):
        ch = _Exact(W[H - 1], [W[H - 1 - t] for t in range(1, H)], [d[H - 1 - t][0] for t in range(1, H)],
                    [d[H - 1 - t][1] for t in range(1, H)])
        return ch.run_fastlip() if method == "fastlip" else ch.run()
    if method == "recurjac-f0":
        L, U = _Exact(W[0].T, [W[t].T for t in range(1, H)], [x[0] for x in d], [x[1] for x in d]).run()
        return L.T, U.T
    L, U = _Exact(W[1].T, [W[t].T for t in range(2, H)], [x[0] for x in d[1:]], [x[1] for x in d[1:]]).run()
    # F1 finish: hull([L, U] [dl, du]) per layer-1 neuron (rows of the (n_1, m) bounds), then W(1)
    zl = np.where(L >= 0, L * d[0][0][:, None], L * d[0][1][:, None])
    zu = np.where(U >= 0, U * d[0][1][:, None], U * d[0][0][:, None])
    mid, rad = (zl + zu) / 2, (zu - zl) / 2
    absW1 = np.vectorize(abs, otypes=[object])(W[0])
    return (_mm(mid.T, W[0]) - _mm(rad.T, absW1)), (_mm(mid.T, W[0]) + _mm(rad.T, absW1))


# -- networks built to cancel --------------------------------------------------------------------------------------
def cancelling_network(rng, depth: int, width: int, scale: float):
    """A ReLU network whose hidden layers come in pairs of neurons with (nearly) opposite outgoing weights: large
    weights of both signs whose contributions cancel to ``~1e-6`` of their size in every later layer, so the
    Jacobian entries are tiny next to the products that form them.  Output selection: row 0 (folded in)."""
    ws = []
    n_in = width
    for k in range(depth):
        half = max(1, width // 2)
        base = rng.choice([-1.0, 1.0], size=(half, n_in)) * rng.uniform(0.5, 1.0, size=(half, n_in)) * scale
        w = np.vstack([base, base * (1.0 + rng.uniform(-1e-6, 1e-6, size=base.shape))])  # duplicated neurons
        if k > 0:
            # the previous layer's duplicated pairs enter with opposite signs: contributions nearly cancel
            h = n_in // 2
            w[:, h : 2 * h] = -w[:, :h] * (1.0 + rng.uniform(-1e-6, 1e-6, size=(w.shape[0], h)))
        ws.append(w)
        n_in = w.shape[0]
    out = rng.choice([-1.0, 1.0], size=(1, n_in)) * scale
    h = n_in // 2
    out[:, h : 2 * h] = -out[:, :h] * (1.0 + 1e-7)
    ws.append(out)
    acts = [get_activation("relu")] * depth
    net = Network(ws, [np.zeros(w.shape[0]) for w in ws], acts, input_spec=InputSpec(shape=(width,)))
    return net


def derivative_bounds(rng, net, kinds=("dead", "stable", "unstable", "interval")):
    """Per neuron one of: dead ``[0, 0]``, stable ``[1, 1]``, unstable ``[0, 1]``, or an interval ``[a, b]`` of
    multiples of 1/8 (exact in float32, so float32 chains see the same bounds); duplicated neurons share them."""
    out = []
    for n in net.widths[1:-1]:
        h = n // 2
        k = rng.integers(0, len(kinds), size=h)
        a = rng.integers(0, 5, size=h) / 8.0
        b = a + rng.integers(1, 5, size=h) / 8.0
        lo = np.select([k == 0, k == 1, k == 2], [0.0, 1.0, 0.0], a)
        hi = np.select([k == 0, k == 1, k == 2], [0.0, 1.0, 1.0], b)
        lo = np.concatenate([lo, lo, np.zeros(n - 2 * h)])
        hi = np.concatenate([hi, hi, np.ones(n - 2 * h)])
        out.append((lo, hi))
    return out


def vertex_products(rng, weights, db, n: int = 6):
    """Exact ``W(H) S(H-1) ... S(1) W(1)`` for ``n`` random vertex choices ``S = diag(dl or du)``."""
    W = [_q(w) for w in weights]
    out = []
    for _ in range(n):
        J = W[0]
        for k in range(1, len(W)):
            lo, hi = db[k - 1]
            s = np.where(rng.random(lo.size) < 0.5, lo, hi)
            J = _mm(W[k] * _q(s)[None, :], J)
        out.append(J)
    return out


def _check(method, net, db, dtype, *, sparse=False, blocks=(None, None), exact=None, vertices=()):
    netC = net  # output row folded in by construction
    jm = get_jacobian_method(method)
    chain = jm.build_chain(netC, db, dtype=dtype)
    if sparse:
        chain = chain.with_sparse(math.inf)
    lower, upper, states = run_chain(jm, chain, row_block=blocks[0], col_block=blocks[1])
    allowance = final_allowance(chain, states[-1])
    lo_x, up_x = exact if exact is not None else exact_bounds(method, net.weights, db)
    lo = _q(lower)
    up = _q(upper)
    al = _q(allowance)
    assert np.isfinite(lower).all() and np.isfinite(upper).all() and (allowance >= 0).all()
    bad_out = int(np.sum(lo > lo_x) + np.sum(up < up_x))
    bad_far = int(np.sum(lo < lo_x - al) + np.sum(up > up_x + al))
    bad_vertex = sum(int(np.sum(lo > J) + np.sum(up < J)) for J in vertices)
    return bad_out, bad_far, bad_vertex, float(np.max(allowance / np.maximum(upper - lower, 1e-300)))


CASES = [(seed, depth) for seed, depth in ((1, 2), (2, 3), (3, 4), (4, 5), (5, 4), (6, 5))]
KINDS = (
    ("dead", "stable", "unstable", "interval"),
    ("dead", "stable"),  # exact derivatives: the bounds collapse onto a near-zero Jacobian
    ("stable", "stable", "stable", "unstable"),
)


@pytest.mark.parametrize("seed,depth", CASES)
@pytest.mark.parametrize("method", METHODS)
def test_exact_recursion_inside_and_within_allowance(method, seed, depth):
    rng = np.random.default_rng(seed)
    net = cancelling_network(rng, depth, 6, scale=float(rng.choice([1.0, 300.0, 1e4])))
    db = derivative_bounds(rng, net, kinds=KINDS[seed % len(KINDS)])
    exact = exact_bounds(method, net.weights, db)
    vertices = vertex_products(rng, net.weights, db)
    for dtype in (np.float64, np.float32):
        for sparse in (False, True):
            for blocks in ((None, None), (1, 2)):
                bad_out, bad_far, bad_vertex, _ = _check(method, net, db, dtype, sparse=sparse, blocks=blocks,
                                                         exact=exact, vertices=vertices)
                assert (bad_out, bad_far, bad_vertex) == (0, 0, 0), (dtype, sparse, blocks)


@pytest.mark.parametrize("share_ratio", [0.0, math.inf])
@pytest.mark.parametrize("method", ["recurjac-b", "recurjac-f0", "recurjac-f1"])
def test_sharing_across_rows_on_and_off(method, share_ratio, monkeypatch):
    """The shared variant (stable part shared by the rows, per-row low-rank part) and the dense one."""
    monkeypatch.setattr("recurjac_scale.jacobian.recurjac_shared.SHARE_RATIO", share_ratio)
    for seed in (11, 12, 13):
        rng = np.random.default_rng(seed)
        net = cancelling_network(rng, 4, 6, scale=300.0)
        db = derivative_bounds(rng, net, kinds=("dead", "stable", "stable", "unstable", "interval"))
        for dtype in (np.float64, np.float32):
            assert _check(method, net, db, dtype)[:3] == (0, 0, 0), (seed, dtype)


def test_engine_blocks_contain_the_exact_recursion(tmp_path):
    """The execution engine (blocked tasks, state in zarr) on a cancelling network: the exact recursion inside,
    and the reported rounding share equals the in-memory one."""
    from recurjac_scale.engine import plan_jacobian
    from recurjac_scale.jacobian import jacobian_bounds
    from recurjac_scale.layer_bounds.base import layer_bounds

    rng = np.random.default_rng(5)
    net = cancelling_network(rng, 3, 6, scale=300.0)
    x0 = rng.uniform(-1.0, 1.0, 6)
    for method in ("recurjac-b", "recurjac-f1"):
        lb = layer_bounds(net, x0, 0.05, math.inf, method="ibp")
        mem = jacobian_bounds(net, x0, 0.05, math.inf, method=method, layer_bounds=lb, outputs=0)
        res = plan_jacobian(net, x0, 0.05, math.inf, method, layer_bounds="ibp", outputs=0, row_block=1,
                            col_block=2).compute(durable=False, progress=False)
        from recurjac_scale.jacobian.chain import derivative_bounds_for

        db = derivative_bounds_for(net.with_outputs(np.eye(1)), lb)
        lo_x, up_x = exact_bounds(method, net.with_outputs(np.eye(1)).weights, db)
        assert int(np.sum(_q(res.lower) > lo_x) + np.sum(_q(res.upper) < up_x)) == 0
        assert res.rounding_share == pytest.approx(mem.rounding_share, rel=1e-12)


# -- networks on which the rounding of one GEMM decides containment ------------------------------------------------
def gemm_decisive_factors(rng, T: int, n_cols: int, delta: float):
    """Chain factors ``M_0, ..., M_T`` (``M_0`` one row) on which the floating-point error of one matrix product is
    far larger than every other term of the rounding allowance.

    ``T = 1``: ``M_0 = [a1, -a2]``, ``M_1 = [b; b]`` (``b`` one value per column): step 1 computes
    ``a1 b - a2 b``, about ``delta`` times its terms, so its rounding error (about ``u |a b|``) is all there is.

    ``T >= 2``: ``M_0 = [m, -m]``, ``M_1`` a 2x2 matrix whose four entries ``±a (1 + O(delta))`` nearly cancel in
    both directions, ``M_2 .. M_{T-1}`` all ``1/2`` (exact pass-through), ``M_T = [b; b]``.  Then
    ``P_1 = M_0 Σ M_1`` and the operand ``M_1 x`` are both ``O(delta)`` of their terms (so ``kappa`` and ``|x~|``,
    which weigh every other term, are tiny), while the product ``M_1 x`` rounds by about ``u |M_1| |x|``, which
    only the GEMM-error term ``gG q colsum|M_1| du |x|`` of the allowance covers.  The rows of ``M_1`` differ, so
    their rounding errors do not cancel in ``M_0 (M_1 x)``."""
    b = rng.uniform(1.0, 2.0, size=n_cols)
    V = np.vstack([b, b])
    a = rng.uniform(1.0, 2.0)
    if T == 1:
        return [np.array([[a, -a * (1.0 + delta * rng.uniform(0.5, 1.0))]]), V]
    m = rng.uniform(1.0, 2.0)
    M1 = a * (1.0 + delta * rng.uniform(-1.0, 1.0, size=(2, 2))) * np.array([[1.0, -1.0], [1.0, -1.0]])
    return [np.array([[m, -m]]), M1, *[np.full((2, 2), 0.5)] * (T - 2), V]


def gemm_decisive_network(method: str, mats, chain_db):
    """``(network, derivative bounds)`` whose chain for ``method`` is ``mats`` with ``chain_db[t - 1]`` the
    derivative bounds of ``Σ_t`` (see :func:`exact_bounds` for the chains of the methods).  F1: a first layer
    ``[[1]]`` of one stable neuron in front, so the F1 chain is ``mats`` and its finish is exact."""
    if method in ("recurjac-b", "fastlip"):
        ws, db = [m for m in reversed(mats)], list(reversed(chain_db))
    elif method == "recurjac-f0":
        ws, db = [m.T for m in mats], list(chain_db)
    else:
        ws, db = [np.ones((1, 1))] + [m.T for m in mats], [(np.ones(1), np.ones(1))] + list(chain_db)
    net = Network(ws, [np.zeros(w.shape[0]) for w in ws], [get_activation("relu")] * (len(ws) - 1),
                  input_spec=InputSpec(shape=(ws[0].shape[1],)))
    return net, db


DECISIVE = [  # (T, derivative bounds of Σ_2 (the neurons between M_1 and M_2), share ratio: 0 dense, inf shared)
    (1, None, 0.5),
    *[(T, level2, share) for T in (2, 3) for level2 in ("stable", "interval") for share in (0.0, 0.5, math.inf)],
]


@pytest.mark.parametrize("T,level2,share_ratio", DECISIVE)
@pytest.mark.parametrize("method", METHODS)
def test_gemm_rounding_decides_containment(method, T, level2, share_ratio, monkeypatch):
    """Exact rational bounds against the float bounds (no tolerance) on networks where only the GEMM-error term
    of the allowance covers the rounding of a matrix product (:func:`gemm_decisive_factors`): without that term
    (``gG`` of :func:`recurjac_scale.jacobian.rounding.level_coefficients`, the stable product's
    ``_stable_error`` in :mod:`recurjac_scale.jacobian.recurjac` and the shared variant's ``gG`` terms in
    :mod:`recurjac_scale.jacobian.recurjac_shared`; for
    ``T = 1``, step 1, Fast-Lip and the F1 finish, whose local widening is that term) the exact bounds fall
    outside.  Derivative bounds are stable ``[1, 1]`` except ``Σ_2``, ``[1/2, 1]`` in the ``interval`` cases.

    Checked by zeroing each of these terms alone: every one makes some of these cases fail (``gG`` of
    level_coefficients: the dense levels (share ratio 0, or the interval cases); ``_stable_error``: T = 2 stable,
    share ratio 0; the shared variant's ``gG``: the stable cases with sharing; the local widening of step 1
    (B, F0), of Fast-Lip (every T) and of the F1 finish: T = 1), and with all of them in place none fails."""
    if method == "recurjac-f1" and T == 1:
        method_net = "recurjac-b"  # the same network: its F1 chain is the top alone and the finish is the GEMM
    else:
        method_net = method
    monkeypatch.setattr("recurjac_scale.jacobian.recurjac_shared.SHARE_RATIO", share_ratio)
    for dtype, delta in ((np.float64, 1e-9), (np.float32, 1e-4)):
        for seed in range(4):
            rng = np.random.default_rng(100 + seed)
            mats = gemm_decisive_factors(rng, T, 3, delta)
            chain_db = [(np.ones(2), np.ones(2)) for _ in range(T)]
            if level2 == "interval":
                chain_db[1] = (np.full(2, 0.5), np.ones(2))
            net, db = gemm_decisive_network(method_net, mats, chain_db)
            bad_out, bad_far, bad_vertex, _ = _check(method, net, db, dtype)
            assert (bad_out, bad_far, bad_vertex) == (0, 0, 0), (dtype, seed)
