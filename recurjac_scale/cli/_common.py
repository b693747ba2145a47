"""Helpers shared by the subcommands: loading a model and inputs, refusing to overwrite outputs."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

from ..errors import InputError, OutputExistsError

__all__ = [
    "add_clip_argument",
    "add_model_argument",
    "add_output_arguments",
    "check_output",
    "load_inputs",
    "load_model",
    "positive_int",
]


def add_model_argument(parser) -> None:
    parser.add_argument("model", metavar="MODEL", help="zarr model store (from 'recurjac-scale import'), or 'default'")


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (a usage error, exit 2, otherwise)."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def positive_seconds(text: str) -> float:
    """argparse type: a positive, finite number of seconds (a usage error, exit 2, otherwise)."""
    try:
        v = float(text)
    except ValueError:
        v = float("nan")
    if not (v > 0 and v != float("inf")):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return v


def add_output_arguments(parser, metavar: str = "OUT.npz") -> None:
    """``-o/--output`` (required), ``--overwrite`` and ``--quiet``, as every command writing one file has them."""
    parser.add_argument("-o", "--output", required=True, metavar=metavar, help="output file")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    parser.add_argument("--quiet", action="store_true", help="print nothing on success")


def check_output(path: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse to overwrite an existing output unless ``overwrite``; make sure the parent folder exists."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputExistsError(f"output {str(path)!r} already exists; pass --overwrite to replace it")
    if not path.parent.exists():
        raise InputError(f"folder {str(path.parent)!r} for output {str(path)!r} does not exist")
    return path


def load_model(name: str):
    """Open a model store by path, or the bundled default model for ``'default'``."""
    from ..network.store_read import open_network
    from ..network.default import default_model_path

    if name == "default":
        return open_network(default_model_path())
    return open_network(name)


def add_clip_argument(parser) -> None:
    parser.add_argument(
        "--clip", action="store_true",
        help="clip inputs outside the model's declared input domain into it (default: refuse them)",
    )


def load_inputs(path: str, network, clip: bool = False) -> np.ndarray:
    """Read ``.npy`` inputs: one input ``(n_0,)`` / input shape, or a batch; returns ``(batch, n_0)`` float64,
    validated against the network's input shape and domain (``clip``: coordinates outside the domain are moved
    onto it instead of refused).  ``'default'`` names the five test digits bundled with the default model.

    Raises
    ------
    InputError
        Missing or unreadable file, an empty batch, values outside the domain (without ``clip``);
        :class:`~recurjac_scale.errors.ShapeMismatchError` / :class:`~recurjac_scale.errors.NonFiniteError` for
        a wrong shape or NaN / inf values.
    """
    if path == "default":
        from ..network.default import default_inputs_path

        path = str(default_inputs_path())
    p = Path(path)
    if not p.exists():
        raise InputError(f"input file {path!r} does not exist")
    try:
        x = np.load(p, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise InputError(f"cannot read input file {path!r} as .npy: {exc}") from None
    spec = network.input_spec
    if x.ndim >= 1 and x.shape[0] == 0:
        raise InputError(f"input file {path!r} holds no inputs (shape {x.shape}); give at least one input")
    if clip and spec.has_domain:
        x = spec.check(x, atol=np.inf)  # shape and finiteness only
        x = np.clip(x, spec.domain_lower, spec.domain_upper)
    return spec.check(x)
