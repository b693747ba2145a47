"""Import a network in the NNet text format (the ACAS Xu networks of Julian et al.; ``sisl/NNet``).

Format (comma-separated values, trailing commas allowed)::

    // any number of comment lines starting with //
    H, n_in, n_out, max_width,          (H = number of affine layers)
    n_0, n_1, ..., n_H,                 (layer sizes; n_0 = n_in, n_H = n_out)
    0,                                  (the unused "symmetric" flag)
    min_1, ..., min_{n_in},             (input minimums, raw units)
    max_1, ..., max_{n_in},             (input maximums, raw units)
    mean_1, ..., mean_{n_in}, mean_out, (input means, then the output mean)
    range_1, ..., range_{n_in}, range_out,
    then for each layer k: n_{k+1} lines of n_k weights (one row of W[k] per line), then n_{k+1} lines with one
    bias each.

Semantics (the reference evaluator ``nnet.evaluate_network``): an input is first clipped to ``[min, max]``,
normalised as ``(x - mean_i) / range_i``, passed through ReLU hidden layers and a linear output layer, and the
output is de-normalised as ``y * range_out + mean_out``.

Here:

* ``[min, max]`` becomes the input domain box ``D`` (raw units).  The clipping is therefore not part of the
  network: inside ``D`` the imported network equals the NNet evaluator; outside ``D`` the evaluator is constant
  along clipped coordinates while the imported network extrapolates.  Inputs are checked against ``D``.
* ``(mean_i, range_i)`` becomes the input normalisation ``(mean, std)``, folded into the first layer in float64
  (:meth:`Network.with_normalization`; kept in ``input_spec.mean/std``).
* The output de-normalisation is folded into the last layer: ``W <- range_out W``, ``b <- range_out b + mean_out``.
  Pass ``denormalize_output=False`` to keep the network's normalised outputs (as the ERAN ONNX exports do).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ...errors import ModelFormatError
from ..model import Network
from . import register_importer
from ._common import build_network, provenance, reading

__all__ = ["import_nnet"]


@register_importer("nnet", suffixes=(".nnet",))
def import_nnet(path: Path, *, denormalize_output: bool = True) -> Network:
    """Read an ACAS Xu ``.nnet`` file (format and semantics in the module docstring).

    Parameters
    ----------
    path : Path
    denormalize_output : bool
        Fold ``y * range_out + mean_out`` into the last layer (default), as the NNet evaluator does.

    Returns
    -------
    Network
        ReLU hidden layers, linear output; input domain ``[min, max]`` in raw units; normalisation folded.

    Raises
    ------
    ModelFormatError
        Truncated file, wrong number of values on a line, sizes that disagree, unparsable numbers (the message
        names the line).
    NonFiniteError
        NaN or infinite weights.
    """
    with reading(path, "an NNet text file"):
        text = Path(path).read_text(encoding="utf-8", errors="strict")
        return _parse(text, path, denormalize_output=bool(denormalize_output))


class _Lines:
    """Iterator over the numeric lines of an NNet file, with line numbers for error messages."""

    def __init__(self, text: str):
        self._lines = [
            (i + 1, line) for i, line in enumerate(text.splitlines()) if line.strip() and not line.lstrip().startswith("//")
        ]
        self._pos = 0

    def next(self, what: str, count: int | None = None, *, integer: bool = False) -> tuple[list, int]:
        if self._pos >= len(self._lines):
            raise ModelFormatError(f"file ends early: expected {what}")
        lineno, line = self._lines[self._pos]
        self._pos += 1
        tokens = [t.strip() for t in line.split(",")]
        tokens = [t for t in tokens if t]
        try:
            vals = [int(t) for t in tokens] if integer else [float(t) for t in tokens]
        except ValueError:
            raise ModelFormatError(f"line {lineno}: cannot parse {what} from {line.strip()[:60]!r}") from None
        if count is not None and len(vals) < count:
            raise ModelFormatError(f"line {lineno}: expected {count} values for {what}, found {len(vals)}")
        if count is not None and len(vals) > count:
            raise ModelFormatError(f"line {lineno}: expected {count} values for {what}, found {len(vals)}")
        return vals, lineno

    def rest(self) -> list[int]:
        return [ln for ln, _ in self._lines[self._pos :]]


def _parse(text: str, path: Path, *, denormalize_output: bool) -> Network:
    lines = _Lines(text)
    head, ln = lines.next("the sizes line (layers, inputs, outputs, max width)", integer=True)
    if len(head) < 3:
        raise ModelFormatError(f"line {ln}: the sizes line needs at least 3 integers (layers, inputs, outputs)")
    n_layers, n_in, n_out = head[:3]
    if n_layers < 1 or n_in < 1 or n_out < 1:
        raise ModelFormatError(f"line {ln}: layers, inputs and outputs must be positive, got {head[:3]}")
    sizes, ln = lines.next("the layer sizes", n_layers + 1, integer=True)
    if sizes[0] != n_in or sizes[-1] != n_out or min(sizes) < 1:
        raise ModelFormatError(
            f"line {ln}: layer sizes {sizes} disagree with {n_in} inputs and {n_out} outputs (or are not positive)"
        )
    lines.next("the symmetric flag")
    mins, _ = lines.next("the input minimums", n_in)
    maxs, ln_max = lines.next("the input maximums", n_in)
    means, _ = lines.next("the means (inputs, then output)", n_in + 1)
    ranges, ln_r = lines.next("the ranges (inputs, then output)", n_in + 1)
    mins, maxs = np.array(mins), np.array(maxs)
    if not (np.isfinite(mins).all() and np.isfinite(maxs).all()) or (mins > maxs).any():
        raise ModelFormatError(f"line {ln_max}: input minimums {mins.tolist()} and maximums {maxs.tolist()} "
                               "must be finite with min <= max")
    means, ranges = np.array(means), np.array(ranges)
    if not (np.isfinite(means).all() and np.isfinite(ranges).all()) or (ranges == 0).any():
        raise ModelFormatError(f"line {ln_r}: means and ranges must be finite and ranges non-zero")
    weights, biases = [], []
    for k in range(n_layers):
        n_i, n_o = sizes[k], sizes[k + 1]
        w = np.empty((n_o, n_i))
        for r in range(n_o):
            w[r], _ = lines.next(f"row {r} of the weights of layer {k} ({n_i} values)", n_i)
        b = np.empty(n_o)
        for r in range(n_o):
            b[r] = lines.next(f"bias {r} of layer {k}", 1)[0][0]
        weights.append(w)
        biases.append(b)
    rest = lines.rest()
    if rest:
        raise ModelFormatError(f"line {rest[0]}: unexpected data after the last layer ({len(rest)} extra lines)")
    if denormalize_output:
        r_out, m_out = ranges[-1], means[-1]
        weights[-1] = weights[-1] * r_out
        biases[-1] = biases[-1] * r_out + m_out
    acts = ["relu"] * (n_layers - 1) + ["identity"]
    return build_network(
        weights,
        biases,
        acts,
        domain=(mins, maxs),
        normalization=(means[:n_in], ranges[:n_in]),
        provenance=provenance(path, "nnet", __name__, denormalized_output=denormalize_output),
    )
