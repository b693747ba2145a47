"""Reading a model store: open it lazily, verify every chunk, describe it (layout in
:mod:`recurjac_scale.network.store`).

Every check of the format happens here: the group attributes (format name and version, widths, dtype,
activations, input description), the layer arrays (presence, shape, dtype, regular zarr v3 grid, declared CSR
layers), and, in :func:`verify_network_store`, every chunk (decodable, present, finite).  A problem is a
:class:`~recurjac_scale.errors.StoreError` naming the store, the array and what is wrong.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from .._json import json_safe
from ..activations import activation_from_spec
from ..errors import RecurJacError, StoreError, UnsupportedActivationError
from .csr_store import CSRWeight, csr_weight
from .model import InputSpec, Network
from .store_format import _DTYPES, FORMAT_NAME, FORMAT_VERSION, SPARSE_FORMAT_VERSION

__all__ = ["open_network", "layer_arrays", "verify_network_store", "network_store_info"]


def _array_dir_bytes(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(root, f))
            except OSError:  # pragma: no cover - racing deletion
                pass
    return total


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
