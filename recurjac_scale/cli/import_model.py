"""``recurjac-scale import``: read a model file (ONNX, PyTorch, Keras HDF5, NNet, .npz) into a zarr model store."""

from __future__ import annotations

import argparse
from dataclasses import replace

import numpy as np

from ._common import check_output, positive_int

__all__ = ["register", "run"]

FORMATS = ("onnx", "torch", "keras", "nnet", "npz")
LAYOUTS = ("CHW", "HWC", "flat")

_DESCRIPTION = """\
Import a trained MLP into a zarr model store (the input of every other command).

The format is guessed from the suffix of SRC (.onnx, .pt/.pth, .h5, .nnet, .npz) unless --format is given.
Only chains of affine layers and element-wise activations with 0 <= sigma' <= C (Assumption 2 of Zhang et
al. 2019) are accepted: relu, leaky_relu, sigmoid, tanh, arctan, elu, softplus, hard_sigmoid.

Input metadata: --input-shape and --layout say how one input is flattened; --domain gives the box of valid raw
inputs (e.g. 0,1 for pixels); --mean/--std give an input normalisation (x - mean) / std that the network expects,
which is folded exactly (float64) into the first layer, so every command then takes raw inputs.  Per-channel
statistics need --input-shape C,H,W and --layout.

The store is written to a temporary folder beside MODEL.zarr and renamed into place; an existing MODEL.zarr is
replaced only with --overwrite."""

_EPILOG = """\
examples:
  recurjac-scale import mnist_fc.pth -o mnist.zarr --input-shape 1,28,28 --layout CHW --domain 0,1
  recurjac-scale import cifar.onnx -o cifar.zarr --input-shape 3,32,32 --layout CHW --domain 0,1 \\
      --mean 0.4914,0.4822,0.4465 --std 0.2470,0.2435,0.2616
  recurjac-scale import acas.nnet -o acas.zarr --chunks 1024"""


def _floats(text: str) -> list[float]:
    try:
        vals = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not vals or not all(np.isfinite(vals)):
        raise argparse.ArgumentTypeError(f"expected finite comma-separated numbers, got {text!r}")
    return vals


def _domain(text: str) -> tuple[float, float]:
    vals = _floats(text)
    if len(vals) != 2 or not vals[0] <= vals[1]:
        raise argparse.ArgumentTypeError(f"expected LO,HI with LO <= HI, got {text!r}")
    return vals[0], vals[1]


def _shape(text: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(t) for t in text.replace("x", ",").split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}") from None
    if not vals or any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return vals


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "import",
        help="import a model file (onnx, torch, keras h5, nnet, npz) into a zarr model store",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("source", metavar="SRC", help="model file to import")
    p.add_argument("-o", "--output", required=True, metavar="MODEL.zarr", help="model store to write")
    p.add_argument("--layers", default=None, metavar="ACT[,ACT...]",
                   help="PyTorch state dicts only: the activation after each Linear layer, e.g. relu,relu,linear "
                        "(or the full list linear,relu,linear,...)")
    p.add_argument("--format", choices=FORMATS, default=None,
                   help="model file format (default: guessed from the suffix of SRC)")
    p.add_argument("--chunks", type=positive_int, default=None, metavar="N",
                   help="chunk edge of the stored weight arrays (default: chunks of about 16 MiB)")
    p.add_argument("--domain", type=_domain, default=None, metavar="LO,HI",
                   help="input domain box in raw input units, the same for every coordinate, e.g. 0,1")
    p.add_argument("--mean", type=_floats, default=None, metavar="M[,M...]",
                   help="input normalisation mean: one value, one per channel, or one per input coordinate")
    p.add_argument("--std", type=_floats, default=None, metavar="S[,S...]",
                   help="input normalisation standard deviation (non-zero), broadcast like --mean")
    p.add_argument("--input-shape", type=_shape, default=None, metavar="C,H,W",
                   help="shape of one input before flattening, e.g. 1,28,28 (its product must equal n_0)")
    p.add_argument("--layout", choices=LAYOUTS, default=None,
                   help="order of the flattened input: CHW (channel-major), HWC (channel-last) or flat")
    p.add_argument("--overwrite", action="store_true", help="replace MODEL.zarr if it exists")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..errors import InputError
    from ..network.importers import import_network
    from ..network.store import save_network
    from ..network.store_read import network_store_info

    out = check_output(args.output, args.overwrite)
    net = import_network(args.source, format=args.format, layers=args.layers)
    spec = net.input_spec
    changes = {}
    if args.input_shape is not None:
        changes["shape"] = args.input_shape
    if args.layout is not None:
        changes["layout"] = args.layout
    if args.domain is not None:
        changes["domain_lower"], changes["domain_upper"] = args.domain
    if changes:
        spec = replace(spec, **changes)
        if spec.size != net.n_inputs:
            raise InputError(
                f"--input-shape {','.join(map(str, spec.shape))} has {spec.size} coordinates but the network has "
                f"{net.n_inputs} inputs"
            )
        net = net._replace(input_spec=spec)
    if args.mean is not None or args.std is not None:
        mean = args.mean if args.mean is not None else [0.0]
        std = args.std if args.std is not None else [1.0]
        net = net.with_normalization(np.asarray(mean), np.asarray(std))
    options = {
        k: v
        for k, v in dict(
            format=args.format, chunks=args.chunks, domain=args.domain, mean=args.mean, std=args.std,
            input_shape=args.input_shape, layout=args.layout,
        ).items()
        if v is not None
    }
    net.provenance["import_command"] = {"source_argument": str(args.source), **options}
    save_network(net, out, chunk_edge=args.chunks, overwrite=args.overwrite)
    info = network_store_info(out)
    acts = ",".join(str(a) for a in net.activations) or "none"
    fmt = net.provenance.get("format", args.format or "?")
    print(
        f"imported {args.source} ({fmt}) -> {out}: widths {'-'.join(map(str, net.widths))}, "
        f"hidden {acts}, output {net.output_activation}, {net.n_parameters} parameters, {info['dtype']}, "
        f"{_human(info['bytes_on_disk'])} on disk"
    )
    return 0


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover
