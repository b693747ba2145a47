"""Numba kernels of the Jacobian bound recursion: fused mask / sign / scale preparation and small reductions.

Only kernels live here (no dask, no zarr, no registries).  The heavy lifting is done by BLAS GEMMs in
:mod:`recurjac_scale.jacobian`; these kernels prepare the GEMM operands in one pass and accumulate the cheap
per-row terms (Term I of Zhang et al. 2019, Eq. 14-15, and the exact top level).

Layout shared by the kernels
----------------------------
The recursion of one (row block x column block) task carries, per level, a matrix ``X`` of shape
``(K, Npad)``: row ``r`` is a neuron of the level, column ``q = (ch * R + j) * c + k`` (for ``q < 2 R c``) is
chain ``ch`` (0 = the upper chain with the merged weights ``Ŵ``, 1 = the lower chain with ``W̃``), row ``j`` of the
block and column ``k`` of the block.  Columns ``q >= 2 R c`` are zero padding (GEMMs run on fixed-width panels so
that results do not depend on the blocking).

Every kernel sums in a fixed, sequential order (no reassociation: ``@numba.njit(nogil=True, cache=True)``, never
``fastmath``, never ``parallel``), so a value computed for one row never depends on the other rows of its block.
"""

from __future__ import annotations

import numba
import numpy as np

__all__ = [
    "prep_level", "top_level", "perrow_abs_matmul", "rowdot_acc", "rowdot_abs_acc", "abs_col_sums",
    "gather_rows", "gather_cols_scaled",
    "exact_dot_rows", "no_add", "ensure_compiled",
]


@numba.njit(nogil=True, cache=True)
def prep_level(X, shared, Lp, Up, Sp, dl, du, R, c, Xp, acc, n_term1, nnz, Xadd, Cl, Cq, err):  # pragma: no cover
    """Term I and the merged-weight operand of one level of Algorithm 1 (Zhang et al. 2019, Eq. 14-19).

    Parameters
    ----------
    X : ndarray, shape (K, Npad), or (K, c) when ``shared``
        The current operand ``V`` of both chains (see the module docstring for the column layout).
    shared : bool
        ``X`` is one ``(K, c)`` operand shared by every row and both chains (the first level of a step).
    Lp, Up : ndarray, shape (R, K)
        Certified bounds ``Lm <= Y <= Um`` of the rows of the block (the earlier step's state), restricted to the
        ``K`` neurons of ``X``.
    Sp : ndarray, shape (R, K)
        Sign slack ``>= 0``: the rounding allowance by which ``Lp`` / ``Up`` were widened.  A neuron whose widened
        lower bound is ``>= -Sp`` (its computed bound was ``>= 0``) is classed ``P``, one whose widened upper bound
        is ``<= Sp`` is classed ``N`` (ALGORITHM.md classifies by the computed bounds; see Notes).
    dl, du : ndarray, shape (K,)
        Derivative bounds ``0 <= dl <= sigma' <= du`` of the level.
    R, c : int
        Rows and columns of the block.
    Xp : ndarray, shape (K, Npad), output
        ``D(a) X+ + D(b) X-`` per chain and row, the right operand of the merged weights (Eq. 17-18):
        upper chain ``a = p du + n dl``, ``b = p dl + n du``; lower chain with ``a`` and ``b`` swapped; zero on
        ``I_j``.  Padding columns are not touched.
    acc : ndarray, shape (2, R, c), in/out
        Term I (Eq. 14-15) is added: upper chain ``du (MI∘Um) X+ + du (MI∘Lm) X-``, lower chain
        ``du (MI∘Lm) X+ + du (MI∘Um) X-``.
    n_term1 : ndarray, shape (R, K), uint8, output
        1 where neuron ``r`` is in ``I_j`` (its row of ``Xp`` is zero for row ``j``: structural sparsity).
    nnz : ndarray, shape (R,), int64, output
        Number of non-zero entries of ``Xp`` per row (both chains); 0 means the row's recursion ends here.
    Xadd : ndarray, shape (K, c) or (0, 0)
        When it has rows: a part shared by every row and both chains, added to ``X`` before anything else
        (``X[r, q] + Xadd[r, k]``, one rounding: the same value as adding it beforehand, without the extra pass).
    Cl, Cq : ndarray, shape (R, K)
        Running-allowance coefficients (:func:`recurjac_scale.jacobian.rounding.level_coefficients`).
    err : ndarray, shape (4, R, c), in/out
        ``err[ch, j, k] += Cl[j, r] |x|`` (rounding of this level, chain ``ch``) and, on the neurons with
        ``dl < du``, ``err[2 + ch, j, k] += Cq[j, r] |x|`` (propagated allowance of the priors), ``x`` the operand
        entry (after ``Xadd``).

    Notes
    -----
    Neuron classes per row ``j`` (ALGORITHM.md): ``E`` if ``dl == du`` (expanded exactly whatever the sign of
    ``Y``), else ``P`` if ``Lm >= -Sp``, else ``N`` if ``Um <= Sp``, else ``I``.

    The slack keeps the classes of ALGORITHM.md, which are decided on the computed (unwidened) bounds: widening an
    exact zero by the rounding allowance would otherwise move a sign-certain neuron into ``I`` and loosen the
    bound (a Term I product instead of the Term II expansion).  It stays sound for any slack: on ``P`` only
    ``Y >= -delta`` with ``delta = max(0, -Lm)`` is certain, and fixing ``sigma'`` by the sign of ``x`` as if
    ``Y >= 0`` then misses the true extreme of ``Y sigma' x`` over ``[dl, du]`` by at most
    ``(du - dl) delta |x|``, which is added outward to both chains (``N`` alike with ``delta = max(0, Um)``).
    ``delta <= Sp``: the correction is of the order of the rounding allowance, and it is dominated by
    ``du |Lm| |x|``, as Term I is (the accounting of :mod:`recurjac_scale.jacobian.rounding` holds).
    """
    K = X.shape[0]
    Rc = R * c
    add = Xadd.shape[0] > 0
    for r in range(K):
        lo = dl[r]
        hi = du[r]
        for j in range(R):
            L = Lp[j, r]
            U = Up[j, r]
            cl = Cl[j, r]
            cq = Cq[j, r]
            qu = j * c
            ql = Rc + j * c
            xu0 = 0 if shared else qu
            xl0 = 0 if shared else ql
            if lo == hi:
                for k in range(c):
                    xu = X[r, xu0 + k]
                    xl = X[r, xl0 + k]
                    if add:
                        xu += Xadd[r, k]
                        xl += Xadd[r, k]
                    Xp[r, qu + k] = hi * xu
                    Xp[r, ql + k] = hi * xl
                    nnz[j] += (Xp[r, qu + k] != 0) + (Xp[r, ql + k] != 0)
                    err[0, j, k] += cl * abs(xu)
                    err[1, j, k] += cl * abs(xl)
            elif L >= -Sp[j, r]:
                dd = (hi - lo) * (-L) if L < 0 else 0.0
                for k in range(c):
                    xu = X[r, xu0 + k]
                    xl = X[r, xl0 + k]
                    if add:
                        xu += Xadd[r, k]
                        xl += Xadd[r, k]
                    Xp[r, qu + k] = hi * xu if xu > 0 else lo * xu
                    Xp[r, ql + k] = lo * xl if xl > 0 else hi * xl
                    nnz[j] += (Xp[r, qu + k] != 0) + (Xp[r, ql + k] != 0)
                    au = abs(xu)
                    al = abs(xl)
                    err[0, j, k] += cl * au
                    err[1, j, k] += cl * al
                    err[2, j, k] += cq * au
                    err[3, j, k] += cq * al
                    if dd > 0:
                        acc[0, j, k] += dd * abs(xu)
                        acc[1, j, k] -= dd * abs(xl)
            elif U <= Sp[j, r]:
                dd = (hi - lo) * U if U > 0 else 0.0
                for k in range(c):
                    xu = X[r, xu0 + k]
                    xl = X[r, xl0 + k]
                    if add:
                        xu += Xadd[r, k]
                        xl += Xadd[r, k]
                    Xp[r, qu + k] = lo * xu if xu > 0 else hi * xu
                    Xp[r, ql + k] = hi * xl if xl > 0 else lo * xl
                    nnz[j] += (Xp[r, qu + k] != 0) + (Xp[r, ql + k] != 0)
                    au = abs(xu)
                    al = abs(xl)
                    err[0, j, k] += cl * au
                    err[1, j, k] += cl * al
                    err[2, j, k] += cq * au
                    err[3, j, k] += cq * al
                    if dd > 0:
                        acc[0, j, k] += dd * abs(xu)
                        acc[1, j, k] -= dd * abs(xl)
            else:
                hU = hi * U
                hL = hi * L
                n_term1[j, r] = 1
                for k in range(c):
                    xu = X[r, xu0 + k]
                    xl = X[r, xl0 + k]
                    if add:
                        xu += Xadd[r, k]
                        xl += Xadd[r, k]
                    Xp[r, qu + k] = 0.0
                    Xp[r, ql + k] = 0.0
                    au = abs(xu)
                    al = abs(xl)
                    err[0, j, k] += cl * au
                    err[1, j, k] += cl * al
                    err[2, j, k] += cq * au
                    err[3, j, k] += cq * al
                    acc[0, j, k] += (hU * xu) if xu > 0 else (hL * xu)
                    acc[1, j, k] += (hL * xl) if xl > 0 else (hU * xl)


@numba.njit(nogil=True, cache=True)
def top_level(X, A, dl, du, R, c, acc, Xadd, Cl, err):  # pragma: no cover - compiled
    """The top level of Algorithm 1, where ``Y = A`` is known exactly (Eq. 10-11), per row of the block.

    Parameters
    ----------
    X : ndarray, shape (K, Npad)
        The operand of both chains at level 1 (module docstring layout).
    A : ndarray, shape (R, K)
        The exact top rows ``M_0[rows]`` restricted to the ``K`` neurons of ``X``.
    dl, du : ndarray, shape (K,)
    acc : ndarray, shape (2, R, c), in/out
        Adds ``max_{sigma'} sum_r A[j,r] sigma'_r X[r,(0,j,k)]`` (upper chain: ``du`` where the product is positive,
        ``dl`` elsewhere) and the corresponding minimum for the lower chain.
    Xadd : ndarray, shape (K, c) or (0, 0)
        As in :func:`prep_level`: a shared part added to ``X`` first (one rounding).
    Cl : ndarray, shape (R, K)
        Running-allowance coefficients of the top: ``err[ch, j, k] += Cl[j, r] |x|``.
    err : ndarray, shape (>= 2, R, c), in/out
    """
    K = X.shape[0]
    Rc = R * c
    add = Xadd.shape[0] > 0
    for r in range(K):
        lo = dl[r]
        hi = du[r]
        for j in range(R):
            a = A[j, r]
            cl = Cl[j, r]
            qu = j * c
            ql = Rc + j * c
            for k in range(c):
                xu = X[r, qu + k]
                xl = X[r, ql + k]
                if add:
                    xu += Xadd[r, k]
                    xl += Xadd[r, k]
                err[0, j, k] += cl * abs(xu)
                err[1, j, k] += cl * abs(xl)
                pu = a * xu
                pl = a * xl
                acc[0, j, k] += (hi * pu) if pu > 0 else (lo * pu)
                acc[1, j, k] += (lo * pl) if pl > 0 else (hi * pl)


@numba.njit(nogil=True, cache=True)
def perrow_abs_matmul(A, V, out):  # pragma: no cover - compiled
    """``out[j, k] = sum_r A[j, r] * |V[j, r, k]|`` in sequential order over ``r`` (per-row operands).

    Parameters
    ----------
    A : ndarray, shape (R, K)
    V : ndarray, shape (R, K, c)
    out : ndarray, shape (R, c), output
    """
    R, K, c = V.shape
    for j in range(R):
        for k in range(c):
            out[j, k] = 0.0
        for r in range(K):
            a = A[j, r]
            for k in range(c):
                out[j, k] += a * abs(V[j, r, k])


@numba.njit(nogil=True, cache=True)
def rowdot_acc(H, Z, R, c, acc, keep):  # pragma: no cover - compiled
    """``acc[ch, j, k] += sum_i H[j, i] * Z[i, (ch R + j) c + k]`` in sequential order over the ``i`` with
    ``keep[j, i] != 0``.

    Parameters
    ----------
    H : ndarray, shape (R, r)
        Per-row coefficients (the top rows times the shared low-rank factor).
    Z : ndarray, shape (r, Npad)
        Per-row factors in the operand layout of the module docstring.
    acc : ndarray, shape (2, R, c), in/out
    keep : ndarray, shape (R, r), uint8
        0 where ``Z[i]`` is structurally zero for row ``j`` (an exact zero term: skipped, which leaves the sum
        unchanged, also when ``H[j, i]`` overflowed).
    """
    r = H.shape[1]
    Rc = R * c
    for i in range(r):
        for j in range(R):
            if keep[j, i] == 0:
                continue
            h = H[j, i]
            qu = j * c
            ql = Rc + j * c
            for k in range(c):
                acc[0, j, k] += h * Z[i, qu + k]
                acc[1, j, k] += h * Z[i, ql + k]


@numba.njit(nogil=True, cache=True)
def rowdot_abs_acc(H, Z, R, c, err, keep):  # pragma: no cover - compiled
    """``err[ch, j, k] += sum_i H[j, i] * |Z[i, (ch R + j) c + k]|`` (``ch = 0, 1``) in sequential order over the
    ``i`` with ``keep[j, i] != 0``: :func:`rowdot_acc` on the absolute values (running allowance of the shared
    variant).

    Parameters
    ----------
    H : ndarray, shape (R, r), >= 0
    Z : ndarray, shape (r, Npad)
    err : ndarray, shape (>= 2, R, c), in/out
    keep : ndarray, shape (R, r), uint8
    """
    r = H.shape[1]
    Rc = R * c
    for i in range(r):
        for j in range(R):
            if keep[j, i] == 0:
                continue
            h = H[j, i]
            qu = j * c
            ql = Rc + j * c
            for k in range(c):
                err[0, j, k] += h * abs(Z[i, qu + k])
                err[1, j, k] += h * abs(Z[i, ql + k])


@numba.njit(nogil=True, cache=True)
def abs_col_sums(V, rows, w, out):  # pragma: no cover - compiled
    """``out[k] = sum_i w[i] |V[rows[i], k]|`` summed in the order of ``rows`` (a column's sum does not depend on
    the other columns).

    Parameters
    ----------
    V : ndarray, shape (d, c)
    rows : ndarray of int64, shape (n,)
    w : ndarray, shape (n,)
    out : ndarray, shape (c,), output
    """
    for k in range(V.shape[1]):
        out[k] = 0.0
    for i in range(rows.shape[0]):
        r = rows[i]
        a = w[i]
        for k in range(V.shape[1]):
            out[k] += a * abs(V[r, k])


@numba.njit(nogil=True, cache=True)
def gather_cols_scaled(A, cols, scale, absolute, out):  # pragma: no cover - compiled
    """``out[i, k] = f(A[i, cols[k]]) * scale[k]`` with ``f = abs`` when ``absolute``, else the identity: the
    left operands of the panel products on a subset of neurons in one pass (numpy's column fancy indexing
    followed by a broadcast multiply is several times slower).

    Parameters
    ----------
    A : ndarray, shape (R, d)
    cols : ndarray of int64, shape (K,)
    scale : ndarray, shape (K,)
    absolute : bool
    out : ndarray, shape (R, K), output
    """
    for i in range(A.shape[0]):
        for k in range(cols.shape[0]):
            v = A[i, cols[k]]
            if absolute:
                v = abs(v)
            out[i, k] = v * scale[k]


@numba.njit(nogil=True, cache=True)
def gather_rows(X, S, rows, R, c, out):  # pragma: no cover - compiled
    """Pack the columns of block rows ``rows`` (both chains) of ``X[S]`` into ``out`` (no temporaries).

    Parameters
    ----------
    X : ndarray, shape (K, Npad)
        Operand in the layout of the module docstring.
    S : ndarray of int64, shape (k,)
        Rows of ``X`` to take.
    rows : ndarray of int64, shape (n,)
        Block rows ``j``; block row ``rows[i]`` goes to columns ``2 c i .. 2 c i + c`` (upper chain) and
        ``2 c i + c .. 2 c (i + 1)`` (lower chain) of ``out``.
    out : ndarray, shape (k, >= 2 c n), output
        Only those columns are written.
    """
    Rc = R * c
    for a in range(S.shape[0]):
        r = S[a]
        for i in range(rows.shape[0]):
            j = rows[i]
            q = 2 * c * i
            for k in range(c):
                out[a, q + k] = X[r, j * c + k]
                out[a, q + c + k] = X[r, Rc + j * c + k]


@numba.njit(nogil=True, cache=True)
def _fsum_add(p, m, x):  # pragma: no cover - compiled
    """Add ``x`` to Shewchuk's exact non-overlapping partials ``p[:m]``; returns the new count."""
    i = 0
    for q in range(m):
        y = p[q]
        if abs(x) < abs(y):
            x, y = y, x
        hi = x + y
        lo = y - (hi - x)
        if lo != 0.0:
            p[i] = lo
            i += 1
        x = hi
    if x != 0.0:
        p[i] = x
        i += 1
    return i


@numba.njit(nogil=True, cache=True)
def _fsum_round(p, m):  # pragma: no cover - compiled
    """The correctly rounded value of the partials ``p[:m]`` (CPython's ``math.fsum`` final step, half-way cases
    rounded to even across several partials)."""
    if m == 0:
        return 0.0
    m -= 1
    hi = p[m]
    lo = 0.0
    while m > 0:
        x = hi
        m -= 1
        y = p[m]
        hi = x + y
        yr = hi - x
        lo = y - yr
        if lo != 0.0:
            break
    if m > 0 and ((lo < 0.0 and p[m - 1] < 0.0) or (lo > 0.0 and p[m - 1] > 0.0)):
        y = lo * 2.0
        x = hi + y
        yr = x - hi
        if y == yr:
            hi = x
    return hi


@numba.njit(nogil=True, cache=True)
def exact_dot_rows(C, WT, rows, split, out):  # pragma: no cover - compiled
    """``out[i, k] = C[i] . WT[k]`` correctly rounded, for the rows ``i`` in ``rows`` (other rows untouched).

    Each product is split exactly into ``p + e`` (Dekker's TwoProduct with the splitting constant ``split``) and
    the ``2 n`` terms are summed with Shewchuk's exact partials and rounded once (the same value as ``math.fsum``
    of the terms).  The caller keeps every factor and product below the range where the split can overflow.

    Parameters
    ----------
    C : ndarray, shape (m, n), float64
    WT : ndarray, shape (N, n), float64
        The right factor transposed (contiguous rows).
    rows : ndarray of int64
    split : float
        ``2**27 + 1`` for float64.
    out : ndarray, shape (m, N), float64, in/out
    """
    n = C.shape[1]
    N = WT.shape[0]
    p = np.empty(2 * n + 2, dtype=np.float64)
    for i in rows:
        for k in range(N):
            m = 0
            for h in range(n):
                c = C[i, h]
                w = WT[k, h]
                if c == 0.0 or w == 0.0:
                    continue
                prod = c * w
                t = split * c
                c_hi = t - (t - c)
                c_lo = c - c_hi
                t = split * w
                w_hi = t - (t - w)
                w_lo = w - w_hi
                e = ((c_hi * w_hi - prod) + c_hi * w_lo + c_lo * w_hi) + c_lo * w_lo
                m = _fsum_add(p, m, prod)
                if e != 0.0:
                    m = _fsum_add(p, m, e)
            out[i, k] = _fsum_round(p, m)


_NO_ADD: dict = {}


def no_add(dtype=np.float64) -> np.ndarray:
    """The empty ``Xadd`` operand (shape ``(0, 0)``) of :func:`prep_level` / :func:`top_level`: nothing added."""
    key = np.dtype(dtype).name
    if key not in _NO_ADD:
        _NO_ADD[key] = np.zeros((0, 0), dtype=dtype)
    return _NO_ADD[key]


_COMPILED: dict = {}


def ensure_compiled(dtype=np.float64) -> float:
    """Compile (or load from the numba cache) every kernel for ``dtype``; returns the seconds spent (0 when
    already done in this process)."""
    import time

    key = np.dtype(dtype).name
    if key in _COMPILED:
        return 0.0
    t0 = time.perf_counter()
    dt = np.dtype(dtype).type
    X = np.zeros((1, 2), dtype=dt)
    Lp = np.zeros((1, 1), dtype=dt)
    d = np.zeros(1, dtype=dt)
    acc = np.zeros((2, 1, 1), dtype=dt)
    err = np.zeros((4, 1, 1), dtype=dt)
    prep_level(X, False, Lp, Lp, Lp, d, d, 1, 1, X.copy(), acc, np.zeros((1, 1), np.uint8), np.zeros(1, np.int64),
               no_add(dt), Lp, Lp, err)
    top_level(X, Lp, d, d, 1, 1, acc, no_add(dt), Lp, err)
    rowdot_abs_acc(Lp, X, 1, 1, err, np.ones((1, 1), np.uint8))
    abs_col_sums(Lp, np.zeros(1, np.int64), d, d.copy())
    perrow_abs_matmul(Lp, np.zeros((1, 1, 1), dtype=dt), np.zeros((1, 1), dtype=dt))
    rowdot_acc(Lp, X, 1, 1, acc, np.ones((1, 1), np.uint8))
    gather_cols_scaled(Lp, np.zeros(1, np.int64), d, False, Lp.copy())
    _COMPILED[key] = time.perf_counter() - t0
    return _COMPILED[key]
