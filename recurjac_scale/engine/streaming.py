"""Streaming weights: a chain whose matrices stay in the zarr model store and are read by each task.

For a network larger than a worker's memory, a worker does not hold the network: every chain matrix ``M_t`` (a
weight ``W`` or its transpose) is a :class:`StoreMatrix`, read from the model store when a task needs it and dropped
when the task ends.  The column panel ``M_t[:, cols]`` (a step's operand) reads only those columns.  A level of the
recursion needs the compacted live block ``M_s[alive_up][:, alive]`` (``alive_up``, ``alive``: the neurons with
``du > 0`` on both sides); :func:`recurjac_scale.jacobian.recurjac._level_matrix` (the only way the step functions
read a whole chain matrix) asks the matrix for it through :meth:`StoreMatrix.live_block`, which allocates the
compacted block and fills it one store tile at a time (a tile lies inside one chunk column of the zarr
array, at most :data:`STREAM_PANEL_BYTES` or one chunk): a task holds the live block of a level plus one tile and its selected part, never a
whole matrix and never a filled full-size copy.  The price is reading the weights once per task.

A chain level that runs sparse (a pruned layer, ``Chain.with_sparse``) holds a CSR copy instead, read by
:meth:`StoreMatrix.to_csr` once per worker process straight from the store's CSR arrays (``nnz`` entries, never the
dense matrix); its column panels are still read from the store per task.

The values are exactly those of the in-memory chain (same float64 numbers, converted to the chain's dtype element by
element, C-contiguous arrays of the same shape), so results are bitwise those of the in-memory path.  Only the small
matrix that carries the output selection ``C`` (``C W(H)``) is computed and kept in memory, exactly as
:meth:`Network.with_outputs` computes it.

What a streamed task holds is counted by the plan (:func:`recurjac_scale.engine.plan._streamed_bytes` and
:meth:`recurjac_scale.engine.blocks.ChainShape.level_bytes`); :func:`store_tile_bytes` gives the tile size it uses.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

__all__ = ["StoreMatrix", "streamed_chain", "can_stream", "store_tile_bytes", "STREAM_PANEL_BYTES"]

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
                    from ..network.store import layer_arrays

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

        from ..network.sparse import to_csr

        z = self._array()
        if hasattr(z, "csr"):  # a CSR layer of the store (recurjac_scale.network.store.CSRWeight)
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
    from ..network.store import layer_arrays

    pb = STREAM_PANEL_BYTES if panel_bytes is None else int(panel_bytes)
    out = 0
    for w, _b in layer_arrays(store_path):
        shp = tuple(int(x) for x in w.shape)
        for tr in (False, True):
            r, c = _tile_shape(w.chunks, shp[::-1] if tr else shp, tr, pb)
            out = max(out, 8 * r * c)
    return int(out)


def can_stream(network) -> bool:
    """Streaming needs hidden layers and no output activation (whose selection would add a layer)."""
    return network.n_layers >= 2 and network.output_activation.is_identity


def streamed_chain(method, store_path: str, outputs, derivative_bounds, panel_bytes: int | None = None) -> Any:
    """The chain of ``method`` (a :class:`~recurjac_scale.jacobian.JacobianMethod`) for the model store at
    ``store_path``, with :class:`StoreMatrix` matrices; mirrors :meth:`Chain.backward` / :meth:`Chain.forward`.

    Parameters
    ----------
    outputs : ndarray (m, n_H) or None
        The output selection folded into the last layer (kept in memory).
    derivative_bounds : list of (dl, du)
        Per hidden layer, float64, as computed in the client.
    panel_bytes : int, optional
        Row panel read at a time (default :data:`STREAM_PANEL_BYTES`).

    Notes
    -----
    ``mats[i]`` is given ``live_rows = du[i] > 0`` (its rows are the neurons of chain level ``i``): the rows the
    recursion reads (``alive_up`` of :func:`recurjac_scale.jacobian.recurjac.recurjac_step`).
    """
    import dask

    from ..jacobian.chain import Chain
    from ..network.model import _fold_rows
    from ..network.store import open_network

    with dask.config.set(scheduler="synchronous"):
        net = open_network(store_path)  # lazy: metadata only
        shapes = [tuple(int(s) for s in w.shape) for w in net.weights]
        H = len(shapes)
        w_last = np.asarray(net.weights[-1].compute(), dtype=np.float64)
    # the same correctly rounded fold as Network.with_outputs (bitwise equal to the in-memory chain)
    last = w_last if outputs is None else _fold_rows(np.asarray(outputs, dtype=np.float64), w_last)
    db = [(np.asarray(lo, np.float64), np.asarray(hi, np.float64)) for lo, hi in derivative_bounds]

    def W(k, transpose=False, live=None):
        if k == H - 1:
            return np.ascontiguousarray(last.T) if transpose else last
        s = shapes[k]
        return StoreMatrix(store_path, k, transpose, (s[1], s[0]) if transpose else s, live, panel_bytes)

    def live(k):  # the live neurons of hidden layer k + 1 (rows of the chain matrix on that level)
        return db[k][1] > 0

    if method.direction == "backward":
        return Chain(
            top=W(H - 1),
            mats=tuple(W(k, False, live(k)) for k in range(H - 2, -1, -1)),
            dl=tuple(db[k][0] for k in range(H - 2, -1, -1)),
            du=tuple(db[k][1] for k in range(H - 2, -1, -1)),
            direction="backward",
            names=tuple(f"hidden layer {k + 1}" for k in range(H - 2, -1, -1)),
        )
    if method.start == 1:
        return Chain(
            top=W(1, True),
            mats=tuple(W(k, True, live(k - 1)) for k in range(2, H)),
            dl=tuple(db[k][0] for k in range(1, H - 1)),
            du=tuple(db[k][1] for k in range(1, H - 1)),
            direction="forward",
            finish_mat=W(0),
            finish_dl=db[0][0],
            finish_du=db[0][1],
            names=tuple(f"hidden layer {k + 1}" for k in range(1, H - 1)),
        )
    return Chain(
        top=W(0, True),
        mats=tuple(W(k, True, live(k - 1)) for k in range(1, H)),
        dl=tuple(db[k][0] for k in range(0, H - 1)),
        du=tuple(db[k][1] for k in range(0, H - 1)),
        direction="forward",
        names=tuple(f"hidden layer {k + 1}" for k in range(0, H - 1)),
    )
