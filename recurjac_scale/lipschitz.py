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

This module holds the results and the :func:`lipschitz` driver; the norms and the naive constant are in
:mod:`recurjac_scale.lipschitz_norms`, Algorithm 2 and the row-norm registries in :mod:`recurjac_scale.algorithm2`
(both re-exported here).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np

from ._json import json_float
from .algorithm2 import (  # noqa: F401 (re-exported)
    ALGORITHM2_METHODS,
    algorithm2_row_l1,
    algorithm2_signs,
    register_algorithm2,
)
from .errors import InputError
from .layer_bounds.base import dual_norm, parse_norm
from .lipschitz_norms import (  # noqa: F401 (re-exported)
    bound_magnitude,
    dual_row_norms,
    induced_norm,
    naive_constant,
    operator_norm,
)
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
    "format_norm",
]


def format_norm(p: float):
    """``p`` as stored in JSON: ``1``, ``2`` or ``"inf"``."""
    return "inf" if p == math.inf else int(p)


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
        bounds, :attr:`recurjac_scale.jacobian.JacobianMethod.row_norms`).
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
        rn_fn = get_jacobian_method(method_key).row_norms
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
