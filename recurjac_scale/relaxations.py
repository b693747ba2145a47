"""Certified linear relaxations of activations (the building blocks of Fast-Lin and CROWN).

For a neuron with pre-activation interval ``[l, u]`` a relaxation is two lines

    a_low * z + b_low  <=  sigma(z)  <=  a_up * z + b_up      for every real z in [l, u].

The *slope* of each line is chosen as in CROWN (Zhang et al. 2018, Table 1 and Sec. 3.2: chord, tangent at the
midpoint, tangent through an end point found by bisection; the adaptive lower slope for the ReLU family; Fast-Lin's
parallel lower slope, Weng et al. 2018).  The *intercept* is then computed so that the line provably encloses
``sigma`` in real arithmetic, whatever the slope (so a bisection that stops early, or a slope rounded to float32,
can only cost tightness, never soundness):

* on a part of the interval where ``phi(z) = sigma(z) - a z`` is convex, ``max phi`` is attained at the two end
  points of the part;
* on a part where ``phi`` is concave, ``phi(z) <= phi(zh) + phi'(zh) (z - zh)`` for any point ``zh`` of the part
  (the tangent of a concave function lies above it), so ``max phi <= phi(zh) + max(phi'(zh) (u - zh),
  phi'(zh) (l - zh))``; with ``zh`` the tangent point this is tight;
* piecewise linear functions are checked at every vertex (kinks clipped into the interval).

Rounding: every evaluation ``f(z)`` and ``f'(z)`` of a transcendental function is assumed correct to
``ULP_ERR`` ulps (relative) plus ``ABS_ERR`` (absolute, for underflow); every float operation adds one rounding.
Intercepts are pushed outward by these amounts, so the lines are valid for the exact real functions.

All functions here work on float64 arrays of shape ``(n,)``; infinite end points are handled by the callers
(:mod:`recurjac_scale.activations`), which pass finite intervals only.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

__all__ = [
    "ULP_ERR",
    "ABS_ERR",
    "upper_intercept",
    "lower_intercept",
    "tangent_point_from_left",
    "piecewise_linear_intercepts",
    "value_bounds",
]

_U = np.finfo(np.float64).eps / 2
ULP_ERR = 32
"""Assumed maximal error, in ulps, of numpy's float64 exp/expm1/log/tanh/arctan (and of the short formulas built
on them in :mod:`recurjac_scale.activations`).  numpy documents <= 4 ulp for its SIMD transcendental functions."""
ABS_ERR = 1e-300
"""Absolute error allowance covering results in the subnormal range."""

_REL = (ULP_ERR + 4) * _U  # one function evaluation plus a handful of roundings

Fn = Callable[[np.ndarray], np.ndarray]


def _phi_up(f: Fn, a: np.ndarray, z: np.ndarray) -> np.ndarray:
    """A certified upper bound of ``f(z) - a z`` (real arithmetic) for finite ``z``."""
    fz = f(z)
    az = a * z
    return (fz - az) + _REL * (np.abs(fz) + np.abs(az)) + ABS_ERR


def upper_intercept(
    f: Fn, df: Fn, a: np.ndarray, lower: np.ndarray, upper: np.ndarray, zhat: np.ndarray, split: float
) -> np.ndarray:
    """Certified ``b`` with ``a z + b >= f(z)`` for every real ``z`` in ``[lower, upper]``.

    ``f`` must be convex on ``(-inf, split]`` and concave on ``[split, inf)`` (``split = +inf``: convex
    everywhere; ``split = -inf``: concave everywhere).  ``zhat`` is a point where the concave part of
    ``f(z) - a z`` is (nearly) maximal, e.g. the tangent point when ``a = f'(zhat)``; it is clipped into the
    concave part, and any value gives a sound (if looser) result.  ``df`` may return a one-sided derivative at a
    kink (a super-gradient of a concave function).

    Parameters
    ----------
    f, df : callable
        The function and its derivative, element-wise on float64 arrays.
    a, lower, upper, zhat : ndarray, shape (n,), float64, finite, ``lower <= upper``

    Returns
    -------
    b : ndarray, shape (n,), float64
    """
    has_ccv = upper > split
    has_cvx = (lower < split) | ~has_ccv
    b = np.full(lower.shape, -np.inf)
    if has_cvx.any():
        e2 = np.minimum(upper, split)
        b = np.where(has_cvx, np.maximum(_phi_up(f, a, lower), _phi_up(f, a, e2)), b)
    if has_ccv.any():
        lo_c = np.maximum(lower, split)
        zh = np.clip(zhat, lo_c, upper)
        dz = upper - lo_c
        phi_z = _phi_up(f, a, zh)
        dfz = df(zh)
        g = dfz - a
        gerr = _REL * (np.abs(dfz) + np.abs(a)) + ABS_ERR
        step = np.maximum(g * (upper - zh), g * (lo_c - zh))
        tb = phi_z + step + gerr * dz
        tb = tb + 4 * _U * (np.abs(phi_z) + np.abs(step) + gerr * dz)
        b = np.where(has_ccv, np.maximum(b, tb), b)
    return b + 4 * _U * np.abs(b) + ABS_ERR


def lower_intercept(
    f: Fn, df: Fn, a: np.ndarray, lower: np.ndarray, upper: np.ndarray, zhat: np.ndarray, split: float
) -> np.ndarray:
    """Certified ``b`` with ``a z + b <= f(z)`` on ``[lower, upper]``, for ``f`` *concave* on ``(-inf, split]``
    and *convex* on ``[split, inf)`` (so that ``-f`` has the shape :func:`upper_intercept` needs); ``zhat``
    should be near the minimiser of ``f(z) - a z`` on the convex part."""
    return -upper_intercept(lambda z: -f(z), lambda z: -df(z), -a, lower, upper, zhat, split)


def tangent_point_from_left(
    f: Fn, df: Fn, lower: np.ndarray, upper: np.ndarray, iterations: int = 64
) -> np.ndarray:
    """For ``f`` convex on ``(-inf, 0]`` and concave on ``[0, inf)`` and ``lower < 0 < upper``: a point ``d`` in
    ``[0, upper]`` at (or just right of) the tangent point of the line through ``(lower, f(lower))`` that touches
    ``f`` on the concave side (CROWN's upper line for sigmoid-like functions on a mixed interval).

    Bisection on ``psi(d) = f(d) + f'(d) (lower - d) - f(lower)``, which is nondecreasing on ``[0, inf)``;
    returns the right end of the final bracket.  The result only steers the slope: the intercept is certified
    separately by :func:`upper_intercept`.
    """
    lo = np.zeros_like(lower)
    hi = upper.copy()
    fl = f(lower)
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        psi = f(mid) + df(mid) * (lower - mid) - fl
        ok = psi >= 0
        hi = np.where(ok, mid, hi)
        lo = np.where(ok, lo, mid)
    return hi


def piecewise_linear_intercepts(
    f: Fn,
    kinks: tuple[float, ...],
    max_slope: float,
    a: np.ndarray,
    lower: np.ndarray,
    upper: np.ndarray,
    offset: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Certified ``(b_low, b_up)`` with ``a z + b_low <= f(z) <= a z + b_up`` on ``[lower, upper]`` for a
    continuous piecewise linear ``f`` whose slopes lie in ``[0, max_slope]`` and whose (float approximations of)
    kinks are ``kinks``.

    The line minus ``f`` is piecewise linear, so its extremes are at ``lower``, ``upper`` or a kink; each kink is
    clipped into the interval, and the error of a kink's float position is charged at ``(|a| + max_slope)`` per
    unit of position error.  ``offset`` bounds the constant terms in the evaluation of ``f`` (e.g. ``|beta|``
    for hard-sigmoid), for its rounding error.
    """
    verts = [lower, upper] + [np.clip(np.full_like(lower, k), lower, upper) for k in kinks]
    b_up = np.full(lower.shape, -np.inf)
    b_low = np.full(lower.shape, np.inf)
    kink_err = max([4 * _U * abs(k) for k in kinks] + [0.0]) + ABS_ERR
    for v in verts:
        fv = f(v)
        av = a * v
        err = 8 * _U * (np.abs(fv) + np.abs(av) + max_slope * np.abs(v) + abs(offset)) + (np.abs(a) + max_slope) * kink_err
        b_up = np.maximum(b_up, fv - av + err)
        b_low = np.minimum(b_low, fv - av - err)
    return b_low, b_up


def value_bounds(f: Fn, lower: np.ndarray, upper: np.ndarray, exact: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Certified ``(h_low, h_up)`` with ``h_low <= f(z) <= h_up`` on ``[lower, upper]`` for nondecreasing ``f``
    (Assumption 2): ``f`` at the end points, widened by the evaluation error unless ``exact``."""
    hl, hu = f(lower), f(upper)
    if exact:
        return hl, hu
    with np.errstate(invalid="ignore"):
        el = np.where(np.isfinite(hl), _REL * np.abs(hl) + ABS_ERR, 0.0)
        eu = np.where(np.isfinite(hu), _REL * np.abs(hu) + ABS_ERR, 0.0)
    return hl - el, hu + eu
