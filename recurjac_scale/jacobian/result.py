"""The result of a Jacobian bound computation."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .._json import json_float

__all__ = ["JacobianBounds", "ROUNDING_NOTE"]

ROUNDING_NOTE = (
    "float BLAS with a running (a-posteriori) outward widening: each level's rounding error, bounded by gamma(n) "
    "times the magnitudes actually summed, is weighted by the certified bounds of that level "
    "(recurjac_scale.jacobian.rounding); the bounds hold for the exact real-number Jacobian, and rounding_share "
    "is the largest share of a bound's width that certification may cost"
)


@dataclass(frozen=True)
class JacobianBounds:
    """Certified element-wise bounds ``lower <= C J(x) <= upper`` for every ``x`` in ``B_p[x0, eps] ∩ D``.

    Attributes
    ----------
    lower, upper : ndarray, shape (m, n_0)
        The bounds (dtype :attr:`dtype`), for the ``m`` output rows selected by :attr:`outputs`.
    method : str
        Jacobian method (``fastlip``, ``recurjac-b``, ``recurjac-f0``, ``recurjac-f1``).
    layer_bound_method : str
        How the pre-activation bounds were obtained (``crown``, ``fastlin``, ``ibp``, ``global`` for eps = inf
        without a domain, or the name on a given :class:`LayerBounds`).
    p, eps : float
        Input norm and radius.
    x0 : ndarray, shape (n_0,)
    outputs : ndarray, shape (m, n_H)
        The output selection ``C`` (rows of ``C f``).
    layer_bounds : LayerBounds
        The pre-activation bounds used (of the network with ``C`` folded in).
    unstable : tuple of int
        Per hidden layer of the folded network, the neurons with ``dl < du``.
    timings : dict
        Seconds: ``layer_bounds``, ``jacobian``, ``compile`` (numba, 0 when cached in this process).
    dtype : str
    rounding : str
        How floating-point rounding is accounted for.
    allowance : ndarray, shape (m, n_0), optional
        What certification may cost each bound (:mod:`recurjac_scale.jacobian.rounding`): the bounds lie within
        it of the exact-arithmetic recursion.  :attr:`rounding_share` summarises it.
    chain, states : optional
        The chain and the per-step states (``states[t]`` dicts of ``(R, d_{t+1})`` arrays), for follow-up
        computations such as Algorithm 2; ``None`` unless kept.  Not part of :meth:`to_dict`.
    """

    lower: np.ndarray
    upper: np.ndarray
    method: str
    layer_bound_method: str
    p: float
    eps: float
    x0: np.ndarray
    outputs: np.ndarray
    layer_bounds: object
    unstable: tuple
    timings: dict
    dtype: str = "float64"
    rounding: str = ROUNDING_NOTE
    allowance: object = field(default=None, repr=False, compare=False)
    chain: object = field(default=None, repr=False, compare=False)
    states: object = field(default=None, repr=False, compare=False)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.lower.shape)

    @property
    def width(self) -> np.ndarray:
        """``upper - lower``, shape (m, n_0)."""
        return self.upper - self.lower

    @property
    def rounding_share(self) -> float:
        """``max over entries of allowance / width`` (:func:`recurjac_scale.jacobian.rounding.rounding_share`):
        the largest share of a bound's width that certified rounding may cost; ``nan`` when not known."""
        if self.allowance is None:
            return math.nan
        from .rounding import rounding_share

        return rounding_share(self.lower, self.upper, self.allowance)

    def magnitude(self) -> np.ndarray:
        """``M = max(|lower|, |upper|)`` (Proposition 2), shape (m, n_0)."""
        return np.maximum(np.abs(self.lower), np.abs(self.upper))

    def contains(self, J: np.ndarray) -> np.ndarray:
        """Whether Jacobians ``J`` of shape ``(m, n_0)`` or ``(k, m, n_0)`` lie in the bounds (per point)."""
        J = np.asarray(J)
        ok = (J >= self.lower) & (J <= self.upper)
        return ok.all(axis=(-2, -1))

    def to_dict(self, arrays: bool = True) -> dict:
        """JSON-able dict (``lower``/``upper`` as nested lists when ``arrays``)."""

        d = {
            "method": self.method,
            "layer_bound_method": self.layer_bound_method,
            "p": json_float(self.p),
            "eps": json_float(self.eps),
            "shape": list(self.shape),
            "unstable": [int(u) for u in self.unstable],
            "timings": {k: float(v) for k, v in self.timings.items()},
            "dtype": self.dtype,
            "rounding": self.rounding,
            "mean_width": float(np.mean(self.width)) if self.lower.size else 0.0,
            "rounding_share": None if math.isnan(self.rounding_share) else self.rounding_share,
        }
        if arrays:
            d["lower"] = self.lower.tolist()
            d["upper"] = self.upper.tolist()
            d["outputs"] = self.outputs.tolist()
            d["x0"] = np.asarray(self.x0).tolist()
        return d
