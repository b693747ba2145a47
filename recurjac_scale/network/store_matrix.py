"""A weight of a zarr model store read on demand: :class:`StoreMatrix`, the level matrix of a streamed chain.

A :class:`StoreMatrix` is layer ``k``'s weight (or its transpose) that stays in the model store: it reads only the
tiles that hold what is asked (:meth:`StoreMatrix.live_block`, one store tile at a time), a whole matrix one row
panel at a time (``np.asarray``), or a pruned layer straight from its CSR arrays (:meth:`StoreMatrix.to_csr`).  It
implements the :class:`recurjac_scale.jacobian.chain.LevelMatrix` protocol, through which the Jacobian methods read
chain matrices that are not held in memory (:mod:`recurjac_scale.engine.streaming` builds such chains).  Every
value read is the stored float64 value, exactly.
"""

from __future__ import annotations

import threading

import numpy as np

from .csr_store import CSRWeight

__all__ = ["StoreMatrix", "store_tile_bytes", "STREAM_PANEL_BYTES"]

STREAM_PANEL_BYTES = 16 * 2**20
"""Largest read from the store at a time: a row panel of ``np.asarray`` of a :class:`StoreMatrix` (rounded to whole
rows, at least one row), and a tile of :meth:`StoreMatrix.live_block` (whole chunk rows of one chunk column, or
part of one chunk when a chunk is larger)."""


class StoreMatrix:
    """Layer ``k``'s weight of a model store (``transpose``: its transpose), read on demand as float64.

    Supports ``shape``, ``ndim``, ``M[rows, cols]`` with slices / integer or boolean arrays (reads only the tiles
    that hold what is asked, every value exact), :meth:`live_block` (the compacted block a recursion level reads)
    and ``np.asarray(M)``.  ``np.asarray(M)`` is for other readers (a whole matrix): with ``live_rows`` (bool mask,
    length ``shape[0]``) it holds the exact stored values in the live rows and zeros in the others, filled one row
    panel at a time (``panel_bytes``, default :data:`STREAM_PANEL_BYTES`), its unwritten pages never allocated;
    without ``live_rows`` every row is filled.  Picklable: it holds the store path, not the data.
    """

    def __init__(self, store_path: str, k: int, transpose: bool, shape: tuple[int, int], live_rows=None,
                 panel_bytes: int | None = None):
        self.store_path = str(store_path)
        self.k = int(k)
        self.transpose = bool(transpose)
        self.shape = tuple(int(s) for s in shape)
        self.ndim = 2
        self.dtype = np.dtype(np.float64)
        self.live_rows = None if live_rows is None else np.asarray(live_rows, dtype=bool).copy()
        if self.live_rows is not None and self.live_rows.shape != (self.shape[0],):
            raise ValueError(f"live_rows must have shape ({self.shape[0]},), got {self.live_rows.shape}")
        self.panel_bytes = None if panel_bytes is None else int(panel_bytes)
        self._z = None
        self._lock = threading.Lock()

    def __getstate__(self):
        return {"store_path": self.store_path, "k": self.k, "transpose": self.transpose, "shape": self.shape,
                "live_rows": self.live_rows, "panel_bytes": self.panel_bytes}

    def __setstate__(self, d):
        self.__init__(d["store_path"], d["k"], d["transpose"], d["shape"], d.get("live_rows"), d.get("panel_bytes"))

    def _array(self):
        if self._z is None:
            with self._lock:
                if self._z is None:
                    from .store_read import layer_arrays

                    # dense arrays and CSR groups (pruned layers) alike: both support [r0:r1, c0:c1] slicing
                    self._z = layer_arrays(self.store_path)[self.k][0]
        return self._z

    def __getitem__(self, idx) -> np.ndarray:
        """``M[rows, cols]`` for slices, integer or boolean index arrays: :meth:`live_block` of those indices."""
        if not isinstance(idx, tuple):
            idx = (idx, slice(None))
        if len(idx) != 2:
            raise IndexError("StoreMatrix takes two indices")
        return self.live_block(_indices(idx[0], self.shape[0]), _indices(idx[1], self.shape[1]))

    def panel_rows(self) -> int:
        """Rows of this matrix read from the store at a time by ``np.asarray``."""
        pb = STREAM_PANEL_BYTES if self.panel_bytes is None else self.panel_bytes
        return max(1, int(pb) // (8 * max(1, self.shape[1])))

    def tile_shape(self) -> tuple[int, int]:
        """``(rows, cols)`` of this matrix read at a time by :meth:`live_block` (:func:`_tile_shape`)."""
        pb = STREAM_PANEL_BYTES if self.panel_bytes is None else self.panel_bytes
        return _tile_shape(self._array().chunks, self.shape, self.transpose, pb)

    def _tile(self, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
        """``M[r0:r1, c0:c1]`` as float64 (a view of the read tile; transposed for a transposed matrix)."""
        z = self._array()
        if self.transpose:
            return np.asarray(z[c0:c1, r0:r1], dtype=np.float64).T
        return np.asarray(z[r0:r1, c0:c1], dtype=np.float64)

    def live_block(self, rows, cols, dtype=None) -> np.ndarray:
        """``M[rows][:, cols]``, read from the store one tile at a time (:meth:`tile_shape`).

        Parameters
        ----------
        rows, cols : array_like of int
            Row and column indices (any order; in the recursion: the live neurons, increasing).
        dtype : dtype, optional
            Of the result (default float64); each stored float64 value is converted on its own, so the result is
            bitwise ``np.asarray(M, dtype)[np.ix_(rows, cols)]``.

        Returns
        -------
        ndarray, shape (len(rows), len(cols)), C-contiguous
            Only this block, one tile of the store (inside one zarr chunk) and the tile's selected part are held
            at any time; tiles without a selected row or column are not read.
        """
        n, m = self.shape
        rows = np.asarray(rows, dtype=np.intp).reshape(-1)
        cols = np.asarray(cols, dtype=np.intp).reshape(-1)
        for name, idx, size in (("row", rows, n), ("column", cols, m)):
            if idx.size and (idx.min() < 0 or idx.max() >= size):
                raise IndexError(f"{name} index out of range for {self!r}")
        out = np.empty((rows.size, cols.size), dtype=np.float64 if dtype is None else np.dtype(dtype))
        if out.size == 0:
            return out
        tr, tc = self.tile_shape()
        ro = np.argsort(rows, kind="stable")
        co = np.argsort(cols, kind="stable")
        rs, cs = rows[ro], cols[co]
        rsorted = bool(np.all(ro == np.arange(ro.size)))  # then block row positions a:b are a slice (and columns)
        csorted = bool(np.all(co == np.arange(co.size)))
        rcut = np.searchsorted(rs, np.arange(0, n + tr, tr))  # rs[rcut[i]:rcut[i+1]] lie in tile row i
        ccut = np.searchsorted(cs, np.arange(0, m + tc, tc))
        cgroups = [(ccut[j], ccut[j + 1]) for j in range(len(ccut) - 1) if ccut[j + 1] > ccut[j]]
        for i in range(len(rcut) - 1):
            a, b = rcut[i], rcut[i + 1]
            if a == b:
                continue
            r0, r1 = int(rs[a]), int(rs[b - 1]) + 1
            for c, d in cgroups:
                c0, c1 = int(cs[c]), int(cs[d - 1]) + 1
                tile = self._tile(r0, r1, c0, c1)
                part = tile[np.ix_(rs[a:b] - r0, cs[c:d] - c0)]
                if rsorted and csorted:
                    out[a:b, c:d] = part
                else:
                    out[np.ix_(ro[a:b], co[c:d])] = part
                del part
                del tile
        return out

    def __array__(self, dtype=None, copy=None):
        n, m = self.shape
        out = np.zeros((n, m), dtype=np.float64)  # calloc: pages of rows never written stay unallocated
        live = np.ones(n, dtype=bool) if self.live_rows is None else self.live_rows
        z = self._array()
        step = self.panel_rows()
        for r0 in range(0, n, step):
            r1 = min(n, r0 + step)
            idx = np.flatnonzero(live[r0:r1])
            if idx.size == 0:
                continue
            if self.transpose:  # rows of the transpose are columns of the stored weight
                panel = np.asarray(z[:, r0 + int(idx[0]) : r0 + int(idx[-1]) + 1]).T
            else:
                panel = np.asarray(z[r0 + int(idx[0]) : r0 + int(idx[-1]) + 1, :])
            out[r0 + idx] = panel[idx - idx[0]]
            del panel
        if dtype is not None and np.dtype(dtype) != out.dtype:
            return out.astype(dtype)
        return out

    def to_csr(self, dtype=np.float64):
        """The whole matrix (every row, exact values) as a canonical ``scipy.sparse.csr_array`` (sorted indices, no
        stored zeros): read straight from the CSR arrays of a pruned layer (transposed as needed), else from dense
        row panels converted one at a time; never the whole matrix dense.  What a sparse chain level holds
        (:meth:`recurjac_scale.jacobian.chain.Chain.with_sparse`), once per worker process."""
        import scipy.sparse as sp

        from .sparse import to_csr

        z = self._array()
        if isinstance(z, CSRWeight):  # a pruned layer of the store
            a = z.csr()
            return to_csr(a.T if self.transpose else a, dtype=dtype)
        n, m = self.shape
        step = self.panel_rows()
        parts = [to_csr(self[r0 : min(n, r0 + step), :], dtype=dtype) for r0 in range(0, n, step)]
        if not parts:
            return sp.csr_array((n, m), dtype=dtype)
        return to_csr(sp.vstack(parts, format="csr"), dtype=dtype)

    def __repr__(self) -> str:
        return f"StoreMatrix({self.store_path!r}, layer {self.k}{', transposed' if self.transpose else ''}, {self.shape})"


def _tile_shape(chunks, shape, transpose: bool, panel_bytes: int) -> tuple[int, int]:
    """Tile ``(rows, cols)`` of a matrix of ``shape`` whose stored weight has ``chunks`` (its transpose when
    ``transpose``): one chunk column wide, and as many whole chunk rows as ``panel_bytes`` float64 bytes hold (at
    least one); when one chunk is already larger than ``panel_bytes``, rows of one chunk cut to ``panel_bytes``
    (at least one row).  Tiles never straddle a chunk column."""
    a, b = (int(c) for c in chunks)
    cr, cc = (b, a) if transpose else (a, b)
    n, m = (int(x) for x in shape)
    cr, cc = max(1, min(cr, n)), max(1, min(cc, m))
    pb = int(panel_bytes)
    k = pb // (8 * cr * cc)
    if k >= 1:
        return min(n, k * cr), cc
    return max(1, min(cr, pb // (8 * cc))), cc


def _indices(idx, n: int) -> np.ndarray:
    """A slice, or an integer / boolean index array, as increasing-or-given integer positions in ``range(n)``."""
    if isinstance(idx, slice):
        return np.arange(*idx.indices(n), dtype=np.intp)
    a = np.asarray(idx)
    if a.dtype == bool:
        if a.shape != (n,):
            raise IndexError(f"boolean index of shape {a.shape} for an axis of length {n}")
        return np.flatnonzero(a)
    if a.ndim != 1 or not np.issubdtype(a.dtype, np.integer):
        raise IndexError("StoreMatrix takes slices or 1-d integer / boolean index arrays")
    return np.where(a < 0, a + n, a).astype(np.intp)


def store_tile_bytes(store_path: str, panel_bytes: int | None = None) -> int:
    """Largest tile :meth:`StoreMatrix.live_block` reads from the model store at ``store_path`` (float64 bytes, either
    orientation of every weight; ``panel_bytes`` as :class:`StoreMatrix`, default :data:`STREAM_PANEL_BYTES`)."""
    from .store_read import layer_arrays

    pb = STREAM_PANEL_BYTES if panel_bytes is None else int(panel_bytes)
    out = 0
    for w, _b in layer_arrays(store_path):
        shp = tuple(int(x) for x in w.shape)
        for tr in (False, True):
            r, c = _tile_shape(w.chunks, shp[::-1] if tr else shp, tr, pb)
            out = max(out, 8 * r * c)
    return int(out)
