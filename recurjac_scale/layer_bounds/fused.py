"""The back-substitution chains of :mod:`recurjac_scale.layer_bounds.backsub`, fused: one pass over the coefficient
matrix per relaxation step, one chain for both bounds of a linear relaxation, no work on dead neurons, and the
first affine step shared by every chain of a block of target neurons.

Same products, same allowances as :func:`~recurjac_scale.layer_bounds.backsub._chain_upper` (whose module
docstring has the rounding argument), so the bounds are certified in the same sense and agree with the plain
chains up to the order of summation; what changes is the memory traffic and the number of GEMM flops:

* **One pass per relaxation step.**  The plain numpy step reads and writes the ``(r, n_k)`` coefficient matrix
  about twenty times (positive and negative parts, the two intercept products, the two allowance products, the
  products with the slopes, the cast, the bias product, the absolute value).  :func:`_relax_rows` does it in one
  read of ``Lam`` and one write of ``Lam_z``.  Every product it forms is the one numpy forms (``Lam_z`` is
  bitwise the same matrix); only the order in which the per-row sums add their terms differs, which every
  allowance already covers (a length-``n`` dot product in any order errs by at most ``gamma(n) * sum |terms|``).
* **Merged chains for linear relaxations.**  When a layer's lower and upper slopes are equal on every neuron
  (Fast-Lin's parallel lines, stable ReLU neurons, identity layers), the relaxation step maps ``Lam`` to
  ``Lam D(a)`` whatever the signs, so the chain started from ``-W[t][R, :]`` (the lower bound) holds exactly
  ``-Lam`` at every level: negation commutes with every rounding.  One chain then serves both bounds; only the
  intercept and allowance sums, which depend on the signs, are formed for both sides (:func:`_relax_rows` does
  both in its single pass).  This halves Fast-Lin's GEMMs.
* **Void neurons dropped from both sides of every GEMM.**  A neuron whose relaxation is the zero line on both
  sides (a dead ReLU: ``h = 0`` on its interval) contributes nothing to any chain: the plain chain already skips
  its row of ``W[k]``; the fused chain also skips its column of ``W[k+1]``, i.e. it never forms the coefficient
  that would multiply it.  Both the intercept sums and the allowances of a void neuron are exactly 0, so nothing
  else changes; on ReLU networks with half the neurons dead this removes about half of every GEMM but the first
  layer's.
* **First affine step shared by all chains** of a target block (:func:`block_bounds`): CROWN's upper and lower
  chains and Fast-Lin's chain all start from ``+-W[t][R, :]`` and relax layer ``t - 1`` with the same line on
  its stable neurons, so that part of the first GEMM is formed once.

All of this is used only when the intercepts, allowances and biases of every layer of the chain are finite;
otherwise (unbounded regions, ``eps = inf``) the caller runs the plain numpy chain, which handles infinities.
"""

from __future__ import annotations

import math
from typing import Sequence

import numba
import numpy as np

from .._fp import TINY, gamma
from .base import Region

__all__ = ["block_bounds", "affine_gamma"]


def affine_gamma(n_in: int, n_out: int, dtype) -> float:
    """``gamma`` of the affine step through a ``(n_out, n_in)`` weight matrix: its dot products (the GEMM
    ``Lam_z @ W`` and the bias term ``Lam_z . b``) have ``n_out`` terms; ``n_in`` is kept as a floor."""
    return gamma(max(n_in, n_out) + 2, dtype)


class _Chain:
    """One back-substitution chain for a block of rows: the coefficient matrix and, per side, the running
    constant, the sum of its terms' magnitudes and the allowance (all float64, shape (rows,))."""

    def __init__(self, lam: np.ndarray, c: np.ndarray, both: bool):
        self.lam, self.both = lam, both
        self.c_up = np.array(c, dtype=np.float64)
        self.cabs_up = np.abs(self.c_up)
        self.slack_up = np.zeros(lam.shape[0])
        self.c_lo = -self.c_up
        self.cabs_lo = self.cabs_up.copy()
        self.slack_lo = np.zeros(lam.shape[0])

    def relax(self, L, bias: np.ndarray, aff: np.ndarray, g_k: float, g_a: float, dtype) -> np.ndarray:
        """Relaxation step through layer ``L`` (one kernel pass); ``self.lam`` holds the columns of ``L.kept``.
        Returns ``Lam_z`` on ``L.active``."""
        rows = self.lam.shape[0]
        lam_z = np.empty((rows, L.active.size), dtype=dtype)
        sums = np.empty((rows, 6))
        _relax_rows(self.lam, L.act_pos, *L.vec_kept, bias, aff, lam_z, sums)
        self.c_up += sums[:, 0]
        self.cabs_up += np.abs(sums[:, 0])
        self.c_up += sums[:, 4]
        self.cabs_up += np.abs(sums[:, 4])
        self.slack_up += g_k * sums[:, 1] + (g_a * sums[:, 5] + L.underflow_err)
        if self.both:
            self.c_lo += sums[:, 2]
            self.cabs_lo += np.abs(sums[:, 2])
            self.c_lo -= sums[:, 4]
            self.cabs_lo += np.abs(sums[:, 4])
            self.slack_lo += g_k * sums[:, 3] + (g_a * sums[:, 5] + L.underflow_err)
        return lam_z

    def finish(self, t: int, region: Region, dtype, concretise, g_c: float | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """Concretise: the upper bounds of the rows, and the lower bounds (``-upper`` of the negated chain when
        ``both``, else the lower half of the stacked rows ``[W; -W]``).  ``g_c``: ``gamma`` of the running
        intercept sum (default: two terms per level, ``gamma(2 t + 4)``)."""
        lam64 = self.lam if self.lam.dtype == np.float64 else self.lam.astype(np.float64)
        lo, hi = region.box
        g0 = gamma(lam64.shape[1] + 2, dtype)
        g_c = gamma(2 * t + 4) if g_c is None else g_c
        if region.p == math.inf and np.isfinite(lo).all() and np.isfinite(hi).all():
            # the l-inf box: one pass over the coefficients gives the sups of both lam x and -lam x
            s_up, s_neg = box_sups(lam64, lo, hi, g0)
        else:
            s_up = concretise(lam64, region, lo, hi, g0)
            s_neg = concretise(-lam64, region, lo, hi, g0) if self.both else None

        def sup(cc, cabs, slack, s):
            with np.errstate(invalid="ignore"):
                out = (cc + s) + (slack + g_c * (cabs + np.abs(s)) + TINY)
            return np.where(np.isnan(out), np.inf, out)

        upper = sup(self.c_up, self.cabs_up, self.slack_up, s_up)
        if self.both:
            return upper, -sup(self.c_lo, self.cabs_lo, self.slack_lo, s_neg)
        r = upper.shape[0] // 2
        return upper[:r], -upper[r:]


def box_sups(lam: np.ndarray, lo: np.ndarray, hi: np.ndarray, g: float) -> tuple[np.ndarray, np.ndarray]:
    """Certified ``max_{lo <= x <= hi} lam x`` and ``max (-lam) x`` per row (finite box, float64 ``lam`` of shape
    (r, n)), as ``backsub._concretise_upper`` computes the first (midpoint-radius: ``lam mid + |lam| rad``, plus
    ``g |lam| (|mid| + rad)`` for the rounding of the sums, ``g = gamma(n + 2)`` covering any order of
    summation), in one pass over ``lam`` (:func:`_box_sums`)."""
    mid = 0.5 * lo + 0.5 * hi
    rad = 0.5 * (hi - lo)
    sums = np.empty((lam.shape[0], 3))
    _box_sums(lam, np.ascontiguousarray(mid), np.ascontiguousarray(rad), np.abs(mid) + rad, sums)
    common = sums[:, 1] + g * sums[:, 2] + TINY
    return (sums[:, 0] + common), (-sums[:, 0] + common)


def block_bounds(
    w_rows: np.ndarray,
    b_rows: np.ndarray,
    t: int,
    wd: Sequence[np.ndarray],
    bs: Sequence[np.ndarray],
    variants: Sequence[tuple[Sequence, Sequence[np.ndarray]]],
    region: Region,
    dtype,
    concretise,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Certified (upper, lower) bounds of ``z(t)[R] = w_rows @ h(t-1) + b_rows`` for several relaxations at once.

    Each variant is a chain: one shared by both bounds when every layer below ``t`` is linear
    (``a_low == a_up``), else the upper and lower chains stacked as rows ``[W; -W]``.  The first affine step is
    shared by all of them: on the neurons of layer ``t - 1`` whose relaxation is the same line ``a z + b`` in
    every variant (stable ReLU neurons), every chain holds ``+-(W[t][R, j] a_j)`` (bitwise), so
    ``Lam_z @ W[t-1] = +-(base @ W[t-1][S]) + Lam_z[:, U] @ W[t-1][U]`` with one GEMM over ``S`` for all chains
    and one small GEMM per chain over its other neurons ``U``.  That is the same sum of the same products in
    another order, so the affine allowance is unchanged (``gamma`` of a dot product holds for any order).

    Parameters
    ----------
    w_rows : ndarray, shape (r, n_{t-1}), float64;  b_rows : ndarray, shape (r,), float64
    t : int
        Target layer (0-based index into the weights), ``t >= 1``.
    wd, bs : weights in the working dtype, biases (float64)
    variants : sequence of (layers, aff_err)
        Per relaxation: its certified layers ``0 .. t-1`` (``backsub._Layer``, all finite) and its affine
        allowance vectors ``|W[k]| hmax(k-1) + |b[k]|`` (finite).
    region : Region
    dtype : working dtype of the GEMMs
    concretise : callable
        ``backsub._concretise_upper``.

    Returns
    -------
    list of (upper, lower), each ndarray of shape (r,), float64, certified
    """
    k = t - 1
    r = w_rows.shape[0]
    chains, lam_zs = [], []
    for layers, aff in variants:
        both = all(L.linear for L in layers[:t])
        L = layers[k]
        w_kept = w_rows[:, L.kept]
        ch = _Chain(w_kept, b_rows, True) if both else _Chain(
            np.concatenate([w_kept, -w_kept]), np.concatenate([b_rows, -b_rows]), False)
        lam_zs.append(ch.relax(L, bs[k][L.active], aff[k][L.active], gamma(w_rows.shape[1] + 2, dtype),
                               affine_gamma(wd[k].shape[1], wd[k].shape[0], dtype), dtype))
        chains.append(ch)
    tops = [layers[k] for layers, _ in variants]
    # output columns of the first GEMM: the kept neurons of layer k - 1 of each variant (all inputs for k = 0)
    outs = [layers[k - 1].kept if k else None for layers, _ in variants]
    shared = tops[0].a_up != 0
    for L in tops:
        shared &= (L.a_up == tops[0].a_up) & (L.a_low == tops[0].a_up) & (L.b_low == L.b_up)
        shared &= (L.b_up == tops[0].b_up)
    S = np.flatnonzero(shared)
    rows_total = sum(ch.lam.shape[0] for ch in chains)
    if S.size and rows_total > r:
        union = None if k == 0 else np.unique(np.concatenate(outs))
        w_s = wd[k][S] if union is None else wd[k][np.ix_(S, union)]
        B = (w_rows[:, S] * tops[0].a_up[S]).astype(dtype, copy=False) @ w_s
        del w_s
        for ch, L, lam_z, cols in zip(chains, tops, lam_zs, outs):
            keep = ~np.isin(L.active, S, assume_unique=True)
            U = L.active[keep]
            Bv = B if union is None or cols.size == union.size else B[:, np.searchsorted(union, cols)]
            signed = Bv if ch.both else np.concatenate([Bv, -Bv])
            if U.size:
                w_u = wd[k][U] if cols is None else wd[k][np.ix_(U, cols)]
                signed = signed + lam_z[:, keep] @ w_u
            ch.lam = signed
    else:
        for ch, L, lam_z in zip(chains, tops, lam_zs):
            ch.lam = lam_z @ L.w_fused
    del lam_zs
    out = []
    for ch, (layers, aff) in zip(chains, variants):
        for j in range(k - 1, -1, -1):
            L = layers[j]
            lam_z = ch.relax(L, bs[j][L.active], aff[j][L.active], gamma(L.zmax.size + 2, dtype),
                             affine_gamma(wd[j].shape[1], wd[j].shape[0], dtype), dtype)
            ch.lam = lam_z @ L.w_fused
        out.append(ch.finish(t, region, dtype, concretise))
    return out


# ---------------------------------------------------------------------------------------------------------------
# numba kernel


@numba.njit(nogil=True, cache=True, inline="always")
def _intercept_terms(x, bu, bl, eu, el):  # pragma: no cover
    """The four sums' terms for one coefficient ``x`` (see :func:`_relax_rows`), and ``x - x`` (NaN when ``x`` is
    not finite).  ``p + q == x`` exactly and one of them is 0, so each pair of products adds exactly."""
    v = np.float64(x)
    p = v if v > 0.0 else 0.0
    q = v - p
    return p * bu + q * bl, p * eu - q * el, -(q * bu + p * bl), p * el - q * eu, v - v


@numba.njit(nogil=True, cache=True)
def _relax_rows(lam, act, a_up, a_low, b_up, b_low, err_up, err_low, bias, aff, lam_z, sums):  # pragma: no cover
    """One relaxation step of the chain, for every row of ``lam``, in one pass.

    Parameters
    ----------
    lam : (r, n) float64 or float32
        Coefficients on ``h(k)``.
    act : (m,) int64
        Neurons that carry coefficients (``a_low != 0`` or ``a_up != 0``).
    a_up, a_low, b_up, b_low, err_up, err_low : (n,) float64, finite
        The layer's relaxation and its allowance vectors ``|a| zmax + |b|``.
    bias, aff : (m,) float64, finite
        ``b[k][act]`` and ``aff_err[k][act]``.
    lam_z : (r, m) working dtype, output
        ``Lam+ a_up + Lam- a_low`` on the active neurons, rounded to the working dtype (bitwise numpy's value).
    sums : (r, 6) float64, output; with ``lp = max(lam, 0)``, ``ln = min(lam, 0)``, ``z = float64(lam_z)``:
        0. ``lp . b_up + ln . b_low``        intercept of the upper chain
        1. ``lp . err_up - ln . err_low``    its relaxation allowance (before ``gamma``)
        2. ``-ln . b_up - lp . b_low``       intercept of the chain of ``-lam``
        3. ``-ln . err_up + lp . err_low``   its relaxation allowance
        4. ``z . bias``                      bias term of the upper chain (the chain of ``-lam`` has ``-z``)
        5. ``|z| . aff``                     affine allowance (before ``gamma``), both chains
    """
    r, n = lam.shape
    m = act.shape[0]
    for i in range(r):
        # two interleaved sets of accumulators (even / odd columns) halve the add latency chain; the order of
        # summation is free (every allowance holds for any order).  ``bad`` is NaN when a coefficient is
        # infinite or NaN (the bound is then void, as in the numpy chain).
        s0 = 0.0
        s1 = 0.0
        s2 = 0.0
        s3 = 0.0
        e0 = 0.0
        e1 = 0.0
        e2 = 0.0
        e3 = 0.0
        bad = 0.0
        for j in range(0, n, 2):
            d0, d1, d2, d3, db = _intercept_terms(lam[i, j], b_up[j], b_low[j], err_up[j], err_low[j])
            s0 += d0
            s1 += d1
            s2 += d2
            s3 += d3
            bad += db
            if j + 1 < n:
                d0, d1, d2, d3, db = _intercept_terms(lam[i, j + 1], b_up[j + 1], b_low[j + 1], err_up[j + 1],
                                                      err_low[j + 1])
                e0 += d0
                e1 += d1
                e2 += d2
                e3 += d3
                bad += db
        s4 = 0.0
        s5 = 0.0
        for jj in range(m):
            j = act[jj]
            v = np.float64(lam[i, j])
            lam_z[i, jj] = v * (a_up[j] if v > 0.0 else a_low[j])
            z = np.float64(lam_z[i, jj])
            s4 += z * bias[jj]
            s5 += abs(z) * aff[jj]
        sums[i, 0] = (s0 + e0) + bad
        sums[i, 1] = (s1 + e1) + bad
        sums[i, 2] = (s2 + e2) + bad
        sums[i, 3] = (s3 + e3) + bad
        sums[i, 4] = s4
        sums[i, 5] = s5


@numba.njit(nogil=True, cache=True)
def _box_sums(lam, mid, rad, mag, out):  # pragma: no cover
    """Per row ``i`` of ``lam`` (r, n): ``out[i] = (lam_i . mid, |lam_i| . rad, |lam_i| . mag)`` (float64, any
    order of summation; NaN or infinite when a coefficient is)."""
    r, n = lam.shape
    for i in range(r):
        s0 = 0.0
        s1 = 0.0
        s2 = 0.0
        for j in range(n):
            v = lam[i, j]
            a = abs(v)
            s0 += v * mid[j]
            s1 += a * rad[j]
            s2 += a * mag[j]
        out[i, 0] = s0
        out[i, 1] = s1
        out[i, 2] = s2
