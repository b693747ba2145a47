"""Certified bounds of the row norms ``max_{x in S} ||J[i, :](x)||_q`` (``q`` = 1, 2) of a ``linear-jacobian``
result: one linear objective per output row through the chords of ``|J|`` (``q = 1``) or ``J^2`` (``q = 2``) over the
entry bounds, propagated by :mod:`recurjac_scale.jacobian.linear`.  Used by the method's runner
(:mod:`.linear_method`) and by the optional slope optimisation (:mod:`.linear_opt`)."""

from __future__ import annotations

import math

import numpy as np

from .._fp import TINY, gamma
from .linear import (
    LinearContext,
    RowBounds,
    centre_gradients_ctx,
    linear_context,
    row_bounds,
    tighten_gradient_bounds,
)
from .linear_stable import bound_gradient_variants

__all__ = ["row_norm_upper", "chord_norms", "sign_group_norm", "row_norm", "row_norms", "result_rows", "SIGN_GROUP"]

_U = np.finfo(np.float64).eps / 2


def row_norm_upper(ctx: LinearContext, rb: RowBounds, lower: np.ndarray, upper: np.ndarray, q: float,
                   slopes=None, alpha=None, mask=None) -> float:
    """Certified upper bound of ``max_{x in S} ||J[i, :](x)||_q`` for one output row from one linear objective
    (``q`` = 1 or 2).

    ``q = 1``: each ``|J_j|`` is bounded above on its certified interval ``[l_j, u_j]`` by its chord
    ``alpha_j J_j + beta_j`` (``alpha = (u + l) / (u - l)``, ``beta = -2 u l / (u - l)``; ``alpha = sign`` where the
    sign is known).  ``q = 2``: ``J_j^2 <= (l_j + u_j) J_j - l_j u_j``.  The sum is the objective ``alpha · J[i, :]``
    (bounded by :func:`~.linear_stable.bound_gradient_variants`, ``i0 = -1``) plus ``sum beta``: the entries stay
    correlated, unlike the sum of per-entry maxima.  Rounding: ``|J_j|`` (or ``J_j^2``) exceeds the computed chord by at
    most ``16 u (|alpha| M_j + |beta_j|)``, and the final sums and the square root are rounded up.

    Parameters
    ----------
    lower, upper : ndarray, shape (n_0,)
        Certified bounds of the row's Jacobian entries.
    q : {1, 2}
    alpha : ndarray, shape (n_0,), optional
        Other slopes (``q = 1``: clipped into ``[-1, 1]``): ``beta`` is then the maximum of ``|J| - alpha J``
        (``J^2 - alpha J``), a convex function, over the two end points.
    mask : ndarray of bool, shape (n_0,), optional
        Only these coordinates (the bound of ``sum_{j in mask} |J_j|^q``, before the root).
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
        alpha, beta = _abs_chord(l, u)
    elif q == 2.0:
        alpha = l + u
        beta = -(l * u)
    else:
        raise ValueError(f"q={q!r}; accepted: 1, 2")
    if mask is not None:
        alpha, beta, M = (np.where(mask, a, 0.0) for a in (alpha, beta, M))
    if not (np.isfinite(alpha).all() and np.isfinite(beta).all() and np.isfinite(M).all()):
        return math.inf
    c_err = 16 * _U * (np.abs(alpha) * M + np.abs(beta))
    n0 = l.size
    key = next(iter(ctx.variants)) if slopes is None else slopes
    ub = float(bound_gradient_variants(ctx, rb, -1, c=alpha[None, :], variants=(key,))[0, 0])
    rest = float(np.sum(beta + c_err)) + gamma(n0 + 2) * float(np.sum(np.abs(beta) + c_err))
    total = ub + rest
    total = total + gamma(4) * (abs(ub) + abs(rest)) + TINY
    if q == 2.0:
        return math.sqrt(max(total, 0.0)) * (1.0 + 4 * _U) + TINY
    return total


SIGN_GROUP = 2
"""Coordinates per group of :func:`sign_group_norm` (``2 ** SIGN_GROUP`` objectives per group; 0 switches it off)."""

SIGN_VARIANTS = ("constant",)
"""The slope variants (:data:`recurjac_scale.jacobian.linear.SLOPE_VARIANTS`) that bound the objectives of
:func:`sign_group_norm` (those of the context that are listed; all when none is): the constant lines of ``sigma'``
put no coefficient on any pre-activation, so these objectives need no network pass, and they were as tight as the
others within 0.5% on the benchmark networks."""

SIGN_SHARE = 1.0
"""At most ``max(SIGN_SHARE n_0, SIGN_MIN)`` objectives in :func:`sign_group_norm` (its cost against the entries'
``2 n_0``): the coordinates with the largest chord gaps are grouped, the others bounded together by the chord
objective of :func:`row_norm_upper`."""

SIGN_MIN = 256
"""See :data:`SIGN_SHARE` (small inputs: every coordinate in a group)."""

SIGN_BLOCK = 512
"""Objectives per call of the propagation in :func:`sign_group_norm`."""


def sign_group_norm(ctx: LinearContext, rb: RowBounds, lower: np.ndarray, upper: np.ndarray,
                    group: int | None = None) -> float:
    """Certified upper bound of ``max_{x in S} ||J[i, :](x)||_1`` by groups of coordinates with their signs
    enumerated.

    ``||J||_1 = sum_G sum_{j in G} |J_j|`` and ``sum_{j in G} |J_j| = max_{s in {-1, 1}^G} s · J_G``, so
    ``max_x ||J(x)||_1 <= sum_G max_s max_x s · J_G(x)``: each ``s · J_G`` is one objective of the propagation
    (:func:`~.linear_stable.bound_gradient_variants`; the coordinates of a group stay correlated through ``x``,
    which the chords of :func:`row_norm_upper` lose where an entry's interval straddles 0), and each group's value
    is also at most ``sum_{j in G} max(|l_j|, |u_j|)``.  The coordinates are grouped in the order of their chord gaps
    (``-2 u l / (u - l)`` where the interval straddles 0), largest first; a last incomplete group is bounded by its
    entries.  At most ``max(SIGN_SHARE n_0, SIGN_MIN)`` objectives are used (:data:`SIGN_SHARE`), and the bound is the
    smallest of those with all these groups, with the first half of them and with none (the chords of
    :func:`row_norm_upper` alone): the coordinates left out of the groups are
    bounded together by their chords (:func:`row_norm_upper` on them).  Rounding: the final sum is rounded up with
    ``gamma(n_0 + 2)``.

    Parameters
    ----------
    lower, upper : ndarray, shape (n_0,)
        Certified bounds of the row's Jacobian entries.
    group : int, optional
        Coordinates per group (default :data:`SIGN_GROUP`).
    """
    g = SIGN_GROUP if group is None else int(group)
    l = np.asarray(lower, np.float64)
    u = np.asarray(upper, np.float64)
    M = np.maximum(np.abs(l), np.abs(u))
    if not np.isfinite(M).all():
        return math.inf
    n = l.size
    w = u - l
    with np.errstate(divide="ignore", invalid="ignore"):
        gap = np.where((l < 0) & (u > 0), -2.0 * u * l / np.where(w > 0, w, 1.0), 0.0)
    order = np.argsort(-gap, kind="stable")
    ng = min(n // g, max(int(SIGN_SHARE * n), SIGN_MIN) // 2 ** g) if g >= 2 else 0
    g = max(g, 1)
    G = order[: ng * g].reshape(ng, g)
    S = np.array([[1.0 - 2.0 * ((b >> j) & 1) for j in range(g)] for b in range(2 ** g)])  # (2^g, g)
    idx = np.repeat(G, S.shape[0], axis=0)
    sign = np.tile(S, (ng, 1))
    variants = tuple(v for v in ctx.variants if v in SIGN_VARIANTS) or None
    ub = np.empty(idx.shape[0])
    for b0 in range(0, idx.shape[0], SIGN_BLOCK):
        b1 = min(idx.shape[0], b0 + SIGN_BLOCK)
        ub[b0:b1] = bound_gradient_variants(ctx, rb, -1, unit=(idx[b0:b1], sign[b0:b1]), variants=variants).min(axis=0)
    per = np.minimum(ub.reshape(ng, S.shape[0]).max(axis=1) if ng else np.zeros(0),
                     M[G].sum(axis=1) * (1.0 + gamma(g + 2)))
    cuts = sorted({ng, ng // 2, 0})  # the first k groups (same objectives), the others by their chords
    masks = []
    for k in cuts:
        mask = np.zeros(n, dtype=bool)
        mask[order[k * g:]] = True
        masks.append(mask)
    chords = chord_norms(ctx, rb, l, u, masks)
    best = math.inf
    for k, mask, r in zip(cuts, masks, chords):
        rest = order[k * g:]
        r = min(r, float(np.sum(M[rest])) * (1.0 + gamma(rest.size + 2)) + TINY)
        terms = np.concatenate([per[:k], [r]])
        if np.isfinite(terms).all():
            best = min(best, float(np.sum(terms)) + gamma(n + 2) * float(np.sum(np.abs(terms))) + TINY)
    return best


def chord_norms(ctx: LinearContext, rb: RowBounds, lower: np.ndarray, upper: np.ndarray, masks: list) -> list:
    """:func:`row_norm_upper` (``q = 1``, the smallest over the slope variants, each run) of
    ``sum_{j in mask} |J_j|`` for every mask, all bounded in one call of the propagation."""
    l = np.asarray(lower, np.float64)
    u = np.asarray(upper, np.float64)
    M = np.maximum(np.abs(l), np.abs(u))
    alpha, beta = _abs_chord(l, u)
    if not (np.isfinite(alpha).all() and np.isfinite(beta).all() and np.isfinite(M).all()):
        return [math.inf] * len(masks)
    n0 = l.size
    C = np.stack([np.where(m, alpha, 0.0) for m in masks])
    ub = bound_gradient_variants(ctx, rb, -1, c=C, adaptive=False)  # (V, len(masks))
    out = []
    for q, m in enumerate(masks):
        a, b, Mm = (np.where(m, v, 0.0) for v in (alpha, beta, M))
        c_err = 16 * _U * (np.abs(a) * Mm + np.abs(b))
        rest = float(np.sum(b + c_err)) + gamma(n0 + 2) * float(np.sum(np.abs(b) + c_err))
        tot = [float(x) + rest + gamma(4) * (abs(float(x)) + abs(rest)) + TINY for x in ub[:, q]]
        out.append(min(tot))
    return out


def row_norm(ctx: LinearContext, rb: RowBounds, lower: np.ndarray, upper: np.ndarray, q: float) -> float:
    """The row's best certified bound of ``max_{x in S} ||J[i, :](x)||_q`` (``q`` in {1, 2}): the smallest
    :func:`row_norm_upper` over the slope variants, for ``q = 1`` through :func:`sign_group_norm` (which includes
    it)."""
    if q == 1.0:
        return sign_group_norm(ctx, rb, lower, upper)  # the chords of every coordinate included
    return min(row_norm_upper(ctx, rb, lower, upper, q, v) for v in ctx.variants)


def row_norms(ctx: LinearContext, rows: list, lower: np.ndarray, upper: np.ndarray, q: float) -> np.ndarray | None:
    """Per output row, :func:`row_norm` (``None`` unless q is 1 or 2)."""
    if q not in (1.0, 2.0):
        return None
    return np.array([row_norm(ctx, rb, lower[i], upper[i], q) for i, rb in enumerate(rows)])


# -- registration ------------------------------------------------------------------------------------------------


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


def _abs_chord(l: np.ndarray, u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The chord of ``|J|`` over ``[l, u]`` per entry: ``|J| <= alpha J + beta`` (``alpha = sign`` where the sign is
    fixed, else ``(u + l) / (u - l)`` and ``beta = -2 u l / (u - l)``), slopes clipped to [-1, 1], ``beta >= 0``."""
    w = u - l
    with np.errstate(divide="ignore", invalid="ignore"):
        alpha = np.where(l >= 0, 1.0, np.where(u <= 0, -1.0, (u + l) / np.where(w > 0, w, 1.0)))
        beta = np.where((l < 0) & (u > 0), -2.0 * u * l / np.where(w > 0, w, 1.0), 0.0)
    return np.clip(alpha, -1.0, 1.0), np.maximum(beta, 0.0)
