"""Back-substitution of linear relaxations: the engine shared by Fast-Lin and CROWN.

For a target layer ``t`` and a block ``R`` of its neurons, the upper bound of ``z(t)_R`` is obtained by the chain
(Zhang et al. 2018, Theorem 3.2; Weng et al. 2018, Sec. 3)

    Lam <- W[t][R, :]                                       (r, n_{t-1}) coefficients on h(t-1)
    for k = t-1 .. 0:
        c   += Lam+ b_up(k) + Lam- b_low(k)                 relaxation of sigma_k
        Lam <- Lam+ D(a_up(k)) + Lam- D(a_low(k))           (r, n_k)  coefficients on z(k)
        c   += Lam b[k];  Lam <- Lam W[k]                   (r, n_{k-1}) one GEMM
    upper = c + max_{x in S} Lam x                          concretisation with the dual norm q of p

and the lower bound by the same chain started from ``-W[t][R, :]``.  Every intermediate matrix has ``r`` rows and
at most ``max_k n_k`` columns: a block of ``block_rows`` rows never needs more memory than that (plus the weights).
Rows are independent, so the result does not depend on the block size (up to BLAS summation order).

Rounding (all bounds are certified for real arithmetic): the chain is exact for whatever matrix ``Lam`` it holds;
what rounding changes is the *value* of the linear form.  Each step's error is bounded by a matrix-vector product
with ``|Lam|`` and added to the result:

* relaxation step: ``gamma(n_k + 2) |Lam| (|a| zmax(k) + |b|)`` (element-wise products, the cast of
  ``Lam`` and of the slopes to the working dtype, the intercept dot products);
* affine step: ``gamma(max(n_k, n_{k-1}) + 2) |Lam_z| (|W[k]| hmax(k-1) + |b[k]|)`` (the GEMM ``Lam_z @ W[k]``
  and the dot with ``b[k]``, whose dot products have ``n_k`` terms, in any order of summation), where ``hmax``
  bounds ``|h|`` from the already certified earlier layers (``|x|`` over the region's box at the input);
* concretisation: ``gamma(n_0 + 2) |Lam| (|x0| + eps)`` and a relative ``gamma`` on the dual norm;
* the running sum ``c``: ``gamma(2 t + 4) * sum of |terms|``;
* underflow (products below the smallest normal number, which the relative bounds above do not see):
  an absolute ``eta (3 sum zmax(k) + |active| sum hmax(k-1) + 4 n_k + 8)`` per step (:func:`_underflow_err`).

``gamma`` is :func:`recurjac_scale._fp.gamma` for the working dtype (float32 GEMMs get float32 allowances).  The
allowances are computed in float64 (their own rounding is covered by the factor 2 inside ``gamma``).

By default the chains run in :mod:`recurjac_scale.layer_bounds.fused` (same products, same allowances, fewer
passes over memory and, for linear relaxations and the first affine step, fewer GEMMs), or, for the target layers
where that needs fewer flops (few unstable neurons below them), in :mod:`recurjac_scale.layer_bounds.lowrank` (one
shared chain plus low-rank corrections, with its own allowances); ``fused=False`` runs the plain numpy chains
below.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

from .._fp import TINY, cast_weights, gamma, underflow_unit
from ..activations import Activation
from ..errors import InputError
from ..network.model import Network
from .base import Region, apply_clip
from .fused import affine_gamma, block_bounds
from .lowrank import lowrank_block_bounds, plan as lowrank_plan
from .ibp import affine_interval, first_layer_bounds
from ..relaxations import value_bounds

__all__ = ["backsubstitute", "DEFAULT_BLOCK_ROWS", "RelaxFn"]

DEFAULT_BLOCK_ROWS = 512
"""Rows of a target layer processed together: intermediate matrices are at most (512, widest layer)."""

RelaxFn = Callable[[Activation, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]
"""``relax(activation, lower, upper) -> (a_low, b_low, a_up, b_up)``, each (n,) float64, certified."""


def _sup_dot(A: np.ndarray, v: np.ndarray) -> np.ndarray:
    """``A @ v`` with ``0 * inf = 0``; any nonzero product with an infinity makes the row ``+inf`` or ``-inf``
    (``+inf`` when both occur: the callers only use this for upper bounds).  ``A``: (r, n), ``v``: (n,)."""
    fin = np.isfinite(v)
    if fin.all():
        return A @ v
    out = A[:, fin] @ v[fin]
    sgn = A[:, ~fin] * np.sign(v[~fin])
    out = np.where((sgn < 0).any(axis=1), -np.inf, out)
    out = np.where((sgn > 0).any(axis=1), np.inf, out)
    return out


def _safe_mul(a: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Element-wise ``a * v`` with ``0 * inf = 0`` (``a >= 0``, ``v >= 0``)."""
    with np.errstate(invalid="ignore"):
        return np.where(a == 0, 0.0, a * v)


class _Layer:
    """What the chain needs of one certified layer ``k``: relaxation and magnitude bounds (all float64)."""

    __slots__ = (
        "a_low", "b_low", "a_up", "b_up", "zmax", "hmax", "active", "relax_err_up", "relax_err_low", "w_active",
        "underflow_err", "linear", "finite", "kept", "act_pos", "vec_kept", "w_fused",
    )

    def __init__(self, act: Activation, lower: np.ndarray, upper: np.ndarray, relax: RelaxFn):
        a_low, b_low, a_up, b_up = relax(act, lower, upper)
        self.a_low, self.b_low, self.a_up, self.b_up = a_low, b_low, a_up, b_up
        self.zmax = np.maximum(np.abs(lower), np.abs(upper))
        hl, hu = value_bounds(act.value, lower, upper)
        self.hmax = np.maximum(np.abs(hl), np.abs(hu))
        # Neurons that carry coefficients to earlier layers (dead ReLUs do not).
        self.active = np.flatnonzero((a_low != 0) | (a_up != 0))
        # |a| zmax + |b| per line, for the relaxation-step allowance (0 * inf = 0).
        self.relax_err_up = _safe_mul(np.abs(a_up), self.zmax) + np.abs(b_up)
        self.relax_err_low = _safe_mul(np.abs(a_low), self.zmax) + np.abs(b_low)
        # Equal slopes on every neuron: the relaxation step is Lam -> Lam D(a) whatever the signs.
        self.linear = bool(np.array_equal(a_low, a_up))
        self.finite = bool(all(np.isfinite(v).all() for v in (b_low, b_up, self.relax_err_up, self.relax_err_low)))
        # Neurons whose relaxation is not the zero line on both sides (dead ReLUs are): the others contribute
        # nothing to any chain, so the fused chains drop their columns (see fused.py); ``act_pos`` locates the
        # active neurons among them, ``vec_kept`` holds the relaxation and allowance vectors restricted to them.
        self.kept = np.flatnonzero((a_low != 0) | (a_up != 0) | (b_low != 0) | (b_up != 0))
        self.act_pos = np.searchsorted(self.kept, self.active)
        self.vec_kept = tuple(np.ascontiguousarray(v[self.kept]) for v in (
            a_up, a_low, b_up, b_low, self.relax_err_up, self.relax_err_low))
        self.w_fused = None


def _underflow_err(layer: _Layer, hmax_prev: np.ndarray, dtype) -> float:
    """Absolute allowance for underflow in one back-substitution step through layer ``k`` (any row).

    An underflowing multiplication errs by at most ``eta`` (:func:`recurjac_scale._fp.underflow_unit`), whatever
    the size of its operands, and additions are exact then.  The step computes, per row, ``lam_z`` (two products
    and a cast per neuron of the layer: coefficient error ``<= 3 eta`` on ``z(k)``, whose magnitude is at most
    ``zmax``), the intercept dot products (``<= 2 n_k`` products) and ``lam' = lam_z @ W[k]`` (``<= |active|``
    products per entry, on ``h(k-1)`` of magnitude at most ``hmax``).  The chain is exact for the matrix it holds
    (module docstring), so each error is charged once, here, against the magnitude of the variable it multiplies:
    ``eta (3 sum zmax + |active| sum hmax + 4 n_k + 8)`` (sums over the neurons that carry coefficients).  Without
    it, a product such as ``3e-170 * 3e-170`` flushed to zero and then multiplied by activations of ``1e300``
    would go unaccounted."""
    eta = underflow_unit(dtype)
    act = layer.active
    if act.size == 0:
        return eta * (4 * layer.zmax.size + 8)
    with np.errstate(over="ignore", invalid="ignore"):
        zsum = float(np.sum(eta * layer.zmax[act]))
        cols = (layer.w_active != 0).any(axis=0)
        hsum = float(np.sum(eta * hmax_prev[cols])) if cols.any() else 0.0
        out = 3.0 * zsum + act.size * hsum + eta * (4 * layer.zmax.size + 8)
    return math.inf if math.isnan(out) else out


def _concretise_upper(lam: np.ndarray, region: Region, box_lo, box_hi, g: float) -> np.ndarray:
    """Certified ``max_{x in S} lam @ x`` per row for ``S = B_p[x0, eps] ∩ D``; ``lam``: (r, n_0) float64.

    p = inf: the (clipped) box, midpoint-radius.  p = 1, 2: the ball ``lam x0 + eps ||lam_r||_q``, and, when a
    domain is declared, the minimum of that and the box bound (each is sound, so the minimum is).
    eps = inf: the box only (the domain, or all of R^n)."""
    absl = np.abs(lam)
    finite_box = bool(np.isfinite(box_lo).all() and np.isfinite(box_hi).all())
    box = None
    if finite_box:
        mid = 0.5 * box_lo + 0.5 * box_hi
        rad = 0.5 * (box_hi - box_lo)
        box = lam @ mid + absl @ rad
        box = box + g * (absl @ (np.abs(mid) + rad)) + TINY
    elif region.p == math.inf or not math.isfinite(region.eps) or region.lower is not None:
        lp, ln = np.maximum(lam, 0.0), np.minimum(lam, 0.0)
        box = _sup_dot(lp, box_hi) + _sup_dot(ln, box_lo)
        mag = np.maximum(np.where(np.isfinite(box_lo), np.abs(box_lo), 0.0), np.where(np.isfinite(box_hi), np.abs(box_hi), 0.0))
        box = box + g * (absl @ mag) + TINY
    if region.p == math.inf or not math.isfinite(region.eps):
        return box
    q = region.q
    if q == math.inf:
        nrm = absl.max(axis=1) if absl.shape[1] else np.zeros(absl.shape[0])
    elif q == 2.0:
        nrm = np.sqrt(np.einsum("ij,ij->i", lam, lam))
    else:
        nrm = absl.sum(axis=1)
    x0 = region.x0
    ball = lam @ x0 + region.eps * nrm * (1.0 + g)
    ball = ball + g * (absl @ np.abs(x0) + region.eps * nrm) + TINY
    if box is None:
        return ball
    return np.minimum(ball, box)


def _chain_upper(
    lam: np.ndarray,
    c: np.ndarray,
    t: int,
    ws: Sequence[np.ndarray],
    wd: Sequence[np.ndarray],
    bs: Sequence[np.ndarray],
    layers: Sequence[_Layer],
    aff_err: Sequence[np.ndarray],
    region: Region,
    dtype,
) -> np.ndarray:
    """Certified upper bound of ``lam @ h(t-1) + c`` over the region; ``lam``: (r, n_{t-1}) float64 (exact rows of
    the target layer, possibly negated), ``c``: (r,) float64."""
    c = c.astype(np.float64, copy=True)
    cabs = np.abs(c)
    slack = np.zeros_like(c)
    for k in range(t - 1, -1, -1):
        L = layers[k]
        nk = lam.shape[1]
        g_k = gamma(nk + 2, dtype)
        lam64 = lam if lam.dtype == np.float64 else lam.astype(np.float64)
        lp, ln = np.maximum(lam64, 0.0), np.minimum(lam64, 0.0)
        term = _sup_dot(lp, L.b_up) + _sup_dot(ln, L.b_low)
        c = c + term
        cabs = cabs + np.abs(term)
        slack = slack + g_k * (_sup_dot(lp, L.relax_err_up) - _sup_dot(ln, L.relax_err_low))
        act = L.active
        if act.size == nk:
            lam_z = (lp * L.a_up + ln * L.a_low).astype(dtype, copy=False)
        else:
            lam_z = (lp[:, act] * L.a_up[act] + ln[:, act] * L.a_low[act]).astype(dtype, copy=False)
        del lp, ln, lam64
        # affine layer k: z(k) = W[k] h(k-1) + b[k], restricted to the neurons that carry coefficients
        w_act = L.w_active
        lam_z64 = lam_z if lam_z.dtype == np.float64 else lam_z.astype(np.float64)
        term = lam_z64 @ bs[k][act]
        c = c + term
        cabs = cabs + np.abs(term)
        g_a = affine_gamma(ws[k].shape[1], ws[k].shape[0], dtype)
        slack = slack + g_a * _sup_dot(np.abs(lam_z64), aff_err[k][act]) + L.underflow_err
        lam = lam_z @ w_act
        del lam_z64
    lam64 = lam if lam.dtype == np.float64 else lam.astype(np.float64)
    lo, hi = region.box
    g0 = gamma(lam.shape[1] + 2, dtype)
    sup = _concretise_upper(lam64, region, lo, hi, g0)
    total = c + sup
    slack = slack + gamma(2 * t + 4) * (cabs + np.abs(sup)) + TINY
    with np.errstate(invalid="ignore"):
        out = total + slack
    return np.where(np.isnan(out), np.inf, out)


class _State:
    """Bounds of the layers done so far, and each relaxation's view of them (one chain state)."""

    def __init__(self, relaxes: Sequence[RelaxFn], l: np.ndarray, u: np.ndarray, xmax: np.ndarray):
        self.relaxes = list(relaxes)
        self.lowers, self.uppers = [l], [u]
        self.variants: list[list[_Layer]] = [[] for _ in self.relaxes]
        self.aff_err: list[np.ndarray] = []
        self.hmax_prev = xmax

    def prepare(self, k: int, act: Activation, ws, wd, bs, block_rows: int) -> None:
        """Relax layer ``k`` (whose bounds are final) for every variant."""
        for layers, rfn in zip(self.variants, self.relaxes):
            layer = _Layer(act, self.lowers[k], self.uppers[k], rfn)
            # rows of W[k] of the neurons that carry coefficients (a copy only when some are dropped)
            layer.w_active = wd[k] if layer.active.size == wd[k].shape[0] else wd[k][layer.active]
            layer.underflow_err = _underflow_err(layer, self.hmax_prev, wd[k].dtype)
            # rows of the active neurons, columns of the kept neurons of layer k - 1 (all inputs for k = 0)
            if k and layers[k - 1].kept.size < wd[k].shape[1]:
                layer.w_fused = np.ascontiguousarray(layer.w_active[:, layers[k - 1].kept])
            else:
                layer.w_fused = layer.w_active
            layers.append(layer)
        n_k = ws[k].shape[0]
        err = np.empty(n_k)
        for r0 in range(0, n_k, block_rows):  # |W[k]| hmax + |b[k]|, one row block at a time
            rows = slice(r0, min(n_k, r0 + block_rows))
            err[rows] = _sup_dot(np.abs(ws[k][rows]), self.hmax_prev) + np.abs(bs[k][rows])
        self.aff_err.append(err)
        self.hmax_prev = self.variants[0][k].hmax

    def fusable(self, t: int, bs) -> list[bool]:
        """Per variant: can layer ``t`` be bounded by :mod:`~recurjac_scale.layer_bounds.fused` (everything
        finite on the layers below ``t``)?"""
        ok = all(np.isfinite(self.aff_err[k]).all() and np.isfinite(bs[k]).all() for k in range(t))
        return [ok and all(L.finite for L in layers[:t]) for layers in self.variants]

    def bound_rows(self, rows: slice, t: int, ws, wd, bs, region, dtype, lo_t, up_t, skip=()) -> None:
        """Intersect ``lo_t[rows]``, ``up_t[rows]`` with every variant's bound of layer ``t`` (plain numpy chains;
        variants whose index is in ``skip`` are left out)."""
        w_rows, b_rows = ws[t][rows], bs[t][rows]
        for i, layers in enumerate(self.variants):
            if i in skip:
                continue
            up = _chain_upper(w_rows, b_rows, t, ws, wd, bs, layers, self.aff_err, region, dtype)
            lo = -_chain_upper(-w_rows, -b_rows, t, ws, wd, bs, layers, self.aff_err, region, dtype)
            up_t[rows] = np.minimum(up_t[rows], up)
            lo_t[rows] = np.maximum(lo_t[rows], lo)


def _bound_layer(states: Sequence[_State], t: int, ws, wd, bs, region, dtype, block_rows: int, fused: bool,
                 lowrank: bool | None = None, lowrank_cache: dict | None = None):
    """Bounds of layer ``t`` from every state (each intersected over its variants): list of (lower, upper).

    With ``fused``, every variant that can (finite quantities) of every state is bounded by one
    :func:`~recurjac_scale.layer_bounds.fused.block_bounds` call per row block, which shares the first affine
    step among them, or, in float64 with a bounded input box and when it needs fewer flops (``lowrank=None``;
    ``True``: whenever it can, ``False``: never), by
    :func:`~recurjac_scale.layer_bounds.lowrank.lowrank_block_bounds` (one shared chain plus low-rank
    corrections); the others run the plain numpy chains."""
    n_t = ws[t].shape[0]
    outs = [(np.full(n_t, -np.inf), np.full(n_t, np.inf)) for _ in states]
    jobs = []  # (state index, variant index) run fused
    if fused:
        for si, st in enumerate(states):
            jobs += [(si, vi) for vi, ok in enumerate(st.fusable(t, bs)) if ok]
    variants = [(states[si].variants[vi], states[si].aff_err) for si, vi in jobs]
    pl = None
    if jobs and lowrank is not False and dtype == np.float64 and all(np.isfinite(b).all() for b in region.box):
        pl = lowrank_plan(t, variants, wd, n_t, block_rows, force=bool(lowrank), cache=lowrank_cache)
    for r0 in range(0, n_t, block_rows):
        rows = slice(r0, min(n_t, r0 + block_rows))
        for si, st in enumerate(states):
            skip = {vi for sj, vi in jobs if sj == si}
            if len(skip) < len(st.variants):
                st.bound_rows(rows, t, ws, wd, bs, region, dtype, outs[si][0], outs[si][1], skip)
        if pl is not None:
            res = lowrank_block_bounds(pl, ws[t][rows], bs[t][rows], wd, bs, variants, region, _concretise_upper)
        elif jobs:
            res = block_bounds(ws[t][rows], bs[t][rows], t, wd, bs, variants, region, dtype, _concretise_upper)
        else:
            continue
        for (si, _), (up, lo) in zip(jobs, res):
            lo_t, up_t = outs[si]
            up_t[rows] = np.minimum(up_t[rows], up)
            lo_t[rows] = np.maximum(lo_t[rows], lo)
    return outs


def backsubstitute(
    network: Network,
    region: Region,
    relax: RelaxFn | Sequence[RelaxFn],
    *,
    block_rows: int | None = None,
    dtype=np.float64,
    intersect_ibp: bool = True,
    independent: Sequence[RelaxFn] = (),
    fused: bool = True,
    clip=None,
    lowrank: bool | None = None,
) -> tuple[list, list]:
    """Layer-by-layer bounds by back-substituting linear relaxations (CROWN / Fast-Lin).

    Parameters
    ----------
    network : Network
        In-memory network.
    region : Region
    relax : RelaxFn or sequence of RelaxFn
        The per-neuron relaxation (this is what distinguishes Fast-Lin from CROWN).  With several, every layer is
        bounded once per relaxation (all built on the same, already intersected, earlier bounds) and the results
        are intersected: each is sound, so the intersection is.
    block_rows : int, optional
        Rows of a target layer processed together (default :data:`DEFAULT_BLOCK_ROWS`).  Peak extra memory is
        about ``4 * block_rows * max_k n_k`` floats per chain with ``fused=False``; the fused engine holds every
        chain of a block at once (CROWN-Ada: 2, Fast-Lin: 1; about ``3 (chains + 1) * block_rows * max_k n_k``
        floats at the first step).  Plus, per layer and relaxation, a copy of the rows of ``W[k]`` of the
        neurons that carry coefficients when some do not (dead ReLUs), and with ``fused`` a copy of those rows
        restricted to the columns of the previous layer's live neurons, which saves their share of the flops.
    dtype : {float64, float32}
        Working precision of the GEMMs; allowances are sized for it, so float32 results are certified too.
    intersect_ibp : bool
        Also intersect each layer with its interval-arithmetic bound from the previous layer (cheap, sound).
    independent : sequence of RelaxFn
        Relaxations run as separate, complete methods (each on its own earlier bounds, exactly as it would run
        alone); every layer of the result is also intersected with theirs, so the result is never looser than
        any of them (used by CROWN to be never looser than Fast-Lin).
    fused : bool
        Run the chains through :mod:`recurjac_scale.layer_bounds.fused` (one pass over the coefficients per
        relaxation step; one chain for both bounds of a relaxation that is linear on every layer, e.g. Fast-Lin's
        with finite bounds).  ``False`` runs the plain numpy chains, one per bound and relaxation (the reference
        the fused path is tested against).  Both are certified; they differ only in the order of summation.
    lowrank : bool or None
        With ``fused`` in float64 over a bounded box: carry the chains of a block as one shared chain plus
        low-rank corrections on the neurons where their relaxations differ (:mod:`recurjac_scale.layer_bounds.
        lowrank`).  ``None`` (default): for every target layer whose flop count it lowers (few unstable
        neurons); ``True``: whenever it fits in memory; ``False``: never.  Certified like the other engines; the
        bounds agree with them up to the order of summation and rounding allowances.  Extra memory when used:
        one copy of each level's weights restricted to the neurons that matter (kept for the whole call), and
        factors of ``rank x width`` floats, ``rank`` (unstable neurons below the target) being capped so that
        the factor at the input (``rank x n_0``) is no bigger than the largest weight matrix.

    Returns
    -------
    lowers, uppers : list of ndarray, shapes (n_k,) for k = 1..H, float64
    """
    dtype = np.dtype(dtype)
    if dtype not in (np.dtype(np.float64), np.dtype(np.float32)):
        raise InputError(f"dtype={dtype} is not supported; accepted: float64, float32")
    block_rows = DEFAULT_BLOCK_ROWS if block_rows is None else int(block_rows)
    if block_rows < 1:
        raise InputError(f"block_rows={block_rows} must be a positive integer")
    ws = [np.asarray(w, dtype=np.float64) for w in network.weights]
    bs = [np.asarray(b, dtype=np.float64) for b in network.biases]
    wd = ws if dtype == np.float64 else [cast_weights(w, dtype, f"weights of layer {k + 1}") for k, w in enumerate(ws)]
    acts = network.layer_activations
    lo, hi = region.box
    xmax = np.maximum(np.abs(lo), np.abs(hi))
    l, u = apply_clip(clip, 0, *first_layer_bounds(ws[0], bs[0], region))
    main = _State([relax] if callable(relax) else relax, l, u, xmax)
    others = [_State([r], l, u, xmax) for r in independent]
    states = (main, *others)
    lowrank_cache: dict = {}  # level layouts and weight copies of the low-rank chains, reused across layers
    for t in range(1, network.n_layers):
        k = t - 1
        for st in states:
            st.prepare(k, acts[k], ws, wd, bs, block_rows)
        results = _bound_layer(states, t, ws, wd, bs, region, dtype, block_rows, fused, lowrank, lowrank_cache)
        if intersect_ibp:
            for i, st in enumerate(states):
                hl, hu = value_bounds(acts[k].value, st.lowers[k], st.uppers[k])
                il, iu = affine_interval(ws[t], bs[t], hl, hu)
                results[i] = (np.maximum(results[i][0], il), np.minimum(results[i][1], iu))
        for st, (lo_t, up_t) in zip(others, results[1:]):
            lo_t, up_t = apply_clip(clip, t, lo_t, up_t)
            st.lowers.append(lo_t)
            st.uppers.append(up_t)
        lo_t, up_t = results[0]
        for lo_o, up_o in results[1:]:
            lo_t = np.maximum(lo_t, lo_o)
            up_t = np.minimum(up_t, up_o)
        lo_t, up_t = apply_clip(clip, t, lo_t, up_t)
        main.lowers.append(lo_t)
        main.uppers.append(up_t)
    return main.lowers, main.uppers
