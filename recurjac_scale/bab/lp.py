"""LP tightening of a branch-and-bound part's pre-activation bounds (ReLU family), certified by weak duality.

A part with neuron splits is the polytope-like set ``{x in box : z_kj(x) >= 0 or <= 0 for each split}``, but the
layer-bound methods concretise every layer over the whole box and use a split only to clip that neuron's own
interval.  Here each still-unstable neuron ``z_Kj`` of a hidden layer ``K`` is bounded by two LPs over the
variables ``y = (x, z_0, h_0, ..., z_{K-1}, h_{K-1}, z_K)``:

- ``x`` in the part's box; every ``z_k`` in its current certified bounds (which hold the split constraints:
  ``[max(l, 0), u]`` / ``[l, min(u, 0)]``), every ``h_k`` in the activation of those bounds;
- equalities ``z_k = W_k h_{k-1} + b_k`` (``h_{-1} = x``; the weights enter as they are, no product is formed);
- ``h = z`` for an active neuron (``l >= 0``), ``h = alpha z`` for an inactive one (``u <= 0``), and for an
  unstable one the triangle relaxation ``h >= z``, ``h >= alpha z``,
  ``(u - l) h - (u - alpha l) z <= u l (alpha - 1)`` (the chord through ``(l, alpha l)`` and ``(u, u)``; its
  coefficients are rounded, so its right-hand side gets an allowance making the float row valid for the real
  point).

Every real point of the part satisfies these rows, so the LP optimum bounds ``z_Kj`` on the part.  The solver's
optimum is a float, not a bound: :func:`certified_max` turns its dual values into one by weak duality (any
``lambda >= 0`` on the inequality rows and any ``mu`` on the equalities give
``max c.y <= sum_i max(r_i lo_i, r_i hi_i) + lambda.b + mu.b_eq`` with ``r = c - A^T lambda - A_eq^T mu``),
evaluated with an explicit rounding allowance (:func:`recurjac_scale._fp.gamma`).  An infeasible LP is turned
into a certificate of emptiness the same way (``c = 0`` and a negative certified maximum), with the duals of an
elastic LP.  Layers are tightened in order, each LP using the earlier layers' tightened bounds.
"""

from __future__ import annotations

import numpy as np

from .._fp import TINY, gamma
from ..errors import EmptyRegionError, InputError

__all__ = ["certified_max", "tighten_bounds", "resolve_lp_mode", "LP_MODES", "LP_MAX_INPUTS", "LP_MAX_HIDDEN"]

LP_MODES = ("off", "splits", "all")
"""``off``: no LP; ``splits``: tighten the parts that have neuron splits, from the first layer at or after the
earliest split that has unstable neurons (the root and split-free parts keep the layer-bound method's bounds);
``all``: every part, every hidden layer after the first."""
LP_MAX_INPUTS = 64
LP_MAX_HIDDEN = 512
"""The default mode is ``splits`` for ReLU-family networks with at most ``LP_MAX_INPUTS`` inputs and
``LP_MAX_HIDDEN`` hidden neurons (measured on the 16- and 32-input recipes of ``benchmarks/bench_bab.py``; the
LPs grow with both, two per unstable neuron per part)."""


def resolve_lp_mode(mode, alphas, network) -> str:
    """The mode for :class:`~recurjac_scale.bab.parts.BabProblem`: ``None`` is the default above; ``off`` for
    networks that are not ReLU family (``alphas is None``); :class:`InputError` for an unknown name."""
    if mode is None:
        hidden = sum(int(w.shape[0]) for w in network.weights[:-1])
        small = network.n_inputs <= LP_MAX_INPUTS and hidden <= LP_MAX_HIDDEN
        return "splits" if alphas is not None and small else "off"
    s = str(mode).strip().lower()
    if s not in LP_MODES:
        raise InputError(f"lp_tighten={mode!r}; accepted: {', '.join(LP_MODES)}")
    return s if alphas is not None else "off"


def certified_max(c, A_ub, b_ub, A_eq, b_eq, lo, hi, lam, mu) -> float:
    """Certified upper bound of ``max c.y`` over ``{y : lo <= y <= hi, A_ub y <= b_ub, A_eq y = b_eq}`` (real
    arithmetic on the given float data) from multipliers ``lam`` (clipped to >= 0) and ``mu``; ``inf`` if they are
    not finite.

    Parameters
    ----------
    c : ndarray, shape (n,)
    A_ub : ndarray, shape (m, n); b_ub : ndarray, shape (m,)
    A_eq : ndarray, shape (e, n); b_eq : ndarray, shape (e,)
    lo, hi : ndarray, shape (n,)
        Finite variable bounds.
    lam : ndarray, shape (m,); mu : ndarray, shape (e,)

    Returns
    -------
    float
        ``sum_i max(r_i lo_i, r_i hi_i) + lam.b_ub + mu.b_eq`` plus ``4 gamma(m + e + n + 2)`` times the magnitude
        sum ``(|c| + |A_ub|^T lam + |A_eq|^T |mu|).max(|lo|, |hi|) + lam.|b_ub| + |mu|.|b_eq|`` (the rounding of
        ``r``, of the products and of the sums) plus an underflow allowance.
    """
    lam = np.maximum(np.asarray(lam, np.float64), 0.0)
    mu = np.asarray(mu, np.float64)
    if not (np.isfinite(lam).all() and np.isfinite(mu).all()):
        return np.inf
    ymag = np.maximum(np.abs(lo), np.abs(hi))
    n = A_ub.shape[0] + A_eq.shape[0] + lo.shape[0] + 2
    with np.errstate(over="ignore", invalid="ignore"):  # huge multipliers: an infinite or NaN result, no bound
        r = c - A_ub.T @ lam - A_eq.T @ mu
        val = float(np.maximum(r * lo, r * hi).sum() + lam @ b_ub + mu @ b_eq)
        mag = float((np.abs(c) + np.abs(A_ub).T @ lam + np.abs(A_eq).T @ np.abs(mu)) @ ymag
                    + lam @ np.abs(b_ub) + np.abs(mu) @ np.abs(b_eq))
        out = val + 4.0 * gamma(n) * mag + 4.0 * n * TINY * (1.0 + float(ymag.max(initial=0.0)))
    return out if np.isfinite(out) else np.inf


def _act_outward(alpha, v, toward):
    """The activation ``max(v, alpha v)`` (alpha <= 1) of each float ``v``, its real product rounded toward
    ``toward`` (``-inf``: a float <= the real value; ``inf``: >=)."""
    if alpha == 0.0:
        return np.maximum(v, 0.0)
    return np.where(v >= 0, v, np.nextafter(alpha * v, toward))


def _build(ws, bs, box_lo, box_hi, lower, upper, alphas, K):
    """The LP data of layer ``K`` (module docstring): (A_ub, b_ub, A_eq, b_eq, lo, hi, offset of z_K)."""
    sizes = [box_lo.shape[0]]
    for k in range(K):
        sizes += [ws[k].shape[0], ws[k].shape[0]]
    sizes.append(ws[K].shape[0])
    offs = np.concatenate([[0], np.cumsum(sizes)])
    n = int(offs[-1])
    lo = np.empty(n)
    hi = np.empty(n)
    lo[: sizes[0]], hi[: sizes[0]] = box_lo, box_hi
    eq_rows, eq_rhs, ub_rows, ub_rhs = [], [], [], []
    prev = (0, sizes[0])  # columns of h_{k-1}
    for k in range(K + 1):
        zo = int(offs[1 + 2 * k])
        nk = ws[k].shape[0]
        l, u = lower[k], upper[k]
        lo[zo:zo + nk], hi[zo:zo + nk] = l, u
        E = np.zeros((nk, n))
        E[:, zo:zo + nk] = np.eye(nk)
        E[:, prev[0]:prev[1]] = -ws[k]
        eq_rows.append(E)
        eq_rhs.append(bs[k])
        if k == K:
            break
        ho = zo + nk
        a = alphas[k]
        lo[ho:ho + nk], hi[ho:ho + nk] = _act_outward(a, l, -np.inf), _act_outward(a, u, np.inf)
        act = l >= 0
        ina = (u <= 0) & ~act
        uns = ~act & ~ina
        for mask, coef in ((act, 1.0), (ina, a)):
            idx = np.flatnonzero(mask)
            if idx.size:
                R = np.zeros((idx.size, n))
                R[np.arange(idx.size), ho + idx] = 1.0
                R[np.arange(idx.size), zo + idx] = -coef
                eq_rows.append(R)
                eq_rhs.append(np.zeros(idx.size))
        idx = np.flatnonzero(uns)
        m = idx.size
        if m:
            li, ui = l[idx], u[idx]
            rr = np.arange(m)
            R = np.zeros((3 * m, n))
            R[rr, zo + idx], R[rr, ho + idx] = 1.0, -1.0  # z - h <= 0
            R[m + rr, zo + idx], R[m + rr, ho + idx] = a, -1.0  # alpha z - h <= 0
            R[2 * m + rr, ho + idx] = ui - li
            R[2 * m + rr, zo + idx] = -(ui - a * li)
            rhs3 = ui * li * (a - 1.0)
            hmag = np.maximum(np.abs(ui), np.abs(a * li))
            zmag = np.maximum(np.abs(ui), np.abs(li))
            allow = gamma(8) * ((np.abs(ui) + np.abs(li)) * hmag + (np.abs(ui) + np.abs(a * li)) * zmag
                                + np.abs(ui * li) * (1.0 + abs(a))) + 8 * TINY
            ub_rows.append(R)
            ub_rhs.append(np.concatenate([np.zeros(2 * m), rhs3 + allow]))
        prev = (ho, ho + nk)
    A_ub = np.vstack(ub_rows) if ub_rows else np.zeros((0, n))
    b_ub = np.concatenate(ub_rhs) if ub_rhs else np.zeros(0)
    return A_ub, b_ub, np.vstack(eq_rows), np.concatenate(eq_rhs), lo, hi, int(offs[1 + 2 * K])


def _highs_core():
    """scipy's bundled HiGHS binding (a private module: ``None`` when a scipy version lays it out otherwise; the
    LPs are then solved by :func:`scipy.optimize.linprog`, without warm starts)."""
    try:
        from scipy.optimize._highspy import _core
    except ImportError:  # pragma: no cover - other scipy layouts
        return None
    return _core if hasattr(_core, "_Highs") and hasattr(_core, "HighsLp") else None


class _Session:
    """One LP's constraints with a changing objective, solved by HiGHS warm-started from the previous basis
    (scipy's bundled HiGHS binding when it is there, else :func:`scipy.optimize.linprog` from scratch)."""

    def __init__(self, A_ub, b_ub, A_eq, b_eq, lo, hi):
        self.data = (A_ub, b_ub, A_eq, b_eq, lo, hi)
        self.m = A_ub.shape[0]
        highs = _highs_core()
        if highs is None:
            self.h = None
            return
        import scipy.sparse as sp

        A = sp.csc_matrix(np.vstack([A_ub, A_eq]))
        lp = highs.HighsLp()
        lp.num_col_, lp.num_row_ = A.shape[1], A.shape[0]
        lp.a_matrix_.num_col_, lp.a_matrix_.num_row_ = A.shape[1], A.shape[0]
        lp.a_matrix_.format_ = highs.MatrixFormat.kColwise
        lp.col_cost_ = np.zeros(A.shape[1])
        lp.col_lower_, lp.col_upper_ = lo, hi
        lp.row_lower_ = np.concatenate([np.full(self.m, -np.inf), b_eq])
        lp.row_upper_ = np.concatenate([b_ub, b_eq])
        lp.a_matrix_.start_, lp.a_matrix_.index_, lp.a_matrix_.value_ = A.indptr, A.indices, A.data
        self.h = highs._Highs()
        self.h.setOptionValue("output_flag", False)
        self.h.passModel(lp)
        self.optimal, self.infeasible = highs.HighsModelStatus.kOptimal, highs.HighsModelStatus.kInfeasible
        self.col = None

    def set_bounds(self, i: int, lo: float, hi: float) -> None:
        if self.h is not None:
            self.h.changeColBounds(int(i), float(lo), float(hi))

    def maximize(self, i: int, sign: float):
        """``(status, certified max of sign * y_i or None)``; status 0 solved, 2 infeasible, else failed."""
        A_ub, b_ub, A_eq, b_eq, lo, hi = self.data
        c = np.zeros(lo.shape[0])
        c[i] = sign
        if self.h is None:
            from scipy.optimize import linprog

            res = linprog(-c, A_ub=A_ub if self.m else None, b_ub=b_ub if self.m else None, A_eq=A_eq, b_eq=b_eq,
                          bounds=np.column_stack([lo, hi]), method="highs")
            if res.status != 0:
                return res.status, None
            # scipy's marginals are d(min -c.y)/db <= 0 for the <= rows: the multipliers of max c.y are their
            # negatives
            lam = -np.asarray(res.ineqlin.marginals, np.float64) if self.m else np.zeros(0)
            mu = -np.asarray(res.eqlin.marginals, np.float64)
            return 0, certified_max(c, A_ub, b_ub, A_eq, b_eq, lo, hi, lam, mu)
        if self.col is not None:
            self.h.changeColCost(self.col, 0.0)
        self.h.changeColCost(int(i), -float(sign))
        self.col = int(i)
        self.h.run()
        st = self.h.getModelStatus()
        if st == self.infeasible:
            return 2, None
        if st != self.optimal:
            return 1, None
        # HiGHS's row duals are d(min -c.y)/d(row bound), as scipy's marginals
        rd = -np.asarray(self.h.getSolution().row_dual, np.float64)
        return 0, certified_max(c, A_ub, b_ub, A_eq, b_eq, lo, hi, rd[:self.m], rd[self.m:])


def _certified_infeasible(A_ub, b_ub, A_eq, b_eq, lo, hi, fixed: int) -> bool:
    """Whether the system is proved empty: the elastic LP ``min t`` (the inequality rows and the bounds of the
    variables after the first ``fixed`` ones relaxed by ``t``) gives multipliers whose certified maximum of
    ``0.y`` is negative."""
    from scipy.optimize import linprog

    n = lo.shape[0]
    free = np.arange(fixed, n)
    I = np.zeros((free.size, n))
    I[np.arange(free.size), free] = 1.0
    A = np.vstack([A_ub, I, -I])
    b = np.concatenate([b_ub, hi[free], -lo[free]])
    A_el = np.hstack([A, -np.ones((A.shape[0], 1))])
    bounds = np.column_stack([np.concatenate([lo[:fixed], np.full(free.size, -np.inf), [0.0]]),
                              np.concatenate([hi[:fixed], np.full(free.size, np.inf), [np.inf]])])
    cost = np.zeros(n + 1)
    cost[-1] = 1.0
    res = linprog(cost, A_ub=A_el, b_ub=b, A_eq=np.hstack([A_eq, np.zeros((A_eq.shape[0], 1))]), b_eq=b_eq,
                  bounds=bounds, method="highs")
    if res.status != 0 or res.fun <= 0:
        return False
    lam = -np.asarray(res.ineqlin.marginals, np.float64)
    mu = -np.asarray(res.eqlin.marginals, np.float64)
    return certified_max(np.zeros(n), A, b, A_eq, b_eq, lo, hi, lam, mu) < 0.0


def tighten_bounds(network, box_lo, box_hi, lower, upper, alphas, *, first_layer: int = 1):
    """Certified LP tightening of the unstable neurons' bounds of hidden layers ``first_layer .. H-2`` (module
    docstring).

    Parameters
    ----------
    network : Network
        In-memory float64 network whose hidden layers are ReLU family (``alphas``).
    box_lo, box_hi : ndarray, shape (n_0,)
        A box containing the part.
    lower, upper : sequence of ndarray
        Certified bounds of every affine layer over the part (the split constraints already clipped in).
    alphas : sequence of float
        Negative-side slopes of the hidden layers.
    first_layer : int
        First hidden layer tightened.

    Returns
    -------
    (lower, upper) : lists of ndarray
        The intersected bounds (same shapes; the output layer's unchanged).  An LP that the solver finds
        infeasible without a certificate passing stops the tightening (the bounds so far are returned).

    Raises
    ------
    EmptyRegionError
        When an LP (or the intersection of certified bounds) proves the part empty.
    """
    ws = [np.asarray(w, np.float64) for w in network.weights]
    bs = [np.asarray(b, np.float64) for b in network.biases]
    lower = [np.array(v, np.float64) for v in lower]
    upper = [np.array(v, np.float64) for v in upper]
    box_lo, box_hi = np.asarray(box_lo, np.float64), np.asarray(box_hi, np.float64)
    if not all(np.isfinite(v).all() for v in (*lower[:-1], *upper[:-1], box_lo, box_hi)):
        return lower, upper
    for K in range(first_layer, len(ws) - 1):
        l, u = lower[K], upper[K]
        cand = np.flatnonzero((l < 0) & (u > 0))
        if cand.size == 0:
            continue
        A_ub, b_ub, A_eq, b_eq, lo, hi, zo = _build(ws, bs, box_lo, box_hi, lower, upper, alphas, K)
        session = _Session(A_ub, b_ub, A_eq, b_eq, lo, hi)
        for j in cand:
            for sign in (1.0, -1.0):
                status, val = session.maximize(zo + j, sign)
                if status == 2:
                    if _certified_infeasible(A_ub, b_ub, A_eq, b_eq, lo, hi, box_lo.shape[0]):
                        raise EmptyRegionError(f"LP: the part is empty (layer {K}, neuron {j})")
                    return lower, upper
                if val is None:
                    continue
                if sign > 0:
                    u[j] = min(u[j], val)
                else:
                    l[j] = max(l[j], -val)
                if l[j] > u[j]:
                    raise EmptyRegionError(f"LP: the part is empty (layer {K}, neuron {j})")
                lo[zo + j], hi[zo + j] = l[j], u[j]
                session.set_bounds(zo + j, l[j], u[j])
                if status == 0 and (l[j] >= 0 or u[j] <= 0):
                    break
    return lower, upper
