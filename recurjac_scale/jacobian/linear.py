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

Cost: pass 1 runs once per block for all slope variants of the lines of ``sigma'`` (:data:`SLOPE_VARIANTS`; each
objective keeps the smallest bound); pass 2 runs once per variant with slopes (constant lines put no coefficient on
any ``z``).  The gradient bounds are tightened only where ``dl < du`` (elsewhere ``a`` is the constant ``du`` and
every plane is exact).  GEMMs skip exact zeros (dead neurons, zero relaxation lines, :func:`_compact`); the
first hidden layer's stable neurons are folded into one GEMM (:data:`FOLD_FIRST_LAYER`); the elementwise steps
are numba kernels (:mod:`.linear_kernels`).  Optionally (:data:`ADAPTIVE_AFTER`, on by default)
a row's later objectives skip the variants with slopes once they never won on its first objectives.

Rounding
--------
All arithmetic is float64 (float32 weights are converted exactly).  The coefficient matrices are taken as exact
for whatever values they hold (as in :mod:`recurjac_scale.layer_bounds.backsub`); each step's rounding changes
the value of the linear form by at most a matrix-vector product of the absolute coefficients with a magnitude
vector of the variable they multiply, which is added to the bound:

- McCormick step at layer ``k``: ``gamma(d_k + 16) |Lam| ymax(k)``, ``ymax = du max(|gl|, |gu|)`` (each of the
  three products per neuron and the constant's sum);
- ``sigma'`` lines: ``gamma(d_k + 8) |mu| (max|s| zmax + max|t|)``;
- gradient step ``Lam' = kappa W[k+1]^T``: ``gamma(d_k + 2) |kappa| (|W[k+1]|^T ymax(k+1))``;
- back-substitution: as :mod:`recurjac_scale.layer_bounds.backsub` (affine ``gamma(n + 2) |Gam| (|W| hmax +
  |b|)``, relaxation ``gamma(n + 2) |Gam| (|a| zmax + |b|)``, the addition of ``nu`` ``4 u |Gam| zmax``,
  concretisation);
- the running constant: ``gamma(4 H + 8)`` times the sum of the absolute values of its terms.

:func:`recurjac_scale._fp.gamma` is twice Higham's factor, which covers the rounding of the allowances
themselves.  The total is reported (``allowance``: the largest allowance relative to the width of its entry).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .._fp import TINY, gamma, underflow_unit
from ..layer_bounds.backsub import _concretise_upper
from ..layer_bounds.crown import crown_relaxation
from ..relaxations import value_bounds
from .derivative_lines import derivative_lines
from .linear_collapse import first_layer_collapse
from .linear_kernels import plane_lines_step, relax_step

__all__ = [
    "LinearContext", "RowBounds", "linear_context", "layer_planes", "row_bounds", "tighten_gradient_bounds",
    "bound_objectives", "bound_objectives_variants", "entry_bounds", "centre_gradients_ctx", "SLOPE_VARIANTS",
    "OBJECTIVE_BLOCK", "ADAPTIVE_AFTER", "FOLD_FIRST_LAYER",
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

ADAPTIVE_AFTER = 256
"""Default :attr:`LinearContext.adaptive`: after this many objectives of one output row bounded with every slope
variant, where the lines of ``sigma'`` with slopes never gave a smaller bound than the constant lines, the row's
remaining objectives run with the constant lines only (their network passes are skipped).  A heuristic for speed:
every bound stays certified, but a skipped variant could have been tighter for a later objective.  0 disables it."""

_U = np.finfo(np.float64).eps / 2
_NO_NU = np.empty((0, 0))


@dataclass
class LinearContext:
    """Everything the propagation needs for one network, region and set of layer bounds (all float64).

    Attributes
    ----------
    W, b : list of ndarray
        ``W[k]`` of shape ``(d_k, d_{k-1})`` (``d_{-1} = n_0``), ``b[k]`` of shape ``(d_k,)``, ``k = 0..H-1``.
    dl, du : list of ndarray
        Derivative bounds of the hidden layers ``k = 0..H-2``.
    variants : dict
        Slope choice -> ``(s_low, t_low, s_up, t_up)``, lists of ``(d_k,)`` arrays: certified lines of ``sigma_k'``
        on the layer bounds (:func:`derivative_lines`).
    a_low, b_low, a_up, b_up : list of ndarray
        CROWN's certified lines of ``sigma_k`` (back-substitution).
    zmax, hmax : list of ndarray
        Bounds of ``|z(k)|`` and ``|h(k)|``.
    bounds : list of (ndarray, ndarray)
        The pre-activation bounds ``(l, u)`` of the hidden layers.
    compact : dict
        The weights restricted to the neurons whose terms can be non-zero (:func:`_compact`).
    a0 : list of ndarray
        ``sigma_k'(z0(k))`` at the centre (steers the choice of McCormick planes).
    adaptive : int
        Skip the variants with slopes for an output row's remaining objectives once this many were bounded with
        every variant and slopes never won (:data:`ADAPTIVE_AFTER`; 0: never skip).
    region : Region
    """

    W: list
    b: list
    absW: list
    dl: list
    du: list
    variants: dict
    a_low: list
    b_low: list
    a_up: list
    b_up: list
    relax_err_up: list
    relax_err_low: list
    zmax: list
    hmax: list
    xmax: np.ndarray
    a0: list
    region: object
    bounds: list = None
    compact: dict = None
    adaptive: int = 0

    @property
    def H(self) -> int:
        return len(self.W)


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
    ctx.compact = _compact(ctx)
    ctx.compact["fold"] = first_layer_collapse(ctx) if FOLD_FIRST_LAYER else None
    return ctx



def _compact(ctx: LinearContext) -> dict:
    """Index sets and weight blocks that skip exact zeros in the GEMMs of :func:`bound_objectives`.

    - ``live[k]``: neurons with ``du > 0``; elsewhere ``y(k) = 0`` and every plane has ``coef_g = 0`` (``dl <= du =
      0``), so the gradient step only needs ``W[k+1][live(k+1)][:, live(k)]`` (the coefficients on the dead ``y(k+1)``
      add exact zeros: ``ymax = 0`` and constant lines ``0``);
    - ``act[k]``: neurons whose coefficient in the network pass can be non-zero (a slope of ``sigma`` or ``du > 0``);
    - ``kept[k]``: neurons whose relaxation of ``sigma`` is not the zero line (dead ReLUs are): the affine step of
      the network pass only needs ``W[k][act(k)][:, kept(k-1)]``.
    Dropping terms that are exact zeros leaves every real-number sum unchanged and the summations shorter, so the
    rounding allowances still hold."""
    H = ctx.H
    live = [np.flatnonzero(du > 0) for du in ctx.du]
    act = [np.flatnonzero((au != 0) | (al != 0) | (du > 0)) for au, al, du in zip(ctx.a_up, ctx.a_low, ctx.du)]
    kept = [np.flatnonzero((au != 0) | (al != 0) | (bu != 0) | (bl != 0))
            for au, al, bu, bl in zip(ctx.a_up, ctx.a_low, ctx.b_up, ctx.b_low)]
    grad = [np.ascontiguousarray(ctx.W[k + 1][np.ix_(live[k + 1], live[k])].T) for k in range(H - 2)]
    net = [None] + [np.ascontiguousarray(ctx.W[k][np.ix_(act[k], kept[k - 1])]) for k in range(1, H - 1)]
    first = np.ascontiguousarray(ctx.W[0][act[0], :])
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
    return {"live": live, "act": act, "kept": kept, "grad": grad, "net": net, "first": first, "pos": pos,
            "livepos": livepos, "wmag": wmag}


@dataclass
class RowBounds:
    """Per output row: RecurJac's certified bounds ``gl(k) <= ∂f_i/∂h(k) <= gu(k)`` (``k = 0..H-2``) and the
    McCormick plane coefficients chosen for them."""

    gl: list
    gu: list
    ymax: list
    up: list  # per k: (coef_g, coef_a, const) of the upper plane
    lo: list  # per k: lower plane
    v: list  # per k < H-2: |W[k+1]|^T ymax(k+1)
    top: np.ndarray  # W[H-1][i]
    g0: list = None  # the gradient at the centre (heuristics)
    planes: str = "auto"
    under: float = 0.0  # underflow allowance of one objective (:func:`_underflow`)
    slope_stats: list = field(default_factory=lambda: [0, 0])  # objectives bounded with every variant, slope wins


def _chord_planes(dl, du, l, u):
    """Planes of ``y = a g`` that ignore ``a``: ``min(dl g, du g) <= y <= max(dl g, du g)`` relaxed by the chords
    of these convex / concave functions of ``g`` on ``[l, u]``; returns ``(s_up, c_up, s_low, c_low)`` with
    ``s_low g + c_low <= a g <= s_up g + c_up`` for every ``a`` in ``[dl, du]``, ``g`` in ``[l, u]`` (the constants
    are the extremes of ``a g - s g`` over the four vertices, where a bilinear function attains them, pushed
    outward by the rounding of their evaluation)."""
    w = u - l
    ok = w > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        s_up = np.where(ok, (du * u - dl * l) / np.where(ok, w, 1.0), du)
        s_low = np.where(ok, (dl * u - du * l) / np.where(ok, w, 1.0), dl)
    gmax = np.maximum(np.abs(l), np.abs(u))
    vals_up = [a * g - s_up * g for a in (dl, du) for g in (l, u)]
    vals_low = [a * g - s_low * g for a in (dl, du) for g in (l, u)]
    c_up = np.maximum.reduce(vals_up) + 8 * _U * (du + np.abs(s_up)) * gmax
    c_low = np.minimum.reduce(vals_low) - 8 * _U * (du + np.abs(s_low)) * gmax
    return s_up, c_up, s_low, c_low


PLANES = ("auto", "mccormick")
"""Plane choices of :func:`row_bounds`."""


def layer_planes(ctx: LinearContext, k: int, l: np.ndarray, u: np.ndarray, g0: np.ndarray, planes: str = "auto"):
    """The planes of layer ``k`` for gradient bounds ``l <= ∂f_i/∂h(k) <= u`` (see :func:`row_bounds`): returns
    ``(upper, lower, ymax)``, each plane a tuple ``(coef_g, coef_a, const)`` of ``(d_k,)`` arrays and ``ymax`` a
    bound of ``|y(k)|``."""
    if planes not in PLANES:
        raise ValueError(f"planes={planes!r}; accepted: {', '.join(PLANES)}")
    dl, du, a0 = ctx.dl[k], ctx.du[k], ctx.a0[k]
    g = np.clip(g0, l, u)
    centre_up = (du - a0) * (g - l) <= (a0 - dl) * (u - g)
    m1 = np.maximum(du * u, dl * u) + np.maximum(l * dl, l * du) - du * l
    m2 = np.maximum(dl * u, dl * l) + np.maximum(u * dl, u * du) - dl * u
    tie = np.abs(m1 - m2) <= 1e-12 * (np.abs(m1) + np.abs(m2))
    p1 = np.where(tie, np.where(l >= 0, True, np.where(u <= 0, False, centre_up)), m1 < m2)
    cg, ca, cc = np.where(p1, du, dl), np.where(p1, l, u), -np.where(p1, du * l, dl * u)
    centre_lo = (a0 - dl) * (g - l) <= (du - a0) * (u - g)
    n1 = np.minimum(dl * l, dl * u) + np.minimum(l * dl, l * du) - dl * l
    n2 = np.minimum(du * l, du * u) + np.minimum(u * dl, u * du) - du * u
    tie = np.abs(n1 - n2) <= 1e-12 * (np.abs(n1) + np.abs(n2))
    l1 = np.where(tie, np.where(l >= 0, True, np.where(u <= 0, False, centre_lo)), n1 > n2)
    dg, da, dc = np.where(l1, dl, du), np.where(l1, l, u), -np.where(l1, dl * l, du * u)
    if planes == "auto":
        straddle = (l < 0) & (u > 0) & (dl < du)
        s_up, c_up, s_low, c_low = _chord_planes(dl, du, l, u)
        cg, ca, cc = np.where(straddle, s_up, cg), np.where(straddle, 0.0, ca), np.where(straddle, c_up, cc)
        dg, da, dc = np.where(straddle, s_low, dg), np.where(straddle, 0.0, da), np.where(straddle, c_low, dc)
    ymax = du * np.maximum(np.abs(l), np.abs(u)) * (1.0 + 4 * _U)
    return (cg, ca, cc), (dg, da, dc), ymax


def _v(ctx: LinearContext, ymax_next: np.ndarray, k: int) -> np.ndarray:
    """``|W[k+1]|^T ymax(k+1)`` rounded up: the magnitude of ``g(k)`` products (gradient-step allowance)."""
    return ctx.absW[k + 1].T @ ymax_next * (1.0 + gamma(ctx.W[k + 1].shape[0] + 2))


def row_bounds(ctx: LinearContext, i: int, gl: list, gu: list, g0: list, planes: str = "auto") -> RowBounds:
    """Plane choice for output row ``i`` from the gradient bounds and the gradient ``g0`` at the centre.

    Per neuron and side, one of the McCormick planes of ``y = a g`` (upper: ``P1 = du g + gl a - du gl``, exact on
    ``a = du`` or ``g = gl``; ``P2 = dl g + gu a - dl gu``; lower: ``L1 = dl g + gl a - dl gl``, ``L2 = du g + gu a -
    du gu``) or, with ``planes="auto"`` where ``g`` may take both signs, the chord plane of :func:`_chord_planes`
    (linear in ``g`` alone: RecurJac's interval value for the neuron, with ``g`` kept correlated).  A McCormick
    plane is chosen by its maximum (minimum) over the box; on ties (``g`` of known sign) the one that keeps ``g``
    with RecurJac's choice of derivative (``du`` for ``g >= 0`` upper, ...), else by the gap at the centre's
    ``(sigma'(z0), g0)``.  Each choice is a valid plane (only tightness depends on it).
    """
    H = ctx.H
    up, lo, ymax = [], [], []
    for k in range(H - 1):
        p_up, p_lo, ym = layer_planes(ctx, k, gl[k], gu[k], g0[k], planes)
        up.append(p_up)
        lo.append(p_lo)
        ymax.append(ym)
    v = [_v(ctx, ymax[k + 1], k) for k in range(H - 2)]
    rb = RowBounds(gl=list(gl), gu=list(gu), ymax=ymax, up=up, lo=lo, v=v, top=ctx.W[H - 1][i], g0=list(g0),
                   planes=planes)
    rb.under = _underflow(ctx, rb)
    return rb


def _underflow(ctx: LinearContext, rb: RowBounds) -> float:
    """Absolute allowance for underflow in one objective's propagation (any start layer).

    A multiplication whose result underflows errs by at most ``eta`` (:func:`recurjac_scale._fp.underflow_unit`)
    whatever its operands (additions are exact then), and the relative allowances do not see it.  As for the
    other errors, each computed coefficient is taken as exact and its error charged once against the magnitude
    of the variable it multiplies: per layer, the McCormick products (``eta (gmax + du + 1)`` per neuron), the
    lines of ``sigma'`` (``eta (zmax + 1)``), the gradient GEMM (``eta d_k`` per entry of ``Lam'``, times
    ``ymax(k+1)``), and in the network pass the affine GEMMs (``eta d_k`` per entry, times ``hmax``), the
    relaxations (``2 eta (zmax + 1)``) and the concretisation (``eta d_0`` per entry, times ``|x|max``, and the
    ball terms).  Far below the relative allowances for networks of ordinary scale; it matters when partial
    products fall below the smallest normal number (weights like ``1e-170``)."""
    eta = underflow_unit(np.float64)
    H = ctx.H
    tot = 0.0
    with np.errstate(over="ignore", invalid="ignore"):
        for k in range(H - 1):
            d = ctx.dl[k].size
            gmax = np.maximum(np.abs(rb.gl[k]), np.abs(rb.gu[k]))
            tot += float(np.sum(gmax + ctx.du[k] + 1.0)) + float(np.sum(ctx.zmax[k] + 1.0))
            nxt = float(np.sum(rb.ymax[k + 1])) if k < H - 2 else float(np.sum(np.abs(rb.top)))
            tot += d * nxt + d
            # network pass through layer k (affine into h(k-1) or x) and its relaxation
            prev = float(np.sum(ctx.hmax[k - 1])) if k >= 1 else float(np.sum(ctx.xmax))
            tot += d * prev + d + 2.0 * float(np.sum(ctx.zmax[k] + 1.0))
        n0 = ctx.W[0].shape[1]
        reg = ctx.region
        tot += 2.0 * n0 * (float(np.sum(ctx.xmax)) + (reg.eps if math.isfinite(reg.eps) else 0.0) + 1.0)
        out = 2.0 * eta * tot
    return math.inf if math.isnan(out) else out


def tighten_gradient_bounds(ctx: LinearContext, rb: RowBounds, block: int = 256) -> None:
    """Tighten the row's gradient bounds ``gl(k), gu(k)`` in place, top down (``k = H-3 .. 0``), by bounding each
    ``g_r(k) = y(k+1) · W[k+1][:, r]`` with :func:`bound_objectives` started at layer ``k + 1`` (on the bounds of
    the layers above, already tightened), intersected with the current (RecurJac) bounds; the planes of layer
    ``k`` are then rebuilt.  Every bound stays certified."""
    for k in range(ctx.H - 3, -1, -1):
        # only neurons with dl < du: elsewhere a(k) is the constant du and every plane is exact whatever the bounds
        # of g (they only enter the rounding allowance through ymax)
        rows = np.flatnonzero(ctx.dl[k] < ctx.du[k])
        WT = np.ascontiguousarray(ctx.W[k + 1][:, rows].T)  # row t is W[k+1][:, rows[t]]
        d = WT.shape[0]
        lo_new = rb.gl[k].copy()
        up_new = rb.gu[k].copy()
        for r0 in range(0, d, block):
            r1 = min(d, r0 + block)
            Lam = np.concatenate([WT[r0:r1], -WT[r0:r1]], axis=0)
            ub = bound_objectives_variants(ctx, rb, Lam, k + 1).min(axis=0)
            nb = r1 - r0
            idx = rows[r0:r1]
            up_new[idx] = np.minimum(up_new[idx], ub[:nb])
            lo_new[idx] = np.maximum(lo_new[idx], -ub[nb:])
        rb.gl[k], rb.gu[k] = lo_new, up_new
        rb.up[k], rb.lo[k], rb.ymax[k] = layer_planes(ctx, k, lo_new, up_new, rb.g0[k], rb.planes)
        if k >= 1:
            rb.v[k - 1] = _v(ctx, rb.ymax[k], k - 1)


def bound_objectives(ctx: LinearContext, rb: RowBounds, Lam: np.ndarray, start: int = 0, slopes: str | None = None,
                     allowance: list | None = None) -> np.ndarray:
    """Certified upper bounds of ``Lam[q] · y(start)`` over the region, for every objective ``q``.

    Parameters
    ----------
    ctx : LinearContext
    rb : RowBounds
        The output row's gradient bounds and planes.
    Lam : ndarray, shape (K, d_start)
        Objectives (coefficients on ``y(start) = ∂f_i/∂z(start)``), taken as exact.
    start : int
        The layer of the objectives' variable (0 for Jacobian entries; ``k + 1`` for the bounds of ``g(k)``).
    slopes : str, optional
        Which lines of ``sigma'`` (a key of :attr:`LinearContext.variants`; default the first).
    allowance : list, optional
        When given, the rounding allowance of every objective (shape ``(K,)``) is appended to it.

    Returns
    -------
    ndarray, shape (K,)
        ``max_{x in S} Lam[q] · y(0)(x) <=`` the value (rounding included).
    """
    key = next(iter(ctx.variants)) if slopes is None else slopes
    errs = [] if allowance is not None else None
    out = bound_objectives_variants(ctx, rb, Lam, start, (key,), errs)[0]
    if allowance is not None:
        allowance.append(errs[0])
    return out


def bound_objectives_variants(ctx: LinearContext, rb: RowBounds, Lam: np.ndarray, start: int = 0,
                              variants=None, allowance: list | None = None) -> np.ndarray:
    """:func:`bound_objectives` for several slope variants at once: the gradient-graph pass (which does not depend
    on the lines of ``sigma'``) runs once and applies every variant's lines on the way; the network pass runs once
    per variant with slopes.  Variants skipped by the adaptive rule (:attr:`LinearContext.adaptive`) get ``+inf``.

    Returns
    -------
    ndarray, shape (V, K)
        Row ``v``: the bounds with the lines ``variants[v]`` (default: every key of :attr:`LinearContext.variants`);
        with ``allowance`` given, one ``(K,)`` allowance per variant is appended to it.
    """
    variants = tuple(ctx.variants) if variants is None else tuple(variants)
    H = ctx.H
    K = Lam.shape[0]
    const = np.zeros(K)
    cabs = np.zeros(K)
    err = np.zeros(K)
    # which variants run: lines without slopes always (no network pass); lines with slopes unless the adaptive
    # rule (ctx.adaptive > 0) skips them: that many objectives of this output row were bounded with every variant
    # and the lines with slopes never gave a smaller bound than the constant lines
    const_lines = [iv for iv, key in enumerate(variants)
                   if not any(ctx.variants[key][j][k].any() for j in (0, 2) for k in range(start, H - 1))]
    skip = (ctx.adaptive > 0 and len(const_lines) > 0 and rb.slope_stats[0] >= ctx.adaptive
            and rb.slope_stats[1] == 0)
    active = const_lines + [iv for iv in range(len(variants)) if iv not in const_lines and not skip]
    V = len(active)
    lines = [ctx.variants[variants[iv]] for iv in active]  # (S_low, T_low, S_up, T_up) lists per layer
    nus = [[None] * (H - 1) for _ in range(V)]
    nnz = np.zeros(V, dtype=np.int64)
    c_l, cabs_l, err_l = np.zeros((V, K)), np.zeros((V, K)), np.zeros((V, K))
    # -- pass 1: up the gradient graph, with the lines of sigma' of every running variant -----------------------
    # only on the live neurons (du > 0): elsewhere a = 0, so y = 0 exactly and every plane and line term is zero;
    # the coefficients on y(k), g(k), a(k) and z(k) are kept on the live neurons only
    cp = ctx.compact
    Lam = np.ascontiguousarray(np.asarray(Lam, dtype=np.float64)[:, cp["live"][start]])
    term, ey, ek = np.empty(K), np.empty(K), np.empty(K)
    lterm, le = np.empty((V, K)), np.empty((V, K))
    for k in range(start, H - 1):
        d = ctx.dl[k].size  # the sums' lengths in the allowances (at most this long)
        lv = cp["live"][k]
        kappa = np.empty((K, lv.size))
        vnext = (rb.v[k] if k < H - 2 else np.abs(rb.top))[lv]
        S_low, T_low, S_up, T_up = (np.stack([ln[j][k][lv] for ln in lines]) for j in range(4))
        w = np.maximum(np.abs(S_up), np.abs(S_low)) * ctx.zmax[k][lv] + np.maximum(np.abs(T_up), np.abs(T_low))
        has = [bool(S_up[v].any() or S_low[v].any()) for v in range(V)]
        slot = np.cumsum(has, dtype=np.int64) - 1
        slot[~np.asarray(has, dtype=bool)] = -1
        nu_k = np.empty((int(sum(has)), K, lv.size))
        # sigma' lines: mu a <= mu+ (s_up z + t_up) + mu- (s_low z + t_low)
        plane_lines_step(Lam, *(p[lv] for p in rb.up[k]), *(p[lv] for p in rb.lo[k]), rb.ymax[k][lv], vnext, S_up,
                         S_low, T_up, T_low, w, slot, kappa, nu_k, term, ey, ek, lterm, le, nnz)
        for v in range(V):
            if slot[v] >= 0:
                nus[v][k] = nu_k[slot[v]]
        const += term
        cabs += np.abs(term)
        err += gamma(d + 16) * ey + gamma(d + 2) * ek
        c_l += lterm
        cabs_l += np.abs(lterm)
        err_l += gamma(d + 8) * le
        if k < H - 2:
            # coefficients on y(k+1): kappa · g(k) = (kappa W[k+1]^T) · y(k+1), on the live neurons only
            Lam = kappa @ cp["grad"][k]
        else:
            t = kappa @ rb.top[lv]
            const += t
            cabs += np.abs(t)
        del kappa
    # -- per variant: the network pass -------------------------------------------------------------------------
    out = np.full((len(variants), K), np.inf)
    errs = [np.zeros(K) for _ in variants]
    for v, iv in enumerate(active):
        out[iv], errs[iv] = _network_pass(ctx, rb, nus[v] if nnz[v] else None, c_l[v] + const, cabs_l[v] + cabs,
                                          err_l[v] + err)
    if not skip and const_lines and len(const_lines) < len(variants):
        rb.slope_stats[0] += K
        rb.slope_stats[1] += int(np.count_nonzero(np.delete(out, const_lines, axis=0).min(axis=0)
                                                  < out[const_lines].min(axis=0)))
    if allowance is not None:
        allowance.extend(errs)
    return out


def _network_pass(ctx, rb, nus, const, cabs, err):
    """Pass 2 of :func:`bound_objectives`: the coefficients ``nus`` on the ``z(k)`` (``None``: none) back-substituted
    through the network and concretised, on top of the constants ``const`` (``cabs``: the absolute values of their
    terms) and the allowance ``err`` so far; returns ``(bounds, allowances)``, shape ``(K,)`` each."""
    H = ctx.H
    K = const.size
    # -- pass 2: down the network -------------------------------------------------------------------------------
    if nus is None:  # no coefficient on any z (constant lines): nothing to do
        err = err + gamma(4 * H + 8) * cabs + TINY + rb.under
        return np.where(np.isnan(const + err), np.inf, const + err), err
    cp = ctx.compact
    Gam = np.zeros((K, ctx.W[H - 2].shape[0]))
    if nus[H - 2] is not None:  # the coefficients on z are kept on the live neurons only (zero elsewhere)
        Gam[:, cp["live"][H - 2]] = nus[H - 2]
    tb = Gam @ ctx.b[H - 2]
    ew = np.abs(Gam) @ cp["wmag"][H - 2]
    Gact = np.ascontiguousarray(Gam[:, cp["act"][H - 2]])
    out5 = np.empty((5, K))
    fold = cp["fold"]  # the first hidden layer's exact-line neurons folded into one GEMM (linear_collapse)
    Gx_fold = None
    for k in range(H - 2, 0, -1):
        n = ctx.W[k].shape[1]
        const += tb
        cabs += np.abs(tb)
        err += gamma(max(n, ctx.W[k].shape[0]) + 2) * ew
        net, pos, act = cp["net"][k], cp["pos"][k - 1], cp["act"][k - 1]
        if k == 1 and fold is not None:
            net, pos, act = fold["net1"], fold["pos"], fold["act"]
            t = Gact @ fold["p"]
            const += t
            cabs += np.abs(t)
            err += np.abs(Gact) @ fold["e"] + fold["eta"]
            Gx_fold = Gact @ fold["P"]
        Hc = Gact @ net  # (K, kept(k-1)): coefficients on h(k-1), zero elsewhere
        Gact = np.empty((K, act.size))
        nu = nus[k - 1]
        relax_step(Hc, pos, _NO_NU if nu is None else nu, cp["livepos"][k - 1], nu is not None, ctx.a_up[k - 1],
                   ctx.a_low[k - 1], ctx.b_up[k - 1], ctx.b_low[k - 1], ctx.relax_err_up[k - 1],
                   ctx.relax_err_low[k - 1], ctx.zmax[k - 1], ctx.b[k - 1], cp["wmag"][k - 1], act, Gact, out5)
        const += out5[0]
        cabs += np.abs(out5[0])
        err += gamma(n + 2) * out5[1] + 4 * _U * out5[2]
        tb, ew = out5[3].copy(), out5[4].copy()
        del Hc
    const += tb
    cabs += np.abs(tb)
    n0 = ctx.W[0].shape[1]
    err += gamma(max(n0, ctx.W[0].shape[0]) + 2) * ew
    Gx = Gact @ (fold["first"] if Gx_fold is not None else cp["first"])
    if Gx_fold is not None:
        Gx += Gx_fold
        err += gamma(2) * (np.abs(Gx) @ ctx.xmax)
    lo, hi = ctx.region.box
    sup = _concretise_upper(Gx, ctx.region, lo, hi, gamma(n0 + 2))
    total = const + sup
    err = err + gamma(4 * H + 8) * (cabs + np.abs(sup)) + TINY + rb.under
    with np.errstate(invalid="ignore"):
        out = total + err
    return np.where(np.isnan(out), np.inf, out), err


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
    W0T = np.ascontiguousarray(ctx.W[0].T)  # (n0, d_0)
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
            Lam = np.concatenate([W0T[j0:j1], -W0T[j0:j1]], axis=0)
            errs = []
            ubs = bound_objectives_variants(ctx, rb, Lam, 0, None, errs)
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
