"""``recurjac-scale lipschitz``: certified local / global Lipschitz constants from Jacobian bounds.

Prints a table (eps, lipschitz, which bound won, time) and, with ``--json OUT``, writes
:meth:`recurjac_scale.lipschitz.LipschitzResult.to_dict` plus the model and input: per radius ``eps``,
``lipschitz``, ``time_s`` (and ``prop2``, ``algorithm2``, ``source``), and ``naive_global``.
"""

from __future__ import annotations

import argparse
import json
import math

import numpy as np

from ..paths import write_atomic
from ._batch import add_input_arguments, add_run_arguments, execute, load_job_inputs, model_source, print_summary
from ._common import check_output, load_inputs, load_model
from .bounds import (
    add_common_arguments,
    check_eps,
    check_jacobian_method,
    check_layer_bounds,
    parse_eps,
    select_input,
)

__all__ = ["register", "run", "parse_eps_list", "parse_eps_grid"]


def parse_eps_list(text: str) -> list[float]:
    """``E[,E...]`` -> list of radii."""
    return [parse_eps(t) for t in str(text).split(",") if t.strip()] or [parse_eps(text)]


def parse_eps_grid(text: str) -> list[float]:
    """``START:END:N`` -> ``N`` log-spaced radii from START to END (both > 0)."""
    parts = str(text).split(":")
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"invalid --eps-grid {text!r}; expected START:END:N, e.g. 1e-4:0.1:10")
    try:
        start, end, n = float(parts[0]), float(parts[1]), int(parts[2])
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid --eps-grid {text!r}; expected START:END:N, e.g. 1e-4:0.1:10") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"invalid --eps-grid {text!r}: N must be >= 1")
    if not (start > 0 and end > 0 and math.isfinite(start) and math.isfinite(end)):
        raise argparse.ArgumentTypeError(
            f"invalid --eps-grid {text!r}: a log grid needs finite START > 0 and END > 0 (use --eps 0 for eps = 0)"
        )
    if start > end:
        raise argparse.ArgumentTypeError(
            f"invalid --eps-grid {text!r}: START = {start:g} > END = {end:g}; accepted: START <= END"
        )
    return [float(v) for v in np.geomspace(start, end, n)]


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "lipschitz",
        help="certified local or global Lipschitz constants (Proposition 2 / Algorithm 2)",
        description=(
            "Certified Lipschitz constants of x -> C f(x) over B_p[x0, eps] ∩ D from RecurJac / Fast-Lip Jacobian "
            "bounds: the dual norm of the gradient bound for one output row, the induced p->p norm for several; "
            "Algorithm 2 for p = inf; never larger than the naive product of operator norms."
        ),
    )
    add_common_arguments(p, input_required=False, index_type=str)
    add_input_arguments(p, required=False, box=False, index=False)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--eps", type=parse_eps_list, metavar="E[,E...]", help="radii (>= 0; 'inf' for global)")
    g.add_argument("--eps-grid", type=parse_eps_grid, metavar="START:END:N", help="N log-spaced radii")
    g.add_argument("--global", dest="global_", action="store_true", help="the global constant (eps = inf)")
    p.add_argument("--no-algorithm2", action="store_true", help="skip Algorithm 2 (p = inf)")
    p.add_argument("--no-global", action="store_true", help="--inputs: skip the global constant (eps = inf) per method")
    add_run_arguments(p)
    p.set_defaults(func=run)


def format_table(result) -> str:
    """The printed table: one line per radius."""
    lines = [f"{'eps':>12}  {'lipschitz':>14}  {'source':>10}  {'time_s':>9}"]
    for pt in result.points:
        lines.append(f"{pt.eps:>12.6g}  {pt.lipschitz:>14.8g}  {pt.source:>10}  {pt.time_s:>9.3f}")
    lines.append(f"naive global constant: {result.naive_global:.8g}")
    p = "inf" if result.p == math.inf else f"{result.p:g}"
    lines.insert(0, f"# {result.method} ({result.layer_bounds} layer bounds), p = {p}, {result.norm_kind}")
    return "\n".join(lines)


def run(args) -> int:
    from ..errors import InputError
    from ..lipschitz import lipschitz

    eps = [math.inf] if args.global_ else (args.eps if args.eps is not None else args.eps_grid)
    check_eps(eps)
    if (args.input is None) == (args.inputs is None):
        raise InputError("give exactly one of --input X.npy (one input, with --index I) and --inputs X (a batch)")
    if args.inputs is not None:
        return run_batch(args, eps)
    if args.plot:
        raise InputError("--plot needs a batch (--inputs)")
    if args.index is not None:
        try:
            args.index = int(args.index)
        except ValueError:
            raise InputError(f"--index {args.index!r} with --input must be one integer (use --inputs for a selection)") from None
    out = check_output(args.json, args.overwrite) if args.json else None
    method = check_jacobian_method(args.method)
    lb = check_layer_bounds(args.layer_bounds)
    net = load_model(args.model)
    x = select_input(load_inputs(args.input, net, clip=getattr(args, "clip", False)), args.index, args.input)
    res = lipschitz(
        net, x, eps, p=args.norm, method=method, layer_bounds=lb, outputs=args.outputs,
        algorithm2=not args.no_algorithm2, sparse_threshold=args.sparse_threshold,
    )
    if not args.quiet:
        print(format_table(res))
    if out is not None:
        d = res.to_dict()
        d["model"] = str(args.model)
        d["input"] = str(args.input)
        d["index"] = args.index
        d["outputs"] = (
            "all" if args.outputs is None else (list(args.outputs) if isinstance(args.outputs, tuple) else args.outputs)
        )
        write_atomic(out, lambda fh: fh.write(json.dumps(d, indent=2) + "\n"))
    return 0


def run_batch(args, eps) -> int:
    """``--inputs``: a Lipschitz sweep per input (every method of the comma-separated ``--method``), as a batch
    job with one record per input."""
    from ..applications.batch import BatchJob
    from ..layer_bounds.base import parse_norm

    p = parse_norm(args.norm)
    methods = tuple(check_jacobian_method(m) for m in str(args.method).split(",") if m.strip())
    lb = check_layer_bounds(args.layer_bounds)
    net = load_model(args.model)
    args.select = args.index
    x, labels, indices, _boxes, desc = load_job_inputs(args, net, p)
    outputs = args.outputs if not isinstance(args.outputs, tuple) else list(args.outputs)
    opts = dict(p=p, eps=list(eps), methods=list(methods), layer_bounds=lb, outputs=outputs,
                include_global=not args.no_global and not args.global_)
    desc.update(model=model_source(args.model))
    job = BatchJob("lipschitz", model_source(args.model), x, labels, indices, (None,), opts, None, desc)
    res = execute(args, job)
    if not args.quiet:
        print_summary(res)
    if args.plot:
        from ..applications.plots import plot_lipschitz

        first = next((r for r in res.records if not r.get("failed")), None)
        if first is not None:
            plot_lipschitz(first["eps_grid"], first["lipschitz"], first["naive"], args.plot,
                           title=f"input {first['index']}, p = {first['p']}")
    return 0 if res.summary["failed"] == 0 else 1
