"""The ``linear-jacobian`` method: the runner registered in :data:`recurjac_scale.jacobian.JACOBIAN_METHODS` and the
row norm bounds registered with :data:`recurjac_scale.lipschitz.ROW_NORM_METHODS`.

The propagation itself (relaxations, rounding allowances) is :mod:`recurjac_scale.jacobian.linear`.  The method
runs RecurJac-B (in memory) for the gradient bounds, bounds every Jacobian entry by :func:`~recurjac_scale.jacobian.
linear.entry_bounds` (intersected with RecurJac-B), and per output row bounds ``||J[i, :]||_q`` (``q`` = 1, 2) by
one linear objective (:func:`row_norm_upper`).  The engine does not run it (in memory only).
"""

from __future__ import annotations

import math
import time
import weakref

import numpy as np

from .._fp import TINY, gamma
from .linear import (
    LinearContext,
    RowBounds,
    bound_objectives,
    centre_gradients_ctx,
    entry_bounds,
    linear_context,
    row_bounds,
    tighten_gradient_bounds,
)

__all__ = ["run_linear_jacobian", "row_norm_upper", "row_norms", "result_rows"]

_U = np.finfo(np.float64).eps / 2


def run_linear_jacobian(netc, region, layer_bounds, derivative_bounds, *, dtype=np.float64, panel=None,
                        sparse_threshold=None, stored_sparse=(), optimise_seconds: float = 0.0):
    """The whole ``linear-jacobian`` method in memory: RecurJac-B (its states are the gradient bounds), then the
    propagation of every entry's objectives (:func:`entry_bounds`), then the row norm bounds for the region's
    dual norm (:func:`row_norms`; optimised for ``optimise_seconds`` per row when positive,
    :func:`recurjac_scale.jacobian.linear_opt.optimise_row_norm`), kept for the Lipschitz constant.

    Returns
    -------
    lower, upper : ndarray, shape (m, n_0)
    chain, states
        RecurJac-B's chain and states (for follow-up computations).
    info : dict
        ``recurjac_s``, ``linear_s`` (seconds), ``allowance`` (largest rounding allowance relative to the width of
        an entry the propagation tightened), ``rounding`` (the note for the result), ``linear`` (whether the
        propagation ran: not for unbounded regions or networks without hidden layers).
    """
    from .chain import DEFAULT_PANEL, sparse_chain
    from .driver import run_chain
    from .methods import get_jacobian_method

    jm = get_jacobian_method("recurjac-b")
    t0 = time.perf_counter()
    chain = jm.build_chain(netc, derivative_bounds, dtype=dtype, panel=DEFAULT_PANEL if panel is None else panel)
    chain = sparse_chain(chain, sparse_threshold, stored_sparse)
    rj_lower, rj_upper, states = run_chain(jm, chain, keep_states=True)
    t1 = time.perf_counter()
    info = {"recurjac_s": t1 - t0, "linear_s": 0.0, "linear": False, "allowance": 0.0}
    if netc.n_layers < 2:
        return rj_lower, rj_upper, chain, states, info
    # overflow makes values infinite (bound_objectives turns NaN into +inf): sound, and intersected with RecurJac
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        ctx = linear_context(netc, region, layer_bounds, derivative_bounds)
        if ctx is None:
            return rj_lower, rj_upper, chain, states, info
        lower, upper, allowance, rows = entry_bounds(ctx, states, rj_lower, rj_upper)
        info["allowance"] = allowance
        q = region.q
        own = row_norms(ctx, rows, lower, upper, q)
        if own is not None and optimise_seconds > 0:
            from .linear_opt import optimise_row_norm

            t2 = time.perf_counter()
            own = np.array([min(own[i], optimise_row_norm(ctx, rb, lower[i], upper[i], q, netc.activations,
                                                           seconds=optimise_seconds))
                            for i, rb in enumerate(rows)])
            info["optimise_s"] = time.perf_counter() - t2
    info.update(linear_s=time.perf_counter() - t1, linear=True)
    info["rounding"] = (
        "RecurJac-B's allowance (recurjac_scale.jacobian.chain) and, for the linear propagation, float64 with an "
        "allowance per objective: |coefficients| times the magnitudes of the variables they multiply, gamma of the "
        "sum lengths, plus an underflow term (recurjac_scale.jacobian.linear); largest allowance relative to the "
        f"width of an entry the propagation tightened: {info['allowance']:.3g}"
    )
    if rj_lower.dtype != np.float64:
        lower, upper = _cast_outward(lower, upper, rj_lower.dtype)
    if own is not None:
        _remember(lower, (q, own))
    return lower, upper, chain, states, info


_ROW_NORMS: dict = {}
"""``id(lower array of a result) -> (weakref, (q, row norm bounds))``: the chord row norms (:func:`row_norms`)
computed with the Jacobian bounds, for the Lipschitz constant of the same result (dropped with the array)."""


def _remember(arr: np.ndarray, value: np.ndarray) -> None:
    key = id(arr)
    _ROW_NORMS[key] = (weakref.ref(arr, lambda _r, key=key: _ROW_NORMS.pop(key, None)), value)


def _recall(arr) -> np.ndarray | None:
    hit = _ROW_NORMS.get(id(arr))
    return hit[1] if hit is not None and hit[0]() is arr else None


def _cast_outward(lower, upper, dtype):
    """float64 bounds as ``dtype`` bounds (lower rounded down, upper up)."""
    lo = lower.astype(dtype)
    hi = upper.astype(dtype)
    lo = np.where(lo.astype(np.float64) > lower, np.nextafter(lo, np.asarray(-np.inf, dtype)), lo)
    hi = np.where(hi.astype(np.float64) < upper, np.nextafter(hi, np.asarray(np.inf, dtype)), hi)
    return lo, hi


def row_norm_upper(ctx: LinearContext, rb: RowBounds, lower: np.ndarray, upper: np.ndarray, q: float,
                   slopes=None, alpha=None) -> float:
    """Certified upper bound of ``max_{x in S} ||J[i, :](x)||_q`` for one output row from one linear objective
    (``q`` = 1 or 2).

    ``q = 1``: each ``|J_j|`` is bounded above on its certified interval ``[l_j, u_j]`` by its chord
    ``alpha_j J_j + beta_j`` (``alpha = (u + l) / (u - l)``, ``beta = -2 u l / (u - l)``; ``alpha = sign`` where the
    sign is known).  ``q = 2``: ``J_j^2 <= (l_j + u_j) J_j - l_j u_j``.  The sum is ``y(0) · (W[0] alpha) + sum
    beta``, one objective bounded by :func:`bound_objectives`: the entries stay correlated, unlike the sum of
    per-entry maxima.  Rounding: ``|J_j|`` (or ``J_j^2``) exceeds the computed chord by at most
    ``16 u (|alpha| M_j + |beta_j|)``, ``W[0] alpha`` errs by at most ``gamma(n_0 + 2) |W[0]| |alpha|`` (times
    ``ymax(0)``), and the final sums and the square root are rounded up.

    Parameters
    ----------
    lower, upper : ndarray, shape (n_0,)
        Certified bounds of the row's Jacobian entries.
    q : {1, 2}
    alpha : ndarray, shape (n_0,), optional
        Other slopes (``q = 1``: clipped into ``[-1, 1]``): ``beta`` is then the maximum of ``|J| - alpha J``
        (``J^2 - alpha J``), a convex function, over the two end points.
    """
    l = np.asarray(lower, np.float64)
    u = np.asarray(upper, np.float64)
    M = np.maximum(np.abs(l), np.abs(u))
    if alpha is not None:
        alpha = np.asarray(alpha, np.float64)
        if q == 1.0:
            alpha = np.clip(alpha, -1.0, 1.0)
            beta = np.maximum(np.abs(l) - alpha * l, np.abs(u) - alpha * u)
        elif q == 2.0:
            beta = np.maximum(l * l - alpha * l, u * u - alpha * u)
        else:
            raise ValueError(f"q={q!r}; accepted: 1, 2")
    elif q == 1.0:
        w = u - l
        with np.errstate(divide="ignore", invalid="ignore"):
            alpha = np.where(l >= 0, 1.0, np.where(u <= 0, -1.0, (u + l) / np.where(w > 0, w, 1.0)))
            beta = np.where((l < 0) & (u > 0), -2.0 * u * l / np.where(w > 0, w, 1.0), 0.0)
        alpha = np.clip(alpha, -1.0, 1.0)
        beta = np.maximum(beta, 0.0)
    elif q == 2.0:
        alpha = l + u
        beta = -(l * u)
    else:
        raise ValueError(f"q={q!r}; accepted: 1, 2")
    if not (np.isfinite(alpha).all() and np.isfinite(beta).all() and np.isfinite(M).all()):
        return math.inf
    c_err = 16 * _U * (np.abs(alpha) * M + np.abs(beta))
    n0 = l.size
    lam = ctx.W[0] @ alpha  # (d_0,)
    lam_err = gamma(n0 + 2) * ((ctx.absW[0] @ np.abs(alpha)) @ rb.ymax[0])
    ub = float(bound_objectives(ctx, rb, lam[None, :], 0, slopes)[0])
    rest = float(np.sum(beta + c_err)) + gamma(n0 + 2) * float(np.sum(np.abs(beta) + c_err))
    total = ub + rest + lam_err
    total = total + gamma(4) * (abs(ub) + abs(rest) + lam_err) + TINY
    if q == 2.0:
        return math.sqrt(max(total, 0.0)) * (1.0 + 4 * _U) + TINY
    return total


def row_norms(ctx: LinearContext, rows: list, lower: np.ndarray, upper: np.ndarray, q: float) -> np.ndarray | None:
    """Per output row, the smallest :func:`row_norm_upper` over the slope variants (``None`` unless q is 1 or 2)."""
    if q not in (1.0, 2.0):
        return None
    return np.array([min(row_norm_upper(ctx, rb, lower[i], upper[i], q, v) for v in ctx.variants)
                     for i, rb in enumerate(rows)])


# -- registration ------------------------------------------------------------------------------------------------

def _register():
    from ..algorithm2 import register_row_norms
    from .methods import JacobianMethod, register_jacobian_method
    from .recurjac import recurjac_step

    register_jacobian_method(
        JacobianMethod(
            "linear-jacobian", "backward", 0, recurjac_step, True,
            "linear bound propagation through the gradient graph (Shi et al. 2022 idea) on RecurJac-B's gradient "
            "bounds, intersected with RecurJac-B; in memory only",
            run=run_linear_jacobian,
        )
    )
    @register_row_norms("linear-jacobian")
    def _row_norms_linear(network, jac, q):
        """Row norm bounds for ``q`` in {1, 2} (:func:`row_norms`): those computed with the Jacobian bounds by
        :func:`run_linear_jacobian` when ``q`` matches, else computed here from the result (RecurJac-B's states
        are kept on it)."""
        if q not in (1.0, 2.0):
            return None
        known = _recall(jac.lower)
        if known is not None and known[0] == q:
            return known[1]
        found = result_rows(network, jac)
        if found is None:
            return None
        ctx, rows = found
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            return row_norms(ctx, rows, np.asarray(jac.lower, np.float64), np.asarray(jac.upper, np.float64), q)


def result_rows(network, jac):
    """``(ctx, rows)`` of a ``linear-jacobian`` result (:class:`LinearContext` and the tightened
    :class:`RowBounds` per output row, rebuilt from the layer bounds and RecurJac-B's states kept on it), or ``None``
    when the propagation does not apply (no hidden layer, unbounded region, states not kept)."""
    from ..layer_bounds.base import Region
    from .chain import derivative_bounds_for

    netc = network.with_outputs(jac.outputs)
    if netc.n_layers < 2 or jac.states is None:
        return None
    region = Region.of(netc, jac.x0, jac.eps, jac.p)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        ctx = linear_context(netc, region, jac.layer_bounds, derivative_bounds_for(netc, jac.layer_bounds))
        if ctx is None:
            return None
        g0 = centre_gradients_ctx(ctx)
        H = ctx.H
        rows = []
        for i in range(jac.lower.shape[0]):
            gl = [np.asarray(jac.states[H - 2 - k]["lower"][i], np.float64) for k in range(H - 1)]
            gu = [np.asarray(jac.states[H - 2 - k]["upper"][i], np.float64) for k in range(H - 1)]
            rb = row_bounds(ctx, i, gl, gu, g0[i])
            tighten_gradient_bounds(ctx, rb)
            rows.append(rb)
    return ctx, rows


_register()
