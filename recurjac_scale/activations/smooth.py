"""Smooth activations: ELU and softplus (convex, derivative nondecreasing), and the sigmoid family (sigmoid,
tanh, arctan: derivative even, increasing on ``(-inf, 0]`` and decreasing on ``[0, inf)``).

Their derivative bounds and relaxations use transcendental functions, so every value is pushed outward by the
evaluation error (:func:`~recurjac_scale.activations.base._widen`, ``_up`` / ``_down``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ..errors import UnsupportedActivationError
from .base import _REL_VALUE, Activation, _as_f64, _down, _finite_part, _interval, _up, _widen

__all__ = ["ELU", "Softplus", "Sigmoid", "Tanh", "Arctan"]

# -- smooth, monotone derivative -------------------------------------------------------------------------------


def _convex_relaxation(act: Activation, lower, upper):
    """Relaxation of a convex nondecreasing activation (ELU with alpha <= 1, softplus): chord above, tangent at
    the midpoint below (CROWN), intercepts certified by :mod:`recurjac_scale.relaxations`.

    Unbounded intervals: above, ``z + (f(l) - l)`` on ``[l, inf)`` (``f(z) - z`` is nonincreasing) or the
    constant ``f(u)`` on ``(-inf, u]``; below, a slope just under ``f'(l)`` through ``f(l)`` (``f - a z`` is then
    nondecreasing on ``[l, inf)``) or the constant ``inf f``."""
    from ..relaxations import lower_intercept, upper_intercept

    f, df = act.value, act.derivative
    l, u = _interval(lower, upper)
    fin, lf, uf = _finite_part(l, u)
    m = 0.5 * lf + 0.5 * uf
    w = uf - lf
    with np.errstate(invalid="ignore", divide="ignore"):
        chord = np.where(w > 0, (f(uf) - f(lf)) / np.where(w > 0, w, 1.0), df(m))
    a_up = np.where(np.isfinite(chord), chord, df(m))
    b_up = upper_intercept(f, df, a_up, lf, uf, m, np.inf)
    a_low = df(m)
    b_low = lower_intercept(f, df, a_low, lf, uf, m, -np.inf)
    if not fin.all():
        lfin, ufin = np.isfinite(l), np.isfinite(u)
        l0, u0 = np.where(lfin, l, 0.0), np.where(ufin, u, 0.0)
        fl0, fu0 = f(l0), f(u0)
        # upper
        a_up = np.where(fin, a_up, np.where(lfin & ~ufin, 1.0, 0.0))
        b_up = np.where(
            fin,
            b_up,
            np.where(lfin & ~ufin, _up(fl0 - l0) + _REL_VALUE * np.abs(l0), np.where(ufin, _up(fu0), np.inf)),
        )
        # lower
        a_t = np.maximum(df(l0) * (1.0 - 4 * _REL_VALUE) - 1e-300, 0.0)
        inf_val = f(np.array([-np.inf]))[0]
        a_low = np.where(fin, a_low, np.where(lfin, a_t, 0.0))
        b_low = np.where(
            fin, b_low, np.where(lfin, _down(fl0 - a_t * l0) - _REL_VALUE * np.abs(a_t * l0), _down(inf_val))
        )
    return a_low, b_low, a_up, b_up


@dataclass(frozen=True)
class ELU(Activation):
    """``sigma(z) = z`` for ``z >= 0``, ``alpha (e^z - 1)`` otherwise, ``alpha`` in (0, 1] (sigma' nondecreasing)."""

    alpha: float = 1.0
    name: ClassVar[str] = "elu"

    def __post_init__(self):
        a = float(self.alpha)
        if not (0.0 < a <= 1.0):
            raise UnsupportedActivationError(
                f"elu alpha={self.alpha!r} is outside (0, 1]: only then is sigma' nondecreasing and bounded as "
                "the derivative bounds assume (Assumption 2 of Zhang et al. 2019 needs 0 <= sigma' <= C)"
            )
        object.__setattr__(self, "alpha", a)

    @property
    def params(self):
        return {"alpha": self.alpha}

    def value(self, z):
        z = _as_f64(z)
        return np.where(z >= 0, z, self.alpha * np.expm1(np.minimum(z, 0.0)))

    def derivative(self, z):
        z = _as_f64(z)
        return np.where(z >= 0, 1.0, self.alpha * np.exp(np.minimum(z, 0.0)))

    @property
    def derivative_range(self):
        return (0.0, 1.0)

    def derivative_bounds(self, lower, upper):
        dl, du = self.derivative(lower), self.derivative(upper)
        dl, du = _widen(dl, du)
        return dl, np.minimum(du, 1.0)

    def relaxation(self, lower, upper):
        return _convex_relaxation(self, lower, upper)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    z = _as_f64(z)
    out = np.empty_like(z)
    pos = z >= 0
    out[pos] = 1.0 / (1.0 + np.exp(-z[pos]))
    ez = np.exp(z[~pos])
    out[~pos] = ez / (1.0 + ez)
    return out


@dataclass(frozen=True)
class Softplus(Activation):
    """``sigma(z) = log(1 + e^z)``; ``sigma' = sigmoid`` is increasing."""

    name: ClassVar[str] = "softplus"

    def value(self, z):
        z = _as_f64(z)
        return np.logaddexp(0.0, z)

    def derivative(self, z):
        return _sigmoid(z)

    @property
    def derivative_range(self):
        return (0.0, 1.0)

    def derivative_bounds(self, lower, upper):
        dl, du = _widen(_sigmoid(lower), _sigmoid(upper))
        return dl, np.minimum(du, 1.0)

    def relaxation(self, lower, upper):
        return _convex_relaxation(self, lower, upper)


# -- sigmoid family: sigma' even, increasing on (-inf, 0], decreasing on [0, inf) -------------------------------


@dataclass(frozen=True)
class _SigmoidFamily(Activation):
    def derivative_bounds(self, lower, upper):
        lower, upper = _as_f64(lower), _as_f64(upper)
        d_lo, d_hi = self.derivative(lower), self.derivative(upper)
        pos = lower >= 0
        neg = upper <= 0
        mixed = ~(pos | neg)
        peak = self.derivative_range[1]
        far = np.maximum(-lower, upper)
        dl = np.where(pos, d_hi, np.where(neg, d_lo, self.derivative(far)))
        du = np.where(pos, d_lo, np.where(neg, d_hi, peak))
        dl, du = _widen(dl, du)
        du = np.where(mixed, peak, np.minimum(du, peak))
        return dl, du

    #: ``sigma(0)``; the family satisfies ``sigma(z) = 2 sigma(0) - sigma(-z)``.
    center: ClassVar[float] = 0.0

    def relaxation(self, lower, upper):
        """Certified CROWN relaxation (see :meth:`Activation.relaxation`; Zhang et al. 2018, Sec. 3.2).

        ``sigma`` is convex on ``(-inf, 0]`` and concave on ``[0, inf)``.  Upper line: the chord when
        ``upper <= 0`` (or when the chord stays above the concave part, slope <= sigma'(upper)); the tangent at
        the midpoint when ``lower >= 0``; otherwise the tangent through ``(lower, sigma(lower))``, its touching
        point found by bisection.  Intercepts are certified for every slope (ends, 0, tangent point, rounding).
        The lower line is the upper line of the reflected interval ``[-upper, -lower]`` (odd symmetry about
        ``(0, sigma(0))``).  Unbounded intervals get constant lines.
        """
        l, u = _interval(lower, upper)
        a_up, b_up = self._upper_line(l, u)
        a_r, b_r = self._upper_line(-u, -l)
        c2 = 2.0 * self.center
        b_low = c2 - b_r
        b_low = np.where(np.isfinite(b_low), b_low - 2 * np.finfo(np.float64).eps * np.abs(b_low) - 1e-300, b_low)
        return a_r, b_low, a_up, b_up

    def _upper_line(self, l: np.ndarray, u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        from ..relaxations import tangent_point_from_left, upper_intercept

        f, df = self.value, self.derivative
        fin, lf, uf = _finite_part(l, u)
        m = 0.5 * lf + 0.5 * uf
        w = uf - lf
        with np.errstate(invalid="ignore", divide="ignore"):
            chord = np.where(w > 0, (f(uf) - f(lf)) / np.where(w > 0, w, 1.0), df(m))
        a = chord.copy()
        zhat = uf.copy()
        ccv = lf >= 0
        a = np.where(ccv, df(m), a)
        zhat = np.where(ccv, m, zhat)
        mixed = (lf < 0) & (uf > 0) & ~(chord <= df(uf))
        if mixed.any():
            d = tangent_point_from_left(f, df, lf[mixed], uf[mixed])
            a[mixed] = df(d)
            zhat[mixed] = d
        b = upper_intercept(f, df, a, lf, uf, zhat, 0.0)
        if not fin.all():
            top = np.where(np.isposinf(u), f(np.array([np.inf]))[0], f(np.where(np.isfinite(u), u, 0.0)))
            a = np.where(fin, a, 0.0)
            b = np.where(fin, b, _up(top))
        return a, b


@dataclass(frozen=True)
class Sigmoid(_SigmoidFamily):
    """``sigma(z) = 1 / (1 + e^-z)``; ``sigma' = sigma (1 - sigma)`` in (0, 1/4]."""

    name: ClassVar[str] = "sigmoid"
    center: ClassVar[float] = 0.5

    def value(self, z):
        return _sigmoid(z)

    def derivative(self, z):
        z = _as_f64(z)
        # sigma'(z) = e^{-|z|} / (1 + e^{-|z|})^2: stable for every z, and even.
        e = np.exp(-np.abs(z))
        return e / (1.0 + e) ** 2

    @property
    def derivative_range(self):
        return (0.0, 0.25)


@dataclass(frozen=True)
class Tanh(_SigmoidFamily):
    """``sigma(z) = tanh(z)``; ``sigma' = 1 - tanh^2`` in (0, 1]."""

    name: ClassVar[str] = "tanh"

    def value(self, z):
        return np.tanh(_as_f64(z))

    def derivative(self, z):
        z = _as_f64(z)
        # 1 - tanh^2 = 4 e^{-2|z|} / (1 + e^{-2|z|})^2, stable for large |z|.
        e = np.exp(-2.0 * np.abs(z))
        return 4.0 * e / (1.0 + e) ** 2

    @property
    def derivative_range(self):
        return (0.0, 1.0)


@dataclass(frozen=True)
class Arctan(_SigmoidFamily):
    """``sigma(z) = arctan(z)``; ``sigma' = 1 / (1 + z^2)`` in (0, 1]."""

    name: ClassVar[str] = "arctan"

    def value(self, z):
        return np.arctan(_as_f64(z))

    def derivative(self, z):
        z = _as_f64(z)
        with np.errstate(over="ignore"):
            return 1.0 / (1.0 + z * z)

    @property
    def derivative_range(self):
        return (0.0, 1.0)
