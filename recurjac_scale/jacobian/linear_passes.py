"""The two passes of the ``linear-jacobian`` propagation for a block of objectives (:mod:`.linear`).

:func:`bound_objectives_variants` (and :func:`bound_objectives`, one slope variant) return certified upper bounds
of ``Lam[q] · y(start)`` over the region for every objective ``q``, rounding included: pass 1 goes up the gradient
graph with the row's planes of ``y = a g`` (:mod:`.linear_planes`) and the certified lines of ``sigma'``; pass 2
(:func:`_network_pass`) back-substitutes the collected coefficients on the pre-activations through the network with
CROWN's relaxations of ``sigma`` and concretises them over the region.  The passes are described in :mod:`.linear`;
the elementwise steps are the kernels of :mod:`.linear_kernels`.

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

Underflow is charged separately, once per row (:func:`_underflow`, ``RowBounds.under``).
"""

from __future__ import annotations

import math

import numpy as np

from .._fp import TINY, gamma, underflow_unit
from ..layer_bounds.backsub import _concretise_upper
from .linear_base import LinearContext, RowBounds
from .linear_collapse import first_layer_collapse
from .linear_kernels import plane_lines_step, relax_step

__all__ = ["bound_objectives", "bound_objectives_variants", "dense_blocks"]

_U = np.finfo(np.float64).eps / 2
_NO_NU = np.empty((0, 0))


def dense_blocks(ctx: LinearContext) -> dict:
    """``ctx.compact`` with the weight blocks of these passes, built on first use: ``grad[k] = W[k+1][live(k+1)][:,
    live(k)]^T``, ``net[k] = W[k][act(k)][:, kept(k-1)]``, ``first = W[0][act(0)]`` and ``fold``
    (:func:`~.linear_collapse.first_layer_collapse` when :attr:`LinearContext.fold_first`, else ``None``)."""
    cp = ctx.compact
    if "grad" not in cp:
        live, act, kept = cp["live"], cp["act"], cp["kept"]
        H = ctx.H
        cp["grad"] = [np.ascontiguousarray(ctx.W[k + 1][np.ix_(live[k + 1], live[k])].T) for k in range(H - 2)]
        cp["net"] = [None] + [np.ascontiguousarray(ctx.W[k][np.ix_(act[k], kept[k - 1])]) for k in range(1, H - 1)]
        cp["first"] = np.ascontiguousarray(ctx.W[0][act[0], :])
    if "fold" not in cp:
        cp["fold"] = first_layer_collapse(ctx) if ctx.fold_first else None
    return cp


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
    cp = dense_blocks(ctx)
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
    cp = dense_blocks(ctx)
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
