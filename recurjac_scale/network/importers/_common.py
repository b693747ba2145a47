"""Helpers shared by the importers: error context, provenance, building the :class:`Network`.

Every importer reads its file inside :func:`reading`, which turns any exception raised by a third-party reader
(onnx, h5py, torch, numpy) into a one-line :class:`ModelFormatError` naming the file, and prefixes the file name to
the package's own errors.  The importer then calls :func:`build_network`.
"""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from ...errors import MissingDependencyError, ModelFormatError, RecurJacError
from ..model import InputSpec, Network

__all__ = ["reading", "one_line", "file_sha256", "package_version", "provenance", "build_network", "as_float_array"]


def one_line(msg: object) -> str:
    """Collapse a message to one line (third-party messages often span several)."""
    return " ".join(str(msg).split())


def _prefixed(exc: RecurJacError, name: str) -> RecurJacError:
    msg = one_line(exc)
    if not msg.startswith(f"{name}:"):
        msg = f"{name}: {msg}"
    try:
        new = type(exc)(msg)
    except Exception:  # pragma: no cover - a subclass with an unusual constructor
        new = ModelFormatError(msg)
    return new


@contextlib.contextmanager
def reading(path: Path | str, what: str) -> Iterator[None]:
    """Context in which a model file is read.

    Package errors (:class:`RecurJacError`) are re-raised with the file name in front, on one line; any other
    exception (a decoder's, a KeyError, an OSError, ...) becomes a :class:`ModelFormatError` saying that the file
    could not be read as ``what``.
    """
    name = Path(path).name if isinstance(path, (str, Path)) else str(path)
    try:
        yield
    except MissingDependencyError:
        raise
    except RecurJacError as exc:
        raise _prefixed(exc, name) from exc
    except (KeyboardInterrupt, SystemExit, MemoryError):
        raise
    except Exception as exc:  # noqa: BLE001 - the point is never to leak a raw third-party exception
        detail = one_line(exc) or type(exc).__name__
        raise ModelFormatError(f"{name}: cannot read it as {what}: {type(exc).__name__}: {detail}") from exc


def file_sha256(path: Path | str) -> str:
    """Hex sha256 of a file's bytes (read in 1 MiB blocks)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def package_version() -> str:
    """The installed package version (``recurjac_scale.__version__``)."""
    try:
        from ..._version import __version__

        return str(__version__)
    except ImportError:  # pragma: no cover - a broken install; fall back to the distribution metadata
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("recurjac-scale")
        except PackageNotFoundError:
            return "unknown"


def provenance(path: Path | str, fmt: str, module: str, *, sha256: str | None = None, **extra) -> dict:
    """The provenance record of an imported model.

    ``{"source": file name, "sha256": hex digest of the file bytes, "format": fmt,
    "importer": "<module> <package version>", **extra}``.
    """
    return {
        "source": Path(path).name,
        "sha256": sha256 if sha256 is not None else file_sha256(path),
        "format": fmt,
        "importer": f"{module} {package_version()}",
        **extra,
    }


def as_float_array(a, what: str) -> np.ndarray:
    """A numeric array as a float array: float32/float64 kept, other floats and integers to float64.

    Raises :class:`ModelFormatError` for non-numeric data (strings, objects, complex numbers).
    """
    a = np.asarray(a)
    if a.dtype in (np.float32, np.float64):
        return a
    if np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer) or a.dtype == np.bool_:
        return a.astype(np.float64)
    raise ModelFormatError(f"{what} has non-numeric dtype {a.dtype}")


def _uniform_dtype(weights: Sequence[np.ndarray], biases: Sequence[np.ndarray]):
    dtypes = {np.asarray(a).dtype for a in (*weights, *biases)}
    if len(dtypes) == 1 and next(iter(dtypes)) in (np.float32, np.float64):
        return next(iter(dtypes))
    return np.float64


def build_network(
    weights: Sequence[np.ndarray],
    biases: Sequence[np.ndarray],
    layer_activations: Sequence,
    *,
    input_shape: Sequence[int] | None = None,
    layout: str = "flat",
    domain: tuple[np.ndarray, np.ndarray] | None = None,
    normalization: tuple[np.ndarray, np.ndarray] | None = None,
    provenance: dict | None = None,
) -> Network:
    """Build a validated :class:`Network` from per-layer arrays.

    Parameters
    ----------
    weights : sequence of ndarray, each (n_{k+1}, n_k)
    biases : sequence of ndarray, each (n_{k+1},)
    layer_activations : sequence of str, Activation or None, length ``len(weights)``
        The activation after every affine layer; the last one is the output activation (``None``/identity for a
        linear output).
    input_shape : tuple of int, optional
        Shape of one input; flat ``(n_0,)`` when ``None``.
    layout : str
        Flattening order of ``input_shape`` (``"flat"``, ``"CHW"``, ``"HWC"``).
    domain : (lower, upper), optional
        Input domain box in raw units (scalars or ``(n_0,)`` arrays).
    normalization : (mean, std), optional
        Input normalisation ``(x - mean) / std`` folded into the first layer in float64
        (:meth:`Network.with_normalization`); a no-op normalisation (mean 0, std 1) is dropped.

    Returns
    -------
    Network
        Weights keep the file's dtype when every array is float32 (or every one float64) and nothing was folded;
        otherwise all are float64.
    """
    if len(layer_activations) != len(weights):
        raise ModelFormatError(f"{len(weights)} affine layers but {len(layer_activations)} activations")
    dt = _uniform_dtype(weights, biases)
    weights = [np.ascontiguousarray(w, dtype=dt) for w in weights]
    biases = [np.ascontiguousarray(b, dtype=dt) for b in biases]
    for k, (w, b) in enumerate(zip(weights, biases)):
        if w.ndim != 2:
            raise ModelFormatError(f"layer {k}: weight must be 2-D (out, in), got shape {w.shape}")
        if b.shape != (w.shape[0],):
            raise ModelFormatError(f"layer {k}: bias of shape {b.shape} does not match weight of shape {w.shape}")
    n0 = int(weights[0].shape[1])
    shape = tuple(int(s) for s in input_shape) if input_shape is not None else (n0,)
    if int(np.prod(shape)) != n0:
        raise ModelFormatError(f"input shape {shape} has {int(np.prod(shape))} values but layer 0 takes {n0} inputs")
    if len(shape) != 3 and layout in ("CHW", "HWC"):
        layout = "flat"
    spec = InputSpec(
        shape=shape,
        layout=layout,
        domain_lower=None if domain is None else domain[0],
        domain_upper=None if domain is None else domain[1],
    )
    net = Network(
        weights,
        biases,
        list(layer_activations[:-1]),
        output_activation=layer_activations[-1],
        input_spec=spec,
        provenance=provenance,
    )
    if normalization is not None:
        mean, std = (np.asarray(v, dtype=np.float64) for v in normalization)
        if not (np.all(mean == 0.0) and np.all(std == 1.0)):
            mean, std = _compress(mean), _compress(std)
            net = net.with_normalization(mean, std)
            net = net.materialize(np.float64)
    return net


def push_activation(weights: list, biases: list, acts: list, pending, act, before_first: str):
    """Record activation ``act`` after the last affine layer of a sequential model being read.

    ``pending`` is the activation already waiting after that layer (or ``None``); two activations in a row get an
    identity affine layer between them.  ``before_first`` is the error message when no affine layer came yet.
    Returns the new pending activation (``act``).
    """
    if not weights:
        raise ModelFormatError(before_first)
    if pending is not None:
        n = weights[-1].shape[0]
        acts.append(pending)
        weights.append(np.eye(n, dtype=weights[-1].dtype))
        biases.append(np.zeros(n, dtype=weights[-1].dtype))
    return act


def _compress(v: np.ndarray) -> np.ndarray:
    """A constant vector as a scalar (keeps metadata small); otherwise unchanged."""
    v = np.asarray(v, dtype=np.float64).ravel()
    if v.size > 1 and np.all(v == v[0]):
        return v[:1]
    return v
