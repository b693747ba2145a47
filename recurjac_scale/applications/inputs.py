"""Inputs and regions of batch jobs: ``.npy`` batches, ERAN CSV files, index selections, and per-coordinate
boxes (``.npy`` bounds or the input constraints of a VNN-LIB file) turned into l-inf balls by an affine change of
input variables.

Box regions
-----------
A box ``[lo, hi]`` (per coordinate) is the l-inf ball ``B_inf[0, 1]`` in the variables ``u`` of
``x = c + w ⊙ u`` with ``c = (lo + hi) / 2`` and ``w = (hi - lo) / 2``.  :func:`box_network` folds this map into
the first affine layer (``W0 diag(w)``, ``b0 + W0 c``, in float64: the certified network is the folded one, as for
an input normalisation) and maps the model's domain ``D`` to ``u``-space (``[(D_lo - c)/w, (D_hi - c)/w]``;
coordinates with ``w = 0`` are fixed at ``c``: domain ``[0, 0]``).  Then ``B_inf[0, R] ∩ D_u`` in ``u`` is exactly
``{x : |x - c| <= R w} ∩ D``: a certified radius ``R >= 1`` certifies the whole box, and ``R`` is reported in units
of the half-widths.  No outer approximation of the box by a ball is involved.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError, ShapeMismatchError
from ..network.model import InputSpec, Network

__all__ = ["InputBatch", "parse_index", "load_batch", "box_network", "read_vnnlib_box", "load_box"]


@dataclass(frozen=True)
class InputBatch:
    """A batch of inputs.

    Attributes
    ----------
    x : ndarray, shape (N, n_0)
        Raw inputs (validated against the model's input shape and domain).
    labels : ndarray of int, shape (N,), or None
    indices : tuple of int
        The position of each input in its file (the ``index`` field of the records).
    source : str
        A description of where the inputs came from (the path), for the job description.
    """

    x: np.ndarray
    labels: np.ndarray | None
    indices: tuple
    source: str


def parse_index(text: str | None, n: int) -> list[int]:
    """``"3,5-9"`` -> ``[3, 5, 6, 7, 8, 9]`` (ranges inclusive); ``None`` -> ``0..n-1``.

    Raises
    ------
    InputError
        Malformed text, an index out of ``0..n-1`` or repeated.
    """
    if text is None or str(text).strip() in ("", "all"):
        return list(range(n))
    out: list[int] = []
    for part in str(text).split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise InputError(f"invalid --index {text!r}; accepted: comma-separated indices and ranges, e.g. 3,5-9")
        a = int(m.group(1))
        b = int(m.group(2)) if m.group(2) is not None else a
        if b < a:
            raise InputError(f"invalid range {part!r} in --index: the end is before the start")
        out.extend(range(a, b + 1))
    bad = [i for i in out if not 0 <= i < n]
    if bad:
        raise InputError(f"--index {bad[0]} is out of range for {n} inputs; accepted: 0..{n - 1}")
    if len(set(out)) != len(out):
        raise InputError(f"--index {text!r} names an input twice")
    return out


def _read_csv(path: Path, n0: int, scale: float | None) -> tuple[np.ndarray, np.ndarray]:
    try:
        rows = np.loadtxt(path, delimiter=",", ndmin=2)
    except ValueError as exc:
        raise InputError(f"cannot read {str(path)!r} as CSV (label, then {n0} values per line): {exc}") from None
    if rows.shape[1] != n0 + 1:
        raise ShapeMismatchError(
            f"CSV {str(path)!r} has {rows.shape[1]} columns; the model needs a label and {n0} values per line"
        )
    labels = rows[:, 0]
    if not np.all(labels == np.round(labels)):
        raise InputError(f"CSV {str(path)!r}: the first column must hold integer labels")
    x = rows[:, 1:]
    if scale is not None:
        x = x / float(scale)
    return x, labels.astype(np.int64)


def load_batch(path: str, network: Network, *, labels: str | None = None, index: str | None = None,
               scale: float | None = None) -> InputBatch:
    """Read a batch of inputs for ``network``.

    Parameters
    ----------
    path : str
        ``.npy`` of shape ``(N, n_0)`` (or one input ``(n_0,)``), or ``.csv`` in ERAN's format (label, then the
        ``n_0`` values, one input per line), or ``default`` (the bundled model's five test digits).
    labels : str, optional
        ``.npy`` of ``N`` integer labels (with ``.npy`` inputs; a CSV carries its own).
    index : str, optional
        Selection such as ``3,5-9`` (:func:`parse_index`).
    scale : float, optional
        Divide the values by it (``255`` for ERAN's 0-255 pixels).

    Raises
    ------
    InputError, ShapeMismatchError
        Missing or unreadable file, wrong shapes, labels out of range, inputs outside the model's domain.
    """
    n0 = network.n_inputs
    if scale is not None and not (float(scale) > 0):
        raise InputError(f"--scale {scale!r} must be > 0")
    if path == "default":
        from ..network.default import default_inputs_path

        path = str(default_inputs_path())
    p = Path(path)
    if not p.exists():
        raise InputError(f"input file {path!r} does not exist")
    y = None
    if p.suffix.lower() == ".csv":
        if labels is not None:
            raise InputError("a CSV input file carries its labels in its first column; drop --labels")
        x, y = _read_csv(p, n0, scale)
    else:
        try:
            x = np.load(p, allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise InputError(f"cannot read input file {path!r} as .npy: {exc}") from None
        x = np.asarray(x, dtype=np.float64)
        if x.ndim == 1:
            x = x[None, :]
        x = x.reshape(x.shape[0], -1) if x.ndim > 2 else x
        if scale is not None:
            x = x / float(scale)
        if labels is not None:
            lp = Path(labels)
            if not lp.exists():
                raise InputError(f"labels file {labels!r} does not exist")
            try:
                y = np.asarray(np.load(lp, allow_pickle=False)).reshape(-1)
            except (ValueError, OSError) as exc:
                raise InputError(f"cannot read labels file {labels!r} as .npy: {exc}") from None
            if y.shape[0] != x.shape[0]:
                raise ShapeMismatchError(f"{y.shape[0]} labels for {x.shape[0]} inputs")
            if not np.all(y == np.round(y)):
                raise InputError(f"labels in {labels!r} must be integers")
            y = y.astype(np.int64)
    if y is not None and ((y < 0) | (y >= network.n_outputs)).any():
        bad = int(y[(y < 0) | (y >= network.n_outputs)][0])
        raise InputError(f"label {bad} is out of range; accepted: 0..{network.n_outputs - 1}")
    x = network.input_spec.check(x)
    sel = parse_index(index, x.shape[0])
    return InputBatch(x=x[sel], labels=None if y is None else y[sel], indices=tuple(sel), source=str(path))


# -- boxes ----------------------------------------------------------------------------------------------------


_VNN_BOUND = re.compile(r"\(\s*assert\s*\(\s*(<=|>=)\s*(X_(\d+))\s+([-+0-9.eE]+)\s*\)\s*\)")
_VNN_BOUND_REV = re.compile(r"\(\s*assert\s*\(\s*(<=|>=)\s*([-+0-9.eE]+)\s+(X_(\d+))\s*\)\s*\)")


def read_vnnlib_box(path: str, n0: int) -> tuple[np.ndarray, np.ndarray]:
    """The input box of a VNN-LIB property: the top-level ``(assert (<= X_i c))`` / ``(assert (>= X_i c))``
    constraints (either argument order).  Output constraints (``Y_j``) are ignored.

    Raises
    ------
    InputError
        A missing file, a variable ``X_i`` without both bounds, or an index outside ``0..n0-1``.
    """
    p = Path(path)
    if not p.exists():
        raise InputError(f"VNN-LIB file {path!r} does not exist")
    text = re.sub(r";[^\n]*", "", p.read_text())
    lo = np.full(n0, np.nan)
    hi = np.full(n0, np.nan)

    def put(op, i, v):
        if not 0 <= i < n0:
            raise InputError(f"VNN-LIB {path!r}: X_{i} is outside the model's {n0} inputs")
        if op == "<=":
            hi[i] = v if np.isnan(hi[i]) else min(hi[i], v)
        else:
            lo[i] = v if np.isnan(lo[i]) else max(lo[i], v)

    for op, _name, i, v in _VNN_BOUND.findall(text):
        put(op, int(i), float(v))
    for op, v, _name, i in _VNN_BOUND_REV.findall(text):
        put({"<=": ">=", ">=": "<="}[op], int(i), float(v))
    missing = np.flatnonzero(np.isnan(lo) | np.isnan(hi))
    if missing.size:
        raise InputError(f"VNN-LIB {path!r}: X_{int(missing[0])} has no lower and upper bound ({missing.size} inputs)")
    if (lo > hi).any():
        k = int(np.argmax(lo > hi))
        raise InputError(f"VNN-LIB {path!r}: empty box at X_{k}: [{lo[k]}, {hi[k]}]")
    return lo, hi


def load_box(n0: int, *, lower: str | None = None, upper: str | None = None, vnnlib: str | None = None):
    """Boxes as arrays ``(N, n_0)`` from ``--box-lower/--box-upper`` (``.npy`` of shape ``(n_0,)`` or
    ``(N, n_0)``) or ``--vnnlib``; ``None`` when neither is given."""
    if vnnlib is not None:
        if lower is not None or upper is not None:
            raise InputError("give either --vnnlib or --box-lower/--box-upper, not both")
        lo, hi = read_vnnlib_box(vnnlib, n0)
        return lo[None, :], hi[None, :]
    if lower is None and upper is None:
        return None
    if lower is None or upper is None:
        raise InputError("a box needs both --box-lower and --box-upper")
    arrs = []
    for name, path in (("--box-lower", lower), ("--box-upper", upper)):
        if not Path(path).exists():
            raise InputError(f"{name} file {path!r} does not exist")
        try:
            a = np.asarray(np.load(path, allow_pickle=False), dtype=np.float64)
        except (ValueError, OSError) as exc:
            raise InputError(f"cannot read {name} file {path!r} as .npy: {exc}") from None
        a = a.reshape(1, -1) if a.ndim == 1 else a.reshape(a.shape[0], -1)
        if a.shape[1] != n0:
            raise ShapeMismatchError(f"{name} has {a.shape[1]} values per box; the model has {n0} inputs")
        if not np.isfinite(a).all():
            raise InputError(f"{name} contains NaN or infinite values")
        arrs.append(a)
    lo, hi = arrs
    if lo.shape != hi.shape:
        raise ShapeMismatchError(f"--box-lower has shape {lo.shape} but --box-upper {hi.shape}")
    if (lo > hi).any():
        b, k = np.argwhere(lo > hi)[0]
        raise InputError(f"box {int(b)} is empty at coordinate {int(k)}: lower {lo[b, k]} > upper {hi[b, k]}")
    return lo, hi


def box_network(network: Network, lower, upper) -> tuple[Network, np.ndarray]:
    """The network in the box variables ``u`` (``x = c + w ⊙ u``) and its centre ``u0 = 0``.

    Parameters
    ----------
    network : Network
    lower, upper : array_like, shape (n_0,)

    Returns
    -------
    net_u : Network
        ``net_u(u) = network(c + w ⊙ u)``, with the domain mapped to ``u``-space (see the module docstring).
    u0 : ndarray, shape (n_0,)
        Zeros (the box centre).

    Raises
    ------
    InputError
        An empty box, or a box whose centre lies outside the model's domain.
    """
    net = network.materialize() if network.is_lazy else network
    lo = np.asarray(lower, dtype=np.float64).reshape(-1)
    hi = np.asarray(upper, dtype=np.float64).reshape(-1)
    n0 = net.n_inputs
    if lo.shape != (n0,) or hi.shape != (n0,):
        raise ShapeMismatchError(f"box bounds of shape {lo.shape}, {hi.shape}; need ({n0},)")
    if (lo > hi).any():
        raise InputError("empty box: a lower bound is above its upper bound")
    c = 0.5 * (lo + hi)
    w = 0.5 * (hi - lo)
    spec = net.input_spec
    if spec.has_domain:
        dl, du = spec.domain_lower, spec.domain_upper
        if ((c < dl) | (c > du)).any():
            k = int(np.argmax((c < dl) | (c > du)))
            raise InputError(f"the box centre is outside the model's domain at coordinate {k}")
        with np.errstate(divide="ignore", invalid="ignore"):
            ul = np.where(w > 0, (dl - c) / np.where(w > 0, w, 1.0), 0.0)
            uu = np.where(w > 0, (du - c) / np.where(w > 0, w, 1.0), 0.0)
    else:
        ul = np.where(w > 0, -np.inf, 0.0)
        uu = np.where(w > 0, np.inf, 0.0)
    W0 = np.asarray(net.weights[0], dtype=np.float64)
    b0 = np.asarray(net.biases[0], dtype=np.float64)
    new_spec = InputSpec(shape=(n0,), layout="flat", domain_lower=ul, domain_upper=uu)
    prov = dict(net.provenance)
    prov["box_change"] = "x = c + w * u folded into layer 0 (recurjac_scale.applications.inputs.box_network)"
    net_u = Network(
        [W0 * w[None, :], *net.weights[1:]], [b0 + W0 @ c, *net.biases[1:]], net.activations,
        output_activation=net.output_activation, input_spec=new_spec, provenance=prov, validate=False,
    )
    return net_u, np.zeros(n0)
