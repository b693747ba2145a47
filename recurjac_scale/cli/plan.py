"""``recurjac-scale plan``: decompose a Jacobian-bound job into blockwise tasks and print what it will cost (tasks,
FLOPs per layer step, bytes each task reads, peak memory per worker) without running it."""

from __future__ import annotations

import argparse
import json
import os

from .bounds import (
    add_common_arguments,
    check_eps,
    check_jacobian_method,
    check_layer_bounds,
    parse_eps,
    select_input,
)
from ._common import load_inputs, positive_int, positive_seconds

__all__ = ["register", "run", "add_engine_arguments", "make_plan"]


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    """The job and blocking options shared by ``plan`` and ``run``."""
    add_common_arguments(p)
    p.add_argument("--eps", type=parse_eps, required=True, metavar="E", help="radius of the region (>= 0, or inf)")
    p.add_argument("--row-block", type=positive_int, default=None, metavar="N", help="rows per task (default: chosen)")
    p.add_argument("--col-block", type=positive_int, default=None, metavar="N", help="columns per task (default: chosen)")
    p.add_argument(
        "--memory-budget", default=None, metavar="SIZE",
        help="memory per worker, e.g. 4GB or 512MiB: block sizes are chosen to fit it",
    )
    p.add_argument(
        "--stream-weights", action="store_true", default=None,
        help="tasks read the weights from the model store instead of workers holding the network (default: only "
        "when the held weights do not fit --memory-budget)",
    )
    p.add_argument("--workers", type=positive_int, default=None, metavar="N",
                   help="worker processes (starts a local dask cluster on 127.0.0.1 unless --scheduler says otherwise)")
    p.add_argument("--threads-per-worker", type=positive_int, default=None, metavar="N",
                   help="threads per worker (threads scheduler: the pool size, default the CPU count)")
    p.add_argument("--connect-timeout", type=positive_seconds, default=None, metavar="SECONDS",
                   help="how long to wait for a scheduler given by address (default 30)")


def make_plan(args, net, *, scheduler: str | None = None):
    """Validate the arguments and plan the job."""
    from ..engine.schedulers import parse_scheduler

    check_eps([args.eps])
    method = check_jacobian_method(args.method)
    lb = check_layer_bounds(args.layer_bounds)
    x = select_input(load_inputs(args.input, net, clip=getattr(args, "clip", False)), args.index, args.input)
    kind, addr = parse_scheduler(scheduler, args.workers)
    n_workers = 1
    if kind == "threads":
        tpw = args.threads_per_worker or os.cpu_count() or 1
        total = tpw
    elif kind == "distributed":
        tpw = args.threads_per_worker or 1
        n_workers = args.workers or 1
        total = tpw * n_workers
    elif kind == "processes":
        tpw = 1
        total = n_workers = args.workers or os.cpu_count() or 1
    else:
        tpw = total = 1
    # Give the engine the store's path, so that workers read the weights from the store themselves.
    if args.model == "default":
        from ..network.default import default_model_path

        source = default_model_path()
    else:
        source = args.model
    client = None
    if addr:
        # a running cluster: size the plan for its workers (memory_limit, measured RSS, threads)
        from ..engine.schedulers import connect

        client = connect(addr, getattr(args, "connect_timeout", None))
    try:
        return _plan(args, source, x, method, lb, tpw, total, n_workers, client)
    finally:
        if client is not None:
            client.close()


def _plan(args, source, x, method, lb, tpw, total, n_workers, client):
    from ..engine import plan_jacobian

    if client is not None:
        ws = client.scheduler_info(n_workers=-1).get("workers", {})
        if ws:
            tpw = args.threads_per_worker or max(int(w.get("nthreads", 1)) for w in ws.values())
            total = sum(int(w.get("nthreads", 1)) for w in ws.values())
    return plan_jacobian(
        source,
        x,
        args.eps,
        args.norm,
        method,
        layer_bounds=lb,
        outputs=args.outputs,
        row_block=args.row_block,
        col_block=args.col_block,
        memory_budget=args.memory_budget,
        threads_per_worker=tpw,
        total_threads=total,
        stream_weights=args.stream_weights,
        sparse_threshold=args.sparse_threshold,
        client=client,
        n_workers=n_workers,
    )


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "plan",
        help="show how a Jacobian-bound job splits into tasks, and its cost, without running it",
        description=(
            "Plan a blockwise Jacobian-bound job (row block x column block tasks per layer step) and print the "
            "number of tasks, the FLOPs of each layer step, the bytes each task reads and the peak memory per "
            "worker.  Only the pre-activation bounds are computed."
        ),
    )
    add_engine_arguments(p)
    p.add_argument("--scheduler", default=None, metavar="S",
                   help="scheduler the plan is sized for (as for 'run'; default threads)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    from ._common import load_model

    net = load_model(args.model)
    plan = make_plan(args, net, scheduler=args.scheduler)
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2, default=str))
    else:
        print(plan.describe())
    return 0
