"""``recurjac-scale layer-bounds``: certified pre-activation bounds (IBP, Fast-Lin, CROWN), written to ``.npz``.

Output arrays: ``lower0, upper0, lower1, upper1, ...`` (float64), one pair per layer that has an activation (every
hidden layer, and the output layer only when it has a non-identity activation), 0-based in that order, with
``lower_i <= z(x) <= upper_i`` for every x in ``B_p[x0, eps] ∩ D``.  Metadata: ``layers`` (the 0-based affine
layer index of each pair), ``unstable`` (per pair, the count of unstable neurons, see
:func:`recurjac_scale.layer_bounds.count_unstable`), ``x0``, ``index``, ``method``, ``eps``, ``p`` (``inf`` as
``np.inf``), ``dtype``, ``block_rows``, ``rounding`` (how rounding is accounted for), ``seconds``.

A batch input file needs ``--index`` to choose one input (the region has one centre).
"""

from __future__ import annotations

import time

import numpy as np

from ..paths import write_atomic
from ._common import add_clip_argument, add_model_argument, add_output_arguments, check_output, load_inputs, load_model
from .bounds import NORM_CHOICES, check_eps, parse_eps, select_input

__all__ = ["register", "run"]

METHOD_CHOICES = ("ibp", "fastlin", "crown")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "layer-bounds",
        help="certified pre-activation bounds (ibp, fastlin, crown) over an eps-ball",
        description=(
            "Write certified bounds lower_i <= z_i(x) <= upper_i of the pre-activations of every layer with an "
            "activation, for every x in B_p[x0, eps] ∩ D (the model's input domain), to an .npz file: arrays "
            "lower0, upper0, lower1, upper1, ... plus unstable counts and metadata."
        ),
    )
    add_model_argument(p)
    p.add_argument("--input", required=True, metavar="X.npy", help="input in raw units, shape (n_0,) or (batch, n_0), as .npy; 'default' for the default model's test digits")
    p.add_argument("--index", type=int, default=None, metavar="I", help="which input of a batch (required for a batch)")
    add_clip_argument(p)
    p.add_argument("--eps", type=parse_eps, required=True, metavar="E", help="radius of the region (>= 0, or inf)")
    p.add_argument("--norm", choices=NORM_CHOICES, default="inf", help="input norm p of the region (default inf)")
    p.add_argument("--method", choices=METHOD_CHOICES, default="crown", help="bound method (default crown)")
    p.add_argument("--block-rows", type=int, default=None, metavar="R",
                   help="rows per block in the back-substitution (memory ~ R x widest layer; default 512)")
    p.add_argument("--dtype", choices=("float64", "float32"), default="float64",
                   help="working precision of the GEMMs (bounds are certified either way; default float64)")
    add_output_arguments(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..layer_bounds import layer_bounds

    check_eps([args.eps])
    out = check_output(args.output, args.overwrite)
    net = load_model(args.model)
    x = select_input(load_inputs(args.input, net, clip=getattr(args, "clip", False)), args.index, args.input)
    t0 = time.perf_counter()
    res = layer_bounds(
        net, x, args.eps, p=args.norm, method=args.method, block_rows=args.block_rows, dtype=np.dtype(args.dtype)
    )
    elapsed = time.perf_counter() - t0
    acts = net.layer_activations
    layers = [k for k, a in enumerate(acts) if not (k == len(acts) - 1 and a.is_identity)]
    arrays: dict[str, np.ndarray] = {}
    for i, k in enumerate(layers):
        arrays[f"lower{i}"] = np.asarray(res.lower[k], dtype=np.float64)
        arrays[f"upper{i}"] = np.asarray(res.upper[k], dtype=np.float64)
    arrays.update(
        layers=np.asarray(layers, dtype=np.int64),
        unstable=np.asarray([res.unstable[k] for k in layers], dtype=np.int64),
        x0=np.asarray(x, dtype=np.float64),
        index=np.array(-1 if args.index is None else int(args.index)),
        method=np.array(res.method),
        eps=np.array(float(args.eps)),
        p=np.array(np.inf if args.norm == "inf" else float(args.norm)),
        dtype=np.array(args.dtype),
        block_rows=np.array(-1 if args.block_rows is None else int(args.block_rows)),
        rounding=np.array(res.rounding),
        seconds=np.array(elapsed),
    )
    write_atomic(out, lambda fh: np.savez(fh, **arrays), binary=True)
    if not args.quiet:
        widths = ", ".join(
            f"{float(np.mean(arrays[f'upper{i}'] - arrays[f'lower{i}'])):.4g}" for i in range(len(layers))
        )
        print(
            f"{res.method} layer bounds, p={args.norm}, eps={args.eps:g}: {len(layers)} layers, mean widths [{widths}], "
            f"unstable {[int(v) for v in arrays['unstable']]} in {elapsed:.3f} s -> {out}"
        )
    return 0
