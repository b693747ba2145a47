"""The block functions of ``linear-jacobian``: what one task of the blockwise (engine) form computes.

:func:`~recurjac_scale.jacobian.linear_method.run_linear_jacobian` runs the method in memory as three loops per
output row ``i`` (:mod:`recurjac_scale.jacobian.linear`):

1. RecurJac-B, whose states bound the gradients ``g(k) = ∂f_i/∂h(k)`` (in the engine: its ordinary block steps);
2. the tightening of those bounds, top down (``k = H-3 .. 0``): every block of neurons ``r0:r1`` of layer ``k`` is
   bounded by objectives propagated from layer ``k + 1`` on the bounds of the layers above, already tightened
   (:func:`tighten_block`; the blocks of one layer are independent, the layers are not);
3. the Jacobian entries, in blocks of columns ``j0:j1`` on the fully tightened bounds, intersected with RecurJac-B
   (:func:`entry_block`; independent), and the row norm objective for the Lipschitz constant (:func:`row_norm`).

A task holds the :class:`~recurjac_scale.jacobian.linear.LinearContext` of the job (built once per worker process)
and rebuilds the row's :class:`~recurjac_scale.jacobian.linear.RowBounds` from RecurJac-B's states and the layers
already tightened (:func:`rebuild_row`) in exactly the order of the in-memory loop, so every block computes the
numbers the in-memory method computes for it; only the blocking of the GEMMs (their summation order) may differ.
These functions call the propagation of :mod:`recurjac_scale.jacobian.linear` and change none of it.

:data:`LINEAR_STAGE` describes this form to the engine (:attr:`recurjac_scale.jacobian.JacobianMethod.stage`): the
chain method it runs first, and what a task holds (:func:`context_bytes`, :func:`task_bytes`) for the memory plan.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .linear import OBJECTIVE_BLOCK, _unit
from .linear_planes import _v, layer_planes, row_bounds
from .linear_rows import row_norm as _row_norm
from .linear_stable import bound_gradient_variants

__all__ = [
    "LinearStage", "LINEAR_STAGE", "rebuild_row", "tightened_neurons", "tighten_block", "entry_block", "row_norm", "context_bytes",
    "collapse_bytes", "task_bytes",
]


def rebuild_row(ctx, i: int, gl: list, gu: list, g0: list, tightened: dict, planes: str = "auto"):
    """The :class:`RowBounds` of output row ``i`` after the tightening of the layers in ``tightened``.

    Parameters
    ----------
    ctx : LinearContext
    i : int
        Output row.
    gl, gu : list of ndarray
        RecurJac-B's bounds of ``g(k)``, ``k = 0..H-2`` (shape ``(d_k,)`` each).
    g0 : list of ndarray
        The gradient at the centre (:func:`~recurjac_scale.jacobian.linear.centre_gradients_ctx`, row ``i``).
    tightened : dict
        ``k -> (lower, upper)``: the tightened bounds of layers ``k = H-3 .. k_min`` (every layer above the lowest
        one given).

    Returns
    -------
    RowBounds
        As :func:`~recurjac_scale.jacobian.linear.tighten_gradient_bounds` leaves it after layer ``k_min`` (the
        underflow allowance is that of RecurJac-B's bounds, as there).
    """
    rb = row_bounds(ctx, i, gl, gu, g0, planes)
    for k in sorted(tightened, reverse=True):
        lo, up = tightened[k]
        rb.gl[k], rb.gu[k] = np.asarray(lo, np.float64), np.asarray(up, np.float64)
        rb.up[k], rb.lo[k], rb.ymax[k] = layer_planes(ctx, k, rb.gl[k], rb.gu[k], rb.g0[k], rb.planes)
        if k >= 1:
            rb.v[k - 1] = _v(ctx, rb.ymax[k], k - 1)
    return rb


def tightened_neurons(dl: np.ndarray, du: np.ndarray) -> np.ndarray:
    """The neurons of a hidden layer (derivative bounds ``dl``, ``du``) whose gradient bounds
    :func:`~recurjac_scale.jacobian.linear.tighten_gradient_bounds` tightens: those with ``dl < du`` (elsewhere
    every plane is exact whatever the bounds of ``g``)."""
    return np.flatnonzero(np.asarray(dl) < np.asarray(du))


def tighten_block(ctx, rb, k: int, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Tightened bounds of ``g_r(k)`` for the neurons ``r`` in ``idx`` (one block of the loop of
    :func:`~recurjac_scale.jacobian.linear.tighten_gradient_bounds`, a slice of :func:`tightened_neurons`):
    ``g_r(k)`` bounded by :func:`~recurjac_scale.jacobian.linear_stable.bound_gradient_variants` (every slope
    variant, the smallest), intersected with ``rb``'s current bounds.  ``rb`` must hold the tightened layers above
    ``k`` (:func:`rebuild_row`).

    Returns
    -------
    lower, upper : ndarray, shape (idx.size,)
    """
    idx = np.asarray(idx, dtype=np.int64)
    ub = bound_gradient_variants(ctx, rb, k, unit=_unit(idx)).min(axis=0)
    nb = idx.size
    return np.maximum(rb.gl[k][idx], -ub[nb:]), np.minimum(rb.gu[k][idx], ub[:nb])


def entry_block(ctx, rb, j0: int, j1: int, rj_lower: np.ndarray, rj_upper: np.ndarray):
    """Bounds of the Jacobian entries ``J[i, j0:j1]`` of the row of ``rb`` (fully tightened), intersected with
    RecurJac-B's (one block of the loop of :func:`~recurjac_scale.jacobian.linear.entry_bounds`).

    Parameters
    ----------
    rj_lower, rj_upper : ndarray, shape (j1 - j0,)
        RecurJac-B's bounds of these entries.

    Returns
    -------
    lower, upper : ndarray, shape (j1 - j0,)
    worst : float
        The largest rounding allowance relative to the width of an entry the propagation tightened (0 if none).
    """
    errs: list = []
    ubs = bound_gradient_variants(ctx, rb, -1, unit=_unit(np.arange(j0, j1)), allowance=errs)
    ub = ubs.min(axis=0)
    nb = j1 - j0
    win = np.argmin(ubs, axis=0)
    err = np.stack(errs)[win, np.arange(ub.size)]
    lower = np.array(rj_lower, dtype=np.float64, copy=True)
    upper = np.array(rj_upper, dtype=np.float64, copy=True)
    won_up = ub[:nb] < upper
    won_lo = -ub[nb:] > lower
    upper = np.minimum(upper, ub[:nb])
    lower = np.maximum(lower, -ub[nb:])
    width = upper - lower
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.concatenate([np.where(won_up, err[:nb] / width, 0.0), np.where(won_lo, err[nb:] / width, 0.0)])
    rel = rel[np.isfinite(rel)]
    return lower, upper, float(rel.max()) if rel.size else 0.0


def row_norm(ctx, rb, lower: np.ndarray, upper: np.ndarray, q: float) -> float:
    """Certified upper bound of ``max_{x in S} ||J[i, :](x)||_q`` of the row of ``rb`` (``q`` in {1, 2}), as
    :func:`~recurjac_scale.jacobian.linear_rows.row_norms` computes it
    (:func:`~recurjac_scale.jacobian.linear_rows.row_norm`)."""
    return _row_norm(ctx, rb, lower, upper, q)


# -- sizes, for the engine's memory plan ---------------------------------------------------------------------------


def context_bytes(widths, derivative_bounds=None, activations=None) -> int:
    """An upper estimate of the :class:`LinearContext` of a network with widths ``(n_0, ..., n_H)`` (float64):
    the weights, their absolute values and the compacted copies (at most the weights again), the per-neuron
    vectors (about 30 per hidden neuron), and the maps through the exact neurons (:func:`collapse_bytes`)."""
    w = sum(int(a) * int(b) for a, b in zip(widths[:-1], widths[1:]))
    hidden = sum(int(d) for d in widths[1:-1])
    return 8 * (3 * w + 30 * hidden + 4 * int(widths[0])) + collapse_bytes(widths, derivative_bounds, activations)


def collapse_bytes(widths, derivative_bounds=None, activations=None) -> int:
    """An upper estimate of the maps :func:`~recurjac_scale.jacobian.linear_stable.stable_collapse` keeps for a
    network with widths ``(n_0, ..., n_H)``, from each hidden layer's derivative bounds ``(dl, du)`` (``None``: every
    neuron counted as live and exact).

    A neuron is live unless it is a dead ReLU (``dl = du = 0``: zero output, dropped); at most the live neurons
    with ``dl = du`` are exact.  With ``L_k`` live and ``E_k`` exact neurons in hidden layer ``k`` (``E_k`` bounds the
    real count, so a chain that stops at a layer with ``E_k = 0`` here stops there in the real maps too), and ``r_i``
    rows per source (``n_0`` for the Jacobian row, ``L_i`` for hidden layer ``i``): ``C(t, i)`` (``L_t x L_i``) for
    ``i = t-1`` down to the first layer with no exact neuron, ``R(t)`` (``L_t x n_0``) when no layer below ``t``
    stops the chain; per source, ``Up`` and its absolute values (``2 r_i L_s``) and the steps' absolute factors
    (``r_i E_s``) for ``s = i+1`` up to the first stop, ``Top`` (``r_i n_H``); the per-neuron vectors
    (relaxations, constants, allowances) ``12 sum L + 4 n_0``."""
    n0, m = int(widths[0]), int(widths[-1])
    hid = [int(d) for d in widths[1:-1]]
    live, exact = list(hid), list(hid)
    if derivative_bounds is not None:
        for k, (dl, du) in enumerate(derivative_bounds[: len(hid)]):
            dl, du = np.asarray(dl), np.asarray(du)
            eq = dl == du
            dead = int(np.count_nonzero(eq & (du == 0))) if (
                activations is not None and getattr(activations[k], "name", None) == "relu") else 0
            live[k] = hid[k] - dead
            exact[k] = int(np.count_nonzero(eq)) - dead
    H1 = len(live)
    n = 12 * sum(live) + 4 * n0
    for t in range(H1):  # pass 2: C(t, i) downward until a layer without exact neurons, then R(t)
        for i in range(t - 1, -1, -1):
            n += live[t] * live[i]
            if exact[i] == 0:
                break
        else:
            n += live[t] * n0
    for i in range(-1, H1):  # pass 1: per source, upward until a layer without exact neurons
        r = n0 if i == -1 else live[i]
        for s_ in range(i + 1, H1):
            n += 2 * r * live[s_]
            if exact[s_] == 0:
                break
            n += r * exact[s_]
        n += r * m
    return 8 * int(n)


def task_bytes(widths, block: int) -> int:
    """An upper estimate of what one task of :func:`tighten_block` / :func:`entry_block` allocates with ``block``
    neurons or columns: ``2 block`` objectives, and per objective the coefficients on every layer's
    pre-activations (kept for the network pass) and about 12 work arrays of the widest layer, times the slope
    variants whose results are held together (3), plus the row's planes (about 20 vectors per hidden neuron)."""
    K = 2 * int(block)
    hidden = sum(int(d) for d in widths[1:-1])
    widest = max(int(d) for d in widths[:-1])
    per_variant = K * (hidden + 12 * widest)
    return 8 * (per_variant + 3 * K * 4 + 20 * hidden + 2 * widest * int(block))


@dataclass(frozen=True)
class LinearStage:
    """The blockwise form of ``linear-jacobian`` for the engine (:mod:`recurjac_scale.engine.linear_stage` runs it).

    Attributes
    ----------
    base : str
        The chain method run first (its states bound the gradients).
    block : int
        Default neurons / columns per task of the second stage.
    """

    base: str = "recurjac-b"
    block: int = OBJECTIVE_BLOCK

    def context_bytes(self, widths, derivative_bounds=None, activations=None) -> int:
        return context_bytes(widths, derivative_bounds, activations)

    def task_bytes(self, widths, block: int) -> int:
        return task_bytes(widths, block)

    def tightened_neurons(self, dl, du) -> np.ndarray:
        return tightened_neurons(dl, du)


LINEAR_STAGE = LinearStage()
"""The stage description registered with ``linear-jacobian`` (:attr:`JacobianMethod.stage`)."""
