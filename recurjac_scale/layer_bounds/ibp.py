"""Interval bound propagation (IBP)."""

from __future__ import annotations

import math

import numpy as np

from .._fp import TINY, gamma
from ..network.model import Network
from .base import Region, apply_clip, register_layer_bound_method
from ..relaxations import value_bounds

__all__ = ["ibp", "first_layer_bounds", "affine_interval"]


def _dual_row_norms(w: np.ndarray, q: float) -> np.ndarray:
    if q == 1.0:
        return np.abs(w).sum(axis=1)
    if q == 2.0:
        return np.sqrt((w * w).sum(axis=1))
    return np.abs(w).max(axis=1)


def _nan_outward(lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A NaN end (only after an overflow, ``inf - inf``) becomes ``-inf`` / ``+inf``, which is sound; a NaN would
    otherwise reach the relaxations of the next layer (NonFiniteError in Fast-Lin / CROWN)."""
    if np.isnan(lo).any() or np.isnan(hi).any():
        lo = np.where(np.isnan(lo), -np.inf, lo)
        hi = np.where(np.isnan(hi), np.inf, hi)
    return lo, hi


def affine_interval(w: np.ndarray, b: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Certified interval of ``w @ h + b`` for ``h`` in the box ``[lo, hi]`` (midpoint-radius form, widened
    outward for rounding).  ``w``: (n_out, n_in); ``lo``, ``hi``: (n_in,), may hold infinities."""
    absw = np.abs(w)
    finite = np.isfinite(lo) & np.isfinite(hi)
    if finite.all():
        mid = 0.5 * (lo + hi)
        rad = 0.5 * (hi - lo)
        c = w @ mid + b
        r = absw @ rad
        slack = gamma(w.shape[1] + 1) * (absw @ (np.abs(mid) + rad) + np.abs(b) + r) + TINY
        return _nan_outward(c - r - slack, c + r + slack)
    # Infinite ends: sum the extreme products term by term (0 * inf counts as 0).
    wp, wn = np.maximum(w, 0.0), np.minimum(w, 0.0)
    with np.errstate(invalid="ignore"):
        lo_t = np.where(wp != 0, wp * lo, 0.0) + np.where(wn != 0, wn * hi, 0.0)
        hi_t = np.where(wp != 0, wp * hi, 0.0) + np.where(wn != 0, wn * lo, 0.0)
    lo_z = lo_t.sum(axis=1) + b
    hi_z = hi_t.sum(axis=1) + b
    fin_lo = np.where(np.isfinite(lo), np.abs(lo), 0.0)
    fin_hi = np.where(np.isfinite(hi), np.abs(hi), 0.0)
    slack = gamma(w.shape[1] + 1) * (absw @ np.maximum(fin_lo, fin_hi) + np.abs(b)) + TINY
    return _nan_outward(lo_z - slack, hi_z + slack)


def first_layer_bounds(w: np.ndarray, b: np.ndarray, region: Region) -> tuple[np.ndarray, np.ndarray]:
    """Bounds of ``w @ x + b`` over ``B_p[x0, eps] ∩ D``: the ball bound ``w x0 + b ± eps ||w_r||_q`` intersected
    with the box bound (both are sound, so their intersection is)."""
    lo_box, hi_box = region.box
    l_box, u_box = affine_interval(w, b, lo_box, hi_box)
    if region.p == math.inf or not math.isfinite(region.eps):
        return l_box, u_box
    c = w @ region.x0 + b
    r = region.eps * _dual_row_norms(w, region.q) * (1.0 + gamma(w.shape[1] + 2))
    slack = gamma(w.shape[1] + 1) * (np.abs(w) @ np.abs(region.x0) + np.abs(b)) + TINY
    lo, hi = _nan_outward(c - r - slack, c + r + slack)
    return np.maximum(lo, l_box), np.minimum(hi, u_box)


@register_layer_bound_method("ibp")
def ibp(
    network: Network, region: Region, *, block_rows: int | None = None, dtype=np.float64, clip=None
) -> tuple[list, list]:
    """Interval bound propagation: first layer from the dual norm of each weight row, then interval arithmetic
    through every monotone activation (activation values widened by their evaluation error).

    ``block_rows`` and ``dtype`` are accepted for a uniform interface; IBP needs only matrix-vector products and
    always runs in float64.  ``clip``: known bounds of the layers over the region, intersected with each layer
    before the next (see :func:`~recurjac_scale.layer_bounds.backsub.backsubstitute`).

    Returns
    -------
    lowers, uppers : list of ndarray, shapes (n_k,) for k = 1..H, float64
    """
    lowers, uppers = [], []
    ws = [np.asarray(w, dtype=np.float64) for w in network.weights]
    bs = [np.asarray(b, dtype=np.float64) for b in network.biases]
    l, u = apply_clip(clip, 0, *first_layer_bounds(ws[0], bs[0], region))
    lowers.append(l)
    uppers.append(u)
    for k in range(1, network.n_layers):
        act = network.layer_activations[k - 1]
        hl, hu = value_bounds(act.value, l, u)  # sigma is nondecreasing (Assumption 2); widened for rounding
        l, u = apply_clip(clip, k, *affine_interval(ws[k], bs[k], hl, hu))
        lowers.append(l)
        uppers.append(u)
    return lowers, uppers
