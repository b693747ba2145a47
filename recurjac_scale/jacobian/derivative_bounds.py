"""Derivative bounds of the hidden layers from their pre-activation bounds (Zhang et al. 2019, Eq. 6-8): the input
of every Jacobian method (the ``Σ_t`` of :mod:`recurjac_scale.jacobian.chain`)."""

from __future__ import annotations

import numpy as np

from ..errors import InputError, ShapeMismatchError
from ..layer_bounds.base import apply_phases

__all__ = ["derivative_bounds_for"]


def derivative_bounds_for(network, lb) -> list[tuple[np.ndarray, np.ndarray]]:
    """Derivative bounds ``(dl, du)`` of every hidden layer of ``network`` from pre-activation bounds ``lb``
    (Eq. 6-8), intersected with the activation's global derivative range (both are sound); split constraints
    (``lb.phases``) fix the derivative of the split neurons (:func:`recurjac_scale.layer_bounds.base.apply_phases`)."""
    H = network.n_layers
    if len(lb.lower) < H - 1:
        raise ShapeMismatchError(f"layer bounds for {len(lb.lower)} layers; the network has {H - 1} hidden layers")
    out = []
    for k in range(H - 1):
        act = network.activations[k]
        lo, hi = np.asarray(lb.lower[k], np.float64), np.asarray(lb.upper[k], np.float64)
        if lo.shape != (network.widths[k + 1],) or hi.shape != lo.shape:
            raise ShapeMismatchError(
                f"layer bounds of layer {k} have shape {lo.shape}; need ({network.widths[k + 1]},)"
            )
        if np.isnan(lo).any() or np.isnan(hi).any() or (lo > hi).any():
            raise InputError(f"layer bounds of layer {k} are NaN or empty (lower > upper)")
        dl, du = act.derivative_bounds(lo, hi)
        phases = getattr(lb, "phases", None)
        if phases is not None and k < len(phases):
            dl, du = apply_phases(act, dl, du, phases[k])
        rlo, rhi = act.derivative_range
        dl = np.maximum(np.asarray(dl, np.float64), rlo)
        du = np.minimum(np.asarray(du, np.float64), rhi)
        out.append((dl, du))
    return out
