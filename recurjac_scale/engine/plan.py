"""The plan step: decompose a Jacobian-bound job into (row block x column block) tasks per layer step, and say
what it will cost before anything heavy runs.

A job bounds ``P_T`` of a chain ``P = M_0 Σ_1 M_1 ... Σ_T M_T`` (ALGORITHM.md, "Structure that makes it fast and
divisible"; the chain itself comes from :mod:`recurjac_scale.jacobian`).  Layer step ``t`` (1..T) computes the
bounds of ``P_t`` (shape ``(R, d_{t+1})``); its rows are independent and so are its columns, so the step splits into
``ceil(R / row_block) x ceil(d_{t+1} / col_block)`` tasks with no communication.  A task of step ``t`` reads the
state of the earlier steps for its rows only (its "priors") and the weights ``M_1 .. M_{t-1}`` and the column panel
``M_t[:, cols]``; it writes one block of the state of step ``t``.  Finishing tasks turn the last state into the
``(m, n_0)`` Jacobian bounds (a transpose for F0, the final interval product for F1).

Memory: a worker needs ``baseline + caches + weights + threads x peak task`` (:attr:`Plan.peak_worker_bytes`),
where ``baseline`` is what the worker process holds before any task (:data:`WORKER_BASELINE_BYTES`, or measured on
the workers of a given client), ``caches`` the most its per-process caches keep between tasks (:func:`cache_bytes`;
none when streaming), ``weights`` the held chain (0 when the weights are streamed from the store) and a task's
peak its priors, output, kernel work and the live weight blocks it reads (streamed: plus its column panel and the
store tiles being read).  With ``dask.distributed``, the nanny restarts a worker that passes
``distributed.worker.memory.terminate`` (95%) of its ``memory_limit``: give that fraction of the limit as the
budget (the default when a client is given).  The pre-activation bounds are computed in the client, with the whole
network in the client's memory (the client is not a worker; its memory is not part of the budget).

Entry point: :func:`plan_jacobian` -> :class:`Plan`; ``plan.compute(...)`` (:func:`recurjac_scale.engine.run.
run_plan`) executes it.  Byte sizes, block sizing and the memory facts of a cluster are in
:mod:`recurjac_scale.engine.sizing` (re-exported here).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

from .._json import json_float
from ..errors import InputError
from .blocks import prepare_job
from .sizing import (
    WORKER_BASELINE_BYTES,
    _block_grid,
    _streamed_bytes,
    cache_bytes,
    choose_blocks,
    format_bytes,
    measure_workers,
    parse_bytes,
)

__all__ = [
    "Plan",
    "StepPlan",
    "plan_jacobian",
    "parse_bytes",
    "format_bytes",
    "choose_blocks",
    "WORKER_BASELINE_BYTES",
    "measure_workers",
]


@dataclass(frozen=True)
class StepPlan:
    """One layer step of a plan.

    Attributes
    ----------
    step : int
        ``t`` in 1..T.
    width : int
        ``d_{t+1}``: columns of the state this step writes (shape ``(R, width)``).
    n_row_blocks, n_col_blocks, n_tasks : int
    prior_steps : tuple of int
        Earlier steps whose state (rows of the task's block, all columns) each task reads.
    flops : float
        Estimated floating-point operations of the whole step's GEMMs, with dead neurons (``du = 0``) removed,
        by the variant the step runs (a step sharing the stable part across rows: per-row work on the unstable
        neurons, :meth:`~recurjac_scale.jacobian.cost.ChainCost.flops_per_entry`), before the per-row masks (a row's Term I neurons drop out at
        run time, so the work issued is usually lower; GEMM panel padding is not counted).
    flops_dense : float
        The same without removing dead neurons.
    task_state_bytes : int
        Bytes of earlier state one task reads (largest task).
    task_weight_bytes : int
        Bytes of weights one task touches (``M_0`` rows, ``M_1 .. M_{t-1}``, the panel ``M_t[:, cols]``); read
        once per worker process and then cached.
    task_peak_bytes : int
        Estimated peak memory of one task (priors, its output block, kernel work arrays); weights not included.
    """

    step: int
    width: int
    n_row_blocks: int
    n_col_blocks: int
    n_tasks: int
    prior_steps: tuple
    flops: float
    flops_dense: float
    task_state_bytes: int
    task_weight_bytes: int
    task_peak_bytes: int

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


@dataclass(frozen=True)
class Plan:
    """A decomposed Jacobian-bound job (see the module docstring); nothing heavy has run yet.

    Attributes
    ----------
    method, layer_bound_method : str
    eps, p : float
    widths : tuple of int
        Network widths ``(n_0, ..., n_H)`` (after the output selection).
    n_rows : int
        ``R``: independent rows of the chain (outputs for B / Fast-Lip, inputs for F0, layer-1 neurons for F1).
    chain_widths : tuple of int
        ``(d_1, ..., d_{T+1})``.
    row_block, col_block : int
    steps : tuple of StepPlan
    n_finish_tasks : int
        Tasks writing the ``(m, n_0)`` result from the last state (one).
    n_tasks : int
        All tasks: every step's plus the finishing ones.
    flops : float
        Sum of the steps' estimates.
    weights_bytes : int
        All chain matrices, float64 (held once per worker process).
    peak_worker_bytes : int
        ``worker_baseline_bytes + weights_bytes + threads_per_worker * max task_peak_bytes``; with streamed
        weights the held weights are 0 and each task's peak includes the weights it reads
        (:func:`_streamed_bytes`).
    memory_budget : int or None
        The budget the blocks were chosen for (bytes per worker), if any.
    threads_per_worker : int
    unstable : tuple of int
        Per layer, neurons with ``dl < du`` (from the layer bounds).
    dead : tuple of int
        Per layer, neurons with ``du = 0``, removed from the GEMMs.
    job_id : str
        SHA-256 of the job (model, input, eps, p, methods, outputs, blocking, dtype): checkpoints are bound to it.
    layer_bounds_seconds : float
        Time spent computing the pre-activation bounds in the client.
    stream_weights : bool
        Tasks read the weights from the model store (the workers do not hold the network).
    sparse_levels : tuple of str
        The chain matrices that run sparse x dense (their network layer, e.g. ``"W(3)"``; ``"W(1) finish"`` for
        the F1 finish); empty: dense kernels only.
    worker_baseline_bytes : int
        Memory of a worker process before any task (:data:`WORKER_BASELINE_BYTES` or measured), counted in
        ``peak_worker_bytes``.
    baseline_source : str
        ``"constant"`` or ``"measured"`` (RSS of the client's workers, when larger than the constant).
    cache_bytes : int
        The most the per-process caches of a worker can hold (:func:`cache_bytes`), counted in
        ``peak_worker_bytes``.
    budget_source : str
        Where ``memory_budget`` comes from: ``"given"``, the cluster's worker limit, or the machine's available
        memory (:func:`recurjac_scale.engine.memory.default_memory_budget`).
    stage : StagePlan or None
        The second stage of a method with a blockwise form (``linear-jacobian``,
        :mod:`recurjac_scale.engine.linear_stage`), run after the layer steps of its base method (counted in
        ``n_tasks`` and ``peak_worker_bytes``).
    """

    method: str
    layer_bound_method: str
    eps: float
    p: float
    widths: tuple
    n_rows: int
    chain_widths: tuple
    row_block: int
    col_block: int
    steps: tuple
    n_finish_tasks: int
    n_tasks: int
    flops: float
    weights_bytes: int
    peak_worker_bytes: int
    memory_budget: int | None
    threads_per_worker: int
    unstable: tuple
    dead: tuple
    job_id: str
    layer_bounds_seconds: float
    stream_weights: bool = False
    sparse_levels: tuple = ()
    worker_baseline_bytes: int = WORKER_BASELINE_BYTES
    baseline_source: str = "constant"
    cache_bytes: int = 0
    budget_source: str = "given"
    stage: Any = None
    context: Any = field(default=None, repr=False, compare=False)

    def compute(self, **kwargs):
        """Execute the plan; keyword arguments as :func:`recurjac_scale.engine.run.run_plan`."""
        from .run import run_plan

        return run_plan(self, **kwargs)

    def to_dict(self) -> dict:
        """JSON-able summary (what ``recurjac-scale plan --json`` prints)."""
        d = {k: v for k, v in self.__dict__.items() if k != "context"}
        d["steps"] = [s.to_dict() for s in self.steps]
        d["stage"] = None if self.stage is None else self.stage.to_dict()
        for k in ("widths", "chain_widths", "unstable", "dead", "sparse_levels"):
            d[k] = list(d[k])
        d["p"] = json_float(self.p)
        d["eps"] = json_float(self.eps)
        return d

    def describe(self) -> str:
        """A human-readable table of the plan."""
        lines = [
            f"job {self.job_id[:12]}: {self.method} (layer bounds {self.layer_bound_method}), eps={self.eps:g}, "
            f"p={'inf' if self.p == math.inf else int(self.p)}",
            f"network widths {'-'.join(map(str, self.widths))}; unstable per layer {list(self.unstable)}; "
            f"dead per layer {list(self.dead)}",
            f"chain: R = {self.n_rows} rows, widths {list(self.chain_widths)}; blocks {self.row_block} rows x "
            f"{self.col_block} columns",
            f"{'step':>4} {'width':>6} {'tasks':>7} {'GFLOP':>10} {'dense GFLOP':>12} {'state/task':>11} "
            f"{'weights/task':>13} {'peak/task':>10}",
        ]
        for s in self.steps:
            lines.append(
                f"{s.step:>4} {s.width:>6} {s.n_tasks:>7} {s.flops / 1e9:>10.3f} {s.flops_dense / 1e9:>12.3f} "
                f"{format_bytes(s.task_state_bytes):>11} {format_bytes(s.task_weight_bytes):>13} "
                f"{format_bytes(s.task_peak_bytes):>10}"
            )
        task_peak = max((s.task_peak_bytes for s in self.steps), default=0)
        base_peak = self.peak_worker_bytes if self.stage is None else self.stage.held_bytes + (
            self.threads_per_worker * task_peak)
        held = base_peak - self.worker_baseline_bytes - self.cache_bytes - self.threads_per_worker * task_peak
        lines.append(
            f"total: {self.n_tasks} tasks ({self.n_finish_tasks} finishing), {self.flops / 1e9:.3f} GFLOP; weights "
            f"{format_bytes(self.weights_bytes)}"
            + ("; weights streamed from the store by every task" if self.stream_weights else "")
        )
        if self.sparse_levels:
            lines.append(f"sparse x dense (CSR) products for {', '.join(self.sparse_levels)}")
        if self.stage is not None:
            lines.append(self.stage.describe())
        lines.append(
            f"peak memory per worker: baseline {format_bytes(self.worker_baseline_bytes)} ({self.baseline_source}) + "
            f"caches {format_bytes(self.cache_bytes)} + "
            f"held weights {format_bytes(held)} + {self.threads_per_worker} thread(s) x peak task "
            f"{format_bytes(task_peak)} = {format_bytes(base_peak)}"
            + (f"; second stage {format_bytes(self.stage.peak_worker_bytes)}" if self.stage is not None else "")
            + (f" (budget {format_bytes(self.memory_budget)}, {self.budget_source})" if self.memory_budget
               else " (no budget)")
        )
        lines.append(
            f"planning in the client: {self.layer_bounds_seconds:.1f} s (network read and layer bounds "
            f"({self.layer_bound_method}) computed unless given), with the whole network in the client's memory "
            "(not counted in the workers' budget)"
        )
        return "\n".join(lines)


# -- the plan --------------------------------------------------------------------------------------------------
def _sparse_names(chain, levels) -> tuple:
    if not levels:
        return ()
    layers = chain.level_layers()
    T = chain.n_steps
    return tuple(f"W({layers[t - 1] + 1})" + (" finish" if t == T + 1 else "") for t in levels)


def plan_jacobian(
    network,
    x0,
    eps: float,
    p=math.inf,
    method: str = "recurjac-b",
    *,
    layer_bounds=None,
    outputs=None,
    row_block: int | None = None,
    col_block: int | None = None,
    memory_budget=None,
    threads_per_worker: int = 1,
    total_threads: int | None = None,
    stream_weights: bool | None = None,
    sparse_threshold="auto",
    client=None,
    n_workers: int | None = None,
    stage_block: int | None = None,
) -> Plan:
    """Plan a blockwise Jacobian-bound job.

    Parameters
    ----------
    network : Network or path
        A network (numpy or store-backed weights) or the path of a zarr model store.
    x0 : array_like, shape (n_0,)
        Centre of the region (raw input units).
    eps : float
        Radius in [0, inf].
    p : {1, 2, inf}
    method : str
        A Jacobian method: ``fastlip``, ``recurjac-b``, ``recurjac-f0``, ``recurjac-f1``.
    layer_bounds : str, LayerBounds or None
        Pre-activation bound method (``None``: ``crown`` when registered; computed here, in the client: cheap
        relative to the recursion), or precomputed bounds of the network with the outputs folded in.
    outputs : None, "all", int, (c, j) or ndarray (m, n_H)
        Output selection folded into the last layer.
    row_block, col_block : int, optional
        Block sizes; chosen from ``memory_budget`` and the thread count when omitted.
    memory_budget : int or str, optional
        Bytes per worker ("4GB").
    threads_per_worker : int
        Concurrent tasks sharing one worker's memory.
    total_threads : int, optional
        All threads of the cluster (default: ``threads_per_worker``), to size the row blocks.
    stream_weights : bool, optional
        Leave the weights in the model store and let every task read the matrices it needs
        (:mod:`recurjac_scale.engine.streaming`): a worker then holds about one layer per running task instead of
        the whole network.  Needs a store-backed network.  Default: on when a ``memory_budget`` is given that the
        held weights do not fit (with the smallest blocks allowed).
    sparse_threshold : "auto", float or None
        Sparse x dense kernels for pruned layers (``scipy.sparse`` CSR; issue 5).  ``"auto"`` (default): the
        layers the model store holds as CSR; a number: every chain matrix with weight density below it; ``0`` or
        ``None``: dense kernels only.  The plan counts the FLOPs of sparse levels by their stored entries, and their
        CSR copies (held by each worker process, also when the weights are streamed) in the weight bytes.  Results
        equal the dense kernels' to ~1e-15 relative (summation order), with the same certification.
    client : distributed.Client, optional
        The cluster the plan is for: the worker baseline becomes the largest of :data:`WORKER_BASELINE_BYTES` and
        the workers' current RSS, and without ``memory_budget`` the budget is the workers' ``memory_limit`` times
        the nanny's terminate fraction (:func:`measure_workers`).  Planning itself runs here, in the client.
    n_workers : int, optional
        Worker processes on this machine sharing its memory (default ``ceil(total_threads / threads_per_worker)``).
        Without ``memory_budget`` and ``client`` the budget per worker is the machine's available memory times
        :data:`~recurjac_scale.engine.memory.SAFETY_FRACTION` divided among them; a job whose smallest blocks do
        not fit is refused (:class:`~recurjac_scale.errors.InputError` saying how much memory it needs).

    stage_block : int, optional
        Objective pairs per task of the second stage of ``linear-jacobian`` (neurons of a hidden layer or
        Jacobian columns; :func:`recurjac_scale.engine.linear_stage.plan_stage`); default chosen for the budget.

    Returns
    -------
    Plan
    """
    from ..layer_bounds.base import parse_norm

    budget = parse_bytes(memory_budget)
    budget_source = "given"
    baseline, baseline_source = WORKER_BASELINE_BYTES, "constant"
    if client is not None:
        facts = measure_workers(client)
        if facts["rss"] > baseline:
            baseline, baseline_source = int(facts["rss"]), "measured"
        if budget is None and facts["budget"] is not None:
            budget = facts["budget"]
            budget_source = "default: the cluster workers' memory_limit x the nanny's terminate fraction"
    if budget is None and client is None:
        from .memory import default_memory_budget

        tpw_ = max(1, int(threads_per_worker))
        nw = n_workers if n_workers is not None else -(-int(total_threads or tpw_) // tpw_)
        budget, budget_source = default_memory_budget(nw)
    t0 = time.perf_counter()
    ctx = prepare_job(network, x0, eps, parse_norm(p), method, layer_bounds, outputs, sparse_threshold)
    lb_seconds = time.perf_counter() - t0
    shape = ctx.shape
    tpw = max(1, int(threads_per_worker))
    from .streaming import can_stream

    streamable = ctx.store_path is not None and can_stream(ctx.network) and shape.n_steps >= 1
    if stream_weights is None:
        # Hold the weights in the workers when that fits the budget (fastest); stream them when it does not.
        stream_weights = False
        if streamable and budget is not None:
            try:
                choose_blocks(shape, row_block=row_block, col_block=col_block, memory_budget=budget,
                              threads_per_worker=tpw, total_threads=int(total_threads or tpw), stream=False,
                              baseline=baseline + cache_bytes(shape, stream=False))
            except InputError:
                stream_weights = True
    elif stream_weights and not streamable:
        raise InputError(
            "streaming weights needs a network read from a zarr model store (a path), with hidden layers and no "
            "output activation"
        )
    ctx.stream = bool(stream_weights)
    caches = cache_bytes(shape, stream=ctx.stream)
    tile = 0
    if ctx.stream:
        from .streaming import store_tile_bytes

        tile = store_tile_bytes(ctx.store_path)
    try:
        rb, cb = choose_blocks(
            shape,
            row_block=row_block,
            col_block=col_block,
            memory_budget=budget,
            threads_per_worker=tpw,
            total_threads=int(total_threads or tpw),
            stream=ctx.stream,
            baseline=baseline + caches,
            tile_bytes=tile,
        )
    except InputError as exc:
        if budget_source == "given":
            raise
        raise InputError(f"{exc} (budget {budget_source})") from None
    steps = []
    R = shape.n_rows
    for t in range(1, shape.n_steps + 1):
        width = shape.widths[t]
        nr, nc = _block_grid(R, rb), _block_grid(width, cb)
        sb, wb, pk = shape.task_costs(t, rb, cb)
        if ctx.stream:  # the task also holds its column panel and the store tiles in flight
            pk += _streamed_bytes(shape, t, cb, tile)
        steps.append(
            StepPlan(
                step=t,
                width=width,
                n_row_blocks=nr,
                n_col_blocks=nc,
                n_tasks=nr * nc,
                prior_steps=tuple(shape.prior_steps(t)),
                flops=float(R * width * shape.flops_per_entry(t, live=True, block=(rb, cb))),
                flops_dense=float(R * width * shape.flops_per_entry(t, live=False)),
                task_state_bytes=sb,
                task_weight_bytes=wb,
                task_peak_bytes=pk,
            )
        )
    n_finish = 1  # the method's finish needs the whole last state (R x d_{T+1}, small)
    wbytes = shape.weights_bytes()
    task_peak = max((s.task_peak_bytes for s in steps), default=0)
    if ctx.stream:  # each running task holds the weights it streams (counted in its task_peak_bytes)
        peak = baseline + caches + int(shape.sparse_bytes) + tpw * task_peak
    else:
        peak = baseline + caches + wbytes + tpw * task_peak
    stage = None
    if ctx.stage is not None:
        from .linear_stage import plan_stage

        held = peak - tpw * task_peak  # baseline, caches and the base method's chain stay in the worker
        db = ctx.derivative_bounds
        counts = [ctx.stage.tightened_neurons(*db[k]).size for k in range(len(ctx.widths) - 3)]
        stage = plan_stage(ctx.stage, ctx.widths, ctx.n_outputs, block=stage_block, budget=budget,
                           threads_per_worker=tpw, held_bytes=held, budget_source=budget_source, tightened=counts,
                           derivative_bounds=db, activations=list(ctx.network.activations))
        peak = max(peak, stage.peak_worker_bytes)
    job_id = ctx.job_id(rb, cb)
    if stage is not None:
        job_id = ctx.job_id(rb, cb, stage.block)
    return Plan(
        method=ctx.name or ctx.method.name,
        layer_bound_method=ctx.layer_bound_method,
        eps=float(ctx.eps),
        p=float(ctx.p),
        widths=tuple(ctx.widths),
        n_rows=R,
        chain_widths=tuple(shape.widths),
        row_block=rb,
        col_block=cb,
        steps=tuple(steps),
        n_finish_tasks=n_finish,
        n_tasks=sum(s.n_tasks for s in steps) + n_finish + (stage.n_tasks if stage is not None else 0),
        flops=float(sum(s.flops for s in steps)),
        weights_bytes=int(wbytes),
        peak_worker_bytes=int(peak),
        memory_budget=budget,
        threads_per_worker=tpw,
        unstable=tuple(ctx.unstable),
        dead=tuple(ctx.dead),
        job_id=job_id,
        layer_bounds_seconds=lb_seconds,
        stream_weights=ctx.stream,
        sparse_levels=_sparse_names(ctx.chain, ctx.sparse_levels),
        worker_baseline_bytes=int(baseline),
        baseline_source=baseline_source,
        cache_bytes=int(caches),
        budget_source=budget_source,
        stage=stage,
        context=ctx,
    )
