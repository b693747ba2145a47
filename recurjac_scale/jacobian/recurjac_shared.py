"""Sharing across rows in the RecurJac step (:mod:`recurjac_scale.jacobian.recurjac`), the variant for the
nearly-linear regime.

The operand of every level is kept as a part shared by all rows plus a low-rank per-row part on the unstable
neurons (:func:`_shared_levels`); per row only the unstable neurons are prepared and multiplied, each row on its own
non-zero per-row factors.  :func:`uses_sharing` decides, from the chain alone, which steps take it; the chain-only
factors are computed once per process and step and kept within :data:`SHARED_CACHE_BYTES`
(:func:`_shared_factors`); the rows run in chunks of :func:`shared_row_chunk`.  In exact arithmetic it is the same
sum as the dense recursion; the rounding allowance is described in :mod:`recurjac_scale.jacobian.rounding`
("Sharing across rows").
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
from .products import panel_matmul, tile_matmul
from .recurjac_levels import _alive, _cols, _level_matrix, _shared_matmul, _thread_workspace, _workspace
from .rounding import abs_col_sums, column_abs_sums, kappa, level_coefficients, row_max, sign_slack


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
