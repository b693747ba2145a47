"""Import a network stored as a numpy ``.npz`` archive.

Layout (as ``../shared/nets/auto_lirpa/mnist_fc_3layer.npz``):

``W0, b0, W1, b1, ..., W{H-1}, b{H-1}``
    Affine layers, ``Wk`` of shape ``(n_{k+1}, n_k)`` (out, in), ``bk`` of shape ``(n_{k+1},)``.
``acts``
    ``H`` strings: the activation after each affine layer; the last one is the output activation
    (``"linear"``/``"identity"`` for a linear output).  Any name :func:`~recurjac_scale.get_activation` accepts.
``alphas`` (optional)
    ``H`` numbers: the slope of each ``leaky_relu`` layer (ignored for other activations; default 0.01).
``mean``, ``std`` (optional)
    Input normalisation ``(x - mean) / std`` (scalar, per channel or per coordinate), folded into the first layer
    in float64.  ``mean = 0, std = 1`` is a no-op and is dropped.
``input_shape`` (optional)
    Shape of one input (e.g. ``[1, 28, 28]``); ``layout`` (optional string, ``"CHW"``/``"HWC"``/``"flat"``).
``domain`` (optional)
    The input domain box in raw units: ``[lo, hi]`` (scalars) or an array of shape ``(2, n_0)``.
``n_layers``, ``input_dim`` (optional)
    Checked against the weights when present.

The archive is read with ``allow_pickle=False``: object arrays are refused.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ...activations import ACTIVATIONS, get_activation
from ...errors import ModelFormatError
from ..model import Network
from . import register_importer
from ._common import as_float_array, build_network, provenance, reading

__all__ = ["import_npz"]

_KNOWN = {"acts", "alphas", "mean", "std", "input_shape", "layout", "domain", "n_layers", "input_dim"}


@register_importer("npz", suffixes=(".npz",))
def import_npz(path: Path) -> Network:
    """Read a ``.npz`` network (layout in the module docstring).

    Parameters
    ----------
    path : Path

    Returns
    -------
    Network

    Raises
    ------
    ModelFormatError
        Missing ``W``/``b``/``acts`` keys, gaps in the layer numbering, unknown keys, wrong lengths, object arrays.
    ShapeMismatchError, NonFiniteError, UnsupportedActivationError
        Shapes that do not chain, NaN/inf weights, unknown or refused activations (prefixed with the file name).
    """
    with reading(path, "a numpy .npz network"):
        # Open the file here: np.load(path) leaks its handle when the archive is corrupt.
        with open(path, "rb") as fh, np.load(fh, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
        return _build(data, path)


def _build(data: dict, path: Path) -> Network:
    layer_keys = [k for k in data if re.fullmatch(r"[Wb]\d+", k)]
    unknown = sorted(set(data) - set(layer_keys) - _KNOWN)
    if unknown:
        raise ModelFormatError(f"unknown keys {unknown}; expected W0, b0, W1, b1, ... and {sorted(_KNOWN)}")
    n = len([k for k in layer_keys if k.startswith("W")])
    if n == 0:
        raise ModelFormatError("no weight arrays W0, W1, ... found")
    missing = [f"{c}{k}" for k in range(n) for c in "Wb" if f"{c}{k}" not in data]
    extra = sorted(k for k in layer_keys if int(k[1:]) >= n)
    if missing or extra:
        raise ModelFormatError(f"layer keys must be W0..W{n - 1} and b0..b{n - 1}; missing {missing}, extra {extra}")
    weights = [as_float_array(data[f"W{k}"], f"W{k}") for k in range(n)]
    biases = [as_float_array(data[f"b{k}"], f"b{k}") for k in range(n)]
    if "acts" not in data:
        raise ModelFormatError("missing key 'acts' (the activation name after each layer, e.g. relu, relu, linear)")
    acts = np.atleast_1d(data["acts"])
    if acts.dtype.kind not in "US":
        raise ModelFormatError(f"'acts' must hold strings, got dtype {acts.dtype}")
    acts = [a.decode() if isinstance(a, bytes) else str(a) for a in acts.tolist()]
    if len(acts) != n:
        raise ModelFormatError(f"'acts' has {len(acts)} entries but there are {n} layers (one activation per layer)")
    alphas = None
    if "alphas" in data:
        alphas = np.atleast_1d(as_float_array(data["alphas"], "alphas")).astype(np.float64)
        if alphas.shape != (n,):
            raise ModelFormatError(f"'alphas' has shape {alphas.shape}; need ({n},), one slope per layer")
    layer_acts = []
    for k, name in enumerate(acts):
        if ACTIVATIONS.resolve(name) == "leaky_relu":
            alpha = 0.01 if alphas is None else float(alphas[k])
            layer_acts.append(get_activation("leaky_relu", alpha=alpha))
        else:
            layer_acts.append(get_activation(name))
    for k in ("n_layers", "input_dim"):
        if k in data:
            v = np.asarray(data[k])
            expect = n if k == "n_layers" else int(weights[0].shape[-1])
            if v.size != 1 or int(v.ravel()[0]) != expect:
                raise ModelFormatError(f"'{k}' = {v.tolist()} disagrees with the weights ({expect})")
    input_shape = None
    if "input_shape" in data:
        input_shape = tuple(int(s) for s in np.atleast_1d(data["input_shape"]).tolist())
    layout = str(data["layout"]) if "layout" in data else ("CHW" if input_shape and len(input_shape) == 3 else "flat")
    domain = None
    if "domain" in data:
        d = as_float_array(data["domain"], "domain").astype(np.float64)
        if d.ndim == 0 or d.shape[0] != 2:
            raise ModelFormatError(f"'domain' has shape {d.shape}; need (2,) [lo, hi] or (2, n_0)")
        domain = (d[0], d[1])
    norm = None
    if "mean" in data or "std" in data:
        mean = as_float_array(data.get("mean", np.zeros(1)), "mean")
        std = as_float_array(data.get("std", np.ones(1)), "std")
        norm = (mean, std)
    return build_network(
        weights,
        biases,
        layer_acts,
        input_shape=input_shape,
        layout=layout,
        domain=domain,
        normalization=norm,
        provenance=provenance(path, "npz", __name__),
    )
