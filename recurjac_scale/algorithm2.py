"""Algorithm 2 of Zhang et al. (2019) and the per-method row-norm bounds, each in its registry.

:data:`ALGORITHM2_METHODS` maps a Jacobian method to its directional bound ``upper(J[j, :] . s_j)`` (RecurJac-B
reuses its own chain and states; the forward methods use the backward chain on the same pre-activation bounds);
:attr:`recurjac_scale.jacobian.JacobianMethod.row_norms` is a method's own bound of ``max ||J[j, :]||_q``.  What is
certified is stated in :mod:`recurjac_scale.lipschitz`, whose :func:`~recurjac_scale.lipschitz.lipschitz` uses
both.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from ._fp import TINY, gamma
from .lipschitz_norms import bound_magnitude, dual_row_norms
from .network.model import Network

__all__ = [
    "algorithm2_signs",
    "algorithm2_row_l1",
    "ALGORITHM2_METHODS",
    "register_algorithm2",
]


def algorithm2_signs(lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
    """Per row, the sign vector ``s_j`` of Algorithm 2 with strict signs: ``+1`` where ``L > 0``, ``-1`` where
    ``U < 0``, 0 elsewhere.  Shape ``(m, n_0)``, float64."""
    lower = np.asarray(lower, dtype=np.float64)
    upper = np.asarray(upper, dtype=np.float64)
    return np.where(lower > 0, 1.0, 0.0) - np.where(upper < 0, 1.0, 0.0)


def algorithm2_row_l1(lower: np.ndarray, upper: np.ndarray, signs: np.ndarray, upper_ys: np.ndarray) -> np.ndarray:
    """Certified upper bounds of ``max_{x in S} ||J[j, :](x)||_1`` per row (Zhang et al. 2019, Algorithm 2).

    Parameters
    ----------
    lower, upper : ndarray, shape (m, n_0)
        Certified Jacobian bounds.
    signs : ndarray, shape (m, n_0)
        Sign vectors with ``signs[j, k] * J[j, k](x) >= 0`` wherever ``signs[j, k] != 0`` (e.g. from
        :func:`algorithm2_signs`).
    upper_ys : ndarray, shape (m,)
        ``upper_ys[j] >= J[j, :](x) · signs[j]`` for every x in S.

    Returns
    -------
    ndarray, shape (m,)
        ``min(upper_ys[j] + sum_{signs = 0} M[j, k], sum_k M[j, k])`` rounded outward.
    """
    M = bound_magnitude(lower, upper)
    n = M.shape[1]
    rest = np.where(signs == 0, M, 0.0).sum(axis=1) * (1.0 + gamma(n))
    ys = np.asarray(upper_ys, dtype=np.float64).reshape(-1)
    alg2 = (np.maximum(ys, 0.0) + rest) * (1.0 + gamma(2))
    return np.minimum(alg2, dual_row_norms(M, 1.0))


Algorithm2Fn = Callable[..., np.ndarray]
ALGORITHM2_METHODS: dict[str, Algorithm2Fn] = {}
"""Registry: Jacobian method name -> ``fn(network, layer_bounds, jac, signs) -> upper_ys`` of shape ``(m,)``,
with ``upper_ys[j] >= J[j, :](x) · signs[j]`` over the region.  ``network`` has the output selection folded in;
``jac`` is the method's :class:`JacobianBounds`.  Methods without an entry (``fastlip``) report the plain dual
norm, as the reference does."""


def register_algorithm2(*names: str):
    """Decorator registering an Algorithm 2 directional bound for the named Jacobian methods."""

    def deco(fn: Algorithm2Fn) -> Algorithm2Fn:
        for name in names:
            ALGORITHM2_METHODS[name] = fn
        return fn

    return deco




def _interval_directional_upper(lower: np.ndarray, upper: np.ndarray, signs: np.ndarray) -> np.ndarray:
    """``sum_k max(L s, U s)``: the interval bound of ``J[j, :]·s_j`` (no tighter than the plain dual norm; used
    when there is no hidden layer, where ``L = U = J`` and it is exact)."""
    t = np.maximum(lower * signs, upper * signs)
    n = t.shape[1]
    s = t.sum(axis=1)
    return s + gamma(n) * np.abs(t).sum(axis=1) + TINY


def _backward_prefix(netc: Network, derivative_bounds, dtype):
    """The backward RecurJac chain and its states ``0 .. T-1`` (bounds of ``∂f/∂h(l)`` for l >= 1), i.e. all of
    RecurJac-B except its last (most expensive) step."""
    from .jacobian import get_jacobian_method
    from .jacobian.driver import run_steps

    jm = get_jacobian_method("recurjac-b")
    chain = jm.build_chain(netc, derivative_bounds, dtype=dtype)
    return chain, run_steps(jm, chain, last=chain.n_steps - 1)


def _directional_upper_last_step(chain, states, signs: np.ndarray) -> np.ndarray:
    """``upper_ys[j] >= J[j, :](x)·s_j`` over the region: the per-row column ``V_j = W(1) s_j`` pushed through
    the last backward step (``recurjac_step`` with a per-row operand of shape ``(m, n_1, 1)``; Zhang et al.
    2019, Algorithm 2).

    ``V_j`` is computed in floating point, and the step treats it as exact: the difference
    ``P_{T-1} Σ_T (V_j - fl(V_j))`` is bounded by ``max(|L_{T-1}|, |U_{T-1}|) D(du_T) gamma(n_0) |W(1)| |s_j|``
    and added."""
    from .jacobian.recurjac import recurjac_step

    T = chain.n_steps
    dt = chain.dtype
    W1 = np.asarray(chain.mats[T - 1], dtype=dt)  # (n_1, n_0)
    S = np.asarray(signs, dtype=dt)  # (m, n_0)
    n1, n0 = W1.shape
    V = S @ W1.T  # (m, n_1): row j is W(1) s_j
    priors = [{k: np.asarray(v) for k, v in states[s].items()} for s in range(T)]
    res = recurjac_step(chain, T, np.ascontiguousarray(V[:, :, None]), priors)
    up = np.asarray(res["upper"], dtype=np.float64)[:, 0]
    prev = priors[T - 1]
    B = np.maximum(np.abs(prev["lower"]), np.abs(prev["upper"])).astype(np.float64)  # (m, n_1) bounds |P_{T-1}|
    errV = gamma(n0, dt) * (np.abs(S).astype(np.float64) @ np.abs(W1).T.astype(np.float64))  # (m, n_1)
    with np.errstate(invalid="ignore"):
        prod = B * np.asarray(chain.du[T - 1], np.float64)[None, :] * errV
    prod = np.where(np.isnan(prod), 0.0, prod)  # inf * 0 (an overflowed bound times an exact zero) is 0
    extra = prod.sum(axis=1) * (1.0 + gamma(n1 + 2))
    return up + extra + TINY


@register_algorithm2("recurjac-b")
def _algorithm2_backward(network: Network, jac, signs: np.ndarray) -> np.ndarray:
    """Algorithm 2 for RecurJac-B: reuses the chain and states ``0 .. T-1`` of the Jacobian run (same bounds of
    ``∂f/∂h(l)`` as for the Jacobian), then one per-row last step."""
    chain, states = jac.chain, jac.states
    if chain is None or states is None:
        from .jacobian import derivative_bounds_for

        netc = network.with_outputs(jac.outputs)
        chain, states = _backward_prefix(netc, derivative_bounds_for(netc, jac.layer_bounds), np.dtype(jac.dtype))
    if chain.n_steps == 0:
        return _interval_directional_upper(jac.lower, jac.upper, signs)
    return _directional_upper_last_step(chain, states, signs)


@register_algorithm2("recurjac-f0", "recurjac-f1")
def _algorithm2_forward(network: Network, jac, signs: np.ndarray) -> np.ndarray:
    """Algorithm 2 for the forward methods: the signs ``s_j`` come from the forward (F0/F1) Jacobian bounds; the
    directional bound ``upper(J[j, :]·s_j)`` from the backward chain (states 0 .. T-1 of RecurJac-B on the same
    pre-activation bounds, then one per-row last step).  Sound because any sign vector consistent with valid
    Jacobian bounds, and any valid upper bound of ``J s``, give a valid Algorithm 2 bound; the cost is that of
    RecurJac-B without its last step."""
    from .jacobian import derivative_bounds_for

    netc = network.with_outputs(jac.outputs)
    db = derivative_bounds_for(netc, jac.layer_bounds)
    chain, states = _backward_prefix(netc, db, np.dtype(jac.dtype))
    if chain.n_steps == 0:
        return _interval_directional_upper(jac.lower, jac.upper, signs)
    return _directional_upper_last_step(chain, states, signs)
