"""Piecewise linear activations: identity, leaky ReLU / ReLU and hard sigmoid.

Their derivative is piecewise constant, so derivative bounds are exact on intervals where the activation is
affine (:attr:`~recurjac_scale.activations.base.Activation.exact_derivative_on_stable` for the ReLU family).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ..errors import InputError, UnsupportedActivationError
from .base import _WIDEN, Activation, _as_f64, _finite_part, _interval

__all__ = ["Identity", "LeakyReLU", "ReLU", "HardSigmoid"]

# -- piecewise linear ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Identity(Activation):
    """The identity (a linear layer): ``sigma'(z) = 1``."""

    name: ClassVar[str] = "identity"
    exact_derivative_on_stable: ClassVar[bool] = True

    def value(self, z):
        return _as_f64(z).copy()

    def derivative(self, z):
        return np.ones_like(_as_f64(z))

    @property
    def derivative_range(self):
        return (1.0, 1.0)

    def derivative_bounds(self, lower, upper):
        lower = _as_f64(lower)
        return np.ones_like(lower), np.ones_like(lower)

    def relaxation(self, lower, upper):
        lower, _ = _interval(lower, upper)
        one, zero = np.ones_like(lower), np.zeros_like(lower)
        return one, zero, one.copy(), zero.copy()

    @property
    def is_identity(self) -> bool:
        return True


@dataclass(frozen=True)
class LeakyReLU(Activation):
    """``sigma(z) = z`` for ``z >= 0``, ``alpha * z`` otherwise, with ``alpha`` in [0, 1] (Zhang et al. 2019)."""

    alpha: float = 0.01
    name: ClassVar[str] = "leaky_relu"
    exact_derivative_on_stable: ClassVar[bool] = True

    def __post_init__(self):
        a = float(self.alpha)
        if not (0.0 <= a <= 1.0) or math.isnan(a):
            raise UnsupportedActivationError(
                f"leaky_relu slope alpha={self.alpha!r} is outside [0, 1]: a negative slope breaks Assumption 2 "
                "(0 <= sigma' <= C) of Zhang et al. 2019 and a slope above 1 is not supported"
            )
        object.__setattr__(self, "alpha", a)

    @property
    def params(self):
        return {"alpha": self.alpha}

    def value(self, z):
        z = _as_f64(z)
        pos = np.maximum(z, 0.0)
        if self.alpha == 0.0:
            return pos
        return pos + self.alpha * np.minimum(z, 0.0)

    def derivative(self, z):
        z = _as_f64(z)
        return np.where(z >= 0, 1.0, self.alpha)

    @property
    def derivative_range(self):
        return (self.alpha, 1.0)

    def derivative_bounds(self, lower, upper):
        lower, upper = _as_f64(lower), _as_f64(upper)
        dl = np.where(lower >= 0, 1.0, self.alpha)
        du = np.where(upper < 0, self.alpha, 1.0)
        return dl, du

    LOWER_SLOPES: ClassVar[tuple[str, ...]] = ("adaptive", "parallel", "alpha", "one")

    def relaxation(self, lower, upper, lower_slope: str = "adaptive"):
        """Certified linear relaxation on ``[lower, upper]`` (see :meth:`Activation.relaxation`).

        Stable neurons (``upper <= 0`` or ``lower >= 0``) get the exact line.  On ``lower < 0 < upper`` the upper
        line is the chord; the lower line is ``a z`` with ``a`` in ``[alpha, 1]`` chosen by ``lower_slope``:
        ``"adaptive"`` (CROWN-Ada: 1 if ``upper >= -lower`` else ``alpha``), ``"parallel"`` (Fast-Lin: the chord
        slope, Weng et al. 2018), ``"alpha"`` or ``"one"``.
        """
        if lower_slope not in self.LOWER_SLOPES:
            raise InputError(f"lower_slope={lower_slope!r}; accepted: {', '.join(self.LOWER_SLOPES)}")
        l, u = _interval(lower, upper)
        al = self.alpha
        eps = np.finfo(np.float64).eps
        neg = u <= 0
        pos = l >= 0
        mixed = ~(neg | pos)
        a_up = np.where(neg, al, 1.0)
        b_up = np.zeros_like(l)
        a_low = a_up.copy()
        b_low = np.zeros_like(l)
        if mixed.any():
            fin = np.isfinite(l) & np.isfinite(u)
            with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
                lf, uf = np.where(fin, l, -1.0), np.where(fin, u, 1.0)
                chord = np.clip((uf - al * lf) / (uf - lf), al, 1.0)
                # Convex function: a line above both end points is above the whole interval.
                ends = np.maximum(al * lf - chord * lf, uf - chord * uf)
                err = 4 * eps * (np.abs(al * lf) + np.abs(chord * lf) + np.abs(uf) + np.abs(chord * uf)) + 1e-300
                b_chord = ends + err
                # Unbounded intervals: alpha z + (1 - alpha) u above on (-inf, u]; z - (1 - alpha) l on [l, inf).
                lneg = np.isneginf(l) & np.isfinite(u)
                upos = np.isposinf(u) & np.isfinite(l)
                both = np.isneginf(l) & np.isposinf(u)
                a_m = np.where(fin, chord, np.where(lneg, al, np.where(upos, 1.0, 1.0 if al == 1.0 else 0.0)))
                b_l = (1.0 - al) * np.where(lneg, u, 0.0)
                b_u = -(1.0 - al) * np.where(upos, l, 0.0)
                b_m = np.where(
                    fin,
                    b_chord,
                    np.where(
                        lneg,
                        b_l + 2 * eps * np.abs(b_l) + 1e-300,
                        np.where(upos, b_u + 2 * eps * np.abs(b_u) + 1e-300, 0.0 if al == 1.0 else np.inf),
                    ),
                )
                b_m = np.where(both & (al != 1.0), np.inf, b_m)
            a_up = np.where(mixed, a_m, a_up)
            b_up = np.where(mixed, b_m, b_up)
            # Lower line a z with a in [alpha, 1] lies below sigma on the whole real line.
            adaptive = np.where(u >= -l, 1.0, al)
            if lower_slope == "adaptive":
                s = adaptive
            elif lower_slope == "parallel":
                s = np.where(fin, chord, adaptive)
            elif lower_slope == "alpha":
                s = np.full_like(l, al)
            else:
                s = np.ones_like(l)
            a_low = np.where(mixed, s, a_low)
        return a_low, b_low, a_up, b_up


@dataclass(frozen=True)
class ReLU(LeakyReLU):
    """``sigma(z) = max(z, 0)``."""

    alpha: float = 0.0
    name: ClassVar[str] = "relu"

    def __post_init__(self):
        if float(self.alpha) != 0.0:
            raise UnsupportedActivationError(f"relu has no slope parameter (got alpha={self.alpha!r}); use leaky_relu")
        object.__setattr__(self, "alpha", 0.0)

    @property
    def params(self):
        return {}


@dataclass(frozen=True)
class HardSigmoid(Activation):
    """``sigma(z) = clip(alpha * z + beta, 0, 1)`` (ONNX HardSigmoid; Keras uses alpha=0.2, beta=0.5)."""

    alpha: float = 0.2
    beta: float = 0.5
    name: ClassVar[str] = "hard_sigmoid"
    exact_derivative_on_stable: ClassVar[bool] = True

    def __post_init__(self):
        a, b = float(self.alpha), float(self.beta)
        if not (a > 0.0 and math.isfinite(a) and math.isfinite(b)):
            raise UnsupportedActivationError(
                f"hard_sigmoid needs a finite slope alpha > 0 (got alpha={self.alpha!r}, beta={self.beta!r}); "
                "a negative slope breaks Assumption 2 (0 <= sigma' <= C) of Zhang et al. 2019"
            )
        object.__setattr__(self, "alpha", a)
        object.__setattr__(self, "beta", b)

    @property
    def params(self):
        return {"alpha": self.alpha, "beta": self.beta}

    @property
    def _breaks(self) -> tuple[float, float]:
        return (-self.beta / self.alpha, (1.0 - self.beta) / self.alpha)

    def value(self, z):
        return np.clip(self.alpha * _as_f64(z) + self.beta, 0.0, 1.0)

    def derivative(self, z):
        z = _as_f64(z)
        lo, hi = self._breaks
        return np.where((z >= lo) & (z < hi), self.alpha, 0.0)

    @property
    def derivative_range(self):
        return (0.0, self.alpha)

    def derivative_bounds(self, lower, upper):
        lower, upper = _as_f64(lower), _as_f64(upper)
        lo, hi = self._breaks
        # The break points are computed in floating point; treat intervals touching them as uncertain.
        lo_out = lo - abs(lo) * _WIDEN - 1e-300
        hi_out = hi + abs(hi) * _WIDEN + 1e-300
        lo_in = lo + abs(lo) * _WIDEN + 1e-300
        hi_in = hi - abs(hi) * _WIDEN - 1e-300
        du = np.where((upper >= lo_out) & (lower < hi_out), self.alpha, 0.0)
        dl = np.where((lower >= lo_in) & (upper < hi_in), self.alpha, 0.0)
        return dl, du

    def relaxation(self, lower, upper):
        """Certified linear relaxation (see :meth:`Activation.relaxation`): for each interval the tightest
        (smallest area) upper and lower lines among the slopes ``0``, ``alpha`` and the slopes between the
        vertices of the graph on the interval; intercepts checked at every vertex (piecewise linear, so exact up
        to rounding).  Unbounded intervals get constant lines."""
        from ..relaxations import piecewise_linear_intercepts

        l, u = _interval(lower, upper)
        fin, lf, uf = _finite_part(l, u)
        f = self.value
        kinks = self._breaks
        m = 0.5 * lf + 0.5 * uf
        verts = [lf, uf] + [np.clip(np.full_like(lf, k), lf, uf) for k in kinks]
        fv = [f(v) for v in verts]
        slopes = [np.zeros_like(lf), np.full_like(lf, self.alpha)]
        with np.errstate(invalid="ignore", divide="ignore"):
            for i in range(len(verts)):
                for j in range(i + 1, len(verts)):
                    dv = verts[j] - verts[i]
                    sl = np.where(dv != 0, (fv[j] - fv[i]) / np.where(dv != 0, dv, 1.0), 0.0)
                    slopes.append(np.clip(sl, 0.0, self.alpha))
        best_up = np.full_like(lf, np.inf)
        best_low = np.full_like(lf, -np.inf)
        a_up, b_up, a_low, b_low = (np.zeros_like(lf) for _ in range(4))
        for a in slopes:
            bl, bu = piecewise_linear_intercepts(f, kinks, self.alpha, a, lf, uf, offset=abs(self.beta) + 1.0)
            s_up, s_low = a * m + bu, a * m + bl
            take = s_up < best_up
            a_up, b_up, best_up = np.where(take, a, a_up), np.where(take, bu, b_up), np.where(take, s_up, best_up)
            take = s_low > best_low
            a_low, b_low = np.where(take, a, a_low), np.where(take, bl, b_low)
            best_low = np.where(take, s_low, best_low)
        if not fin.all():
            eps = np.finfo(np.float64).eps
            hu, hl = f(u), f(l)
            a_up = np.where(fin, a_up, 0.0)
            a_low = np.where(fin, a_low, 0.0)
            b_up = np.where(fin, b_up, hu + 4 * eps * (abs(self.beta) + 1.0 + np.abs(hu)) + 1e-300)
            b_low = np.where(fin, b_low, hl - 4 * eps * (abs(self.beta) + 1.0 + np.abs(hl)) - 1e-300)
        return a_low, b_low, a_up, b_up
