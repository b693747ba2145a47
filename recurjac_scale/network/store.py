"""The zarr v3 model store: one zarr group per network, read lazily.

Layout (format ``recurjac-scale-model``, :data:`FORMAT_VERSION` 1)
------------------------------------------------------------------
::

    MODEL.zarr/                   zarr v3 group; its attributes are the model metadata (below)
      layers/                     group
        0/                        group of affine layer k = 0
          weight                  array (n_1, n_0), dtype = the store's dtype
          bias                    array (n_1,)
        1/ ...
        H-1/
          weight                  array (n_H, n_{H-1})
          bias                    array (n_H,)

``weights[k]`` is ``W^(k+1)`` of Zhang et al. (2019): shape ``(out, in)``, as in PyTorch and in
:class:`~recurjac_scale.network.model.Network`.  Every array

- is a plain regular-grid zarr v3 array (no sharding, no consolidated metadata: read the ``zarr.json`` files);
- is chunked independently of the others: a weight's chunk shape is chosen by :func:`choose_chunks` (about
  :data:`DEFAULT_TARGET_CHUNK_BYTES` per chunk, near-square tiles of an edge that is a multiple of 128, the whole
  array when it is smaller) or set with ``chunk_edge``; read ``array.chunks`` rather than assuming a size;
- is compressed losslessly (``bytes`` codec, little endian, then zstd with its content checksum by default), so a
  round trip is bitwise exact and a corrupted chunk fails to decode instead of returning wrong numbers;
- has ``fill_value = NaN``.  Weights are finite (checked at save time), so every chunk is written and a missing
  chunk file reads back as NaN, which :meth:`Network.validate` and :func:`verify_network_store` detect: a store
  never silently turns a lost chunk into zeros.

To read a weight block by block (the scale engine)::

    g = zarr.open_group(path, mode="r", use_consolidated=False)
    w = g[f"layers/{k}/weight"]              # zarr.Array, w.chunks = (rows, cols)
    block = w[r0:r1, c0:c1]                  # numpy, dtype of the store

or take the dask arrays of :func:`open_network` (``da.from_zarr(array, chunks=array.chunks)``: one dask chunk per
zarr chunk), or :func:`layer_arrays` for the validated zarr arrays.

Group attributes
----------------
``format``              ``"recurjac-scale-model"``
``format_version``      int; a reader refuses versions newer than the one it knows
``n_layers``            ``H``, the number of affine layers
``widths``              ``[n_0, n_1, ..., n_H]``
``dtype``               ``"float32"`` or ``"float64"`` (all arrays share it)
``activations``         list of ``H - 1`` activation specs ``{"name": ..., **params}`` (hidden layers)
``output_activation``   activation spec of the output layer (``{"name": "identity"}`` for none)
``input``               :meth:`InputSpec.to_dict` (shape, layout, domain box, original mean/std); non-finite
                        numbers are written as the strings ``"inf"``/``"-inf"`` (JSON has no infinity)
``provenance``          dict: ``source``, ``source_sha256``, ``importer``, ``importer_version`` when imported,
                        ``created`` (ISO 8601 UTC time of the save), ``recurjac_scale_version``, and whatever else
                        the producer recorded (e.g. training settings)

Pruned layers (opt-in, ``save_network(..., sparse_threshold=...)``, :data:`SPARSE_FORMAT_VERSION` 2)
---------------------------------------------------------------------------------------------------
A weight whose density (fraction of non-zero entries) is below the threshold is stored as a CSR group
``layers/k/weight`` (layout in :mod:`recurjac_scale.network.sparse`: ``indptr``, ``indices``, ``data`` and the
attributes ``format = "recurjac-scale-csr"``, ``shape``, ``nnz``) instead of a dense array; biases stay dense.  Such a
store has ``format_version`` 2 and the root attribute ``sparse_layers`` (sorted list of the layer indices stored
sparse; also recorded in ``provenance["sparse_layers"]``), so a reader that knows only version 1 refuses it cleanly.
Stores without a sparse layer are written exactly as before (version 1).  :func:`open_network` returns a sparse
layer's weight as a lazy dense dask array built from row panels of the CSR arrays (every consumer keeps working);
the round trip is exact.

The attributes are written last and the store is assembled under a temporary sibling name and renamed into place,
so an interrupted save never leaves a half-written store under the final name.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import math
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from .._json import json_safe
from ..activations import activation_from_spec
from ..errors import (
    InputError,
    NonFiniteError,
    OutputExistsError,
    RecurJacError,
    StoreError,
    UnsupportedActivationError,
)
from .csr_store import CSRWeight, csr_weight
from .model import InputSpec, Network, _is_lazy

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "SPARSE_FORMAT_VERSION",
    "DEFAULT_TARGET_CHUNK_BYTES",
    "COMPRESSORS",
    "choose_chunks",
    "save_network",
    "open_network",
    "layer_arrays",
    "network_store_info",
    "verify_network_store",
    "file_sha256",
]

FORMAT_NAME = "recurjac-scale-model"
FORMAT_VERSION = 1
"""The store format version written by this code; stores with a larger version are refused."""

SPARSE_FORMAT_VERSION = 2
"""The version written when at least one layer is stored as CSR (module docstring); a version-2 store must declare
its ``sparse_layers``.  Any other version above :data:`FORMAT_VERSION` is refused."""

DEFAULT_TARGET_CHUNK_BYTES = 16 * 2**20
"""Default size of one weight chunk (16 MiB): large enough for efficient GEMMs and I/O, small enough that a few
chunks per dask thread fit in memory."""

_CHUNK_MULTIPLE = 128
_DTYPES = ("float32", "float64")


def _zstd():
    from zarr.codecs import ZstdCodec

    return ZstdCodec(level=3, checksum=True)


def _blosc():
    from zarr.codecs import BloscCodec

    return BloscCodec(cname="zstd", clevel=5, shuffle="shuffle")


COMPRESSORS = {
    "zstd": _zstd,
    "blosc": _blosc,
    "none": lambda: None,
}
"""Lossless compressors by name (factories of zarr v3 bytes-to-bytes codecs).  ``zstd`` (default) carries a content
checksum; ``blosc`` is Blosc/zstd with byte shuffle (smaller, no checksum); ``none`` stores raw bytes."""


# -- chunk policy -------------------------------------------------------------------------------------------------


def choose_chunks(
    shape: tuple[int, ...],
    itemsize: int,
    *,
    chunk_edge: int | None = None,
    target_chunk_bytes: int = DEFAULT_TARGET_CHUNK_BYTES,
) -> tuple[int, ...]:
    """Chunk shape of a weight ``(n_out, n_in)`` or bias ``(n,)`` array.

    Parameters
    ----------
    shape : tuple of int
        Array shape, 1-D or 2-D.
    itemsize : int
        Bytes per element (8 for float64).
    chunk_edge : int, optional
        Fixed chunk edge: chunks are ``min(n, chunk_edge)`` along every axis.
    target_chunk_bytes : int
        Otherwise: square tiles whose edge is the largest multiple of 128 with ``edge**2 * itemsize <=
        target_chunk_bytes`` (1408 for float64 at 16 MiB, 2048 for float32); when one axis is shorter than the
        edge, the other grows (in multiples of 128) towards the same byte target.  A 1-D array gets
        ``target_chunk_bytes / itemsize`` elements per chunk.

    Returns
    -------
    tuple of int
        The chunk shape, each entry in ``[1, n]``.
    """
    shape = tuple(int(s) for s in shape)
    if chunk_edge is not None:
        if int(chunk_edge) != chunk_edge or chunk_edge < 1:
            raise InputError(f"chunk edge must be a positive integer, got {chunk_edge!r}")
        return tuple(max(1, min(s, int(chunk_edge))) for s in shape)
    if int(target_chunk_bytes) != target_chunk_bytes or target_chunk_bytes < itemsize:
        raise InputError(
            f"target chunk size must be an integer number of bytes >= {itemsize}, got {target_chunk_bytes!r}"
        )
    elements = int(target_chunk_bytes) // int(itemsize)
    if len(shape) == 1:
        return (max(1, min(shape[0], elements)),)
    if len(shape) != 2:
        raise InputError(f"only 1-D and 2-D arrays are stored, got shape {shape}")
    edge = math.isqrt(elements)
    if edge >= _CHUNK_MULTIPLE:
        edge -= edge % _CHUNK_MULTIPLE
    rows, cols = max(1, min(shape[0], edge)), max(1, min(shape[1], edge))

    def grow(other: int, n: int) -> int:
        g = elements // other
        if g >= _CHUNK_MULTIPLE:
            g -= g % _CHUNK_MULTIPLE
        return max(1, min(n, max(edge, g)))

    if cols < edge and rows == edge:
        rows = grow(cols, shape[0])
    elif rows < edge and cols == edge:
        cols = grow(rows, shape[1])
    return (rows, cols)


# -- helpers ------------------------------------------------------------------------------------------------------


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes (for provenance), read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            h.update(block)
    return h.hexdigest()


def _store_dtype(network: Network, dtype) -> np.dtype:
    if dtype is not None:
        dt = np.dtype(dtype)
        if dt.name not in _DTYPES:
            raise InputError(f"store dtype must be float32 or float64, got {dt.name}")
        return dt
    kinds = set()
    for k, a in enumerate((*network.weights, *network.biases)):
        dt = np.dtype(a.dtype)
        if dt.kind not in "fiub":
            raise InputError(f"array {k} of the network has dtype {dt}; only real numbers can be stored")
        kinds.add(dt.name)
    return np.dtype("float32") if kinds == {"float32"} else np.dtype("float64")


def _check_finite_block(block: np.ndarray, where: str) -> np.ndarray:
    if not np.isfinite(block).all():
        raise NonFiniteError(f"{where} contains NaN or infinite values; a model store holds finite weights only")
    return block


def _cast_block(block: np.ndarray, dtype: np.dtype) -> np.ndarray:
    with np.errstate(over="ignore", invalid="ignore"):  # overflow to inf is refused by _check_finite_block
        return block.astype(dtype, copy=False)


def _prepare(a, dtype: np.dtype, where: str):
    """Numpy arrays: convert and check now.  Lazy arrays: convert lazily (checked while writing)."""
    if _is_lazy(a):
        return a if a.dtype == dtype else a.map_blocks(_cast_block, dtype, dtype=dtype)
    with np.errstate(over="ignore", invalid="ignore"):  # overflow to inf is reported just below
        arr = np.ascontiguousarray(np.asarray(a).astype(dtype, copy=False))
    return _check_finite_block(arr, where)


def _array_dir_bytes(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(root, f))
            except OSError:  # pragma: no cover - racing deletion
                pass
    return total


def _is_zarr_dir(path: Path) -> bool:
    return path.is_dir() and any((path / name).is_file() for name in ("zarr.json", ".zgroup", ".zarray"))


# -- save ---------------------------------------------------------------------------------------------------------


def save_network(
    network: Network,
    path: str | os.PathLike,
    *,
    chunk_edge: int | None = None,
    target_chunk_bytes: int = DEFAULT_TARGET_CHUNK_BYTES,
    overwrite: bool = False,
    compressor: str | Any = "zstd",
    dtype: str | np.dtype | None = None,
    sparse_threshold: float | None = None,
) -> Path:
    """Write a network to a zarr v3 model store (layout in the module docstring).

    Parameters
    ----------
    network : Network
        Weights may be numpy or lazy dask arrays (written chunk by chunk, never all in memory).
    path : str or path-like
        The store folder, conventionally ``*.zarr``.  Its parent folder must exist.
    chunk_edge : int, optional
        Fixed chunk edge for every array (see :func:`choose_chunks`); default: about ``target_chunk_bytes``.
    target_chunk_bytes : int
        Byte size aimed at per chunk when ``chunk_edge`` is not given (default 16 MiB).
    overwrite : bool
        Replace an existing store at ``path``.  Without it an existing path raises :class:`OutputExistsError`.
        Even with it, a non-empty folder that is not a zarr store is never deleted.
    compressor : str or zarr codec
        A name in :data:`COMPRESSORS` (``"zstd"``, ``"blosc"``, ``"none"``) or a zarr v3 bytes-to-bytes codec.
        Must be lossless.
    dtype : {None, "float32", "float64"}
        Store dtype.  ``None``: float32 if every array is float32, else float64 (exact for float32/float64
        inputs).  An explicit ``"float32"`` rounds float64 weights (not a certified operation: the stored network
        is then a different network).
    sparse_threshold : float, optional
        Opt-in: a weight with ``density(w) < sparse_threshold`` (e.g. 0.3) is stored as CSR (module docstring; a
        lazy weight is then computed in memory to be converted).  ``None`` (default): every layer dense, format 1.

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    OutputExistsError
        ``path`` exists and ``overwrite`` is false (or it is a non-zarr folder).
    NonFiniteError
        A weight or bias holds NaN or infinity (nothing is left on disk).
    InputError
        Bad chunk settings, compressor or dtype; missing parent folder.
    """
    import dask.array as da
    import zarr

    from .._version import __version__

    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise InputError(f"folder {str(parent)!r} for model store {str(path)!r} does not exist")
    if path.exists() or path.is_symlink():
        if not overwrite:
            raise OutputExistsError(
                f"model store {str(path)!r} already exists; pass overwrite=True (--overwrite) to replace it"
            )
        if path.is_dir() and not _is_zarr_dir(path) and any(path.iterdir()):
            raise OutputExistsError(
                f"{str(path)!r} is a non-empty folder that is not a zarr store; refusing to replace it"
            )
    if isinstance(compressor, str):
        if compressor not in COMPRESSORS:
            raise InputError(f"unknown compressor {compressor!r}; choose one of {', '.join(COMPRESSORS)}")
        codec = COMPRESSORS[compressor]()
    else:
        codec = compressor
    compressors = None if codec is None else [codec]
    dt = _store_dtype(network, dtype)
    choose_chunks((1, 1), dt.itemsize, chunk_edge=chunk_edge, target_chunk_bytes=target_chunk_bytes)  # validate

    weights = [_prepare(w, dt, f"layer {k} weight") for k, w in enumerate(network.weights)]
    biases = [_prepare(b, dt, f"layer {k} bias") for k, b in enumerate(network.biases)]
    sparse_layers = _sparse_layers(weights, sparse_threshold)

    provenance = dict(network.provenance)
    provenance.setdefault("created", _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    provenance["saved"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    provenance["recurjac_scale_version"] = __version__
    if sparse_layers:
        provenance["sparse_layers"] = sorted(sparse_layers)
    else:
        provenance.pop("sparse_layers", None)
    attrs = json_safe(
        {
            "format": FORMAT_NAME,
            "format_version": SPARSE_FORMAT_VERSION if sparse_layers else FORMAT_VERSION,
            "n_layers": network.n_layers,
            "widths": list(network.widths),
            "dtype": dt.name,
            "activations": [a.to_spec() for a in network.activations],
            "output_activation": network.output_activation.to_spec(),
            "input": network.input_spec.to_dict(),
            "provenance": provenance,
            **({"sparse_layers": sorted(sparse_layers)} if sparse_layers else {}),
        }
    )

    tmp = parent / f".{path.name}.partial-{uuid.uuid4().hex[:12]}"
    try:
        root = zarr.open_group(str(tmp), mode="w-", zarr_format=3)
        layers = root.create_group("layers")
        for k, (w, b) in enumerate(zip(weights, biases)):
            lg = layers.create_group(str(k))
            if k in sparse_layers:
                from .sparse import write_csr

                write_csr(lg, "weight", sparse_layers[k], compressors=compressors)
            for name, a in ((("bias", b),) if k in sparse_layers else (("weight", w), ("bias", b))):
                chunks = choose_chunks(
                    a.shape, dt.itemsize, chunk_edge=chunk_edge, target_chunk_bytes=target_chunk_bytes
                )
                z = lg.create_array(
                    name,
                    shape=tuple(int(s) for s in a.shape),
                    dtype=dt,
                    chunks=chunks,
                    fill_value=np.nan,
                    compressors=compressors,
                )
                where = f"layer {k} {name}"
                if _is_lazy(a):
                    # One dask block per zarr chunk (aligned writes), each checked for NaN/inf as it is written.
                    # Synchronous: when a block fails, no other thread is still writing into the temporary
                    # store while it is removed (the threaded scheduler raises without waiting for them).
                    checked = a.rechunk(chunks).map_blocks(
                        _check_finite_block, where, dtype=dt, meta=np.empty((0,) * a.ndim, dt)
                    )
                    da.store(checked, z, lock=False, compute=True, scheduler="synchronous")
                else:
                    z[...] = a
        root.attrs.update(attrs)
        _place(tmp, path, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _sparse_layers(weights, threshold) -> dict:
    """``{k: csr_array}`` for the weights to store as CSR (``density < threshold``); empty when ``threshold`` is
    None."""
    if threshold is None:
        return {}
    try:
        thr = float(threshold)
    except (TypeError, ValueError):
        raise InputError(f"sparse_threshold {threshold!r} is not a number; accepted: a density in [0, 1]") from None
    if not (0.0 <= thr <= 1.0):
        raise InputError(f"sparse_threshold {threshold!r} is invalid; accepted: a density in [0, 1]")
    from .sparse import density, to_csr

    out = {}
    for k, w in enumerate(weights):
        if _is_lazy(w):
            w = _check_finite_block(np.asarray(w.compute()), f"layer {k} weight")
        if w.size and density(w) < thr:
            out[k] = to_csr(w)
    return out


def _place(tmp: Path, path: Path, overwrite: bool) -> None:
    """Rename the finished temporary store into place (replacing an old one only when ``overwrite``)."""
    if not (path.exists() or path.is_symlink()):
        os.rename(tmp, path)
        return
    if not overwrite:  # created meanwhile by someone else
        raise OutputExistsError(f"model store {str(path)!r} appeared while writing; not replaced")
    old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:12]}"
    os.rename(path, old)
    try:
        os.rename(tmp, path)
    except BaseException:
        os.rename(old, path)
        raise
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink(missing_ok=True)


# -- open ---------------------------------------------------------------------------------------------------------


def _open_group(path: Path):
    import zarr

    if not path.exists():
        raise StoreError(f"{str(path)!r}: no such model store")
    if not path.is_dir():
        raise StoreError(f"{str(path)!r}: not a zarr model store (it is a file, not a folder)")
    if not (path / "zarr.json").is_file():
        hint = " (zarr v2 metadata found; only zarr v3 stores are read)" if (path / ".zgroup").exists() else ""
        raise StoreError(f"{str(path)!r}: not a zarr v3 group (no zarr.json){hint}")
    try:
        g = zarr.open_group(str(path), mode="r", zarr_format=3, use_consolidated=False)
    except Exception as exc:  # zarr raises many types for broken metadata
        raise StoreError(f"{str(path)!r}: not a readable zarr v3 group ({type(exc).__name__}: {exc})") from None
    return g


def _read_metadata(path: Path, g) -> dict:
    """Validate the group attributes; return the parsed metadata."""
    try:
        attrs = dict(g.attrs)
    except Exception as exc:  # pragma: no cover - metadata already parsed by open_group
        raise StoreError(f"{str(path)!r}: unreadable attributes ({exc})") from None
    p = repr(str(path))
    fmt = attrs.get("format")
    if fmt != FORMAT_NAME:
        raise StoreError(
            f"{p}: not a recurjac-scale model store (attribute 'format' is {fmt!r}, expected {FORMAT_NAME!r})"
        )
    ver = attrs.get("format_version")
    if isinstance(ver, bool) or not isinstance(ver, int) or ver < 1:
        raise StoreError(f"{p}: invalid format_version {ver!r} (expected a positive integer)")
    sparse_layers = attrs.get("sparse_layers")
    if ver == SPARSE_FORMAT_VERSION and isinstance(sparse_layers, list):
        pass  # this reader's CSR extension; the declared layers are checked below and in _layer_arrays
    elif ver > FORMAT_VERSION:
        raise StoreError(
            f"{p}: written with store format version {ver}, newer than the version {FORMAT_VERSION} this "
            "recurjac-scale can read; upgrade recurjac-scale"
        )
    widths = attrs.get("widths")
    if (
        not isinstance(widths, list)
        or len(widths) < 2
        or not all(isinstance(w, int) and not isinstance(w, bool) and w > 0 for w in widths)
    ):
        raise StoreError(f"{p}: attribute 'widths' must be a list of at least two positive integers, got {widths!r}")
    H = len(widths) - 1
    if attrs.get("n_layers") != H:
        raise StoreError(
            f"{p}: attribute n_layers = {attrs.get('n_layers')!r} disagrees with widths {widths} ({H} layers)"
        )
    dtype = attrs.get("dtype")
    if dtype not in _DTYPES:
        raise StoreError(f"{p}: attribute dtype = {dtype!r}; expected one of {', '.join(_DTYPES)}")
    specs = attrs.get("activations")
    if not isinstance(specs, list) or len(specs) != H - 1:
        raise StoreError(f"{p}: attribute 'activations' must list {H - 1} hidden activations, got {specs!r}")
    acts = []
    for k, spec in enumerate([*specs, attrs.get("output_activation")]):
        where = f"layer {k}" if k < H - 1 else "output layer"
        if spec is not None and not isinstance(spec, (dict, str)):
            raise StoreError(f"{p}: {where} activation spec {spec!r} is not a dict")
        try:
            acts.append(activation_from_spec(spec))
        except UnsupportedActivationError as exc:
            raise UnsupportedActivationError(f"{p}: {where} activation: {exc}") from None
    try:
        spec = InputSpec.from_dict(attrs["input"])
    except (RecurJacError, KeyError, TypeError, ValueError) as exc:
        raise StoreError(f"{p}: invalid input metadata ({type(exc).__name__}: {exc})") from None
    if spec.size != widths[0]:
        raise StoreError(f"{p}: input shape {spec.shape} has {spec.size} coordinates but widths[0] = {widths[0]}")
    prov = attrs.get("provenance") or {}
    if not isinstance(prov, dict):
        raise StoreError(f"{p}: attribute 'provenance' must be a dict")
    if ver == SPARSE_FORMAT_VERSION:
        if (
            not sparse_layers
            or not all(isinstance(k, int) and not isinstance(k, bool) and 0 <= k < H for k in sparse_layers)
            or len(set(sparse_layers)) != len(sparse_layers)
        ):
            raise StoreError(
                f"{p}: attribute 'sparse_layers' = {sparse_layers!r} must list distinct layer indices in [0, {H})"
            )
        sparse_set = frozenset(sparse_layers)
    else:
        sparse_set = frozenset()
    return dict(
        sparse_layers=sparse_set,
        format_version=ver,
        widths=widths,
        dtype=np.dtype(dtype),
        activations=acts[:-1],
        output_activation=acts[-1],
        input_spec=spec,
        provenance=prov,
    )


def _layer_arrays(path: Path, g, meta: dict) -> list[tuple[Any, Any]]:
    import zarr

    p = repr(str(path))
    widths, dt = meta["widths"], meta["dtype"]
    H = len(widths) - 1
    try:
        layers = g["layers"]
    except KeyError:
        raise StoreError(f"{p}: missing group 'layers'") from None
    if not isinstance(layers, zarr.Group):
        raise StoreError(f"{p}: 'layers' is not a group")
    names = set(layers.group_keys()) | set(layers.array_keys())
    extra = sorted(names - {str(k) for k in range(H)})
    if extra:
        raise StoreError(f"{p}: unexpected members {extra} in 'layers' (the metadata declares {H} layers)")
    out = []
    for k in range(H):
        pair = []
        for name, shape in (("weight", (widths[k + 1], widths[k])), ("bias", (widths[k + 1],))):
            key = f"layers/{k}/{name}"
            try:
                a = g[key]
            except KeyError:
                raise StoreError(f"{p}: missing array {key!r}") from None
            except Exception as exc:
                raise StoreError(f"{p}: cannot open array {key!r} ({type(exc).__name__}: {exc})") from None
            if name == "weight" and k in meta.get("sparse_layers", ()):
                if not isinstance(a, zarr.Group):
                    raise StoreError(f"{p}: {key!r} is declared sparse (attribute 'sparse_layers') but is not a group")
                pair.append(csr_weight(p, a, key, shape, dt))
                continue
            if not isinstance(a, zarr.Array):
                raise StoreError(f"{p}: {key!r} is a group, expected an array")
            if tuple(a.shape) != shape:
                raise StoreError(
                    f"{p}: array {key!r} has shape {tuple(a.shape)} but the metadata (widths {widths}) needs {shape}"
                )
            if np.dtype(a.dtype) != dt:
                raise StoreError(f"{p}: array {key!r} has dtype {a.dtype} but the store dtype is {dt.name}")
            if a.metadata.zarr_format != 3 or len(a.chunks) != len(shape):
                raise StoreError(f"{p}: array {key!r} is not a regular zarr v3 array")
            pair.append(a)
        out.append(tuple(pair))
    return out


def _open(path: Path) -> tuple[Any, dict, list[tuple[Any, Any]]]:
    g = _open_group(path)
    meta = _read_metadata(path, g)
    return g, meta, _layer_arrays(path, g, meta)


def layer_arrays(path: str | os.PathLike) -> list[tuple[Any, Any]]:
    """The validated zarr arrays ``[(weight_k, bias_k), ...]`` of a model store, for block-wise reading.

    Raises the same errors as :func:`open_network`.
    """
    return _open(Path(path))[2]


def _dask_name(path: Path, k: int, name: str, arr) -> str:
    from dask.base import tokenize

    try:
        stamp = (path / "layers" / str(k) / name / "zarr.json").stat().st_mtime_ns
    except OSError:  # pragma: no cover
        stamp = 0
    if isinstance(arr, CSRWeight):
        try:
            stamp = (path / "layers" / str(k) / name / "data" / "zarr.json").stat().st_mtime_ns
        except OSError:  # pragma: no cover
            stamp = 0
    return f"recurjac-store-{name}-{k}-" + tokenize(str(path.resolve()), k, name, stamp, arr.shape, arr.chunks)


class _CheckedArray:
    """A zarr array whose reads raise :class:`StoreError` naming the store, the array and the selection when a
    chunk cannot be decoded (damaged, truncated, checksum mismatch) or cannot be read (permissions), instead of the
    codec's own exception."""

    def __init__(self, array, path: Path, key: str):
        self.array, self.path, self.key = array, path, key
        self.shape, self.dtype, self.ndim, self.chunks = array.shape, array.dtype, array.ndim, array.chunks

    def __getitem__(self, sel):
        try:
            return self.array[sel]
        except Exception as exc:  # noqa: BLE001 - any failure to read stored data is reported the same way
            hint = ("no read permission: ask for access or copy the store" if isinstance(exc, PermissionError)
                    else "the store is damaged: re-import or copy the model again")
            raise StoreError(
                f"{str(self.path)!r}: array {self.key!r} {_format_selection(sel)} cannot be read "
                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'no detail'}); {hint}"
            ) from None


def _format_selection(sel) -> str:
    sel = sel if isinstance(sel, tuple) else (sel,)
    parts = [f"{s.start or 0}:{s.stop}" if isinstance(s, slice) else str(s) for s in sel]
    return "[" + ", ".join(parts) + "]"


def _checked_dask(a, path: Path, key: str, name: str):
    import dask.array as da

    return da.from_array(
        _CheckedArray(a, path, key), chunks=a.chunks, name=name, fancy=False,
        meta=np.empty((0,) * a.ndim, dtype=a.dtype),
    )


def open_network(path: str | os.PathLike) -> Network:
    """Open a model store lazily.

    Only metadata is read: the weights and biases of the returned network are dask arrays backed by the store
    (``da.from_zarr(array, chunks=array.chunks)``: one dask chunk per zarr chunk), so a network larger than memory
    can be opened and described.  Use :meth:`Network.materialize` to load it.

    Parameters
    ----------
    path : str or path-like
        A store written by :func:`save_network`.

    Returns
    -------
    Network
        Weights with the store's dtype; ``provenance`` and ``input_spec`` from the metadata.

    Raises
    ------
    StoreError
        Naming the path and the problem: no such path, not a zarr v3 group, not a recurjac-scale model, format
        version newer than :data:`FORMAT_VERSION`, invalid attributes, a missing array, an array whose shape or
        dtype disagrees with the metadata.
    UnsupportedActivationError
        An activation in the metadata is unknown or refused (message starts with the path).
    """
    import dask.array as da

    path = Path(path)
    _g, meta, arrays = _open(path)
    weights, biases = [], []
    for k, (w, b) in enumerate(arrays):
        if isinstance(w, CSRWeight):
            weights.append(
                da.from_array(
                    w, chunks=w.chunks, name=_dask_name(path, k, "weight", w), asarray=False, fancy=False,
                    meta=np.empty((0, 0), dtype=w.dtype),
                )
            )
        else:
            weights.append(_checked_dask(w, path, f"layers/{k}/weight", _dask_name(path, k, "weight", w)))
        biases.append(_checked_dask(b, path, f"layers/{k}/bias", _dask_name(path, k, "bias", b)))
    try:
        return Network(
            weights,
            biases,
            meta["activations"],
            output_activation=meta["output_activation"],
            input_spec=meta["input_spec"],
            provenance=meta["provenance"],
            validate=False,
        )
    except UnsupportedActivationError:
        raise
    except RecurJacError as exc:
        raise StoreError(f"{str(path)!r}: inconsistent model ({exc})") from None


def verify_network_store(path: str | os.PathLike) -> Network:
    """Open a store and read every chunk once: decodable (zstd checksums), present and finite.

    Returns the opened (lazy) network.

    Raises
    ------
    StoreError
        A chunk that is missing (reads as the NaN fill value), non-finite or fails to decode, naming the array.
    """
    net = open_network(path)
    arrays = layer_arrays(path)
    for k, pair in enumerate(arrays):
        for name, a in zip(("weight", "bias"), pair):
            key = f"layers/{k}/{name}"
            rows = a.chunks[0]
            for r0 in range(0, a.shape[0], rows):
                try:
                    block = a[r0 : r0 + rows]
                except Exception as exc:
                    raise StoreError(
                        f"{str(path)!r}: array {key!r} rows {r0}:{r0 + rows} cannot be read "
                        f"({type(exc).__name__}: {exc})"
                    ) from None
                if not np.isfinite(block).all():
                    raise StoreError(
                        f"{str(path)!r}: array {key!r} rows {r0}:{r0 + rows} hold NaN or infinite values "
                        "(a missing chunk reads as NaN)"
                    )
    return net


# -- info ---------------------------------------------------------------------------------------------------------


def _codec_names(arr) -> list[str]:
    out = []
    for c in arr.metadata.codecs:
        d = c.to_dict()
        conf = d.get("configuration") or {}
        inner = ",".join(f"{k}={v}" for k, v in conf.items())
        out.append(f"{d['name']}({inner})" if inner else d["name"])
    return out


def network_store_info(path: str | os.PathLike) -> dict:
    """Describe a model store without reading its weights.

    Returns
    -------
    dict (JSON-able)
        ``path``, ``format``, ``format_version``, ``dtype``, the network description (``widths``, ``activations``,
        ``output_activation``, ``n_parameters``, ``input``, ``provenance``), ``layers``: one dict per affine layer
        with ``shape``, ``activation`` and, for ``weight`` and ``bias``: ``shape``, ``dtype``, ``chunks``,
        ``n_chunks``, ``chunks_stored`` (chunk files present), ``bytes_stored`` (on disk), ``bytes`` (logical),
        ``codecs``; ``bytes_stored`` and ``bytes`` totals and ``bytes_on_disk`` (every file of the store).

    Raises
    ------
    StoreError, UnsupportedActivationError
        As :func:`open_network`.
    """
    path = Path(path)
    net = open_network(path)
    _g, meta, arrays = _open(path)
    desc = net.describe()
    layers = []
    total_stored = total_logical = 0
    for k, pair in enumerate(arrays):
        entry = {
            "index": k,
            "shape": [int(s) for s in pair[0].shape],
            "activation": net.layer_activations[k].to_spec(),
        }
        for name, a in zip(("weight", "bias"), pair):
            stored = _array_dir_bytes(path / "layers" / str(k) / name)
            logical = int(a.nbytes)
            total_stored += stored
            total_logical += logical
            if isinstance(a, CSRWeight):
                entry[name] = {
                    "shape": [int(s) for s in a.shape],
                    "dtype": str(a.dtype),
                    "storage": "csr",
                    "nnz": a.nnz,
                    "density": a.nnz / max(1, a.shape[0] * a.shape[1]),
                    "chunks": [int(c) for c in a.chunks],
                    "n_chunks": 1,
                    "chunks_stored": 1,
                    "bytes_stored": stored,
                    "bytes": logical,
                    "codecs": _codec_names(a.group["data"]),
                }
                continue
            entry[name] = {
                "shape": [int(s) for s in a.shape],
                "dtype": str(a.dtype),
                "chunks": [int(c) for c in a.chunks],
                "n_chunks": int(a.nchunks),
                "chunks_stored": int(a.nchunks_initialized),
                "bytes_stored": stored,
                "bytes": logical,
                "codecs": _codec_names(a),
            }
        layers.append(entry)
    info = {
        "path": str(path),
        "format": FORMAT_NAME,
        "format_version": meta["format_version"],
        "dtype": meta["dtype"].name,
        **desc,
        "layers": layers,
        "bytes": total_logical,
        "bytes_stored": total_stored,
        "bytes_on_disk": _array_dir_bytes(path),
        "complete": all(
            e[n]["chunks_stored"] == e[n]["n_chunks"] for e in layers for n in ("weight", "bias")
        ),
    }
    return json_safe(info)
