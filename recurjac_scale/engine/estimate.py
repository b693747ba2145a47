"""Scaling beyond this machine: the wall time of a plan on W workers, from measured per-task times and the task
graph.

The graph of a plan is one chain per row block: step ``t`` of row block ``rb`` is ``n_col_blocks(t)`` independent
tasks that all wait for step ``t - 1`` of the same row block; the finishing task waits for everything.  Given a time
per task (measured; unmeasured tasks extrapolated per step from the measured ones, in proportion to their block
area, or from the step's FLOP estimate at the measured FLOP rate), :func:`estimate_wall_time` reports

- ``total_work_s``: the sum of all task times (one worker's time, without overheads);
- ``critical_path_s``: the longest dependency chain (no number of workers can beat it);
- per W: a list-scheduling simulation (greedy, longest-remaining-path first, one task per worker thread) plus a
  per-task scheduling overhead, and the lower bound ``max(total / W, critical path)``.

It ignores data movement (priors and weights are read from shared storage; add it to ``overhead_s`` if it matters)
and assumes identical workers.
"""

from __future__ import annotations

import heapq
from typing import Iterable, Mapping

__all__ = ["estimate_wall_time", "task_graph", "task_times_from_checkpoint"]


def task_times_from_checkpoint(path) -> dict:
    """``(t, rb, cb) -> seconds`` from the block records of a checkpoint folder (e.g. of a partial run with
    ``max_blocks``), for :func:`estimate_wall_time`."""
    import json
    from pathlib import Path

    out = {}
    for f in (Path(path) / "done").glob("step-*/r*-c*.json"):
        try:
            r = json.loads(f.read_text())
            out[(int(r["step"]), int(r["rb"]), int(r["cb"]))] = float(r["seconds"])
        except (OSError, KeyError, TypeError, ValueError):  # a torn or edited record: no time for it
            continue
    return out


def task_graph(plan) -> tuple[dict, dict, dict]:
    """The plan's tasks: ``(area, deps, flops)`` keyed by ``(t, rb, cb)`` (``("finish", 0, 0)`` for the finish):
    block area (rows x cols), dependency lists, and estimated FLOPs per task."""
    R = plan.n_rows
    area, deps, flops = {}, {}, {}
    for sp in plan.steps:
        t = sp.step
        per_entry = sp.flops / max(1, R * sp.width)
        for rb in range(sp.n_row_blocks):
            rows = min(R, (rb + 1) * plan.row_block) - rb * plan.row_block
            prev = [(t - 1, rb, c) for c in range(plan.steps[t - 2].n_col_blocks)] if t > 1 else []
            for cb in range(sp.n_col_blocks):
                cols = min(sp.width, (cb + 1) * plan.col_block) - cb * plan.col_block
                key = (t, rb, cb)
                area[key] = rows * cols
                deps[key] = prev
                flops[key] = per_entry * rows * cols
    fin = ("finish", 0, 0)
    area[fin] = 0
    flops[fin] = 0.0
    last = plan.steps[-1] if plan.steps else None
    deps[fin] = [] if last is None else [
        (last.step, rb, cb) for rb in range(last.n_row_blocks) for cb in range(last.n_col_blocks)
    ]
    return area, deps, flops


def _fill_times(plan, measured: Mapping, area: dict, flops: dict, finish_s: float) -> tuple[dict, dict]:
    """Per-task seconds: measured where available, else extrapolated.  Returns (times, how) with how[t] in
    {"measured", "area", "flops"}."""
    by_step: dict[int, list] = {}
    for k, v in measured.items():
        if k in area and area[k] > 0:
            by_step.setdefault(k[0], []).append((v, area[k], flops[k]))
    tot_s = sum(v for lst in by_step.values() for v, _, _ in lst)
    tot_f = sum(f for lst in by_step.values() for _, _, f in lst)
    sec_per_flop = tot_s / tot_f if tot_f > 0 else None
    times, how = {}, {}
    for sp in plan.steps:
        t = sp.step
        lst = by_step.get(t)
        rate = sum(v for v, _, _ in lst) / sum(a for _, a, _ in lst) if lst else None
        how[t] = "measured" if lst else ("flops" if sec_per_flop else "none")
        for k in area:
            if k[0] != t:
                continue
            if k in measured:
                times[k] = float(measured[k])
            elif rate is not None:
                times[k] = rate * area[k]
                how[t] = "measured+area" if how[t] == "measured" else how[t]
            elif sec_per_flop is not None:
                times[k] = sec_per_flop * flops[k]
            else:
                raise ValueError(f"no measured task time to extrapolate layer step {t} from")
    times[("finish", 0, 0)] = float(finish_s)
    return times, how


def estimate_wall_time(
    plan,
    measured: Mapping,
    workers: Iterable[int] = (1, 2, 8, 64, 512),
    *,
    threads_per_worker: int = 1,
    overhead_s: float = 0.0,
    finish_s: float = 0.0,
) -> dict:
    """Estimated wall time of ``plan`` on W workers.

    Parameters
    ----------
    plan : Plan
    measured : mapping
        ``(t, rb, cb) -> seconds`` of measured tasks (``EngineResult.task_times``, or the ``seconds`` field of the
        checkpoint records of a partial run).  At least one task per step, or a FLOP rate from other steps.
    workers : iterable of int
    threads_per_worker : int
        Concurrent tasks per worker.
    overhead_s : float
        Scheduling / data overhead added to every task (e.g. 0.002 s on a threads scheduler, ~0.01-0.05 s on a
        distributed cluster).
    finish_s : float
        Time of the finishing task.

    Returns
    -------
    dict
        ``total_work_s``, ``critical_path_s``, ``n_tasks``, ``extrapolation`` (per step how its times were
        obtained) and ``workers``: ``{W: {"simulated_s", "lower_bound_s", "efficiency"}}``.
    """
    area, deps, flops = task_graph(plan)
    times, how = _fill_times(plan, measured, area, flops, finish_s)
    cost = {k: times[k] + overhead_s for k in times}
    # longest path to the end (priority) and critical path
    children: dict = {k: [] for k in cost}
    for k, ds in deps.items():
        for d in ds:
            children[d].append(k)
    order = _topo(deps)
    tail = {}
    for k in reversed(order):
        tail[k] = cost[k] + max((tail[c] for c in children[k]), default=0.0)
    critical = max(tail.values()) if tail else 0.0
    total = float(sum(cost.values()))
    out = {
        "n_tasks": len(cost),
        "total_work_s": total,
        "critical_path_s": critical,
        "extrapolation": {str(k): v for k, v in how.items()},
        "overhead_s": overhead_s,
        "workers": {},
    }
    for W in workers:
        slots = max(1, int(W) * int(threads_per_worker))
        sim = _simulate(cost, deps, children, tail, slots)
        lb = max(total / slots, critical)
        out["workers"][int(W)] = {
            "simulated_s": sim,
            "lower_bound_s": lb,
            "efficiency": total / (slots * sim) if sim > 0 else 1.0,
        }
    return out


def _topo(deps: dict) -> list:
    indeg = {k: len(v) for k, v in deps.items()}
    children: dict = {k: [] for k in deps}
    for k, ds in deps.items():
        for d in ds:
            children[d].append(k)
    ready = [k for k, n in indeg.items() if n == 0]
    order = []
    while ready:
        k = ready.pop()
        order.append(k)
        for c in children[k]:
            indeg[c] -= 1
            if indeg[c] == 0:
                ready.append(c)
    return order


def _simulate(cost: dict, deps: dict, children: dict, tail: dict, slots: int) -> float:
    """Greedy list scheduling on ``slots`` identical workers, highest remaining path first."""
    indeg = {k: len(v) for k, v in deps.items()}
    ready = [(-tail[k], i, k) for i, (k, n) in enumerate(indeg.items()) if n == 0]
    heapq.heapify(ready)
    running: list = []  # (finish time, seq, key)
    now = 0.0
    free = slots
    seq = 0
    done = 0
    n = len(cost)
    while done < n:
        while free > 0 and ready:
            _, _, k = heapq.heappop(ready)
            seq += 1
            heapq.heappush(running, (now + cost[k], seq, k))
            free -= 1
        if not running:  # pragma: no cover - a cycle would land here
            break
        now, _, k = heapq.heappop(running)
        free += 1
        done += 1
        for c in children[k]:
            indeg[c] -= 1
            if indeg[c] == 0:
                seq += 1
                heapq.heappush(ready, (-tail[c], seq, c))
    return float(now)
