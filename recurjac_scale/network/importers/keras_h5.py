"""Import a Keras 2 ``Sequential`` MLP saved with ``model.save(...)`` to HDF5, with h5py only (no TensorFlow).

This is the format of the RecurJac paper's training script (``huanzhang12/RecurJac-and-CROWN``,
``mnist_cifar_models.py``): ``Flatten(input_shape=(28, 28, 1))``, then per hidden layer a ``Dense`` followed by an
``Activation(name)``, a ``LeakyReLU(alpha)`` or a ``Lambda`` named ``arctan_<n>`` (the script's arctan layer, which
the original code also recognises by its name), optionally ``Dropout``, and a last ``Dense``.

Read from the file:

* the root attribute ``model_config`` (JSON): ``{"class_name": "Sequential", "config": {"layers": [...]}}``
  (Keras >= 2.2) or ``{"config": [...]}`` (Keras 2.0/2.1).  Layers: ``InputLayer``, ``Flatten``, ``Dense`` (with its
  ``activation`` and ``use_bias``), ``Activation``, ``LeakyReLU`` (``alpha``), ``Dropout`` (identity at inference),
  ``Lambda`` named ``arctan*``.  The input shape comes from ``batch_input_shape`` of the first layer.
* the weights of layer ``L`` from the group ``model_weights/L``, whose attribute ``weight_names`` lists the
  datasets (``L/kernel:0``, ``L/bias:0``).  The kernel is ``(in, out)`` and is transposed to ``(out, in)``.

Keras activation names map to the package's (``linear`` -> identity, ``hard_sigmoid`` -> ``0.2 x + 0.5``
clipped, ...); ``softmax`` (not element-wise), ``selu``, ``softsign`` and the like are refused.

Only the file itself is read: a weight reached through an HDF5 external link, or a dataset with external or virtual
storage (data in other files, named inside this one), raises :class:`InputError` before the other file is opened.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ...activations import Activation, get_activation
from ...errors import InputError, ModelFormatError, UnsupportedActivationError, require
from ..model import Network
from . import register_importer
from ._common import as_float_array, build_network, provenance, push_activation, reading

__all__ = ["import_keras_h5"]

_NOOP_LAYERS = {"InputLayer", "Flatten", "Dropout", "Reshape"}


@register_importer("keras", suffixes=(".h5", ".hdf5"))
def import_keras_h5(path: Path) -> Network:
    """Read a Keras 2 HDF5 model file (layout in the module docstring).

    Parameters
    ----------
    path : Path

    Returns
    -------
    Network
        Input shape from the first layer's ``batch_input_shape`` (e.g. ``(28, 28, 1)``, layout ``HWC``).

    Raises
    ------
    ModelFormatError
        Not HDF5, no ``model_config``, a functional (non-Sequential) model, an unsupported layer (named with its
        position), missing or mis-shaped weights.
    UnsupportedActivationError
        Activations outside Assumption 2 or not element-wise.
    MissingDependencyError
        h5py is not installed (extra ``keras``).
    """
    h5py = require("h5py", "keras")
    with reading(path, "a Keras HDF5 file"):
        with h5py.File(path, "r") as f:
            cfg = _model_config(f)
            layers = _layer_list(cfg)
            _check_local(f, "model_weights")
            if "model_weights" not in f:
                raise ModelFormatError("no 'model_weights' group (is it a model.save file?)")
            weights, biases, acts, input_shape = _walk(layers, f["model_weights"])
            version = _attr_str(f.attrs.get("keras_version"))
        layout = "HWC" if input_shape is not None and len(input_shape) == 3 else "flat"
        return build_network(
            weights,
            biases,
            acts,
            input_shape=input_shape,
            layout=layout,
            provenance=provenance(path, "keras", __name__, keras_version=version),
        )


def _attr_str(v) -> str | None:
    if v is None:
        return None
    if isinstance(v, bytes):
        return v.decode("utf-8")
    if isinstance(v, np.ndarray) and v.shape == ():
        return _attr_str(v.item())
    return str(v)


def _model_config(f) -> dict:
    raw = f.attrs.get("model_config")
    if raw is None:
        raise ModelFormatError(
            "no 'model_config' attribute: a weights-only file (save_weights) does not describe the layers; save the "
            "whole model with model.save(...)"
        )
    try:
        cfg = json.loads(_attr_str(raw))
    except json.JSONDecodeError as exc:
        raise ModelFormatError(f"'model_config' is not valid JSON ({exc})") from None
    if not isinstance(cfg, dict):
        raise ModelFormatError("'model_config' is not a JSON object")
    return cfg


def _layer_list(cfg: dict) -> list:
    cls = cfg.get("class_name")
    if cls != "Sequential":
        raise ModelFormatError(f"model class {cls!r} is not supported: only a Keras Sequential model is")
    inner = cfg.get("config")
    layers = inner.get("layers") if isinstance(inner, dict) else inner
    if not isinstance(layers, list) or not layers:
        raise ModelFormatError("'model_config' lists no layers")
    return layers


def _keras_activation(name: str, where: str) -> Activation:
    key = str(name).lower()
    if key == "softmax":
        raise UnsupportedActivationError(f"{where}: softmax is not an element-wise activation; import the logits "
                                         "(remove the softmax layer)")
    if key == "hard_sigmoid":
        return get_activation("hard_sigmoid", alpha=0.2, beta=0.5)
    try:
        return get_activation(key)
    except UnsupportedActivationError as exc:
        raise UnsupportedActivationError(f"{where}: {exc}") from None


def _layer_weights(group, lname: str, where: str) -> dict:
    _check_local(group, lname)
    if lname not in group:
        raise ModelFormatError(f"{where}: no weights group 'model_weights/{lname}'")
    g = group[lname]
    names = g.attrs.get("weight_names")
    if names is None:
        raise ModelFormatError(f"{where}: group 'model_weights/{lname}' has no 'weight_names' attribute")
    out = {}
    for n in np.atleast_1d(names).tolist():
        n = n.decode("utf-8") if isinstance(n, bytes) else str(n)
        _check_local(g, n)
        if n not in g:
            raise ModelFormatError(f"{where}: weight dataset {n!r} listed in weight_names is missing")
        short = n.rsplit("/", 1)[-1].split(":")[0]
        ds = g[n]
        if getattr(ds, "is_virtual", False) or getattr(ds, "external", None):
            raise InputError(
                f"{where}: weight dataset {n!r} keeps its data in other files (external or virtual storage); "
                f"accepted: data inside {Path(g.file.filename).name!r}"
            )
        out[short] = as_float_array(ds[()], f"{where} {n}")
    return out


def _check_local(group, name: str) -> None:
    """Refuse an HDF5 external link on the way from ``group`` to ``name`` (checked before it is followed)."""
    import h5py

    node = group
    for part in [q for q in name.split("/") if q]:
        link = node.get(part, getlink=True)  # the link itself: nothing is followed
        if link is None:
            return
        if isinstance(link, h5py.ExternalLink):
            raise InputError(
                f"{node.name}/{part} is an external link to {link.filename!r}; accepted: data inside "
                f"{Path(group.file.filename).name!r}"
            )
        node = node[part]


def _walk(layers: list, wgroup) -> tuple[list, list, list, tuple | None]:
    weights, biases, acts = [], [], []
    pending: Activation | None = None
    input_shape = None
    for pos, layer in enumerate(layers):
        if not isinstance(layer, dict):
            raise ModelFormatError(f"layer {pos} of model_config is not an object")
        cls = layer.get("class_name")
        conf = layer.get("config") or {}
        lname = conf.get("name") or layer.get("name") or f"layer_{pos}"
        where = f"layer {pos} ({lname!r}, {cls})"
        if pos == 0 and conf.get("batch_input_shape"):
            shp = conf["batch_input_shape"]
            if isinstance(shp, dict):  # newer Keras serialises TensorShape as {"items": [...]}
                shp = shp.get("items")
            if isinstance(shp, list) and len(shp) >= 2 and all(isinstance(s, int) for s in shp[1:]):
                input_shape = tuple(shp[1:])
        if cls in _NOOP_LAYERS:
            continue
        if cls == "Dense":
            if weights:
                acts.append(pending if pending is not None else get_activation("identity"))
            pending = None
            ws = _layer_weights(wgroup, lname, where)
            if "kernel" not in ws:
                raise ModelFormatError(f"{where}: no kernel among its weights {sorted(ws)}")
            k = ws["kernel"]
            if k.ndim != 2:
                raise ModelFormatError(f"{where}: kernel has shape {k.shape}, need (in, out)")
            if conf.get("use_bias", True):
                if "bias" not in ws:
                    raise ModelFormatError(f"{where}: use_bias is set but there is no bias dataset")
                b = ws["bias"]
            else:
                b = np.zeros(k.shape[1], dtype=k.dtype)
            units = conf.get("units")
            if units is not None and int(units) != k.shape[1]:
                raise ModelFormatError(f"{where}: kernel of shape {k.shape} does not have units={units} columns")
            if b.shape != (k.shape[1],):
                raise ModelFormatError(f"{where}: bias of shape {b.shape} does not match kernel of shape {k.shape}")
            weights.append(np.ascontiguousarray(k.T))
            biases.append(b)
            act = conf.get("activation", "linear")
            a = _keras_activation(act, where)
            if not a.is_identity:
                pending = a
            continue
        if cls == "Activation":
            a = _keras_activation(conf.get("activation", "linear"), where)
        elif cls == "LeakyReLU":
            alpha = conf.get("alpha", conf.get("negative_slope", 0.3))
            a = get_activation("leaky_relu", alpha=float(alpha))
        elif cls == "Lambda" and "arctan" in str(lname).lower():
            a = get_activation("arctan")
        else:
            raise ModelFormatError(
                f"{where}: unsupported layer; supported: Dense, Activation, LeakyReLU, Lambda named arctan*, "
                "Flatten, InputLayer, Dropout"
            )
        if a.is_identity:
            continue
        pending = push_activation(
            weights, biases, acts, pending, a, f"{where}: an activation before the first Dense layer is not supported"
        )
    if not weights:
        raise ModelFormatError("the model has no Dense layer")
    acts.append(pending if pending is not None else get_activation("identity"))
    return weights, biases, acts, input_shape
