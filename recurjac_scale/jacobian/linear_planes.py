"""The planes of ``y = a g`` for one output row of the ``linear-jacobian`` propagation (:mod:`.linear`).

Per hidden layer ``k`` and neuron ``r``, ``y_r = a_r g_r`` with ``a_r = sigma_k'(z_r)`` in the certified derivative
bounds ``[dl_r, du_r]`` and ``g_r = ∂f_i/∂h_r(k)`` in the row's certified gradient bounds ``[gl_r, gu_r]``
(RecurJac-B's, possibly tightened by :func:`recurjac_scale.jacobian.linear.tighten_gradient_bounds`).  What is
certified: for every ``(a, g)`` in that box, ``lower(a, g) <= a g <= upper(a, g)`` for the planes that
:func:`layer_planes` returns (McCormick planes, or the chord planes of :func:`_chord_planes`, whose constants are
pushed outward by the rounding of their own evaluation), and ``|y(k)| <= ymax(k)`` (rounded up).  Which valid plane
is chosen only affects tightness.  :func:`row_bounds` collects them for a row in a :class:`~.linear_base.RowBounds`,
with the magnitudes the rounding allowances of :mod:`.linear_passes` need (``ymax``, ``v``, the underflow
allowance).
"""

from __future__ import annotations

import numpy as np

from .._fp import gamma
from .linear_base import LinearContext, RowBounds
from .linear_passes import _underflow

__all__ = ["PLANES", "layer_planes", "row_bounds"]

_U = np.finfo(np.float64).eps / 2


def _chord_planes(dl, du, l, u):
    """Planes of ``y = a g`` that ignore ``a``: ``min(dl g, du g) <= y <= max(dl g, du g)`` relaxed by the chords
    of these convex / concave functions of ``g`` on ``[l, u]``; returns ``(s_up, c_up, s_low, c_low)`` with
    ``s_low g + c_low <= a g <= s_up g + c_up`` for every ``a`` in ``[dl, du]``, ``g`` in ``[l, u]`` (the constants
    are the extremes of ``a g - s g`` over the four vertices, where a bilinear function attains them, pushed
    outward by the rounding of their evaluation)."""
    w = u - l
    ok = w > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        s_up = np.where(ok, (du * u - dl * l) / np.where(ok, w, 1.0), du)
        s_low = np.where(ok, (dl * u - du * l) / np.where(ok, w, 1.0), dl)
    gmax = np.maximum(np.abs(l), np.abs(u))
    vals_up = [a * g - s_up * g for a in (dl, du) for g in (l, u)]
    vals_low = [a * g - s_low * g for a in (dl, du) for g in (l, u)]
    c_up = np.maximum.reduce(vals_up) + 8 * _U * (du + np.abs(s_up)) * gmax
    c_low = np.minimum.reduce(vals_low) - 8 * _U * (du + np.abs(s_low)) * gmax
    return s_up, c_up, s_low, c_low


PLANES = ("auto", "mccormick")
"""Plane choices of :func:`row_bounds`."""


def layer_planes(ctx: LinearContext, k: int, l: np.ndarray, u: np.ndarray, g0: np.ndarray, planes: str = "auto"):
    """The planes of layer ``k`` for gradient bounds ``l <= ∂f_i/∂h(k) <= u`` (see :func:`row_bounds`): returns
    ``(upper, lower, ymax)``, each plane a tuple ``(coef_g, coef_a, const)`` of ``(d_k,)`` arrays and ``ymax`` a
    bound of ``|y(k)|``."""
    if planes not in PLANES:
        raise ValueError(f"planes={planes!r}; accepted: {', '.join(PLANES)}")
    dl, du, a0 = ctx.dl[k], ctx.du[k], ctx.a0[k]
    g = np.clip(g0, l, u)
    centre_up = (du - a0) * (g - l) <= (a0 - dl) * (u - g)
    m1 = np.maximum(du * u, dl * u) + np.maximum(l * dl, l * du) - du * l
    m2 = np.maximum(dl * u, dl * l) + np.maximum(u * dl, u * du) - dl * u
    tie = np.abs(m1 - m2) <= 1e-12 * (np.abs(m1) + np.abs(m2))
    p1 = np.where(tie, np.where(l >= 0, True, np.where(u <= 0, False, centre_up)), m1 < m2)
    cg, ca, cc = np.where(p1, du, dl), np.where(p1, l, u), -np.where(p1, du * l, dl * u)
    centre_lo = (a0 - dl) * (g - l) <= (du - a0) * (u - g)
    n1 = np.minimum(dl * l, dl * u) + np.minimum(l * dl, l * du) - dl * l
    n2 = np.minimum(du * l, du * u) + np.minimum(u * dl, u * du) - du * u
    tie = np.abs(n1 - n2) <= 1e-12 * (np.abs(n1) + np.abs(n2))
    l1 = np.where(tie, np.where(l >= 0, True, np.where(u <= 0, False, centre_lo)), n1 > n2)
    dg, da, dc = np.where(l1, dl, du), np.where(l1, l, u), -np.where(l1, dl * l, du * u)
    if planes == "auto":
        straddle = (l < 0) & (u > 0) & (dl < du)
        s_up, c_up, s_low, c_low = _chord_planes(dl, du, l, u)
        cg, ca, cc = np.where(straddle, s_up, cg), np.where(straddle, 0.0, ca), np.where(straddle, c_up, cc)
        dg, da, dc = np.where(straddle, s_low, dg), np.where(straddle, 0.0, da), np.where(straddle, c_low, dc)
    ymax = du * np.maximum(np.abs(l), np.abs(u)) * (1.0 + 4 * _U)
    return (cg, ca, cc), (dg, da, dc), ymax


def _v(ctx: LinearContext, ymax_next: np.ndarray, k: int) -> np.ndarray:
    """``|W[k+1]|^T ymax(k+1)`` rounded up: the magnitude of ``g(k)`` products (gradient-step allowance)."""
    return ctx.absW[k + 1].T @ ymax_next * (1.0 + gamma(ctx.W[k + 1].shape[0] + 2))


def row_bounds(ctx: LinearContext, i: int, gl: list, gu: list, g0: list, planes: str = "auto") -> RowBounds:
    """Plane choice for output row ``i`` from the gradient bounds and the gradient ``g0`` at the centre.

    Per neuron and side, one of the McCormick planes of ``y = a g`` (upper: ``P1 = du g + gl a - du gl``, exact on
    ``a = du`` or ``g = gl``; ``P2 = dl g + gu a - dl gu``; lower: ``L1 = dl g + gl a - dl gl``, ``L2 = du g + gu a -
    du gu``) or, with ``planes="auto"`` where ``g`` may take both signs, the chord plane of :func:`_chord_planes`
    (linear in ``g`` alone: RecurJac's interval value for the neuron, with ``g`` kept correlated).  A McCormick
    plane is chosen by its maximum (minimum) over the box; on ties (``g`` of known sign) the one that keeps ``g``
    with RecurJac's choice of derivative (``du`` for ``g >= 0`` upper, ...), else by the gap at the centre's
    ``(sigma'(z0), g0)``.  Each choice is a valid plane (only tightness depends on it).
    """
    H = ctx.H
    up, lo, ymax = [], [], []
    for k in range(H - 1):
        p_up, p_lo, ym = layer_planes(ctx, k, gl[k], gu[k], g0[k], planes)
        up.append(p_up)
        lo.append(p_lo)
        ymax.append(ym)
    v = [_v(ctx, ymax[k + 1], k) for k in range(H - 2)]
    rb = RowBounds(gl=list(gl), gu=list(gu), ymax=ymax, up=up, lo=lo, v=v, top=ctx.W[H - 1][i], g0=list(g0),
                   planes=planes, row=int(i))
    rb.under = _underflow(ctx, rb)
    return rb
