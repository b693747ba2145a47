"""RecurJac (Zhang, Zhang & Hsieh, AAAI 2019, Algorithm 1) as a block function on a chain.

One step ``t`` bounds ``P_{t-1} Σ_t V`` for a block of rows and a column panel ``V`` (Theorem 1): for every row
``j``, two chains (upper with the merged weights ``Ŵ(j)``, lower with ``W̃(j)``, Eq. 17-18) descend from level
``t`` to the exact top.  At each level ``s`` the neurons split by the row's known bounds of ``P_{s-1}`` into
``I_j`` (Term I, Eq. 14-15: ``Y σ' ∈ [du Lm, du Um]``), ``P_j`` / ``N_j`` (sign of ``Y`` known: ``σ'`` fixed to
``dl`` or ``du`` per entry by the sign of ``Y V``, and ``Y`` expanded one level further: Term II, Lemma 2) and
``E_j`` (``dl == du``: expanded exactly whatever the sign).  At the top ``Y = M_0[j]`` is exact (Eq. 10-11).

Kernels
-------
- Dense per row: the rows of the block and both chains share one GEMM per level,
  ``M_{s-1}[alive_{s-1}, alive_s] @ X'`` with ``X'`` of shape ``(|alive_s|, 2 R c)`` (padded to whole panels);
  ``alive`` drops neurons with ``du = 0`` (dead for every row) on both sides of the GEMM.  Rows whose operand
  vanished are skipped, and rows with many ``I_j`` neurons (zero rows of their ``X'``) get their own GEMM on the
  compacted ``M[:, S_j]`` (structural sparsity; :func:`_level_matmul`).  The first level of a step shares the
  stable-neuron part ``M[:, stable] D(du) V[stable]`` across rows (:func:`_first_level`).
- Sharing across rows (nearly-linear regime, :func:`uses_sharing`): the operand of every level is kept as a part
  shared by all rows plus a low-rank per-row part on the unstable neurons (:func:`_shared_levels`); per row only the
  unstable neurons are prepared and multiplied, each row on its own non-zero per-row factors (its Term I neurons
  leave exact zeros, most of them deep in the chain; :func:`_shared_matmul`), a few rows at a time so that the
  per-row factors stay in cache.
- The mask / sign / scale preparation of ``X'``, Term I and the exact top are fused numba passes
  (:mod:`recurjac_scale.kernels`).  Step 1 (``P_0 = M_0`` exact) is two tiled GEMMs in midpoint-radius form:
  ``A D(mid) V ± |A| D(rad) |V|``.

Every choice between these variants depends on the chain or on the row alone, never on the blocking, and every
GEMM runs on fixed-shape panels: the results are bitwise independent of the row and column blocks.  All variants
compute the same real-number sums (the paper's bound) in different orders; the running rounding allowance of
:mod:`recurjac_scale.jacobian.rounding` is accumulated alongside in each of them.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict

import numpy as np
import scipy.sparse as sp

from .. import kernels
from .._fp import gamma
from .chain import Chain, LevelMatrix
from .products import live_neurons, panel_matmul, panel_products, tile_matmul, unstable_neurons
from .rounding import (
    abs_col_sums,
    column_abs_sums,
    kappa,
    level_coefficients,
    row_max,
    sign_slack,
    step_widening,
    widen_outward,
    widening,
)

__all__ = ["recurjac_step"]


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


def _scaled_cols(A: np.ndarray, cols: np.ndarray, scale: np.ndarray, absolute: bool = False) -> np.ndarray:
    """``A[:, cols] * scale`` (``|A[:, cols]| * scale`` when ``absolute``), shape ``(R, cols.size)``, in one pass
    (:func:`recurjac_scale.kernels.gather_cols_scaled`); the same values, bit for bit."""
    A = np.ascontiguousarray(A)
    dt = np.result_type(A.dtype, scale.dtype)
    out = np.empty((A.shape[0], cols.size), dtype=dt)
    if out.size:
        kernels.gather_cols_scaled(A.astype(dt, copy=False), np.ascontiguousarray(cols, dtype=np.int64),
                                   np.ascontiguousarray(scale, dtype=dt), bool(absolute), out)
    return out


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


SHARE_RATIO = 0.5
"""Sharing across rows is used for a step when its estimated per-row work is at most this fraction of the dense
per-row work (:func:`uses_sharing`); ``inf`` forces it, ``0`` disables it."""

UNSTABLE_FRACTION = 0.5
"""... and when at most this fraction of the live neurons of levels ``1..t`` is unstable (``dl < du``)."""


def uses_sharing(chain: Chain, t: int) -> bool:
    """Whether step ``t`` (shared operand) runs with sharing across rows (:func:`_shared_levels`).

    A chain-only decision (blocking-independent): per row, the shared variant costs about
    ``sum_s |u_s| r_s + (|u_1| + 1) r_1`` multiply-adds per column (``u_s`` the live neurons of level ``s`` with ``dl < du``,
    ``r_s = sum_{l > s} |u_l|``), the dense one ``sum_s |alive_{s-1}| |alive_s| + |alive_1|``, before its per-row
    sparsity; sharing also needs few unstable neurons (:data:`UNSTABLE_FRACTION`).
    """
    if t < 2 or SHARE_RATIO <= 0:  # 0 disables it, also for a step without unstable neurons (shared cost 0)
        return False
    alive = [int(np.count_nonzero(chain.du[s - 1] > 0)) for s in range(1, t + 1)]
    unst = [int(np.count_nonzero((chain.du[s - 1] > 0) & (chain.dl[s - 1] < chain.du[s - 1]))) for s in range(1, t + 1)]
    dense = sum(alive[s - 2] * alive[s - 1] for s in range(2, t + 1)) + alive[0]
    shared, r = 0, 0
    for s in range(t, 1, -1):
        shared += unst[s - 1] * (r + 1)
        r += unst[s - 1]
    shared += (unst[0] + 1) * r + unst[0]
    # Many unstable neurons usually mean many I_j neurons, which the dense per-row path drops row by row (and
    # measured on the MNIST 7-layer shape, F0: sharing wins up to ~45% unstable neurons, loses 6x at ~73%).
    few_unstable = sum(unst) <= UNSTABLE_FRACTION * max(1, sum(alive))
    return shared <= SHARE_RATIO * dense and (few_unstable or SHARE_RATIO == math.inf)


SHARED_CACHE_BYTES = 256 * 2**20
"""Bytes of chain-only factors of :func:`_shared_levels` kept per chain object (per process, least recently used
steps dropped first).  They depend on the chain alone, so every task of a step reuses them; a step whose factors
are larger is recomputed by each task."""


def _shared_header(chain: Chain, t: int) -> tuple[np.ndarray, int, int]:
    """``(alive_t, r, nbytes)`` of step ``t``'s shared factors from the derivative bounds alone: the live neurons
    of level ``t``, the rows of the per-row factor ``Z`` (unstable live neurons of levels ``t..2``) and an upper
    estimate of the bytes of :func:`_shared_factors` (dense ``Ms`` and ``G`` blocks)."""
    alive = _alive(chain.du[t - 1])
    alive_t = alive
    r = 0
    nbytes = 0
    item = np.dtype(chain.dtype).itemsize
    for s in range(t, 1, -1):
        unst = chain.dl[s - 1][alive] != chain.du[s - 1][alive]
        n_u = int(np.count_nonzero(unst))
        alive_up = _alive(chain.du[s - 2])
        nbytes += item * (alive_up.size * (alive.size - n_u) + n_u * r + 4 * alive.size)
        r += n_u
        alive = alive_up
    nbytes += item * (alive.size * r + 4 * alive.size)
    return alive_t, r, nbytes


def _shared_factors(chain: Chain, t: int):
    """The chain-only part of :func:`_shared_levels` for step ``t``, as a sequence of ``("level", dict)`` for
    ``s = t..2`` and a final ``("top", dict)``: per level the neurons (live, stable ``st``, unstable ``u``), the rows
    ``G_s[u]`` of the shared factor and the stable-scaled level matrix
    ``Ms = M_{s-1}[alive_{s-1}, alive_s[st]] D(du[st])``; at the top ``G_1[st]``, ``G_1[u]``.

    ``G_s`` (``|alive_s| x r_s``, ``r_s`` = unstable neurons of the levels above) maps the per-row factors ``Z``
    to the operand of level ``s``; it does not depend on the rows, the columns or the blocking, so it is computed
    once per process and step and kept (:meth:`Chain.memo`) when its estimated size fits
    :data:`SHARED_CACHE_BYTES` and the chain is not streamed from the model store.  Otherwise the factors are
    produced level by level and dropped as they are used, so a task never holds more than one level's matrices.
    """
    memo = chain.memo()
    lock = memo.setdefault("_lock", threading.Lock())
    cache = memo.setdefault("shared_factors", OrderedDict())
    with lock:
        hit = cache.get(t)
        if hit is not None:
            cache.move_to_end(t)
            return hit
    nbytes = _shared_header(chain, t)[2]
    if nbytes > SHARED_CACHE_BYTES or _streamed(chain):
        return _iter_shared_factors(chain, t)
    out = list(_iter_shared_factors(chain, t))
    with lock:
        cache[t] = out
        cache.move_to_end(t)
        sizes = memo.setdefault("shared_factor_bytes", {})
        sizes[t] = nbytes
        for k in [k for k in sizes if k not in cache]:
            del sizes[k]
        while sum(sizes.values()) > SHARED_CACHE_BYTES and len(cache) > 1:
            old, _ = cache.popitem(last=False)
            sizes.pop(old, None)
    return out


def _streamed(chain: Chain) -> bool:
    """The chain's matrices are read from the model store by each task (out-of-core runs: memory is the limit,
    so nothing is kept between tasks)."""
    return any(isinstance(m, LevelMatrix) for m in chain.mats)


def _iter_shared_factors(chain: Chain, t: int):
    dt = np.dtype(chain.dtype)
    alive = _alive(chain.du[t - 1])
    G = np.zeros((alive.size, 0), dtype=dt)
    r = 0
    for s in range(t, 1, -1):
        lo, hi = chain.dl[s - 1][alive], chain.du[s - 1][alive]
        st = np.flatnonzero(lo == hi)
        u = np.flatnonzero(lo != hi)
        alive_up = _alive(chain.du[s - 2])
        M = _level_matrix(chain, s - 2, alive_up, alive, dt)
        if sp.issparse(M):  # same single rounding per entry as the dense scaling below
            Ms = _cols(M, st)
            if st.size:
                Ms = sp.csr_array(Ms @ sp.diags_array(hi[st]))
            Mu = _cols(M, u).toarray()
        else:
            Ms = np.ascontiguousarray(M[:, st] * hi[st][None, :])
            Mu = M[:, u]
        del M
        # chain-only allowance vectors (rounding module): colw = (colsum|M_{s-1}| du)[st], cG = colw |G[st]|,
        # gu = colsum |G[u]| (rounded up)
        colw = np.ascontiguousarray((column_abs_sums(chain, s - 1)[alive[st]] * hi[st]).astype(dt))
        with np.errstate(over="ignore", invalid="ignore"):
            aG = np.abs(G)
            cG = (colw @ aG[st]) * dt.type(1.0 + gamma(st.size, dt))
            gu = aG[u].sum(axis=0) * dt.type(1.0 + gamma(u.size, dt))
        del aG
        yield "level", {
            "s": s, "alive": alive, "st": st, "u": u, "lo_u": np.ascontiguousarray(lo[u]),
            "hi_u": np.ascontiguousarray(hi[u]), "Gu": np.ascontiguousarray(G[u]), "Ms": Ms, "r": r,
            "colw_st": colw, "cG": np.ascontiguousarray(cG), "gu": np.ascontiguousarray(gu),
        }
        G = np.hstack([np.asarray(Ms @ G[st]), Mu])
        del Ms, Mu
        r += u.size
        alive = alive_up
    lo, hi = chain.dl[0][alive], chain.du[0][alive]
    st = np.flatnonzero(lo == hi)
    u = np.flatnonzero(lo != hi)
    with np.errstate(over="ignore", invalid="ignore"):
        g1 = np.abs(G).sum(axis=0) * dt.type(1.0 + gamma(alive.size, dt))
    yield "top", {
        "alive": alive, "st": st, "u": u, "g1": np.ascontiguousarray(g1), "hi_st": np.ascontiguousarray(hi[st]), "lo_u": np.ascontiguousarray(lo[u]),
        "hi_u": np.ascontiguousarray(hi[u]), "G_st": np.ascontiguousarray(G[st]), "G_u": np.ascontiguousarray(G[u]),
    }


SHARED_TILE_BYTES = 16 * 2**20
"""Bytes of the per-row factors ``Z`` (``r x 2 R_s c``) :func:`_shared_levels` holds at once: the rows of a block
are processed ``R_s`` at a time so that ``Z`` and the level products stay in cache (rows are independent: the
result does not depend on ``R_s``)."""


def shared_row_chunk(R: int, c: int, r_total: int) -> int:
    """Rows per chunk of :func:`_shared_levels` (:data:`SHARED_TILE_BYTES`), between 1 and ``R``."""
    return int(max(1, min(R, SHARED_TILE_BYTES // max(1, 16 * c * max(1, r_total)))))


def _shared_levels(chain: Chain, t: int, V, priors, A, R, c, P, acc, err):
    """Steps ``t >= 2`` with a shared operand, with the stable part shared across the rows of the block.

    At level ``s`` the operand of row ``j`` (both chains) is ``X_s = Xsh_s + G_s Z_j``: ``Xsh_s`` (``d_s x c``) and
    ``G_s`` (``d_s x r_s``) are the same for every row (the expansion through neurons with ``dl == du``, whose
    merged weights do not depend on the row: ``du X``), and ``Z_j`` (``r_s`` rows) stacks the row's merged operands
    on the unstable neurons of the levels above.  Per row, only the unstable neurons are prepared (signs, Term I) and
    multiplied: ``X_s[u_s] = Xsh_s[u_s] + G_s[u_s] Z_j``, on the row's non-zero factors only
    (:func:`_shared_matmul`).  In exact arithmetic this is the same sum as the dense recursion.  The running
    allowance (into ``err``, rounding module, "Sharing across rows") adds per level the shared-product and
    operand errors, bounded by per-row maxima of the prior weights times shared column sums, and the per-row dots
    with ``|Z|`` once per chunk.  ``G_s`` depends on the chain alone (:func:`_shared_factors`, computed once per process and
    step).  The shared parts ``Xsh_s`` are computed once per block; the per-row part runs on chunks of rows
    (:func:`shared_row_chunk`), ``Z`` filled in place level after level and ``Xsh`` added inside the preparation
    kernels.
    """
    dt = acc.dtype
    _, r_total, _ = _shared_header(chain, t)
    cp = -(-c // P) * P
    # Z and the products, reused by the chunks and by the next tasks of this thread (not for a streamed chain: there
    # memory is the limit and nothing is kept between tasks)
    pool = None if _streamed(chain) else _thread_workspace(chain)
    # Pass 1, shared by every row: Xsh_s[u_s] per level and the top's Xsh_1 (the stable-scaled level matrices Ms
    # are dropped as soon as they are used; a streamed chain yields them one level at a time).  Xsh is a view of
    # the level product (columns :c), read into the next level's operand Vs before the next product overwrites it.
    levels = []
    Xsh = None
    e_sh = np.zeros((R, c), dtype=dt)  # allowance shared by both chains: rows x (shared column sums)
    Hc = np.zeros((R, r_total), dtype=dt)  # allowance coefficients of |Z| (per-row dots at the end)
    for kind, lvl in _shared_factors(chain, t):
        if Xsh is None:
            Xsh = np.ascontiguousarray(V[lvl["alive"]])  # (K, c)
        if kind == "top":
            top = lvl
            break
        st, u, s, r = lvl["st"], lvl["u"], lvl["s"], lvl["r"]
        cols = lvl["alive"][u]
        Cl, Cq = level_coefficients(chain, t, s, priors, cols, unstable_only=True)
        levels.append((lvl, np.ascontiguousarray(Xsh[u]), Cl, Cq))
        with np.errstate(over="ignore", invalid="ignore"):
            # stable product and factor of level s - 1: gG q_{s-1} (cX_s + cG_s . |z|)
            q = row_max(kappa(chain, s - 1, priors[s - 2]))
            gG = gamma(chain.widths[s - 1] + 3, dt)
            cX = abs_col_sums(Xsh, dt, st, lvl["colw_st"])
            e_sh += (dt.type(gG) * q)[:, None] * cX[None, :]
            Hc[:, :r] += (dt.type(gG) * q)[:, None] * lvl["cG"][None, :]
            if r:  # unstable operand fl(fl(G[u] z) + Xsh[u]): gamma(r + 2) p_s (|Xsh[u]| + |G[u]| . |z|)
                p_s = row_max(kappa(chain, s, priors[s - 1], cols))
                gR = dt.type(gamma(r + 2, dt))
                xu = abs_col_sums(Xsh, dt, u)
                e_sh += (gR * p_s)[:, None] * xu[None, :]
                Hc[:, :r] += (gR * p_s)[:, None] * lvl["gu"][None, :]
        Vs = _workspace((pool, "pass1.Vs"), (st.size, cp), dt)
        Vs[:, :c] = Xsh[st]
        Vs[:, c:] = 0.0
        Ms = lvl["Ms"]
        Xsh = panel_matmul(Ms, Vs, P, out=_workspace((pool, "pass1.out"), (Ms.shape[0], cp), dt))[:, :c]
    # Top (level 1, Y = A exact): stable neurons exactly, unstable ones by the sign rule of Eq. 10-11.
    alive1, st1, u1 = top["alive"], top["st"], top["u"]
    B1 = np.ascontiguousarray(A[:, alive1[st1]] * top["hi_st"][None, :])
    Tsh = tile_matmul(B1, Xsh[st1], P, chain.row_tile)  # (R, c)
    H = np.ascontiguousarray(tile_matmul(B1, top["G_st"], P, chain.row_tile))  # (R, r)
    A_u = np.ascontiguousarray(A[:, alive1[u1]])
    Xsh_u = np.ascontiguousarray(Xsh[u1])
    del B1
    # Top allowance: gT q_1 (sum_r |Xsh_1[r]| + colsum|G_1| . |z|) for Tsh, H, H z and the unstable operands
    # (rounding module), and gT kappa_1 |x| per entry of the unstable ones in the kernel.
    Cl1 = level_coefficients(chain, t, 1, priors, alive1[u1])[0]
    with np.errstate(over="ignore", invalid="ignore"):
        q1 = dt.type(gamma(chain.rounding_length(t), dt)) * row_max(kappa(chain, 1, priors[0], alive1))
        x1 = abs_col_sums(Xsh, dt)
        e_sh += q1[:, None] * x1[None, :]
        Hc += q1[:, None] * top["g1"][None, :]
    # Pass 2, per chunk of rows: the per-row factors Z and the accumulation, in the order of the dense recursion.
    Rs = shared_row_chunk(R, c, r_total)
    for j0 in range(0, R, Rs):
        j1 = min(R, j0 + Rs)
        n = j1 - j0
        npad_c = -(-(2 * n * c) // P) * P
        Z = _workspace((pool, "shared.Z"), (r_total, npad_c), dt)  # every row is written by its level below
        Z[:, 2 * n * c :] = 0.0
        keep = np.zeros((n, r_total), dtype=np.uint8)  # keep[j, i] = 0: Z[i] is structurally zero for row j
        acc_c = np.zeros((2, n, c), dtype=dt)
        err_c = np.zeros((4, n, c), dtype=dt)
        for lvl, xsh_u, Cl, Cq in levels:
            u, r = lvl["u"], lvl["r"]
            # Per-row operand on the unstable neurons (without Xsh[u], which prep_level adds).
            Xu = _shared_matmul(lvl["Gu"], Z, keep, r, n, c, P, pool)
            cols = lvl["alive"][u]
            prior = priors[lvl["s"] - 1]
            Lp = np.ascontiguousarray(np.asarray(prior["lower"][j0:j1], dtype=dt)[:, cols])
            Up = np.ascontiguousarray(np.asarray(prior["upper"][j0:j1], dtype=dt)[:, cols])
            Sp = sign_slack(np.asarray(prior["allowance"][j0:j1], dtype=dt)[:, cols])
            Cl_c, Cq_c = np.ascontiguousarray(Cl[j0:j1]), np.ascontiguousarray(Cq[j0:j1])
            in_term1 = np.zeros((n, u.size), dtype=np.uint8)
            nnz = np.zeros(n, np.int64)
            if Xu is None:  # no per-row part (yet): the operand is Xsh[u] for every row and both chains
                kernels.prep_level(
                    xsh_u, True, Lp, Up, Sp, lvl["lo_u"], lvl["hi_u"], n, c, Z[r : r + u.size], acc_c, in_term1, nnz,
                    kernels.no_add(dt), Cl_c, Cq_c, err_c,
                )
            else:
                kernels.prep_level(
                    Xu, False, Lp, Up, Sp, lvl["lo_u"], lvl["hi_u"], n, c, Z[r : r + u.size], acc_c, in_term1, nnz, xsh_u,
                    Cl_c, Cq_c, err_c,
                )
            del Xu
            # Term I neurons of a row (and every neuron of a row whose prepared operand vanished) leave exact zeros
            keep[:, r : r + u.size] = (in_term1 == 0) & (nnz > 0)[:, None]
        acc_c[0] += Tsh[j0:j1]
        acc_c[1] += Tsh[j0:j1]
        kernels.rowdot_acc(H[j0:j1], Z, n, c, acc_c, keep)
        Xu = _shared_matmul(top["G_u"], Z, keep, r_total, n, c, P, pool)
        if Xu is None:
            Xu = np.zeros((u1.size, npad_c), dtype=dt)
        kernels.top_level(Xu, A_u[j0:j1], top["lo_u"], top["hi_u"], n, c, acc_c, Xsh_u,
                          np.ascontiguousarray(Cl1[j0:j1]), err_c)
        kernels.rowdot_abs_acc(np.ascontiguousarray(Hc[j0:j1]), Z, n, c, err_c, keep)
        err_c[0] += e_sh[j0:j1]
        err_c[1] += e_sh[j0:j1]
        acc[:, j0:j1] = acc_c  # acc starts at zero: the same bits as accumulating in place
        err[:, j0:j1] = err_c


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


def recurjac_step(chain: Chain, t: int, V: np.ndarray, priors) -> dict:
    """Certified bounds of ``P_{t-1} Σ_t V`` for a block of rows (Zhang et al. 2019, Algorithm 1, Theorem 1).

    Parameters
    ----------
    chain : Chain
        Only ``chain.mats[:t-1]``, ``chain.dl[:t]``, ``chain.du[:t]`` and ``chain.panel`` are read.
    t : int
        Layer step, ``1 <= t <= chain.n_steps``.
    V : ndarray, shape (d_t, c) or (R_blk, d_t, c)
        The column panel ``M_t[:, cols]``, or one operand per row (Algorithm 2 pushes ``V_j = W(1) s_j`` through
        the last step ``t = T`` of the backward chain: ``V`` of shape ``(R_blk, n_1, 1)``).
    priors : sequence of dict
        ``priors[s]`` for ``s = 0..t-1``: the state of step ``s`` for the block's rows (all columns):
        ``"lower"``, ``"upper"``, ``"allowance"`` of shape ``(R_blk, d_{s+1})``; ``priors[0]`` is :func:`top_state`.

    Returns
    -------
    dict
        ``"lower"``, ``"upper"``: certified bounds, shape ``(R_blk, c)``, widened outward for rounding;
        ``"allowance"``: what rounding may have cost them (:mod:`recurjac_scale.jacobian.rounding`).
    """
    dt = np.dtype(chain.dtype)
    V = np.asarray(V, dtype=dt)
    A = np.asarray(priors[0]["upper"], dtype=dt)
    R = A.shape[0]
    perrow = V.ndim == 3
    c = V.shape[-1]
    dl_t, du_t = chain.dl[t - 1], chain.du[t - 1]
    if R == 0 or c == 0:
        z = np.zeros((R, c), dtype=dt)
        return {"lower": z, "upper": z.copy(), "allowance": z.copy()}

    if t == 1 and not perrow:
        # P_0 = M_0 exact: max/min over sigma in [dl, du] of A D(sigma) V = A D(mid) V ± |A| D(rad) |V| (Eq. 10-11),
        # the centre over the live neurons (mid = 0 on dead ones), the radius over the unstable ones (rad = 0 on the
        # others).  (Sparse x dense when level 1 is pruned: fixed-order sums of <= d_1 terms, panel_products.)
        live, unst = live_neurons(chain, t), unstable_neurons(chain, t)
        mid = 0.5 * (dl_t[live] + du_t[live])
        rad = 0.5 * (du_t[unst] - dl_t[unst])
        center, radius, mag = panel_products(
            chain, t, V, (_scaled_cols(A, live, mid), False, live), (_scaled_cols(A, unst, rad, True), True, unst),
            (_scaled_cols(A, live, du_t[live], True), True, live),
        )
        # Local error: terms |A| mid |V| + |A| rad |V| = |A| D(du) |V| (rounding module), one product of length d_1.
        n = V.shape[0] + 8 + (0 if dt == np.float64 else 8)
        w = widening(chain, t, mag, n=n)
        lower, upper = widen_outward(center - radius, center + radius, w)
        return {"lower": lower, "upper": upper, "allowance": 2.0 * w}

    P = chain.panel
    ncols = 2 * R * c
    npad = -(-ncols // P) * P
    acc = np.zeros((2, R, c), dtype=dt)
    err = np.zeros((4, R, c), dtype=dt)  # running allowance: rounding per chain, then prior allowances per chain
    alive = _alive(du_t)
    if not perrow and uses_sharing(chain, t):
        _shared_levels(chain, t, V, priors, A, R, c, P, acc, err)
        return _finish_step(chain, t, acc, err)
    if perrow:
        X = np.zeros((alive.size, npad), dtype=dt)
        Xv = np.transpose(V[:, alive, :], (1, 0, 2)).reshape(alive.size, R * c)
        X[:, : R * c] = Xv
        X[:, R * c : ncols] = Xv
        shared = False
    else:
        X = np.ascontiguousarray(V[alive])  # shared by every row and both chains at the first level
        shared = True
    for s in range(t, 1, -1):
        # Level s: Y = P_{s-1} is bounded by priors[s-1]; expand into M_{s-1} = chain.mats[s-2].
        lo, hi = chain.dl[s - 1][alive], chain.du[s - 1][alive]
        Lp = np.asarray(priors[s - 1]["lower"], dtype=dt)[:, alive]
        Up = np.asarray(priors[s - 1]["upper"], dtype=dt)[:, alive]
        Sp = sign_slack(np.asarray(priors[s - 1]["allowance"], dtype=dt)[:, alive])
        Cl, Cq = level_coefficients(chain, t, s, priors, alive)
        alive_up = _alive(chain.du[s - 2])
        M = _level_matrix(chain, s - 2, alive_up, alive, dt)
        if shared:
            X = _first_level(X, M, Lp, Up, Sp, lo, hi, R, c, P, npad, acc, Cl, Cq, err,
                             _stable_error(chain, s, priors, alive, X))
        elif perrow and s == t and (lo == hi).any():
            # The stable neurons' allowance as in _first_level (row by row): the same bits as a shared V per row.
            st = np.flatnonzero(lo == hi)
            Cl[:, st] = 0.0
            for j in range(R):
                e_st = _stable_error(chain, s, [{k: v[j : j + 1] for k, v in p.items()} if p is not None else None
                                                for p in priors], alive, V[j][alive])(st)
                err[0, j] += e_st[0]
                err[1, j] += e_st[0]
            X = _level(X, False, M, Lp, Up, Sp, lo, hi, R, c, P, npad, acc, Cl, Cq, err)
        else:
            X = _level(X, False, M, Lp, Up, Sp, lo, hi, R, c, P, npad, acc, Cl, Cq, err)
        shared = False
        alive = alive_up
        if X is None:  # all operands vanished (every neuron of every row in I_j or dead)
            break
    if X is not None:
        kernels.top_level(
            X,
            np.ascontiguousarray(A[:, alive]),
            np.ascontiguousarray(chain.dl[0][alive]),
            np.ascontiguousarray(chain.du[0][alive]),
            R,
            c,
            acc,
            kernels.no_add(dt),
            level_coefficients(chain, t, 1, priors, alive)[0],
            err,
        )
    return _finish_step(chain, t, acc, err)


def _stable_error(chain: Chain, s: int, priors, alive: np.ndarray, V: np.ndarray):
    """The allowance of the shared stable product of :func:`_first_level` at level ``s``: a function of the stable
    neurons ``st`` (indices into ``alive``) returning ``gG q_{s-1}[j] (colsum_{s-1} du)[st] . |V[st, k]|``, shape
    ``(R, c)`` (rounding module: the GEMM error of ``M[:, st] D(du) V[st]`` weighted by the priors of level
    ``s - 1``)."""
    dt = np.dtype(chain.dtype)

    def err(st):
        cols = alive[st]
        colw = (column_abs_sums(chain, s - 1)[cols] * chain.du[s - 1][cols]).astype(dt)
        with np.errstate(over="ignore", invalid="ignore"):
            w = abs_col_sums(V, dt, st, colw)  # (c,)
            q = row_max(kappa(chain, s - 1, priors[s - 2]))
            g = gamma(chain.widths[s - 1] + 3, dt)
            return (dt.type(g) * q)[:, None] * w[None, :]

    return err


def _finish_step(chain: Chain, t: int, acc: np.ndarray, err: np.ndarray) -> dict:
    """Widen the step's bounds (``acc[0]`` upper, ``acc[1]`` lower) by their rounding allowance and state the
    allowance of the result (rounding module: ``2 w_t`` plus the propagated allowance of the priors)."""
    w_up = step_widening(chain, t, err[0])
    w_lo = step_widening(chain, t, err[1])
    lower, upper = widen_outward(acc[1], acc[0], w_lo, w_up)
    with np.errstate(over="ignore", invalid="ignore"):
        prop = np.maximum(err[2], err[3]) * (1.0 + gamma(chain.rounding_length(t), chain.dtype))
        allowance = 2.0 * np.maximum(w_up, w_lo) + prop
    allowance = np.where(np.isnan(allowance), np.inf, allowance)
    return {"lower": lower, "upper": upper, "allowance": allowance}
