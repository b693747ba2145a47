"""Memory and block sizes of a job: byte sizes as text, the worker's baseline, what a task and a worker's caches
hold, the block sizes that fit a memory budget, and the memory facts of a running cluster.

The per-task figures come from the method's cost model (:class:`~recurjac_scale.jacobian.cost.ChainCost`); this
module adds what the engine itself holds (streamed weights in flight, per-process caches, the worker baseline).
The memory model is described in :mod:`recurjac_scale.engine.plan`, which uses these to size a plan.
"""

from __future__ import annotations

import math

from ..errors import InputError
from ..jacobian.cost import ChainCost
from .memory import _format_bytes_up, format_bytes  # noqa: F401  (format_bytes re-exported)

__all__ = [
    "parse_bytes",
    "format_bytes",
    "choose_blocks",
    "cache_bytes",
    "WORKER_BASELINE_BYTES",
    "measure_workers",
]

_F64 = 8

WORKER_BASELINE_BYTES = 256 * 2**20
"""Resident memory of a dask worker process before any task of a job: the interpreter, numpy / scipy / numba /
zarr / dask, this package and its numba kernels loaded from the cache.  Measured 211 MiB per worker process of a
``LocalCluster`` (Python 3.11, numpy 2.4, numba 0.68, dask 2026.8) after imports and one tiny job of every method;
rounded up.  With a client, :func:`plan_jacobian` uses the workers' own RSS instead when that is larger."""


def parse_bytes(s) -> int | None:
    """``"4GB"``, ``"512MiB"``, ``"2e9"``, ``4000000000`` -> bytes; ``None``/``""`` -> ``None``.

    Raises
    ------
    InputError
        For anything else or a non-positive size.
    """
    if s is None or s == "":
        return None
    if isinstance(s, (int, float)) and not isinstance(s, bool):
        v = float(s)
    else:
        txt = str(s).strip().lower().replace(" ", "")
        units = {
            "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
            "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40, "b": 1,
        }
        mult = 1.0
        for u, f in units.items():
            if txt.endswith(u):
                txt, mult = txt[: -len(u)], float(f)
                break
        try:
            v = float(txt) * mult
        except ValueError:
            raise InputError(f"memory size {s!r} not understood; give e.g. 4GB, 512MiB or a number of bytes") from None
    if not math.isfinite(v) or v <= 0:
        raise InputError(f"memory size {s!r} must be positive")
    return int(v)


# -- cost model ------------------------------------------------------------------------------------------------
def _streamed_bytes(shape: ChainCost, t: int, cb: int, tile_bytes: int = 0) -> int:
    """Bytes a task of step ``t`` holds, on top of :meth:`ChainCost.task_costs`' peak, when the weights are streamed from the
    store (:mod:`recurjac_scale.engine.streaming`).

    The column panel ``M_t[:, cols]`` (``d_t x cols``, the step's operand), and the store reads in flight: a tile
    of :meth:`~recurjac_scale.engine.streaming.StoreMatrix.live_block` (``tile_bytes``,
    :func:`~recurjac_scale.engine.streaming.store_tile_bytes`) is held as its compressed chunks, their decoded
    buffers, the tile read and its selected part: ``4 x tile_bytes``.  The live weight blocks themselves are
    counted in :meth:`~recurjac_scale.jacobian.cost.ChainCost.level_bytes` (in memory the same blocks are cut out of the held matrices).
    """
    d = shape.widths
    cols = min(cb, d[t])
    return int(d[t - 1] * cols * _F64 + 4 * int(tile_bytes))


def _block_grid(n: int, b: int) -> int:
    return -(-n // b) if n else 0


def choose_blocks(
    shape: ChainCost,
    *,
    row_block: int | None,
    col_block: int | None,
    memory_budget: int | None,
    threads_per_worker: int,
    total_threads: int,
    stream: bool = False,
    baseline: int = WORKER_BASELINE_BYTES,
    tile_bytes: int = 0,
) -> tuple[int, int]:
    """Block sizes: the given ones, else the largest column block (<= 512, GEMM efficiency grows with it) and a
    row block giving every thread several tasks, shrunk until
    ``baseline + weights + threads * peak task <= memory_budget`` (weights: 0 when streamed; a streamed task's
    peak includes what it reads, :func:`_streamed_bytes` with ``tile_bytes``).

    Raises
    ------
    InputError
        When even the smallest blocks allowed do not fit the budget; the message names the budget and the
        smallest budget that would fit.
    """
    R = shape.n_rows
    dmax = max(shape.widths[1:], default=shape.widths[0])
    cb = int(col_block) if col_block is not None else min(dmax, 512)
    rb = int(row_block) if row_block is not None else max(1, min(256, -(-R // max(1, 4 * total_threads))))
    if rb < 1 or cb < 1:
        raise InputError(f"block sizes must be >= 1, got row_block={row_block!r}, col_block={col_block!r}")
    if memory_budget is None:
        return rb, cb
    # streamed weights: only the CSR copies of the sparse levels stay in the worker
    wbytes = int(shape.sparse_bytes) if stream else shape.weights_bytes()

    def peak(rb_, cb_):
        return int(baseline) + wbytes + threads_per_worker * max(
            (
                shape.task_costs(t, rb_, cb_)[2] + (_streamed_bytes(shape, t, cb_, tile_bytes) if stream else 0)
                for t in range(1, shape.n_steps + 1)
            ),
            default=0,
        )

    while peak(rb, cb) > memory_budget:
        if cb > 16 and (col_block is None) and (row_block is not None or cb >= rb):
            cb = max(16, cb // 2)
        elif rb > 1 and row_block is None:
            rb = max(1, rb // 2)
        elif cb > 1 and col_block is None:
            cb = max(1, cb // 2)
        else:
            need = peak(rb, cb)
            task = (need - int(baseline) - wbytes) // max(1, threads_per_worker)
            raise InputError(
                f"memory budget {format_bytes(memory_budget)} per worker is too small: the smallest blocks "
                f"({rb} x {cb}) need {format_bytes(need)} (worker baseline {format_bytes(int(baseline))} + "
                f"{'streamed weights' if stream else 'held weights ' + format_bytes(wbytes)} + "
                f"{threads_per_worker} thread(s) x task {format_bytes(task)}); give --memory-budget >= "
                f"{_format_bytes_up(need)}"
                + (" or fewer --threads-per-worker" if threads_per_worker > 1 else "")
            )
    return rb, cb


def cache_bytes(shape: ChainCost, *, stream: bool) -> int:
    """The most a worker process's caches hold between tasks: the chain-only factors of steps that share across
    rows (:data:`recurjac_scale.jacobian.recurjac_shared.SHARED_CACHE_BYTES`) and the rows of earlier states
    (:data:`recurjac_scale.engine.run.PRIOR_CACHE_BYTES`, at most the job's whole state).  Streamed (out-of-core)
    runs keep neither."""
    if stream:
        return 0
    from .run import PRIOR_CACHE_BYTES

    return int(shape.shared_cache_bytes() + min(PRIOR_CACHE_BYTES, shape.state_bytes()))


def measure_workers(client) -> dict:
    """Memory facts of the workers of a ``distributed.Client``: ``memory_limit`` (smallest, bytes, or None),
    ``rss`` (largest resident memory now, bytes), ``threads`` (largest thread count), ``n_workers``, and
    ``budget``: the smallest ``memory_limit`` times ``distributed.worker.memory.terminate`` (the fraction at which
    the nanny restarts a worker), or None without a limit."""
    import dask

    ws = list(client.scheduler_info(n_workers=-1).get("workers", {}).values())
    limits = [int(w["memory_limit"]) for w in ws if w.get("memory_limit")]
    rss = [int((w.get("metrics") or {}).get("memory") or 0) for w in ws]
    frac = float(dask.config.get("distributed.worker.memory.terminate", 0.95) or 1.0)
    lim = min(limits) if limits else None
    return {
        "n_workers": len(ws),
        "memory_limit": lim,
        "rss": max(rss, default=0),
        "threads": max((int(w.get("nthreads", 1)) for w in ws), default=1),
        "budget": int(lim * frac) if lim else None,
    }
