"""Parts of a branch-and-bound search: what a part is, how one is bounded (a pure function run in dask tasks) and
how it is split.

A part is a sub-region of ``S = B_p[x0, eps] ∩ D``, written as a JSON-able dict:

- ``lo``, ``hi``: an input box (lists of n_0 floats) for input splits (``p = inf`` only), or ``None`` for all of S;
- ``splits``: a list of ``[k, j, s]``: hidden layer ``k`` (0-based), neuron ``j``, ``s = +1`` for the constraint
  ``z_j >= 0`` or ``-1`` for ``z_j <= 0`` (ReLU family only).

The two children of a neuron split cover the parent (``z_j >= 0`` or ``z_j <= 0``); those of an input split are the
two halves of the box.  So the maximum over the parts of a frontier of any valid bound of the local Lipschitz
constant on each part is a valid bound for S.

Bounding a part (:func:`bound_part`), everything certified as in the rest of the package:

1. pre-activation bounds of the part: the chosen layer-bound method (``crown`` by default) over the part's box,
   with every layer intersected with the root's certified bounds and the split constraints (``clip``: ``[l, u]``
   becomes ``[max(l, 0), u]`` or ``[l, min(u, 0)]``), so the later layers are bounded on the constrained part;
   an empty intersection proves the part empty (:class:`~recurjac_scale.errors.EmptyRegionError`); with
   ``lp_tighten`` (ReLU family) the unstable neurons are then tightened by certified LPs over the box, the earlier
   layers' triangle relaxations and the split constraints (:mod:`recurjac_scale.bab.lp`), which can also prove the
   part empty;
2. the split neurons' derivatives fixed to the branch's value (``LayerBounds.phases``);
3. the chosen Jacobian method on those bounds (:func:`_method_bound`), and for ``q = 1`` with at most
   ``SIGN_MAX_INPUTS`` inputs the l1 bounds of :mod:`recurjac_scale.bab.signs` (for ``linear-jacobian``: the search
   over sign vectors of its linear objectives, else the box bound); the smallest bound is kept.

A ReLU-family part without unstable neurons has one activation pattern: its bound is the gradient norm of that
pattern, and it is *closed* (not split further).  If the pattern's region misses S, a Farkas certificate from an LP
(checked in outward-rounded arithmetic, :func:`certified_empty`) removes it.  Points found in parts (their centre,
an interior point of a closed part's pattern) are lower-bound candidates: exact gradient norms at points of S.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from .._fp import gamma
from ..activations import LeakyReLU
from ..errors import EmptyRegionError, InputError
from ..layer_bounds.base import LayerBounds, Region
from ..network.model import Network

__all__ = ["BabProblem", "bound_part", "bound_parts", "split_part", "certified_empty", "root_part", "SPLIT_MODES"]

SPLIT_MODES = ("auto", "neuron", "input")
SIGN_MAX_FREE = 20
"""Default largest number of coordinates of uncertain sign enumerated in full by the one-sign-vector bound."""
SIGN_PARTIAL = 12
"""Coordinates enumerated when more are uncertain (the others add their own magnitude bounds)."""
SIGN_MAX_INPUTS = 64
SIGN_SEARCH = 2048
"""Node bounds of the search over sign vectors (:func:`recurjac_scale.bab.signs.l1_sign_search`) per part, for
``linear-jacobian`` parts with ``q = 1``."""
"""The one-sign-vector bound is tried for networks with at most this many inputs."""
OWN_PASS_METHODS = frozenset({"recurjac-b", "linear-jacobian"})
"""Jacobian methods run by :func:`_method_bound` itself (one pass, whose Jacobian bounds and RecurJac-B states the
one-sign-vector bound reuses)."""


@dataclass(frozen=True)
class BabProblem:
    """What every task needs (picklable; shipped to the workers once per round or scattered once).

    Attributes
    ----------
    network : Network
        In-memory float64 network with one output row (the output selection folded in).
    x0 : ndarray, shape (n_0,)
    eps, p, q : float
    method : str
        Jacobian method bounding each part.
    layer_bound_method : str
    root_lower, root_upper : tuple of ndarray
        Certified pre-activation bounds of every layer over S.
    split : str
        ``"neuron"`` or ``"input"`` (resolved from ``"auto"``).
    alphas : tuple of float or None
        Negative-side slopes of the hidden layers (ReLU family), else ``None``.
    layer_bound_options : tuple of (name, value)
        Options of the layer-bound method (e.g. ``(("never_looser_than_fastlin", False),)`` for crown).
    sign_bound : bool
        For ``q = 1``: also bound each part by :func:`recurjac_scale.bab.signs.l1_box_bound` (one sign vector
        for all coordinates over the box of the first layer's backward quantities) and keep the smaller bound.
    sign_nodes, sign_max_free : int
        Its node limit, and the largest number of coordinates of uncertain sign enumerated in full (above it, the
        ``SIGN_PARTIAL`` largest are, the others add their magnitude bounds); tried for at most
        ``SIGN_MAX_INPUTS`` inputs.
    sign_search : int
        With ``sign_bound``, ``linear-jacobian`` parts are also bounded by a search over sign vectors with this many
        node bounds (:func:`recurjac_scale.bab.signs.l1_sign_search`; 0: off).
    lp_tighten : {"off", "splits", "all"}
        Certified LP tightening of the parts' unstable neurons (:func:`_lp_tighten`, :mod:`recurjac_scale.bab.lp`;
        ReLU family): ``splits`` for parts with splits, from their earliest split layer on; ``all`` for every part.
    branching : str
        Which unstable neuron to split: ``"score"`` (largest interval contribution ``(du - dl) |∂f/∂h_j|
        ||∂z_j/∂x||_1`` over all layers) or ``"layer"`` (the same score within the earliest layer that has one).
    """

    network: Network
    x0: np.ndarray
    eps: float
    p: float
    q: float
    method: str
    layer_bound_method: str
    root_lower: tuple
    root_upper: tuple
    split: str
    alphas: tuple | None
    branching: str = "score"
    layer_bound_options: tuple = ()
    sign_bound: bool = True
    sign_nodes: int = 4096
    sign_max_free: int = SIGN_MAX_FREE
    sign_search: int = SIGN_SEARCH
    lp_tighten: str = "off"


def root_part() -> dict:
    return {"lo": None, "hi": None, "splits": [], "depth": 0}


def _part_geometry(prob: BabProblem, part: dict) -> tuple[Network, np.ndarray, float]:
    """The network (with the part's box as input domain), centre and radius describing the part's box."""
    if part.get("lo") is None:
        return prob.network, prob.x0, prob.eps
    lo, hi = np.asarray(part["lo"], np.float64), np.asarray(part["hi"], np.float64)
    xc = 0.5 * lo + 0.5 * hi
    r = float(max((hi - xc).max(), (xc - lo).max(), 0.0))
    r = float(np.nextafter(r * (1.0 + 4 * np.finfo(float).eps), np.inf))  # [xc - r, xc + r] contains the box
    spec = replace(prob.network.input_spec, domain_lower=lo, domain_upper=hi)
    return prob.network._replace(input_spec=spec), xc, r


def _clip_and_phases(prob: BabProblem, part: dict):
    lows = [np.array(v, np.float64) for v in prob.root_lower]
    ups = [np.array(v, np.float64) for v in prob.root_upper]
    phases = [np.zeros(v.shape[0], np.int8) for v in lows]
    for k, j, s in part["splits"]:
        if s > 0:
            lows[k][j] = max(lows[k][j], 0.0)
            phases[k][j] = 1
        else:
            ups[k][j] = min(ups[k][j], 0.0)
            phases[k][j] = -1
    return list(zip(lows, ups)), tuple(phases)


def _magnitudes(prob: BabProblem, lb: LayerBounds, dbs) -> tuple[list, list]:
    """Interval magnitudes per hidden layer k: ``f_k >= ||∂z_k/∂x||_1`` (rows) and ``b_k >= |∂f/∂h_k|``."""
    ws = prob.network.weights
    H = len(ws)
    f = [None] * (H - 1)
    v = np.abs(ws[0]).sum(axis=1)
    for k in range(H - 1):
        f[k] = v
        if k + 1 < H - 1:
            v = np.abs(ws[k + 1]) @ (dbs[k][1] * v)
    b = [None] * (H - 1)
    g = np.abs(ws[-1][0])
    for k in range(H - 2, -1, -1):
        b[k] = g
        g = np.abs(ws[k]).T @ (dbs[k][1] * g)
    return f, b


def _choose_neuron(prob: BabProblem, lb: LayerBounds, phases, dbs):
    f, b = _magnitudes(prob, lb, dbs)
    best, arg = -1.0, None
    for k in range(len(prob.network.weights) - 1):
        l, u = lb.lower[k], lb.upper[k]
        free = (l < 0) & (u > 0) & (phases[k] == 0)
        if not free.any():
            continue
        score = np.where(free, (dbs[k][1] - dbs[k][0]) * f[k] * b[k], -1.0)
        j = int(np.argmax(score))
        if score[j] > best:
            best, arg = float(score[j]), (k, j)
        if prob.branching == "layer":
            break
    return arg


def _choose_input(prob: BabProblem, part: dict, dbs, lo: np.ndarray, hi: np.ndarray):
    ws = prob.network.weights
    g = np.abs(ws[-1][0])
    for k in range(len(ws) - 2, -1, -1):
        g = np.abs(ws[k]).T @ (dbs[k][1] * g)
    score = (hi - lo) * g
    i = int(np.argmax(score))
    return i if hi[i] > lo[i] and score[i] > 0 else None


def certified_empty(network: Network, region_lo: np.ndarray, region_hi: np.ndarray, pattern, duals) -> bool:
    """Whether the dual vector ``duals`` (one per hidden neuron, >= 0, e.g. from an LP) proves that no ``x`` of the
    box has the activation pattern ``pattern`` (closed: ``z_j >= 0`` where 1, ``z_j <= 0`` where 0).

    Farkas: every such x satisfies ``sum_j y_j (-s_j) z_j(x) <= 0`` (``s = 2 δ - 1``), i.e. ``a·x + β <= 0`` with
    ``a = -sum_j y_j s_j ∂z_j/∂x``; if ``min_{x in box} a·x + β`` exceeds the rounding error of computing ``a``,
    ``β`` and the affine maps ``z_j`` of the pattern, the box holds no such point.  The error allowance uses the
    magnitude chain of the pattern's affine maps and :func:`recurjac_scale._fp.gamma` of the total length."""
    from ..patterns import pattern_affine

    ws = [np.asarray(w, np.float64) for w in network.weights]
    bs = [np.asarray(b_, np.float64) for b_ in network.biases]
    aff = pattern_affine(network, pattern)
    n0 = ws[0].shape[1]
    xmag = np.maximum(np.abs(region_lo), np.abs(region_hi))
    # magnitude chain: |A_k| xmag + |c_k| is dominated by M_k
    mag = np.abs(ws[0]) @ xmag + np.abs(bs[0])
    mags = [mag]
    for k in range(1, len(aff)):
        mag = np.abs(ws[k]) @ mag + np.abs(bs[k])
        mags.append(mag)
    length = sum(w.shape[1] for w in ws) + 2 * len(ws) + n0
    a = np.zeros(n0)
    beta = 0.0
    err = 0.0
    for (A, c), d, y, m in zip(aff, pattern, duals, mags):
        y = np.maximum(np.asarray(y, np.float64), 0.0)
        s = np.where(np.asarray(d) > 0, 1.0, -1.0)
        a -= (y * s) @ A
        beta -= float((y * s) @ c)
        err += float(y @ m)
    lo_term = np.minimum(a * region_lo, a * region_hi)
    total = float(lo_term.sum()) + beta
    allowance = gamma(length) * (err + float(np.abs(a) @ xmag) + abs(beta)) * 4.0 + 1e-300
    return total > allowance


def _closed_pattern_check(prob: BabProblem, net: Network, xc, r, lb: LayerBounds, phases):
    """For a part with one activation pattern: (empty?, interior point or None)."""
    from scipy.optimize import linprog

    from ..patterns import pattern_affine

    pattern = [np.where(phases[k] != 0, phases[k] > 0, lb.lower[k] >= 0).astype(np.int8)
               for k in range(len(net.weights) - 1)]
    region = Region.of(net, xc, r, prob.p)
    lo, hi = region.box
    rows, rhs, sizes = [], [], []
    for (A, c), d in zip(pattern_affine(net, pattern), pattern):
        s = np.where(d > 0, -1.0, 1.0)
        nrm = np.maximum(np.linalg.norm(A, axis=1), 1e-300)
        rows.append(np.hstack([s[:, None] * A / nrm[:, None], np.ones((A.shape[0], 1))]))
        rhs.append(-(s * c) / nrm)
        sizes.append((A.shape[0], nrm))
    A_ub, b_ub = np.vstack(rows), np.concatenate(rhs)
    n0 = lo.shape[0]
    cost = np.zeros(n0 + 1)
    cost[-1] = -1.0
    res = linprog(cost, A_ub=A_ub, b_ub=b_ub, bounds=[*zip(lo, hi), (-1.0, 1.0)], method="highs")
    if res.status != 0:
        return False, None
    tau = float(res.x[-1])
    if tau < 0:
        marg = -np.asarray(res.ineqlin.marginals, np.float64)  # >= 0 for <= rows of a minimisation
        duals, off = [], 0
        for n, nrm in sizes:
            duals.append(marg[off:off + n] / nrm)
            off += n
        return certified_empty(net, lo, hi, pattern, duals), None
    # only a point of the closed region of the pattern in S; still a valid point of S
    return False, np.clip(res.x[:n0], lo, hi)


def _method_bound(prob: BabProblem, net: Network, xc, r, lb: LayerBounds):
    """The Jacobian method's bound of the part and its Jacobian bounds (with RecurJac-B's states, reused by the
    one-sign-vector bound), or ``None`` for methods without them.

    ``recurjac-b`` and ``linear-jacobian`` are run here once, with the split neurons' fixed derivatives
    (``lb.phases``), and bounded as :func:`recurjac_scale.lipschitz.lipschitz` does (without its naive
    product-of-norms candidate): Proposition 2 on the entry bounds, Algorithm 2 for ``p = inf`` (``recurjac-b``),
    the method's own row norm bound (``linear-jacobian``, whose entry bounds are already intersected with
    RecurJac-B's and whose states are RecurJac-B's).  linear-jacobian's entry bounds once excluded the true
    Jacobian when phases were set: its ReLU lines of sigma' assumed the full derivative range [alpha, 1] on every
    interval with l < 0 <= u, also for a neuron held inactive on [l, 0] (fixed in jacobian/derivative_lines.py;
    tests/test_linear_jacobian_phases.py, and the part tests of tests/test_bab.py)."""
    from ..jacobian import get_jacobian_method, jacobian_bounds
    from ..lipschitz import ALGORITHM2_METHODS, algorithm2_signs, lipschitz, lipschitz_from_bounds

    if prob.method in OWN_PASS_METHODS:
        jb = jacobian_bounds(net, xc, r, prob.p, method=prob.method, layer_bounds=lb, outputs=0)
        upper_ys = signs = None
        a2_fn = ALGORITHM2_METHODS.get(prob.method) if prob.p == math.inf else None
        if a2_fn is not None:
            signs = algorithm2_signs(jb.lower, jb.upper)
            upper_ys = a2_fn(net, jb, signs)
        prop2, alg2, _ = lipschitz_from_bounds(jb.lower, jb.upper, prob.p, upper_ys=upper_ys, signs=signs)
        bound = min(prop2, alg2 if alg2 is not None else math.inf)
        rn_fn = get_jacobian_method(prob.method).row_norms
        own = rn_fn(net, jb, prob.q) if rn_fn is not None else None
        if own is not None and np.size(own) == 1:
            bound = min(bound, float(np.asarray(own, np.float64).reshape(-1)[0]))
        return float(bound), jb
    res = lipschitz(net, xc, r, prob.p, method=prob.method, layer_bounds=lb, outputs=0)
    return float(res.points[0].lipschitz), None


def _sign_bound(prob: BabProblem, net: Network, xc, r, lb: LayerBounds, jb=None) -> float:
    """The l1 bound of :mod:`recurjac_scale.bab.signs` on a part (``jb``: RecurJac-B's Jacobian bounds of the part
    with states, computed here if not given).

    With more than ``sign_max_free`` coordinates of uncertain sign, the sign vector is enumerated over the
    ``SIGN_PARTIAL`` of them with the largest magnitude bounds only, and every other coordinate adds RecurJac-B's
    bound of its magnitude: ``max ||v||_1 <= max sum_{i in K} |v_i| + sum_{i not in K} max |v_i|``."""
    from .._fp import gamma
    from ..jacobian import jacobian_bounds
    from .signs import first_layer_box, l1_box_bound

    if jb is None:
        jb = jacobian_bounds(net, xc, r, prob.p, method="recurjac-b", layer_bounds=lb, outputs=0)
    if jb.states is None:
        return math.inf
    vl, vu = jb.lower[0], jb.upper[0]
    H = len(net.weights)
    if H == 2:  # ∂f/∂h_1 is the output row itself
        gl = gu = np.asarray(net.weights[1][0], np.float64)
    else:  # RecurJac-B's state bounds of ∂f/∂h_1
        gl, gu = jb.states[H - 2]["lower"][0], jb.states[H - 2]["upper"][0]
    dl, du = lb.derivative_bounds(net)[0]
    yl, yu = first_layer_box(dl, du, gl, gu)
    W0 = np.asarray(net.weights[0], np.float64)
    free = np.flatnonzero((vl < 0) & (vu > 0))
    if len(free) <= prob.sign_max_free:
        return l1_box_bound(W0, yl, yu, vl, vu, max_nodes=prob.sign_nodes)
    mag = np.maximum(-vl, vu)
    keep = free[np.argsort(-mag[free], kind="stable")[:SIGN_PARTIAL]]
    rest = np.setdiff1d(np.arange(W0.shape[1]), keep)
    tail = float(mag[rest].sum())
    tail += gamma(len(rest)) * tail
    return l1_box_bound(W0[:, keep], yl, yu, vl[keep], vu[keep], max_nodes=prob.sign_nodes) + tail


def _lp_tighten(prob: BabProblem, net: Network, xc, r, lb: LayerBounds, splits) -> LayerBounds:
    """``lb`` with the unstable neurons' bounds tightened by the certified LPs of :mod:`recurjac_scale.bab.lp`
    (over the part's box, the earlier layers' relaxations and the split constraints)."""
    from ..layer_bounds.base import count_unstable
    from .lp import tighten_bounds

    first = 1 if prob.lp_tighten == "all" or not splits else min(int(k) for k, _, _ in splits)
    lo, hi = Region.of(net, xc, r, prob.p).box
    low, up = tighten_bounds(net, lo, hi, lb.lower, lb.upper, prob.alphas, first_layer=max(first, 0))
    acts = net.layer_activations
    return replace(lb, lower=tuple(low), upper=tuple(up),
                   unstable=tuple(count_unstable(a, l, u) for a, l, u in zip(acts, low, up)))


def bound_part(prob: BabProblem, part: dict) -> dict:
    """Bound one part (module docstring).  Returns a dict: ``bound`` (a certified upper bound of ``||∇f||_q`` on
    the part, or ``None`` if the part is proved empty), ``branch`` (``["neuron", k, j]``, ``["input", i]`` or
    ``None`` for a closed part), ``lower`` / ``x`` (the best exact gradient norm at a point of S found here)."""
    from ..layer_bounds import layer_bounds

    net, xc, r = _part_geometry(prob, part)
    clip, phases = _clip_and_phases(prob, part)
    try:
        lb = layer_bounds(net, xc, r, prob.p, method=prob.layer_bound_method, clip=clip,
                          **dict(prob.layer_bound_options))
    except EmptyRegionError:
        return {"bound": None, "branch": None, "lower": -math.inf, "x": None, "status": "empty"}
    if prob.lp_tighten != "off" and prob.alphas is not None and (part["splits"] or prob.lp_tighten == "all"):
        try:
            lb = _lp_tighten(prob, net, xc, r, lb, part["splits"])
        except EmptyRegionError:
            return {"bound": None, "branch": None, "lower": -math.inf, "x": None, "status": "empty"}
    lb = replace(lb, phases=phases)
    bound, jb = _method_bound(prob, net, xc, r, lb)
    if prob.sign_bound and prob.q == 1.0 and len(net.weights) >= 2 and net.n_inputs <= SIGN_MAX_INPUTS:
        searched = False
        if prob.sign_search > 0 and jb is not None and prob.method == "linear-jacobian":
            from ..jacobian.linear_method import result_context
            from .signs import l1_sign_search

            found = result_context(net, jb)
            if found is not None:
                ctx, rows = found
                bound = min(bound, l1_sign_search(ctx, rows[0], jb.lower[0], jb.upper[0], budget=prob.sign_search))
                searched = True
        if not searched:
            bound = min(bound, _sign_bound(prob, net, xc, r, lb, jb))
    dbs = lb.derivative_bounds(net)
    cands = [np.asarray(xc, np.float64)]
    branch = None
    status = "open"
    if prob.alphas is not None and prob.split == "neuron":
        ch = _choose_neuron(prob, lb, phases, dbs)
        if ch is not None:
            branch = ["neuron", int(ch[0]), int(ch[1])]
        else:
            status = "closed"
            empty, x_int = _closed_pattern_check(prob, net, xc, r, lb, phases)
            if empty:
                return {"bound": None, "branch": None, "lower": -math.inf, "x": None, "status": "empty"}
            if x_int is not None:
                from ..testing import project

                cands.append(project(Region.of(prob.network, prob.x0, prob.eps, prob.p), x_int)[0])
    elif prob.split == "input":
        lo, hi = Region.of(net, xc, r, prob.p).box
        i = _choose_input(prob, part, dbs, lo, hi)
        if i is not None and (hi[i] - lo[i]) > 1e-12 * max(1.0, prob.eps):
            branch = ["input", i]
        else:
            status = "closed"
    X = np.vstack(cands)
    norms = np.linalg.norm(prob.network.jacobian(X)[:, 0, :], ord=prob.q, axis=1)
    best = int(np.argmax(norms))
    return {"bound": bound, "branch": branch, "lower": float(norms[best]), "x": X[best].tolist(), "status": status}


def bound_parts(prob: BabProblem, parts: list) -> list:
    """:func:`bound_part` for a list of parts (one dask task), with one BLAS thread."""
    from ..engine.schedulers import blas_single_thread

    with blas_single_thread():
        return [bound_part(prob, part) for part in parts]


def split_part(prob: BabProblem, part: dict, branch) -> list[dict]:
    """The two children of ``part`` for ``branch`` (``["neuron", k, j]`` or ``["input", i]``)."""
    kind = branch[0]
    d = int(part.get("depth", 0)) + 1
    if kind == "neuron":
        k, j = int(branch[1]), int(branch[2])
        return [
            {"lo": part["lo"], "hi": part["hi"], "splits": [*part["splits"], [k, j, s]], "depth": d} for s in (1, -1)
        ]
    if kind == "input":
        i = int(branch[1])
        if part.get("lo") is None:
            reg = Region.of(prob.network, prob.x0, prob.eps, prob.p)
            lo, hi = (v.copy() for v in reg.box)
        else:
            lo, hi = np.asarray(part["lo"], np.float64), np.asarray(part["hi"], np.float64)
        mid = 0.5 * lo[i] + 0.5 * hi[i]
        lo2, hi1 = lo.copy(), hi.copy()
        hi1[i] = mid
        lo2[i] = mid
        return [
            {"lo": lo.tolist(), "hi": hi1.tolist(), "splits": list(part["splits"]), "depth": d},
            {"lo": lo2.tolist(), "hi": hi.tolist(), "splits": list(part["splits"]), "depth": d},
        ]
    raise InputError(f"unknown branch {branch!r}")  # pragma: no cover


def relu_alphas(network: Network) -> tuple | None:
    """Hidden-layer ``alpha`` values when every hidden layer is relu / leaky_relu (and no output activation)."""
    if not network.output_activation.is_identity:
        return None
    if all(isinstance(a, LeakyReLU) for a in network.activations):
        return tuple(float(a.alpha) for a in network.activations)
    return None
