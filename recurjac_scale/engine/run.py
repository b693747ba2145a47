"""The run step: execute a :class:`~recurjac_scale.engine.plan.Plan` as one dask graph of block tasks.

Graph
-----
- ``("rj-block-TTT", rb, cb)``: block ``(rb, cb)`` of layer step ``t``.  It reads its priors (the state of the
  earlier steps for its rows) from the state zarr store, runs the method's block function under a one-thread BLAS
  limit, writes its output block (exactly one chunk of each state array), flushes it and records it as finished in
  the checkpoint.  It returns a small dict (timings, pid), never arrays.
- ``("rj-rows-TTT", rb)``: the barrier "all column blocks of step t for row block rb are written"; the blocks of
  step ``t + 1`` for the same rows depend on it (so a row block moves on without waiting for other rows).
- ``("rj-finish", j)``: column block ``j`` of the ``(m, n_0)`` result, from the last step's state (a copy for B and
  Fast-Lip, a transpose for F0, the final interval product for F1).  Always recomputed (cheap), never recorded.
- ``"rj-spec-<job>"``: the picklable description from which every worker builds the method's chain once (cached per
  process): numpy weights of a small in-memory network (shipped once per worker; a large one is first written to a
  model store in the checkpoint folder for process / cluster runs), or the path of the zarr model store, from which
  each worker process reads the weights, or, with ``stream_weights``, from which every task reads the matrices it
  needs (:mod:`recurjac_scale.engine.streaming`).

Blocks already recorded in the checkpoint are left out of the graph, so a rerun after a crash recomputes none of
them.  The result is identical to an uninterrupted run because every block is a pure function of its priors and
the blocking is part of the job hash.

The :class:`EngineResult` and the result store (created, sealed, read) are in
:mod:`recurjac_scale.engine.result_store`; :class:`EngineResult` is re-exported here.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import threading
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np

from .._json import json_safe
from ..errors import IncompleteRunError, OutputExistsError, StoreError
from .checkpoint import Checkpoint
from .checkpoint import open_state_array as _array
from .checkpoint import state_array_path as _state_array_path
from .result_store import RESULT_FORMAT  # noqa: F401 (re-exported)
from .result_store import EngineResult, create_result_store, seal_result_store
from .schedulers import blas_single_thread, open_executor

__all__ = ["EngineResult", "run_plan", "RESULT_FORMAT"]



PRIOR_CACHE_BYTES = 128 * 2**20
"""Per process: rows of earlier states kept after a task read them, least recently used dropped first.  The column
blocks of one step and the next steps of the same row block read the same priors; a state block never changes once
its step is complete for those rows (which the graph's dependencies guarantee before any task reads it), so a cached
copy is exactly what a new read would return.  Counted in the plan's memory per worker; not used when the weights
are streamed (out-of-core runs)."""

_PRIORS: "OrderedDict[tuple, np.ndarray]" = OrderedDict()
_PRIORS_BYTES = [0]
_PRIORS_LOCK = threading.Lock()


def _read_prior(path: str, job_id: str, r0: int, r1: int, cache: bool = True) -> np.ndarray:
    """Rows ``r0:r1`` (all columns) of a state array of a completed step, read-only, through the per-process
    cache (:data:`PRIOR_CACHE_BYTES`; not with ``cache=False``: out-of-core runs, where memory is the limit)."""
    if not cache:
        return np.asarray(_array(path, job_id)[r0:r1, :])
    key = (path, job_id, r0, r1)
    with _PRIORS_LOCK:
        a = _PRIORS.get(key)
        if a is not None:
            _PRIORS.move_to_end(key)
            return a
    a = np.asarray(_array(path, job_id)[r0:r1, :])
    a.setflags(write=False)  # shared by the tasks of this process: never modified in place
    if a.nbytes <= PRIOR_CACHE_BYTES:
        with _PRIORS_LOCK:
            if key not in _PRIORS:
                _PRIORS[key] = a
                _PRIORS_BYTES[0] += a.nbytes
            while _PRIORS_BYTES[0] > PRIOR_CACHE_BYTES and _PRIORS:
                _, old = _PRIORS.popitem(last=False)
                _PRIORS_BYTES[0] -= old.nbytes
    return a


# -- task functions (run on workers; module-level so every scheduler can import them) -------------------------
def _block_task(spec, state: str, ckpt: str, job_id: str, durable: bool, t: int, rb: int, cb: int, rows, cols, *deps):
    """Compute, write and record one block; returns its timings.

    A block already recorded is not recomputed (a task can run twice under a cluster, e.g. when the worker
    holding its result died): its chunks are never rewritten while later tasks may be reading them."""
    ck = Checkpoint(Path(ckpt), job_id)
    rec = ck.read_record(t, rb, cb)
    if rec is not None and ck.check_record(rec) is None:
        return {**rec, "seconds": 0.0, "reused": True}
    t_start = time.perf_counter()
    chain = spec.chain()
    r0, r1 = rows
    c0, c1 = cols
    priors = {
        s: {k: _read_prior(_state_array_path(state, s, k), job_id, r0, r1, cache=not spec.stream)
            for k in spec.state_keys}
        for s in spec.prior_steps(t)
    }
    t_read = time.perf_counter()
    with blas_single_thread():
        out = chain.step_block(t, slice(r0, r1), slice(c0, c1), priors)
    t_comp = time.perf_counter()
    paths = []
    for k in spec.state_keys:
        blk = np.asarray(out[k], dtype=np.float64)
        if blk.shape != (r1 - r0, c1 - c0):
            raise StoreError(f"block function returned {k} of shape {blk.shape}, expected {(r1 - r0, c1 - c0)}")
        _array(_state_array_path(state, t, k), job_id)[r0:r1, c0:c1] = blk
        paths.append(Path(_state_array_path(state, t, k)) / "c" / str(rb) / str(cb))
    t_write = time.perf_counter()
    info = {
        "seconds": t_comp - t_read,
        "read_seconds": t_read - t_start,
        "write_seconds": t_write - t_comp,
        "pid": os.getpid(),
        "host": os.uname().nodename,
        "rows": [r0, r1],
        "cols": [c0, c1],
    }
    ck.record(t, rb, cb, info, data_paths=paths, fsync=durable)
    return {"step": t, "rb": rb, "cb": cb, **info}


def _barrier(*deps):
    return None


def _max_share(finished) -> float | None:
    """The largest ``rounding_share`` the finish tasks report (``None`` when none does)."""
    shares = [v.get("rounding_share") for v in finished if isinstance(v, dict)]
    shares = [float(x) for x in shares if x is not None]
    return max(shares) if shares else None


def _finish_task(spec, state: str, result: str, job_id: str, j: int, cols, *deps):
    """Column block ``j`` of the ``(m, n_0)`` result from the last step's state."""
    import zarr

    chain = spec.chain()
    T = spec.n_steps
    if T == 0:  # no hidden layer to recurse over: the last state is the exact top (state 0)
        final = chain.initial_state()
    else:
        final = {k: _array(_state_array_path(state, T, k), job_id)[...] for k in spec.state_keys}
    c0, c1 = cols
    with blas_single_thread():
        lo, up = chain.finish(final, slice(c0, c1))
        share = chain.rounding_share(final, slice(c0, c1), lo, up)
    # the result store is recreated by every run: never cache it
    zarr.open_array(os.path.join(result, "lower"), mode="r+")[:, c0:c1] = lo
    zarr.open_array(os.path.join(result, "upper"), mode="r+")[:, c0:c1] = up
    return {"finish": j, "rounding_share": share}


def _stage_finish_task(sspec, state: str, result: str, job_id: str, j: int, cols, base_spec, *deps):
    """The second stage's finish (:func:`recurjac_scale.engine.linear_stage.stage_finish_task`), with the rounding
    share of the result (:func:`recurjac_scale.jacobian.linear_method.runner_allowance`, as
    :func:`recurjac_scale.jacobian.api.jacobian_bounds` reports it in memory)."""
    import zarr

    from .linear_stage import stage_finish_task

    out = stage_finish_task(sspec, state, result, job_id, j, cols, *deps)
    chain = base_spec.chain()
    T = base_spec.n_steps
    if T == 0:
        final = chain.initial_state()
    else:
        final = {k: _array(_state_array_path(state, T, k), job_id)[...] for k in base_spec.state_keys}
    c0, c1 = cols
    lo = np.asarray(zarr.open_array(os.path.join(result, "lower"), mode="r")[:, c0:c1], np.float64)
    up = np.asarray(zarr.open_array(os.path.join(result, "upper"), mode="r")[:, c0:c1], np.float64)
    from ..jacobian.linear_method import runner_allowance
    from ..jacobian.rounding import rounding_share

    with blas_single_thread():
        a = runner_allowance(chain.chain, final, lo, up, out.get("allowance", 0.0), cols=slice(c0, c1))
    out["rounding_share"] = rounding_share(lo, up, a)
    return out


# -- progress --------------------------------------------------------------------------------------------------
class _Progress:
    """tqdm bars for the local schedulers: one overall, one per layer step (dask local callbacks)."""

    def __init__(self, todo_per_step: dict[int, int], n_finish: int, reused: int):
        from dask.callbacks import Callback
        from tqdm import tqdm

        total = sum(todo_per_step.values()) + n_finish
        self.bars = {"all": tqdm(total=total, desc="all blocks", position=0, file=sys.stderr, leave=True)}
        for i, (t, n) in enumerate(sorted(todo_per_step.items())):
            self.bars[t] = tqdm(total=n, desc=f"layer step {t}", position=i + 1, file=sys.stderr, leave=True)
        self._lock = threading.Lock()
        bars = self.bars

        def posttask(key, result, dsk, state, worker_id):
            if not isinstance(key, tuple) or not isinstance(key[0], str):
                return
            name = key[0]
            with self._lock:
                if name.startswith("rj-block-"):
                    bars["all"].update(1)
                    bars[int(name[len("rj-block-"):])].update(1)
                elif name == "rj-finish":
                    bars["all"].update(1)

        self.callback = Callback(posttask=posttask)
        if reused:
            bars["all"].write(f"reusing {reused} finished block(s) from the checkpoint", file=sys.stderr)

    def close(self):
        for b in self.bars.values():
            b.close()


# -- state store ------------------------------------------------------------------------------------------------
def _create_state(state: Path, plan, spec) -> None:
    """Pre-create the state arrays (no sharding, chunks = blocks, fill NaN); existing ones are kept."""
    import zarr

    g = zarr.open_group(str(state), mode="a", zarr_format=3)
    R = plan.n_rows
    for sp in plan.steps:
        sg = g.require_group(f"step-{sp.step:03d}")
        for k in spec.state_keys:
            if k in sg:
                a = sg[k]
                if a.shape != (R, sp.width) or a.chunks != (min(plan.row_block, R), min(plan.col_block, sp.width)):
                    raise StoreError(f"checkpoint state {state}/{sg.path}/{k} has an unexpected shape or chunking")
                continue
            sg.create_array(
                k,
                shape=(R, sp.width),
                chunks=(min(plan.row_block, R), min(plan.col_block, sp.width)),
                dtype="float64",
                fill_value=np.nan,
                compressors=None,
                config={"write_empty_chunks": True},
            )


# -- the run ---------------------------------------------------------------------------------------------------
def run_plan(
    plan,
    *,
    scheduler: str | None = "threads",
    workers: int | None = None,
    threads_per_worker: int | None = None,
    memory_limit: int | None = None,
    client=None,
    executor=None,
    checkpoint: str | os.PathLike | None = None,
    keep_checkpoint: bool | None = None,
    output: str | os.PathLike | None = None,
    overwrite: bool = False,
    progress: bool = False,
    dashboard: bool = True,
    log=None,
    max_blocks: int | None = None,
    durable: bool = True,
    connect_timeout: float | None = None,
) -> EngineResult:
    """Execute a plan.

    Parameters
    ----------
    plan : Plan
    scheduler : str
        ``synchronous``, ``threads`` (default), ``processes``, ``distributed`` or a cluster address
        ``tcp://host:port`` (see :func:`recurjac_scale.engine.schedulers.open_executor`).
    workers, threads_per_worker, memory_limit : optional
        Worker processes / threads; ``workers`` without a scheduler starts a LocalCluster on 127.0.0.1, whose
        workers get ``memory_limit`` (default: the plan's budget over the nanny's terminate fraction,
        :func:`~recurjac_scale.engine.memory.local_memory_limit`).
    client : distributed.Client, optional
        Run on this client.
    executor : Executor, optional
        An open :class:`~recurjac_scale.engine.schedulers.Executor` to reuse across runs (e.g. one process pool
        for several jobs); overrides ``scheduler`` and ``client``.
    checkpoint : path, optional
        Checkpoint folder (bound to ``plan.job_id``): finished blocks are recorded there and reused by a rerun.
        Without it, the state lives in a temporary folder removed at the end.  With a cluster of several machines
        give a folder every worker can reach.
    keep_checkpoint : bool, optional
        Keep the checkpoint folder after success (default: keep a folder that was given).
    output : path, optional
        Write the result as a zarr store (arrays ``lower``, ``upper`` (m, n_0), metadata in the attributes).  It is
        assembled under a temporary sibling name and renamed when complete.
    overwrite : bool
        Replace an existing ``output``.
    progress : bool
        Show progress bars (tqdm per layer step and overall; ``distributed.progress`` under a Client).
    dashboard : bool
        Start the dashboard of a LocalCluster (its link is printed through ``log``).
    log : callable, optional
        ``log(str)`` for status lines (the CLI passes a printer to stderr); default silent.
    max_blocks : int, optional
        Compute at most this many blocks, then stop (for measuring a fraction of a job; raises
        :class:`~recurjac_scale.errors.IncompleteRunError` (a ``RuntimeError``) afterwards so no partial result is
        mistaken for a complete one, unless all blocks were done).
    durable : bool
        ``fsync`` each block's data and record before moving on (survives a machine crash, not only a killed
        process); about 5 ms per file here, negligible against real tasks.
    connect_timeout : float, optional
        Seconds to wait for a scheduler given by address (:func:`~recurjac_scale.engine.schedulers.connect`).

    Returns
    -------
    EngineResult
    """
    log = log or (lambda s: None)
    ctx = plan.context
    if ctx is None:
        raise StoreError("this plan has no job context (was it loaded from JSON?); re-plan it")
    if output is not None:
        output = Path(output)
        if output.exists() and not overwrite:
            raise OutputExistsError(f"output {str(output)!r} already exists; pass overwrite=True to replace it")
    t_start = time.perf_counter()
    given_ckpt = checkpoint is not None
    if given_ckpt:
        ckpt_dir = Path(checkpoint)
    else:
        base = output.parent if output is not None else None
        ckpt_dir = Path(tempfile.mkdtemp(prefix="recurjac-state-", dir=base))
    if keep_checkpoint is None:
        keep_checkpoint = given_ckpt
    ckpt = Checkpoint.open(ckpt_dir, plan.job_id, description=json_safe(plan.to_dict()), reset=overwrite)
    spec = ctx.worker_spec()
    success = False
    try:
        state = ckpt.state_path
        if spec.network is not None and plan.weights_bytes > SPILL_BYTES and _other_processes(scheduler, workers, client, executor):
            # A large in-memory network would be pickled into every task of the process pool (or travel through
            # the scheduler): write it once as a model store next to the state; workers read it from there.
            spec = _spill_network(spec, ctx, ckpt.path / "model.zarr")
        _create_state(state, plan, spec)
        done = ckpt.verified(log)
        R = plan.n_rows
        rb_, cb_ = plan.row_block, plan.col_block
        spec_key = f"rj-spec-{plan.job_id[:16]}"
        dsk: dict = {spec_key: spec}
        block_keys: list = []
        todo_per_step: dict[int, int] = {}
        reused = 0
        total = 0
        budget = max_blocks
        # ready[rb]: every block of the previous step for these rows is finished or scheduled.
        ready = {rb: True for rb in range(-(-R // rb_))}
        for sp in plan.steps:
            t = sp.step
            todo_per_step[t] = 0
            for rb in range(sp.n_row_blocks):
                r0, r1 = rb * rb_, min(R, (rb + 1) * rb_)
                bar_deps = []
                row_ready = True
                for cb in range(sp.n_col_blocks):
                    total += 1
                    if (t, rb, cb) in done:
                        reused += 1
                        continue
                    if not ready[rb] or (budget is not None and budget <= 0):
                        row_ready = False
                        continue
                    if budget is not None:
                        budget -= 1
                    c0, c1 = cb * cb_, min(sp.width, (cb + 1) * cb_)
                    deps = [("rj-rows-%03d" % t_prev, rb) for t_prev in (t - 1,) if t_prev >= 1]
                    key = ("rj-block-%03d" % t, rb, cb)
                    dsk[key] = (
                        _block_task, spec_key, str(state), str(ckpt.path), plan.job_id, bool(durable), t, rb, cb,
                        (r0, r1), (c0, c1), *deps,
                    )
                    block_keys.append(key)
                    bar_deps.append(key)
                    todo_per_step[t] += 1
                prev = [("rj-rows-%03d" % (t - 1), rb)] if t > 1 else []
                dsk[("rj-rows-%03d" % t, rb)] = (_barrier, *bar_deps, *prev)
                ready[rb] = ready[rb] and row_ready
        complete = reused + len(block_keys) == total
        n0 = ctx.n_inputs
        m = ctx.n_outputs
        finish_keys = []
        stage_keys: list = []
        tmp_out = None
        if complete:
            if output is not None:
                tmp_out = output.with_name(f".{output.name}.{plan.job_id[:12]}.partial")
            else:
                tmp_out = ckpt.path / "result.zarr"
            create_result_store(tmp_out, plan, m, n0)
            row_bars = [("rj-rows-%03d" % plan.steps[-1].step, rb) for rb in range(plan.steps[-1].n_row_blocks)] if plan.steps else []
            finish_fn, finish_spec = _finish_task, spec_key
            if plan.stage is not None:  # a method's second stage (linear-jacobian) after the base chain's steps
                from .linear_stage import add_stage_graph, create_stage_arrays, stage_finish_task, stage_spec

                sspec = stage_spec(ctx, plan, spec)
                create_stage_arrays(state, plan, sspec)
                stage_keys, row_bars, finish_spec = add_stage_graph(dsk, plan, sspec, str(state), str(ckpt.path),
                                                                    bool(durable))
                finish_fn = _stage_finish_task
                log(f"second stage ({plan.method}): {len(stage_keys)} task(s) after the layer steps (finished ones "
                    "recorded in the checkpoint are skipped)")
            key = ("rj-finish", 0)
            base = (spec_key,) if plan.stage is not None else ()  # the stage's finish also reads the base chain
            dsk[key] = (finish_fn, finish_spec, str(state), str(tmp_out), plan.job_id, 0, (0, n0), *base, *row_bars)
            finish_keys.append(key)
        log(
            f"job {plan.job_id[:12]}: {total} blocks in {len(plan.steps)} layer steps; reusing {reused} finished "
            f"block(s) from {ckpt.path}; computing {len(block_keys)}"
        )
        if executor is not None:
            ex_cm = contextlib.nullcontext(executor)
        else:
            if memory_limit is None and plan.memory_budget:
                from .memory import local_memory_limit

                memory_limit = local_memory_limit(plan.memory_budget)
            ex_cm = open_executor(
                scheduler,
                workers=workers,
                threads_per_worker=threads_per_worker,
                memory_limit=memory_limit,
                dashboard=dashboard and progress,
                client=client,
                connect_timeout=connect_timeout,
            )
        with ex_cm as ex:
            if ex.dashboard_link:
                log(f"dask dashboard: {ex.dashboard_link}")
            keys = block_keys + stage_keys + finish_keys
            bars = None
            if progress and ex.client is None:
                bars = _Progress(todo_per_step, len(finish_keys), 0)
            try:
                values = ex.run(
                    dsk,
                    keys,
                    callbacks=(bars.callback,) if bars else (),
                    distributed_progress=progress and ex.client is not None,
                )
            finally:
                if bars:
                    bars.close()
            exinfo = ex.describe()
        task_times = {}
        step_seconds: dict[int, float] = {sp.step: 0.0 for sp in plan.steps}
        for v in values[: len(block_keys)]:
            if v.get("reused"):
                continue
            task_times[(v["step"], v["rb"], v["cb"])] = v["seconds"]
            step_seconds[v["step"]] += v["seconds"]
        if not complete:
            raise IncompleteRunError(
                f"stopped after {len(block_keys)} block(s) (max_blocks); {total - reused - len(block_keys)} remain; "
                "rerun with the same checkpoint to continue",
                checkpoint=ckpt.path if given_ckpt else None, done=reused + len(block_keys), total=total,
            )
        import zarr

        g = zarr.open_group(str(tmp_out), mode="r+")
        lower = np.asarray(g["lower"][...])
        upper = np.asarray(g["upper"][...])
        if not (np.isfinite(lower).all() and np.isfinite(upper).all()):
            raise StoreError(
                f"result has missing or non-finite blocks ({int((~np.isfinite(lower)).sum())} entries); the "
                f"checkpoint {ckpt.path} may be damaged: rerun with a fresh checkpoint"
            )
        lip = _lipschitz(lower, upper, plan.p)
        finished = values[len(block_keys) + len(stage_keys):]
        if plan.stage is not None:
            from .linear_stage import stage_lipschitz, stage_seconds

            lip = stage_lipschitz(lip, finished, plan.p)
            step_seconds.update(stage_seconds(values[len(block_keys): len(block_keys) + len(stage_keys)]))
        seconds = time.perf_counter() - t_start
        res = EngineResult(
            lower=lower,
            upper=upper,
            method=plan.method,
            layer_bound_method=plan.layer_bound_method,
            eps=plan.eps,
            p=plan.p,
            job_id=plan.job_id,
            blocks_total=total,
            blocks_reused=reused,
            blocks_computed=len(block_keys),
            seconds=seconds,
            step_seconds=step_seconds,
            task_times=task_times,
            lipschitz=lip,
            output=str(output) if output is not None else None,
            executor=exinfo,
            rounding_share=_max_share(finished),
        )
        if output is not None:
            seal_result_store(g, tmp_out, output, res, plan, ctx, lower, upper)
        success = True
        return res
    except KeyboardInterrupt as exc:
        # Ctrl-C: say what is kept (the CLI prints it and exits 130); the interrupt itself goes on
        exc.incomplete = _incomplete(plan, ckpt, given_ckpt, "interrupted")
        raise
    except OSError as exc:
        # a full disk, a folder made read-only, a vanished mount: the records written so far are consistent
        if not given_ckpt:
            raise
        raise _incomplete(plan, ckpt, given_ckpt, f"failed ({type(exc).__name__}: {exc})") from exc
    finally:
        # A checkpoint folder that was given survives a failure (that is its purpose); a temporary one does not.
        if (success and not keep_checkpoint) or (not success and not given_ckpt):
            ckpt.remove()


def _incomplete(plan, ckpt, kept: bool, what: str) -> IncompleteRunError:
    total = sum(s.n_tasks for s in plan.steps)
    if not kept:
        return IncompleteRunError(f"{what}; no checkpoint was kept: a rerun starts over", total=total)
    try:
        done = len(ckpt.finished())
    except OSError:
        done = 0
    return IncompleteRunError(
        f"{what}: {done} of {total} block(s) are finished and kept in {ckpt.path}; no result was written; rerun "
        "the same command to continue",
        checkpoint=ckpt.path, done=done, total=total,
    )


SPILL_BYTES = 16 * 2**20
"""In-memory networks larger than this are written to a model store for process / cluster runs."""


def _other_processes(scheduler, workers, client, executor) -> bool:
    from .schedulers import parse_scheduler

    if executor is not None:
        return executor.kind in ("processes", "distributed")
    if client is not None:
        return True
    return parse_scheduler(scheduler, workers)[0] in ("processes", "distributed")


def _spill_network(spec, ctx, path: Path):
    import dataclasses

    from ..network.store import save_network

    if not path.exists():
        save_network(ctx.network, path)
    return dataclasses.replace(spec, network=None, store_path=str(path), outputs=None)


def _lipschitz(lower, upper, p) -> float | None:
    try:
        from ..lipschitz import lipschitz_from_bounds
    except ImportError:  # pragma: no cover - optional module
        return None
    try:
        return float(lipschitz_from_bounds(lower, upper, p)[0])
    except Exception:  # noqa: BLE001 - the bound itself is the product; a failing norm must not lose it
        return None
