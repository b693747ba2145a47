"""Cost model of the Jacobian methods, next to the kernels it models: FLOPs, bytes read and peak memory of one
``(rows x cols)`` task at step ``t`` of a chain (:mod:`recurjac_scale.jacobian.chain`).

:meth:`recurjac_scale.jacobian.JacobianMethod.cost` gives a :class:`ChainCost` for a built chain; the engine's plan
(:mod:`recurjac_scale.engine.plan`) chooses block sizes and checks the memory budget from it and never looks
inside a method.  The FLOP counts follow ALGORITHM.md ("Cost") and the kernels of
:mod:`recurjac_scale.jacobian.recurjac` (recursion, sharing across rows, gathers of compacted rows) and
:mod:`recurjac_scale.jacobian.fastlip`; the memory estimates are checked against tracemalloc in the tests.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..network.sparse import csr_nbytes
from .products import row_tile_for
from .recurjac_levels import GATHER_BYTES
from .recurjac_shared import SHARED_CACHE_BYTES, shared_row_chunk, uses_sharing

__all__ = ["ChainCost", "chain_cost", "F64"]

F64 = 8
"""Bytes of a float64 (the engine's state and weights are float64)."""


@dataclass(frozen=True)
class ChainCost:
    """The cost model of one method on one chain: FLOPs, bytes and peak memory of a ``(rows x cols)`` task at step
    ``t`` (what the engine's plan sizes its blocks and workers with).

    Attributes
    ----------
    n_rows : int
        ``R``, rows of ``M_0`` (the independent rows).
    widths : tuple of int
        ``(d_1, ..., d_{T+1})``: ``M_t`` has shape ``(d_t, d_{t+1})``; the state of step t has ``d_{t+1}`` columns.
    live : tuple of int
        Per ``Σ_t`` (t = 1..T), neurons with ``du > 0`` (dead neurons drop out of every GEMM).
    priors : tuple of tuple of int
        ``priors[t - 1]``: the earlier steps ``s >= 1`` whose state (the task's rows, all columns) a task of step
        ``t`` reads.  Step 0 (``M_0``, exact) is never stored: tasks take its rows from the chain.
    state_keys : tuple of str
        Arrays of the per-row state (``lower``, ``upper``, ``allowance``).
    depth : str
        ``"recursive"`` (a step's recursion descends to the top: RecurJac) or ``"interval"`` (one level:
        Fast-Lip); selects the cost model.
    panel : int
        GEMM panel width of the chain (operands are padded to it), for the memory model.
    level_nnz : tuple
        Per level ``t`` (``M_t``): ``None`` for a dense level, or ``(nnz, nnz_live)`` for a level that runs sparse
        (``Chain.with_sparse``): its stored entries, and those in the live block ``M_t[alive_t, alive_{t+1}]``
        that the recursion multiplies (all columns for ``t = T``).  Empty: every level dense.
    sparse_bytes : int
        Bytes of the CSR copies the chain holds (values, indices, row pointers), besides the dense matrices.
    unstable : tuple of int
        Per ``Σ_t``, live neurons with ``dl < du`` (empty: unknown, counted as all live ones).
    shares : tuple of bool
        Per step, whether the recursion shares the stable part across rows
        (:func:`recurjac_scale.jacobian.recurjac_shared.uses_sharing`, a chain-only decision); empty: unknown, the memory
        model then counts the larger of both variants.
    """

    n_rows: int
    widths: tuple
    live: tuple
    priors: tuple
    state_keys: tuple = ("lower", "upper", "allowance")
    depth: str = "recursive"
    panel: int = 128
    level_nnz: tuple = ()
    sparse_bytes: int = 0
    unstable: tuple = ()
    shares: tuple = ()

    @property
    def n_steps(self) -> int:
        return len(self.widths) - 1

    def _nnz(self, t: int):
        return self.level_nnz[t - 1] if self.level_nnz else None

    def _entries(self, t: int, *, live: bool, d_live: tuple) -> float:
        """Multiply-adds per output column of one level product with ``M_t`` restricted to its live block (the
        recursion's ``M_t[alive_t, alive_{t+1}] @ X``): ``live_t live_{t+1}`` dense, the block's nnz sparse."""
        nz = self._nnz(t)
        if nz is not None:
            return float(nz[1] if live else nz[0])
        return float(d_live[t - 1] * d_live[t])

    def _panel_entries(self, t: int, live: bool = True) -> float:
        """Multiply-adds per state entry of a product of a row with a column of the panel ``M_t[:, cols]`` (step 1,
        Fast-Lip): ``live_t`` dense (dead neurons are not multiplied; ``d_t`` when
        ``live=False``), the average stored entries per column (``nnz / d_{t+1}``, counting the dead rows too)
        sparse."""
        nz = self._nnz(t)
        d = self.widths
        if nz is not None:
            return float(nz[0]) / max(1, d[t])
        return float(self.live[t - 1] if live and self.live else d[t - 1])

    def prior_steps(self, t: int) -> tuple[int, ...]:
        """Earlier stored steps (>= 1) a task of step ``t`` reads."""
        return tuple(self.priors[t - 1])

    def flops_per_entry(self, t: int, *, live: bool = True, block: tuple | None = None) -> float:
        """Floating-point operations per state entry (row, column) of step ``t``, before the per-row masks.

        Recursive (ALGORITHM.md, "Cost"; recurjac_scale.jacobian.recurjac): level ``s`` of a row's recursion is
        one GEMM ``M_{s-1}[alive_{s-1}, alive_s] @ X`` for both chains (upper, lower): ``2 * 2 live_{s-1}
        live_s`` per entry, s = t..2; the top is ``2 * 2 live_1``, step 1 the midpoint-radius products (``2 (live_1 +
        unstable_1)``).  Interval (Fast-Lip): centre, and radius stacked with the priors' allowance, ``3 * 2
        live_t``.  ``live=False`` counts every neuron (dense worst case).  Per-row masks (Term I neurons)
        are known only at run time: the estimate counts them as expanded (the work issued is usually far lower,
        but a mostly uncompacted product recomputes its few compacted rows, so it is not a strict bound; padding of
        the GEMM panels is not counted either).
        A level that runs sparse (:attr:`level_nnz`) counts its stored entries instead of ``rows x columns``: its
        level GEMM ``2 * 2 nnz_live`` (``nnz`` when ``live=False``), its panel products (step 1,
        Fast-Lip) ``nnz / d_{t+1}`` per entry instead of ``d_t``.

        A step that shares the stable part across rows (:attr:`shares`, ``live=True``) is counted by that
        variant's model (:meth:`_shared_flops_per_entry`), which needs the task's ``block = (rows, cols)``: its
        shared products are computed once per block.  Without ``block`` the dense recursion is counted.
        """
        d = self.widths
        n_live = (*(self.live if live else d[: self.n_steps]), d[self.n_steps])
        if self.depth == "interval":
            return 3.0 * 2.0 * self._panel_entries(t, live)
        if live and block is not None and t >= 2 and self.shares and self.shares[t - 1]:
            return self._shared_flops_per_entry(t, *block)
        gemm = sum(2.0 * 2.0 * self._entries(s - 1, live=live, d_live=n_live) for s in range(2, t + 1))
        if t == 1 and self._nnz(1) is not None:
            top = 2.0 * 2.0 * self._panel_entries(1)
        elif t == 1:  # centre over the live neurons, radius over the unstable ones
            top = 2.0 * (n_live[0] + (self._unstable(1) if live else d[0]))
        else:
            top = 2.0 * 2.0 * n_live[0]
        return gemm + top

    def _shared_flops_per_entry(self, t: int, rows: int, cols: int) -> float:
        """GEMM FLOPs per state entry of step ``t`` run with sharing across rows
        (:func:`recurjac_scale.jacobian.recurjac_shared._shared_levels`) on blocks of ``rows x cols``.

        Per row and column, both chains: at level ``s`` (``t .. 2``) the per-row factor product
        ``G_s[u_s] Z`` (``u_s r_s`` multiply-adds, ``r_s`` the unstable neurons of the levels above), at the top
        ``G_1[u_1] Z`` and ``H Z`` (``(u_1 + 1) r``), and the shared top product ``Tsh`` (``st_1``, the stable live
        neurons of level 1).  Per block and column, one chain: ``Ms Xsh`` per level (``live_{s-1} st_s``, the
        stable columns' share of the stored entries for a sparse level); per block: ``H = B_1 G_1[st]``
        (``rows st_1 r``).  The chain-only factors ``G`` (once per worker process) are not counted.
        """
        n = self.live
        u = [self._unstable(s) for s in range(1, t + 1)]
        st = [max(0, int(n[s - 1]) - u[s - 1]) for s in range(1, t + 1)]
        per_row, r = 0.0, 0
        shared_col = 0.0
        for s in range(t, 1, -1):
            per_row += 2.0 * u[s - 1] * r
            r += u[s - 1]
            nz = self._nnz(s - 1)
            entries = float(nz[1]) if nz is not None else float(n[s - 2]) * float(n[s - 1])
            shared_col += entries * st[s - 1] / max(1, int(n[s - 1]))
        per_row += 2.0 * (u[0] + 1) * r + st[0]
        rows, cols = max(1, int(rows)), max(1, int(cols))
        return 2.0 * (per_row + shared_col / rows + st[0] * r / cols)

    def work_bytes(self, t: int, rows: int, cols: int) -> int:
        """Kernel work memory of one task (float64), an upper estimate checked against tracemalloc in the tests.

        RecurJac keeps, for the whole block, the level operand, its prepared copy and the GEMM output, each
        ``(d_s, 2 rows cols)`` (padded to whole GEMM panels; a step that shares across rows instead keeps the per-row
        factors ``Z``, ``(r, 2 rows cols)`` with ``r`` the unstable neurons of its levels, and one level's product
        and prepared rows), the live weight blocks of the levels and their
        column copies (:meth:`level_bytes`), and the tile-padded operands of the top / magnitude products (rows
        and columns rounded up to the panel).  Fast-Lip: the interval hull ``(rows, d_t)`` arrays and the padded
        products.
        """
        d = self.widths
        P = max(1, int(self.panel))
        rt = row_tile_for(self.n_rows)
        Rp = -(-rows // rt) * rt  # tile_matmul pads rows to whole row tiles
        cp = -(-cols // P) * P
        if self.depth == "interval":
            dt = d[t - 1]
            return int(8 * (6 * rows * dt + 3 * Rp * dt + 3 * dt * cp + 4 * Rp * cp + 8 * rows * cols))
        dmax = max(d[:t])
        ncols = -(-2 * rows * cols // P) * P
        r = sum(self._unstable(s) for s in range(1, t + 1))  # rank of the per-row part with sharing
        umax = max((self._unstable(s) for s in range(1, t + 1)), default=0)
        # the per-row operands: dense recursion, three (d_s x ncols) matrices; shared across rows, the per-row
        # factors Z (r x ncols) and one product G[u] Z (|u| x ncols) at a time, plus its prepared rows
        dense_ops = 3 * dmax * ncols + 2 * r * ncols
        # (+ the packed columns of compacted rows and their product, GATHER_BYTES each, the row masks, the
        # top products H (rows x r) and the chunk's accumulator)
        ru = max(r, umax)
        rs = shared_row_chunk(rows, cols, r)  # the per-row part runs on chunks of rs rows
        ncols_s = -(-2 * rs * cols // P) * P
        packed = min(max(GATHER_BYTES, 16 * cols * ru), 8 * ru * ncols_s)
        shared_ops = (r + 2 * umax) * ncols_s + (2 * packed + rows * (r + umax)) // 8 + rows * r + 2 * rs * cols
        share = bool(self.shares[t - 1]) if self.shares else None
        ops = shared_ops if share else (dense_ops if share is False else max(dense_ops, shared_ops))
        if t == 1:  # step 1 is two tiled midpoint-radius products (no recursion operand)
            ops = 0
        return int(
            8 * (ops + 3 * Rp * dmax + 3 * dmax * cp + 4 * Rp * cp + 8 * rows * cols)
            + self.level_bytes(t)
        )

    def _unstable(self, s: int) -> int:
        return int(self.unstable[s - 1]) if self.unstable else int(self.live[s - 1])

    def level_bytes(self, t: int) -> int:
        """Peak bytes of live weight blocks (and their column copies) a RecurJac task of step ``t`` holds at once.

        Level ``s`` (``t .. 2``) reads the live block ``B_s = M_{s-1}[alive_{s-1}, alive_s]``
        (``live_{s-1} x live_s`` float64, :func:`recurjac_scale.jacobian.recurjac_levels._level_matrix`) while the
        previous level's block is still referenced.  Dense per-row recursion: the first level copies the columns
        of the unstable and then of the stable neurons (``_first_level``), a row with many ``I_j`` neurons copies
        its compacted columns (``_level_matmul``): ``max(B_t + 2 U_t, 2 B_t)`` at level ``t`` (``U``: the block's
        unstable columns), ``max(B_s + B_{s+1}, 2 B_s)`` below.  With sharing across rows (``_shared_levels``) the
        previous block, its scaled stable and unstable copies (another ``B_{s+1}``), the new block with a
        transient double copy of its stable columns, and the factors ``G`` (``live_{s-1} x r``) of the old and new
        level plus their product: ``2 B_{s+1} + 3 B_s + 3 G_s``.  Interval methods: 0 (their memory is in
        :meth:`work_bytes`).
        """
        if self.depth != "recursive" or t < 2:
            return 0
        n = self.live

        def B(s):  # bytes of the live block of level s
            return 8 * int(n[s - 2]) * int(n[s - 1]) if 2 <= s <= t else 0

        share = bool(self.shares[t - 1]) if self.shares else None
        dense = max(B(t) + 2 * 8 * int(n[t - 2]) * self._unstable(t), 2 * B(t))
        dense = max([dense] + [max(B(s) + B(s + 1), 2 * B(s)) for s in range(t - 1, 1, -1)])
        if share is False:
            return int(dense)
        shared = 0
        r = 0
        for s in range(t, 1, -1):
            r += self._unstable(s)
            G = 8 * int(n[s - 2]) * r
            shared = max(shared, 2 * B(s + 1) + 3 * B(s) + 3 * G)
        return int(shared if share else max(shared, dense))

    def weights_bytes(self) -> int:
        """All chain matrices ``M_0 .. M_T`` in float64, plus the CSR copies of the sparse levels."""
        d = self.widths
        return int(8 * (self.n_rows * d[0] + sum(d[s - 1] * d[s] for s in range(1, len(d))))) + int(self.sparse_bytes)


    def task_costs(self, t: int, rows: int, cols: int) -> tuple[int, int, int]:
        """``(state bytes read, weight bytes touched, peak bytes)`` of a task of step ``t`` on ``rows x cols``
        (clipped to the chain): its priors (``rows x d_{s+1}`` per stored state key and prior step), the top rows
        and weights it reads, its output block and its kernel work memory (:meth:`work_bytes`)."""
        R, d = self.n_rows, self.widths
        rows = min(rows, R)
        cols = min(cols, d[t])
        nk = len(self.state_keys)
        state = sum(rows * d[s] * nk * F64 for s in self.prior_steps(t))
        weights = rows * d[0] * F64 + sum(d[s - 1] * d[s] * F64 for s in range(1, t)) + d[t - 1] * cols * F64
        work = self.work_bytes(t, rows, cols)
        out = rows * cols * nk * F64
        return int(state), int(weights), int(state + out + work)

    def state_bytes(self) -> int:
        """Bytes of every stored state (steps ``1..T``, all keys, float64)."""
        return int(F64 * len(self.state_keys) * self.n_rows * sum(int(w) for w in self.widths[1:]))

    def shared_cache_bytes(self) -> int:
        """The most the chain-only factors of steps that share across rows keep per worker process between tasks
        (:data:`recurjac_scale.jacobian.recurjac_shared.SHARED_CACHE_BYTES`; 0 for a method without such steps)."""
        if any(self.shares) or (not self.shares and self.depth == "recursive"):
            return int(SHARED_CACHE_BYTES)
        return 0


def chain_cost(chain, priors, *, depth: str, state_keys: tuple) -> ChainCost:
    """The :class:`ChainCost` of a built chain.

    Parameters
    ----------
    chain : Chain
    priors : callable
        ``priors(t)``: the earlier steps a task of step ``t`` reads (the method's).
    depth : {"recursive", "interval"}
        The kernel family the cost model counts (RecurJac's recursion; Fast-Lip's one-level interval product).
    state_keys : tuple of str
    """
    if depth not in ("recursive", "interval"):
        raise ValueError(f"depth={depth!r}; accepted: 'recursive' or 'interval'")
    T = chain.n_steps
    shares = tuple(bool(uses_sharing(chain, t)) for t in range(1, T + 1)) if depth == "recursive" else ()
    return ChainCost(
        unstable=tuple(
            int(np.count_nonzero((np.asarray(du) > 0) & (np.asarray(dl) < np.asarray(du))))
            for dl, du in zip(chain.dl, chain.du)
        ),
        shares=shares,
        n_rows=chain.n_rows,
        widths=tuple(chain.widths),
        live=tuple(int(np.count_nonzero(np.asarray(du) > 0)) for du in chain.du),
        priors=tuple(tuple(s for s in priors(t) if s >= 1) for t in range(1, T + 1)),
        state_keys=tuple(state_keys),
        depth=depth,
        panel=int(chain.panel),
        level_nnz=_level_nnz(chain),
        sparse_bytes=_sparse_bytes(chain),
    )


def _level_nnz(chain) -> tuple:
    """Per level: ``None`` (dense) or ``(nnz, nnz of the live block M_t[alive_t, alive_{t+1}])`` (sparse)."""
    sm = chain.sparse_mats
    if not sm:
        return ()
    T = chain.n_steps
    out = []
    for t, s in enumerate(sm, start=1):
        if s is None:
            out.append(None)
            continue
        rows = np.asarray(chain.du[t - 1]) > 0
        cols = np.asarray(chain.du[t]) > 0 if t < T else np.ones(s.shape[1], dtype=bool)
        live = s[np.flatnonzero(rows)][:, np.flatnonzero(cols)]
        out.append((int(s.nnz), int(live.nnz)))
    return tuple(out)


def _sparse_bytes(chain) -> int:
    mats = [s for s in chain.sparse_mats if s is not None]
    if chain.sparse_finish is not None:
        mats.append(chain.sparse_finish)
    return int(sum(csr_nbytes(m) for m in mats))
