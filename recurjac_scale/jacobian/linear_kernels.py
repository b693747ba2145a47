"""Numba kernels of the ``linear-jacobian`` propagation (:mod:`recurjac_scale.jacobian.linear`).

Each kernel is one pass over a ``(K, d)`` coefficient matrix (one row per objective) that does what would otherwise
be a dozen numpy passes: split the coefficients by sign, apply the relaxation chosen by the sign, and accumulate the
per-row constants and rounding-allowance sums.  The GEMMs stay with BLAS.

Every sum runs in a fixed sequential order over the columns (``@numba.njit(nogil=True, cache=True)``, never
``fastmath``, never ``parallel``): a sum of ``n`` products has the error bound ``gamma(n)`` that the allowances of
:mod:`recurjac_scale.jacobian.linear` charge.  A coefficient that is NaN (an overflow upstream) is passed through
into every output it touches, so that the caller turns the bound into ``+inf`` instead of dropping the term.
"""

from __future__ import annotations

import numba
import numpy as np

__all__ = ["plane_lines_step", "relax_step"]


@numba.njit(nogil=True, cache=True)
def plane_lines_step(Lam, cgU, caU, ccU, cgL, caL, ccL, ymax, vnext, S_up, S_low, T_up, T_low, w, slot,
                     kappa, nus, term, ey, ek, lterm, le, nnz):  # pragma: no cover
    """Pass 1 of one layer: the planes of ``y = a g`` on the coefficients ``Lam``, then, for every variant ``v``,
    the lines of ``sigma'`` on the resulting coefficients ``mu`` on ``a(k)`` (``mu`` itself is not stored).

    Parameters
    ----------
    Lam : ndarray, shape (K, d)
        Coefficients on ``y(k)``.
    cgU, caU, ccU, cgL, caL, ccL : ndarray, shape (d,)
        Upper and lower planes ``cg g + ca a + cc`` (the upper plane where ``Lam > 0``, the lower where ``< 0``).
    ymax, vnext : ndarray, shape (d,)
        Magnitudes for the allowances (``|y(k)|`` and of the products of ``g(k)``).
    S_up, S_low, T_up, T_low, w : ndarray, shape (V, d)
        Per variant, the lines ``s z + t`` of ``sigma'`` (upper where ``mu > 0``) and the allowance magnitude.
    slot : ndarray of int64, shape (V,)
        Where variant ``v`` writes its coefficients on ``z(k)`` in ``nus`` (``-1``: not written; constant lines).
    kappa : ndarray, shape (K, d)
        Out: coefficients on ``g(k)``.
    nus : ndarray, shape (n_slots, K, d)
        Out: coefficients on ``z(k)``, ``nus[slot[v], q, j] = mu[q, j] s(v)[j]``.
    term, ey, ek : ndarray, shape (K,)
        Out: ``sum Lam cc``, ``sum |Lam| ymax``, ``sum |kappa| vnext``.
    lterm, le : ndarray, shape (V, K)
        Out: per variant ``sum mu t`` and ``sum |mu| w``.
    nnz : ndarray of int64, shape (V,)
        In/out: incremented by the number of non-zero coefficients written per variant.
    """
    if _all_finite(cgU, caU, ccU, cgL, caL, ccL) and _all_finite2(S_up, S_low, T_up, T_low, w):
        _plane_lines_finite(Lam, cgU, caU, ccU, cgL, caL, ccL, ymax, vnext, S_up, S_low, T_up, T_low, w, slot,
                            kappa, nus, term, ey, ek, lterm, le, nnz)
    else:
        _plane_lines_rows(Lam, cgU, caU, ccU, cgL, caL, ccL, ymax, vnext, S_up, S_low, T_up, T_low, w, slot,
                          kappa, nus, term, ey, ek, lterm, le, nnz, 0, Lam.shape[0])


@numba.njit(nogil=True, cache=True)
def _plane_lines_rows(Lam, cgU, caU, ccU, cgL, caL, ccL, ymax, vnext, S_up, S_low, T_up, T_low, w, slot,
                      kappa, nus, term, ey, ek, lterm, le, nnz, q0, q1):  # pragma: no cover
    """:func:`plane_lines_step` on the rows ``q0 .. q1 - 1``, with a branch per sign (NaN carried)."""
    d = Lam.shape[1]
    V = slot.size
    lt = np.zeros(V)
    lw = np.zeros(V)
    for q in range(q0, q1):
        t = 0.0
        sy = 0.0
        sk = 0.0
        for v in range(V):
            lt[v] = 0.0
            lw[v] = 0.0
        for j in range(d):
            L = Lam[q, j]
            if L > 0.0:
                kp = L * cgU[j]
                m = L * caU[j]
                t += L * ccU[j]
            elif L < 0.0:
                kp = L * cgL[j]
                m = L * caL[j]
                t += L * ccL[j]
            elif L == 0.0:
                kp = 0.0
                m = 0.0
            else:  # NaN
                kp = L
                m = L
                t += L
            kappa[q, j] = kp
            sy += abs(L) * ymax[j]
            sk += abs(kp) * vnext[j]
            am = abs(m)
            if m > 0.0 or m < 0.0:  # the upper lines of sigma' for a positive coefficient, the lower ones else
                S = S_up if m > 0.0 else S_low
                T = T_up if m > 0.0 else T_low
                for v in range(V):
                    nv = m * S[v, j]
                    lt[v] += m * T[v, j]
                    lw[v] += am * w[v, j]
                    sl = slot[v]
                    if sl >= 0:
                        nus[sl, q, j] = nv
                        if nv != 0.0:
                            nnz[v] += 1
            elif m == 0.0:
                for v in range(V):
                    # lw[v] += 0 * w[v, j] leaves the sum unchanged unless w is infinite (then NaN, as before)
                    lw[v] += am * w[v, j]
                    sl = slot[v]
                    if sl >= 0:
                        nus[sl, q, j] = 0.0
            else:  # NaN
                for v in range(V):
                    lt[v] += m
                    lw[v] += am * w[v, j]
                    sl = slot[v]
                    if sl >= 0:
                        nus[sl, q, j] = m
                        nnz[v] += 1
        term[q] = t
        ey[q] = sy
        ek[q] = sk
        for v in range(V):
            lterm[v, q] = lt[v]
            le[v, q] = lw[v]


@numba.njit(nogil=True, cache=True)
def _all_finite(a, b, c, d, e, f):  # pragma: no cover
    for arr in (a, b, c, d, e, f):
        for j in range(arr.size):
            if not np.isfinite(arr[j]):
                return False
    return True


@numba.njit(nogil=True, cache=True)
def _all_finite2(a, b, c, d, e):  # pragma: no cover
    for arr in (a, b, c, d, e):
        for v in range(arr.shape[0]):
            for j in range(arr.shape[1]):
                if not np.isfinite(arr[v, j]):
                    return False
    return True


@numba.njit(nogil=True, cache=True)
def _plane_lines_finite(Lam, cgU, caU, ccU, cgL, caL, ccL, ymax, vnext, S_up, S_low, T_up, T_low, w, slot,
                        kappa, nus, term, ey, ek, lterm, le, nnz):  # pragma: no cover
    """:func:`plane_lines_step` when every plane, line and magnitude is finite: the sign choices as selects (the
    other side's product is an exact zero, so every coefficient and sum is the same as the branchy form's, up to
    the sign of zero); a NaN coefficient takes the branchy path of its row."""
    K, d = Lam.shape
    V = slot.size
    lt = np.zeros(V)
    lw = np.zeros(V)
    cnt = np.zeros(V, dtype=np.int64)
    for q in range(K):
        t = 0.0
        sy = 0.0
        sk = 0.0
        for v in range(V):
            lt[v] = 0.0
            lw[v] = 0.0
            cnt[v] = 0
        nan = False
        for j in range(d):
            L = Lam[q, j]
            if L != L:
                nan = True
                break
            Lp = L if L > 0.0 else 0.0
            Ln = L if L < 0.0 else 0.0
            kp = Lp * cgU[j] + Ln * cgL[j]
            m = Lp * caU[j] + Ln * caL[j]
            t += Lp * ccU[j] + Ln * ccL[j]
            kappa[q, j] = kp
            sy += abs(L) * ymax[j]
            sk += abs(kp) * vnext[j]
            am = abs(m)
            mp = m if m > 0.0 else 0.0
            mn = m if m < 0.0 else 0.0
            for v in range(V):
                nv = mp * S_up[v, j] + mn * S_low[v, j]
                lt[v] += mp * T_up[v, j] + mn * T_low[v, j]
                lw[v] += am * w[v, j]
                sl = slot[v]
                if sl >= 0:
                    nus[sl, q, j] = nv
                    cnt[v] += nv != 0.0
        if nan:  # redo the row with the NaN-carrying branches
            _plane_lines_rows(Lam, cgU, caU, ccU, cgL, caL, ccL, ymax, vnext, S_up, S_low, T_up, T_low, w, slot,
                              kappa, nus, term, ey, ek, lterm, le, nnz, q, q + 1)
            continue
        term[q] = t
        ey[q] = sy
        ek[q] = sk
        for v in range(V):
            lterm[v, q] = lt[v]
            le[v, q] = lw[v]
            nnz[v] += cnt[v]


@numba.njit(nogil=True, cache=True)
def relax_step(Hc, pos, nu, nupos, has_nu, a_up, a_low, b_up, b_low, r_up, r_low, zmax, bnext, wnext, act,
               Gact, out):  # pragma: no cover
    """One relaxation of ``sigma`` in the network pass, from the coefficients on ``h(k-1)`` to those on ``z(k-1)``.

    Parameters
    ----------
    Hc : ndarray, shape (K, n_kept)
        Coefficients on the kept neurons of ``h(k-1)`` (the GEMM's output).
    pos : ndarray of int64, shape (n,)
        Column of ``Hc`` of every neuron, ``-1`` where the coefficient is zero (relaxation = the zero line).
    nu : ndarray, shape (K, n_nu)
        Coefficients on ``z(k-1)`` from the lines of ``sigma'`` (read only when ``has_nu``).
    nupos : ndarray of int64, shape (n,)
        Column of ``nu`` of every neuron, ``-1`` where its coefficient is zero.
    a_up, a_low, b_up, b_low : ndarray, shape (n,)
        CROWN's lines of ``sigma`` (upper where the coefficient is positive).
    r_up, r_low, zmax : ndarray, shape (n,)
        Magnitudes for the allowances of the relaxation and of the addition of ``nu``.
    bnext, wnext : ndarray, shape (n,)
        The bias of layer ``k - 1`` and the magnitude of its affine step (for the next step's terms).
    act : ndarray of int64, shape (n_act,)
        The columns that the next GEMM reads.
    Gact : ndarray, shape (K, n_act)
        Out: the new coefficients ``Gam`` on ``z(k-1)`` at ``act``.
    out : ndarray, shape (5, K)
        Out: ``sum Hc b`` (relaxation constants), ``sum |Hc| r`` (relaxation allowance), ``sum |Gam| zmax``,
        ``sum Gam bnext`` and ``sum |Gam| wnext``.
    """
    K = Hc.shape[0]
    n = pos.size
    row = np.empty(n)
    for q in range(K):
        t = 0.0
        er = 0.0
        ez = 0.0
        tb = 0.0
        ew = 0.0
        for j in range(n):
            p = pos[j]
            h = Hc[q, p] if p >= 0 else 0.0
            if h > 0.0:
                g = h * a_up[j]
                t += h * b_up[j]
                er += h * r_up[j]
            elif h < 0.0:
                g = h * a_low[j]
                t += h * b_low[j]
                er -= h * r_low[j]
            elif h == 0.0:
                g = 0.0
            else:  # NaN
                g = h
                t += h
                er += h
            if has_nu and nupos[j] >= 0:
                g += nu[q, nupos[j]]
            row[j] = g
            ez += abs(g) * zmax[j]
            tb += g * bnext[j]
            ew += abs(g) * wnext[j]
        for i in range(act.size):
            Gact[q, i] = row[act[i]]
        out[0, q] = t
        out[1, q] = er
        out[2, q] = ez
        out[3, q] = tb
        out[4, q] = ew
