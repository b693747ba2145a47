"""Options and output shared by the batch commands (``certify``, ``landscape``, ``lipschitz --inputs``): inputs,
regions, the scheduler, the JSON-lines store, the progress bar, the summary table and ``--plot``."""

from __future__ import annotations

import argparse
import math
import sys

from ..errors import InputError
from ._common import positive_int, positive_seconds

__all__ = ["add_input_arguments", "add_run_arguments", "load_job_inputs", "model_source", "execute", "print_summary"]


def add_input_arguments(p: argparse.ArgumentParser, *, required: bool = True, box: bool = True, index: bool = True) -> None:
    p.add_argument("--inputs", required=required, metavar="X",
                   help="inputs: .npy of shape (N, n_0), or an ERAN-style .csv (label, then n_0 values per line), or "
                   "'default' for the default model's test digits")
    p.add_argument("--labels", default=None, metavar="Y.npy",
                   help="true labels (N,) for .npy inputs (default: the prediction is the class)")
    if index:
        p.add_argument("--index", dest="select", default=None, metavar="I",
                       help="which inputs, e.g. 3,5-9 (default: all)")
    p.add_argument("--scale", type=float, default=None, metavar="S", help="divide the input values by S (255 for pixels)")
    if box:
        p.add_argument("--box-lower", default=None, metavar="LO.npy",
                       help="p = inf: per-coordinate box lower bounds (n_0,) or (N, n_0); with --box-upper the boxes "
                       "replace --inputs (their centres are the inputs, radii are in units of the half-widths)")
        p.add_argument("--box-upper", default=None, metavar="HI.npy", help="per-coordinate box upper bounds")
        p.add_argument("--vnnlib", default=None, metavar="F.vnnlib", help="p = inf: the input box of a VNN-LIB property")


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", default=None, metavar="OUT.jsonl",
                   help="write one JSON record per item as it finishes, then the summary; rerunning the same "
                   "command resumes from it")
    p.add_argument("--overwrite", action="store_true", help="discard an existing --json store and start afresh")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no summary table")
    p.add_argument("--plot", default=None, metavar="FILE.png", help="plot the results (needs matplotlib)")
    p.add_argument("--scheduler", default=None, metavar="S",
                   help="synchronous, threads (default), processes, local[:N] (a local dask cluster), or a scheduler "
                   "address tcp://host:port")
    p.add_argument("--workers", type=positive_int, default=None, metavar="N",
                   help="worker processes (starts a local dask cluster on 127.0.0.1 unless --scheduler says otherwise)")
    p.add_argument("--threads-per-worker", type=positive_int, default=None, metavar="N",
                   help="threads per worker (threads scheduler: the pool size, default the CPU count)")
    p.add_argument("--memory-budget", default=None, metavar="SIZE",
                   help="memory limit per worker of a local cluster, e.g. 4GB (default: the machine's memory / N)")
    p.add_argument("--connect-timeout", type=positive_seconds, default=30.0, metavar="SECONDS",
                   help="how long to wait for a scheduler given by address (default 30)")


def model_source(name: str) -> str:
    """The model store path a worker process can open (``default``: the bundled store)."""
    if name == "default":
        from ..network.default import default_model_path

        return str(default_model_path())
    return str(name)


def load_job_inputs(args, net, p: float):
    """``(x, labels, indices, boxes, description)`` from the input options."""
    from ..applications.inputs import load_batch, load_box, parse_index

    boxes = load_box(net.n_inputs, lower=getattr(args, "box_lower", None), upper=getattr(args, "box_upper", None),
                     vnnlib=getattr(args, "vnnlib", None))
    if boxes is not None:
        if p != math.inf:
            raise InputError("box regions (--box-lower/--box-upper, --vnnlib) need --norm inf")
        lo, hi = boxes
        import numpy as np

        centres = 0.5 * (lo + hi)
        labels = None
        if args.labels is not None:
            labels = np.asarray(np.load(args.labels, allow_pickle=False)).reshape(-1).astype(np.int64)
            if labels.shape[0] != centres.shape[0]:
                raise InputError(f"{labels.shape[0]} labels for {centres.shape[0]} boxes")
        sel = parse_index(args.select, centres.shape[0])
        desc = {"inputs": "boxes", "box_source": args.vnnlib or f"{args.box_lower},{args.box_upper}"}
        return (centres[sel], None if labels is None else labels[sel], tuple(sel), (lo[sel], hi[sel]), desc)
    if args.inputs is None:
        raise InputError("give --inputs (or a box: --box-lower/--box-upper or --vnnlib)")
    b = load_batch(args.inputs, net, labels=args.labels, index=args.select, scale=args.scale)
    return b.x, b.labels, b.indices, None, {"inputs": b.source, "scale": args.scale}


def execute(args, job):
    """Run the batch with a progress bar (a terminal only, not with --quiet) and return the result."""
    from dask.utils import parse_bytes

    from ..applications.batch import run_batch

    mem = "auto"
    if args.memory_budget is not None:
        try:
            mem = parse_bytes(args.memory_budget)
        except (ValueError, TypeError):
            raise InputError(f"invalid --memory-budget {args.memory_budget!r}; accepted: a size such as 4GB or 512MiB") from None
    if args.json:
        from pathlib import Path

        out = Path(args.json)
        if not out.parent.exists():
            raise InputError(f"folder {str(out.parent)!r} for --json {args.json!r} does not exist")
    bar = None
    if not args.quiet and sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=len(job.items()), desc=job.kind, unit="item", file=sys.stderr)

    def on_record(rec, done, total):
        if bar is not None:
            bar.n = done
            bar.refresh()

    try:
        res = run_batch(job, args.json, scheduler=args.scheduler, workers=args.workers,
                        threads_per_worker=args.threads_per_worker, memory_limit=mem, overwrite=args.overwrite,
                        on_record=on_record, connect_timeout=args.connect_timeout)
    finally:
        if bar is not None:
            bar.close()
    return res


def _f(v, fmt=".5g"):
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    return format(v, fmt)


def print_summary(res) -> None:
    """The summary table on stdout."""
    s = res.summary
    lines = [f"# {s['kind']}: {s['inputs']} inputs, {s['records']} records "
             f"({res.reused} reused, {res.computed} computed, {s.get('corrupt_recomputed', 0)} corrupt recomputed)"]
    if s["kind"] == "certify":
        lines.append(f"{'target':>12}  {'count':>5}  {'mean radius':>12}  {'median':>12}  {'margin-bound mean':>18}  {'median':>12}")
        for t, d in s.get("by_target", {}).items():
            lines.append(f"{t:>12}  {d['count']:>5}  {_f(d['radius']['mean']):>12}  {_f(d['radius']['median']):>12}  "
                         f"{_f(d['margin_bound_radius']['mean']):>18}  {_f(d['margin_bound_radius']['median']):>12}")
    elif s["kind"] == "landscape":
        r = s["r_star"]
        lines.append(f"R*: mean {_f(r['mean'])}, median {_f(r['median'])}, min {_f(r['min'])}, max {_f(r['max'])}; "
                     f"R* = inf for {s['r_star_inf']} input(s)")
    elif s["kind"] == "lipschitz":
        for m, vals in s.get("lipschitz_median", {}).items():
            lines.append(f"{m:>12}: median over inputs per eps: " + ", ".join(_f(v) for v in vals))
    lines.append(f"time per input {_f(s['time_s_per_input'], '.3f')} s; wall {s['wall_s_this_run']:.2f} s this run; "
                 f"misclassified {s['misclassified']}; failed {s['failed']}")
    print("\n".join(lines))
