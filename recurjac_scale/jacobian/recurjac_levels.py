"""The level machinery of the RecurJac step (:mod:`recurjac_scale.jacobian.recurjac`): one level of the
recursion for a block of rows, on dense or pruned (CSR) level matrices.

- Level matrices: :func:`_level_matrix` cuts ``M[rows][:, cols]`` out of a dense, CSR or store-backed
  (:class:`~recurjac_scale.jacobian.chain.LevelMatrix`) matrix.
- One level: :func:`_level` prepares the merged operand (signs, Term I, the running rounding allowance) in a fused
  numba pass and multiplies it by the level matrix; :func:`_first_level` shares the stable-neuron product across
  the rows when the operand is shared.
- Row-wise products with structural sparsity: :func:`_rowwise_matmul` multiplies each block row on its own non-zero
  operand rows (:func:`_level_matmul` for a level, :func:`_shared_matmul` for the per-row factors of the shared
  variant, :mod:`recurjac_scale.jacobian.recurjac_shared`), packing rows into fixed-width panels in per-thread
  workspaces (:func:`_workspace`).

Every choice depends on the chain or on the row alone and every GEMM runs on fixed-shape panels, so the results
are bitwise independent of the row and column blocks.
"""

from __future__ import annotations

import threading

import numpy as np
import scipy.sparse as sp

from .. import kernels
from .chain import Chain, LevelMatrix
from .products import panel_matmul


def _alive(du: np.ndarray) -> np.ndarray:
    return np.flatnonzero(du > 0)


# -- sparse (pruned) chain matrices: opt-in through Chain.sparse_mats ------------------------------------------------
# A level matrix is either a dense ndarray (the default path, unchanged) or a scipy csr_array (a pruned layer).  The
# helpers below keep a sparse matrix sparse through the live-neuron selections; products go through panel_matmul,
# whose sparse branch sums each output entry over the row's stored entries (length <= the dense length).


def _level_matrix(chain: Chain, k: int, rows: np.ndarray, cols: np.ndarray, dt):
    """``M_{k+1}[rows][:, cols]`` (``chain.mats[k]``): dense as before, or CSR when the chain holds a sparse copy.

    A :class:`~.chain.LevelMatrix` (weights streamed from the store, :mod:`recurjac_scale.engine.streaming`)
    returns the same dense block itself (``live_block``), so that only the block is ever held."""
    sm = chain.sparse_mats[k] if chain.sparse_mats else None
    if sm is None:
        M = chain.mats[k]
        if isinstance(M, LevelMatrix):
            return M.live_block(rows, cols, dt)
        return np.asarray(M, dtype=dt)[np.ix_(rows, cols)]
    return sp.csr_array(sm[rows][:, cols])


def _cols(M, idx):
    """``M[:, idx]``: contiguous dense, or CSR."""
    if sp.issparse(M):
        return sp.csr_array(M[:, idx])
    return np.ascontiguousarray(M[:, idx])


def _contig(M):
    return M if sp.issparse(M) else np.ascontiguousarray(M)


SPARSE_FRACTION = 0.125
"""A row takes the per-row compacted GEMM at a level when at least this fraction of the level's live neurons is in
its ``I_j`` (their merged-weight rows are zero for that row).  The rule is row-local, so results stay independent
of the blocking."""


def _thread_workspace(chain: Chain) -> dict:
    """This thread's workspace pool on ``chain`` (:func:`_workspace`): kept in the chain's memo, so buffers are
    reused by every task that runs on the chain object in this thread and freed with it.  A thread's first call
    drops the pools of threads that have ended (a chain kept across runs whose thread pools are recreated would
    otherwise hold one set of buffers per dead thread)."""
    memo = chain.memo()
    pools = memo.setdefault("workspace", {})
    me = threading.get_ident()
    pool = pools.get(me)
    if pool is None:
        with memo.setdefault("_lock", threading.Lock()):
            alive = {t.ident for t in threading.enumerate()}
            for ident in [i for i in pools if i not in alive]:
                del pools[ident]
            pool = pools.setdefault(me, {})
    return pool


def _workspace(ws, shape: tuple, dtype) -> np.ndarray:
    """An uninitialised C-contiguous array of ``shape`` on the buffer ``key`` of the pool, ``ws = (pool, key)``
    (:func:`_thread_workspace`), grown as needed.

    The shared variant's per-row factors and products are reused from task to task: allocated afresh, arrays
    above the allocator's mmap threshold are page-faulted in again by every task (dask's worker default returns
    them to the system at once: measured, a third more run time).  A workspace array is valid until the next call
    with the same key; its size is within the task's own work memory
    (:meth:`recurjac_scale.jacobian.cost.ChainCost.work_bytes`), which the plan counts per thread."""
    pool, key = ws
    dtype = np.dtype(dtype)
    if pool is None:
        return np.empty(shape, dtype=dtype)
    n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if key not in pool or pool[key].nbytes < n:
        pool.pop(key, None)  # (the smaller buffer is freed before the larger one is allocated)
        pool[key] = np.empty(max(n, 8), dtype=np.uint8)
    return pool[key][:n].view(dtype).reshape(shape)


def _sub(ws, suffix: str):
    return None if ws is None else (ws[0], ws[1] + suffix)


def _gather_rows(Xp, rows, S, R, c, P, ws=None):
    """The columns of block rows ``rows`` (both chains) of ``Xp[S]``, packed and zero-padded to whole panels (in
    the workspace ``ws`` when given)."""
    Rc = R * c
    S = slice(None) if S is None else S
    K = Xp.shape[0] if isinstance(S, slice) else len(S)
    shape = (K, -(-2 * c * len(rows) // P) * P)
    if ws is None:
        out = np.zeros(shape, dtype=Xp.dtype)
    else:
        out = _workspace(ws, shape, Xp.dtype)
        out[:, 2 * c * len(rows) :] = 0.0
    if not isinstance(S, slice):  # X[S] taken row by row in a kernel: no (|S| x c) temporaries
        kernels.gather_rows(Xp, np.asarray(S, dtype=np.int64), np.asarray(rows, dtype=np.int64), R, c, out)
        return out
    for i, j in enumerate(rows):
        out[:, 2 * c * i : 2 * c * i + c] = Xp[:, j * c : (j + 1) * c]
        out[:, 2 * c * i + c : 2 * c * (i + 1)] = Xp[:, Rc + j * c : Rc + (j + 1) * c]
    return out


def _scatter_rows(out, Y, rows, R, c):
    Rc = R * c
    for i, j in enumerate(rows):
        out[:, j * c : (j + 1) * c] = Y[:, 2 * c * i : 2 * c * i + c]
        out[:, Rc + j * c : Rc + (j + 1) * c] = Y[:, 2 * c * i + c : 2 * c * (i + 1)]


def _level_matmul(M, Xp, in_term1, nnz, R, c, P):
    """``M @ Xp`` for one level, exploiting per-row structural sparsity (rows of ``Xp`` zero on ``I_j``).

    Rows of the block whose merged operand is entirely zero are skipped (their recursion has ended); rows with
    many ``I_j`` neurons (:data:`SPARSE_FRACTION`) are multiplied on the compacted ``M[:, S_j]``; all other rows
    on the whole level (:func:`_rowwise_matmul`).  Returns ``None`` when every row's recursion has ended.
    """
    K = M.shape[1]
    n_i = in_term1.sum(axis=1, dtype=np.int64)
    live = nnz > 0
    sparse = live & (n_i >= max(1, SPARSE_FRACTION * K))
    subsets = [
        (np.flatnonzero(in_term1[j] == 0) if sparse[j] else None) if live[j] else _NO_ROWS for j in range(R)
    ]
    return _rowwise_matmul(M, Xp, subsets, R, c, P)


_NO_ROWS = np.zeros(0, dtype=np.int64)


def _rowwise_matmul(M, Xp, subsets, R, c, P, ws=None):
    """``M @ Xp`` (operand layout of :mod:`recurjac_scale.kernels`), each block row ``j`` (both chains)
    multiplied on its own rows ``subsets[j]`` of ``Xp`` (the others are exact zeros for that row).

    ``subsets[j]`` is ``None`` (every row of ``Xp``), an index array, or empty (the row's product is zero).  When
    at least half the block rows take every row, one GEMM runs over all columns and the other rows are zeroed and
    recomputed; otherwise the rows are packed, rows with the same subset sharing GEMM calls on fixed-width panels
    of their packed columns (at most :data:`GATHER_BYTES` at once).  A row's subset depends on the row alone and a
    column computed in a fixed-shape panel call does not depend on the other columns, so a row's result does not
    depend on the rest of the block.  Dropping terms whose right factor is an exact zero leaves the real-number sum
    unchanged (and the summation shorter).  Returns ``None`` when every subset is empty.  With ``ws`` the result and
    the packed operands live in per-thread workspaces (:func:`_workspace`, keys ``ws``, ``ws + ".in"``,
    ``ws + ".out"`` of the pool, ``ws = (pool, key)``): valid until the next call with the same ``ws``.
    """
    full = np.array([S is None for S in subsets], dtype=bool)
    empty = np.array([S is not None and len(S) == 0 for S in subsets], dtype=bool)
    if empty.all():
        return None
    shape = (M.shape[0], Xp.shape[1])
    out = None if ws is None else _workspace(ws, shape, np.result_type(M.dtype, Xp.dtype))
    if full.all():
        return panel_matmul(M, Xp, P, out=out)
    Rc = R * c
    if 2 * np.count_nonzero(full) >= R:
        # Mostly full: one GEMM over every column, then the other rows are recomputed (or zeroed) below.
        out = panel_matmul(M, Xp, P, out=out)
        todo = np.flatnonzero(~full)
        for j in todo:
            out[:, j * c : (j + 1) * c] = 0.0
            out[:, Rc + j * c : Rc + (j + 1) * c] = 0.0
    else:
        if out is None:
            out = np.zeros(shape, dtype=Xp.dtype)
        else:
            out[...] = 0.0
        todo = np.flatnonzero(~empty)
    groups: dict = {}
    for j in todo:
        if empty[j]:
            continue
        S = subsets[j]
        groups.setdefault(b"" if S is None else np.asarray(S, dtype=np.int64).tobytes(), (S, []))[1].append(j)
    per_chunk = max(1, GATHER_BYTES // max(1, 16 * c * max(Xp.shape[0], M.shape[0])))  # operand and product
    for S, rows in groups.values():
        MS = M if S is None else _cols(M, S)
        for i in range(0, len(rows), per_chunk):
            chunk = rows[i : i + per_chunk]
            packed = _gather_rows(Xp, chunk, S, R, c, P, _sub(ws, ".in"))
            y = None if ws is None else _workspace(_sub(ws, ".out"), (MS.shape[0], packed.shape[1]), out.dtype)
            Y = panel_matmul(MS, packed, P, out=y)
            _scatter_rows(out, Y, chunk, R, c)
    return out


def _level(X, shared, M, Lp, Up, Sp, lo, hi, R, c, P, npad, acc, Cl, Cq, err):
    """One level: prepare the merged operand (and Term I into ``acc``, the running allowance into ``err``), then
    multiply by ``M``."""
    K = lo.size
    Xp = np.empty((K, npad), dtype=acc.dtype)
    Xp[:, 2 * R * c :] = 0.0
    in_term1 = np.zeros((R, K), dtype=np.uint8)
    nnz = np.zeros(R, dtype=np.int64)
    kernels.prep_level(
        np.ascontiguousarray(X), shared, np.ascontiguousarray(Lp), np.ascontiguousarray(Up), np.ascontiguousarray(Sp),
        np.ascontiguousarray(lo), np.ascontiguousarray(hi), R, c, Xp, acc, in_term1, nnz, kernels.no_add(acc.dtype),
        np.ascontiguousarray(Cl), np.ascontiguousarray(Cq), err,
    )
    return _level_matmul(_contig(M), Xp, in_term1, nnz, R, c, P)


def _first_level(V, M, Lp, Up, Sp, lo, hi, R, c, P, npad, acc, Cl, Cq, err, stable_err):
    """The first level of a step, where the operand ``V`` is shared by every row (sharing across rows).

    For a neuron with an exact derivative (``dl == du``) the merged operand is ``du V[r]`` for every row and both
    chains, so ``M[:, stable] D(du) V[stable]`` is computed once (one panel GEMM over the block's ``c`` columns) and
    added to the per-row product over the other neurons.  The split depends on the chain only (not on the
    blocking), and the shared product of a column does not depend on the other columns.  ``stable_err(st)``
    returns the rounding allowance of the shared product (shape ``(R, c)``, added to both chains of ``err``).
    """
    stab = lo == hi
    if not stab.any():
        return _level(V, True, M, Lp, Up, Sp, lo, hi, R, c, P, npad, acc, Cl, Cq, err)
    u = np.flatnonzero(~stab)
    st = np.flatnonzero(stab)
    e_st = stable_err(st)
    err[0] += e_st
    err[1] += e_st
    out = None
    if u.size:
        out = _level(V[u], True, _cols(M, u), Lp[:, u], Up[:, u], Sp[:, u], lo[u], hi[u], R, c, P, npad, acc,
                     Cl[:, u], Cq[:, u], err)
    if out is None:
        out = np.zeros((M.shape[0], npad), dtype=acc.dtype)
    Vs = np.zeros((st.size, -(-c // P) * P), dtype=acc.dtype)
    Vs[:, :c] = hi[st, None] * V[st]
    shared_part = panel_matmul(_cols(M, st), Vs, P)[:, :c]
    view = out[:, : 2 * R * c].reshape(M.shape[0], 2 * R, c)
    view += shared_part[:, None, :]
    return out


GATHER_BYTES = 32 * 2**20
"""Bytes of the packed per-row factor columns (and of their product) :func:`_shared_matmul` builds at once."""


def _shared_matmul(G, Z, keep, r, R, c, P, pool):
    """``G @ Z[:r]`` (shape ``(a, Npad)``, operand layout of :mod:`recurjac_scale.kernels`), or ``None`` when it is
    structurally zero for every row.

    The per-row factors ``Z`` are zero on the rows ``i`` with ``keep[j, i] = 0`` for block row ``j`` (its Term I
    neurons, Eq. 14-15, and the levels where its prepared operand vanished): deep in the chain, where the bounds of
    ``P_{s-1}`` straddle zero, most of them.  Each row ``j`` is multiplied on its own set ``S_j`` of non-zero rows:
    ``S_j`` is all of ``0..r-1`` when at least ``1 - SPARSE_FRACTION`` of them are kept (one GEMM with the zeros),
    else its kept rows; rows with the same ``S_j`` share GEMM calls on fixed-width panels of their packed columns.
    ``S_j`` depends on the row alone and a column computed in a fixed-shape panel call does not depend on the other
    columns, so a row's result does not depend on the rest of the block.  Dropping a term whose right factor is an
    exact zero leaves the real-number sum unchanged (and the summation shorter); the rounding allowance of the
    longer sum covers it.
    """
    a = G.shape[0]
    if r == 0 or a == 0:
        return None
    kp = keep[:, :r]
    n_keep = kp.sum(axis=1, dtype=np.int64)
    full = n_keep >= (1.0 - SPARSE_FRACTION) * r
    subsets = [None if full[j] else np.flatnonzero(kp[j]) for j in range(R)]
    return _rowwise_matmul(G, Z[:r], subsets, R, c, P, ws=(pool, "shared.Xu"))
