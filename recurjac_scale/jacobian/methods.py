"""Registry of the Jacobian bound methods: ``fastlip``, ``recurjac-b``, ``recurjac-f0``, ``recurjac-f1``.

Each entry is a :class:`JacobianMethod`, the one interface every runner uses: how to build its chain, its step
(block) function, which earlier states a step reads, how the last state becomes the ``(m, n_0)`` Jacobian bounds,
and its cost model (see :mod:`.chain` for the loop, :mod:`.cost` for the costs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from .._fp import gamma
from .._registry import Registry
from ..layer_bounds.base import LayerBounds
from .chain import DEFAULT_PANEL, STATE_KEYS, Chain, top_state
from .cost import ChainCost, chain_cost
from .derivative_bounds import derivative_bounds_for
from .products import finish_products
from .rounding import widen_outward, widening
from .sparse_policy import with_sparse_levels
from .fastlip import fastlip_step, interval_hull
from .recurjac import recurjac_step

__all__ = [
    "JacobianMethod", "JACOBIAN_METHODS", "register_jacobian_method", "get_jacobian_method", "finish_chain",
    "finish_allowance", "final_allowance",
]


def finish_chain(chain: Chain, state: dict) -> tuple[np.ndarray, np.ndarray]:
    """Turn the last state (``P_T`` bounds, shape ``(R, d_{T+1})``) into Jacobian bounds of shape ``(m, n_0)``.

    Backward: identity.  Forward: transpose.  F1 (``chain.finish_mat`` set): ``Y = ∂f/∂h(1) = P_Tᵀ``; per neuron
    ``r`` of layer 1 the hull of ``[L, U]·[dl_r, du_r]``, then the interval product with ``W(1)`` in
    midpoint-radius form, widened outward by its local error ``gamma(n_1 + 16) |W(1)ᵀ| max(|zl|, |zu|)``
    (:func:`finish_allowance`, :mod:`recurjac_scale.jacobian.rounding`).  With a pruned first layer
    (:attr:`Chain.sparse_finish`) the products run as CSR ``W(1)ᵀ`` x dense: at most ``n_1`` terms per entry (the
    same allowance), bitwise independent of the blocking.

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
    lower, upper, _ = _finish(chain, L, U, None)
    return lower, upper


def _finish(chain: Chain, L: np.ndarray, U: np.ndarray, A):
    """The F1 finish: ``(lower, upper, allowance)``, each ``(m, n_0)`` (allowance ``None`` when ``A`` is)."""
    # W(1): (n_1, n_0).  Dead neurons of layer 1 (du = 0) have the hull [0, 0]: only the live ones are multiplied.
    live = np.flatnonzero(chain.finish_du > 0)
    dl, du = chain.finish_dl[live], chain.finish_du[live]
    zl, zu = interval_hull(L[live], U[live], dl[:, None], du[:, None])  # (live, m): bounds of sigma'_r Y[:, r]^T
    mid = 0.5 * (zl + zu)
    rad = 0.5 * (zu - zl)
    m = L.shape[1]
    # (n_0, m) each: W(1)ᵀ mid, and in one product |W(1)ᵀ| [rad, max(|zl|, |zu|), du a]; dense fixed tiles, or CSR
    # W(1)ᵀ x dense for a pruned first layer (chain.finish_products: fixed-order sums of <= n_1 terms).
    right = [rad, np.maximum(np.abs(zl), np.abs(zu))]
    if A is not None:
        right.append(np.asarray(A, dtype=chain.dtype)[live] * du[:, None])
    center, stacked = finish_products(chain, (mid, False), (np.hstack(right), True), keep=live)
    radius, mag = stacked[:, :m], stacked[:, m : 2 * m]
    # Local error only (L, U are certified floats): hull products, mid/rad, one GEMM of length n_1.
    n = int(chain.finish_mat.shape[0]) + 16 + (0 if chain.dtype == np.float64 else 8)
    w = widening(chain, 0, mag, n=n)
    lower, upper = widen_outward(center - radius, center + radius, w)
    allowance = None
    if A is not None:
        with np.errstate(over="ignore", invalid="ignore"):
            allowance = np.ascontiguousarray((2.0 * w + stacked[:, 2 * m :] * (1.0 + 2.0 * gamma(n, chain.dtype))).T)
    return np.ascontiguousarray(lower.T), np.ascontiguousarray(upper.T), allowance


def finish_allowance(chain: Chain, state: dict) -> np.ndarray:
    """The allowance of the F1 finish, shape ``(m, n_0)``: twice its local widening plus the last state's
    allowance carried through the hull (``<= du a``) and ``|W(1)ᵀ|``."""
    L = np.asarray(state["lower"], dtype=chain.dtype)
    U = np.asarray(state["upper"], dtype=chain.dtype)
    return _finish(chain, L, U, state["allowance"])[2]


def final_allowance(chain, state: dict) -> np.ndarray:
    """The allowance of the ``(m, n_0)`` Jacobian bounds from the last state: the last step's for B and F0
    (transposed for F0), and for F1 the finish's (:func:`recurjac_scale.jacobian.methods.finish_chain`)."""
    A = np.asarray(state["allowance"], dtype=chain.dtype)
    if chain.finish_mat is None:
        return A if chain.direction == "backward" else np.ascontiguousarray(A.T)
    return finish_allowance(chain, state)


@dataclass(frozen=True)
class JacobianMethod:
    """One Jacobian bound method: everything a runner needs, and nothing about where it runs.

    The in-memory driver (:func:`recurjac_scale.jacobian.driver.run_chain`) and the scale engine
    (:mod:`recurjac_scale.engine`) call exactly these, and nothing else of a method:

    ==============================================  ==============================================================
    ``build_chain(network, bounds, ...) -> Chain``  the chain ``M_0 Σ_1 M_1 ... Σ_T M_T`` of the method
                                                    (:mod:`.chain`), for a network with its outputs folded in
    ``priors(t) -> tuple of int``                   the earlier states (rows of the task, all columns) step ``t``
                                                    reads
    ``step_block(chain, t, rows, cols, priors)``    the state block ``(rows, cols)`` of step ``t``: a dict
                                                    (:data:`.chain.STATE_KEYS`) of ``(R_blk, c)`` arrays; a pure
                                                    function of the chain and the priors' rows
    ``finish(chain, state) -> (lower, upper)``      the ``(m, n_0)`` Jacobian bounds from the whole last state
    ``finish_allowance(chain, state)``              what rounding may have cost them, ``(m, n_0)``
    ``cost(chain) -> ChainCost``                    FLOPs, bytes and peak memory of a ``(rows x cols)`` task at step
                                                    ``t`` (:mod:`.cost`), which the engine plans with
    ==============================================  ==============================================================

    A new method is one module that builds a :class:`JacobianMethod` (or a subclass overriding ``finish`` /
    ``cost``) and calls :func:`register_jacobian_method`; no runner changes.  Results must not depend on the
    blocking (rows, columns): see :mod:`.chain`, "Block interface".

    Attributes
    ----------
    name : str
    direction : {"backward", "forward"}
    start : int
        Forward chains: 0 (F0) or 1 (F1).
    step : callable
        ``step(chain, t, V, priors) -> dict`` of ``(R_blk, c)`` arrays (keys :data:`.chain.STATE_KEYS`), with
        ``V = M_t[:, cols]`` ``(d_t, c)`` and ``priors[s]`` the state of step ``s`` for the task's rows (``None``
        for the steps not in :meth:`priors`).
    uses_all_priors : bool
        ``True`` when step ``t`` reads the states of every earlier step ``0..t-1`` (RecurJac), ``False`` when it
        reads only step ``t - 1`` (Fast-Lip).
    description : str
    cost_model : {"", "recursive", "interval"}
        The kernel family :meth:`cost` counts (:func:`.cost.chain_cost`); empty: ``"recursive"`` when
        ``uses_all_priors``, else ``"interval"``.
    run : callable, optional
        A method that is not a chain of block steps (``linear-jacobian``): ``run(netc, region, layer_bounds,
        derivative_bounds, *, dtype, panel, sparse_threshold, stored_sparse) -> (lower, upper, chain, states,
        info)``, in memory; :func:`recurjac_scale.jacobian.jacobian_bounds` calls it instead of the chain
        loop; the engine runs it only through its ``stage`` (below).
    row_norms : callable, optional
        The method's own certified upper bounds of ``max_{x in S} ||J[j, :](x)||_q`` per output row:
        ``row_norms(network, jacobian_bounds, q) -> ndarray (m,)`` or ``None`` for a norm it does not treat
        (``linear-jacobian``: one linear objective per row through the chords of ``|.|``).
        :func:`recurjac_scale.lipschitz.lipschitz` takes, per row, the smaller of this and Proposition 2's.
    stage : object, optional
        The blockwise form of a ``run`` method, which the engine runs instead of refusing it: an object with
        ``base`` (the name of the chain method run first, whose states it reads), ``block`` (default block size),
        ``context_bytes(widths)``, ``task_bytes(widths, block)`` and ``tightened_neurons(dl, du)`` (``linear-jacobian``:
        :data:`recurjac_scale.jacobian.linear_blocks.LINEAR_STAGE`, run by
        :mod:`recurjac_scale.engine.linear_stage`).
    """

    name: str
    direction: str
    start: int
    step: Callable
    uses_all_priors: bool
    description: str = ""
    cost_model: str = ""
    run: Callable | None = None
    row_norms: Callable | None = None
    stage: object = None

    def build_chain(
        self, network, bounds, *, dtype=np.float64, panel: int = DEFAULT_PANEL, sparse_levels: tuple = ()
    ) -> Chain:
        """The chain of this method for a network whose output selection is folded in (module :mod:`.chain`).

        ``bounds``: the network's :class:`LayerBounds` (pre-activation bounds), or derivative bounds ``[(dl, du),
        ...]`` per hidden layer.  ``sparse_levels``: levels that get CSR copies whatever their density
        (:func:`.sparse_policy.with_sparse_levels`; the engine ships the client's choice to its workers).
        """
        derivative_bounds = derivative_bounds_for(network, bounds) if isinstance(bounds, LayerBounds) else bounds
        if self.direction == "backward":
            chain = Chain.backward(network, derivative_bounds, dtype=dtype, panel=panel)
        else:
            chain = Chain.forward(network, derivative_bounds, start=self.start, dtype=dtype, panel=panel)
        return with_sparse_levels(chain, sparse_levels)

    def priors(self, t: int) -> tuple[int, ...]:
        """The earlier steps whose state (rows of the block, all columns) step ``t`` reads."""
        return tuple(range(t)) if self.uses_all_priors else (t - 1,)

    def initial_state(self, chain: Chain, rows=slice(None)) -> dict:
        """State 0 (exact, the top ``M_0``) for the given rows (:func:`.chain.top_state`)."""
        return top_state(chain, rows)

    def step_block(self, chain: Chain, t: int, rows: slice, cols: slice, priors: dict) -> dict:
        """Block ``(rows, cols)`` of step ``t``: ``step(chain, t, M_t[:, cols], ...)`` with the states of the steps
        :meth:`priors` for these rows.

        ``priors`` maps a step ``s >= 1`` to its state for ``rows`` (all columns); state 0 is taken from the chain.
        Returns a dict of ``(rows, cols)`` arrays (:data:`.chain.STATE_KEYS`).
        """
        V = np.asarray(chain.mats[t - 1][:, cols], dtype=chain.dtype)
        pri: list = [None] * t
        for s in self.priors(t):
            pri[s] = top_state(chain, rows) if s == 0 else priors[s]
        return self.step(chain, t, V, pri)

    def finish(self, chain: Chain, state: dict) -> tuple[np.ndarray, np.ndarray]:
        """Last state -> ``(lower, upper)`` of shape ``(m, n_0)`` (:func:`finish_chain`)."""
        return finish_chain(chain, state)

    def finish_allowance(self, chain: Chain, state: dict) -> np.ndarray:
        """What rounding may have cost the finished bounds, shape ``(m, n_0)``
        (:func:`final_allowance`)."""
        return final_allowance(chain, state)

    def cost(self, chain: Chain) -> ChainCost:
        """The cost model of this method on ``chain`` (:func:`.cost.chain_cost`)."""
        depth = self.cost_model or ("recursive" if self.uses_all_priors else "interval")
        return chain_cost(chain, self.priors, depth=depth, state_keys=STATE_KEYS)


JACOBIAN_METHODS: Registry = Registry("Jacobian method", sep="-")
"""Registry: name -> :class:`JacobianMethod` (aliases ``b``, ``f0``, ``f1``, ``recurjac``, ``fast-lip``)."""


def register_jacobian_method(method: JacobianMethod, aliases=()) -> JacobianMethod:
    """Add ``method`` to :data:`JACOBIAN_METHODS` under ``method.name`` (and ``aliases``); returns it."""
    return JACOBIAN_METHODS.register(method.name, method, aliases)


def get_jacobian_method(name: str) -> JacobianMethod:
    """Look a method up by name (case-insensitive; ``_`` and ``-`` interchangeable; aliases ``b``, ``f0``, ``f1``).

    Raises
    ------
    InputError
        For an unknown name, listing the accepted ones.
    """
    return JACOBIAN_METHODS.lookup(name)


register_jacobian_method(
    JacobianMethod(
        "fastlip", "backward", 0, fastlip_step, False,
        "Fast-Lip (Weng et al. 2018a): layer-by-layer interval product on the backward chain",
    ),
    aliases=("fast-lip",),
)
register_jacobian_method(
    JacobianMethod(
        "recurjac-b", "backward", 0, recurjac_step, True,
        "RecurJac, backward (Zhang et al. 2019, Algorithm 1): rows = outputs",
    ),
    aliases=("recurjac", "recurjac-backward", "backward", "b"),
)
register_jacobian_method(
    JacobianMethod(
        "recurjac-f0", "forward", 0, recurjac_step, True,
        "RecurJac, forward on the transposed chain: rows = inputs; bounds of every dz(l)/dx",
    ),
    aliases=("f0", "recurjac-forward"),
)
register_jacobian_method(
    JacobianMethod(
        "recurjac-f1", "forward", 1, recurjac_step, True,
        "RecurJac, forward from h(1) (rows = layer-1 neurons), then one interval product with Σ(1) W(1)",
    ),
    aliases=("f1",),
)
