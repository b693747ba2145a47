"""Common types of the pre-activation bound methods: the region, the result, the registry."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .._registry import Registry
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
    "dual_norm",
    "count_unstable",
    "ROUNDING_NOTES",
    "apply_clip",
    "apply_phases",
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


ROUNDING_NOTES = {
    "ibp": (
        "certified for real arithmetic: every affine layer widened outward by gamma(n) * (|W| |h| + |b|) "
        "(recurjac_scale._fp.gamma), activation values widened by their evaluation error"
    ),
    "backsub": (
        "certified for real arithmetic: relaxation intercepts certified against the exact activation (evaluation "
        "error of exp/tanh/arctan <= 32 ulp assumed); each back-substitution step adds gamma(n) * |Lambda| times "
        "a magnitude bound of its operands (recurjac_scale._fp.gamma, sized for the working dtype {dtype}); "
        "concretisation and the running intercept sum widened likewise"
    ),
}
"""How each method accounts for rounding (:attr:`LayerBounds.rounding`)."""


def _kinks(act) -> tuple[float, ...] | None:
    """Points where ``act`` stops being affine for the unstable count; ``None``: smooth (count 0-crossings)."""
    from ..activations import HardSigmoid, LeakyReLU

    if act.is_identity:
        return ()
    if isinstance(act, LeakyReLU):
        return () if act.alpha == 1.0 else (0.0,)
    if isinstance(act, HardSigmoid):
        return act._breaks
    return None


def count_unstable(act, lower: np.ndarray, upper: np.ndarray) -> int:
    """Number of neurons whose interval strictly contains a kink of ``act`` (ReLU family: ``lower < 0 < upper``;
    hard-sigmoid: a break point), or 0 for smooth activations (``lower < 0 < upper``); 0 for the identity."""
    kinks = _kinks(act)
    if kinks is None:
        kinks = (0.0,)
    mask = np.zeros(np.shape(lower), dtype=bool)
    for k in kinks:
        mask |= (lower < k) & (k < upper)
    return int(np.count_nonzero(mask))


def apply_clip(clip, k: int, lower: np.ndarray, upper: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Layer ``k``'s bounds intersected with the known bounds ``clip[k] = (lower, upper)`` (``clip`` may be
    ``None``, or hold ``None`` for a layer).

    Raises
    ------
    EmptyRegionError
        If the intersection is empty for some neuron (the region is empty).
    """
    if clip is None or k >= len(clip) or clip[k] is None:
        return lower, upper
    cl, cu = (np.asarray(v, dtype=np.float64) for v in clip[k])
    if cl.shape != lower.shape or cu.shape != upper.shape:
        raise InputError(f"clip bounds of layer {k} have shape {cl.shape}; need {lower.shape}")
    lo, hi = np.maximum(lower, cl), np.minimum(upper, cu)
    if (lo > hi).any():
        from ..errors import EmptyRegionError

        j = int(np.argmax(lo > hi))
        raise EmptyRegionError(f"layer {k} neuron {j}: bounds [{lo[j]}, {hi[j]}] are empty; the region is empty")
    return lo, hi


def apply_phases(act, dl: np.ndarray, du: np.ndarray, phase) -> tuple[np.ndarray, np.ndarray]:
    """Derivative bounds of a ReLU-family layer on a region restricted by split constraints: ``phase[j] = +1``
    (the region has ``z_j >= 0``: derivative 1), ``-1`` (``z_j <= 0``: derivative ``alpha``), 0 (unchanged).

    At ``z_j = 0`` only one one-sided derivative is kept; the two branches of a split together keep both, which is
    what a bound of the Lipschitz constant over their union needs (branch-and-bound, :mod:`recurjac_scale.bab`).
    """
    if phase is None:
        return dl, du
    ph = np.asarray(phase)
    if not ph.any():
        return dl, du
    from ..activations import LeakyReLU

    if not isinstance(act, LeakyReLU):
        raise InputError(f"split constraints (phases) need a relu / leaky_relu layer, got {act}")
    a = float(act.alpha)
    dl = np.where(ph > 0, 1.0, np.where(ph < 0, a, dl))
    du = np.where(ph > 0, 1.0, np.where(ph < 0, a, du))
    return dl, du


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
        Per layer, the number of *unstable* neurons (:func:`count_unstable`): for the ReLU family those with
        ``lower < 0 < upper``; for hard-sigmoid those whose interval strictly contains a break point; for smooth
        activations (sigmoid, tanh, arctan, elu, softplus) those whose interval strictly contains 0 (where their
        curvature changes or, for elu/softplus, around which they bend most); 0 for identity layers.
    rounding : str
        How floating-point rounding is accounted for.
    phases : tuple of ndarray or None
        Split constraints of a region restricted by branch-and-bound: per layer an int8 array, ``+1`` where the
        region has ``z >= 0``, ``-1`` where it has ``z <= 0``, 0 elsewhere (:func:`apply_phases`; ReLU family
        only).  ``None``: no constraint.
    """

    lower: tuple
    upper: tuple
    method: str
    region: Region
    unstable: tuple = ()
    rounding: str = ROUNDING_NOTES["ibp"]
    phases: tuple | None = None

    def derivative_bounds(self, network: Network) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per layer, ``(dl, du)`` with ``dl <= sigma_k'(z) <= du`` on the bounds (Zhang et al. 2019, Eq. 6-8),
        with the split constraints :attr:`phases` applied."""
        out = []
        for k, (act, l, u) in enumerate(zip(network.layer_activations, self.lower, self.upper)):
            dl, du = act.derivative_bounds(l, u)
            ph = self.phases[k] if self.phases is not None and k < len(self.phases) else None
            out.append(apply_phases(act, dl, du, ph))
        return out

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "eps": self.region.eps,
            "p": self.region.p,
            "unstable": list(self.unstable),
            "rounding": self.rounding,
            "widths": [int(l.shape[0]) for l in self.lower],
        }


LayerBoundFn = Callable[..., tuple[list, list]]
LAYER_BOUND_METHODS: Registry = Registry("layer-bound method", sep="-")
"""Registry: name -> ``fn(network, region, *, block_rows, dtype, **options) -> (lowers, uppers)`` (lists over
all H affine layers, float64, certified)."""


def register_layer_bound_method(name: str):
    """Decorator registering ``fn(network, region, *, block_rows=None, dtype=float64, **options) -> (lowers,
    uppers)`` under ``name``."""

    def deco(fn: LayerBoundFn) -> LayerBoundFn:
        return LAYER_BOUND_METHODS.register(name, fn)

    return deco


def get_layer_bound_method(name: str) -> LayerBoundFn:
    """The registered function of a layer-bound method (normalised name; :class:`InputError` listing the accepted
    ones otherwise)."""
    return LAYER_BOUND_METHODS.lookup(name)


def layer_bounds(
    network: Network,
    x0,
    eps,
    p=math.inf,
    method: str = "crown",
    *,
    block_rows: int | None = None,
    dtype=np.float64,
    **options,
) -> LayerBounds:
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
    block_rows : int, optional
        Rows of a layer processed together by the back-substitution methods (memory: a few
        ``block_rows x widest layer`` matrices); results do not depend on it.
    dtype : {numpy.float64, numpy.float32}
        Working precision of the GEMMs (``fastlin``, ``crown``); bounds are certified either way.
    **options
        Method-specific options, e.g. ``relu_lower`` and ``intersect_ibp`` for ``crown``.

    Returns
    -------
    LayerBounds
        With ``eps = 0``, ``lower == upper == z(x0)`` up to the rounding allowance.

    Raises
    ------
    InputError
        Unknown method or option, bad eps/p/x0, an activation the method does not support (``fastlin``).
    """
    fn = get_layer_bound_method(method)
    name = LAYER_BOUND_METHODS.resolve(method)
    region = Region.of(network, x0, eps, p)
    net = network.materialize() if network.is_lazy else network
    try:
        lowers, uppers = fn(net, region, block_rows=block_rows, dtype=dtype, **options)
    except TypeError as exc:
        if "unexpected keyword" in str(exc):
            raise InputError(f"method {name!r} does not accept these options: {exc}") from None
        raise
    lowers = [np.asarray(v, dtype=np.float64) for v in lowers]
    uppers = [np.asarray(v, dtype=np.float64) for v in uppers]
    # Defensive: a NaN bound is replaced by the trivially sound infinite one.
    lowers = [np.where(np.isnan(v), -np.inf, v) for v in lowers]
    uppers = [np.where(np.isnan(v), np.inf, v) for v in uppers]
    unstable = tuple(count_unstable(act, l, u) for act, l, u in zip(net.layer_activations, lowers, uppers))
    rounding = ROUNDING_NOTES.get(name, ROUNDING_NOTES["backsub"]).format(dtype=np.dtype(dtype).name)
    return LayerBounds(
        lower=tuple(lowers), upper=tuple(uppers), method=name, region=region, unstable=unstable, rounding=rounding
    )
