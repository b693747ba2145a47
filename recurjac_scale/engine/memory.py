"""The default memory budget of a job: what the machine (or the cluster) can give, never more.

Without ``--memory-budget`` a plan is sized for

- a run on this machine (the threads or processes scheduler, or a ``LocalCluster`` the engine starts):
  :data:`SAFETY_FRACTION` of the memory available now (``psutil.virtual_memory().available``, and the cgroup's
  limit minus its usage when the process runs in a memory-limited cgroup), divided among the worker processes;
- a running cluster (a scheduler address or a ``distributed.Client``): the workers' ``memory_limit`` times the
  nanny's terminate fraction (:func:`recurjac_scale.engine.sizing.measure_workers`).

A ``LocalCluster`` started by the engine gets ``memory_limit = budget / terminate fraction``, so that the nanny
restarts a worker only above the budget its plan was sized for.
"""

from __future__ import annotations

import math
from pathlib import Path

__all__ = ["SAFETY_FRACTION", "available_memory", "default_memory_budget", "format_bytes", "local_memory_limit"]

SAFETY_FRACTION = 0.8
"""Fraction of the available memory a job may plan to use on this machine (the rest: the client process, which
holds the network and its layer bounds, the page cache of the stores, other programs)."""


def _cgroup_free() -> int | None:
    """Bytes the current cgroup (v2, or v1) may still allocate, or ``None`` without a limit."""
    for limit_f, usage_f in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        try:
            limit = Path(limit_f).read_text().strip()
            usage = int(Path(usage_f).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit == "max" or not limit.isdigit() or int(limit) >= 2**60:
            return None
        return max(0, int(limit) - usage)
    return None


def available_memory() -> int:
    """Bytes this machine can give a new job now: ``psutil.virtual_memory().available``, capped by the cgroup."""
    import psutil

    avail = int(psutil.virtual_memory().available)
    cg = _cgroup_free()
    return min(avail, cg) if cg is not None else avail


def default_memory_budget(n_workers: int = 1) -> tuple[int, str]:
    """The budget per worker process of a job run on this machine, and a sentence saying where it comes from.

    Parameters
    ----------
    n_workers : int
        Worker processes sharing this machine's memory (1 for the threads scheduler).

    Returns
    -------
    (int, str)
        Bytes per worker, and e.g. ``"default: 80% of the 20.1 GiB available, over 2 worker(s)"``.
    """
    n = max(1, int(n_workers))
    avail = available_memory()
    budget = int(SAFETY_FRACTION * avail / n)
    return budget, (
        f"default: {SAFETY_FRACTION:.0%} of the {format_bytes(avail)} available on this machine, over {n} "
        "worker process(es); set --memory-budget to change it"
    )


def local_memory_limit(budget: int) -> int:
    """``memory_limit`` for a LocalCluster worker whose plan was sized for ``budget`` bytes: the nanny restarts a
    worker at ``distributed.worker.memory.terminate`` (0.95) of its limit, so that point is the budget."""
    import dask

    frac = float(dask.config.get("distributed.worker.memory.terminate", 0.95) or 1.0)
    return int(math.ceil(budget / frac))


def format_bytes(n: float) -> str:
    """``n`` bytes for a reader, e.g. ``"1.5 GiB"``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def _format_bytes_up(n: float) -> str:
    """:func:`format_bytes` rounded up (never below ``n``): a size to give back as a budget."""
    for unit, f in (("B", 1), ("KiB", 2**10), ("MiB", 2**20), ("GiB", 2**30)):
        if n < 1024 * f:
            return f"{int(n)} B" if unit == "B" else f"{math.ceil(n / f * 10) / 10:.1f} {unit}"
    return f"{math.ceil(n / 2**40 * 10) / 10:.1f} TiB"
