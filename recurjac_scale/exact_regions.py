"""The exact l-inf local Lipschitz constant of one output of a small ReLU / leaky-ReLU network, by enumerating the
linear regions (activation patterns) that meet the box, with pruning.  An alternative to the MIP of
:mod:`recurjac_scale.exact` that does not need the sign binaries of the l1 norm.

Problem
-------
For ``f(x) = c^T z(H)(x)`` (one output row) and the box ``S = B_inf[x0, eps] ∩ D``,

    L* = max { ||∇f_δ||_1 : δ an activation pattern whose closed region meets S },

``∇f_δ = W(0)^T D_1 W(1)^T ... D_{H-1} w`` the gradient on the region of ``δ`` (``D_k = diag(σ'_δ)``,
``σ' = 1`` or ``alpha``).  This is ``sup ||∇f(x)||_1`` over the points of ``S`` where ``f`` is differentiable, except when the
maximising pattern's region meets ``S`` only in a lower-dimensional set (non-generic weights; ``validated`` tells,
as for the MIP).  ``q = 1`` is the dual of ``p = inf``; other ``p`` are refused (the region of ``B_1`` or ``B_2`` is
not a box; use :func:`recurjac_scale.exact.exact_lipschitz` for ``p = 1``).

Search (depth first)
--------------------
Neurons are fixed layer by layer, lowest hidden layer first.  Once the patterns of layers ``< k`` are fixed,
``z_k(x) = A_k x + c_k`` is affine on the node's region, so the sign of a neuron of layer ``k`` is an exact
halfspace in ``x``.  A node is the box cut by the halfspaces of its fixed unstable neurons (neurons stable over
the whole box by the root's certified layer bounds need no row).  Each node keeps a witness: a point ``x`` of
its region and its margin ``τ`` (the smallest distance from ``x`` to the halfspaces' boundaries, capped), from
the LP ``max τ  s.t.  x in box, s_j (a_j x + c_j) >= τ ||a_j||_2`` (``scipy.optimize.linprog``, HiGHS).  A node
is kept iff ``τ >= -tol``: its closed region meets ``S`` (up to the LP's tolerance).  When branching on a
neuron, the child whose sign the parent's witness already satisfies strictly inherits the witness (no LP).

- Upper bound of a node: with ``v = A_k^T r_k``, ``r_k = D_k g_k``, ``g_k = ∂f/∂h_k`` bounded by the root's
  certified bounds (interval propagation intersected with RecurJac-B, :func:`recurjac_scale.patterns.gradient_bounds`)
  and ``D_k`` fixed on the fixed neurons, in ``[alpha, 1]`` on the free ones: ``sum_i max |v_i|`` over the interval
  of ``v`` (``A_k`` is exact on the node), maximised over the ``2^t`` exact choices of ``D`` on the ``t`` free
  neurons of largest effect (``enumerate_neurons``; on the last hidden layer ``g`` is the exact output row, so
  only the other free neurons are relaxed).  A child whose bound is ``<=`` the best value found is pruned before
  its LP; a side that the box alone excludes (interval of ``z_j`` over the box) needs no LP either.
- Lower bound: at every witness ``x`` the network's pattern and its gradient are exact; when every
  pre-activation there is nonzero, ``||∇f(x)||_1`` is attained (a value of ``f``'s gradient at a point of ``S``).
- A leaf (every neuron fixed) has the constant gradient ``∇f_δ``; its norm is a candidate for ``L*``.

``value`` (the max over leaves) is exact up to the LP solver's feasibility tolerance (floating point, like the
MIP): a region touching ``S`` only within the tolerance may be counted.  ``attained`` is the largest norm of
an exact gradient at an interior point found (a true lower bound); when the search finishes, the maximising leaf
is re-checked for an interior point (``validated``).  On a time limit, ``status = "time_limit"`` and
``[attained, upper]`` brackets ``L*`` (``upper`` = max of the open nodes' bounds and the leaves seen).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from .errors import InputError
from .patterns import (
    float_weights,
    gradient_bounds,
    json_number,
    pattern_gradient,
    pattern_interior_point,
    region_box,
    relu_family_alphas,
)
from .layer_bounds.base import LayerBounds, Region, parse_norm
from .network.model import Network

__all__ = ["RegionsResult", "exact_lipschitz_regions"]

_TAU_CAP = 1.0
_FEAS_TOL = 1e-9
_MAX_ENUM = 16  # 2^16 x n_0 floats per node bound


@dataclass(frozen=True)
class RegionsResult:
    """The exact l-inf local Lipschitz constant of one output by region enumeration (module docstring).

    Attributes
    ----------
    value : float
        ``max ||∇f_δ||_1`` over the leaves found (the exact ``L*`` when ``status == "optimal"``, up to the LP
        tolerance); the best attained value when no leaf was reached.
    upper : float
        An upper bound of ``L*``: ``value`` when optimal, else the max of the open nodes' bounds and ``value``.
    attained : float
        The largest ``||∇f(x)||_1`` at a point ``x`` of S where every pre-activation is nonzero (exact gradient:
        a lower bound of ``L*``).
    x : ndarray, shape (n_0,)
        The point of ``attained``.
    status : str
        ``"optimal"`` or ``"time_limit"``.
    optimal : bool
    validated : bool
        The maximising leaf's region has an interior point in S where the exact gradient has norm ``value``
        (then ``attained == value``).
    interior_margin : float
        The margin of that interior point (:func:`recurjac_scale.patterns.pattern_interior_point`).
    pattern : tuple of ndarray
        Per hidden layer, the 0/1 pattern of the maximising leaf.
    n_nodes, n_lp, n_leaves, n_pruned : int
        Nodes visited, LPs solved, leaves reached, nodes pruned by their bound.
    n_unstable : int
        Neurons unstable under the root's layer bounds.
    eps : float
    time_s, cpu_s : float
    """

    value: float
    upper: float
    attained: float
    x: np.ndarray
    status: str
    optimal: bool
    validated: bool
    interior_margin: float
    pattern: tuple
    n_nodes: int
    n_lp: int
    n_leaves: int
    n_pruned: int
    n_unstable: int
    eps: float
    time_s: float
    cpu_s: float

    def to_dict(self) -> dict:
        f = json_number
        return {
            "method": "regions",
            "value": f(self.value),
            "upper": f(self.upper),
            "attained": f(self.attained),
            "x": [float(t) for t in self.x],
            "status": self.status,
            "optimal": self.optimal,
            "validated": self.validated,
            "interior_margin": f(self.interior_margin),
            "n_nodes": self.n_nodes,
            "n_lp": self.n_lp,
            "n_leaves": self.n_leaves,
            "n_pruned": self.n_pruned,
            "n_unstable": self.n_unstable,
            "p": "inf",
            "q": 1,
            "eps": self.eps,
            "time_s": self.time_s,
            "cpu_s": self.cpu_s,
        }


class _Node:
    """A partial pattern: layers ``< k`` fixed (``pats``), in layer ``k`` the neurons ``order[:pos]`` fixed
    (``cur``: 1 / 0 fixed, -1 free); ``A, c``: ``z_k = A x + c`` (shapes ``(n_k, n_0)``, ``(n_k,)``); ``rows,
    rhs``: the region's normalised halfspaces ``rows x <= rhs`` (shapes ``(m, n_0)``, ``(m,)``); ``x, tau``:
    the witness and its margin."""

    __slots__ = ("k", "pos", "order", "pats", "cur", "A", "c", "rows", "rhs", "x", "tau", "bound")

    def __init__(self, k, pos, order, pats, cur, A, c, rows, rhs, x, tau):
        self.k, self.pos, self.order, self.pats, self.cur = k, pos, order, pats, cur
        self.A, self.c, self.rows, self.rhs, self.x, self.tau = A, c, rows, rhs, x, tau
        self.bound = math.inf


class _Search:
    def __init__(self, net: Network, region: Region, lb: LayerBounds, enum: int = 10):
        self.ws, self.bs = float_weights(net)
        self.alphas = relu_family_alphas(net)
        self.H = len(self.ws)
        self.lo, self.hi = region_box(region)
        self.n0 = self.ws[0].shape[1]
        self.mid, self.rad = 0.5 * (self.lo + self.hi), 0.5 * (self.hi - self.lo)
        self.stable = [np.where(lb.lower[k] >= 0, 1, np.where(lb.upper[k] <= 0, 0, -1)).astype(np.int8)
                       for k in range(self.H - 1)]
        self.n_unstable = int(sum((s < 0).sum() for s in self.stable))
        gb = gradient_bounds(net, lb, region)
        self.g = gb  # g[k]: bounds of ∂f/∂h_k, k = 0 .. H-1 (h_k the output of hidden layer k, 1-based)
        self.n_lp = 0
        self.n_pruned = 0
        self.enum = int(enum)
        self._bit_cache: dict = {}
        self.best_attained, self.best_x = -math.inf, region.x0.copy()

    # -- LPs -------------------------------------------------------------------------------------------------
    def witness(self, rows: np.ndarray, rhs: np.ndarray) -> tuple[float, np.ndarray | None]:
        """max τ s.t. rows x + τ <= rhs, lo <= x <= hi, τ <= cap; (τ, x) or (-inf, None) if infeasible."""
        from scipy.optimize import linprog

        self.n_lp += 1
        n0 = self.n0
        cost = np.zeros(n0 + 1)
        cost[n0] = -1.0
        A = np.hstack([rows, np.ones((rows.shape[0], 1))])
        bounds = np.column_stack([np.append(self.lo, -np.inf), np.append(self.hi, _TAU_CAP)])
        # dual simplex without presolve: ~30% less time per LP on these small problems (and no presolve
        # reductions, which HiGHS has got wrong on MIPs of this kind: see recurjac_scale.exact)
        res = linprog(cost, A_ub=A, b_ub=rhs, bounds=bounds, method="highs-ds", options={"presolve": False})
        if res.status != 0:
            return -math.inf, None
        return float(res.x[n0]), np.clip(res.x[:n0], self.lo, self.hi)

    # -- bounds ----------------------------------------------------------------------------------------------
    def bound(self, node: _Node) -> float:
        """Upper bound of ``||∇f_δ||_1`` over the node's completions (module docstring): ``r_k = D_k g_k`` by
        intervals, except that the ``enum`` free neurons of largest effect take both values of ``D`` exactly
        (the max over their ``2^enum`` choices of the interval bound of the others)."""
        k = node.k
        gl, gu = self.g[k + 1]
        a = self.alphas[k]
        d = node.cur
        A = node.A
        absA = np.abs(A)

        def hull(dl, du):
            cands = np.stack([dl * gl, dl * gu, du * gl, du * gu])
            rl, ru = cands.min(axis=0), cands.max(axis=0)
            return 0.5 * (rl + ru), 0.5 * (ru - rl)

        mid, rad = hull(np.where(d == 1, 1.0, a), np.where(d == 0, a, 1.0))
        free = np.flatnonzero(d < 0)
        if len(free) and self.enum:
            effect = rad[free] * absA[free].sum(axis=1)
            T = free[np.argsort(-effect, kind="stable")[: self.enum]]
            m1, r1 = hull(np.ones_like(gl), np.ones_like(gl))
            m0, r0 = hull(np.full_like(gl, a), np.full_like(gl, a))
            m1, r1, m0, r0 = m1[T], r1[T], m0[T], r0[T]
            mid, rad = mid.copy(), rad.copy()
            mid[T], rad[T] = m0, r0
            vm, vr = A.T @ mid, absA.T @ rad
            bits = self._bits(len(T))  # (2^t, t)
            VM = vm + bits @ ((m1 - m0)[:, None] * A[T])
            VR = vr + bits @ ((r1 - r0)[:, None] * absA[T])
            return float((np.abs(VM) + VR).sum(axis=1).max())
        vm, vr = A.T @ mid, absA.T @ rad
        return float((np.abs(vm) + vr).sum())

    def _bits(self, t: int) -> np.ndarray:
        if t not in self._bit_cache:
            self._bit_cache[t] = ((np.arange(2**t)[:, None] >> np.arange(t)) & 1).astype(np.float64)
        return self._bit_cache[t]

    def attained_at(self, x: np.ndarray) -> None:
        """Update the best attained value with the exact gradient at ``x`` when no pre-activation is zero."""
        h = x
        pats = []
        for k in range(self.H - 1):
            z = self.ws[k] @ h + self.bs[k]
            if not np.all(z != 0.0):
                return
            d = z > 0
            pats.append(d)
            h = np.where(d, z, self.alphas[k] * z)
        g = self.ws[-1][0]
        for k in range(self.H - 2, -1, -1):
            g = self.ws[k].T @ (np.where(pats[k], 1.0, self.alphas[k]) * g)
        val = float(np.abs(g).sum())
        if val > self.best_attained:
            self.best_attained, self.best_x = val, x.copy()

    # -- tree ------------------------------------------------------------------------------------------------
    def enter_layer(self, k, pats, A, c, rows, rhs, x, tau) -> _Node:
        """A node at the start of layer ``k`` (patterns of layers < k in ``pats``, ``z_k = A x + c``)."""
        cur = self.stable[k].copy()
        free = np.flatnonzero(cur < 0)
        nrm = np.linalg.norm(A[free], axis=1)
        # a neuron whose pre-activation is constant on the node has a fixed sign (any sign if it is zero)
        const = free[nrm == 0]
        cur[const] = (c[const] > 0).astype(np.int8)
        free = free[nrm > 0]
        # branch first on the neurons with the largest potential effect on the norm
        gl, gu = self.g[k + 1]
        weight = np.maximum(np.abs(gl), np.abs(gu))[free] * np.abs(A[free]).sum(axis=1)
        order = free[np.argsort(-weight, kind="stable")]
        return _Node(k, 0, order, pats, cur, A, c, rows, rhs, x, tau)

    def children(self, node: _Node, best: float) -> list[_Node]:
        """The (at most two) children of branching on the node's next neuron whose region meets the box and
        whose bound exceeds ``best`` (the bound is computed before the LP, which it can save)."""
        k, j = node.k, node.order[node.pos]
        a, c0 = node.A[j], node.c[j]
        nrm = float(np.linalg.norm(a))
        zx = (float(a @ node.x) + c0) / nrm
        zm, zr = float(a @ self.mid) + c0, float(np.abs(a) @ self.rad)
        zl, zu = zm - zr, zm + zr  # z_j over the box
        out = []
        for s in ((1, 0) if zx >= 0 else (0, 1)):
            sign = -1.0 if s == 1 else 1.0  # s = 1: -z <= 0; s = 0: z <= 0
            m = -sign * zx  # the witness's signed distance to the new boundary
            if m <= 0 and ((s == 1 and zu < 0) or (s == 0 and zl > 0)):
                continue  # the box alone excludes this sign
            rows, rhs = np.vstack([node.rows, sign * a / nrm]), np.append(node.rhs, -sign * c0 / nrm)
            cur = node.cur.copy()
            cur[j] = s
            child = self.advance(_Node(k, node.pos + 1, node.order, node.pats, cur, node.A, node.c, rows, rhs,
                                       node.x, min(node.tau, m)))
            child.bound = self.bound(child)
            if child.bound <= best:
                self.n_pruned += 1
                continue
            if m <= 0:
                tau, x = self.witness(rows, rhs)
                if x is None or tau < -_FEAS_TOL:
                    continue
                child.x, child.tau = x, tau
                self.attained_at(x)
            out.append(child)
        return out

    def advance(self, node: _Node) -> _Node:
        """Move a node whose layer is complete to the start of the next layer (leaves stay)."""
        while node.pos == len(node.order) and node.k < self.H - 2:
            k = node.k
            d = np.where(node.cur > 0, 1.0, self.alphas[k])
            A, c = self.ws[k + 1] @ (d[:, None] * node.A), self.ws[k + 1] @ (d * node.c) + self.bs[k + 1]
            node = self.enter_layer(k + 1, node.pats + [node.cur], A, c, node.rows, node.rhs, node.x, node.tau)
        return node

    def is_leaf(self, node: _Node) -> bool:
        return node.k == self.H - 2 and node.pos == len(node.order)


def exact_lipschitz_regions(
    network: Network,
    x0,
    eps: float,
    p=math.inf,
    *,
    outputs=0,
    layer_bounds: str | LayerBounds | None = None,
    time_limit: float | None = None,
    lower_bound_point=None,
    enumerate_neurons: int = 10,
) -> RegionsResult:
    """The exact l-inf local Lipschitz constant ``max_{x in S} ||∇f(x)||_1`` of one output by region enumeration
    (module docstring).

    Parameters
    ----------
    network : Network
        Hidden layers relu / leaky_relu only, no output activation; small (the number of linear regions meeting
        the box is what the time depends on).
    x0 : array_like, shape (n_0,)
    eps : float
        Radius (finite, or ``inf`` with a bounded domain).
    p : inf
        Input norm; only ``inf`` (:class:`~recurjac_scale.errors.InputError` otherwise).
    outputs : int, (c, j) or array (1, n_H)
        One output row (:func:`recurjac_scale.jacobian.output_matrix`).
    layer_bounds : str, LayerBounds or None
        Root pre-activation bounds (method name, default ``crown``, or precomputed for this region and output):
        neurons they prove stable are never branched on.
    time_limit : float, optional
        Wall seconds; on expiry ``status = "time_limit"`` and ``[attained, upper]`` brackets ``L*``.
    lower_bound_point : array_like, shape (n_0,) or (m, n_0), optional
        Points of S (e.g. from an attack) whose exact gradient norms seed the best attained value (prunes more).
    enumerate_neurons : int
        In a node's bound, this many free neurons (those of largest effect) take both values exactly
        (``2^enumerate_neurons`` interval bounds per node; 0: intervals only; at most 16).

    Returns
    -------
    RegionsResult
    """
    from .jacobian import output_matrix
    from .layer_bounds import layer_bounds as compute_layer_bounds

    t0, c0 = time.perf_counter(), time.process_time()
    p = parse_norm(p)
    if p != math.inf:
        raise InputError(f"region enumeration supports p=inf only, got p={p:g}; use exact_lipschitz for p=1")
    if not (isinstance(enumerate_neurons, int) and 0 <= enumerate_neurons <= _MAX_ENUM):
        raise InputError(f"enumerate_neurons must be an integer in [0, {_MAX_ENUM}], got {enumerate_neurons!r}")
    net = network.materialize() if network.is_lazy else network
    C = output_matrix(outputs, net.n_outputs)
    if C.shape[0] != 1:
        raise InputError(f"region enumeration bounds one output row, got {C.shape[0]}; give outputs=K or (c, j)")
    net1 = net.with_outputs(C)
    relu_family_alphas(net1)
    region = Region.of(net1, x0, eps, p)
    if isinstance(layer_bounds, LayerBounds):
        lb = layer_bounds
    else:
        lb = compute_layer_bounds(net1, region.x0, region.eps, p, method=layer_bounds or "crown")
    S = _Search(net1, region, lb, enum=enumerate_neurons)
    if lower_bound_point is not None:
        for x in np.atleast_2d(np.asarray(lower_bound_point, np.float64)):
            S.attained_at(np.clip(x, S.lo, S.hi))
    S.attained_at(np.clip(region.x0, S.lo, S.hi))

    n0 = S.n0
    tau, x = S.witness(np.zeros((0, n0)), np.zeros(0))
    root = S.advance(S.enter_layer(0, [], S.ws[0].copy(), S.bs[0].copy(), np.zeros((0, n0)), np.zeros(0), x, tau))
    root.bound = S.bound(root)
    best_leaf, best_pat = -math.inf, None
    n_nodes = n_leaves = 0
    stack = [root]
    status = "optimal"
    while stack:
        if time_limit is not None and time.perf_counter() - t0 > time_limit:
            status = "time_limit"
            break
        node = stack.pop()
        n_nodes += 1
        if S.is_leaf(node):
            n_leaves += 1
            pats = node.pats + [node.cur]
            val = float(np.abs(pattern_gradient(net1, pats)).sum())
            if node.tau > 0:
                S.attained_at(node.x)
            if val > best_leaf:
                best_leaf, best_pat = val, pats
            continue
        if node.bound <= max(best_leaf, S.best_attained):
            S.n_pruned += 1
            continue
        stack.extend(reversed(S.children(node, max(best_leaf, S.best_attained))))  # the witness's side first

    value = max(best_leaf, S.best_attained)
    upper = max([value] + [n.bound for n in stack])
    if best_pat is None or S.best_attained >= best_leaf:
        # the maximum is attained at the best point (every leaf above it was pruned or equals it)
        best_pat = _pattern_at(S, S.best_x)
    pattern = tuple(np.asarray(p_, np.int8) for p_ in best_pat)
    margin, x_int = pattern_interior_point(net1, region, best_pat)
    if x_int is not None and margin > 0:
        S.attained_at(x_int)
    validated = bool(S.best_attained >= value * (1 - 1e-9))
    return RegionsResult(
        value=float(value), upper=float(upper), attained=float(S.best_attained), x=S.best_x,
        status=status, optimal=status == "optimal", validated=validated, interior_margin=float(margin),
        pattern=pattern, n_nodes=n_nodes, n_lp=S.n_lp, n_leaves=n_leaves, n_pruned=S.n_pruned,
        n_unstable=S.n_unstable, eps=region.eps, time_s=time.perf_counter() - t0, cpu_s=time.process_time() - c0,
    )


def _pattern_at(S: _Search, x: np.ndarray) -> list[np.ndarray]:
    """The 0/1 activation pattern of every hidden layer at ``x``."""
    h, out = x, []
    for k in range(S.H - 1):
        z = S.ws[k] @ h + S.bs[k]
        out.append((z > 0).astype(np.int8))
        h = np.where(z > 0, z, S.alphas[k] * z)
    return out
