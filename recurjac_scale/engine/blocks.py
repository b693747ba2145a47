"""The engine's view of a Jacobian method: its chain's shape and its block functions.

The engine never decides *what* is computed: a method (``fastlip``, ``recurjac-b``, ``recurjac-f0``,
``recurjac-f1``, from :mod:`recurjac_scale.jacobian`) is adapted here to the few things the engine needs
(:class:`BlockMethod`):

- ``build(network, derivative_bounds) -> chain``: the chain ``P = M_0 Σ_1 M_1 ... Σ_T M_T`` of the method;
- ``shape(chain) -> ChainShape``: rows ``R``, widths ``(d_1, ..., d_{T+1})``, the state keys, which earlier steps a
  step reads, and the per-entry cost used by the plan;
- ``step_block(chain, t, rows, cols, priors) -> {key: (R_blk, c)}``: bounds of ``P_{t-1} Σ_t M_t[:, cols]`` for the
  rows ``rows``, given ``priors[s][key]`` (rows ``rows``, all ``d_{s+1}`` columns) for the earlier steps ``s``;
- ``finish(chain, final_state, cols) -> (lower, upper)``: columns ``cols`` of the ``(m, n_0)`` Jacobian bounds from
  the last step's full state.

:class:`JobContext` (built in the client by :func:`prepare_job`) holds the network, region and pre-activation
bounds of one job; :class:`WorkerSpec` is the picklable part shipped to workers, which rebuild (and cache, per
process) the chain from it: from numpy weights of a small network, or from the zarr model store's path.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..errors import InputError

__all__ = [
    "BLOCK_METHODS",
    "BlockMethod",
    "ChainShape",
    "JobContext",
    "WorkerSpec",
    "get_block_method",
    "prepare_job",
    "register_block_method",
    "in_memory_bounds",
]


@dataclass(frozen=True)
class ChainShape:
    """Shape of a chain as the plan needs it.

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
        (:func:`recurjac_scale.jacobian.recurjac.uses_sharing`, a chain-only decision); empty: unknown, the memory
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
        (:func:`recurjac_scale.jacobian.recurjac._shared_levels`) on blocks of ``rows x cols``.

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
        from ..jacobian.chain import row_tile_for

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
        from ..jacobian.recurjac import GATHER_BYTES

        from ..jacobian.recurjac import shared_row_chunk

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
        (``live_{s-1} x live_s`` float64, :func:`recurjac_scale.jacobian.recurjac._level_matrix`) while the
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

    def max_matrix_bytes(self) -> int:
        """The largest chain matrix in float64 (what a streaming task holds at a time)."""
        d = self.widths
        return int(8 * max([self.n_rows * d[0], *(d[s - 1] * d[s] for s in range(1, len(d)))]))

    def weights_bytes(self) -> int:
        """All chain matrices ``M_0 .. M_T`` in float64, plus the CSR copies of the sparse levels."""
        d = self.widths
        return int(8 * (self.n_rows * d[0] + sum(d[s - 1] * d[s] for s in range(1, len(d))))) + int(self.sparse_bytes)


class BlockMethod(Protocol):
    """What the engine needs from a Jacobian method (see the module docstring)."""

    name: str

    def build(self, network, derivative_bounds) -> Any: ...

    def shape(self, chain) -> ChainShape: ...

    def step_block(self, chain, t: int, rows: slice, cols: slice, priors: dict) -> dict: ...

    def finish(self, chain, final: dict, cols: slice) -> tuple[np.ndarray, np.ndarray]: ...

    def in_memory(self, network, derivative_bounds) -> tuple[np.ndarray, np.ndarray]: ...


BLOCK_METHODS: dict[str, BlockMethod] = {}
"""Registry: Jacobian method name -> :class:`BlockMethod` adapter."""


def register_block_method(name: str, adapter: BlockMethod) -> BlockMethod:
    BLOCK_METHODS[name] = adapter
    return adapter


def get_block_method(name: str) -> BlockMethod:
    """The adapter of a Jacobian method (the methods of :mod:`recurjac_scale.jacobian` are registered on first
    use).

    Raises
    ------
    InputError
        For an unknown method.
    """
    key = str(name).strip().lower().replace("_", "-")
    if key in BLOCK_METHODS:
        return BLOCK_METHODS[key]
    from ._jacobian_adapters import adapter_for  # registers the methods of recurjac_scale.jacobian

    return adapter_for(key)


# -- worker side ---------------------------------------------------------------------------------------------
_CHAINS: dict[str, Any] = {}
_CHAINS_LOCK = threading.Lock()


@dataclass(frozen=True)
class WorkerSpec:
    """Picklable recipe of a job's chain, rebuilt once per worker process (:meth:`chain`).

    Attributes
    ----------
    key : str
        The job hash (cache key).
    method : str
    network : Network or None
        In-memory network (numpy weights), shipped with the graph (once per worker under distributed).
    store_path : str or None
        Model store read by each worker process instead (weights never pass through the scheduler).
    outputs : ndarray (m, n_H) or None
        Output selection folded into the last layer after loading from the store.
    derivative_bounds : list of (ndarray, ndarray)
        ``(dl, du)`` per hidden layer, computed in the client from the pre-activation bounds (workers never
        recompute them, so every worker uses exactly the client's values, which the job hash covers).
    state_keys : tuple of str
    n_steps : int
    priors : tuple of tuple of int
        As :attr:`ChainShape.priors`.
    stream : bool
        Keep the weights in the store: every task reads the matrices it needs
        (:mod:`recurjac_scale.engine.streaming`) instead of the worker holding the network.
    sparse_levels : tuple of int
        Chain levels that run sparse x dense (``Chain.sparse_levels`` of the client's chain; empty: dense).  Each
        worker process builds their CSR copies once, with its chain (read from the store's CSR arrays when the
        weights are streamed).
    """

    key: str
    method: str
    network: Any
    store_path: str | None
    outputs: Any
    derivative_bounds: Any
    state_keys: tuple
    n_steps: int
    priors: tuple
    stream: bool = False
    sparse_levels: tuple = ()

    def prior_steps(self, t: int) -> tuple[int, ...]:
        return tuple(self.priors[t - 1])

    def chain(self) -> "BoundChain":
        """The chain of this job in this process (built on first use, then cached)."""
        c = _CHAINS.get(self.key)
        if c is not None:
            return c
        with _CHAINS_LOCK:
            c = _CHAINS.get(self.key)
            if c is None and self.stream and self.store_path is not None:
                from .streaming import streamed_chain

                adapter = get_block_method(self.method)
                chain = streamed_chain(adapter.method, self.store_path, self.outputs, self.derivative_bounds)
                c = BoundChain(adapter, adapter.sparse(chain, self.sparse_levels))
                _CHAINS.clear()
                _CHAINS[self.key] = c
            if c is None:
                net = self.network
                if net is None:
                    import dask

                    from ..network.store import open_network

                    # Read the store chunk by chunk in this thread: a compute() inside a task must never go back
                    # to the cluster's scheduler (with one thread per worker that deadlocks).
                    with dask.config.set(scheduler="synchronous"):
                        net = open_network(self.store_path).materialize()
                    if self.outputs is not None:
                        net = net.with_outputs(self.outputs)
                adapter = get_block_method(self.method)
                c = BoundChain(adapter, adapter.build(net, self.derivative_bounds, self.sparse_levels))
                if len(_CHAINS) >= 2:  # keep at most two jobs' weights per process
                    _CHAINS.clear()
                _CHAINS[self.key] = c
        return c


@dataclass
class BoundChain:
    """A built chain with its method's block functions."""

    adapter: Any
    chain: Any

    def step_block(self, t, rows, cols, priors):
        return self.adapter.step_block(self.chain, t, rows, cols, priors)

    def finish(self, final, cols):
        return self.adapter.finish(self.chain, final, cols)

    def rounding_share(self, final, cols, lower, upper) -> float | None:
        """The rounding share of the result columns ``cols`` (``None`` when the method does not state one)."""
        f = getattr(self.adapter, "finish_allowance", None)
        if f is None:
            return None
        from ..jacobian.rounding import rounding_share

        return rounding_share(lower, upper, f(self.chain, final, cols))

    def initial_state(self):
        """State 0 (the exact top ``M_0``) for all rows."""
        return self.adapter.initial_state(self.chain)


# -- client side ---------------------------------------------------------------------------------------------
@dataclass
class JobContext:
    """One job as prepared in the client (see :func:`prepare_job`)."""

    method: str
    layer_bound_method: str
    eps: float
    p: float
    network: Any
    store_path: str | None
    outputs: Any
    x0: np.ndarray
    layer_bounds: Any
    derivative_bounds: Any
    adapter: Any
    chain: Any
    shape: ChainShape
    unstable: tuple
    dead: tuple
    stream: bool = False
    sparse_levels: tuple = ()
    _hash_base: dict = field(default_factory=dict, repr=False)

    @property
    def widths(self) -> tuple:
        return tuple(self.network.widths)

    @property
    def n_inputs(self) -> int:
        return int(self.network.n_inputs)

    @property
    def n_outputs(self) -> int:
        return int(self.network.n_outputs)

    @property
    def rounding(self) -> str:
        return getattr(self.chain, "rounding", "") or "see recurjac_scale.jacobian (per-method outward widening)"

    def job_id(self, row_block: int, col_block: int) -> str:
        from .checkpoint import job_hash

        net = self.network
        arrays = [*net.weights, *net.biases, self.x0]
        params = dict(self._hash_base, row_block=int(row_block), col_block=int(col_block))
        return job_hash(arrays, params)

    def worker_spec(self) -> WorkerSpec:
        key = self.job_id(0, 0)
        use_store = self.store_path is not None
        return WorkerSpec(
            key=key,
            method=self.method,
            network=None if use_store else self.network,
            store_path=self.store_path,
            outputs=self.outputs,
            derivative_bounds=self.derivative_bounds,
            state_keys=tuple(self.shape.state_keys),
            n_steps=self.shape.n_steps,
            priors=tuple(self.shape.priors),
            stream=bool(self.stream and use_store),
            sparse_levels=tuple(self.sparse_levels),
        )

    def describe(self) -> dict:
        d = self.network.describe()
        d["store"] = self.store_path
        return d


def _sha(arrays) -> str:
    import hashlib

    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(np.asarray(a, dtype=np.float64))
        h.update(repr(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def prepare_job(network, x0, eps, p, method, layer_bounds=None, outputs=None, sparse_threshold="auto") -> JobContext:
    """Open the network, fold the output selection, compute the pre-activation bounds (in this process) and build
    the method's chain: everything a plan needs, nothing heavy.

    Follows :func:`recurjac_scale.jacobian.jacobian_bounds` step by step (output matrix, global bounds for
    ``eps = inf`` without a domain, default layer-bound method, derivative bounds), so that the engine's result is
    the in-memory result.  ``sparse_threshold`` (:func:`recurjac_scale.jacobian.chain.sparse_chain`): ``"auto"``
    (default) runs the layers a model store holds as CSR sparse x dense, a number the levels with density below
    it, ``0`` / ``None`` none; the choice is made here, once, and shipped to the workers as level numbers.
    """
    from ..jacobian import api as _api
    from ..jacobian.chain import sparse_chain, stored_sparse_layers
    from ..layer_bounds.base import LayerBounds, Region, layer_bounds as compute_layer_bounds
    from ..network.model import Network

    store_path = None
    if not isinstance(network, Network):
        from ..network.store import open_network

        store_path = str(Path(network).resolve())
        network = open_network(store_path)
    if network.is_lazy:
        import dask

        # Read the store here, in the client (threads of this process): never through a distributed Client that
        # may be dask's default, whose workers are not meant to hold the network (out-of-core jobs).
        with dask.config.set(scheduler="threads"):
            net = network.materialize()
    else:
        net = network
    region = Region.of(net, x0, eps, p)
    C = _api.output_matrix(outputs, net.n_outputs)
    netC = net.with_outputs(C)
    adapter = get_block_method(method)
    if isinstance(layer_bounds, LayerBounds):
        lb = layer_bounds
        lb_name = lb.method
    elif math.isinf(region.eps) and region.lower is None:
        lb = _api._global_layer_bounds(netC, region)
        lb_name = "global"
    else:
        lb_name = _api.default_layer_bound_method() if layer_bounds is None else str(layer_bounds).strip().lower()
        lb = compute_layer_bounds(netC, region.x0, region.eps, region.p, method=lb_name)
    db = [(np.asarray(dl, np.float64), np.asarray(du, np.float64)) for dl, du in _api.derivative_bounds_for(netC, lb)]
    chain = sparse_chain(adapter.build(netC, db), sparse_threshold, stored_sparse_layers(network))
    sparse_levels = tuple(chain.sparse_levels()) if hasattr(chain, "sparse_levels") else ()
    shape = adapter.shape(chain)
    dead = [int(np.count_nonzero(np.asarray(du) == 0)) for _dl, du in db]
    unstable = [int(np.count_nonzero(np.asarray(dl) < np.asarray(du))) for dl, du in db]
    ctx = JobContext(
        method=adapter.name,
        layer_bound_method=lb_name,
        eps=float(region.eps),
        p=float(region.p),
        network=netC,
        store_path=store_path,
        outputs=C,
        x0=np.asarray(region.x0, dtype=np.float64),
        layer_bounds=lb,
        derivative_bounds=db,
        adapter=adapter,
        chain=chain,
        shape=shape,
        unstable=tuple(unstable),
        dead=tuple(dead),
        sparse_levels=sparse_levels,
    )
    ctx._hash_base = {
        "method": adapter.name,
        "layer_bounds": lb_name,
        "eps": repr(float(region.eps)),
        "p": repr(float(region.p)),
        "activations": [a.to_spec() for a in netC.layer_activations],
        "domain": None if region.lower is None else _sha([region.lower, region.upper]),
        # the pre-activation bounds themselves: a changed layer-bound implementation is a different job
        "layer_bound_values": _sha([*lb.lower, *lb.upper]),
        "derivative_bounds": _sha([a for pair in db for a in pair]),
        "panel": int(getattr(chain, "panel", 0)),
        "dtype": "float64",
        # sparse and dense kernels differ in the last bits: a checkpoint must not mix them
        **({"sparse_levels": list(sparse_levels)} if sparse_levels else {}),
    }
    return ctx


def in_memory_bounds(
    network, x0, eps, p=math.inf, method="recurjac-b", layer_bounds=None, outputs=None, sparse_threshold="auto"
):
    """The method's own in-memory result ``(lower, upper)`` (m, n_0) for the same job: the reference every engine
    run must reproduce."""
    ctx = prepare_job(network, x0, eps, p, method, layer_bounds, outputs, sparse_threshold)
    return ctx.adapter.in_memory(ctx.network, ctx.derivative_bounds, ctx.sparse_levels)
