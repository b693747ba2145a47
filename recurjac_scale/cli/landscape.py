"""``recurjac-scale landscape``: the certified landscape radius ``R*`` (Zhang et al. 2019, Figure 2) over a batch of
inputs: the largest radius found such that some gradient entry of output K keeps a strict sign on
``B_p[x0, R*] ∩ D`` (no stationary point of f_K there); ``inf`` when the global bounds already fix a sign.

With ``--json OUT`` one record per input (schema: README, "Batch jobs"); rerunning resumes.
"""

from __future__ import annotations

from ._batch import add_input_arguments, add_run_arguments, execute, load_job_inputs, model_source, print_summary
from ._common import add_model_argument, load_model

__all__ = ["register", "run"]


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "landscape",
        help="certified radius R* without stationary points of an output (Figure 2), over a batch of inputs",
        description=(
            "For each input: the largest radius R* found (doubling, then bisection) such that certified Jacobian "
            "bounds give some entry of the gradient of output K a strict sign over B_p[x0, R*] ∩ D."
        ),
    )
    add_model_argument(p)
    add_input_arguments(p, box=False)
    p.add_argument("--output", default="predicted", metavar="K",
                   help="the output K (default: each input's predicted class)")
    p.add_argument("--norm", choices=("1", "2", "inf"), default="2", help="input norm p (default 2)")
    p.add_argument("--method", default="recurjac-b", metavar="M",
                   help="Jacobian bound method: fastlip, recurjac-b (default), recurjac-f0, recurjac-f1")
    p.add_argument("--layer-bounds", default=None, metavar="B", help="ibp, fastlin, crown (default)")
    add_run_arguments(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..applications.batch import BatchJob
    from ..errors import InputError
    from ..jacobian import get_jacobian_method
    from ..layer_bounds.base import get_layer_bound_method, parse_norm

    p = parse_norm(args.norm)
    method = get_jacobian_method(args.method).name
    lb = "crown" if args.layer_bounds is None else str(args.layer_bounds).strip().lower()
    get_layer_bound_method(lb)
    net = load_model(args.model)
    out = str(args.output).strip().lower()
    if out != "predicted":
        if not out.isdigit() or not 0 <= int(out) < net.n_outputs:
            raise InputError(f"--output {args.output!r}; accepted: 'predicted' or an output index 0..{net.n_outputs - 1}")
        out = int(out)
    x, labels, indices, boxes, desc = load_job_inputs(args, net, p)
    desc.update(model=model_source(args.model))
    job = BatchJob("landscape", model_source(args.model), x, labels, indices, (out,),
                   dict(p=p, method=method, layer_bounds=lb), None, desc)
    res = execute(args, job)
    if not args.quiet:
        print_summary(res)
    if args.plot:
        from ..applications.plots import plot_r_star

        plot_r_star(res.records, args.plot)
    return 0 if res.summary["failed"] == 0 else 1
