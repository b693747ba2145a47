"""``recurjac-scale run``: execute a Jacobian-bound job blockwise on dask and write the result to a zarr store.

The result store (zarr v3 group) holds ``lower``, ``upper`` of shape ``(m, n_0)`` (float64, certified:
``lower <= d(C f)/dx (x) <= upper`` over ``B_p[x0, eps] ∩ D``) and, in its attributes, ``format``
(``recurjac-scale-jacobian-bounds``), the result summary (method, eps, p, blocks reused, timings, Lipschitz
constant), the plan and the network description.

Checkpoints are on by default: finished blocks are recorded in ``OUT.checkpoint/`` (or ``--checkpoint DIR``), a
rerun of the same command after a crash or a kill resumes from them, and the default folder is removed after
success.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..errors import IncompleteRunError
from ._common import check_output, load_model
from .plan import add_engine_arguments, make_plan

__all__ = ["register", "run"]


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "run",
        help="compute Jacobian bounds blockwise on dask (threads, processes or a cluster), with checkpoints",
        description=(
            "Run a blockwise Jacobian-bound job and write lower, upper (m, n_0) and metadata to a zarr result "
            "store.  Finished blocks are checkpointed; rerunning the same command after an interruption resumes."
        ),
    )
    add_engine_arguments(p)
    p.add_argument("-o", "--output", required=True, metavar="RESULT.zarr", help="result store to write")
    p.add_argument(
        "--scheduler", default=None, metavar="S",
        help="synchronous, threads (default), processes, distributed (a local cluster of --workers), or a "
        "scheduler address tcp://host:port",
    )
    ck = p.add_mutually_exclusive_group()
    ck.add_argument("--checkpoint", default=None, metavar="DIR",
                    help="checkpoint folder, kept after success (default: RESULT.zarr.checkpoint, removed after success)")
    ck.add_argument("--no-checkpoint", action="store_true", help="keep no checkpoint (an interrupted run starts over)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing result store (and a checkpoint folder of a different job)")
    p.add_argument("--max-blocks", type=int, default=None, metavar="N",
                   help="compute at most N blocks and stop (to measure a fraction of a job; rerun to continue)")
    p.add_argument("--json", action="store_true", help="print the result summary as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bars and no messages on success")
    p.set_defaults(func=run)


def run(args) -> int:
    out = check_output(args.output, args.overwrite)
    net = load_model(args.model)
    plan = make_plan(args, net, scheduler=args.scheduler)
    log = (lambda s: None) if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    if args.no_checkpoint:
        ckpt, keep = None, False
    elif args.checkpoint:
        ckpt, keep = Path(args.checkpoint), True
    else:
        ckpt, keep = out.with_name(out.name + ".checkpoint"), False
    log(plan.describe())
    try:
        res = plan.compute(
            scheduler=args.scheduler,
            workers=args.workers,
            threads_per_worker=args.threads_per_worker,
            checkpoint=ckpt,
            keep_checkpoint=keep,
            output=out,
            overwrite=args.overwrite,
            progress=not args.quiet,
            log=log,
            max_blocks=args.max_blocks,
            connect_timeout=args.connect_timeout,
        )
    except IncompleteRunError as exc:
        if args.max_blocks is not None and "max_blocks" in str(exc):
            log(f"stopped: {exc}")
            return 3
        raise
    except KeyboardInterrupt as exc:
        why = getattr(exc, "incomplete", None) or "interrupted"
        print(f"recurjac-scale run: {why}", file=sys.stderr, flush=True)
        return 130
    if args.json:
        print(json.dumps(res.to_dict(), indent=2, default=str))
    elif not args.quiet:
        lip = f", Lipschitz bound {res.lipschitz:.6g}" if res.lipschitz is not None else ""
        print(
            f"{res.method}: bounds of shape {res.lower.shape} in {res.seconds:.2f} s; {res.blocks_computed} block(s) "
            f"computed, {res.blocks_reused} reused from the checkpoint{lip} -> {out}"
        )
        from .bounds import rounding_note

        note = rounding_note(res.rounding_share)
        if note:
            print(note)
    return 0
