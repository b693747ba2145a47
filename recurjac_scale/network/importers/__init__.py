"""Model importers: ONNX, PyTorch, Keras HDF5, NNet and ``.npz`` files to a :class:`~recurjac_scale.Network`.

One registry, :data:`IMPORTERS` (format name -> function ``f(path, **options) -> Network``); a new format is added
with :func:`register_importer`.  :func:`import_network` picks the importer from ``format`` or from the file's
suffix.  Each importer imports its optional dependency lazily (:func:`recurjac_scale.errors.require`), so this
package imports without onnx, torch or h5py installed.

Every importer returns a validated network (finite weights, shapes that chain) whose input metadata comes from
the file when the file states it (input shape, domain, normalisation), with provenance
``{"source", "sha256", "format", "importer"}``.  A malformed or unsupported file raises a
:class:`~recurjac_scale.errors.RecurJacError` subclass (mostly :class:`~recurjac_scale.errors.ModelFormatError`)
with a one-line message that names the file and the problem.

=========  ====================  ==========================================================
format     suffixes              reads
=========  ====================  ==========================================================
onnx       .onnx                 a chain of Gemm/MatMul/Add/... nodes (:mod:`.onnx`)
torch      .pt, .pth             a state dict plus ``layers=`` (:mod:`.torch`)
keras      .h5, .hdf5            a Keras 2 Sequential model saved by ``model.save`` (:mod:`.keras_h5`)
nnet       .nnet                 the ACAS Xu text format (:mod:`.nnet`)
npz        .npz                  ``W0, b0, W1, b1, ...`` plus ``acts`` (:mod:`.npz`)
=========  ====================  ==========================================================
"""

from __future__ import annotations

import inspect
import os
import sys
from pathlib import Path
from typing import Any, Callable

from ..._registry import Registry
from ...errors import InputError, ModelFormatError
from ..model import Network

__all__ = [
    "IMPORTERS",
    "IMPORTER_SUFFIXES",
    "register_importer",
    "import_network",
    "guess_format",
    "from_torch_module",
]

IMPORTERS: Registry = Registry("model format", sep="_", error=ModelFormatError)
"""Registry: format name -> importer ``f(path, **options) -> Network`` (aliases ``pytorch``, ``h5``, ...)."""
IMPORTERS.add_aliases({"pytorch": "torch", "h5": "keras", "hdf5": "keras", "keras_h5": "keras"})

IMPORTER_SUFFIXES: dict[str, str] = {}
"""File suffix (lower case, with the dot) -> format name."""


def register_importer(name: str, suffixes: tuple[str, ...] | list[str] = ()):
    """Decorator registering ``f(path, **options) -> Network`` as the importer of format ``name``.

    Parameters
    ----------
    name : str
        Format name, e.g. ``"onnx"`` (what ``import_network(..., format=name)`` and ``--format`` accept).
    suffixes : sequence of str
        File suffixes (``".onnx"``) from which the format is guessed.
    """

    def deco(fn: Callable[..., Network]) -> Callable[..., Network]:
        key = IMPORTERS.key(name)
        IMPORTERS.register(key, fn)
        for s in suffixes:
            s = s.lower()
            IMPORTER_SUFFIXES[s if s.startswith(".") else "." + s] = key
        return fn

    return deco


def _accepted() -> str:
    parts = []
    for name in sorted(IMPORTERS):
        sfx = sorted(s for s, n in IMPORTER_SUFFIXES.items() if n == name)
        parts.append(f"{name} ({', '.join(sfx)})" if sfx else name)
    return ", ".join(parts)


def guess_format(path: str | os.PathLike) -> str:
    """The format name for a file, from its suffix.

    Raises
    ------
    ModelFormatError
        When the suffix is not one of :data:`IMPORTER_SUFFIXES`.
    """
    suffix = Path(path).suffix.lower()
    if suffix not in IMPORTER_SUFFIXES:
        raise ModelFormatError(
            f"{Path(path).name}: cannot tell the model format from the suffix {suffix or '(none)'!r}; "
            f"give a format, one of: {_accepted()}"
        )
    return IMPORTER_SUFFIXES[suffix]


def _resolve_format(fmt: str) -> str:
    key = IMPORTERS.resolve(fmt)
    if key in IMPORTERS:
        return key
    raw = str(fmt).strip().lower()
    alias = IMPORTER_SUFFIXES.get(raw if raw.startswith(".") else "." + raw)
    if alias is None:
        raise ModelFormatError(f"unknown model format {fmt!r}; accepted formats: {_accepted()}")
    return alias


def _is_torch_module(obj: Any) -> bool:
    torch = sys.modules.get("torch")  # a module object exists only if torch was imported
    return torch is not None and isinstance(obj, torch.nn.Module)


def import_network(path: str | os.PathLike | Any, format: str | None = None, **options) -> Network:
    """Read a model file into a :class:`~recurjac_scale.Network`.

    Parameters
    ----------
    path : str or PathLike, or a ``torch.nn.Sequential``
        The model file.  A PyTorch module object is imported directly (:func:`from_torch_module`).
    format : str, optional
        One of :data:`IMPORTERS` (``onnx``, ``torch``, ``keras``, ``nnet``, ``npz``; a suffix such as ``"h5"``
        is accepted too); guessed from the suffix when ``None``.
    **options
        Importer-specific options, e.g. ``layers=["linear", "relu", "linear"]`` for a torch state dict.  Options
        that are ``None`` are ignored, so a caller may pass the same keywords for every format.

    Returns
    -------
    Network
        With weights in float64 or the file's float dtype, input metadata from the file and provenance
        ``{"source", "sha256", "format", "importer"}``.

    Raises
    ------
    ModelFormatError
        Unknown format or suffix, unreadable or unsupported file (one line naming the file and the problem).
    InputError
        An option the importer does not take.
    MissingDependencyError
        The format's optional dependency is not installed (the message names the extra).
    RecurJacError
        Any other problem with the file's contents (non-finite weights, shapes that do not chain, ...).
    """
    options = {k: v for k, v in options.items() if v is not None}
    if _is_torch_module(path):
        from .torch import from_torch_module as _from_module

        _check_options(_from_module, options, "torch module")
        return _from_module(path, **options)
    if not isinstance(path, (str, os.PathLike)):
        raise InputError(f"expected a path to a model file or a torch.nn.Sequential, got {type(path).__name__}")
    fmt = guess_format(path) if format is None else _resolve_format(format)
    fn = IMPORTERS[fmt]
    _check_options(fn, options, fmt)
    p = Path(path)
    if not p.is_file():
        raise ModelFormatError(f"{p.name}: no such model file ({p})" if not p.exists() else f"{p}: not a file")
    return fn(p, **options)


def _check_options(fn: Callable, options: dict, fmt: str) -> None:
    params = inspect.signature(fn).parameters
    accepted = [n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise InputError(
            f"option(s) {', '.join(unknown)} not accepted by the {fmt} importer; "
            f"it accepts: {', '.join(accepted) or 'no options'}"
        )


def from_torch_module(module, **options) -> Network:
    """Import a ``torch.nn.Sequential`` object (see :func:`recurjac_scale.network.importers.torch.from_torch_module`)."""
    from .torch import from_torch_module as _from_module

    return _from_module(module, **options)


# Registering the built-in importers: these modules import their optional dependency only when called.
from . import keras_h5, nnet, npz, onnx, torch  # noqa: E402,F401
