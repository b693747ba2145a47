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

__all__ = ["plane_step", "lines_step", "relax_step"]


@numba.njit(nogil=True, cache=True)
def plane_step(Lam, cgU, caU, ccU, cgL, caL, ccL, ymax, vnext, kappa, mu, term, ey, ek):  # pragma: no cover
    """The planes of ``y = a g`` on the coefficients ``Lam`` (pass 1 of one layer).

    Parameters
    ----------
    Lam : ndarray, shape (K, d)
        Coefficients on ``y(k)``.
    cgU, caU, ccU, cgL, caL, ccL : ndarray, shape (d,)
        Upper and lower planes ``cg g + ca a + cc``.
    ymax, vnext : ndarray, shape (d,)
        Magnitudes for the allowances (``|y(k)|`` and of the products of ``g(k)``).
    kappa, mu : ndarray, shape (K, d)
        Out: coefficients on ``g(k)`` and on ``a(k)`` (the upper plane where ``Lam > 0``, the lower where ``< 0``).
    term, ey, ek : ndarray, shape (K,)
        Out: the constants ``sum Lam cc``, ``sum |Lam| ymax`` and ``sum |kappa| vnext``.
    """
    K, d = Lam.shape
    for q in range(K):
        t = 0.0
        sy = 0.0
        sk = 0.0
        for j in range(d):
            L = Lam[q, j]
            if L > 0.0:
                kp = L * cgU[j]
                mu[q, j] = L * caU[j]
                t += L * ccU[j]
            elif L < 0.0:
                kp = L * cgL[j]
                mu[q, j] = L * caL[j]
                t += L * ccL[j]
            elif L == 0.0:
                kp = 0.0
                mu[q, j] = 0.0
            else:  # NaN
                kp = L
                mu[q, j] = L
                t += L
            kappa[q, j] = kp
            sy += abs(L) * ymax[j]
            sk += abs(kp) * vnext[j]
        term[q] = t
        ey[q] = sy
        ek[q] = sk


@numba.njit(nogil=True, cache=True)
def lines_step(mu, S_up, S_low, T_up, T_low, w, write, nu, term, e):  # pragma: no cover
    """The lines of ``sigma'`` on the coefficients ``mu`` on ``a(k)``: ``nu`` on ``z(k)`` (the upper line where
    ``mu > 0``), the constants ``term = sum mu t`` and ``e = sum |mu| w``; returns the number of non-zero entries of
    ``nu`` (shapes as :func:`plane_step`).  With ``write`` false (constant lines: ``S_up = S_low = 0``) ``nu`` is
    not touched (it may be a ``(0, 0)`` array)."""
    K, d = mu.shape
    nnz = 0
    for q in range(K):
        t = 0.0
        s = 0.0
        for j in range(d):
            m = mu[q, j]
            if m > 0.0:
                v = m * S_up[j]
                t += m * T_up[j]
            elif m < 0.0:
                v = m * S_low[j]
                t += m * T_low[j]
            elif m == 0.0:
                v = 0.0
            else:  # NaN
                v = m
                t += m
            if write:
                nu[q, j] = v
                if v != 0.0:
                    nnz += 1
            s += abs(m) * w[j]
        term[q] = t
        e[q] = s
    return nnz


@numba.njit(nogil=True, cache=True)
def relax_step(Hc, pos, nu, has_nu, a_up, a_low, b_up, b_low, r_up, r_low, zmax, bnext, wnext, act,
               Gact, out):  # pragma: no cover
    """One relaxation of ``sigma`` in the network pass, from the coefficients on ``h(k-1)`` to those on ``z(k-1)``.

    Parameters
    ----------
    Hc : ndarray, shape (K, n_kept)
        Coefficients on the kept neurons of ``h(k-1)`` (the GEMM's output).
    pos : ndarray of int64, shape (n,)
        Column of ``Hc`` of every neuron, ``-1`` where the coefficient is zero (relaxation = the zero line).
    nu : ndarray, shape (K, n)
        Coefficients on ``z(k-1)`` from the lines of ``sigma'`` (read only when ``has_nu``).
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
            if has_nu:
                g += nu[q, j]
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
