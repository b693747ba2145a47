"""A tighter bound of the l1 norm of the gradient (``p = inf``) on a part: the sign vector of the norm chosen once
for all coordinates.

Two bounds of ``max_{x in part} ||∇f(x)||_1 = max_{x in part, s in {-1, 1}^{n_0}} s · ∇f(x)``:

- :func:`l1_box_bound`: over a box of the first layer's backward quantities (below);
- :func:`l1_sign_search`: a best-first search over partial sign vectors, each node bounded by one linear objective
  of ``linear-jacobian`` (the fixed coordinates contribute ``s_i J_i``, the free ones the chord of ``|J_i|``).

For one output ``f`` with hidden layers ``h_k = σ(z_k)``, the gradient is ``v = W(0)^T y`` with
``y = σ'(z_1) ⊙ g_1`` and ``g_1 = ∂f/∂h_1``.  Over a part, certified bounds ``dl <= σ'(z_1) <= du`` (the layer
bounds, with the part's fixed phases) and ``gl <= g_1 <= gu`` (RecurJac-B's backward states) put ``y`` in a box
``[yl, yu]`` (products of the two intervals).  Then

    max_{x in part} ||v(x)||_1  <=  max_{y in [yl, yu]} ||W(0)^T y||_1
                                 =  max_{s in {-1, 1}^{n_0}} sum_j max(a_j yl_j, a_j yu_j),   a = W(0) s,

which is never looser than bounding every coordinate ``v_i`` over the same box separately and summing
``max(|vl_i|, |vu_i|)`` (there each coordinate may pick its own ``y``), and is often much tighter.  Coordinates
whose sign is certified on the part (``vl_i >= 0`` or ``vu_i <= 0`` from any certified Jacobian bounds) have their
``s_i`` fixed: the maximising ``s`` of a realised gradient is its sign vector.  The maximum over the remaining
``s`` is found by a small branch-and-bound over the coordinates (each node: the fixed part of ``a`` plus the
interval the free coordinates can add, ``φ_j`` being convex), with pruning against the best complete ``s``
found; when the node limit is reached the bound of the dropped nodes is kept, so the result is always an upper
bound.  Rounding: an allowance of ``4 γ(n_0 + n_1 + 4) sum_j ||W(0)[j]||_1 max(|yl_j|, |yu_j|)`` is added
(:func:`recurjac_scale._fp.gamma`), covering the computed ``a`` and sums and the comparisons used for pruning.
"""

from __future__ import annotations

import heapq
import math

import numpy as np

from .._fp import TINY, gamma

_U = np.finfo(np.float64).eps / 2

__all__ = ["l1_box_bound", "first_layer_box", "signed_objective_bounds", "l1_sign_search"]


def first_layer_box(dl, du, gl, gu) -> tuple[np.ndarray, np.ndarray]:
    """``[yl, yu]`` containing ``d g`` for ``d in [dl, du]``, ``g in [gl, gu]`` (shape ``(n_1,)``), widened by the
    rounding of one product."""
    dl, du, gl, gu = (np.asarray(v, np.float64) for v in (dl, du, gl, gu))
    c = np.stack([dl * gl, dl * gu, du * gl, du * gu])
    yl, yu = c.min(axis=0), c.max(axis=0)
    pad = gamma(1) * np.maximum(np.abs(yl), np.abs(yu)) + TINY
    return yl - pad, yu + pad


def _phi(A: np.ndarray, yl: np.ndarray, yu: np.ndarray) -> np.ndarray:
    return np.maximum(A * yl, A * yu).sum(axis=-1)


def l1_box_bound(W0, yl, yu, vl=None, vu=None, *, max_nodes: int = 4096) -> float:
    """An upper bound of ``max_{y in [yl, yu]} ||W0^T y||_1`` (module docstring), exact up to the rounding
    allowance when the node limit is not reached.

    Parameters
    ----------
    W0 : ndarray, shape (n_1, n_0)
    yl, yu : ndarray, shape (n_1,)
    vl, vu : ndarray, shape (n_0,), optional
        Certified bounds of the realised gradient ``v`` on the part: coordinates of fixed sign fix ``s_i``.
    max_nodes : int
        Largest number of open nodes kept per level of the search over signs.

    Returns
    -------
    float
    """
    W = np.asarray(W0, np.float64)
    yl, yu = np.asarray(yl, np.float64), np.asarray(yu, np.float64)
    n1, n0 = W.shape
    s_fixed = np.zeros(n0)
    if vl is not None and vu is not None:
        s_fixed = np.where(np.asarray(vl) >= 0, 1.0, np.where(np.asarray(vu) <= 0, -1.0, 0.0))
    free = np.flatnonzero(s_fixed == 0)
    base = W @ s_fixed
    ymax = np.maximum(np.abs(yl), np.abs(yu))
    allowance = 4.0 * gamma(n0 + n1 + 4) * float(np.abs(W).sum(axis=1) @ ymax) + TINY
    if len(free) == 0:
        return float(_phi(base, yl, yu)) + allowance
    # the most influential free coordinates first
    imp = np.abs(W[:, free]).T @ (yu - yl + ymax)
    order = free[np.argsort(-imp, kind="stable")]
    Wf = W[:, order]  # (n1, F)
    F = Wf.shape[1]
    absW = np.abs(Wf)
    R = np.zeros((F + 1, n1))  # R[t] = sum_{i >= t} |Wf[:, i]|
    R[:F] = np.cumsum(absW[:, ::-1], axis=1)[:, ::-1].T

    # a good complete sign vector: coordinate ascent from the sign of W^T y at the box centre
    s = np.sign(Wf.T @ (0.5 * yl + 0.5 * yu))
    s[s == 0] = 1.0
    a = base + Wf @ s
    best = float(_phi(a, yl, yu))
    for _ in range(2 * F):
        cand = a[None, :] - 2.0 * (s[:, None] * Wf.T)  # every single flip
        vals = _phi(cand, yl, yu)
        i = int(np.argmax(vals))
        if vals[i] <= best:
            break
        best, a = float(vals[i]), cand[i]
        s[i] = -s[i]
    tail = np.zeros((F + 1, n1))  # the greedy completion of coordinates t.. : Wf[:, t:] @ s[t:]
    tail[:F] = np.cumsum((Wf * s)[:, ::-1], axis=1)[:, ::-1].T

    residual = -math.inf
    nodes = base[None, :]
    for t in range(F):
        col = Wf[:, t]
        children = np.concatenate([nodes + col, nodes - col])
        lo, hi = children - R[t + 1], children + R[t + 1]
        bnd = np.maximum(np.maximum(lo * yl, lo * yu), np.maximum(hi * yl, hi * yu)).sum(axis=1)
        done = _phi(children + tail[t + 1], yl, yu)
        best = max(best, float(done.max()))
        keep = bnd > best
        children, bnd = children[keep], bnd[keep]
        if len(children) > max_nodes:
            idx = np.argpartition(-bnd, max_nodes)
            residual = max(residual, float(bnd[idx[max_nodes:]].max()))
            children = children[idx[:max_nodes]]
        nodes = children
        if len(nodes) == 0:
            break
    return max(best, residual) + allowance


SEARCH_VARIANTS = ("constant",)
"""The lines of sigma' used for the nodes of :func:`l1_sign_search` (when the context has them; else all of them):
on the 32-32-32-10 recipe at eps 0.1 the other variants lowered the bound after 985 parts by 0.07% for 45% more
time."""


def signed_objective_bounds(ctx, rb, lower, upper, S: np.ndarray) -> np.ndarray:
    """Certified upper bounds of ``max_{x in S_region} max_{s in node} s · J(x)`` for one output row of a
    ``linear-jacobian`` result, one per node (row of ``S``).

    A node fixes ``s_i = S[i]`` where ``S[i] = ±1`` and leaves ``s_i`` free where ``S[i] = 0``; there ``s_i J_i <=
    |J_i| <= alpha_i J_i + beta_i``, the chord of ``|J_i|`` over the certified entry bounds ``[l_i, u_i]`` (as in
    :func:`recurjac_scale.jacobian.linear_rows.row_norm_upper`, whose rounding allowances are used here too).  The
    sum ``sum_i A_i J_i + B_i`` is one linear objective, bounded by
    :func:`recurjac_scale.jacobian.linear_passes.bound_objectives_variants` (with the lines of
    ``SEARCH_VARIANTS``; every variant's lines are certified).

    Parameters
    ----------
    ctx, rb : LinearContext, RowBounds
        The row's propagation context (:func:`recurjac_scale.jacobian.linear_rows.result_rows`).
    lower, upper : ndarray, shape (n_0,)
        Certified bounds of the row's Jacobian entries over the region.
    S : ndarray, shape (K, n_0)
        Entries in {-1, 0, 1}.

    Returns
    -------
    ndarray, shape (K,)
    """
    from ..jacobian.linear_passes import bound_objectives_variants

    l = np.asarray(lower, np.float64)
    u = np.asarray(upper, np.float64)
    S = np.asarray(S, np.float64)
    variants = SEARCH_VARIANTS if all(v in ctx.variants for v in SEARCH_VARIANTS) else None
    M = np.maximum(np.abs(l), np.abs(u))
    w = u - l
    mixed = (l < 0) & (u > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        ac = np.where(l >= 0, 1.0, np.where(u <= 0, -1.0, (u + l) / np.where(w > 0, w, 1.0)))
        bc = np.where(mixed, -2.0 * u * l / np.where(w > 0, w, 1.0), 0.0)
    ac = np.clip(ac, -1.0, 1.0)
    bc = np.maximum(bc, 0.0)
    A = np.where(S != 0, S, ac[None, :])
    B = np.where(S != 0, 0.0, bc[None, :])
    if not (np.isfinite(A).all() and np.isfinite(B).all() and np.isfinite(M).all()):
        return np.full(S.shape[0], math.inf)
    n0 = l.size
    c_err = 16 * _U * (np.abs(A) * M + np.abs(B))
    lam = A @ ctx.W[0].T
    lam_err = gamma(n0 + 2) * ((np.abs(A) @ ctx.absW[0].T) @ rb.ymax[0])
    with np.errstate(over="ignore", invalid="ignore"):
        ub = bound_objectives_variants(ctx, rb, lam, 0, variants).min(axis=0)
    ub = np.where(np.isnan(ub), math.inf, ub)
    rest = (B + c_err).sum(axis=1) + gamma(n0 + 2) * (np.abs(B) + c_err).sum(axis=1)
    total = ub + rest + lam_err
    return total + gamma(4) * (np.abs(ub) + np.abs(rest) + lam_err) + TINY


def l1_sign_search(ctx, rb, lower, upper, *, budget: int = 2048, batch: int = 128) -> float:
    """An upper bound of ``max_{x in region} ||J(x)||_1`` for one output row of a ``linear-jacobian`` result: a
    best-first search over the signs ``s`` of the uncertain entries (``l_i < 0 < u_i``, the largest chord gaps
    ``-2 u_i l_i / (u_i - l_i)`` first), each node bounded by :func:`signed_objective_bounds`; a child's bound is at
    most its parent's.  The ``batch`` nodes with the largest bounds are split together (one propagation call for
    all their children).  Stops after ``budget`` node bounds and returns the largest bound of the nodes left, which
    together cover every sign vector: an upper bound (the root node alone is the method's own row norm bound).

    Parameters
    ----------
    ctx, rb, lower, upper
        As :func:`signed_objective_bounds`.
    budget : int
        Node bounds computed (>= 1).
    batch : int
        Nodes split per call of the propagation.

    Returns
    -------
    float
    """
    l = np.asarray(lower, np.float64)
    u = np.asarray(upper, np.float64)
    n0 = l.size
    mixed = (l < 0) & (u > 0)
    free = np.flatnonzero(mixed)
    w = u - l
    gapc = np.where(mixed, -2.0 * u * l / np.where(w > 0, w, 1.0), 0.0)
    order = free[np.argsort(-gapc[free], kind="stable")]
    F = len(order)
    # the first levels at once: every sign vector of the ``d`` leading coordinates (one propagation call)
    d = int(min(F, max(int(math.log2(max(min(batch, budget), 1))), 0)))
    S = np.zeros((2 ** d, n0), np.int8)
    if d:
        S[:, order[:d]] = 1 - 2 * ((np.arange(2 ** d)[:, None] >> np.arange(d)[None, :]) & 1)
    bnd = signed_objective_bounds(ctx, rb, l, u, S).astype(np.float64)
    dep = np.full(2 ** d, d, np.int64)
    used = 2 ** d
    while used < budget:
        open_ = np.flatnonzero(dep < F)
        if len(open_) == 0:
            break
        m = int(min(batch, len(open_), max((budget - used) // 2, 1)))
        if m < len(open_):
            pick = open_[np.argpartition(-bnd[open_], m - 1)[:m]]
        else:
            pick = open_
        kids = np.repeat(S[pick], 2, axis=0)
        kd = np.repeat(dep[pick], 2)
        rows = np.arange(2 * m)
        kids[rows, order[kd]] = np.tile(np.array([1, -1], np.int8), m)
        vals = np.minimum(signed_objective_bounds(ctx, rb, l, u, kids), np.repeat(bnd[pick], 2))
        used += 2 * m
        keep = np.ones(len(bnd), bool)
        keep[pick] = False
        S = np.vstack([S[keep], kids])
        bnd = np.concatenate([bnd[keep], vals])
        dep = np.concatenate([dep[keep], kd + 1])
    return float(bnd.max())
