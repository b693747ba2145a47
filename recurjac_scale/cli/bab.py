"""``recurjac-scale bab``: anytime branch-and-bound bounds of the local Lipschitz constant of one output.

Prints the certified upper bound, the attained lower bound (the largest exact gradient norm found in the region),
their ratio and why the search stopped; ``--json OUT`` writes :meth:`recurjac_scale.bab.BabResult.to_dict` plus
the model and input (and the exact result with ``--exact``: the activation-pattern MIP, or with ``--exact-method
regions`` the enumeration of the linear regions meeting the box, p = inf only).  ``--checkpoint PATH`` keeps the
frontier in a JSON file; rerunning the same command resumes from it.
"""

from __future__ import annotations

import json
import math
import sys

from ..errors import InputError
from ..layer_bounds.base import parse_norm
from ..paths import write_atomic
from ._common import check_output, load_inputs, load_model, positive_int, positive_seconds
from .bounds import NORM_CHOICES, check_eps, check_jacobian_method, check_layer_bounds, parse_eps, parse_outputs, select_input

__all__ = ["register", "run"]


def _tolerance(text: str) -> float:
    import argparse

    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a tolerance >= 0, got {text!r}") from None
    if not v >= 0:
        raise argparse.ArgumentTypeError(f"expected a tolerance >= 0, got {text!r}")
    return v


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "bab",
        help="branch-and-bound: certified upper and attained lower bounds of a local Lipschitz constant",
        description=(
            "Anytime branch-and-bound for max ||grad f_c(x)||_q over B_p[x0, eps] ∩ D (one output row): splits "
            "the region (signs of unstable neurons, or input coordinates), bounds every part with a Jacobian "
            "method, and reports the max over the parts (a certified upper bound that only tightens) and the "
            "largest gradient norm found at a point of the region (a lower bound).  Stops at --time-budget or "
            "when upper <= (1 + --gap) * lower."
        ),
    )
    p.add_argument("model", metavar="MODEL", help="zarr model store (from 'recurjac-scale import'), or 'default'")
    p.add_argument("--input", required=True, metavar="X.npy", help="input(s) in raw units, as .npy; 'default' for the default model's test digits")
    p.add_argument("--index", type=int, default=None, metavar="I", help="which input of a batch")
    p.add_argument("--eps", type=parse_eps, required=True, metavar="E", help="radius of the region")
    p.add_argument("--norm", choices=NORM_CHOICES, default="inf", help="input norm p (default inf)")
    p.add_argument(
        "--outputs", type=parse_outputs, default=None, metavar="K|C,J",
        help="logit K or the margin f_C - f_J (default: the class the network predicts at the input)",
    )
    p.add_argument("--method", default=None, metavar="M",
                   help="Jacobian method bounding each part (default: linear-jacobian for --norm inf and at most 64 "
                        "inputs, else recurjac-b)")
    p.add_argument("--layer-bounds", default=None, metavar="B", help="pre-activation bounds: ibp, fastlin, crown (default)")
    p.add_argument("--split", choices=("auto", "neuron", "input"), default="auto",
                   help="what to split: neuron signs (relu / leaky_relu; auto's choice there), input coordinates (p = inf)")
    p.add_argument("--lp-tighten", choices=("off", "splits", "all"), default=None,
                   help="certified LP tightening of the parts' unstable neurons over their split constraints (relu / "
                        "leaky_relu): splits = parts with splits, all = every part (default: splits for at most 64 "
                        "inputs and 512 hidden neurons, else off)")
    p.add_argument("--time-budget", type=positive_seconds, default=60.0, metavar="S", help="seconds of search (default 60)")
    p.add_argument("--gap", type=_tolerance, default=0.01, metavar="TOL", help="stop when upper <= (1 + TOL) lower (default 0.01)")
    p.add_argument("--scheduler", default=None, metavar="S",
                   help="synchronous, threads (default), processes, distributed (a local cluster of --workers), or tcp://host:port")
    p.add_argument("--workers", type=positive_int, default=None, metavar="N", help="worker processes (processes / distributed)")
    p.add_argument("--checkpoint", default=None, metavar="PATH", help="JSON checkpoint of the frontier; an existing one is resumed")
    p.add_argument("--exact", action="store_true",
                   help="also compute the exact constant (relu / leaky_relu; small networks)")
    p.add_argument("--exact-method", choices=("mip", "regions"), default="mip",
                   help="mip: the activation-pattern MIP (p = 1 or inf; default); regions: enumeration of the linear "
                        "regions meeting the box (p = inf only; faster when the MIP's l1 sign binaries are many)")
    p.add_argument("--exact-time-limit", type=positive_seconds, default=600.0, metavar="S",
                   help="time limit of the exact computation (default 600)")
    p.add_argument("--json", default=None, metavar="OUT", help="write the result as JSON")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    p.add_argument("--quiet", action="store_true", help="print nothing on success")
    p.set_defaults(func=run)


def run(args) -> int:
    import numpy as np

    from ..bab import bab_lipschitz

    check_eps([args.eps])
    if args.exact and args.exact_method == "regions" and parse_norm(args.norm) != math.inf:
        raise InputError(f"--exact-method regions supports --norm inf only, got --norm {args.norm}; "
                         "use --exact-method mip")
    out = check_output(args.json, args.overwrite) if args.json else None
    method = check_jacobian_method(args.method) if args.method is not None else None
    lbm = check_layer_bounds(args.layer_bounds)
    net = load_model(args.model)
    x = select_input(load_inputs(args.input, net), args.index, args.input)
    outputs = args.outputs
    if outputs is None:
        outputs = int(np.argmax(net.materialize().forward(x)))
    res = bab_lipschitz(
        net, x, args.eps, args.norm, outputs=outputs, method=method, layer_bounds=lbm, split=args.split,
        time_budget=args.time_budget, gap=args.gap, scheduler=args.scheduler, workers=args.workers,
        checkpoint=args.checkpoint, lp_tighten=args.lp_tighten,
    )
    exact = None
    if args.exact:
        from ..exact import exact_lipschitz

        exact = exact_lipschitz(net, x, args.eps, args.norm, method=args.exact_method, outputs=outputs,
                                layer_bounds=lbm, time_limit=args.exact_time_limit)
    if not args.quiet:
        print(f"# branch-and-bound, {res.method} on {res.layer_bounds} layer bounds, split {res.split}, LP tightening {res.lp_tighten}, "
              f"p = {'inf' if res.p == math.inf else int(res.p)}, eps = {res.eps:g}, output {outputs}")
        print(f"upper    {res.upper:.10g}   (certified; root bound {res.root_upper:.10g})")
        print(f"lower    {res.lower:.10g}   (attained at a point of the region)")
        print(f"ratio    {res.ratio:.6g}")
        print(f"status   {res.status} after {res.time_s:.2f} s; {res.n_bounded} parts bounded, {res.n_frontier} open, "
              f"{res.n_closed} closed, {res.n_empty} empty{'; resumed' if res.resumed else ''}")
        if exact is not None:
            state = "optimal" if exact.optimal else f"not finished ({exact.status})"
            print(f"exact    {exact.value:.10g}   ({args.exact_method} {state}, upper {exact.upper:.10g}, "
                  f"validated {exact.validated}, {exact.time_s:.2f} s)")
    if out is not None:
        d = res.to_dict()
        d["model"] = str(args.model)
        d["input"] = str(args.input)
        d["index"] = args.index
        d["outputs"] = list(outputs) if isinstance(outputs, tuple) else outputs
        if exact is not None:
            d["exact"] = exact.to_dict()
        write_atomic(out, lambda fh: fh.write(json.dumps(d, indent=2) + "\n"))
    sys.stdout.flush()
    return 0
