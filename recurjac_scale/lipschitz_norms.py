"""Certified norms of a Jacobian magnitude bound ``M = max(|L|, |U|)`` and the naive global Lipschitz constant
(Zhang et al. 2019, Proposition 2; the "naive" lines of Figures 1 and 3).

Every norm is evaluated in float64 and widened outward (see :mod:`recurjac_scale.lipschitz`, "Rounding").
"""

from __future__ import annotations

import math

import numpy as np

from ._fp import TINY, gamma
from .errors import ShapeMismatchError
from .layer_bounds.base import parse_norm
from .network.model import Network

__all__ = ["bound_magnitude", "dual_row_norms", "induced_norm", "operator_norm", "naive_constant"]


def bound_magnitude(lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
    """``M = max(|L|, |U|)`` elementwise: ``|J(x)| <= M`` for every x of the region (shape ``(m, n_0)``).

    Raises
    ------
    ShapeMismatchError
        If the shapes differ or the bounds are not 2-D.
    """
    lower = np.asarray(lower, dtype=np.float64)
    upper = np.asarray(upper, dtype=np.float64)
    if lower.shape != upper.shape or lower.ndim != 2:
        raise ShapeMismatchError(f"Jacobian bounds must be two (m, n_0) arrays, got {lower.shape} and {upper.shape}")
    return np.maximum(np.abs(lower), np.abs(upper))


def dual_row_norms(M: np.ndarray, q: float) -> np.ndarray:
    """Certified upper bounds of ``||M[j, :]||_q`` for every row (shape ``(m,)``), for ``M >= 0`` of shape
    ``(m, n)``: computed in float64 and widened by ``gamma(n)``."""
    M = np.asarray(M, dtype=np.float64)
    n = M.shape[1]
    with np.errstate(over="ignore"):
        if q == 1.0:
            return M.sum(axis=1) * (1.0 + gamma(n))
        if q == 2.0:
            ss = np.einsum("ij,ij->i", M, M) * (1.0 + gamma(n))
            return np.sqrt(ss) * (1.0 + gamma(1)) + TINY
    return M.max(axis=1) if n else np.zeros(M.shape[0])


def _sigma_max_nonneg(M: np.ndarray) -> float:
    """Certified upper bound of the largest singular value of a non-negative matrix ``M`` (m, n).

    ``sigma_max(M)^2 = rho(M^T M)`` and ``M^T M >= 0``, so for any positive vector ``v`` the Collatz-Wielandt
    bound ``rho <= max_i (M^T M v)_i / v_i`` holds; ``v`` is the (absolute) leading right singular vector from
    LAPACK, floored to stay positive and polished by two power steps.  Every product is rounded outward.  The
    result is also capped by the Frobenius norm and by ``sqrt(||M||_1 ||M||_inf)`` (both certified)."""
    m, n = M.shape
    if m == 0 or n == 0 or not M.any():
        return 0.0
    fro = math.sqrt(float(np.einsum("ij,ij->", M, M)) * (1.0 + gamma(m * n))) * (1.0 + gamma(1))
    r1 = float(M.sum(axis=0).max()) * (1.0 + gamma(m))
    rinf = float(M.sum(axis=1).max()) * (1.0 + gamma(n))
    caps = [fro, math.sqrt(r1 * rinf) * (1.0 + gamma(1))]
    if m == 1 or n == 1:
        return min(caps)
    try:
        _, _, vt = np.linalg.svd(M, full_matrices=False)
        v = np.abs(vt[0])
    except np.linalg.LinAlgError:  # pragma: no cover - LAPACK failure
        v = np.ones(n)
    v = v / v.max()
    for _ in range(2):
        v = M.T @ (M @ v)
        v = v / v.max()
        v = np.maximum(v, 1e-6)
    w = (M @ v) * (1.0 + gamma(n))
    av = (M.T @ w) * (1.0 + gamma(m))
    lam = float((av / v).max()) * (1.0 + gamma(2))
    cw = math.sqrt(lam) * (1.0 + gamma(1))
    if math.isnan(cw):  # overflow in the power steps (inf / inf): fall back on the caps
        cw = math.inf
    return min(cw, *caps)


def induced_norm(M: np.ndarray, p: float) -> float:
    """Certified upper bound of the induced norm ``||M||_{p->p}`` of a non-negative ``M`` of shape ``(m, n)``.

    ``p = inf``: max row sum; ``p = 1``: max column sum; ``p = 2``: largest singular value (see
    :func:`_sigma_max_nonneg`).  For ``m = 1`` this equals the dual norm ``||M[0, :]||_q``.
    """
    M = np.asarray(M, dtype=np.float64)
    m, n = M.shape
    if m == 0 or n == 0:
        return 0.0
    if not np.isfinite(M).all():
        return math.inf
    if p == math.inf:
        return float(M.sum(axis=1).max()) * (1.0 + gamma(n))
    if p == 1.0:
        return float(M.sum(axis=0).max()) * (1.0 + gamma(m))
    if m == 1:
        return float(dual_row_norms(M, 2.0)[0])
    return _sigma_max_nonneg(M)


def operator_norm(W: np.ndarray, p: float) -> float:
    """Upper bound of ``||W||_{p->p}`` of a (signed) matrix ``W`` of shape ``(m, n)``.

    ``p = 1``, ``inf``: certified (absolute column / row sums widened by ``gamma``).  ``p = 2``: the LAPACK
    largest singular value widened by ``gamma(2 m n)`` (backward-error allowance of the SVD), capped by the
    rigorous ``sqrt(||W||_1 ||W||_inf)``.
    """
    W = np.asarray(W, dtype=np.float64)
    m, n = W.shape
    if m == 0 or n == 0:
        return 0.0
    A = np.abs(W)
    if p == math.inf:
        return float(A.sum(axis=1).max()) * (1.0 + gamma(n))
    if p == 1.0:
        return float(A.sum(axis=0).max()) * (1.0 + gamma(m))
    if m == 1 or n == 1:
        return float(dual_row_norms(A.reshape(1, -1), 2.0)[0])
    r1 = float(A.sum(axis=0).max()) * (1.0 + gamma(m))
    rinf = float(A.sum(axis=1).max()) * (1.0 + gamma(n))
    cap = math.sqrt(r1 * rinf) * (1.0 + gamma(1))
    s = float(np.linalg.svd(W, compute_uv=False)[0])
    return min(s * (1.0 + gamma(2 * m * n)) + TINY, cap)


def naive_constant(network: Network, p=math.inf) -> float:
    """The naive global Lipschitz constant ``prod_l ||W(l)||_{p->p} * prod_l sup sigma_l'`` over all of R^n
    (the dotted "naive" lines of Zhang et al. 2019, Figures 1 and 3).

    With a single output row the last factor ``||W(H)||_{p->p}`` is the dual norm ``||w||_q`` of that row (the
    induced norm of a 1 x n matrix), as in the authors' reference.  Apply output selections first
    (:meth:`Network.with_outputs`).

    Returns
    -------
    float
        An upper bound of ``||f(x) - f(y)||_p / ||x - y||_p`` for all x != y (rounded outward).
    """
    p = parse_norm(p)
    net = network.materialize() if network.is_lazy else network
    value = 1.0
    for w in net.weights:
        value *= operator_norm(w, p)
    for act in net.layer_activations:
        value *= float(act.derivative_range[1])
    if math.isnan(value):  # 0 * inf: an (under- or over-flowed) product of norms; inf is the only safe answer
        return math.inf
    return value * (1.0 + gamma(2 * net.n_layers))
