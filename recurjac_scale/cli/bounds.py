"""``recurjac-scale bounds``: certified element-wise bounds of the input Jacobian, written to a ``.npz`` file.

Output arrays: ``lower``, ``upper`` (m, n_0) float64 with ``lower <= dC f/dx (x) <= upper`` over
``B_p[x0, eps] ∩ D``; metadata: ``x0`` (n_0,), ``outputs`` (the selection matrix C, (m, n_H)), ``method``,
``layer_bounds``, ``eps``, ``p`` (``inf`` stored as ``np.inf``), ``unstable`` (per-layer counts), ``timing_names`` /
``timing_values`` (seconds) and ``dtype``.  Helpers shared with ``recurjac-scale lipschitz`` live here too.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np

from ..errors import InputError
from ..paths import write_atomic
from ._common import add_clip_argument, add_model_argument, add_output_arguments, check_output, load_inputs, load_model

__all__ = [
    "register",
    "run",
    "parse_outputs",
    "parse_eps",
    "default_layer_bounds",
    "check_jacobian_method",
    "select_input",
    "selection_matrix",
]

NORM_CHOICES = ("1", "2", "inf")
DEFAULT_METHOD = "recurjac-b"


# -- helpers shared with the lipschitz command ----------------------------------------------------------------


def parse_outputs(text: str | None):
    """``all`` -> None, ``K`` -> int K, ``C,J`` -> (C, J) (the margin ``f_C - f_J``).

    Raises
    ------
    argparse.ArgumentTypeError
        On anything else (argparse turns it into a usage error, exit 2).
    """
    from ..jacobian.prepare import parse_output_selection

    if text is None:
        return None
    try:
        return parse_output_selection(text)
    except InputError:
        raise argparse.ArgumentTypeError(
            f"invalid --outputs {text!r}; accepted: 'all', a logit index K, or 'C,J' for the margin f_C - f_J"
        ) from None


def parse_eps(text: str) -> float:
    """A radius as given on the command line: a number or ``inf`` (syntax errors are usage errors, exit 2; a
    negative value is checked later and is a data error, exit 1)."""
    try:
        v = float(str(text).strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid radius {text!r}; accepted: a number >= 0 or 'inf'") from None
    if math.isnan(v):
        raise argparse.ArgumentTypeError(f"invalid radius {text!r}; accepted: a number >= 0 or 'inf'")
    return v


def check_eps(values) -> None:
    for v in values:
        if v < 0:
            raise InputError(f"eps={v:g} is negative; accepted: a radius in [0, inf]")


def default_layer_bounds() -> str:
    """``crown`` when registered, else the best available of ``fastlin``, ``ibp`` (as the Python API)."""
    from ..jacobian.prepare import default_layer_bound_method

    return default_layer_bound_method()


def check_layer_bounds(name: str | None) -> str:
    from ..layer_bounds import LAYER_BOUND_METHODS

    if name is None:
        return default_layer_bounds()
    LAYER_BOUND_METHODS.lookup(name)  # InputError naming the accepted ones
    return LAYER_BOUND_METHODS.resolve(name)


def check_jacobian_method(name: str) -> str:
    """Normalise a Jacobian method name; :class:`InputError` (exit 1) naming the accepted ones otherwise."""
    from ..jacobian import get_jacobian_method

    return get_jacobian_method(name).name  # accepts the aliases b, f0, f1, recurjac, fast-lip


def select_input(x: np.ndarray, index: int | None, path: str) -> np.ndarray:
    """One input ``(n_0,)`` from a validated batch ``(batch, n_0)``."""
    if index is None:
        if x.shape[0] != 1:
            raise InputError(
                f"input file {path!r} holds {x.shape[0]} inputs; choose one with --index (0..{x.shape[0] - 1})"
            )
        return x[0]
    if not -x.shape[0] <= index < x.shape[0]:
        raise InputError(f"--index {index} is out of range for {x.shape[0]} inputs in {path!r}")
    return x[index]


def selection_matrix(outputs, n_out: int) -> np.ndarray:
    """The selection matrix C (m, n_H) of an ``--outputs`` value (identity for all logits)."""
    from ..jacobian import output_matrix

    return output_matrix(outputs, n_out)


def parse_sparse_threshold(text: str):
    """``--sparse-threshold``: ``auto`` or a weight density >= 0 (``0``: dense kernels only)."""
    t = str(text).strip().lower()
    if t == "auto":
        return "auto"
    try:
        v = float(t)
    except ValueError:
        v = float("nan")
    if not (v >= 0.0):
        raise argparse.ArgumentTypeError(f"invalid sparse threshold {text!r}; accepted: auto, or a density >= 0 (0 = dense)")
    return v


def add_common_arguments(parser: argparse.ArgumentParser, *, input_required: bool = True, index_type=int) -> None:
    add_model_argument(parser)
    parser.add_argument("--input", required=input_required, metavar="X.npy", help="input(s) in raw units, shape (n_0,) or (batch, n_0), as .npy; 'default' for the default model's test digits")
    parser.add_argument("--index", type=index_type, default=None, metavar="I", help="which input of a batch (default: the only one)")
    add_clip_argument(parser)
    parser.add_argument("--norm", choices=NORM_CHOICES, default="inf", help="input norm p of the region (default inf)")
    parser.add_argument(
        "--method", default=DEFAULT_METHOD, metavar="M",
        help="Jacobian bound method: fastlip, recurjac-b, recurjac-f0, recurjac-f1, linear-jacobian "
        "(default recurjac-b)",
    )
    parser.add_argument(
        "--layer-bounds", default=None, metavar="B",
        help="pre-activation bounds: ibp, fastlin, crown (default crown, else the best available)",
    )
    parser.add_argument(
        "--outputs", type=parse_outputs, default=None, metavar="all|K|C,J",
        help="bound every logit (all, default), logit K, or the margin f_C - f_J (C,J)",
    )
    parser.add_argument(
        "--sparse-threshold", type=parse_sparse_threshold, default="auto", metavar="D",
        help="sparse x dense (CSR) kernels for pruned layers: auto (default) for the layers the model store holds "
        "as CSR, a density D for every layer sparser than D (e.g. 0.15), 0 for dense kernels only; bounds are "
        "certified either way and agree to ~1e-15 relative",
    )


# -- the command --------------------------------------------------------------------------------------------


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "bounds",
        help="certified element-wise bounds of the input Jacobian over an eps-ball",
        description=(
            "Write certified element-wise bounds lower <= d(C f)/dx (x) <= upper for every x in B_p[x0, eps] ∩ D "
            "(the model's input domain) to an .npz file: arrays lower, upper of shape (m, n_0) plus metadata."
        ),
    )
    add_common_arguments(p)
    p.add_argument("--eps", type=parse_eps, required=True, metavar="E", help="radius of the region (>= 0, or inf)")
    add_output_arguments(p)
    p.set_defaults(func=run)


ROUNDING_NOTE_SHARE = 0.01
"""The CLI notes the rounding share (:attr:`recurjac_scale.jacobian.JacobianBounds.rounding_share`) above this."""


def rounding_note(share) -> str:
    """One line when certified rounding may cost more than :data:`ROUNDING_NOTE_SHARE` of a bound's width, else
    ``""``."""
    if share is None or not share > ROUNDING_NOTE_SHARE:
        return ""
    return (f"note: certified rounding may cost up to {100.0 * share:.3g}% of a bound's width (rounding_share "
            f"{share:.3g}); float64 keeps it small")


def run(args) -> int:
    from ..jacobian import jacobian_bounds

    check_eps([args.eps])
    out = check_output(args.output, args.overwrite)
    method = check_jacobian_method(args.method)
    lb = check_layer_bounds(args.layer_bounds)
    net = load_model(args.model)
    x = select_input(load_inputs(args.input, net, clip=getattr(args, "clip", False)), args.index, args.input)
    C = selection_matrix(args.outputs, net.n_outputs)
    t0 = time.perf_counter()
    res = jacobian_bounds(
        net, x, args.eps, p=args.norm, method=method, layer_bounds=lb, outputs=args.outputs,
        sparse_threshold=args.sparse_threshold,
    )
    elapsed = time.perf_counter() - t0
    timings = {"total": elapsed, **{k: float(v) for k, v in (getattr(res, "timings", None) or {}).items()}}
    lower = np.asarray(res.lower, dtype=np.float64)
    upper = np.asarray(res.upper, dtype=np.float64)
    p_val = np.inf if args.norm == "inf" else float(args.norm)
    arrays = dict(
        lower=lower,
        upper=upper,
        x0=np.asarray(x, dtype=np.float64),
        outputs=C,
        method=np.array(method),
        layer_bounds=np.array(lb),
        eps=np.array(float(args.eps)),
        p=np.array(p_val),
        unstable=np.asarray(tuple(getattr(res, "unstable", ()) or ()), dtype=np.int64),
        timing_names=np.array(list(timings.keys()), dtype=str),
        timing_values=np.array(list(timings.values()), dtype=np.float64),
        dtype=np.array(str(getattr(res, "dtype", lower.dtype))),
        rounding_share=np.array(float(getattr(res, "rounding_share", float("nan")))),
    )
    write_atomic(out, lambda fh: np.savez(fh, **arrays), binary=True)
    if not args.quiet:
        width = upper - lower
        print(
            f"{method} ({lb} layer bounds), p={args.norm}, eps={args.eps:g}: bounds of shape {lower.shape} "
            f"(mean width {float(width.mean()) if width.size else 0.0:.4g}, max {float(width.max()) if width.size else 0.0:.4g}) "
            f"in {elapsed:.3f} s -> {out}"
        )
        note = rounding_note(getattr(res, "rounding_share", None))
        if note:
            print(note)
    return 0
