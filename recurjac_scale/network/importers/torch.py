"""Import a PyTorch MLP: a state dict file plus a layer description, or an ``nn.Sequential`` object.

Files are read with ``torch.load(path, map_location="cpu", weights_only=True)``: only tensors and plain
containers are unpickled, never arbitrary Python objects.  A file holding a whole pickled module (``torch.save(
model)``) is therefore refused, with a message asking for ``torch.save(model.state_dict(), path)``.

State dict
    The affine layers are the keys ``<prefix>.weight`` (2-D, (out, in)) with an optional ``<prefix>.bias``, in the
    order of the state dict (``fc1``, ``fc2``, ... or ``0``, ``2``, ... for an ``nn.Sequential``).  A checkpoint
    dict holding the state dict under ``state_dict``, ``model_state_dict``, ``model``, ``net`` or ``network`` is
    accepted too.  Any other tensor (batch-norm statistics, convolution kernels) is an error.

``layers=`` (needed for a state dict: activations are not stored in it)
    Either the full sequence, e.g. ``["linear", "relu", "linear", "relu", "linear"]`` (one ``"linear"`` per affine
    layer, activations between them, optionally one after the last), or the compact form with one activation per
    affine layer, e.g. ``"relu,relu,linear"`` (``"linear"`` = no activation).  A string is split on commas.
    Activation names are those of :func:`~recurjac_scale.get_activation`, with parameters as ``"leaky_relu:0.1"``
    (slope), ``"elu:0.5"`` or ``"hard_sigmoid:0.2:0.5"``.

``nn.Sequential`` (:func:`from_torch_module`)
    ``Linear``, ``ReLU``, ``LeakyReLU``, ``Sigmoid``, ``Tanh``, ``ELU``, ``Softplus`` (``beta = 1`` only),
    ``Hardsigmoid`` (``clip(x/6 + 1/2, 0, 1)``), ``Identity``, ``Flatten``, ``Dropout`` (identity at inference),
    nested ``Sequential``.  Note that torch's ``Softplus`` returns ``x`` above its ``threshold`` (20) where the
    imported network computes ``log(1 + e^x)`` exactly (a difference below 2e-9).
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

from ...activations import ACTIVATIONS, Activation, get_activation
from ...errors import ModelFormatError, UnsupportedActivationError, require
from ..model import Network
from . import register_importer
from ._common import build_network, package_version, provenance, push_activation, reading

__all__ = ["import_torch", "from_torch_module", "parse_layers"]

_CHECKPOINT_KEYS = ("state_dict", "model_state_dict", "model", "net", "network", "module")
_LINEAR_TOKENS = {"linear", "fc", "dense", "affine"}
_NOOP_TOKENS = {"flatten", "dropout"}


@register_importer("torch", suffixes=(".pt", ".pth"))
def import_torch(
    path: Path, *, layers: str | Sequence[str] | None = None, input_shape: Sequence[int] | None = None
) -> Network:
    """Read a PyTorch state dict file (see the module docstring).

    Parameters
    ----------
    path : Path
        A ``torch.save`` file holding a state dict (or a checkpoint dict with one).
    layers : str or sequence of str
        The layer description (required).
    input_shape : tuple of int, optional
        Shape of one input, e.g. ``(1, 28, 28)``; flat ``(n_0,)`` by default (the state dict does not say).

    Returns
    -------
    Network

    Raises
    ------
    ModelFormatError
        Not a state dict (e.g. a pickled module), unsupported tensors, a layer description that does not match.
    MissingDependencyError
        torch is not installed (extra ``torch``).
    """
    torch = require("torch", "torch")
    with reading(path, "a PyTorch file"):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # e.g. torch's notice on TorchScript archives
                obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001
            if "TorchScript" in str(exc):
                raise ModelFormatError(
                    "a TorchScript archive is not supported; save the state dict with "
                    "torch.save(model.state_dict(), path) and import it with a layer description (layers=...)"
                ) from None
            if type(exc).__name__ == "UnpicklingError" or "weights_only" in str(exc):
                raise ModelFormatError(
                    "the file holds pickled Python objects (e.g. a whole nn.Module), which are not loaded for "
                    "safety (torch.load(weights_only=True)); save the state dict instead with "
                    "torch.save(model.state_dict(), path) and import it with a layer description (layers=...)"
                ) from None
            raise
        state = _find_state_dict(obj, torch)
        if layers is None:
            raise ModelFormatError(
                "a state dict does not store activations: give the layer description, e.g. "
                "layers='relu,relu,linear' (activation after each Linear) or --layers on the command line"
            )
        pairs = _linear_pairs(state)
        weights = [_numpy(w, torch) for w, _ in pairs]
        biases = [np.zeros(w.shape[0], dtype=w.dtype) if b is None else _numpy(b, torch) for w, (_, b) in
                  zip(weights, pairs)]
        acts = parse_layers(layers, len(pairs))
        return build_network(
            weights,
            biases,
            acts,
            input_shape=input_shape,
            layout="CHW",
            provenance=provenance(path, "torch", __name__, layers=[a.to_spec() for a in acts]),
        )


def _numpy(t, torch) -> np.ndarray:
    """A tensor as a numpy array: float32/float64 kept, other dtypes (float16, bfloat16, integers) to float64."""
    t = t.detach().cpu()
    if t.dtype not in (torch.float32, torch.float64):
        if t.is_complex():
            raise ModelFormatError(f"complex tensor of dtype {t.dtype} is not supported")
        t = t.to(torch.float64)
    return t.numpy().copy()


def _find_state_dict(obj, torch) -> dict:
    def is_sd(d):
        return isinstance(d, dict) and d and all(isinstance(v, torch.Tensor) for v in d.values())

    if is_sd(obj):
        return obj
    if isinstance(obj, dict):
        for key in _CHECKPOINT_KEYS:
            if is_sd(obj.get(key)):
                return obj[key]
        nested = [k for k, v in obj.items() if is_sd(v)]
        if len(nested) == 1:
            return obj[nested[0]]
        raise ModelFormatError(
            f"no state dict found: top-level keys {sorted(map(str, obj))[:10]} (expected parameter tensors, or a "
            f"state dict under one of {list(_CHECKPOINT_KEYS)})"
        )
    raise ModelFormatError(f"the file holds a {type(obj).__name__}, not a state dict (a dict of tensors)")


def _linear_pairs(state: dict) -> list:
    """``[(weight, bias or None), ...]`` in state-dict order; refuses tensors that are not Linear parameters."""
    pairs, used = [], set()
    for key, val in state.items():
        if not key.endswith(".weight") and key != "weight":
            continue
        prefix = key[: -len("weight")]
        if val.ndim != 2:
            raise ModelFormatError(
                f"tensor {key!r} of shape {tuple(val.shape)} is not a Linear weight (2-D); only Linear layers "
                "and element-wise activations are supported"
            )
        bias = state.get(prefix + "bias")
        if bias is not None and tuple(bias.shape) != (val.shape[0],):
            raise ModelFormatError(f"bias {prefix + 'bias'!r} of shape {tuple(bias.shape)} does not match weight "
                                   f"{key!r} of shape {tuple(val.shape)}")
        pairs.append((val, bias))
        used.update({key, prefix + "bias"})
    other = [k for k in state if k not in used]
    if other:
        raise ModelFormatError(f"unsupported tensors {other[:5]}: only Linear weights and biases are supported")
    if not pairs:
        raise ModelFormatError("the state dict holds no Linear weights ('<name>.weight', 2-D)")
    return pairs


def _token_activation(token: str) -> Activation:
    name, *params = [p.strip() for p in token.split(":")]
    try:
        vals = [float(p) for p in params]
    except ValueError:
        raise ModelFormatError(f"bad activation parameter in layer description entry {token!r}") from None
    if not vals:
        return get_activation(name)
    if ACTIVATIONS.resolve(name) == "hard_sigmoid" and len(vals) == 2:
        return get_activation(name, alpha=vals[0], beta=vals[1])
    if len(vals) == 1:
        return get_activation(name, alpha=vals[0])
    raise ModelFormatError(f"layer description entry {token!r} has too many parameters")


def parse_layers(layers: str | Sequence[str], n_linear: int) -> list[Activation]:
    """The activation after each of ``n_linear`` affine layers, from a layer description.

    Parameters
    ----------
    layers : str or sequence of str
        Full form (``"linear,relu,linear"``) or compact form (one activation per affine layer, ``"relu,linear"``);
        see the module docstring.
    n_linear : int
        Number of affine layers in the state dict.

    Returns
    -------
    list of Activation, length ``n_linear`` (the last is the output activation).
    """
    tokens = [t.strip() for t in layers.split(",")] if isinstance(layers, str) else [str(t).strip() for t in layers]
    tokens = [t for t in tokens if t and t.lower() not in _NOOP_TOKENS]
    if not tokens:
        raise ModelFormatError("the layer description is empty")
    n_lin_tokens = sum(t.lower() in _LINEAR_TOKENS for t in tokens)
    if n_lin_tokens == n_linear and tokens[0].lower() in _LINEAR_TOKENS:
        acts: list[Activation] = []
        pending: Activation | None = None
        for t in tokens[1:] + ["linear"]:
            if t.lower() in _LINEAR_TOKENS:
                acts.append(pending if pending is not None else get_activation("identity"))
                pending = None
            elif pending is not None:
                raise ModelFormatError(
                    f"layer description {tokens}: two activations in a row ({pending}, {t}); a state dict has one "
                    "activation per Linear"
                )
            else:
                pending = _token_activation(t)
        # One entry per "linear" after the first plus the sentinel: n_linear entries; an activation after the
        # last Linear was closed by the sentinel as the output activation.
        return acts
    if len(tokens) == n_linear:
        return [_token_activation(t) for t in tokens]
    raise ModelFormatError(
        f"the layer description {tokens} does not match the {n_linear} Linear layers of the state dict: give "
        f"{n_linear} activations (one after each Linear, 'linear' for none) or a full list with {n_linear} "
        "'linear' entries"
    )


# -- nn.Module objects -------------------------------------------------------------------------------------------


def _module_activation(m, nn) -> Activation | None | str:
    """The activation of a torch module, ``"linear"`` for nn.Linear, ``None`` for a no-op module."""
    if isinstance(m, nn.Linear):
        return "linear"
    if isinstance(m, (nn.Identity, nn.Flatten, nn.Dropout)):
        return None
    if isinstance(m, nn.ReLU):
        return get_activation("relu")
    if isinstance(m, nn.LeakyReLU):
        return get_activation("leaky_relu", alpha=float(m.negative_slope))
    if isinstance(m, nn.Sigmoid):
        return get_activation("sigmoid")
    if isinstance(m, nn.Tanh):
        return get_activation("tanh")
    if isinstance(m, nn.ELU):
        return get_activation("elu", alpha=float(m.alpha))
    if isinstance(m, nn.Softplus):
        if float(m.beta) != 1.0:
            raise UnsupportedActivationError(f"Softplus with beta={m.beta} is not supported (only beta=1)")
        return get_activation("softplus")
    if isinstance(m, nn.Hardsigmoid):
        return get_activation("hard_sigmoid", alpha=1.0 / 6.0, beta=0.5)
    name = type(m).__name__
    if name.lower() in ("gelu", "silu", "mish", "hardswish"):
        if name.lower() == "hardswish":
            raise UnsupportedActivationError(
                "Hardswish is not supported: its derivative is negative on (-3, -1.5), which breaks Assumption 2 "
                "of Zhang et al. 2019 (0 <= sigma' <= C)"
            )
        return get_activation(name.lower())  # raises, citing Assumption 2
    raise ModelFormatError(
        f"unsupported module {name}; supported: Linear, ReLU, LeakyReLU, Sigmoid, Tanh, ELU, Softplus, "
        "Hardsigmoid, Identity, Flatten, Dropout, nested Sequential (for a custom nn.Module, save its state_dict "
        "and import it with layers=...)"
    )


def _flatten_modules(module, nn, path=""):
    if isinstance(module, nn.Sequential):
        # Not named_children(): it skips a module instance that appears twice (nn.Sequential(act, ..., act)).
        for name, child in zip(module._modules.keys(), module):
            yield from _flatten_modules(child, nn, f"{path}{name}.")
    else:
        yield path.rstrip(".") or type(module).__name__, module


def from_torch_module(module, *, input_shape: Sequence[int] | None = None) -> Network:
    """Import an ``nn.Sequential`` (or a single ``nn.Linear``) object.

    Parameters
    ----------
    module : torch.nn.Module
        ``nn.Sequential`` of the modules listed in the module docstring (nesting allowed).
    input_shape : tuple of int, optional
        Shape of one input; flat ``(n_0,)`` by default.

    Returns
    -------
    Network
        Weights in the module's float dtype.  Provenance ``source`` is the class name and ``sha256`` is the
        digest of the parameters' bytes (there is no file).

    Raises
    ------
    ModelFormatError
        An unsupported module (named with its position), two activations in a row, no Linear layer.
    UnsupportedActivationError
        GELU/SiLU/Mish (derivative can be negative: Assumption 2 of Zhang et al. 2019).
    """
    torch = require("torch", "torch")
    nn = torch.nn
    label = f"<{type(module).__name__} object>"
    with reading(label, "a torch module"):
        weights, biases, acts = [], [], []
        pending_act: Activation | None = None
        for pos, (name, m) in enumerate(_flatten_modules(module, nn)):
            try:
                kind = _module_activation(m, nn)
            except ModelFormatError as exc:
                raise ModelFormatError(f"module {name!r} (position {pos}): {exc}") from None
            except UnsupportedActivationError as exc:
                raise UnsupportedActivationError(f"module {name!r} (position {pos}): {exc}") from None
            if kind is None:
                continue
            if kind == "linear":
                if weights:
                    acts.append(pending_act if pending_act is not None else get_activation("identity"))
                pending_act = None
                w = _numpy(m.weight, torch)
                b = _numpy(m.bias, torch) if m.bias is not None else np.zeros(w.shape[0], dtype=w.dtype)
                weights.append(w)
                biases.append(b)
            else:
                pending_act = push_activation(
                    weights, biases, acts, pending_act, kind,
                    f"module {name!r} (position {pos}): an activation before the first Linear is not supported",
                )
        if not weights:
            raise ModelFormatError("the module holds no Linear layer")
        acts.append(pending_act if pending_act is not None else get_activation("identity"))
        h = hashlib.sha256()
        for w, b in zip(weights, biases):
            h.update(np.ascontiguousarray(w).tobytes())
            h.update(np.ascontiguousarray(b).tobytes())
        prov = {
            "source": label,
            "sha256": h.hexdigest(),
            "sha256_of": "parameters (weight then bias of each layer, C order)",
            "format": "torch-module",
        }
        prov["importer"] = f"{__name__} {package_version()}"
        return build_network(weights, biases, acts, input_shape=input_shape, layout="CHW", provenance=prov)
