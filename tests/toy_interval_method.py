"""A toy Jacobian method, defined and registered in this one module: plain interval arithmetic on the backward chain.

Step ``t`` multiplies the interval hull of ``[L_{t-1}, U_{t-1}] · [dl_t, du_t]`` (element-wise, per neuron of level
``t``) by the column panel ``V = M_t[:, cols]`` in midpoint-radius form, widened outward by a rounding allowance
(``gamma(d_t + 8) * (|mid| + rad) |V|`` plus an underflow term): certified, looser than Fast-Lip (no magnitude
chain, no dead-neuron skipping).  The products run on the chain's fixed tiles
(:func:`recurjac_scale.jacobian.products.tile_matmul`), so the bounds do not depend on the blocking.

It exists to show that a new method needs no change to any runner: importing this module registers it, and the
in-memory driver and the engine (threads or a cluster) run it by name.
"""

from __future__ import annotations

import numpy as np

from recurjac_scale._fp import gamma
from recurjac_scale.jacobian import STATE_KEYS, JacobianMethod, register_jacobian_method
from recurjac_scale.jacobian.products import tile_matmul

NAME = "toy-interval"


def interval_step(chain, t, V, priors):
    """State block of step ``t`` (``(R_blk, c)`` arrays) from the state of step ``t - 1`` for the same rows."""
    prev = priors[t - 1]
    L, U = prev["lower"], prev["upper"]  # (R_blk, d_t)
    dl, du = chain.dl[t - 1], chain.du[t - 1]  # (d_t,)
    cands = (L * dl, L * du, U * dl, U * du)  # exact up to one rounding each, covered below
    lo = np.minimum.reduce(cands)
    hi = np.maximum.reduce(cands)
    mid = 0.5 * (lo + hi)
    rad = 0.5 * (hi - lo)
    absV = np.abs(V)
    center = tile_matmul(mid, V, chain.panel, chain.row_tile)
    radius = tile_matmul(rad, absV, chain.panel, chain.row_tile)
    size = tile_matmul(np.abs(mid) + rad, absV, chain.panel, chain.row_tile)  # dominates every term summed
    g = gamma(V.shape[0] + 8, chain.dtype)
    w = g * (1.0 + g) * size + np.finfo(chain.dtype).tiny * (V.shape[0] + 8)
    # the third state array (not read by this method's steps): carried through |V| as the chain's own methods do
    key = STATE_KEYS[2]
    carried = tile_matmul(prev[key] * du, absV, chain.panel, chain.row_tile)
    return {"lower": center - radius - w, "upper": center + radius + w, key: carried + w}


TOY = register_jacobian_method(
    JacobianMethod(NAME, "backward", 0, interval_step, False, "interval arithmetic on the backward chain (a toy)")
)
