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

This module writes a store (:func:`save_network`, its chunk policy and compressors); reading and checking one
(:func:`open_network`, :func:`layer_arrays`, :func:`verify_network_store`, :func:`network_store_info`) is in
:mod:`recurjac_scale.network.store_read` and re-exported here; the format's name and versions are in
:mod:`recurjac_scale.network.store_format`.
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
from ..errors import InputError, NonFiniteError, OutputExistsError
from .model import Network, _is_lazy
from .store_format import _DTYPES, FORMAT_NAME, FORMAT_VERSION, SPARSE_FORMAT_VERSION
from .store_read import layer_arrays, network_store_info, open_network, verify_network_store  # noqa: F401 (re-exported)

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

DEFAULT_TARGET_CHUNK_BYTES = 16 * 2**20
"""Default size of one weight chunk (16 MiB): large enough for efficient GEMMs and I/O, small enough that a few
chunks per dask thread fit in memory."""

_CHUNK_MULTIPLE = 128


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
