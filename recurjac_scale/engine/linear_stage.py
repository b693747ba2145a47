"""The second stage of a method with a blockwise form (:attr:`recurjac_scale.jacobian.JacobianMethod.stage`;
``linear-jacobian``): where its tasks run, what they read and write, and what they need in memory.

A job of such a method is the chain job of its ``base`` method (RecurJac-B: the ordinary layer steps of
:mod:`recurjac_scale.engine.run`, whose states bound the gradients) followed by these tasks, in the same dask graph
and the same checkpoint:

- ``("lj-tighten-KKK", i, b)``: neurons ``b * block ..`` of hidden layer ``k`` of output row ``i``
  (:func:`recurjac_scale.jacobian.linear_blocks.tighten_block`), for ``k = H-3 .. 0`` in turn; it reads row ``i`` of
  RecurJac-B's states and of the layers above ``k`` already tightened, and writes one chunk of
  ``linear/g-KKK/{lower,upper}``.  ``("lj-layer-KKK", i)`` is the barrier "layer ``k`` of row ``i`` is complete";
- ``("lj-entry", i, b)``: Jacobian columns ``b * block ..`` of row ``i`` on the tightened bounds, intersected with
  RecurJac-B's (:func:`~recurjac_scale.jacobian.linear_blocks.entry_block`); writes ``linear/entry/...``;
- ``("lj-rownorm", i)``: the row norm bound for the Lipschitz constant (``q`` = 1, 2; else nothing);
- the finish copies the entries and the row norms into the result store.

Each task is recorded in the checkpoint when done (steps :data:`TIGHTEN_STEP` ``+ k``, :data:`ENTRY_STEP`,
:data:`ROWNORM_STEP`; row ``i``, block ``b``) and skipped by a rerun.  Rows are independent and so are the blocks of
one layer; the stages of a row follow each other (a row moves on without waiting for the others).

Memory: every worker process holds the job's :class:`~recurjac_scale.jacobian.linear.LinearContext` (read from the
model store, built once and cached) next to the base method's chain, plus its running tasks
(:func:`plan_stage`); a budget that cannot hold them with the smallest block is refused.
"""

from __future__ import annotations

import math
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError, StoreError
from .checkpoint import Checkpoint, open_state_array, state_array_path
from .memory import format_bytes

__all__ = ["StagePlan", "StageSpec", "plan_stage", "stage_applies", "create_stage_arrays", "add_stage_graph",
           "stage_finish_task", "stage_lipschitz", "stage_seconds", "stage_spec", "TIGHTEN_STEP", "ENTRY_STEP", "ROWNORM_STEP", "MIN_BLOCK"]

TIGHTEN_STEP = 1000
"""Checkpoint step of the tightening of hidden layer ``k``: ``TIGHTEN_STEP + k``."""
ENTRY_STEP = 2000
ROWNORM_STEP = 3000
MIN_BLOCK = 8
"""The smallest block the plan shrinks to before refusing a budget."""


@dataclass(frozen=True)
class StagePlan:
    """The second stage of a job (see the module docstring).

    Attributes
    ----------
    block : int
        Neurons (tightening) or Jacobian columns (entries) per task.
    n_tighten_tasks, n_entry_tasks, n_row_tasks, n_tasks : int
    context_bytes : int
        The :class:`LinearContext` every worker process holds (estimate).
    task_peak_bytes : int
        What one task allocates (estimate).
    peak_worker_bytes : int
        ``held_bytes + context + threads x task``.
    held_bytes : int
        What a worker holds besides: baseline, caches and the base method's chain.
    """

    block: int
    n_tighten_tasks: int
    n_entry_tasks: int
    n_row_tasks: int
    n_tasks: int
    context_bytes: int
    task_peak_bytes: int
    peak_worker_bytes: int
    held_bytes: int = 0

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    def describe(self) -> str:
        return (
            f"second stage: {self.n_tasks} tasks ({self.n_tighten_tasks} tightening, {self.n_entry_tasks} entry, "
            f"{self.n_row_tasks} row norm) of {self.block} objective pairs; context "
            f"{format_bytes(self.context_bytes)} per worker, peak task {format_bytes(self.task_peak_bytes)}; "
            f"peak memory per worker {format_bytes(self.peak_worker_bytes)}"
        )


def stage_applies(job) -> bool:
    """Whether the second stage runs: hidden layers with finite bounds and a bounded region (otherwise the method's
    result is its base method's, as in memory: :func:`recurjac_scale.jacobian.linear.linear_context`)."""
    net = job.network
    if net.n_layers < 2:
        return False
    H = net.n_layers
    lb = job.layer_bounds
    if not all(np.isfinite(np.asarray(v, np.float64)).all() for v in list(lb.lower[: H - 1]) + list(lb.upper[: H - 1])):
        return False
    lo, hi = job.region.box
    return bool(np.isfinite(lo).all() and np.isfinite(hi).all())


def _n_blocks(n: int, block: int) -> int:
    return -(-int(n) // int(block))


def plan_stage(stage, widths, m: int, *, block=None, budget=None, threads_per_worker: int = 1,
               held_bytes: int = 0, budget_source: str = "given", tightened=None, derivative_bounds=None,
               activations=None) -> StagePlan:
    """Plan the second stage for a network with widths ``(n_0, ..., n_H)`` (outputs folded in) and ``m`` output
    rows.  ``held_bytes``: what a worker holds besides (baseline, caches, the base method's chain);
    ``tightened``: per hidden layer ``k = 0..H-3``, how many neurons are tightened (default: all);
    ``derivative_bounds`` / ``activations``: per hidden layer, to size the context's maps through the exact
    neurons (default: every neuron counted).  The block is
    ``block`` when given, else the stage's default, halved until the peak fits ``budget`` (not below
    :data:`MIN_BLOCK`).

    Raises
    ------
    InputError
        When the budget cannot hold the context and ``threads_per_worker`` tasks of the smallest block.
    """
    tpw = max(1, int(threads_per_worker))
    H = len(widths) - 1
    ctx_b = int(stage.context_bytes(widths, derivative_bounds, activations))
    cands = [int(block)] if block is not None else []
    if not cands:
        b = int(stage.block)
        while True:
            cands.append(b)
            if b <= MIN_BLOCK:
                break
            b = max(MIN_BLOCK, b // 2)
    chosen = None
    for b in cands:
        peak = int(held_bytes) + ctx_b + tpw * int(stage.task_bytes(widths, b))
        if budget is None or peak <= budget:
            chosen = (b, peak)
            break
    if chosen is None:
        b = cands[-1]
        need = int(held_bytes) + ctx_b + tpw * int(stage.task_bytes(widths, b))
        raise InputError(
            f"memory budget {format_bytes(budget)} ({budget_source}) per worker is too small for the second stage: "
            f"it needs {format_bytes(need)} (context {format_bytes(ctx_b)}, {tpw} task(s) of {b} objective pairs, "
            "the base method's chain and the worker baseline); give a larger --memory-budget or fewer threads"
        )
    b, peak = chosen
    counts = [int(widths[k + 1]) for k in range(H - 2)] if tightened is None else [int(c) for c in tightened]
    n_t = sum(m * _n_blocks(c, b) for c in counts)
    n_e = m * _n_blocks(widths[0], b)
    return StagePlan(block=b, n_tighten_tasks=n_t, n_entry_tasks=n_e, n_row_tasks=m, n_tasks=n_t + n_e + m,
                     context_bytes=ctx_b, task_peak_bytes=int(stage.task_bytes(widths, b)), peak_worker_bytes=peak,
                     held_bytes=int(held_bytes))


# -- worker side -------------------------------------------------------------------------------------------------
_CONTEXTS: dict = {}
_CONTEXTS_LOCK = threading.Lock()


@dataclass(frozen=True)
class StageSpec:
    """Picklable recipe of the second stage, rebuilt once per worker process (:meth:`context`).

    ``network`` (in memory) or ``store_path`` (read by each worker) with the ``outputs`` folded in, as
    :class:`~recurjac_scale.engine.blocks.WorkerSpec`; ``region``, ``layer_bounds`` and ``derivative_bounds`` are
    the client's (every worker uses exactly its values); ``tightened[k]``: the neurons of hidden layer ``k`` whose
    gradient bounds are tightened (``stage.tightened_neurons``), in blocks of ``block``."""

    key: str
    network: Any
    store_path: str | None
    outputs: Any
    region: Any
    layer_bounds: Any
    derivative_bounds: Any
    q: float
    block: int
    widths: tuple
    n_steps: int
    row_block: int
    tightened: tuple = ()

    def context(self):
        """``(LinearContext, centre gradients per row)`` of this job in this process (built on first use)."""
        c = _CONTEXTS.get(self.key)
        if c is not None:
            return c
        with _CONTEXTS_LOCK:
            c = _CONTEXTS.get(self.key)
            if c is None:
                _CONTEXTS.clear()  # one job's context per process
                c = _CONTEXTS[self.key] = self._build()
        return c

    def _build(self):
        from ..jacobian.linear import centre_gradients_ctx, linear_context

        net = self.network
        if net is None:
            import dask

            from ..network.store_read import open_network

            with dask.config.set(scheduler="synchronous"):  # never back to the cluster from inside a task
                net = open_network(self.store_path).materialize()
            if self.outputs is not None:
                net = net.with_outputs(self.outputs)
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            ctx = linear_context(net, self.region, self.layer_bounds, self.derivative_bounds)
            if ctx is None:
                raise StoreError("the second stage's context could not be built (bounds not finite)")
            return ctx, centre_gradients_ctx(ctx)




def _g_path(state: str, k: int, key: str) -> str:
    return os.path.join(state, "linear", f"g-{k:03d}", key)


def _e_path(state: str, key: str) -> str:
    return os.path.join(state, "linear", "entry", key)


def _rj_row(spec: StageSpec, state: str, i: int):
    """RecurJac-B's bounds of the row's gradients ``g(k)``, ``k = 0..H-2`` (state ``H-2-k``; state 0 is the exact
    top row ``W[H-1][i]``)."""

    ctx, _ = spec.context()
    H = ctx.H
    gl, gu = [None] * (H - 1), [None] * (H - 1)
    for k in range(H - 1):
        t = H - 2 - k
        if t == 0:
            gl[k] = gu[k] = np.asarray(ctx.W[H - 1][i], np.float64)
        else:
            gl[k] = np.asarray(open_state_array(state_array_path(state, t, "lower"), spec.key)[i, :], np.float64)
            gu[k] = np.asarray(open_state_array(state_array_path(state, t, "upper"), spec.key)[i, :], np.float64)
    return gl, gu


def _row(spec: StageSpec, state: str, i: int, k_min: int):
    """The row's :class:`RowBounds` with the layers ``H-3 .. k_min`` tightened (read from the stage arrays)."""
    from ..jacobian.linear_blocks import rebuild_row

    ctx, g0 = spec.context()
    gl, gu = _rj_row(spec, state, i)
    tightened = {}
    for k in range(ctx.H - 3, k_min - 1, -1):
        lo, up = gl[k].copy(), gu[k].copy()
        idx = spec.tightened[k]
        if idx.size:
            lo[idx] = np.asarray(open_state_array(_g_path(state, k, "lower"), spec.key)[i, :], np.float64)
            up[idx] = np.asarray(open_state_array(_g_path(state, k, "upper"), spec.key)[i, :], np.float64)
        if np.isnan(lo).any() or np.isnan(up).any():
            raise StoreError(f"tightened bounds of layer {k}, row {i} are missing")
        tightened[k] = (lo, up)
    return rebuild_row(ctx, i, gl, gu, g0[i], tightened)


def _done(ck: Checkpoint, step: int, i: int, b: int) -> bool:
    rec = ck.read_record(step, i, b)
    return rec is not None and ck.check_record(rec) is None


def _record(ck, step, i, b, info, paths, durable):
    ck.record(step, i, b, info, data_paths=[Path(p) for p in paths], fsync=durable)


def _tighten_task(spec: StageSpec, state: str, ckpt: str, job_id: str, durable: bool, k: int, i: int, b: int, *deps):
    from ..jacobian.linear_blocks import tighten_block
    from .schedulers import blas_single_thread

    ck = Checkpoint(Path(ckpt), job_id)
    if _done(ck, TIGHTEN_STEP + k, i, b):
        return {"reused": True}
    t0, c0 = time.perf_counter(), time.thread_time()
    ctx, _ = spec.context()
    rb = _row(spec, state, i, k + 1)
    idx = spec.tightened[k][b * spec.block : (b + 1) * spec.block]
    r0, r1 = b * spec.block, b * spec.block + idx.size
    with blas_single_thread(), np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        lo, up = tighten_block(ctx, rb, k, idx)
    paths = []
    for key, v in (("lower", lo), ("upper", up)):
        open_state_array(_g_path(state, k, key), spec.key)[i : i + 1, r0:r1] = v[None, :]
        paths.append(Path(_g_path(state, k, key)) / "c" / str(i) / str(b))
    info = {"seconds": time.perf_counter() - t0, "cpu_seconds": time.thread_time() - c0, "pid": os.getpid()}
    _record(ck, TIGHTEN_STEP + k, i, b, info, paths, durable)
    return {"stage": "tighten", "k": k, "i": i, "b": b, **info}


def _entry_task(spec: StageSpec, state: str, ckpt: str, job_id: str, durable: bool, i: int, b: int, *deps):
    from ..jacobian.linear_blocks import entry_block
    from .schedulers import blas_single_thread

    ck = Checkpoint(Path(ckpt), job_id)
    if _done(ck, ENTRY_STEP, i, b):
        return {"reused": True}
    t0, c0 = time.perf_counter(), time.thread_time()
    ctx, _ = spec.context()
    rb = _row(spec, state, i, 0)
    n0 = ctx.W[0].shape[1]
    j0, j1 = b * spec.block, min(n0, (b + 1) * spec.block)
    T = spec.n_steps
    rj_lo = np.asarray(open_state_array(state_array_path(state, T, "lower"), spec.key)[i, j0:j1], np.float64)
    rj_up = np.asarray(open_state_array(state_array_path(state, T, "upper"), spec.key)[i, j0:j1], np.float64)
    with blas_single_thread(), np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        lo, up, worst = entry_block(ctx, rb, j0, j1, rj_lo, rj_up)
    paths = []
    for key, v in (("lower", lo), ("upper", up)):
        open_state_array(_e_path(state, key), spec.key)[i : i + 1, j0:j1] = v[None, :]
        paths.append(Path(_e_path(state, key)) / "c" / str(i) / str(b))
    open_state_array(_e_path(state, "worst"), spec.key)[i : i + 1, b : b + 1] = worst
    paths.append(Path(_e_path(state, "worst")) / "c" / str(i) / str(b))
    info = {"seconds": time.perf_counter() - t0, "cpu_seconds": time.thread_time() - c0, "pid": os.getpid()}
    _record(ck, ENTRY_STEP, i, b, info, paths, durable)
    return {"stage": "entry", "i": i, "b": b, **info}


def _rownorm_task(spec: StageSpec, state: str, ckpt: str, job_id: str, durable: bool, i: int, *deps):
    from ..jacobian.linear_blocks import row_norm
    from .schedulers import blas_single_thread

    if spec.q not in (1.0, 2.0):
        return {"stage": "rownorm", "i": i, "seconds": 0.0, "cpu_seconds": 0.0}
    ck = Checkpoint(Path(ckpt), job_id)
    if _done(ck, ROWNORM_STEP, i, 0):
        return {"reused": True}
    t0, c0 = time.perf_counter(), time.thread_time()
    ctx, _ = spec.context()
    rb = _row(spec, state, i, 0)
    lo = np.asarray(open_state_array(_e_path(state, "lower"), spec.key)[i, :], np.float64)
    up = np.asarray(open_state_array(_e_path(state, "upper"), spec.key)[i, :], np.float64)
    with blas_single_thread(), np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        v = row_norm(ctx, rb, lo, up, spec.q)
    open_state_array(os.path.join(state, "linear", "rows"), spec.key)[i : i + 1] = v
    info = {"seconds": time.perf_counter() - t0, "cpu_seconds": time.thread_time() - c0, "pid": os.getpid()}
    _record(ck, ROWNORM_STEP, i, 0, info, [Path(state) / "linear" / "rows" / "c" / str(i)], durable)
    return {"stage": "rownorm", "i": i, **info}


def stage_finish_task(spec: StageSpec, state: str, result: str, job_id: str, j: int, cols, *deps):
    """The result from the second stage's entry bounds (cast to nothing: float64 as computed); returns the row
    norm bounds (``None`` for other norms) and the largest relative rounding allowance."""
    import zarr

    lo = np.asarray(open_state_array(_e_path(state, "lower"), spec.key)[...])
    up = np.asarray(open_state_array(_e_path(state, "upper"), spec.key)[...])
    c0, c1 = cols
    zarr.open_array(os.path.join(result, "lower"), mode="r+")[:, c0:c1] = lo[:, c0:c1]
    zarr.open_array(os.path.join(result, "upper"), mode="r+")[:, c0:c1] = up[:, c0:c1]
    worst = np.asarray(open_state_array(_e_path(state, "worst"), spec.key)[...])
    rows = None
    if spec.q in (1.0, 2.0):
        rows = [float(v) for v in np.asarray(open_state_array(os.path.join(state, "linear", "rows"), spec.key)[...])]
    return {"finish": j, "rounding_share": None, "row_norms": rows,
            "allowance": float(np.nanmax(worst)) if worst.size else 0.0}


# -- client side -------------------------------------------------------------------------------------------------
def stage_spec(ctx, plan, worker_spec) -> StageSpec:
    """The stage's recipe from the job context and the (possibly spilled) worker spec of the base chain."""
    from ..layer_bounds.base import dual_norm

    H = len(ctx.widths) - 1
    db = ctx.derivative_bounds
    tightened = tuple(np.asarray(ctx.stage.tightened_neurons(*db[k]), dtype=np.int64) for k in range(H - 2))
    return StageSpec(
        key="lj-" + plan.job_id, network=worker_spec.network, store_path=worker_spec.store_path,
        outputs=worker_spec.outputs, region=ctx.job.region, layer_bounds=ctx.job.layer_bounds,
        derivative_bounds=list(ctx.derivative_bounds), q=float(dual_norm(ctx.p)), block=plan.stage.block,
        widths=tuple(ctx.widths), n_steps=ctx.cost.n_steps, row_block=plan.row_block, tightened=tightened,
    )


def create_stage_arrays(state: Path, plan, spec: StageSpec) -> None:
    """Pre-create the stage arrays (chunks = tasks, fill NaN); existing ones must match."""
    import zarr

    g = zarr.open_group(str(state), mode="a", zarr_format=3)
    lg = g.require_group("linear")
    m = plan.n_rows
    w = spec.widths
    H = len(w) - 1
    blk = spec.block
    n0 = w[0]
    arrays = [(f"g-{k:03d}/{key}", (m, spec.tightened[k].size), (1, min(blk, spec.tightened[k].size)))
              for k in range(H - 2) if spec.tightened[k].size for key in ("lower", "upper")]
    arrays += [(f"entry/{key}", (m, n0), (1, min(blk, n0))) for key in ("lower", "upper")]
    arrays += [("entry/worst", (m, _n_blocks(n0, blk)), (1, 1)), ("rows", (m,), (1,))]
    for name, shape, chunks in arrays:
        if name in lg:
            a = lg[name]
            if a.shape != shape or a.chunks != chunks:
                raise StoreError(f"checkpoint state {state}/linear/{name} has an unexpected shape or chunking")
            continue
        lg.create_array(name, shape=shape, chunks=chunks, dtype="float64", fill_value=np.nan, compressors=None,
                        config={"write_empty_chunks": True})


def add_stage_graph(dsk: dict, plan, spec: StageSpec, state: str, ckpt: str, durable: bool) -> tuple[list, list]:
    """Add the stage's tasks to ``dsk`` after the base chain's last layer step.  Returns ``(task keys, keys the
    finish depends on, the key of the spec)``."""
    key = f"lj-spec-{plan.job_id[:16]}"
    dsk[key] = spec
    w = spec.widths
    H = len(w) - 1
    T = spec.n_steps
    blk = spec.block
    keys, finals = [], []
    for i in range(plan.n_rows):
        prev = ("rj-rows-%03d" % T, i // plan.row_block) if T >= 1 else None
        for k in range(H - 3, -1, -1):
            layer = []
            for b in range(_n_blocks(spec.tightened[k].size, blk)):
                tk = ("lj-tighten-%03d" % k, i, b)
                dsk[tk] = (_tighten_task, key, state, ckpt, plan.job_id, durable, k, i, b,
                           *([prev] if prev is not None else []))
                layer.append(tk)
            bar = ("lj-layer-%03d" % k, i)
            dsk[bar] = (_barrier, *layer, *([prev] if prev is not None else []))
            keys += layer
            prev = bar
        entries = []
        for b in range(_n_blocks(w[0], blk)):
            ek = ("lj-entry", i, b)
            dsk[ek] = (_entry_task, key, state, ckpt, plan.job_id, durable, i, b, *([prev] if prev is not None else []))
            entries.append(ek)
        rk = ("lj-rownorm", i)
        dsk[rk] = (_rownorm_task, key, state, ckpt, plan.job_id, durable, i, *entries)
        keys += entries + [rk]
        finals.append(rk)
    return keys, finals, key


def _barrier(*deps):
    return None


def stage_lipschitz(lip, finished: list, p: float):
    """The Lipschitz constant of the result: the smaller of Proposition 2's (``lip``) and the stage's row norm
    bounds (one row, or the l-inf ball's induced norm: their maximum), as :func:`recurjac_scale.lipschitz.lipschitz`
    takes them."""
    rows = None
    for v in finished:
        if isinstance(v, dict) and v.get("row_norms") is not None:
            rows = np.asarray(v["row_norms"], np.float64)
    if rows is None or not rows.size or not (rows.size == 1 or p == math.inf):
        return lip
    own = float(rows.max())
    return own if lip is None else min(lip, own)


def stage_seconds(values: list) -> dict:
    """Summed task seconds of the stage's tasks by kind (``"tighten"``, ``"entry"``, ``"rownorm"``; their CPU
    seconds under ``"tighten cpu"``, ...), for :attr:`EngineResult.step_seconds`."""
    out: dict = {}
    for v in values:
        if isinstance(v, dict) and "stage" in v:
            out[v["stage"]] = out.get(v["stage"], 0.0) + float(v.get("seconds", 0.0))
            key = v["stage"] + " cpu"
            out[key] = out.get(key, 0.0) + float(v.get("cpu_seconds", 0.0))
    return out
