"""Element-wise activation functions, as data.

Each activation is one object with its value, its derivative, certified bounds of its derivative on an interval
(Zhang et al. 2019, Eq. 6-8) and linear relaxations (for the CROWN layer bounds).  They live in one registry,
:data:`ACTIVATIONS`; :func:`get_activation` builds one from a name and parameters.

Every registered activation satisfies Assumption 2 of the paper: ``0 <= sigma'(z) <= C`` wherever the derivative
exists.  Activations whose derivative can be negative (GELU, SiLU/swish, Mish, sin, ...) are rejected with an
error that cites the assumption: RecurJac's bounds are not valid for them.

Conventions
-----------
At a kink (ReLU at 0, hard-sigmoid at its break points) :meth:`Activation.derivative` returns the right
derivative; :meth:`Activation.derivative_bounds` contains ``sigma'(z)`` (the right derivative) at every point of the
interval, and both one-sided derivatives at kinks strictly inside it.  At a kink that is exactly an end point
(ReLU on ``[0, u]``) it follows the paper's Eq. 7-8 and holds the derivative of the side inside the interval.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from ._registry import Registry
from .errors import InputError, NonFiniteError, ShapeMismatchError, UnsupportedActivationError

__all__ = [
    "Activation",
    "ACTIVATIONS",
    "REJECTED_ACTIVATIONS",
    "register_activation",
    "get_activation",
    "activation_from_spec",
]

# Relative outward widening applied to derivative bounds computed with transcendental functions: a few ulps
# covers the error of exp/tanh/reciprocal in float64.
_WIDEN = 8 * np.finfo(np.float64).eps


def _as_f64(z) -> np.ndarray:
    return np.asarray(z, dtype=np.float64)


@dataclass(frozen=True)
class Activation:
    """Base class of an element-wise activation ``h = sigma(z)``.

    Subclasses set :attr:`name`, implement :meth:`value`, :meth:`derivative` and :meth:`derivative_bounds`, and
    declare :attr:`derivative_range` (``inf sigma'``, ``sup sigma'`` over the real line).

    Attributes
    ----------
    name : str
        Registry name.
    exact_derivative_on_stable : bool
        ``True`` when ``derivative_bounds`` returns ``dl == du`` exactly for intervals on which the activation is
        affine (ReLU family), which lets the Jacobian algorithms expand those neurons exactly.
    """

    name: ClassVar[str] = ""
    exact_derivative_on_stable: ClassVar[bool] = False

    # -- value and derivative --------------------------------------------------------------------------------
    def value(self, z: np.ndarray) -> np.ndarray:
        """``sigma(z)`` element-wise, float64, same shape as ``z``."""
        raise NotImplementedError  # pragma: no cover - abstract

    def derivative(self, z: np.ndarray) -> np.ndarray:
        """``sigma'(z)`` element-wise (right derivative at kinks), float64, same shape as ``z``."""
        raise NotImplementedError  # pragma: no cover - abstract

    @property
    def derivative_range(self) -> tuple[float, float]:
        """``(inf sigma', sup sigma')`` over the real line: the derivative bounds used for ``eps = inf``."""
        raise NotImplementedError  # pragma: no cover - abstract

    def derivative_bounds(self, lower: np.ndarray, upper: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Certified bounds of ``sigma'(z)`` for ``z`` in ``[lower, upper]`` (Zhang et al. 2019, Eq. 6-8).

        Parameters
        ----------
        lower, upper : ndarray, shape (n,)
            Pre-activation bounds, ``lower <= upper``; infinite values are allowed (``eps = inf``).

        Returns
        -------
        dl, du : ndarray, shape (n,), float64
            ``0 <= dl <= sigma'(z) <= du`` for every ``z`` in the interval (both one-sided derivatives at kinks
            strictly inside it).
        """
        raise NotImplementedError  # pragma: no cover - abstract

    def relaxation(self, lower: np.ndarray, upper: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Certified linear relaxation on ``[lower, upper]`` (CROWN, Zhang et al. 2018).

        Parameters
        ----------
        lower, upper : ndarray, shape (n,)
            Pre-activation bounds, ``lower <= upper``; infinite values are allowed (``eps = inf``).

        Returns
        -------
        a_low, b_low, a_up, b_up : ndarray, shape (n,), float64
            ``a_low * z + b_low <= sigma(z) <= a_up * z + b_up`` for every real ``z`` in ``[lower, upper]``, in
            exact arithmetic (intercepts are pushed outward for the rounding of every evaluation; see
            :mod:`recurjac_scale.relaxations`).  Slopes are finite; an intercept is infinite only
            where no finite line exists (unbounded interval of an unbounded function), with slope 0 there.
        """
        raise NotImplementedError  # pragma: no cover - abstract

    # -- description ----------------------------------------------------------------------------------------
    @property
    def params(self) -> dict:
        """Parameters of this activation, as stored in model metadata."""
        return {}

    def to_spec(self) -> dict:
        """JSON-able description ``{"name": ..., **params}``; inverse of :func:`activation_from_spec`."""
        return {"name": self.name, **self.params}

    @property
    def is_identity(self) -> bool:
        return False

    def __str__(self) -> str:
        if self.params:
            inner = ", ".join(f"{k}={v:g}" for k, v in self.params.items())
            return f"{self.name}({inner})"
        return self.name


def _widen(dl: np.ndarray, du: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Widen derivative bounds computed with rounding outward by a few ulps (lower never below 0)."""
    dl = np.maximum(dl * (1.0 - _WIDEN), 0.0)
    du = du * (1.0 + _WIDEN)
    return dl, du


def _interval(lower, upper) -> tuple[np.ndarray, np.ndarray]:
    """Float64 copies of a relaxation's interval, shape (n,)."""
    lower = np.atleast_1d(_as_f64(lower)).astype(np.float64, copy=True)
    upper = np.atleast_1d(_as_f64(upper)).astype(np.float64, copy=True)
    if lower.shape != upper.shape or lower.ndim != 1:
        raise ShapeMismatchError(f"lower {lower.shape} and upper {upper.shape} bounds must be 1-D of one shape")
    if np.isnan(lower).any() or np.isnan(upper).any():
        raise NonFiniteError("pre-activation bounds contain NaN")
    if (lower > upper).any():
        i = int(np.argmax(lower > upper))
        raise InputError(f"empty pre-activation interval at neuron {i}: [{lower[i]!r}, {upper[i]!r}]")
    return lower, upper


def _finite_part(lower, upper):
    """Mask of finite intervals, and the interval with infinite ones replaced by ``[-1, 1]`` (placeholders whose
    results the caller overwrites)."""
    fin = np.isfinite(lower) & np.isfinite(upper)
    return fin, np.where(fin, lower, -1.0), np.where(fin, upper, 1.0)


_REL_VALUE = 36 * np.finfo(np.float64).eps / 2  # one transcendental evaluation (see recurjac_scale.relaxations)


def _up(v):
    """``v`` pushed up by the evaluation error of one transcendental function (finite ``v`` only)."""
    return v + _REL_VALUE * np.abs(v) + 1e-300


def _down(v):
    return v - _REL_VALUE * np.abs(v) - 1e-300


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
        from .relaxations import piecewise_linear_intercepts

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


# -- smooth, monotone derivative -------------------------------------------------------------------------------


def _convex_relaxation(act: Activation, lower, upper):
    """Relaxation of a convex nondecreasing activation (ELU with alpha <= 1, softplus): chord above, tangent at
    the midpoint below (CROWN), intercepts certified by :mod:`recurjac_scale.relaxations`.

    Unbounded intervals: above, ``z + (f(l) - l)`` on ``[l, inf)`` (``f(z) - z`` is nonincreasing) or the
    constant ``f(u)`` on ``(-inf, u]``; below, a slope just under ``f'(l)`` through ``f(l)`` (``f - a z`` is then
    nondecreasing on ``[l, inf)``) or the constant ``inf f``."""
    from .relaxations import lower_intercept, upper_intercept

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
        from .relaxations import tangent_point_from_left, upper_intercept

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


# -- registry ----------------------------------------------------------------------------------------------------

ACTIVATIONS: Registry = Registry("activation", sep="_", error=UnsupportedActivationError)
"""Registry: name -> activation class.  Extend with :func:`register_activation`."""
ACTIVATIONS.add_aliases(
    {"linear": "identity", "none": "identity", "leakyrelu": "leaky_relu", "leaky": "leaky_relu", "atan": "arctan",
     "hardsigmoid": "hard_sigmoid"}
)

REJECTED_ACTIVATIONS: dict[str, str] = {
    "gelu": "its derivative is negative for z < -0.75",
    "silu": "its derivative is negative for z < -1.28",
    "swish": "its derivative is negative for z < -1.28",
    "mish": "its derivative is negative for z < -1.19",
    "sin": "its derivative cos(z) is negative on half of the real line",
    "cos": "its derivative -sin(z) is negative on half of the real line",
}
"""Known activations that are refused, with the reason (Assumption 2 of Zhang et al. 2019: 0 <= sigma' <= C)."""


def register_activation(cls: type[Activation]) -> type[Activation]:
    """Add an :class:`Activation` subclass to :data:`ACTIVATIONS` under ``cls.name``.

    The class must guarantee ``0 <= sigma' <= C`` (Assumption 2 of Zhang et al. 2019) and certified
    ``derivative_bounds``; every registered activation is exercised by the test suite's registry tests.
    """
    if not cls.name:
        raise ValueError("an activation class needs a non-empty name")
    return ACTIVATIONS.register(cls.name, cls)


for _cls in (Identity, ReLU, LeakyReLU, HardSigmoid, ELU, Softplus, Sigmoid, Tanh, Arctan):
    register_activation(_cls)


def get_activation(name: str | Activation | None, **params) -> Activation:
    """Build a registered activation from its name and parameters.

    Parameters
    ----------
    name : str, Activation or None
        Registry name (case-insensitive; aliases ``linear``, ``leaky``, ``atan``, ... accepted).  ``None`` means
        the identity.  An :class:`Activation` instance is returned unchanged.
    **params
        Parameters of the activation, e.g. ``alpha`` for ``leaky_relu``.

    Raises
    ------
    UnsupportedActivationError
        For an unknown name, a name in :data:`REJECTED_ACTIVATIONS` (derivative can be negative, which breaks
        Assumption 2 of Zhang et al. 2019), or parameters out of range.
    """
    if isinstance(name, Activation):
        return name
    if name is None:
        return Identity()
    key = ACTIVATIONS.resolve(name)
    if key in REJECTED_ACTIVATIONS:
        raise UnsupportedActivationError(
            f"activation {name!r} is not supported: {REJECTED_ACTIVATIONS[key]}, which breaks Assumption 2 of "
            f"Zhang et al. 2019 (0 <= sigma' <= C); supported: {', '.join(sorted(ACTIVATIONS))}"
        )
    if key not in ACTIVATIONS:
        raise UnsupportedActivationError(
            f"unknown activation {name!r}; supported: {', '.join(sorted(ACTIVATIONS))} (activations whose "
            "derivative can be negative are refused by Assumption 2 of Zhang et al. 2019)"
        )
    try:
        return ACTIVATIONS[key](**params)
    except TypeError as exc:
        raise UnsupportedActivationError(f"bad parameters {params!r} for activation {key!r}: {exc}") from None


def activation_from_spec(spec: dict | str | None) -> Activation:
    """Inverse of :meth:`Activation.to_spec`: ``{"name": "leaky_relu", "alpha": 0.3}`` -> activation."""
    if spec is None or isinstance(spec, str):
        return get_activation(spec)
    spec = dict(spec)
    name = spec.pop("name", None)
    return get_activation(name, **spec)
