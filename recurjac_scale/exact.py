"""The exact local Lipschitz constant of one output of a small ReLU / leaky-ReLU network, by a mixed-integer
linear program over activation patterns (scipy.optimize.milp, HiGHS).  A reference for the certified methods.

Problem
-------
For the output ``f(x) = c^T z(H)(x)`` (one row of ``C f``; ``C`` folded into the last layer) and the region
``S = B_p[x0, eps] ∩ D`` with ``p`` in {1, inf}, compute

    L* = sup { ||∇f(x)||_q : x in S, f differentiable at x },     q the dual norm of p,

which is the smallest constant with ``|f(x) - f(y)| <= L* ||x - y||_p`` on ``S``.  ``f`` is piecewise linear: on
the closed region of an activation pattern ``δ`` (one bit per hidden neuron: ``z >= 0`` or ``z <= 0``) its
gradient is ``∇f_δ = W(0)^T D_1 W(1)^T ... D_{H-1} w``, ``D_k = diag(σ'_δ)`` with ``σ' = 1`` or ``alpha``.  So
``L* = max over patterns whose region meets S of ||∇f_δ||_q`` (up to patterns whose region is a lower-dimensional
set; see "Validation").

Formulation (variables; ``k`` = hidden layer 1 .. H-1; ``[l, u]`` certified pre-activation bounds over S)
-------------------------------------------------------------------------------------------------------
Forward pass (exact for binary ``δ``; Tjeng et al. 2019):

- ``x`` in the box of S (for ``p = 1`` also ``x = x0 + d+ - d-``, ``d± >= 0``, ``sum(d+ + d-) <= eps``);
- ``z_k = W(k-1) h_{k-1} + b(k-1)`` as linear expressions (``h_0 = x``), no variable;
- stable neurons: ``h = z`` (``l >= 0``) or ``h = alpha z`` (``u <= 0``);
- unstable neurons (``l < 0 < u``): binary ``δ`` and ``a = relu(z)`` in ``[0, u]`` with
  ``a >= z``, ``a <= u δ``, ``a <= z - l (1 - δ)``; then ``h = alpha z + (1 - alpha) a``.

Backward pass (gradient gated by the same ``δ``): ``g_{H-1} = w`` (the output row), and for k = H-1 .. 1

- ``r_k = σ'_k ⊙ g_k`` (``∂f/∂z_k``): stable neurons ``r = g`` or ``alpha g``; unstable ones
  ``r = alpha g + (1 - alpha) y`` with ``y = δ g`` linearised exactly (binary ``δ``):

  - the highest hidden layer with unstable neurons: ``g`` is constant (``w`` passed through stable layers),
    ``y = g δ``;
  - the next one below it: ``g_j = c_j + sum_m C_jm δ_m`` is affine in that layer's binaries, so
    ``y_j = c_j δ_j + sum_m C_jm p_jm`` with ``p_jm = δ_j δ_m`` (``p <= δ_j``, ``p <= δ_m``,
    ``p >= δ_j + δ_m - 1``, ``p >= 0``): exact, and a much tighter LP relaxation than big-M on ``g``;
  - lower layers: big-M from certified bounds ``gl <= g <= gu`` of ``g = ∂f/∂h_k`` over S (RecurJac-B's
    bounds, intersected with interval propagation): ``gl δ <= y <= gu δ``, ``g - gu (1 - δ) <= y <= g - gl (1 - δ)``;
- ``g_{k-1} = W(k-1)^T r_k``; the gradient is ``v = W(0)^T r_1`` (length n_0), again linear expressions.

Objective ``||v||_q``:

- ``q = 1`` (``p = inf``): ``sum_i |v_i|``; coordinates with certified sign contribute ``±v_i``; the others get
  ``t_i`` and a sign binary ``s_i`` with ``t_i <= v_i - 2 vl_i (1 - s_i)``, ``t_i <= -v_i + 2 vu_i s_i`` (at the
  optimum ``t_i = |v_i|``; ``[vl, vu]`` certified bounds of ``v_i``);
- ``q = inf`` (``p = 1``): ``T = max_i |v_i|`` with binaries ``b_{i±}``, ``sum b = 1``, ``T <= ±v_i + M_{i±}
  (1 - b_{i±})``.
- ``p = 2`` is refused (its region and its objective are not linear).

Validation (HiGHS works with tolerances; the solver's value is not taken on trust)
-------------------------------------------------------------------------------
HiGHS is run with presolve off (with presolve on, HiGHS 1.16 declared "optimal" a value below an attained one on
such a problem: 1.70975 against 1.71683) and a relative gap of 1e-9.  From the solution we take the pattern ``δ`` (binaries rounded,
stable neurons from their bounds) and report:

- ``value``: ``||∇f_δ||_q`` recomputed in float64 from the pattern alone;
- ``interior_margin``: the largest ``τ`` such that a point of S has ``|z_j(x)| >= τ ||∂z_j/∂x||_2`` with the
  sign of ``δ`` for every neuron (one LP, the Chebyshev-centre-like margin of the pattern's region in S);
  ``validated`` is true when ``τ > 0`` and the exact gradient ``Network.jacobian`` at that interior point has
  the norm ``value`` (then ``value`` is attained on an open set: ``value <= L*``);
- ``mip_objective``, ``mip_bound`` (HiGHS's dual bound) and ``gap``: ``L* <= mip_bound`` as far as HiGHS's
  tolerances go (the bound is not certified in the rounding-error sense of the rest of the package).

A pattern whose region meets S only in a lower-dimensional set (e.g. two identical neurons with opposite signs)
is a feasible MIP point whose gradient is not a gradient of f; on generic weights this does not happen, and
``validated`` tells when the optimum is attained in the interior.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from .errors import InputError
from .exact_regions import exact_lipschitz_regions
from .layer_bounds.base import LayerBounds, Region, dual_norm, parse_norm
from .network.model import Network
from .patterns import (
    float_weights,
    gradient_bounds,
    json_number,
    pattern_affine,
    pattern_gradient,
    pattern_interior_point,
    region_box,
    relu_family_alphas,
)

__all__ = [
    "EXACT_METHODS",
    "ExactResult",
    "exact_lipschitz",
    "exact_lipschitz_mip",
    "pattern_gradient",
    "pattern_affine",
    "pattern_interior_point",
    "relu_family_alphas",
]


@dataclass(frozen=True)
class ExactResult:
    """The exact local Lipschitz constant of one output over ``S`` (see the module docstring).

    Attributes
    ----------
    value : float
        ``||∇f_δ||_q`` of the optimal pattern, recomputed in float64 (equals ``L*`` when ``optimal`` and
        ``validated``); NaN when the time limit came before any solution (``mip_bound`` still bounds ``L*``).
    optimal : bool
        HiGHS proved optimality (within ``mip_rel_gap``); false after a time limit (``value`` is then the best
        pattern found, a lower bound when validated, and ``mip_bound`` an upper bound).
    status : str
        HiGHS's message.
    mip_objective, mip_bound, gap : float
        The solver's objective at its solution, its dual bound and relative gap.
    validated : bool
        An interior point of the optimal pattern's region was found and the exact gradient there has norm
        ``value`` (relative 1e-9).
    interior_margin : float
        The margin ``τ`` of :func:`pattern_interior_point`.
    attained : float
        ``||∇f(x_int)||_q`` by :meth:`Network.jacobian` at the interior point (NaN without one).
    x : ndarray, shape (n_0,)
        The interior point if there is one, else the solver's point.
    pattern : tuple of ndarray
        Per hidden layer, the 0/1 pattern of the solution.
    p, q, eps : float
    n_unstable : int
        Unstable neurons (binaries of the forward pass).
    n_binaries : int
        All binaries (neurons and signs).
    time_s, cpu_s : float
        Wall and CPU time (layer bounds, bounds of the gradient, the MIP, validation).
    """

    value: float
    optimal: bool
    status: str
    mip_objective: float
    mip_bound: float
    gap: float
    validated: bool
    interior_margin: float
    attained: float
    x: np.ndarray
    pattern: tuple
    p: float
    q: float
    eps: float
    n_unstable: int
    n_binaries: int
    time_s: float
    cpu_s: float

    @property
    def upper(self) -> float:
        """An upper bound of ``L*`` (HiGHS's dual bound; the name shared with the other exact methods)."""
        return self.mip_bound

    def to_dict(self) -> dict:
        f = json_number
        return {
            "method": "mip",
            "value": f(self.value),
            "upper": f(self.mip_bound),
            "optimal": self.optimal,
            "status": self.status,
            "mip_objective": f(self.mip_objective),
            "mip_bound": f(self.mip_bound),
            "gap": f(self.gap),
            "validated": self.validated,
            "interior_margin": f(self.interior_margin),
            "attained": f(self.attained),
            "p": "inf" if self.p == math.inf else int(self.p),
            "q": "inf" if self.q == math.inf else int(self.q),
            "eps": self.eps,
            "n_unstable": self.n_unstable,
            "n_binaries": self.n_binaries,
            "time_s": self.time_s,
            "cpu_s": self.cpu_s,
        }


class _Builder:
    """Rows of a MILP over a growing list of variables; linear expressions are (coefficients, constant) with
    dense coefficient arrays over all variables (the problems here have at most a few thousand)."""

    def __init__(self, n_var: int):
        self.n = n_var
        self.used = 0
        self.lb = np.full(n_var, -np.inf)
        self.ub = np.full(n_var, np.inf)
        self.integ = np.zeros(n_var, dtype=np.uint8)
        self.rows: list[np.ndarray] = []
        self.rhs: list[float] = []
        self.eq_rows: list[np.ndarray] = []
        self.eq_rhs: list[float] = []

    def var(self, count: int, lo, hi, integer: bool = False) -> np.ndarray:
        idx = np.arange(self.used, self.used + count)
        self.used += count
        self.lb[idx], self.ub[idx] = lo, hi
        self.integ[idx] = 1 if integer else 0
        return idx

    def unit(self, idx: np.ndarray) -> np.ndarray:
        E = np.zeros((len(idx), self.n))
        E[np.arange(len(idx)), idx] = 1.0
        return E

    def le(self, coef: np.ndarray, rhs: float) -> None:
        self.rows.append(coef)
        self.rhs.append(float(rhs))

    def eq(self, coef: np.ndarray, rhs: float) -> None:
        self.eq_rows.append(coef)
        self.eq_rhs.append(float(rhs))


def _widen(lo: np.ndarray, hi: np.ndarray, rel: float = 1e-9) -> tuple[np.ndarray, np.ndarray]:
    """Bounds widened a little, so that the big-M constraints never cut off a true solution through rounding."""
    pad = rel * np.maximum(np.abs(lo), np.abs(hi)) + 1e-12
    return lo - pad, hi + pad


def _backward_plan(unstable: list) -> tuple[list, list]:
    """Per hidden layer (0-based), how the backward pass gates ``g`` by the layer's binaries (see
    :func:`exact_lipschitz`): ``"linear"``, ``"pairs"``, ``"big-M"`` or ``None`` (no unstable neuron); and for
    ``"pairs"`` layers the layer whose binaries ``g`` is affine in (else ``None``)."""
    plan: list = [None] * len(unstable)
    above: list = [None] * len(unstable)
    state, src = "constant", None
    for k in range(len(unstable) - 1, -1, -1):
        if not len(unstable[k]):
            continue
        if state == "constant":
            plan[k], state, src = "linear", "affine", k
        elif state == "affine":
            plan[k], above[k], state = "pairs", src, "general"
        else:
            plan[k] = "big-M"
    return plan, above


def exact_lipschitz(network: Network, x0, eps: float, p=math.inf, *, method: str = "mip", **options):
    """The exact local Lipschitz constant of one output by the method ``method`` of :data:`EXACT_METHODS`.

    Parameters
    ----------
    network, x0, eps, p
        As in :func:`exact_lipschitz_mip`.
    method : {"mip", "regions"}
        ``"mip"``: the activation-pattern MIP (:func:`exact_lipschitz_mip`, p in {1, inf});
        ``"regions"``: enumeration of the linear regions meeting the box
        (:func:`recurjac_scale.exact_regions.exact_lipschitz_regions`, p = inf only; much faster when the l1
        norm's sign binaries make the MIP slow).
    **options
        Keyword arguments of that method (``outputs``, ``layer_bounds``, ``time_limit`` are common to both).

    Returns
    -------
    ExactResult or RegionsResult
        Both have ``value``, ``upper`` (an upper bound of the constant), ``attained``, ``x``, ``optimal``,
        ``status``, ``validated``, ``time_s`` and ``to_dict()``.
    """
    fn = EXACT_METHODS.get(method)
    if fn is None:
        raise InputError(f"exact method {method!r} is not known; accepted: {', '.join(EXACT_METHODS)}")
    return fn(network, x0, eps, p, **options)


def exact_lipschitz_mip(
    network: Network,
    x0,
    eps: float,
    p=math.inf,
    *,
    outputs=0,
    layer_bounds: str | LayerBounds | None = None,
    time_limit: float | None = None,
    mip_rel_gap: float = 1e-9,
    presolve: bool = False,
    lower_bound: float | None = None,
    upper_bound: float | None = None,
    sign_method: str | None = None,
) -> ExactResult:
    """The exact local Lipschitz constant ``max_{x in S} ||∇f(x)||_q`` of one output by a MIP (module docstring).

    Parameters
    ----------
    network : Network
        Hidden layers relu / leaky_relu only, no output activation; small (a few hundred unstable neurons at
        most, or the solver will not finish).
    x0 : array_like, shape (n_0,)
    eps : float
        Radius (finite, or ``inf`` with a bounded domain).
    p : {1, inf}
        Input norm (``q`` = inf, 1).  ``2`` is refused.
    outputs : int, (c, j) or array (1, n_H)
        One output row (:func:`recurjac_scale.jacobian.output_matrix`).
    layer_bounds : str, LayerBounds or None
        Pre-activation bounds for the big-M constraints (method name, default ``crown``, or precomputed for this
        region and output selection).
    time_limit : float, optional
        Seconds for HiGHS; on expiry the best pattern found is returned with ``optimal = False``.
    mip_rel_gap : float
        HiGHS's relative optimality gap.
    presolve : bool
        HiGHS presolve (off by default: see the module docstring).
    lower_bound : float, optional
        An attained value ``||∇f(x)||_q`` at a point of S (e.g. branch-and-bound's ``lower``): the row
        ``objective >= lower_bound (1 - 1e-7)`` prunes every node whose relaxation is below it from the start
        (HiGHS's own incumbents can be far lower).  A value above ``L*`` makes the problem infeasible
        (:class:`~recurjac_scale.errors.InputError`).
    upper_bound : float, optional
        A certified upper bound of ``L*`` (e.g. branch-and-bound's ``upper``): the row ``objective <= upper_bound
        (1 + 1e-7)``, a cut of the relaxation.
    sign_method : str or None
        A Jacobian method whose certified bounds of the gradient are intersected with the others before the
        signs of its coordinates are fixed and the big-M constants of the l1 norm are set (default ``None``:
        RecurJac-B and interval propagation only; a wrong bound here would cut off the optimum unnoticed).

    Returns
    -------
    ExactResult
    """
    from scipy.optimize import Bounds, LinearConstraint, milp

    from .jacobian import output_matrix
    from .layer_bounds import layer_bounds as compute_layer_bounds

    t0, c0 = time.perf_counter(), time.process_time()
    p = parse_norm(p)
    if p == 2.0:
        raise InputError("p=2 is not supported by the exact MIP (a non-linear region and objective); accepted: 1, inf")
    net = network.materialize() if network.is_lazy else network
    C = output_matrix(outputs, net.n_outputs)
    if C.shape[0] != 1:
        raise InputError(f"the exact MIP bounds one output row, got {C.shape[0]}; give outputs=K or (c, j)")
    net1 = net.with_outputs(C)
    alphas = relu_family_alphas(net1)
    region = Region.of(net1, x0, eps, p)
    lo_x, hi_x = region_box(region)
    if isinstance(layer_bounds, LayerBounds):
        lb = layer_bounds
    else:
        lb = compute_layer_bounds(net1, region.x0, region.eps, p, method=layer_bounds or "crown")
    ws, bs = float_weights(net1)
    H = len(ws)
    n0 = ws[0].shape[1]
    q = dual_norm(p)
    gb = gradient_bounds(net1, lb, region)

    unstable = [np.flatnonzero((lb.lower[k] < 0) & (lb.upper[k] > 0)) for k in range(H - 1)]
    n_u = int(sum(len(u) for u in unstable))
    if sign_method is not None and sign_method != "recurjac-b":
        from .jacobian import jacobian_bounds

        jb = jacobian_bounds(net1, region.x0, region.eps, p, method=sign_method, layer_bounds=lb, outputs=0)
        lo0, hi0 = np.maximum(gb[0][0], jb.lower[0]), np.minimum(gb[0][1], jb.upper[0])
        gb[0] = (np.minimum(lo0, hi0), np.maximum(lo0, hi0))
    vl, vu = _widen(*gb[0])
    mixed = np.flatnonzero((vl < 0) & (vu > 0))
    n_obj = len(mixed) * 2 if q == 1.0 else 1 + 2 * n0
    # the backward pass from the top, per hidden layer with unstable neurons: while g is constant (no unstable
    # neuron above), r = (alpha + (1 - alpha) δ) g is linear in δ ("linear"); while g is affine in the binaries of
    # one such layer, δ g is linearised exactly by pairwise products of binaries ("pairs"); below, big-M ("big-M")
    plan, above = _backward_plan(unstable)
    n_pairs = sum(len(unstable[k]) * len(unstable[above[k]]) for k in range(H - 1) if plan[k] == "pairs")
    n_y = sum(len(unstable[k]) for k in range(H - 1) if plan[k] == "big-M")
    n_var = n0 + (2 * n0 if p == 1.0 else 0) + 2 * n_u + n_y + n_pairs + n_obj
    B = _Builder(n_var)

    xi = B.var(n0, lo_x, hi_x)
    if p == 1.0:
        dp, dm = B.var(n0, 0.0, region.eps), B.var(n0, 0.0, region.eps)
        E = B.unit(xi) - B.unit(dp) + B.unit(dm)
        for r in range(n0):
            B.eq(E[r], region.x0[r])
        B.le(B.unit(dp).sum(axis=0) + B.unit(dm).sum(axis=0), region.eps)

    # forward pass: h as (coefficients (n_k, n_var), constant (n_k,))
    Hc, hc = B.unit(xi), np.zeros(n0)
    deltas = []
    for k in range(H - 1):
        Zc, zc = ws[k] @ Hc, ws[k] @ hc + bs[k]
        l, u = _widen(lb.lower[k], lb.upper[k])
        a = alphas[k]
        d_stable = np.where(lb.lower[k] >= 0, 1.0, a)
        Hc, hc = d_stable[:, None] * Zc, d_stable * zc
        U = unstable[k]
        if len(U):
            ai = B.var(len(U), 0.0, u[U])
            di = B.var(len(U), 0.0, 1.0, integer=True)
            Ea, Ed = B.unit(ai), B.unit(di)
            for r, j in enumerate(U):
                B.le(Zc[j] - Ea[r], -zc[j])  # a >= z
                B.le(Ea[r] - u[j] * Ed[r], 0.0)  # a <= u δ
                B.le(Ea[r] - Zc[j] - l[j] * Ed[r], zc[j] - l[j])  # a <= z - l (1 - δ)
            Hc[U] = a * Zc[U] + (1.0 - a) * Ea
            hc[U] = a * zc[U]
        else:
            di = np.zeros(0, dtype=int)
        deltas.append(di)

    # backward pass: g_k = ∂f/∂h_k as (coefficients, constant)
    Gc, gc = np.zeros((ws[-1].shape[1], n_var)), ws[-1][0].copy()
    for k in range(H - 1, 0, -1):
        U = unstable[k - 1]
        a = alphas[k - 1]
        d_stable = np.where(lb.lower[k - 1] >= 0, 1.0, a)
        Rc, rc = d_stable[:, None] * Gc, d_stable * gc
        if len(U) and plan[k - 1] == "linear":
            # g is constant (Gc = 0): r_j = (alpha + (1 - alpha) δ_j) g_j
            Rc[U] = a * Gc[U] + (1.0 - a) * gc[U, None] * B.unit(deltas[k - 1])
            rc[U] = a * gc[U]
        elif len(U) and plan[k - 1] == "pairs":
            # g_j = gc_j + sum_m c_jm δ_m (m: unstable neurons of the nearest layer above with any): y_j = δ_j g_j
            # = gc_j δ_j + sum_m c_jm p_jm with p_jm = δ_j δ_m (exact linearisation of a product of binaries)
            Dm = deltas[above[k - 1]]
            C = Gc[:, Dm]
            pi = B.var(len(U) * len(Dm), 0.0, 1.0).reshape(len(U), len(Dm))
            Ed, Em, Ep = B.unit(deltas[k - 1]), B.unit(Dm), B.unit(pi.ravel())
            for r, j in enumerate(U):
                for m in range(len(Dm)):
                    e = Ep[r * len(Dm) + m]
                    B.le(e - Ed[r], 0.0)
                    B.le(e - Em[m], 0.0)
                    B.le(-e + Ed[r] + Em[m], 1.0)
                Y = gc[j] * Ed[r] + C[j] @ Ep[r * len(Dm):(r + 1) * len(Dm)]
                Rc[j] = a * Gc[j] + (1.0 - a) * Y
                rc[j] = a * gc[j]
        elif len(U):
            gl, gu = _widen(*gb[k])
            yi = B.var(len(U), np.minimum(gl[U], 0.0), np.maximum(gu[U], 0.0))
            Ey, Ed = B.unit(yi), B.unit(deltas[k - 1])
            for r, j in enumerate(U):
                B.le(Ey[r] - gu[j] * Ed[r], 0.0)  # y <= gu δ
                B.le(-Ey[r] + gl[j] * Ed[r], 0.0)  # y >= gl δ
                B.le(Ey[r] - Gc[j] - gl[j] * Ed[r], gc[j] - gl[j])  # y <= g - gl (1 - δ)
                B.le(-Ey[r] + Gc[j] + gu[j] * Ed[r], gu[j] - gc[j])  # y >= g - gu (1 - δ)
            Rc[U] = a * Gc[U] + (1.0 - a) * Ey
            rc[U] = a * gc[U]
        Gc, gc = ws[k - 1].T @ Rc, ws[k - 1].T @ rc

    # objective ||v||_q, v = Gc x + gc
    obj = np.zeros(n_var)
    obj_c = 0.0
    n_sign = 0
    if q == 1.0:
        pos, neg = vl >= 0, vu <= 0
        obj += Gc[pos].sum(axis=0) - Gc[neg].sum(axis=0)
        obj_c += float(gc[pos].sum() - gc[neg].sum())
        if len(mixed):
            ti = B.var(len(mixed), 0.0, np.maximum(-vl[mixed], vu[mixed]))
            si = B.var(len(mixed), 0.0, 1.0, integer=True)
            Et, Es = B.unit(ti), B.unit(si)
            for r, i in enumerate(mixed):
                B.le(Et[r] - Gc[i] - 2 * vl[i] * Es[r], gc[i] - 2 * vl[i])
                B.le(Et[r] + Gc[i] - 2 * vu[i] * Es[r], -gc[i])
            obj += Et.sum(axis=0)
            n_sign = len(mixed)
    else:
        Tmax = float(np.maximum(np.abs(vl), np.abs(vu)).max())
        ti = B.var(1, 0.0, Tmax)
        bp, bm = B.var(n0, 0.0, 1.0, integer=True), B.var(n0, 0.0, 1.0, integer=True)
        Et, Ep, Em = B.unit(ti)[0], B.unit(bp), B.unit(bm)
        B.eq(Ep.sum(axis=0) + Em.sum(axis=0), 1.0)
        for i in range(n0):
            Mp, Mm = Tmax - vl[i], Tmax + vu[i]
            B.le(Et - Gc[i] + Mp * Ep[i], Mp + gc[i])
            B.le(Et + Gc[i] + Mm * Em[i], Mm - gc[i])
        obj += Et
        n_sign = 2 * n0

    assert B.used == n_var
    if lower_bound is not None and math.isfinite(float(lower_bound)):
        cut = float(lower_bound) * (1.0 - 1e-7) - 1e-12 - obj_c
        B.le(-obj, -cut)
    if upper_bound is not None and math.isfinite(float(upper_bound)):
        B.le(obj.copy(), float(upper_bound) * (1.0 + 1e-7) + 1e-12 - obj_c)
    cons = []
    if B.rows:
        cons.append(LinearConstraint(np.vstack(B.rows), -np.inf, np.asarray(B.rhs)))
    if B.eq_rows:
        cons.append(LinearConstraint(np.vstack(B.eq_rows), np.asarray(B.eq_rhs), np.asarray(B.eq_rhs)))
    options = {"presolve": bool(presolve), "mip_rel_gap": float(mip_rel_gap)}
    if time_limit is not None:
        options["time_limit"] = float(time_limit)
    res = milp(-obj, integrality=B.integ, bounds=Bounds(B.lb, B.ub), constraints=cons, options=options)
    bound = getattr(res, "mip_dual_bound", None)
    mip_bound = float(-bound + obj_c) if bound is not None and np.isfinite(bound) else math.inf
    if res.x is None:
        if res.status == 1:  # time / iteration limit before any solution: report the dual bound only
            return ExactResult(
                value=math.nan, optimal=False, status=str(res.message), mip_objective=math.nan, mip_bound=mip_bound,
                gap=math.nan, validated=False, interior_margin=math.nan, attained=math.nan, x=region.x0.copy(),
                pattern=(), p=p, q=q, eps=region.eps, n_unstable=n_u, n_binaries=n_u + n_sign,
                time_s=time.perf_counter() - t0, cpu_s=time.process_time() - c0,
            )
        raise InputError(f"the activation-pattern MIP found no solution: {res.message}")
    sol = res.x
    pattern = []
    for k in range(H - 1):
        d = (lb.lower[k] >= 0).astype(np.int8)
        d[unstable[k]] = (sol[deltas[k]] > 0.5).astype(np.int8)
        pattern.append(d)
    grad = pattern_gradient(net1, pattern)
    value = float(np.linalg.norm(grad, ord=q))
    margin, x_int = pattern_interior_point(net1, region, pattern)
    attained = math.nan
    validated = False
    if x_int is not None and margin > 0:
        attained = float(np.linalg.norm(net1.jacobian(x_int)[0], ord=q))
        validated = abs(attained - value) <= 1e-9 * max(value, 1e-300)
    mip_obj = float(-res.fun + obj_c)
    gap = getattr(res, "mip_gap", None)
    return ExactResult(
        value=value,
        optimal=bool(res.status == 0),
        status=str(res.message),
        mip_objective=mip_obj,
        mip_bound=max(mip_bound, mip_obj),
        gap=float(gap) if gap is not None else math.nan,
        validated=validated,
        interior_margin=float(margin),
        attained=attained,
        x=x_int if x_int is not None else np.clip(sol[xi], lo_x, hi_x),
        pattern=tuple(pattern),
        p=p,
        q=q,
        eps=region.eps,
        n_unstable=n_u,
        n_binaries=n_u + n_sign,
        time_s=time.perf_counter() - t0,
        cpu_s=time.process_time() - c0,
    )


#: The exact methods by name (``exact_lipschitz(..., method=name)``).
EXACT_METHODS = {"mip": exact_lipschitz_mip, "regions": exact_lipschitz_regions}
