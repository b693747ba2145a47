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
    add_common_arguments(p)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--eps", type=parse_eps_list, metavar="E[,E...]", help="radii (>= 0; 'inf' for global)")
    g.add_argument("--eps-grid", type=parse_eps_grid, metavar="START:END:N", help="N log-spaced radii")
    g.add_argument("--global", dest="global_", action="store_true", help="the global constant (eps = inf)")
    p.add_argument("--no-algorithm2", action="store_true", help="skip Algorithm 2 (p = inf)")
    p.add_argument("--json", default=None, metavar="OUT", help="write the result as JSON")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    p.add_argument("--quiet", action="store_true", help="do not print the table")
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
    from ..lipschitz import lipschitz

    eps = [math.inf] if args.global_ else (args.eps if args.eps is not None else args.eps_grid)
    check_eps(eps)
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
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(d, indent=2) + "\n")
        tmp.replace(out)
    return 0
