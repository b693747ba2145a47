"""Pruned layers of a zarr model store: a CSR weight group seen as a read-only 2-D array (:class:`CSRWeight`).

The model store (:mod:`recurjac_scale.network.store`) writes a pruned layer as a CSR group (``data``, ``indices``,
``indptr``; :mod:`recurjac_scale.network.sparse`); :func:`recurjac_scale.network.store.layer_arrays` returns a
:class:`CSRWeight` for it, which slices like the dense zarr arrays of the other layers (dense numpy blocks, read
from the rows' part of the CSR arrays only) and also gives the rows as ``scipy.sparse.csr_array``.
"""

from __future__ import annotations

import numpy as np

from ..errors import InputError, StoreError

__all__ = ["CSRWeight", "CSR_PANEL_BYTES", "csr_weight"]

CSR_PANEL_BYTES = 16 * 2**20
"""Bytes of the row panels a :class:`CSRWeight` reports as its ``chunks`` (the store's default chunk size)."""


class CSRWeight:
    """A CSR weight group of a model store seen as a read-only 2-D array (what :func:`layer_arrays` returns for a
    sparse layer): ``shape``, ``dtype``, ``ndim``, ``chunks`` (row panels x all columns), ``nnz`` and
    ``w[r0:r1, c0:c1]`` -> dense numpy, reading only the rows' part of the CSR arrays (validated: a lost or corrupt
    chunk raises :class:`StoreError`)."""

    def __init__(self, group, shape, dtype, nnz: int, key: str):
        self.group = group
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self.ndim = 2
        self.nnz = int(nnz)
        self.key = key
        rows_per = max(1, min(self.shape[0], CSR_PANEL_BYTES // max(1, self.shape[1] * self.dtype.itemsize)))
        self.chunks = (rows_per, max(1, self.shape[1]))

    @property
    def nbytes(self) -> int:
        return int(self.shape[0] * self.shape[1] * self.dtype.itemsize)

    def csr(self, r0: int = 0, r1: int | None = None):
        """The rows ``r0:r1`` as ``scipy.sparse.csr_array``."""
        from .sparse import read_csr_rows

        return read_csr_rows(self.group, r0, self.shape[0] if r1 is None else r1)

    def __getitem__(self, key):
        if not isinstance(key, tuple):
            key = (key,)
        if len(key) > 2 or not all(isinstance(k, slice) for k in key):
            raise InputError(f"{self.key}: only slices are supported on a CSR weight, got {key!r}")
        rs = key[0] if key else slice(None)
        cs = key[1] if len(key) > 1 else slice(None)
        r0, r1, step = rs.indices(self.shape[0])
        if step != 1:
            raise InputError(f"{self.key}: row slices with a step are not supported")
        block = self.csr(r0, max(r0, r1)).toarray()
        return np.ascontiguousarray(block[:, cs], dtype=self.dtype)

    @property
    def oindex(self):
        """Orthogonal indexing like ``zarr.Array.oindex``: ``w.oindex[rows, cols]`` with slices or integer index
        arrays, dense numpy (reads the row range ``min(rows):max(rows) + 1`` only)."""
        return _CSROIndex(self)


class _CSROIndex:
    def __init__(self, w: CSRWeight):
        self.w = w

    def __getitem__(self, key):
        rows, cols = key if isinstance(key, tuple) and len(key) == 2 else (key, slice(None))
        if isinstance(rows, slice):
            block = self.w[rows, :]
        else:
            r = np.asarray(rows, dtype=np.int64).reshape(-1)
            if r.size == 0:
                block = np.zeros((0, self.w.shape[1]), dtype=self.w.dtype)
            else:
                if r.min() < 0 or r.max() >= self.w.shape[0]:
                    raise IndexError(f"{self.w.key}: row index out of range")
                lo = int(r.min())
                block = self.w.csr(lo, int(r.max()) + 1)[r - lo].toarray()
        if not isinstance(cols, slice):
            cols = np.asarray(cols, dtype=np.int64).reshape(-1)
        return np.ascontiguousarray(block[:, cols], dtype=self.w.dtype)


def csr_weight(p: str, node, key: str, shape: tuple, dt: np.dtype) -> CSRWeight:
    """Validate a CSR weight group of a model store (attributes and array lengths; values are checked when read)."""
    from .sparse import _open_csr

    try:
        g, csr_shape, nnz = _open_csr(node)
    except StoreError as exc:
        raise StoreError(f"{p}: {key!r}: {exc}") from None
    if tuple(csr_shape) != tuple(shape):
        raise StoreError(f"{p}: CSR group {key!r} has shape {tuple(csr_shape)} but the metadata needs {shape}")
    if np.dtype(g["data"].dtype) != dt or g.attrs.get("dtype") not in (None, dt.name):
        raise StoreError(f"{p}: CSR group {key!r} has dtype {g['data'].dtype} but the store dtype is {dt.name}")
    if not np.issubdtype(np.dtype(g["indptr"].dtype), np.integer) or not np.issubdtype(
        np.dtype(g["indices"].dtype), np.integer
    ):
        raise StoreError(f"{p}: CSR group {key!r} has non-integer index arrays")
    return CSRWeight(g, shape, dt, nnz, key)
