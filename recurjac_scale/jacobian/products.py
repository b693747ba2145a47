"""Fixed-panel products of the chain: every GEMM a Jacobian step runs, on canonical shapes.

BLAS results depend on the shapes of the call; a column computed inside a call of fixed shape does not depend on its
position or on the other columns.  So every product of a step runs on fixed-width column panels
(:func:`panel_matmul`) or fixed ``row_tile x panel`` tiles (:func:`tile_matmul`), zero-padded, and products with a
pruned (CSR) matrix sum each row's stored entries in index order (:func:`panel_products`,
:func:`finish_products`): results are bitwise independent of how rows and columns are blocked, and every summation
is at most as long as the dense one the rounding allowances are written for.  The chain itself is
:mod:`recurjac_scale.jacobian.chain`; this module only reads its ``panel``, ``row_tile``, ``du``, ``dl``,
``sparse_mats``, ``finish_mat`` and ``sparse_finish`` (``chain`` below is always a :class:`~.chain.Chain`; this
module does not import it, the chain imports the row tiles from here).
"""

from __future__ import annotations

import numpy as np

try:  # scipy is a dependency of the package; the guard keeps the dense path free of it
    import scipy.sparse as _sp
except ImportError:  # pragma: no cover
    _sp = None

__all__ = [
    "ROW_TILE",
    "ROW_TILE_MAX",
    "row_tile_for",
    "panel_matmul",
    "tile_matmul",
    "level_is_sparse",
    "panel_csr_t",
    "panel_products",
    "finish_products",
    "live_neurons",
    "unstable_neurons",
]

ROW_TILE = 16
"""Smallest row tile of :func:`tile_matmul` (products whose left operand is a block of rows)."""

ROW_TILE_MAX = 128
"""Largest row tile: a chain with many rows (F0: the inputs) runs its row-block products on 128-row tiles, which
BLAS runs at about twice the rate of 16-row tiles (one thread, 3072-deep products)."""


def row_tile_for(n_rows: int) -> int:
    """The row tile of a chain with ``n_rows`` rows (:attr:`Chain.row_tile`): the smallest power of two ``>= n_rows``
    between :data:`ROW_TILE` and :data:`ROW_TILE_MAX`.  It depends on the chain alone, never on the blocking, so
    results stay bitwise blocking-invariant; a chain with few rows (RecurJac-B: the outputs) pads little."""
    n = max(1, int(n_rows))
    return int(min(ROW_TILE_MAX, max(ROW_TILE, 1 << (n - 1).bit_length())))


# -- canonical GEMMs -------------------------------------------------------------------------------------------
# BLAS results depend on the shapes of the call (kernel choice, edge handling); a column computed inside a call of
# fixed shape does not depend on its position or on the other columns.  These helpers therefore always call BLAS
# with fixed-width panels (zero padding), which makes the results independent of the blocking.


def panel_matmul(M: np.ndarray, X: np.ndarray, panel: int, out: np.ndarray | None = None) -> np.ndarray:
    """``M @ X`` computed panel by panel.

    Parameters
    ----------
    M : ndarray, shape (a, K)
        A matrix that does not depend on the blocking (a chain matrix, possibly with dead neurons removed).
    X : ndarray, shape (K, N)
        ``N`` must be a multiple of ``panel`` (pad with zero columns).
    """
    a, K = M.shape
    N = X.shape[1]
    if N % panel:
        raise ValueError("panel_matmul needs a column count that is a multiple of the panel")
    if out is None:
        out = np.empty((a, N), dtype=np.result_type(M.dtype, X.dtype))
    if a == 0 or N == 0:
        return out
    if K == 0:
        out[...] = 0
        return out
    if _sp is not None and _sp.issparse(M):
        # Sparse x dense (a pruned chain matrix, Chain.sparse_mats): each output entry sums the row's stored
        # entries in index order whatever the other columns are, so one call equals the panel-by-panel result
        # bitwise (blocking invariance) and its summation length is <= K (rounding allowance unchanged).
        out[...] = M @ X
        return out
    for p in range(0, N, panel):
        np.matmul(M, X[:, p : p + panel], out=out[:, p : p + panel])
    return out


def tile_matmul(A: np.ndarray, B: np.ndarray, panel: int, row_tile: int = ROW_TILE) -> np.ndarray:
    """``A @ B`` on fixed ``row_tile x panel`` output tiles (both operands zero-padded), for products where both
    operands depend on the blocking (rows of a block times a column panel).

    Parameters
    ----------
    A : ndarray, shape (R, K)
    B : ndarray, shape (K, c)

    Returns
    -------
    ndarray, shape (R, c)
    """
    R, K = A.shape
    c = B.shape[1]
    dt = np.result_type(A, B)
    if R == 0 or c == 0:
        return np.zeros((R, c), dtype=dt)
    if K == 0:
        return np.zeros((R, c), dtype=dt)
    Rp = -(-R // row_tile) * row_tile
    cp = -(-c // panel) * panel
    # (an operand that needs no padding is used as it is when it has the padded copy's layout: same bits)
    if Rp == R and A.dtype == dt and A.flags.c_contiguous:
        Ap = A
    else:
        Ap = np.zeros((Rp, K), dtype=dt)
        Ap[:R] = A
    if cp == c and B.dtype == dt and B.flags.c_contiguous:
        Bp = B
    else:
        Bp = np.zeros((K, cp), dtype=dt)
        Bp[:, :c] = B
    out = np.empty((Rp, cp), dtype=dt)
    for i in range(0, Rp, row_tile):
        for p in range(0, cp, panel):
            np.matmul(Ap[i : i + row_tile], Bp[:, p : p + panel], out=out[i : i + row_tile, p : p + panel])
    return out[:R, :c]


# -- products with a pruned column panel / finish matrix (opt-in, Chain.sparse_mats / Chain.sparse_finish) ---------
# The dense products above go through fixed-shape BLAS calls; a sparse product gets the same blocking invariance
# from scipy's kernel instead: ``csr_matvecs`` computes output row i as ``y_i = 0; y_i += a_ij x_j`` over the stored
# entries j of row i in index order, one independent lane per column of ``x`` (an axpy), so every output entry is
# the same sequential sum whatever the other rows and columns are (tests/test_sparse_chain_products.py checks it
# bitwise under changed row and column sets).  Its summation length is the number of stored entries of the row,
# <= the dense length, so every rounding allowance written for the dense product covers it.  Skipping the zero
# entries is exact: a real (finite) bounded quantity times 0 is 0, so even an overflowed (infinite) left factor
# loses nothing sound by not being multiplied by a structural zero.


def level_is_sparse(chain, t: int) -> bool:
    """Whether level ``t`` (``mats[t - 1]``) of the chain holds a CSR copy (a chain-only, blocking-independent
    choice)."""
    return bool(chain.sparse_mats) and chain.sparse_mats[t - 1] is not None


def panel_csr_t(V: np.ndarray):
    """``Vᵀ`` as a canonical ``scipy.sparse.csr_array`` (sorted indices, no explicit zeros), shape ``(c, d)`` for a
    dense column panel ``V`` of shape ``(d, c)``: row ``k`` holds the stored entries of column ``k`` of ``V``, which
    depend on that column alone (not on which other columns the panel has)."""
    a = _sp.csr_array(np.ascontiguousarray(np.asarray(V).T))
    a.eliminate_zeros()
    a.sort_indices()
    return a


def _csr_times_dense_t(B, A: np.ndarray) -> np.ndarray:
    """``(B @ Aᵀ)ᵀ`` = ``A @ Bᵀ`` as a C-contiguous dense array: ``B`` CSR ``(c, d)``, ``A`` dense ``(R, d)``;
    output ``(R, c)``, entry ``[i, k]`` = the fixed-order sum over the stored entries of ``B[k]``."""
    R = A.shape[0]
    c = B.shape[0]
    if R == 0 or c == 0:
        return np.zeros((R, c), dtype=np.result_type(A.dtype, B.dtype))
    out = B @ np.ascontiguousarray(A.T)
    return np.ascontiguousarray(np.asarray(out).T)


def live_neurons(chain, t: int) -> np.ndarray:
    """Indices of the neurons of level ``t`` with ``du > 0`` (the others are dead: every product through them is an
    exact zero).  Depends on the chain alone."""
    return np.flatnonzero(chain.du[t - 1] > 0)


def unstable_neurons(chain, t: int) -> np.ndarray:
    """Indices of the neurons of level ``t`` with ``dl < du`` (the derivative interval has a radius).  Depends on the
    chain alone."""
    return np.flatnonzero(chain.dl[t - 1] < chain.du[t - 1])


def panel_products(chain, t: int, V: np.ndarray, *lefts) -> list:
    """``A @ V[keep]`` (or ``A @ |V[keep]|``) for each ``(A, absolute, keep)`` in ``lefts``: the products of a step
    with its column panel ``V = M_t[:, cols]`` (step 1 of RecurJac, the magnitude chain, Fast-Lip).

    ``keep`` selects the neurons of level ``t`` that take part (:func:`live_neurons`, :func:`unstable_neurons`): the
    caller's terms on the other neurons are exact zeros (a factor ``du = 0`` or ``du - dl = 0``), so they are not
    multiplied.  Dropping an exact-zero term leaves the real-number sum unchanged and the summation shorter (the
    allowances, written for ``d_t`` terms, cover it); ``keep`` depends on the chain alone, so the result stays
    independent of the blocking.  It also keeps an overflowed (infinite) left factor of a dead neuron out of the sum
    (``inf * 0`` would be NaN).

    Parameters
    ----------
    chain : Chain
    t : int
        The level whose panel ``V`` is (``1 <= t <= T``).
    V : ndarray, shape (d_t, c)
    lefts : ``(A, absolute)`` or ``(A, absolute, keep)``
        ``A`` of shape ``(R_blk, d_t)``, or ``(R_blk, keep.size)`` with ``keep`` an index array of level-``t``
        neurons.

    Returns
    -------
    list of ndarray, shape (R_blk, c)
        Dense levels: :func:`tile_matmul` (fixed tiles, as before).  A pruned level (:func:`level_is_sparse`):
        ``V[keep]ᵀ`` (or ``|V[keep]|ᵀ``) as CSR times ``Aᵀ`` (section comment above: fixed-order sums of at most
        ``d_t`` terms, so bitwise blocking-invariant and covered by the dense rounding allowance); each operand is
        converted once for all products.
    """
    sparse = level_is_sparse(chain, t)
    d = V.shape[0]
    operands: dict = {}

    def operand(keep, absolute):  # V[keep] (or its CSR transpose) gathered once, its absolute value once
        sel = None if keep is None else id(keep)
        key = (sel, absolute)
        if key not in operands:
            raw = (sel, "raw")
            if raw not in operands:
                Vk = V if keep is None else np.ascontiguousarray(V[keep])
                operands[raw] = panel_csr_t(Vk) if sparse else Vk
            operands[key] = abs(operands[raw]) if absolute else operands[raw]
        return operands[key]

    out = []
    for left in lefts:
        A, absolute = left[0], left[1]
        keep = left[2] if len(left) > 2 else None
        if keep is not None and keep.size == d:
            keep = None  # every neuron: the same product as without a selection
        if keep is not None and keep.size == 0:
            out.append(np.zeros((A.shape[0], V.shape[1]), dtype=np.result_type(A.dtype, V.dtype)))
            continue
        B = operand(keep, absolute)
        if sparse:
            out.append(_csr_times_dense_t(B, np.asarray(A)))
        else:
            out.append(tile_matmul(A, B, chain.panel, chain.row_tile))
    return out


def finish_products(chain, *rights, keep: np.ndarray | None = None) -> list:
    """``W(1)ᵀ @ B`` (or ``|W(1)ᵀ| @ B``) for each ``(B, absolute)`` in ``rights``: the F1 finish (``B`` of shape
    ``(n_1, m)``, or ``(keep.size, m)`` on the layer-1 neurons ``keep``; the result ``(n_0, m)``).

    Dense: :func:`tile_matmul` on ``W(1)ᵀ`` (its columns ``keep``: the caller's terms on the other neurons are exact
    zeros, as in :func:`panel_products`).  Pruned first layer (:attr:`Chain.sparse_finish`): CSR ``W(1)ᵀ`` times
    the dense ``B``; entry ``[k, i]`` sums the stored entries of row ``k`` (column ``k`` of ``W(1)``, at most ``n_1``
    terms) in index order, independent of the other columns of ``B`` (blocking-invariant, covered by the dense
    rounding allowance of :func:`recurjac_scale.jacobian.methods.finish_chain`).
    """
    S = chain.sparse_finish
    n_1 = int(chain.finish_mat.shape[0]) if S is None else int(S.shape[1])
    if keep is not None and keep.size == n_1:
        keep = None
    if S is None:
        W1T = np.asarray(chain.finish_mat, dtype=chain.dtype).T
        W1T = np.ascontiguousarray(W1T if keep is None else W1T[:, keep])
        absW1T = None
        out = []
        for B, absolute in rights:
            if absolute and absW1T is None:
                absW1T = np.abs(W1T)
            out.append(tile_matmul(absW1T if absolute else W1T, B, chain.panel, chain.row_tile))
        return out
    if keep is not None:
        S = _sp.csr_array(S[:, keep])
        S.sort_indices()
    absS = None
    out = []
    for B, absolute in rights:
        if absolute and absS is None:
            absS = abs(S)
        M = absS if absolute else S
        B = np.ascontiguousarray(B)
        if M.shape[0] == 0 or B.shape[1] == 0:
            out.append(np.zeros((M.shape[0], B.shape[1]), dtype=np.result_type(M.dtype, B.dtype)))
        else:
            out.append(np.ascontiguousarray(np.asarray(M @ B)))
    return out
