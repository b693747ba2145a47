"""Streaming weights: a chain whose matrices stay in the zarr model store and are read by each task.

For a network larger than a worker's memory, a worker does not hold the network: every chain matrix ``M_t`` (a
weight ``W`` or its transpose) is a :class:`StoreMatrix`, read from the model store when a task needs it (the column
panel ``M_t[:, cols]`` reads only those columns, i.e. chunk by chunk; a level of the recursion reads the whole
matrix) and dropped when the task ends.  A task then holds at most the weights of one level at a time (plus the
method's working copy of it), instead of the whole network per worker; the price is reading the weights once per
task.

The values are exactly those of the in-memory chain (same float64 numbers, C-contiguous arrays), so results are
bitwise those of the in-memory path.  Only the small matrix that carries the output selection ``C`` (``C W(H)``)
is computed and kept in memory, exactly as :meth:`Network.with_outputs` computes it.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

__all__ = ["StoreMatrix", "streamed_chain", "can_stream"]


class StoreMatrix:
    """Layer ``k``'s weight of a model store (``transpose``: its transpose), read on demand as float64.

    Supports ``shape``, ``ndim``, ``M[rows, cols]`` with slices / integer arrays (reads only what is asked) and
    ``np.asarray(M)`` (reads everything).  Picklable: it holds the store path, not the data.
    """

    def __init__(self, store_path: str, k: int, transpose: bool, shape: tuple[int, int]):
        self.store_path = str(store_path)
        self.k = int(k)
        self.transpose = bool(transpose)
        self.shape = tuple(int(s) for s in shape)
        self.ndim = 2
        self.dtype = np.dtype(np.float64)
        self._z = None
        self._lock = threading.Lock()

    def __getstate__(self):
        return {"store_path": self.store_path, "k": self.k, "transpose": self.transpose, "shape": self.shape}

    def __setstate__(self, d):
        self.__init__(d["store_path"], d["k"], d["transpose"], d["shape"])

    def _array(self):
        if self._z is None:
            with self._lock:
                if self._z is None:
                    import zarr

                    g = zarr.open_group(self.store_path, mode="r", use_consolidated=False)
                    self._z = g[f"layers/{self.k}/weight"]
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

    def __array__(self, dtype=None, copy=None):
        a = self._array()[...]
        if self.transpose:
            a = a.T
        return np.ascontiguousarray(a, dtype=dtype or np.float64)

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


def streamed_chain(method, store_path: str, outputs, derivative_bounds) -> Any:
    """The chain of ``method`` (a :class:`~recurjac_scale.jacobian.JacobianMethod`) for the model store at
    ``store_path``, with :class:`StoreMatrix` matrices; mirrors :meth:`Chain.backward` / :meth:`Chain.forward`.

    Parameters
    ----------
    outputs : ndarray (m, n_H) or None
        The output selection folded into the last layer (kept in memory).
    derivative_bounds : list of (dl, du)
        Per hidden layer, float64, as computed in the client.
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

    def W(k, transpose=False):
        if k == H - 1:
            return np.ascontiguousarray(last.T) if transpose else last
        s = shapes[k]
        return StoreMatrix(store_path, k, transpose, (s[1], s[0]) if transpose else s)

    if method.direction == "backward":
        return Chain(
            top=W(H - 1),
            mats=tuple(W(k) for k in range(H - 2, -1, -1)),
            dl=tuple(db[k][0] for k in range(H - 2, -1, -1)),
            du=tuple(db[k][1] for k in range(H - 2, -1, -1)),
            direction="backward",
            names=tuple(f"hidden layer {k + 1}" for k in range(H - 2, -1, -1)),
        )
    if method.start == 1:
        return Chain(
            top=W(1, True),
            mats=tuple(W(k, True) for k in range(2, H)),
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
        mats=tuple(W(k, True) for k in range(1, H)),
        dl=tuple(db[k][0] for k in range(0, H - 1)),
        du=tuple(db[k][1] for k in range(0, H - 1)),
        direction="forward",
        names=tuple(f"hidden layer {k + 1}" for k in range(0, H - 1)),
    )
