"""Streaming weights: a chain whose matrices stay in the zarr model store and are read by each task.

For a network larger than a worker's memory, a worker does not hold the network: every chain matrix ``M_t`` (a
weight ``W`` or its transpose) is a :class:`StoreMatrix`, read from the model store when a task needs it and dropped
when the task ends.  The column panel ``M_t[:, cols]`` (a step's operand) reads only those columns.  A level of the
recursion needs the compacted live block ``M_s[alive_up][:, alive]`` (``alive_up``, ``alive``: the neurons with
``du > 0`` on both sides); :func:`recurjac_scale.jacobian.recurjac_levels._level_matrix` (the only way the step functions
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

What a streamed task holds is counted by the plan (:func:`recurjac_scale.engine.sizing._streamed_bytes` and
:meth:`recurjac_scale.jacobian.cost.ChainCost.level_bytes`); :func:`store_tile_bytes` gives the tile size it uses.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..network.store_matrix import STREAM_PANEL_BYTES, StoreMatrix, store_tile_bytes

__all__ = ["StoreMatrix", "streamed_chain", "can_stream", "store_tile_bytes", "STREAM_PANEL_BYTES"]

def can_stream(network) -> bool:
    """Streaming needs hidden layers and no output activation (whose selection would add a layer)."""
    return network.n_layers >= 2 and network.output_activation.is_identity


def streamed_chain(method, store_path: str, outputs, derivative_bounds, panel_bytes: int | None = None) -> Any:
    """The chain of ``method`` (a :class:`~recurjac_scale.jacobian.JacobianMethod`) for the model store at
    ``store_path``, with :class:`StoreMatrix` matrices; built by :meth:`Chain.from_layers` with :class:`StoreMatrix` level matrices.

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
    The index arithmetic is :meth:`Chain.from_layers`' (the same as the in-memory :meth:`Chain.backward` /
    :meth:`Chain.forward`); each chain matrix is given ``live_rows = du > 0`` of its level (the rows the recursion
    reads, ``alive_up`` of :func:`recurjac_scale.jacobian.recurjac.recurjac_step`).
    """
    import dask

    from ..jacobian.chain import Chain
    from ..network.model import _fold_rows
    from ..network.store_read import open_network

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

    return Chain.from_layers(H, db, W, direction=method.direction, start=method.start)
