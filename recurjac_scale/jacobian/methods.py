"""Registry of the Jacobian bound methods: ``fastlip``, ``recurjac-b``, ``recurjac-f0``, ``recurjac-f1``.

Each entry is a :class:`JacobianMethod`: how to build its chain, its step (block) function, which earlier states
a step reads, and how the last state becomes the ``(m, n_0)`` Jacobian bounds (see :mod:`.chain` for the loop).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from .._fp import gamma
from ..errors import InputError
from .chain import Chain, DEFAULT_PANEL, derivative_bounds_for, finish_products, widen_outward
from .fastlip import fastlip_step, interval_hull
from .recurjac import recurjac_step

__all__ = ["JacobianMethod", "JACOBIAN_METHODS", "register_jacobian_method", "get_jacobian_method", "finish_chain"]


def finish_chain(chain: Chain, state: dict) -> tuple[np.ndarray, np.ndarray]:
    """Turn the last state (``P_T`` bounds, shape ``(R, d_{T+1})``) into Jacobian bounds of shape ``(m, n_0)``.

    Backward: identity.  Forward: transpose.  F1 (``chain.finish_mat`` set): ``Y = ∂f/∂h(1) = P_Tᵀ``; per neuron
    ``r`` of layer 1 the hull of ``[L, U]·[dl_r, du_r]``, then the interval product with ``W(1)`` in
    midpoint-radius form, widened outward by ``gamma(n_1 + 16) * |W(1)|ᵀ D(du) mag_T`` (twice Higham's bound; ``max(|L|, |U|) <= mag_T``
    up to the earlier widening).  With a pruned first layer (:attr:`Chain.sparse_finish`) the three products run
    as CSR ``W(1)ᵀ`` x dense: at most ``n_1`` terms per entry (the same allowance), bitwise independent of the
    blocking.

    Returns
    -------
    lower, upper : ndarray, shape (m, n_0)
    """
    L = np.asarray(state["lower"], dtype=chain.dtype)
    U = np.asarray(state["upper"], dtype=chain.dtype)
    if chain.finish_mat is None:
        if chain.direction == "backward":
            return L, U
        return np.ascontiguousarray(L.T), np.ascontiguousarray(U.T)
    n_1 = int(chain.finish_mat.shape[0])  # W(1): (n_1, n_0)
    # Dead neurons of layer 1 (du = 0) have the hull [0, 0]: only the live ones are multiplied.
    live = np.flatnonzero(chain.finish_du > 0)
    dl, du = chain.finish_dl[live], chain.finish_du[live]
    zl, zu = interval_hull(L[live], U[live], dl[:, None], du[:, None])  # (live, m): bounds of sigma'_r Y[:, r]^T
    mid = 0.5 * (zl + zu)
    rad = 0.5 * (zu - zl)
    # (n_0, m) each: W(1)ᵀ mid, |W(1)ᵀ| rad, |W(1)ᵀ| D(du) mag_T; dense fixed tiles, or CSR W(1)ᵀ x dense for a
    # pruned first layer (chain.finish_products: fixed-order sums of <= n_1 terms, same allowance).
    mag_in = du[:, None] * np.asarray(state["mag"], dtype=chain.dtype)[live]
    center, radius, mag = finish_products(chain, (mid, False), (rad, True), (mag_in, True), keep=live)
    # Local error only (L, U are certified floats): hull products, mid/rad, one GEMM of length n_1.
    n = n_1 + 16 + (0 if chain.dtype == np.float64 else 8)
    g = gamma(n, chain.dtype)
    w = g * (1.0 + g) * mag + np.finfo(chain.dtype).tiny * n
    lower, upper = widen_outward(center - radius, center + radius, w)
    return np.ascontiguousarray(lower.T), np.ascontiguousarray(upper.T)


@dataclass(frozen=True)
class JacobianMethod:
    """One Jacobian bound method.

    Attributes
    ----------
    name : str
    direction : {"backward", "forward"}
    start : int
        Forward chains: 0 (F0) or 1 (F1).
    step : callable
        ``step(chain, t, V, priors) -> dict`` of ``(R_blk, c)`` arrays (``"lower"``, ``"upper"``, ``"mag"``).
    uses_all_priors : bool
        ``True`` when step ``t`` reads the states of every earlier step ``0..t-1`` (RecurJac), ``False`` when it
        reads only step ``t - 1`` (Fast-Lip).
    description : str
    run : callable, optional
        A method that is not a chain of block steps (``linear-jacobian``): ``run(netc, region, layer_bounds,
        derivative_bounds, *, dtype, panel, sparse_threshold, stored_sparse) -> (lower, upper, chain, states,
        info)``, in memory only; :func:`recurjac_scale.jacobian.jacobian_bounds` calls it instead of the chain
        loop, and the engine does not offer it.
    """

    name: str
    direction: str
    start: int
    step: Callable
    uses_all_priors: bool
    description: str = ""
    run: Callable | None = None

    def build_chain(self, network, bounds, *, dtype=np.float64, panel: int = DEFAULT_PANEL) -> Chain:
        """The chain of this method for a network whose output selection is folded in (module :mod:`.chain`).

        ``bounds``: the network's :class:`LayerBounds` (pre-activation bounds), or derivative bounds ``[(dl, du),
        ...]`` per hidden layer.
        """
        derivative_bounds = derivative_bounds_for(network, bounds) if hasattr(bounds, "lower") else bounds
        if self.direction == "backward":
            return Chain.backward(network, derivative_bounds, dtype=dtype, panel=panel)
        return Chain.forward(network, derivative_bounds, start=self.start, dtype=dtype, panel=panel)

    def priors(self, t: int) -> tuple[int, ...]:
        """The earlier steps whose state (rows of the block, all columns) step ``t`` reads."""
        return tuple(range(t)) if self.uses_all_priors else (t - 1,)

    def n_steps(self, chain: Chain) -> int:
        return chain.n_steps

    def finish(self, chain: Chain, state: dict) -> tuple[np.ndarray, np.ndarray]:
        """Last state -> ``(lower, upper)`` of shape ``(m, n_0)`` (:func:`finish_chain`)."""
        return finish_chain(chain, state)


JACOBIAN_METHODS: dict[str, JacobianMethod] = {}
"""Registry: name -> :class:`JacobianMethod`."""


def register_jacobian_method(method: JacobianMethod) -> JacobianMethod:
    JACOBIAN_METHODS[method.name] = method
    return method


_ALIASES = {
    "recurjac": "recurjac-b",
    "recurjac-backward": "recurjac-b",
    "backward": "recurjac-b",
    "b": "recurjac-b",
    "f0": "recurjac-f0",
    "f1": "recurjac-f1",
    "recurjac-forward": "recurjac-f0",
    "fast-lip": "fastlip",
}


def get_jacobian_method(name: str) -> JacobianMethod:
    """Look a method up by name (case-insensitive; ``_`` and ``-`` interchangeable; aliases ``b``, ``f0``, ``f1``).

    Raises
    ------
    InputError
        For an unknown name, listing the accepted ones.
    """
    key = str(name).strip().lower().replace("_", "-")
    key = _ALIASES.get(key, key)
    if key not in JACOBIAN_METHODS:
        raise InputError(f"unknown Jacobian method {name!r}; accepted: {', '.join(sorted(JACOBIAN_METHODS))}")
    return JACOBIAN_METHODS[key]


register_jacobian_method(
    JacobianMethod(
        "fastlip", "backward", 0, fastlip_step, False,
        "Fast-Lip (Weng et al. 2018a): layer-by-layer interval product on the backward chain",
    )
)
register_jacobian_method(
    JacobianMethod(
        "recurjac-b", "backward", 0, recurjac_step, True,
        "RecurJac, backward (Zhang et al. 2019, Algorithm 1): rows = outputs",
    )
)
register_jacobian_method(
    JacobianMethod(
        "recurjac-f0", "forward", 0, recurjac_step, True,
        "RecurJac, forward on the transposed chain: rows = inputs; bounds of every dz(l)/dx",
    )
)
register_jacobian_method(
    JacobianMethod(
        "recurjac-f1", "forward", 1, recurjac_step, True,
        "RecurJac, forward from h(1) (rows = layer-1 neurons), then one interval product with Σ(1) W(1)",
    )
)
