"""Jacobian bounds by linear bound propagation through the gradient graph (``linear-jacobian``).

The idea of Shi, Wang, Zhang, Kolter & Hsieh (NeurIPS 2022), on this package's certified building blocks.  With
the output selection folded in (``z(k) = W[k] h(k-1) + b[k]``, ``h(k) = sigma_k(z(k))``, ``h(-1) = x``, ``k =
0..H-1``) the gradient of output row ``i`` is computed by

    g(H-2) = W[H-1][i, :]  (exact),     y(k) = g(k) ⊙ a(k),  a(k) = sigma_k'(z(k)),     g(k-1) = y(k) W[k],

and the Jacobian entry is ``J[i, j] = y(0) · W[0][:, j]``.  For a linear objective ``Lam · y(0)`` (a Jacobian entry,
its negation, or a combination of entries) an upper bound over the region ``S`` is built in two passes:

1. *Gradient graph, upward* (``k = 0 .. H-2``).  Each product ``y_r = a_r g_r`` with ``a_r`` in ``[dl_r, du_r]``
   (the certified derivative bounds) and ``g_r`` in ``[gl_r, gu_r]`` (RecurJac-B's certified bounds of
   ``∂f_i/∂h(k)``, its states ``0 .. T-1``) is replaced by a McCormick plane chosen by the sign of its coefficient
   (upper planes ``du g + gl a - du gl``, ``dl g + gu a - dl gu``; lower planes ``dl g + gl a - dl gl``,
   ``du g + gu a - du gu``; the plane that is tighter at the centre's own ``(sigma'(z0), g0)``).  The coefficient
   on ``g(k)`` flows exactly through ``W[k+1]`` to ``y(k+1)``; the coefficient ``mu`` on ``a(k)`` becomes a
   coefficient on ``z(k)`` through certified lines of ``sigma'`` (:mod:`.derivative_lines`).  At the top,
   ``g(H-2)`` is exact and becomes a constant.
2. *Network, downward* (``k = H-2 .. 0``).  The collected coefficients ``nu(k)`` on every ``z(k)`` form one
   linear function of the pre-activations, which is back-substituted CROWN-style through the network (CROWN's
   certified relaxations of ``sigma`` on the same layer bounds, :func:`recurjac_scale.layer_bounds.crown.
   crown_relaxation`), so the activation patterns of all layers stay correlated through ``x``, and concretised
   over ``B_p[x0, eps] ∩ D`` with the dual norm.

Every entry is intersected with RecurJac-B's bounds on the same layer bounds, so it is never looser; at
``eps = 0`` the layer bounds are points and the result is RecurJac's (exact up to rounding).  Rows (outputs) and
objectives are independent; the objectives of a row run as one block of GEMMs (:data:`OBJECTIVE_BLOCK` columns).

The propagation is split by concept:

- this module: the settings, :func:`linear_context` (builds the per-network :class:`LinearContext`: certified lines
  of ``sigma'`` and ``sigma`` on the layer bounds, magnitude bounds, the weight blocks that skip exact zeros), and
  the per-row drivers :func:`tighten_gradient_bounds` (certified bounds of ``∂f_i/∂h(k)``, intersected with
  RecurJac-B's) and :func:`entry_bounds` (certified bounds of every Jacobian entry, intersected with RecurJac-B's);
- :mod:`.linear_planes`: per output row, the valid planes of ``y = a g`` (:func:`row_bounds`, :func:`layer_planes`);
- :mod:`.linear_stable`: the two passes above with the exact neurons eliminated, for objectives on a gradient
  (:func:`bound_gradient_variants`: the entries, the tightening and the row norms use it);
- :mod:`.linear_passes`: the two passes above for a block of objectives on ``y(start)`` over every live neuron
  (:func:`bound_objectives`, :func:`bound_objectives_variants`), with the rounding argument (its "Rounding"
  section) and the underflow allowance;
- :mod:`.linear_base`: the data they share (:class:`LinearContext`, :class:`RowBounds`; no computation).

The names listed in ``__all__`` are importable from this module whichever of these defines them.

Cost: the passes run on the neurons that are not exact only (:mod:`.linear_stable`: stable neurons are linear in
both passes, so the maps through them are precomputed once per context and the per-objective work is on the unstable
ones); pass 1 runs once per block for all slope variants of the lines of ``sigma'`` (:data:`SLOPE_VARIANTS`; each
objective keeps the smallest bound); pass 2 runs once per variant with slopes (constant lines put no coefficient on
any ``z``).  The gradient bounds are tightened only where ``dl < du`` (elsewhere ``a`` is the constant ``du`` and
every plane is exact).  The elementwise steps are numba kernels (:mod:`.linear_kernels`).  Optionally
(:data:`ADAPTIVE_AFTER`, on by default) a row's later objectives skip the variants with slopes once they never won on
its first objectives.  :func:`bound_objectives_variants` (objectives on ``y(start)``) keeps the dense passes over
every live neuron (:func:`.linear_passes.dense_blocks`, with the first hidden layer's stable neurons folded into one
GEMM, :data:`FOLD_FIRST_LAYER`).

Rounding: all arithmetic is float64 (float32 weights are converted exactly); every bound includes an allowance for
the rounding of the propagation (:mod:`.linear_passes`, "Rounding"), reported as ``allowance`` (the largest
allowance relative to the width of its entry).
"""

from __future__ import annotations

import numpy as np

from ..layer_bounds.crown import crown_relaxation
from ..relaxations import value_bounds
from .derivative_lines import derivative_lines
from .linear_base import LinearContext, RowBounds
from .linear_passes import bound_objectives, bound_objectives_variants
from .linear_planes import _v, layer_planes, row_bounds
from .linear_stable import bound_gradient_variants, stable_collapse

__all__ = [
    "LinearContext", "RowBounds", "linear_context", "layer_planes", "row_bounds", "tighten_gradient_bounds",
    "bound_objectives", "bound_objectives_variants", "bound_gradient_variants", "entry_bounds",
    "centre_gradients_ctx", "SLOPE_VARIANTS", "OBJECTIVE_BLOCK", "ADAPTIVE_AFTER", "FOLD_FIRST_LAYER",
]

SLOPE_VARIANTS = ("centre", "area", "constant")
"""Slope choices of the lines of ``sigma'`` (:func:`derivative_lines`) that are each propagated; every entry takes
the tightest (each is certified, so their intersection is)."""

OBJECTIVE_BLOCK = 256
"""Jacobian columns per block of objectives (``2 x`` this many objectives: upper and lower bounds)."""

FOLD_FIRST_LAYER = True
"""Fold the first hidden layer's exact-line neurons (stable ReLUs) into one precomputed GEMM in the network pass
(:mod:`.linear_collapse`; used where it saves GEMM work).  Same bounds up to the rounding allowance, which is
computed from ``|Gam| |W[1]|`` instead of ``|Gam W[1]|`` there (about 1e-9 relative on the 784-1024-...-10 benchmark
net at eps 0.001)."""

ADAPTIVE_AFTER = 128
"""Default :attr:`LinearContext.adaptive`: after this many objectives of one output row bounded with every slope
variant, where the lines of ``sigma'`` with slopes never gave a smaller bound than the constant lines, the row's
remaining objectives run with the constant lines only (their network passes are skipped).  A heuristic for speed:
every bound stays certified, but a skipped variant could have been tighter for a later objective.  0 disables it."""


def _safe_mul(a, v):
    with np.errstate(invalid="ignore"):
        return np.where(a == 0, 0.0, a * v)


def linear_context(netc, region, layer_bounds, derivative_bounds, slopes=SLOPE_VARIANTS,
                   adaptive: int | None = None) -> LinearContext | None:
    """Build the :class:`LinearContext`, or ``None`` when a hidden layer's bounds are not finite (``eps = inf``
    without a domain: the method then returns RecurJac's bounds).

    Parameters
    ----------
    netc : Network
        Output selection folded in (identity output activation).
    region : Region
    layer_bounds : LayerBounds
        Certified pre-activation bounds of ``netc`` over ``region``.
    derivative_bounds : list of (dl, du)
        :func:`recurjac_scale.jacobian.derivative_bounds_for` of the same bounds.
    slopes : sequence of str
        Slope choices of the lines of ``sigma'`` (:func:`derivative_lines` ``mode``), one set of lines each
        (:attr:`LinearContext.variants`).
    adaptive : int
        :attr:`LinearContext.adaptive` (``None``: :data:`ADAPTIVE_AFTER` as set at the call; 0: every variant for
        every objective).
    """
    H = netc.n_layers
    W = [np.asarray(w, dtype=np.float64) for w in netc.weights]
    b = [np.ascontiguousarray(v, dtype=np.float64) for v in netc.biases]
    acts = list(netc.activations)
    lows = [np.asarray(v, np.float64) for v in layer_bounds.lower[: H - 1]]
    ups = [np.asarray(v, np.float64) for v in layer_bounds.upper[: H - 1]]
    if not all(np.isfinite(v).all() for v in lows + ups):
        return None
    box_lo, box_hi = region.box
    if not (np.isfinite(box_lo).all() and np.isfinite(box_hi).all()):
        return None
    # centre's pre-activations, clipped into the certified bounds (heuristics only)
    zs = netc.pre_activations(region.x0[None, :])
    ctx = LinearContext(
        W=W, b=b, absW=[np.abs(w) for w in W], dl=[], du=[], variants={}, a_low=[],
        b_low=[], a_up=[], b_up=[], relax_err_up=[], relax_err_low=[], zmax=[], hmax=[],
        xmax=np.maximum(np.abs(box_lo), np.abs(box_hi)), a0=[], region=region, bounds=list(zip(lows, ups)),
        adaptive=int(ADAPTIVE_AFTER if adaptive is None else adaptive),
    )
    for k in range(H - 1):
        act, l, u = acts[k], lows[k], ups[k]
        dl, du = (np.asarray(v, np.float64) for v in derivative_bounds[k])
        z0 = np.clip(np.asarray(zs[k][0], np.float64), l, u)
        for v in slopes:
            ctx.variants.setdefault(v, ([], [], [], []))
            for lst, arr in zip(ctx.variants[v], derivative_lines(act, l, u, dl, du, z0, v)):
                lst.append(arr)
        al, bl, au, bu = crown_relaxation(act, l, u)
        zmax = np.maximum(np.abs(l), np.abs(u))
        hl, hu = value_bounds(act.value, l, u)
        ctx.dl.append(dl)
        ctx.du.append(du)
        ctx.a_low.append(np.ascontiguousarray(al, np.float64))
        ctx.b_low.append(np.ascontiguousarray(bl, np.float64))
        ctx.a_up.append(np.ascontiguousarray(au, np.float64))
        ctx.b_up.append(np.ascontiguousarray(bu, np.float64))
        ctx.relax_err_up.append(_safe_mul(np.abs(au), zmax) + np.abs(bu))
        ctx.relax_err_low.append(_safe_mul(np.abs(al), zmax) + np.abs(bl))
        ctx.zmax.append(zmax)
        ctx.hmax.append(np.maximum(np.abs(hl), np.abs(hu)))
        ctx.a0.append(np.clip(act.derivative(z0), dl, du))
    ctx.fold_first = bool(FOLD_FIRST_LAYER)
    ctx.compact = _compact(ctx)
    ctx.compact["stable"] = stable_collapse(ctx)
    return ctx



def _compact(ctx: LinearContext) -> dict:
    """Index sets and weight blocks that skip exact zeros in the GEMMs of :func:`bound_objectives`.

    - ``live[k]``: neurons with ``du > 0``; elsewhere ``y(k) = 0`` and every plane has ``coef_g = 0`` (``dl <= du =
      0``), so the gradient step only needs ``W[k+1][live(k+1)][:, live(k)]`` (the coefficients on the dead ``y(k+1)``
      add exact zeros: ``ymax = 0`` and constant lines ``0``);
    - ``act[k]``: neurons whose coefficient in the network pass can be non-zero (a slope of ``sigma`` or ``du > 0``);
    - ``kept[k]``: neurons whose relaxation of ``sigma`` is not the zero line (dead ReLUs are): the affine step of
      the network pass only needs ``W[k][act(k)][:, kept(k-1)]``.
    The restricted weight blocks themselves (``grad``, ``net``, ``first``, and ``fold``) are built on first use
    (:func:`.linear_passes.dense_blocks`).
    Dropping terms that are exact zeros leaves every real-number sum unchanged and the summations shorter, so the
    rounding allowances still hold."""
    H = ctx.H
    live = [np.flatnonzero(du > 0) for du in ctx.du]
    act = [np.flatnonzero((au != 0) | (al != 0) | (du > 0)) for au, al, du in zip(ctx.a_up, ctx.a_low, ctx.du)]
    kept = [np.flatnonzero((au != 0) | (al != 0) | (bu != 0) | (bl != 0))
            for au, al, bu, bl in zip(ctx.a_up, ctx.a_low, ctx.b_up, ctx.b_low)]
    pos, livepos = [], []
    for k in range(H - 1):
        p = np.full(ctx.du[k].size, -1, dtype=np.int64)
        p[kept[k]] = np.arange(kept[k].size)
        pos.append(p)
        p = np.full(ctx.du[k].size, -1, dtype=np.int64)
        p[live[k]] = np.arange(live[k].size)
        livepos.append(p)
    # magnitude of the affine step into z(k): |W[k]| |h(k-1)|max + |b[k]| (|x|max for k = 0)
    wmag = [ctx.absW[k] @ (ctx.hmax[k - 1] if k >= 1 else ctx.xmax) + np.abs(ctx.b[k]) for k in range(H - 1)]
    act = [a.astype(np.int64) for a in act]
    return {"live": live, "act": act, "kept": kept, "pos": pos, "livepos": livepos, "wmag": wmag}


def tighten_gradient_bounds(ctx: LinearContext, rb: RowBounds, block: int = 256) -> None:
    """Tighten the row's gradient bounds ``gl(k), gu(k)`` in place, top down (``k = H-3 .. 0``), by bounding each
    ``g_r(k) = y(k+1) · W[k+1][:, r]`` with :func:`bound_objectives` started at layer ``k + 1`` (on the bounds of
    the layers above, already tightened), intersected with the current (RecurJac) bounds; the planes of layer
    ``k`` are then rebuilt.  Every bound stays certified."""
    for k in range(ctx.H - 3, -1, -1):
        # only neurons with dl < du: elsewhere a(k) is the constant du and every plane is exact whatever the bounds
        # of g (they only enter the rounding allowance through ymax)
        rows = np.flatnonzero(ctx.dl[k] < ctx.du[k])
        d = rows.size
        lo_new = rb.gl[k].copy()
        up_new = rb.gu[k].copy()
        for r0 in range(0, d, block):
            r1 = min(d, r0 + block)
            nb = r1 - r0
            ub = bound_gradient_variants(ctx, rb, k, unit=_unit(rows[r0:r1])).min(axis=0)
            idx = rows[r0:r1]
            up_new[idx] = np.minimum(up_new[idx], ub[:nb])
            lo_new[idx] = np.maximum(lo_new[idx], -ub[nb:])
        rb.gl[k], rb.gu[k] = lo_new, up_new
        rb.up[k], rb.lo[k], rb.ymax[k] = layer_planes(ctx, k, lo_new, up_new, rb.g0[k], rb.planes)
        if k >= 1:
            rb.v[k - 1] = _v(ctx, rb.ymax[k], k - 1)


def _unit(idx: np.ndarray):
    """Unit objectives ``+g[idx]`` then ``-g[idx]`` (:func:`bound_gradient_variants` ``unit``)."""
    idx = np.asarray(idx, dtype=np.int64)
    return np.concatenate([idx, idx]), np.concatenate([np.ones(idx.size), -np.ones(idx.size)])


def entry_bounds(ctx: LinearContext, states, rj_lower, rj_upper, *, block: int = OBJECTIVE_BLOCK,
                 tighten: bool = True, planes: str = "auto"):
    """Bounds of every Jacobian entry, intersected with RecurJac-B's.

    Parameters
    ----------
    ctx : LinearContext
    states : list of dict
        RecurJac-B's states ``0..T`` (``states[t]["lower"/"upper"]`` of shape ``(m, d_{H-2-t})``).
    rj_lower, rj_upper : ndarray, shape (m, n_0)
        RecurJac-B's Jacobian bounds.
    tighten : bool
        Tighten the gradient bounds of the hidden layers first (:func:`tighten_gradient_bounds`).
    planes : str
        :func:`row_bounds`.

    Returns
    -------
    lower, upper : ndarray, shape (m, n_0)
    allowance : float
        Largest rounding allowance relative to the width of its entry.
    rows : list of RowBounds
    """
    H = ctx.H
    m, n0 = rj_lower.shape
    g0 = centre_gradients_ctx(ctx)
    lower = np.array(rj_lower, dtype=np.float64, copy=True)
    upper = np.array(rj_upper, dtype=np.float64, copy=True)
    rows = []
    worst = 0.0
    for i in range(m):
        gl = [np.asarray(states[H - 2 - k]["lower"][i], np.float64) for k in range(H - 1)]
        gu = [np.asarray(states[H - 2 - k]["upper"][i], np.float64) for k in range(H - 1)]
        rb = row_bounds(ctx, i, gl, gu, g0[i], planes)
        if tighten:
            tighten_gradient_bounds(ctx, rb, block)
        rows.append(rb)
        for j0 in range(0, n0, block):
            j1 = min(n0, j0 + block)
            errs = []
            ubs = bound_gradient_variants(ctx, rb, -1, unit=_unit(np.arange(j0, j1)), allowance=errs)
            ub = ubs.min(axis=0)
            nb = j1 - j0
            # the allowance of the winning variant, relative to the entry's width where the propagation won
            win = np.argmin(ubs, axis=0)
            err = np.stack(errs)[win, np.arange(ub.size)]
            won_up = ub[:nb] < upper[i, j0:j1]
            won_lo = -ub[nb:] > lower[i, j0:j1]
            upper[i, j0:j1] = np.minimum(upper[i, j0:j1], ub[:nb])
            lower[i, j0:j1] = np.maximum(lower[i, j0:j1], -ub[nb:])
            width = upper[i, j0:j1] - lower[i, j0:j1]
            with np.errstate(divide="ignore", invalid="ignore"):
                rel = np.concatenate([np.where(won_up, err[:nb] / width, 0.0), np.where(won_lo, err[nb:] / width, 0.0)])
            rel = rel[np.isfinite(rel)]
            if rel.size:
                worst = max(worst, float(rel.max()))
    return lower, upper, worst, rows


def centre_gradients_ctx(ctx: LinearContext) -> list:
    """:func:`centre_gradients` from the context's weights and centre derivatives (``a0``)."""
    H = ctx.H
    W = ctx.W
    G = [None] * (H - 1)
    g = W[H - 1]
    for k in range(H - 2, -1, -1):
        G[k] = g
        if k > 0:
            g = (g * ctx.a0[k][None, :]) @ W[k]
    return [[G[k][i] for k in range(H - 1)] for i in range(W[H - 1].shape[0])]
