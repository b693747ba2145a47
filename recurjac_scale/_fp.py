"""Floating-point error accounting shared by the bound algorithms.

Bounds are computed in float64 with ordinary (round-to-nearest) BLAS.  A computed dot product of length ``n``
differs from the exact one by at most ``gamma(n) * sum_i |a_i| |b_i|`` (Higham, *Accuracy and Stability of
Numerical Algorithms*, Eq. 3.5), with ``gamma(n) = n u / (1 - n u)`` and ``u`` the unit roundoff.  Every bound
is widened outward by that amount (with a factor 2 margin, covering the rounding of the magnitude products
themselves), so a bound computed here is a bound on the exact real-number quantity.
"""

from __future__ import annotations

import numpy as np

__all__ = ["gamma", "TINY", "underflow_unit", "cast_weights"]

TINY = np.finfo(np.float64).tiny
"""Absolute slack added to widened bounds to cover the underflow of a local computation (a few thousand
products whose results are used as they are)."""


def underflow_unit(dtype=np.float64) -> float:
    """Absolute error bound of one multiplication whose result underflows, in ``dtype``: the smallest subnormal
    number (twice the round-to-nearest bound).  Additions and subtractions are exact when their result is
    subnormal, so a computation with ``n`` multiplications loses at most ``n`` times this to underflow *before*
    the errors are amplified by later factors; callers multiply by a bound of that amplification."""
    return float(max(np.finfo(dtype).smallest_subnormal, np.finfo(np.float64).smallest_subnormal))


def gamma(n: int, dtype=np.float64) -> float:
    """Relative error factor of a length-``n`` dot product, doubled for safety: ``2 n u / (1 - n u)``."""
    u = np.finfo(dtype).eps / 2
    nu = (int(n) + 2) * u
    if nu >= 0.5:
        raise ValueError(f"dot product length {n} too long for error accounting in {np.dtype(dtype)}")
    return float(2.0 * nu / (1.0 - nu))


def cast_weights(w, dtype, what: str = "weights") -> np.ndarray:
    """``w`` as a ``dtype`` array; raises :class:`recurjac_scale.errors.InputError` when a finite entry does not fit
    ``dtype`` (float64 weights beyond float32's range would become infinite and every bound void).

    Parameters
    ----------
    w : array_like
        Finite weights (checked when the network was built).
    dtype : numpy dtype
    what : str
        Names the array in the message (e.g. ``"weights of layer 2"``).
    """
    from .errors import InputError

    src = np.asarray(w)
    with np.errstate(over="ignore", invalid="ignore"):
        out = np.asarray(src, dtype=dtype)
    if out.dtype != src.dtype and out.size and not np.isfinite(out).all() and np.isfinite(src).all():
        big = float(np.abs(src).max())
        raise InputError(
            f"{what}: |w| up to {big:.3g} exceeds the {np.dtype(dtype).name} range ({np.finfo(dtype).max:.3g}); "
            "use dtype float64"
        )
    return out
