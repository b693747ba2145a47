"""The base class of an element-wise activation and the numeric helpers its implementations share.

:class:`Activation` declares what every activation provides (value, derivative, certified derivative bounds,
certified linear relaxation); the helpers widen derivative bounds and push values outward for the rounding of
transcendental functions.  The implementations live in :mod:`recurjac_scale.activations.piecewise` and
:mod:`recurjac_scale.activations.smooth`; the registry in :mod:`recurjac_scale.activations`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ..errors import InputError, NonFiniteError, ShapeMismatchError

__all__ = ["Activation"]

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
