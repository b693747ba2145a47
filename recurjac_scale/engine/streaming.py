"""Streaming weights: a chain whose matrices stay in the zarr model store and are read by each task.

For a network larger than a worker's memory, a worker does not hold the network: every chain matrix ``M_t`` (a
weight ``W`` or its transpose) is a :class:`StoreMatrix`, read from the model store when a task needs it and dropped
when the task ends.  The column panel ``M_t[:, cols]`` (a step's operand) reads only those columns.  A level of the
recursion reads ``np.asarray(M_s)[np.ix_(alive_up, alive)]`` (:mod:`recurjac_scale.jacobian.recurjac`, the only way
the step functions read a whole chain matrix); ``alive_up`` are the rows with ``du > 0`` of the chain level, known
when the chain is built.  So ``np.asarray(M_s)`` returns a lazily zeroed array (``np.zeros``: pages never written are
never allocated) in which only the live rows are filled, read from the store one row panel
(:data:`STREAM_PANEL_BYTES`) at a time: a task holds the live rows of one level (plus the method's compacted copy of
the live block), never a whole matrix, and never two levels' full matrices.  The price is reading the weights once
per task.

A chain level that runs sparse (a pruned layer, ``Chain.with_sparse``) holds a CSR copy instead, read by
:meth:`StoreMatrix.to_csr` once per worker process straight from the store's CSR arrays (``nnz`` entries, never the
dense matrix); its column panels are still read from the store per task.

The values are exactly those of the in-memory chain (same float64 numbers, C-contiguous arrays), so results are
bitwise those of the in-memory path.  Only the small matrix that carries the output selection ``C`` (``C W(H)``)
is computed and kept in memory, exactly as :meth:`Network.with_outputs` computes it.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

__all__ = ["StoreMatrix", "streamed_chain", "can_stream", "STREAM_PANEL_BYTES"]

STREAM_PANEL_BYTES = 32 * 2**20
"""Bytes of one row panel read from the store at a time by ``np.asarray`` of a :class:`StoreMatrix` (rounded to
whole rows, at least one row)."""


class StoreMatrix:
    """Layer ``k``'s weight of a model store (``transpose``: its transpose), read on demand as float64.

    Supports ``shape``, ``ndim``, ``M[rows, cols]`` with slices / integer arrays (reads only what is asked, every row
    exact) and ``np.asarray(M)``.  With ``live_rows`` (bool mask, length ``shape[0]``), ``np.asarray(M)`` holds the
    exact stored values in the live rows and zeros in the others (which the reader must not use: the recursion
    reads only ``M[alive_up][:, alive]`` with ``alive_up`` = the live rows); it is filled one row panel at a time
    (``panel_bytes``, default :data:`STREAM_PANEL_BYTES`) and its unwritten pages are never allocated.  Without
    ``live_rows`` every row is filled.  Picklable: it holds the store path, not the data.
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
        if not isinstance(idx, tuple):
            idx = (idx, slice(None))
        if len(idx) != 2:
            raise IndexError("StoreMatrix takes two indices")
        z = self._array()
        if self.transpose:
            a = _take(z, idx[1], idx[0]).T
        else:
            a = _take(z, idx[0], idx[1])
        return np.ascontiguousarray(a, dtype=np.float64)

    def panel_rows(self) -> int:
        """Rows of this matrix read from the store at a time by ``np.asarray``."""
        pb = STREAM_PANEL_BYTES if self.panel_bytes is None else self.panel_bytes
        return max(1, int(pb) // (8 * max(1, self.shape[1])))

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


def _take(z, rows, cols) -> np.ndarray:
    """``z[rows, cols]`` for slices or integer index arrays (zarr's orthogonal indexing)."""
    if isinstance(rows, slice) and isinstance(cols, slice):
        return np.asarray(z[rows, cols])
    return np.asarray(z.oindex[rows, cols])


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
