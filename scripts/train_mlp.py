#!/usr/bin/env python
"""Train an MLP with numpy (or build a He-initialised one) and write it as a recurjac-scale model store.

Examples
--------
The bundled default model (64-32-32-10 ReLU on scikit-learn's 8x8 digits, ~98% test accuracy, ~1 s)::

    python scripts/train_mlp.py -o recurjac_scale/data/default_model.zarr \\
        --inputs-out recurjac_scale/data/default_inputs.npy

A paper-sized network with He-normal weights and no training (for benchmarks; generated block by block, never
held in memory)::

    python scripts/train_mlp.py --dataset random --widths 784-1024-1024-1024-10 --activation relu --epochs 0 \\
        --seed 1 -o /tmp/mnist_4x1024.zarr

Everything is seeded: the same arguments give the same weights (He-initialised weights are identical on every
machine; trained weights may differ in the last bits between BLAS builds).  Only numpy is used for training;
scikit-learn only provides the digits data.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np


def _activation(text: str):
    """``NAME`` or ``NAME:key=value,...`` (e.g. ``leaky_relu:alpha=0.1``)."""
    from recurjac_scale.activations import get_activation

    name, _, rest = text.partition(":")
    params = {}
    for item in filter(None, rest.split(",")):
        k, _, v = item.partition("=")
        params[k.strip()] = float(v)
    return get_activation(name, **params)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train_mlp.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--widths", default="64-32-32-10", help="layer widths n_0-n_1-...-n_H (default: 64-32-32-10)")
    p.add_argument("--activation", default="relu",
                   help="hidden activation, NAME or NAME:key=value (e.g. leaky_relu:alpha=0.1; default: relu)")
    p.add_argument("--dataset", choices=("digits", "random"), default="digits",
                   help="digits: scikit-learn's 8x8 digits (needs widths 64-...-10); random: uniform inputs in "
                        "[0, 1] with labels from a random linear map (default: digits)")
    p.add_argument("--epochs", type=int, default=100,
                   help="training epochs; 0 = He-normal weights N(0, 2/n_in), zero biases, no data (default: 100)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default: 1e-3)")
    p.add_argument("--batch-size", type=int, default=32, help="minibatch size (default: 32)")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="L2 weight decay (default: 1e-4)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split, initialisation and batch order (default: 0)")
    p.add_argument("--test-fraction", type=float, default=0.25, help="held-out fraction (default: 0.25)")
    p.add_argument("--n-samples", type=int, default=2000, help="samples of the random data set (default: 2000)")
    p.add_argument("--input-shape", default=None,
                   help="input shape, comma separated, e.g. 1,28,28 (default: (1,8,8) for digits, flat otherwise)")
    p.add_argument("--dtype", choices=("float64", "float32"), default="float64",
                   help="store dtype (training is float64; float32 rounds the result; default: float64)")
    p.add_argument("--chunks", type=int, default=None, help="chunk edge of the stored arrays (default: ~16 MiB chunks)")
    p.add_argument("-o", "--output", required=True, help="model store to write (a .zarr folder)")
    p.add_argument("--inputs-out", default=None,
                   help="also save the first --n-inputs held-out inputs as .npy (shape (n, n_0))")
    p.add_argument("--n-inputs", type=int, default=5, help="number of inputs for --inputs-out (default: 5)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from recurjac_scale import __version__
    from recurjac_scale.errors import RecurJacError
    from recurjac_scale.network.model import InputSpec
    from recurjac_scale.network.store import save_network
    from recurjac_scale.network.train import he_network, load_dataset, parse_widths, train_mlp

    try:
        widths = parse_widths(args.widths)
        act = _activation(args.activation)
        out = Path(args.output)
        if out.exists() and not args.overwrite:
            raise RecurJacError(f"{str(out)!r} already exists; pass --overwrite to replace it")
        if args.inputs_out and Path(args.inputs_out).exists() and not args.overwrite:
            raise RecurJacError(f"{args.inputs_out!r} already exists; pass --overwrite to replace it")
        t0 = time.perf_counter()
        if args.epochs == 0:
            spec_shape = (widths[0],)
            if args.input_shape is not None:
                spec_shape = tuple(int(s) for s in args.input_shape.split(","))
            if args.dataset == "digits" and args.input_shape is None and widths[0] == 64:
                spec = InputSpec(shape=(1, 8, 8), layout="CHW", domain_lower=0.0, domain_upper=1.0)
            else:
                spec = InputSpec(shape=spec_shape, layout="CHW" if len(spec_shape) == 3 else "flat",
                                 domain_lower=0.0, domain_upper=1.0)
            net = he_network(
                widths, act, seed=args.seed, lazy=True, dtype=np.dtype(args.dtype), input_spec=spec,
                provenance={"trainer": "scripts/train_mlp.py", "trainer_version": __version__, "epochs": 0,
                            "init": "he_normal N(0, 2/n_in), zero biases"},
            )
            report = {}
            data = None
        else:
            data = load_dataset(
                args.dataset, n_inputs=widths[0], n_classes=widths[-1], n_samples=args.n_samples,
                test_fraction=args.test_fraction, seed=args.seed,
            )
            if args.input_shape is not None:
                shape = tuple(int(s) for s in args.input_shape.split(","))
                spec = InputSpec(shape=shape, layout="CHW" if len(shape) == 3 else "flat",
                                 domain_lower=0.0, domain_upper=1.0)
                data = type(data)(data.x_train, data.y_train, data.x_test, data.y_test, spec, data.name, data.n_classes)
            net, report = train_mlp(
                widths, act, data=data, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                weight_decay=args.weight_decay, seed=args.seed,
            )
            net.provenance["trainer"] = "scripts/train_mlp.py"
        t_train = time.perf_counter() - t0
        x = None
        if args.inputs_out:
            if data is None:
                rng = np.random.default_rng(np.random.SeedSequence([args.seed, 3]))
                x = rng.uniform(0.0, 1.0, size=(args.n_inputs, widths[0]))
                net.provenance["example_inputs"] = f"{args.n_inputs} uniform random inputs in [0, 1]"
            else:
                x = data.x_test[: args.n_inputs]
                net.provenance["example_inputs"] = (
                    f"first {len(x)} held-out inputs, labels " + ",".join(str(int(v)) for v in data.y_test[: len(x)])
                )
        save_network(net, out, chunk_edge=args.chunks, overwrite=args.overwrite, dtype=args.dtype)
        if x is not None:
            np.save(args.inputs_out, np.ascontiguousarray(x, dtype=np.float64))
    except RecurJacError as exc:
        print(f"train_mlp.py: error: {exc}", file=sys.stderr)
        return 1
    shape = "-".join(map(str, widths))
    if report:
        print(
            f"{shape} {act} on {args.dataset}: train accuracy {report['train_accuracy']:.4f}, "
            f"test accuracy {report['test_accuracy']:.4f} ({args.epochs} epochs, {t_train:.1f} s) -> {out}"
        )
    else:
        print(f"{shape} {act}: He-normal weights, seed {args.seed} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
