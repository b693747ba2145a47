"""Certified linear bounds of an activation's *derivative*: ``s_low z + t_low <= sigma'(z) <= s_up z + t_up``.

The linear-bound Jacobian method (:mod:`recurjac_scale.jacobian.linear`) turns a coefficient on ``sigma'(z)``
into a coefficient on ``z`` with these lines (the constant lines ``dl`` / ``du`` are always available too).  For
every neuron with a finite pre-activation interval ``[l, u]``:

- ReLU family (slope ``alpha`` for ``z < 0``, 1 for ``z >= 0``; both one-sided derivatives at 0): an unstable
  neuron (``l < 0 <= u``) has the upper lines ``1 + s z``, ``0 <= s <= (1 - alpha) / (-l)`` and the lower lines
  ``alpha + s z``, ``0 <= s <= (1 - alpha) / u`` (each is checked at ``l``, 0 and ``u``, where a line minus the
  step function attains its extremes); slopes are rounded toward zero, so the computed lines stay valid.
- smooth activations (sigmoid, tanh, arctan: ``sigma'`` is bell shaped; softplus: ``sigma' = sigmoid``; elu:
  ``alpha e^z`` then 1): the interval is cut at the inflection points of ``sigma'`` (and at 0 for elu) into
  pieces where ``sigma'`` is convex or concave; for a chosen slope the intercept is certified on every piece by
  :func:`recurjac_scale.relaxations.upper_intercept` / ``lower_intercept`` (end points on the convex
  side, a tangent bound on the concave side, outward rounding of every evaluation) and the maximum (minimum) over
  the pieces is taken.  The inflection points are float approximations: on the at most one-ulp sliver between
  the float and the real inflection point ``sigma'`` deviates from the assumed curvature by less than
  ``|sigma'''| ulp^3``, far below the absolute allowance :data:`INFLECTION_ERR` added to every intercept.
- hard-sigmoid: the constant lines only.

The slope of each line is a heuristic choice (any slope is sound): among the chord, the tangent at the centre's
pre-activation ``z0`` (clipped into ``[l, u]``) and the constant line, the one closest to ``sigma'(z0)`` at ``z0``.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

from ..activations import ELU, Activation, Arctan, HardSigmoid, Identity, LeakyReLU, Sigmoid, Softplus, Tanh
from ..relaxations import lower_intercept, upper_intercept

__all__ = ["derivative_lines", "relu_slope_ranges", "DERIVATIVE_SHAPES", "INFLECTION_ERR"]

INFLECTION_ERR = 1e-30
"""Absolute allowance added to every certified intercept of a smooth ``sigma'`` (float inflection points)."""

Fn = Callable[[np.ndarray], np.ndarray]


def _sig(z):
    return Sigmoid().value(z)


def _dsig(z):
    return Sigmoid().derivative(z)


def _d2sig(z):
    # sigma'' = sigma' (1 - 2 sigma) = -sigma' tanh(z / 2): no cancellation
    return -_dsig(z) * np.tanh(0.5 * np.asarray(z, np.float64))


def _dtanh(z):
    return Tanh().derivative(z)


def _d2tanh(z):
    return -2.0 * np.tanh(np.asarray(z, np.float64)) * _dtanh(z)


def _datan(z):
    return Arctan().derivative(z)


def _d2atan(z):
    z = np.asarray(z, np.float64)
    with np.errstate(over="ignore"):
        d = 1.0 + z * z
        return -2.0 * z / (d * d)


# Each shape: a list of pieces (lo, hi, f, df, convex) covering the real line; f = sigma' on the piece (its limit
# from inside at the ends), df = sigma''.  Bell-shaped derivatives: convex, concave, convex.
_C_SIG = math.log(2.0 + math.sqrt(3.0))
_C_TANH = math.atanh(1.0 / math.sqrt(3.0))
_C_ATAN = 1.0 / math.sqrt(3.0)


def _bell(c, f, df):
    return [(-math.inf, -c, f, df, True), (-c, c, f, df, False), (c, math.inf, f, df, True)]


def _elu_pieces(alpha: float):
    def f(z):
        return alpha * np.exp(np.minimum(np.asarray(z, np.float64), 0.0))

    def one(z):
        return np.ones_like(np.asarray(z, np.float64))

    def zero(z):
        return np.zeros_like(np.asarray(z, np.float64))

    return [(-math.inf, 0.0, f, f, True), (0.0, math.inf, one, zero, True)]


DERIVATIVE_SHAPES: dict[type, Callable[[Activation], list]] = {
    Sigmoid: lambda a: _bell(_C_SIG, _dsig, _d2sig),
    Tanh: lambda a: _bell(_C_TANH, _dtanh, _d2tanh),
    Arctan: lambda a: _bell(_C_ATAN, _datan, _d2atan),
    Softplus: lambda a: [(-math.inf, 0.0, _sig, _dsig, True), (0.0, math.inf, _sig, _dsig, False)],
    ELU: lambda a: _elu_pieces(float(a.alpha)),
}
"""Registry: activation class -> its piecewise convex / concave description of ``sigma'`` (smooth families)."""


def _toward_zero(s: np.ndarray) -> np.ndarray:
    """Round a non-negative computed slope down by two ulps (the exact quotient is then >= the float)."""
    s = np.nextafter(np.nextafter(s, 0.0), 0.0)
    return np.maximum(s, 0.0)


def relu_slope_ranges(alpha: float, l: np.ndarray, u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Largest certified slopes ``(s_up_max, s_low_max)`` of the ReLU-family lines (module docstring), shape
    ``(n,)``; 0 where the neuron is stable or the bound is unbounded."""
    unst = (l < 0) & (u >= 0) & np.isfinite(l) & np.isfinite(u)
    one_m = float(np.nextafter(1.0 - alpha, 0.0)) if alpha > 0 else 1.0  # <= 1 - alpha
    with np.errstate(divide="ignore", invalid="ignore"):
        s_up = np.where(unst, one_m / np.where(unst, -l, 1.0), 0.0)
        s_low = np.where(unst & (u > 0), one_m / np.where(u > 0, u, 1.0), 0.0)
    return _toward_zero(s_up), _toward_zero(s_low)


def _bisect_slope(df: Fn, a: np.ndarray, lo: np.ndarray, hi: np.ndarray, decreasing: bool, it: int = 40):
    """A point of ``[lo, hi]`` where the monotone ``df`` crosses ``a`` (approximately; only steers tightness)."""
    x0, x1 = lo.copy(), hi.copy()
    for _ in range(it):
        m = 0.5 * (x0 + x1)
        v = df(m)
        right = (v > a) if decreasing else (v < a)
        x0 = np.where(right, m, x0)
        x1 = np.where(right, x1, m)
    return 0.5 * (x0 + x1)


def _piecewise_intercepts(pieces, a, l, u):
    """Certified ``(t_low, t_up)`` with ``a z + t_low <= sigma'(z) <= a z + t_up`` on ``[l, u]`` (finite)."""
    t_up = np.full(l.shape, -np.inf)
    t_low = np.full(l.shape, np.inf)
    for plo, phi, f, df, convex in pieces:
        lo = np.maximum(l, plo)
        hi = np.minimum(u, phi)
        on = lo <= hi
        if not on.any():
            continue
        idx = np.flatnonzero(on)
        lo_i, hi_i, a_i = lo[idx], hi[idx], a[idx]
        if convex:
            # upper: end points; lower: tangent bound at the point where sigma'' = a (sigma'' increasing)
            zh = _bisect_slope(df, a_i, lo_i, hi_i, decreasing=False)
            bu = upper_intercept(f, df, a_i, lo_i, hi_i, hi_i, math.inf)
            bl = lower_intercept(f, df, a_i, lo_i, hi_i, zh, -math.inf)
        else:
            zh = _bisect_slope(df, a_i, lo_i, hi_i, decreasing=True)
            bu = upper_intercept(f, df, a_i, lo_i, hi_i, zh, -math.inf)
            bl = lower_intercept(f, df, a_i, lo_i, hi_i, lo_i, math.inf)
        t_up[idx] = np.maximum(t_up[idx], bu)
        t_low[idx] = np.minimum(t_low[idx], bl)
    return t_low - INFLECTION_ERR, t_up + INFLECTION_ERR


def _pick(cands, z0, fz0, upper: bool):
    """Per neuron, the candidate line ``(s, t)`` closest to ``sigma'(z0)`` at ``z0``."""
    best_s, best_t = cands[0]
    gap = np.abs(best_s * z0 + best_t - fz0)
    for s, t in cands[1:]:
        g = np.abs(s * z0 + t - fz0)
        g = np.where(np.isfinite(g), g, np.inf)
        take = g < gap
        best_s = np.where(take, s, best_s)
        best_t = np.where(take, t, best_t)
        gap = np.where(take, g, gap)
    return best_s, best_t


def derivative_lines(
    act: Activation, l, u, dl, du, z0, mode: str = "centre"
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Certified lines ``s_low z + t_low <= sigma'(z) <= s_up z + t_up`` for every real ``z`` in ``[l, u]``.

    Parameters
    ----------
    act : Activation
    l, u : ndarray, shape (n,)
        Certified pre-activation bounds (may be infinite: constant lines there).
    dl, du : ndarray, shape (n,)
        Certified derivative bounds on ``[l, u]`` (the constant lines).
    z0 : ndarray, shape (n,)
        The pre-activation at the centre (steers the choice of slopes only).
    mode : {"centre", "area", "constant"}
        Slope choice (any is sound): the line closest to ``sigma'`` at ``z0`` (``"centre"``); the line with the
        smaller area to ``sigma'`` (ReLU family: slope 0 or the largest slope, as CROWN-Ada) or, for smooth
        activations, the closest at the interval's midpoint (``"area"``); the constant lines (``"constant"``).

    Returns
    -------
    s_low, t_low, s_up, t_up : ndarray, shape (n,), float64
        At kinks every one-sided derivative lies between the lines.
    """
    l, u = np.asarray(l, np.float64), np.asarray(u, np.float64)
    dl, du = np.asarray(dl, np.float64), np.asarray(du, np.float64)
    z0 = np.clip(np.asarray(z0, np.float64), l, u)
    if mode not in ("centre", "area", "constant"):
        raise ValueError(f"mode={mode!r}; accepted: centre, area, constant")
    zero = np.zeros_like(l)
    const = (zero, dl.copy(), zero.copy(), du.copy())
    finite = np.isfinite(l) & np.isfinite(u)
    if mode == "constant" or isinstance(act, (Identity, HardSigmoid)) or not finite.any():
        return const
    if isinstance(act, LeakyReLU):
        alpha = float(act.alpha)
        s_up_max, s_low_max = relu_slope_ranges(alpha, l, u)
        # the sloped lines pass through (0, du) and (0, dl) and are valid on [l, u] only when the derivative range
        # is the whole [alpha, 1]: with narrower bounds (split neurons whose phase fixes the derivative, e.g. a
        # neuron held inactive on [l, 0]: dl = du = alpha) an upper line 0 + z / (-l) would fall below alpha
        s_up_max = np.where(du >= 1.0, s_up_max, 0.0)
        s_low_max = np.where(dl <= alpha, s_low_max, 0.0)
        unst = s_up_max > 0
        # upper 1 + s z: tight where sigma' = 1 (z0 >= 0) with s = 0, where sigma' = alpha with the largest s
        if mode == "area":  # area above sigma': -l + s (u^2 - l^2) / 2; below: u + s (l^2 - u^2) / 2
            s_up = np.where(unst & (u < -l), s_up_max, 0.0)
            s_low = np.where((s_low_max > 0) & (u > -l), s_low_max, 0.0)
        else:
            s_up = np.where(unst & (z0 < 0), s_up_max, 0.0)
            s_low = np.where((s_low_max > 0) & (z0 > 0), s_low_max, 0.0)
        # unstable neurons have dl = alpha and du = 1: the lines pass through (0, du) and (0, dl)
        return s_low, dl.copy(), s_up, du.copy()
    shape = None
    for cls, fn in DERIVATIVE_SHAPES.items():
        if isinstance(act, cls):
            shape = fn(act)
            break
    if shape is None:  # an activation registered later: constants (sound)
        return const
    idx = np.flatnonzero(finite & (u > l))
    s_low, t_low, s_up, t_up = (v.copy() for v in const)
    if idx.size == 0:
        return s_low, t_low, s_up, t_up
    li, ui, zi = l[idx], u[idx], z0[idx]
    if mode == "area":
        zi = 0.5 * li + 0.5 * ui
    fz = act.derivative(zi)
    # the piece of z0 gives the tangent slope
    f_l, f_u = act.derivative(li), act.derivative(ui)
    chord = (f_u - f_l) / (ui - li)
    tang = np.zeros_like(zi)
    for plo, phi, f, df, _ in shape:
        inside = (zi >= plo) & (zi <= phi)
        tang = np.where(inside, df(np.clip(zi, plo, phi)), tang)
    cands_up, cands_low = [(np.zeros_like(zi), du[idx])], [(np.zeros_like(zi), dl[idx])]
    for a in (chord, tang):
        a = np.where(np.isfinite(a), a, 0.0)
        tl, tu = _piecewise_intercepts(shape, a, li, ui)
        cands_up.append((a, tu))
        cands_low.append((a, tl))
    su, tu = _pick(cands_up, zi, fz, True)
    sl, tl = _pick(cands_low, zi, fz, False)
    s_up[idx], t_up[idx], s_low[idx], t_low[idx] = su, tu, sl, tl
    return s_low, t_low, s_up, t_up
