"""Lipschitz constants from certified Jacobian bounds (Zhang et al. 2019, Proposition 2 and Algorithm 2), the
global constant (``eps = inf``) and the naive product of operator norms.

What is certified
-----------------
Given ``L <= J(x) <= U`` for every ``x`` in ``S = B_p[x0, eps] ∩ D`` (from :func:`recurjac_scale.jacobian.
jacobian_bounds`), with ``M = max(|L|, |U|)`` (shape ``(m, n_0)``):

- one output row ``g``: ``|g(x) - g(y)| <= ||M[0, :]||_q ||x - y||_p`` for x, y in S (``q`` the dual of ``p``);
- several rows: ``||f(x) - f(y)||_p <= ||M||_{p->p} ||x - y||_p`` with the induced norm (``p = inf``: max row sum,
  ``p = 1``: max column sum, ``p = 2``: largest singular value of ``M``, valid because ``||J||_2 <= || |J| ||_2
  <= ||M||_2`` for ``|J| <= M`` elementwise);
- Algorithm 2 (``p = inf`` only): for row j with strict signs ``s_k = +1`` if ``L[j,k] > 0``, ``-1`` if
  ``U[j,k] < 0``, else 0, ``sum_k |J[j,k]| = J[j,:]·s + sum_{s_k = 0} |J[j,k]| <= upper(J[j,:]·s) +
  sum_{s_k = 0} M[j,k]``.  ``upper(J[j,:]·s)`` is an upper bound of the directional derivative ``J(x) s`` over S,
  obtained by pushing the single column ``W(1) s_j`` through the last step of the backward recursion (each row
  with its own ``s_j``; the reference implementation's forward version shares one value across rows, which is
  unsound for several rows and is not copied here).
  Per method: ``recurjac-b`` reuses the chain and the states 0..T-1 of its own Jacobian run (the same bounds of
  ``∂f/∂h(l)`` as for the Jacobian) and adds one per-row last step; ``recurjac-f0`` / ``recurjac-f1`` take the
  signs from their own (forward) bounds and compute ``upper(J s_j)`` on the backward chain built from the same
  pre-activation bounds (RecurJac-B without its last step, then the per-row step) -- sound, since any sign vector
  consistent with valid bounds and any valid upper bound of ``J s`` will do; ``fastlip`` gets no Algorithm 2 (the
  plain dual norm, as in the reference).  New methods register theirs with :func:`register_algorithm2`.
- naive (global, over all of R^n): ``prod_l ||W(l)||_{p->p} * prod_l sup sigma_l'``;
- the reported constant is the smallest of the sound candidates available for that eps (Proposition 2,
  Algorithm 2, and the naive global constant, which bounds every local constant too); ``source`` says which won.

Rounding: every norm is evaluated in float64 and widened outward by :func:`recurjac_scale._fp.gamma` of the
summation length (Higham Eq. 3.5).  The largest singular value of the non-negative ``M`` is bounded by the
Collatz-Wielandt inequality ``rho(A) <= max_i (A v)_i / v_i`` (``A = M^T M``, any positive ``v``), evaluated with
outward rounding, so it is certified; the 2-norm of a signed weight matrix (naive constant only) uses the LAPACK
SVD value widened by ``gamma(2 m n)`` (a generous backward-error allowance), capped by the rigorous
``sqrt(||W||_1 ||W||_inf)``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ._fp import TINY, gamma
from ._json import json_float
from .errors import InputError, ShapeMismatchError
from .layer_bounds.base import dual_norm, parse_norm
from .network.model import Network

__all__ = [
    "LipschitzPoint",
    "LipschitzResult",
    "lipschitz",
    "lipschitz_from_bounds",
    "bound_magnitude",
    "dual_row_norms",
    "induced_norm",
    "operator_norm",
    "naive_constant",
    "algorithm2_signs",
    "algorithm2_row_l1",
    "ALGORITHM2_METHODS",
    "register_algorithm2",
    "ROW_NORM_METHODS",
    "register_row_norms",
    "format_norm",
]


def format_norm(p: float):
    """``p`` as stored in JSON: ``1``, ``2`` or ``"inf"``."""
    return "inf" if p == math.inf else int(p)


# -- norms of the magnitude bound M ---------------------------------------------------------------------------


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


# -- Algorithm 2 ----------------------------------------------------------------------------------------------


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


RowNormFn = Callable[..., "np.ndarray | None"]
ROW_NORM_METHODS: dict[str, RowNormFn] = {}
"""Registry: Jacobian method name -> ``fn(network, jac, q) -> ndarray (m,) or None``: the method's own certified
upper bounds of ``max_{x in S} ||J[j, :](x)||_q`` per row (e.g. ``linear-jacobian`` bounds ``sum_k |J[j, k]|`` by
one linear objective through the chords of ``|.|``), or ``None`` for a norm it does not treat.  Each row takes the
smaller of this and Proposition 2's; the constant of one row (or, for ``p = inf``, the max over rows, which bounds
the induced inf->inf norm) is the candidate ``"rows"``."""


def register_row_norms(*names: str):
    """Decorator registering a row-norm bound (:data:`ROW_NORM_METHODS`) for the named Jacobian methods."""

    def deco(fn: RowNormFn) -> RowNormFn:
        for name in names:
            ROW_NORM_METHODS[name] = fn
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


# -- results --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LipschitzPoint:
    """The Lipschitz constant for one radius.

    Attributes
    ----------
    eps : float
        Radius (``inf``: global over the domain, or R^n without one).
    lipschitz : float
        The reported certified constant: the smallest of ``prop2``, ``algorithm2`` and the naive global constant.
    source : str
        Which candidate won: ``"prop2"``, ``"algorithm2"``, ``"naive"`` or ``"rows"`` (the method's own row norm
        bounds, :data:`ROW_NORM_METHODS`).
    prop2 : float
        Proposition 2: the dual norm of ``M`` (one row) or its induced ``p -> p`` norm (several rows).
    algorithm2 : float or None
        Algorithm 2 (``p = inf``, RecurJac methods); ``None`` when not computed.
    row_norms : tuple of float
        Per output row, the best certified bound of ``max ||J[j, :]||_q`` (Algorithm 2 where it applies).
    time_s : float
        Wall time of this radius (layer bounds + Jacobian bounds + norms + Algorithm 2), without numba
        compilation.
    timings : dict
        ``layer_bounds``, ``jacobian``, ``algorithm2``, ``norms``, ``compile`` (numba, first call in a process)
        in seconds.
    unstable : tuple of int
        Per layer, the number of neurons with uncertain derivative.
    layer_bounds : str
        The pre-activation bounds used at this radius (``global`` for eps = inf without a domain).
    """

    eps: float
    lipschitz: float
    source: str
    prop2: float
    algorithm2: float | None
    row_norms: tuple
    time_s: float
    timings: dict = field(default_factory=dict)
    unstable: tuple = ()
    layer_bounds: str = ""

    def to_dict(self) -> dict:
        return {
            "eps": json_float(self.eps),
            "lipschitz": json_float(self.lipschitz),
            "source": self.source,
            "prop2": json_float(self.prop2),
            "algorithm2": json_float(self.algorithm2),
            "row_norms": [json_float(v) for v in self.row_norms],
            "time_s": self.time_s,
            "timings": dict(self.timings),
            "unstable": list(self.unstable),
            "layer_bounds": self.layer_bounds,
        }


@dataclass(frozen=True)
class LipschitzResult:
    """Certified Lipschitz constants of ``x -> C f(x)`` over ``B_p[x0, eps] ∩ D`` for one or several radii.

    Attributes
    ----------
    points : tuple of LipschitzPoint
        One per radius, in the order given.
    naive_global : float
        The naive global constant (:func:`naive_constant`), valid for every radius.
    method, layer_bounds : str
        Jacobian and pre-activation bound methods (``layer_bounds`` as used at the last radius; each point
        records its own).
    p, q : float
        Input norm and its dual.
    n_outputs : int
        Number of output rows ``m``; with ``m = 1`` the constant is the dual norm of the row, otherwise the
        induced ``p -> p`` norm.
    algorithm2 : bool
        Whether Algorithm 2 was requested.
    """

    points: tuple
    naive_global: float
    method: str
    layer_bounds: str
    p: float
    q: float
    n_outputs: int
    algorithm2: bool = True
    rounding: str = "norms widened outward by gamma(n) (recurjac_scale._fp); see recurjac_scale.lipschitz"

    @property
    def eps(self) -> np.ndarray:
        return np.array([pt.eps for pt in self.points])

    @property
    def values(self) -> np.ndarray:
        """The reported constants, one per radius."""
        return np.array([pt.lipschitz for pt in self.points])

    @property
    def norm_kind(self) -> str:
        return "dual norm of the output row" if self.n_outputs == 1 else "induced p->p norm"

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "layer_bounds": self.layer_bounds,
            "p": format_norm(self.p),
            "q": format_norm(self.q),
            "n_outputs": self.n_outputs,
            "norm": self.norm_kind,
            "algorithm2": self.algorithm2,
            "naive_global": json_float(self.naive_global),
            "rounding": self.rounding,
            "results": [pt.to_dict() for pt in self.points],
        }


# -- entry points ---------------------------------------------------------------------------------------------


def lipschitz_from_bounds(
    lower: np.ndarray, upper: np.ndarray, p=math.inf, *, upper_ys: np.ndarray | None = None,
    signs: np.ndarray | None = None,
) -> tuple[float, float | None, np.ndarray]:
    """Proposition 2 (and Algorithm 2 when ``upper_ys`` is given) from Jacobian bounds.

    Parameters
    ----------
    lower, upper : ndarray, shape (m, n_0)
    p : {1, 2, inf}
    upper_ys, signs : ndarray, optional
        Algorithm 2 inputs (see :func:`algorithm2_row_l1`); only used for ``p = inf``.

    Returns
    -------
    prop2 : float
        Dual norm of the row (``m = 1``) or induced norm of ``M``.
    algorithm2 : float or None
        Max over rows of the Algorithm 2 row bounds (for ``p = inf`` it is the induced inf->inf norm bound).
    row_norms : ndarray, shape (m,)
        Per-row certified bounds of ``max ||J[j, :]||_q`` (Algorithm 2 rows where given).
    """
    p = parse_norm(p)
    M = bound_magnitude(lower, upper)
    rows = dual_row_norms(M, dual_norm(p))
    prop2 = float(rows[0]) if M.shape[0] == 1 else induced_norm(M, p)
    alg2 = None
    if upper_ys is not None and p == math.inf:
        if signs is None:
            signs = algorithm2_signs(lower, upper)
        a2 = algorithm2_row_l1(lower, upper, signs, upper_ys)
        alg2 = float(a2.max()) if a2.size else 0.0
        rows = np.minimum(rows, a2)
    return prop2, alg2, rows


def _eps_list(eps) -> list[float]:
    if np.ndim(eps) == 0:
        eps = [eps]
    out = []
    for e in eps:
        try:
            v = float(e)
        except (TypeError, ValueError):
            raise InputError(f"eps={e!r} is not a number; accepted: a radius in [0, inf]") from None
        if math.isnan(v) or v < 0:
            raise InputError(f"eps={e!r} is invalid; accepted: a radius in [0, inf]")
        out.append(v)
    if not out:
        raise InputError("no radius given")
    return out


def lipschitz(
    network: Network,
    x0,
    eps,
    p=math.inf,
    *,
    method: str = "recurjac-b",
    layer_bounds: str | None = None,
    outputs=None,
    algorithm2: bool = True,
    sparse_threshold=None,
) -> LipschitzResult:
    """Certified local (or global) Lipschitz constants of ``x -> C f(x)`` over ``B_p[x0, eps] ∩ D``.

    Parameters
    ----------
    network : Network
    x0 : array_like, shape (n_0,)
        Centre, raw input units (inside the domain).
    eps : float or sequence of float
        Radii in [0, inf]; ``inf`` gives the global constant over the domain (over R^n without one).
    p : {1, 2, inf}
        Input norm (and output norm for several rows).
    method : str
        Jacobian bound method (``fastlip``, ``recurjac-b``, ``recurjac-f0``, ``recurjac-f1``).
    layer_bounds : str, LayerBounds or None
        Pre-activation bound method (``ibp``, ``fastlin``, ``crown``; ``None``: ``crown``, else the best
        registered), or precomputed bounds for the region (one radius only; the caller vouches for them).  With ``eps = inf`` and no input domain the global derivative ranges are used.
    outputs : None, "all", int, (c, j), "K", "C,J" or ndarray
        What to bound: all logits, logit K, the margin ``f_c - f_j``, or the rows of a matrix C (m, n_H)
        (:func:`recurjac_scale.jacobian.output_matrix`).
    algorithm2 : bool
        For ``p = inf`` and the RecurJac methods, also run Algorithm 2 (Zhang et al. 2019) and report the smaller.
    sparse_threshold : None, "auto" or float
        Sparse x dense kernels for pruned layers, as :func:`recurjac_scale.jacobian.jacobian_bounds`.

    Returns
    -------
    LipschitzResult
        ``result.points[i].lipschitz`` bounds ``||C f(x) - C f(y)||_p / ||x - y||_p`` over x, y in the region
        (``|g(x) - g(y)| / ||x - y||_p`` for one row).  At ``eps = 0`` it is the gradient norm at ``x0`` up to
        rounding.
    """
    from .jacobian import get_jacobian_method, jacobian_bounds, output_matrix

    from .layer_bounds.base import LayerBounds

    p = parse_norm(p)
    eps_values = _eps_list(eps)
    if isinstance(layer_bounds, LayerBounds) and len(eps_values) > 1:
        raise InputError(
            f"precomputed layer bounds hold for one region; got {len(eps_values)} radii (give one eps, or a method name)"
        )
    net = network.materialize() if network.is_lazy else network
    C = output_matrix(outputs, net.n_outputs)
    sel_net = net.with_outputs(C)
    naive = naive_constant(sel_net, p)
    method_key = get_jacobian_method(method).name
    a2_fn = ALGORITHM2_METHODS.get(method_key) if (algorithm2 and p == math.inf) else None

    points = []
    for e in eps_values:
        t0 = time.perf_counter()
        jac = jacobian_bounds(
            net, x0, e, p, method=method_key, layer_bounds=layer_bounds, outputs=C, sparse_threshold=sparse_threshold
        )
        t1 = time.perf_counter()
        upper_ys = signs = None
        t_a2 = 0.0
        if a2_fn is not None:
            signs = algorithm2_signs(jac.lower, jac.upper)
            ta = time.perf_counter()
            upper_ys = a2_fn(net, jac, signs)
            t_a2 = time.perf_counter() - ta
        tn = time.perf_counter()
        prop2, alg2, rows = lipschitz_from_bounds(jac.lower, jac.upper, p, upper_ys=upper_ys, signs=signs)
        cands = {"prop2": prop2, "naive": naive}
        rn_fn = ROW_NORM_METHODS.get(method_key)
        own = rn_fn(net, jac, dual_norm(p)) if rn_fn is not None else None
        if own is not None:
            own = np.asarray(own, dtype=np.float64).reshape(-1)
            rows = np.minimum(rows, own)
            if own.size == 1 or p == math.inf:
                cands["rows"] = float(own.max()) if own.size else 0.0
        t_norm = time.perf_counter() - tn
        if alg2 is not None:
            cands["algorithm2"] = alg2
        source = min(cands, key=lambda k: (cands[k], k != "algorithm2", k == "naive"))
        jt = dict(jac.timings)
        t_lb = float(jt.get("layer_bounds", 0.0))
        t_compile = float(jt.get("compile", 0.0))
        timings = {
            "layer_bounds": t_lb,
            "jacobian": max(float(t1 - t0) - t_lb - t_compile, 0.0),
            "algorithm2": t_a2,
            "norms": t_norm,
            "compile": t_compile,
        }
        lb_name = jac.layer_bound_method
        points.append(
            LipschitzPoint(
                eps=e,
                lipschitz=float(cands[source]),
                source=source,
                prop2=prop2,
                algorithm2=alg2,
                row_norms=tuple(float(v) for v in rows),
                time_s=time.perf_counter() - t0 - t_compile,
                timings=timings,
                unstable=tuple(int(u) for u in jac.unstable),
                layer_bounds=lb_name,
            )
        )
    return LipschitzResult(
        points=tuple(points),
        naive_global=naive,
        method=method_key,
        layer_bounds=lb_name if points else str(layer_bounds),
        p=p,
        q=dual_norm(p),
        n_outputs=int(sel_net.n_outputs),
        algorithm2=bool(algorithm2),
    )
