"""Fast-Lip (Weng et al. 2018a), the layer-by-layer interval product, as a block function on a chain.

Step ``t``: from the bounds ``[L, U]`` of ``P_{t-1}`` (rows of the block), the hull of the products with the
derivative interval, ``Z = hull([L, U] · [dl_t, du_t])`` (``0 <= dl <= du``: lower ``L dl`` if ``L >= 0`` else
``L du``, upper ``U du`` if ``U >= 0`` else ``U dl``), then the interval product with ``V = M_t[:, cols]`` in
midpoint-radius form, ``mid(Z) V ± rad(Z) |V|`` (exact for an interval matrix times a point matrix).  Rounding:
each step widens by its local error ``gamma(d_t + 8) max(|zl|, |zu|) |V|`` (the priors are certified floats;
:mod:`recurjac_scale.jacobian.rounding`), and its allowance adds the priors' allowance times ``du |V|`` (both
stacked into the radius product).

A pruned level (``Chain.with_sparse``) multiplies by ``V`` sparse x dense (:func:`recurjac_scale.jacobian.chain.
panel_products`): each entry is a fixed-order sum over the stored entries of a column of ``V`` (at most ``d_t``
terms, so the same allowance covers it, and the result stays bitwise independent of the blocking).

For ReLU (``[dl, du]`` in ``{[0,0], [0,1], [1,1]}``) this is Fast-Lip as published; for leaky ReLU it is its
leaky extension (``[α, 1]``).  The same recursion is sound for every activation with ``0 <= dl <= du``
(Assumption 2), so it is allowed for all of them; only its tightness is not studied in the paper.
"""

from __future__ import annotations

import numpy as np

from .._fp import gamma
from .chain import Chain
from .products import live_neurons, panel_products
from .rounding import widen_outward, widening

__all__ = ["fastlip_step", "interval_hull"]


def interval_hull(L: np.ndarray, U: np.ndarray, dl: np.ndarray, du: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hull of ``{y s : L <= y <= U, dl <= s <= du}`` element-wise, for ``0 <= dl <= du`` broadcast over rows.

    Parameters
    ----------
    L, U : ndarray, shape (R, d)
    dl, du : ndarray, shape (d,)
    """
    lo = np.where(L >= 0, L * dl, L * du)
    hi = np.where(U >= 0, U * du, U * dl)
    return lo, hi


def fastlip_step(chain: Chain, t: int, V: np.ndarray, priors) -> dict:
    """Certified bounds of ``P_{t-1} Σ_t V`` for a block of rows by interval arithmetic (Fast-Lip).

    Parameters
    ----------
    chain : Chain
    t : int
        Layer step, ``1 <= t <= chain.n_steps``.
    V : ndarray, shape (d_t, c)
        Column panel ``M_t[:, cols]``.
    priors : sequence
        Only ``priors[t - 1]`` (state of step ``t - 1`` for the block's rows: ``"lower"``, ``"upper"``,
        ``"allowance"``, shape ``(R_blk, d_t)``) is read.

    Returns
    -------
    dict of ndarray, shape (R_blk, c)
        ``"lower"``, ``"upper"`` (widened outward for rounding) and ``"allowance"``.
    """
    dt = np.dtype(chain.dtype)
    V = np.asarray(V, dtype=dt)
    if V.ndim != 2:
        raise ValueError("fastlip takes a shared column panel V of shape (d_t, c)")
    prev = priors[t - 1]
    L = np.asarray(prev["lower"], dtype=dt)
    U = np.asarray(prev["upper"], dtype=dt)
    # Dead neurons (du = 0) have Z = [0, 0]: only the live ones are multiplied (chain.panel_products).
    live = live_neurons(chain, t)
    dl, du = chain.dl[t - 1][live], chain.du[t - 1][live]
    zl, zu = interval_hull(L[:, live], U[:, live], dl[None, :], du[None, :])
    mid = 0.5 * (zl + zu)
    rad = 0.5 * (zu - zl)
    # The products with V: the centre, and in one product with |V| the radius, the local magnitude max(|zl|, |zu|)
    # and the priors' allowance (which moves Z by at most du a): dense fixed tiles, or sparse x dense for a pruned
    # level (chain.panel_products; <= d_t terms per entry).
    R = L.shape[0]
    a_prev = np.asarray(prev["allowance"], dtype=dt)[:, live] * du[None, :]
    zmax = np.maximum(np.abs(zl), np.abs(zu))
    center, stacked = panel_products(chain, t, V, (mid, False, live), (np.vstack([rad, zmax, a_prev]), True, live))
    radius, mag, prop = stacked[:R], stacked[R : 2 * R], stacked[2 * R :]
    # Local error only (L, U are certified floats): the hull products, mid/rad, and one GEMM of length d_t, each
    # term |mid| |V| + |rad| |V| = max(|zl|, |zu|) |V|.
    n = V.shape[0] + 8 + (0 if dt == np.float64 else 8)
    w = widening(chain, t, mag, n=n)
    with np.errstate(over="ignore", invalid="ignore"):
        allowance = 2.0 * w + prop * dt.type(1.0 + 2.0 * gamma(n, dt))
    lower, upper = widen_outward(center - radius, center + radius, w)
    return {"lower": lower, "upper": upper, "allowance": allowance}
