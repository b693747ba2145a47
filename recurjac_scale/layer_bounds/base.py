"""Common types of the pre-activation bound methods: the region, the result, the registry."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..errors import InputError
from ..network.model import Network

__all__ = [
    "Region",
    "LayerBounds",
    "LAYER_BOUND_METHODS",
    "register_layer_bound_method",
    "get_layer_bound_method",
    "layer_bounds",
    "parse_norm",
]

_NORMS = {"1": 1.0, "l1": 1.0, "2": 2.0, "l2": 2.0, "inf": math.inf, "linf": math.inf, "infinity": math.inf}


def parse_norm(p) -> float:
    """Normalise a norm given as 1, 2, ``inf``, ``"inf"``, ``"l2"``... to 1.0, 2.0 or ``math.inf``.

    Raises
    ------
    InputError
        For any other value.
    """
    key = str(p).strip().lower()
    if key in _NORMS:
        return _NORMS[key]
    try:
        v = float(p)
    except (TypeError, ValueError):
        v = None
    if v in (1.0, 2.0, math.inf):
        return v
    raise InputError(f"unknown norm p={p!r}; accepted: 1, 2, inf")


def dual_norm(p: float) -> float:
    """``q`` with ``1/p + 1/q = 1`` for p in {1, 2, inf}."""
    return {1.0: math.inf, 2.0: 2.0, math.inf: 1.0}[p]


@dataclass(frozen=True)
class Region:
    """The input region ``S = B_p[x0, eps] ∩ D``.

    Attributes
    ----------
    x0 : ndarray, shape (n_0,), float64
        Centre, in raw input units (inside the domain when one is declared).
    eps : float
        Radius, in [0, inf]; ``inf`` means the whole domain (global bounds).
    p : float
        Input norm: 1.0, 2.0 or ``math.inf``.
    lower, upper : ndarray, shape (n_0,) or None
        The domain box ``D`` (``None`` when unbounded).
    """

    x0: np.ndarray
    eps: float
    p: float
    lower: np.ndarray | None = None
    upper: np.ndarray | None = None

    @classmethod
    def of(cls, network: Network, x0, eps, p=math.inf) -> "Region":
        """Validate and build the region for ``network`` (input shape, domain, ``eps >= 0``, norm)."""
        p = parse_norm(p)
        try:
            eps = float(eps)
        except (TypeError, ValueError):
            raise InputError(f"eps={eps!r} is not a number; accepted: a radius in [0, inf]") from None
        if math.isnan(eps) or eps < 0:
            raise InputError(f"eps={eps!r} is invalid; accepted: a radius in [0, inf]")
        spec = network.input_spec
        x = spec.check(x0)
        if x.shape[0] != 1:
            raise InputError(f"one centre x0 is expected, got a batch of {x.shape[0]}")
        return cls(x0=x[0], eps=eps, p=p, lower=spec.domain_lower, upper=spec.domain_upper)

    @property
    def q(self) -> float:
        """Dual norm of ``p``."""
        return dual_norm(self.p)

    @property
    def box(self) -> tuple[np.ndarray, np.ndarray]:
        """An axis-aligned box containing ``S`` (the l-inf box of radius eps clipped to D; for p = 1, 2 the same
        box, which contains the ball)."""
        lo = self.x0 - self.eps
        hi = self.x0 + self.eps
        if self.lower is not None:
            lo = np.maximum(lo, self.lower)
            hi = np.minimum(hi, self.upper)
        return lo, hi


@dataclass(frozen=True)
class LayerBounds:
    """Pre-activation bounds of every affine layer over a region.

    Attributes
    ----------
    lower, upper : tuple of ndarray
        ``lower[k]``, ``upper[k]`` of shape ``(n_{k+1},)``, float64: ``lower[k] <= z(k+1)(x) <= upper[k]`` for every
        x in the region, for k = 0 .. H-1 (the last pair bounds the network output before its activation).
        Infinite entries are possible only for ``eps = inf`` without a domain.
    method : str
        Registry name of the method that produced them.
    region : Region
    unstable : tuple of int
        Per layer, the number of neurons whose activation is not affine on ``[lower, upper]`` (derivative bounds
        ``dl < du``).
    rounding : str
        How floating-point rounding is accounted for.
    """

    lower: tuple
    upper: tuple
    method: str
    region: Region
    unstable: tuple = ()
    rounding: str = "outward widening by gamma(n) * |W| |x| per affine layer (recurjac_scale._fp)"

    def derivative_bounds(self, network: Network) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per layer, ``(dl, du)`` with ``dl <= sigma_k'(z) <= du`` on the bounds (Zhang et al. 2019, Eq. 6-8)."""
        return [act.derivative_bounds(l, u) for act, l, u in zip(network.layer_activations, self.lower, self.upper)]

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "eps": self.region.eps,
            "p": self.region.p,
            "unstable": list(self.unstable),
            "widths": [int(l.shape[0]) for l in self.lower],
        }


LayerBoundFn = Callable[[Network, Region], tuple[list, list]]
LAYER_BOUND_METHODS: dict[str, LayerBoundFn] = {}
"""Registry: name -> ``fn(network, region) -> (lowers, uppers)`` (lists over all H affine layers)."""


def register_layer_bound_method(name: str):
    """Decorator registering ``fn(network, region) -> (lowers, uppers)`` under ``name``."""

    def deco(fn: LayerBoundFn) -> LayerBoundFn:
        LAYER_BOUND_METHODS[name] = fn
        return fn

    return deco


def get_layer_bound_method(name: str) -> LayerBoundFn:
    key = str(name).strip().lower().replace("_", "-")
    if key not in LAYER_BOUND_METHODS:
        raise InputError(f"unknown layer-bound method {name!r}; accepted: {', '.join(sorted(LAYER_BOUND_METHODS))}")
    return LAYER_BOUND_METHODS[key]


def layer_bounds(network: Network, x0, eps, p=math.inf, method: str = "crown") -> LayerBounds:
    """Certified bounds of every pre-activation over ``B_p[x0, eps] ∩ D``.

    Parameters
    ----------
    network : Network
    x0 : array_like, shape (n_0,)
        Centre of the region, raw input units.
    eps : float
        Radius in [0, inf]; ``inf`` gives the global range of every pre-activation (over the domain, if any).
    p : {1, 2, inf}
        Input norm.
    method : str
        A name in :data:`LAYER_BOUND_METHODS` (``ibp``, ``fastlin``, ``crown``).

    Returns
    -------
    LayerBounds
        With ``eps = 0``, ``lower == upper == z(x0)`` up to the rounding allowance.
    """
    fn = get_layer_bound_method(method)
    region = Region.of(network, x0, eps, p)
    net = network.materialize() if network.is_lazy else network
    lowers, uppers = fn(net, region)
    unstable = []
    for act, l, u in zip(net.layer_activations, lowers, uppers):
        dl, du = act.derivative_bounds(l, u)
        unstable.append(int(np.count_nonzero(dl < du)))
    return LayerBounds(
        lower=tuple(lowers), upper=tuple(uppers), method=method, region=region, unstable=tuple(unstable)
    )
