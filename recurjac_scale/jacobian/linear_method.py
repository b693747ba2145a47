"""The ``linear-jacobian`` method: the runner registered in :data:`recurjac_scale.jacobian.JACOBIAN_METHODS` and the
row norm bounds it gives :func:`recurjac_scale.lipschitz.lipschitz` (:attr:`JacobianMethod.row_norms`).

The propagation itself (relaxations, rounding allowances) is :mod:`recurjac_scale.jacobian.linear`.  The method
runs RecurJac-B (in memory) for the gradient bounds, bounds every Jacobian entry by :func:`~recurjac_scale.jacobian.
linear.entry_bounds` (intersected with RecurJac-B), and per output row bounds ``||J[i, :]||_q`` (``q`` = 1, 2) by
one linear objective (:func:`~recurjac_scale.jacobian.linear_rows.row_norm_upper`).  The engine runs it blockwise
(:mod:`.linear_blocks`, :mod:`recurjac_scale.engine.linear_stage`).
"""

from __future__ import annotations

import time
import weakref

import numpy as np

from .linear import entry_bounds, linear_context
from .linear_rows import result_rows, row_norm_upper, row_norms  # noqa: F401  (re-exported)

__all__ = ["run_linear_jacobian", "row_norm_upper", "row_norms", "result_rows", "result_context"]


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
        "sum lengths, plus an underflow term (recurjac_scale.jacobian.linear_passes); largest allowance relative to the "
        f"width of an entry the propagation tightened: {info['allowance']:.3g}"
    )
    if rj_lower.dtype != np.float64:
        lower, upper = _cast_outward(lower, upper, rj_lower.dtype)
    if own is not None:
        _remember(lower, (q, own))
    _CONTEXTS[id(lower)] = (weakref.ref(lower, lambda _r, key=id(lower): _CONTEXTS.pop(key, None)), (ctx, rows))
    return lower, upper, chain, states, info


_ROW_NORMS: dict = {}
"""``id(lower array of a result) -> (weakref, (q, row norm bounds))``: the chord row norms (:func:`row_norms`)
computed with the Jacobian bounds, for the Lipschitz constant of the same result (dropped with the array)."""


_CONTEXTS: dict = {}
"""``id(lower array of a result) -> (weakref, (LinearContext, rows))``: the propagation context and the tightened
row bounds of a float64 result, for follow-up objectives on the same result (:func:`result_context`)."""


def result_context(network, jac):
    """``(ctx, rows)`` of a ``linear-jacobian`` result (the :class:`LinearContext` and the tightened
    :class:`RowBounds` per output row): those of the run that made ``jac`` when still alive, else rebuilt
    (:func:`recurjac_scale.jacobian.linear_rows.result_rows`); ``None`` when the propagation does not apply."""
    hit = _CONTEXTS.get(id(jac.lower))
    if hit is not None and hit[0]() is jac.lower:
        return hit[1]
    return result_rows(network, jac)


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


def _row_norms_linear(network, jac, q):
    """Row norm bounds for ``q`` in {1, 2} (:func:`row_norms`): those computed with the Jacobian bounds by
    :func:`run_linear_jacobian` when ``q`` matches, else computed here from the result (RecurJac-B's states are
    kept on it); ``None`` for other norms."""
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


def _register():
    from .linear_blocks import LINEAR_STAGE
    from .methods import JacobianMethod, register_jacobian_method
    from .recurjac import recurjac_step

    register_jacobian_method(
        JacobianMethod(
            "linear-jacobian", "backward", 0, recurjac_step, True,
            "linear bound propagation through the gradient graph (Shi et al. 2022 idea) on RecurJac-B's gradient "
            "bounds, intersected with RecurJac-B",
            run=run_linear_jacobian,
            row_norms=_row_norms_linear,
            stage=LINEAR_STAGE,
        )
    )


_register()


def runner_allowance(chain, final: dict, lower, upper, relative: float, cols=slice(None)) -> np.ndarray:
    """An upper estimate of the rounding allowance of ``linear-jacobian``'s bounds ``lower``, ``upper`` (the columns
    ``cols`` of the result), shape ``(m, n_cols)``: RecurJac-B's allowance (from its last state ``final``) on the
    entries where a side still is RecurJac-B's bound, and ``relative`` (the propagation's largest allowance
    relative to the width of an entry it tightened) times the width where a side was tightened; the larger of the
    two where both hold."""
    from .methods import get_jacobian_method

    base = get_jacobian_method("recurjac-b")
    lo_rj, up_rj = base.finish(chain, final)
    lo_rj, up_rj = np.asarray(lo_rj, np.float64)[:, cols], np.asarray(up_rj, np.float64)[:, cols]
    a_rj = np.asarray(base.finish_allowance(chain, final), np.float64)[:, cols]
    lo, up = np.asarray(lower, np.float64), np.asarray(upper, np.float64)
    kept = (lo <= lo_rj) | (up >= up_rj)
    tightened = (lo > lo_rj) | (up < up_rj)
    a = np.where(kept, a_rj, 0.0)
    rel = float(relative or 0.0)
    if rel > 0:
        with np.errstate(invalid="ignore", over="ignore"):
            w = up - lo
            a = np.maximum(a, np.where(tightened & np.isfinite(w), rel * w, 0.0))
    return a
