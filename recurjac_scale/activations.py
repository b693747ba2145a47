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
derivative; :meth:`Activation.derivative_bounds` always contains every one-sided derivative at every point of the
interval, so the bounds enclose the Clarke generalised derivative.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, ClassVar

import numpy as np

from .errors import UnsupportedActivationError

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
            ``0 <= dl <= sigma'(z) <= du`` for every ``z`` in the interval (every one-sided derivative at kinks).
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


# -- smooth, monotone derivative -------------------------------------------------------------------------------


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


@dataclass(frozen=True)
class Sigmoid(_SigmoidFamily):
    """``sigma(z) = 1 / (1 + e^-z)``; ``sigma' = sigma (1 - sigma)`` in (0, 1/4]."""

    name: ClassVar[str] = "sigmoid"

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

ACTIVATIONS: dict[str, Callable[..., Activation]] = {}
"""Registry: name -> activation class.  Extend with :func:`register_activation`."""

_ALIASES = {
    "linear": "identity",
    "none": "identity",
    "leakyrelu": "leaky_relu",
    "leaky": "leaky_relu",
    "atan": "arctan",
    "hardsigmoid": "hard_sigmoid",
}

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
    ACTIVATIONS[cls.name] = cls
    return cls


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
    key = str(name).strip().lower().replace("-", "_")
    key = _ALIASES.get(key.replace("_", ""), _ALIASES.get(key, key))
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
