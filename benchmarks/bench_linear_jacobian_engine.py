"""Benchmark of ``linear-jacobian`` through the engine (issue 16): the paper's CIFAR shape on a 2-worker LocalCluster.

Network: ``random_network(CIFAR_WIDTHS, "relu", default_rng(seed), bias_scale=0)`` (He-uniform weights, zero
biases; seed 2019 as the other CIFAR-shape benchmarks), then ``x0 = rng.uniform(-0.5, 0.5, 3072)`` from the same
generator; output = the predicted class at ``x0``, l-inf ball, eps 1e-3, no domain.  The network is written to a zarr model store (``$RECURJAC_BENCH_DIR`` or ``<tmp>/recurjac_bench``) and the
job runs through :func:`recurjac_scale.engine.plan_jacobian` / ``Plan.compute`` on a ``dask.distributed``
LocalCluster of ``--workers`` processes (1 thread each, 127.0.0.1) with ``--memory-budget`` per worker (the nanny
restarts a worker above it).

Reported per run: the certified l-inf local Lipschitz bound of logit 1 (the row norm objective or Proposition 2,
the smaller), wall time of the run (planning, i.e. layer bounds in the client, and the cluster's start separately), the summed
task seconds per stage, the peak RSS of every worker process (psutil, sampled every 0.2 s, and the worker's own
``ru_maxrss``: its lifetime peak, exact for the first run on a fresh cluster) and of this (client) process, and the load average before and after (the machine may be shared).  ``--in-memory`` also runs
the in-memory method (:func:`recurjac_scale.lipschitz.lipschitz`) in a child process, for its value, time and peak
RSS (``ru_maxrss``).

Usage::

    python benchmarks/bench_linear_jacobian_engine.py [--widths 3072,2048,...] [--eps 1e-3] [--workers 2]
        [--memory-budget 2GB] [--runs 1] [--in-memory] [--base]
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import platform
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

CIFAR_WIDTHS = (3072, 2048, 2048, 1024, 1024, 512, 512, 256, 256, 128, 10)


def instance(widths, seed):
    """``(network, x0, predicted class)``."""
    from recurjac_scale.testing import random_network

    rng = np.random.default_rng(seed)
    net = random_network(widths, "relu", rng, bias_scale=0.0)
    x0 = rng.uniform(-0.5, 0.5, widths[0])
    return net, x0, int(np.argmax(net.forward(x0[None])[0]))


class RssMonitor:
    """Peak RSS of the processes ``pids``, sampled every ``interval`` seconds."""

    def __init__(self, pids, interval=0.2):
        import psutil

        self.psutil = psutil
        self.pids = list(pids)
        self.interval = interval
        self.peak: dict[int, int] = {}
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        procs = [self.psutil.Process(p) for p in self.pids]
        while not self._stop.is_set():
            for p in procs:
                try:
                    r = p.memory_info().rss
                except (self.psutil.NoSuchProcess, self.psutil.AccessDenied):
                    continue
                if r > self.peak.get(p.pid, 0):
                    self.peak[p.pid] = r
            time.sleep(self.interval)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def start_cluster(workers, budget):
    """A LocalCluster of ``workers`` processes (1 thread, 127.0.0.1) with the engine's worker settings and the
    memory limit the engine gives a local cluster for ``budget``; returns ``(cluster, client, seconds)``."""
    import distributed

    from recurjac_scale.engine.memory import local_memory_limit
    from recurjac_scale.engine.schedulers import WORKER_ENV
    from recurjac_scale.engine.sizing import parse_bytes

    t0 = time.perf_counter()
    cluster = distributed.LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                                       dashboard_address=None, env=dict(WORKER_ENV),
                                       memory_limit=local_memory_limit(parse_bytes(budget)))
    client = distributed.Client(cluster)
    return cluster, client, time.perf_counter() - t0


def _maxrss():
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def engine_run(client, store, x0, c, eps, method, budget, stage_block=None):
    from recurjac_scale.engine import plan_jacobian

    workers = len(client.scheduler_info(n_workers=-1)["workers"])
    t0 = time.perf_counter()
    plan = plan_jacobian(store, x0, eps, math.inf, method, outputs=c, memory_budget=budget, threads_per_worker=1,
                         total_threads=workers, client=client, stage_block=stage_block)
    t_plan = time.perf_counter() - t0
    worker_pids = sorted(client.run(os.getpid).values())
    load0 = os.getloadavg()
    with RssMonitor([os.getpid(), *worker_pids]) as mon:
        t1 = time.perf_counter()
        c1 = time.process_time()
        res = plan.compute(client=client)
        wall = time.perf_counter() - t1
        client_cpu = time.process_time() - c1
    load1 = os.getloadavg()
    maxrss = client.run(_maxrss)  # each worker's lifetime peak (exact; includes earlier runs on the same cluster)
    return {
        "ru_maxrss_workers_MiB": [v / 1024 for v in maxrss.values()],
        "method": method, "lipschitz": res.lipschitz, "plan_s": t_plan, "run_wall_s": wall, "client_cpu_s": client_cpu,
        "task_seconds": {str(k): v for k, v in res.step_seconds.items()},
        "peak_rss_workers_MiB": [mon.peak.get(p, 0) / 2**20 for p in worker_pids],
        "peak_rss_client_MiB": mon.peak.get(os.getpid(), 0) / 2**20,
        "plan_peak_worker_MiB": plan.peak_worker_bytes / 2**20,
        "stage_block": plan.stage.block if plan.stage is not None else None,
        "n_tasks": plan.n_tasks, "load_before": load0, "load_after": load1,
        "entries_mean_width": float(np.mean(res.upper - res.lower)),
    }


def _in_memory(widths, seed, eps, q):
    from threadpoolctl import threadpool_limits
    import resource

    from recurjac_scale.lipschitz import lipschitz

    net, x0, c = instance(widths, seed)
    with threadpool_limits(1):
        t0, c0 = time.perf_counter(), time.process_time()
        v = lipschitz(net, x0, eps, math.inf, method="linear-jacobian", outputs=c).points[0].lipschitz
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    q.put({"lipschitz": v, "wall_s": wall, "cpu_s": cpu,
           "peak_rss_MiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})


def in_memory(widths, seed, eps):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_in_memory, args=(widths, seed, eps, q))
    p.start()
    out = q.get()
    p.join()
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", default=",".join(map(str, CIFAR_WIDTHS)))
    ap.add_argument("--eps", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=2019)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--memory-budget", default="2GB")
    ap.add_argument("--stage-block", type=int, default=None)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--in-memory", action="store_true")
    ap.add_argument("--base", action="store_true", help="also run recurjac-b through the engine")
    ap.add_argument("--out", default=None, help="append the JSON results to this file")
    args = ap.parse_args(argv)
    widths = tuple(int(w) for w in args.widths.split(","))
    from recurjac_scale.network.store import save_network

    base = Path(os.environ.get("RECURJAC_BENCH_DIR") or Path(tempfile.gettempdir()) / "recurjac_bench")
    base.mkdir(parents=True, exist_ok=True)
    store = base / f"linjac-{'-'.join(map(str, widths))}-s{args.seed}.zarr"
    net, x0, c = instance(widths, args.seed)
    if not store.exists():
        save_network(net, store)
    del net
    info = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": platform.platform(),
            "cpus": os.cpu_count(), "widths": widths, "eps": args.eps, "seed": args.seed, "output": c,
            "workers": args.workers, "memory_budget": args.memory_budget, "runs": []}
    methods = (["recurjac-b"] if args.base else []) + ["linear-jacobian"]
    cluster, client, t_start = start_cluster(args.workers, args.memory_budget)
    info["cluster_start_s"] = t_start
    try:
        for _ in range(args.runs):
            for m in methods:
                r = engine_run(client, str(store), x0, c, args.eps, m, args.memory_budget, args.stage_block)
                info["runs"].append(r)
                print(json.dumps(r), flush=True)
    finally:
        client.close()
        cluster.close()
    if args.in_memory:
        r = in_memory(widths, args.seed, args.eps)
        info["in_memory"] = r
        print(json.dumps({"in_memory": r}), flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(info) + "\n")


if __name__ == "__main__":
    main()
