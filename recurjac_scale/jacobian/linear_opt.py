"""Optimised relaxations for the row norms of ``linear-jacobian`` (alpha-CROWN-like; optional, needs torch).

The row norm bound of :func:`recurjac_scale.jacobian.linear_rows.row_norm_upper` is one linear objective per output row.
Its relaxations have free parameters, each of which keeps the bound sound whatever its value:

- per layer and neuron, the plane of ``y = a g`` on each side: a convex combination of the two McCormick planes
  and the chord plane (softmax weights); its constant is then *re-certified* from the box's four vertices
  (:func:`certified_planes`), so any coefficients are valid;
- ReLU family: the slopes of the lines of ``sigma'`` in ``[0, s_max]`` (:func:`recurjac_scale.jacobian.
  derivative_lines.relu_slope_ranges`) and CROWN's lower slope of ``sigma`` in ``[alpha, 1]``.

They are optimised by Adam on a float64 torch transcription of :func:`~recurjac_scale.jacobian.linear.
bound_objectives` (projected through sigmoid / softmax), within a time budget; the final parameters are then
evaluated by the certified numpy propagation (rounding allowances included), and the result is the smaller of that
and the unoptimised bound.  Torch only steers the parameters: the reported bound never depends on its arithmetic.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace

import numpy as np

from ..activations import LeakyReLU
from ..errors import InputError
from .derivative_lines import relu_slope_ranges
from .linear import _safe_mul
from .linear_base import LinearContext, RowBounds
from .linear_planes import _chord_planes
from .linear_rows import row_norm_upper

__all__ = ["certified_planes", "optimise_row_norm", "optimised_row_norms", "DEFAULT_STEPS"]

DEFAULT_STEPS = 200
"""Largest number of Adam steps per row (the time budget usually stops earlier)."""

_U = np.finfo(np.float64).eps / 2


def certified_planes(dl, du, l, u, cg, ca):
    """Constants ``(c_up, c_low)`` with ``cg g + ca a + c_low <= a g <= cg g + ca a + c_up`` for every ``a`` in
    ``[dl, du]`` and ``g`` in ``[l, u]``: the extremes of the bilinear ``a g - cg g - ca a`` over the four vertices,
    pushed outward by the rounding of their evaluation.  All arrays of shape ``(d,)``."""
    vals = [a * g - cg * g - ca * a for a in (dl, du) for g in (l, u)]
    gmax = np.maximum(np.abs(l), np.abs(u))
    err = 8 * _U * (du * gmax + np.abs(cg) * gmax + np.abs(ca) * du)
    return np.maximum.reduce(vals) + err, np.minimum.reduce(vals) - err


def _candidates(ctx: LinearContext, rb: RowBounds, k: int):
    """Per side, the three planes ``(cg, ca)`` of layer ``k``: (P1, P2, chord) upper and (L1, L2, chord) lower."""
    dl, du = ctx.dl[k], ctx.du[k]
    l, u = rb.gl[k], rb.gu[k]
    s_up, _, s_low, _ = _chord_planes(dl, du, l, u)
    zero = np.zeros_like(l)
    up = [(du, l), (dl, u), (s_up, zero)]
    lo = [(dl, l), (du, u), (s_low, zero)]
    return up, lo


def _relu_alpha(act) -> float | None:
    return float(act.alpha) if isinstance(act, LeakyReLU) else None


def optimise_row_norm(ctx: LinearContext, rb: RowBounds, lower: np.ndarray, upper: np.ndarray, q: float, acts,
                      *, seconds: float = 5.0, steps: int = DEFAULT_STEPS, lr: float = 0.03) -> float:
    """The row norm bound of one output row with optimised relaxations (module docstring).

    Parameters
    ----------
    ctx, rb
        The row's context and (tightened) gradient bounds, as for :func:`row_norm_upper`.
    lower, upper : ndarray, shape (n_0,)
        Certified bounds of the row's Jacobian entries.
    q : {1, 2}
    acts : sequence of Activation
        The hidden layers' activations.
    seconds : float
        Time budget of the optimisation (wall clock).
    steps : int
        Largest number of Adam steps.

    Returns
    -------
    float
        A certified upper bound of ``max_{x in S} ||J[i, :](x)||_q``, at most the unoptimised one.
    """
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is an optional extra
        raise InputError("the optimised linear-jacobian needs torch (pip install torch)") from None
    base = min(row_norm_upper(ctx, rb, lower, upper, q, v) for v in ctx.variants)
    if not math.isfinite(base):
        return base
    best_v = min(ctx.variants, key=lambda v: row_norm_upper(ctx, rb, lower, upper, q, v))
    H = ctx.H
    T = lambda a: torch.as_tensor(np.asarray(a, np.float64))  # noqa: E731
    l = np.asarray(lower, np.float64)
    u = np.asarray(upper, np.float64)
    if q == 1.0:
        w = u - l
        with np.errstate(divide="ignore", invalid="ignore"):
            alpha = np.where(l >= 0, 1.0, np.where(u <= 0, -1.0, (u + l) / np.where(w > 0, w, 1.0)))
        alpha = np.clip(alpha, -1.0, 1.0)
    else:
        alpha = l + u
    # the chord slopes of |J| (J^2) are parameters too: any slope is valid with beta = the maximum of the convex
    # |J| - alpha J (J^2 - alpha J) over the end points
    if q == 1.0:
        th_alpha = torch.tensor(np.arctanh(np.clip(alpha, -0.999, 0.999)), requires_grad=True)
        alpha_of = torch.tanh
    else:
        th_alpha = torch.tensor(alpha, requires_grad=True)
        alpha_of = lambda t: t  # noqa: E731
    lT, uT = T(l), T(u)

    def beta_of(a):
        if q == 1.0:
            return torch.maximum(lT.abs() - a * lT, uT.abs() - a * uT).sum()
        return torch.maximum(lT * lT - a * lT, uT * uT - a * uT).sum()

    W0 = T(ctx.W[0])
    S_low, T_low, S_up, T_up = ctx.variants[best_v]
    # -- parameters ---------------------------------------------------------------------------------------------
    params, layers = [th_alpha], []
    for k in range(H - 1):
        up, lo = _candidates(ctx, rb, k)
        # start at the heuristic's choice (the plane in rb) with a strong weight
        def init(cands, chosen):
            logit = np.zeros((chosen[0].size, 3))
            for j, (cg, ca) in enumerate(cands):
                logit[:, j] = np.where((cg == chosen[0]) & (ca == chosen[1]), 4.0, 0.0)
            return torch.tensor(logit, requires_grad=True)
        wu, wl = init(up, rb.up[k]), init(lo, rb.lo[k])
        params += [wu, wl]
        a_relu = _relu_alpha(acts[k])
        entry = {"up": [(T(cg), T(ca)) for cg, ca in up], "lo": [(T(cg), T(ca)) for cg, ca in lo], "wu": wu, "wl": wl,
                 "dl": T(ctx.dl[k]), "du": T(ctx.du[k]), "l": T(rb.gl[k]), "u": T(rb.gu[k]),
                 "t_up": T(T_up[k]), "t_low": T(T_low[k]), "s_up": T(S_up[k]), "s_low": T(S_low[k]), "relu": a_relu,
                 "b_up": T(ctx.b_up[k]), "b_low": T(ctx.b_low[k]), "a_up": T(ctx.a_up[k]), "a_low": T(ctx.a_low[k])}
        if a_relu is not None:
            smax_u, smax_l = relu_slope_ranges(a_relu, *ctx.bounds[k])
            entry["smax_u"], entry["smax_l"] = T(smax_u), T(smax_l)
            frac = lambda s, m: np.clip(np.where(m > 0, s / np.where(m > 0, m, 1.0), 0.5), 0.05, 0.95)  # noqa: E731
            logit = lambda f: np.log(f / (1 - f))  # noqa: E731
            th_u = torch.tensor(logit(frac(S_up[k], smax_u)), requires_grad=True)
            th_l = torch.tensor(logit(frac(S_low[k], smax_l)), requires_grad=True)
            unst = (ctx.bounds[k][0] < 0) & (ctx.bounds[k][1] > 0)
            fa = np.clip((np.asarray(ctx.a_low[k]) - a_relu) / max(1.0 - a_relu, 1e-12), 0.05, 0.95)
            th_a = torch.tensor(logit(fa), requires_grad=True)
            entry.update(th_u=th_u, th_l=th_l, th_a=th_a, unst=torch.as_tensor(unst))
            params += [th_u, th_l, th_a]
        layers.append(entry)
    W = [T(w) for w in ctx.W]
    b = [T(v) for v in ctx.b]
    top = T(rb.top)
    region = ctx.region
    box_lo, box_hi = (T(v) for v in region.box)

    def lines(e):
        if e["relu"] is None:
            return e["s_up"], e["s_low"]
        return torch.sigmoid(e["th_u"]) * e["smax_u"], torch.sigmoid(e["th_l"]) * e["smax_l"]

    def crown_low(e):
        if e["relu"] is None:
            return e["a_low"]
        a = e["relu"] + (1.0 - e["relu"]) * torch.sigmoid(e["th_a"])
        return torch.where(e["unst"], a, e["a_low"])

    def planes(e, side):
        wts = torch.softmax(e["wu" if side == "up" else "wl"], dim=1)
        cg = sum(wts[:, j] * c[0] for j, c in enumerate(e[side]))
        ca = sum(wts[:, j] * c[1] for j, c in enumerate(e[side]))
        vals = torch.stack([a * g - cg * g - ca * a for a in (e["dl"], e["du"]) for g in (e["l"], e["u"])])
        cc = vals.max(dim=0).values if side == "up" else vals.min(dim=0).values
        return cg, ca, cc

    def bound():
        a = alpha_of(th_alpha)
        Lam = (W0 @ a)[None, :]
        const = beta_of(a).reshape(1)
        nus = []
        for k in range(H - 1):
            e = layers[k]
            Lp, Ln = torch.clamp(Lam, min=0), torch.clamp(Lam, max=0)
            cgU, caU, ccU = planes(e, "up")
            cgL, caL, ccL = planes(e, "lo")
            kappa = Lp * cgU + Ln * cgL
            mu = Lp * caU + Ln * caL
            const = const + (Lp * ccU + Ln * ccL).sum(1)
            s_up, s_low = lines(e)
            mp, mn = torch.clamp(mu, min=0), torch.clamp(mu, max=0)
            nus.append(mp * s_up + mn * s_low)
            const = const + (mp * e["t_up"] + mn * e["t_low"]).sum(1)
            if k < H - 2:
                Lam = kappa @ W[k + 1].T
            else:
                const = const + kappa @ top
        Gam = nus[H - 2]
        for k in range(H - 2, 0, -1):
            const = const + Gam @ b[k]
            Gh = Gam @ W[k]
            e = layers[k - 1]
            Gp, Gn = torch.clamp(Gh, min=0), torch.clamp(Gh, max=0)
            const = const + Gp @ e["b_up"] + Gn @ e["b_low"]
            Gam = Gp * e["a_up"] + Gn * crown_low(e) + nus[k - 1]
        const = const + Gam @ b[0]
        Gx = Gam @ W[0]
        mid, rad = 0.5 * (box_lo + box_hi), 0.5 * (box_hi - box_lo)
        sup = Gx @ mid + Gx.abs() @ rad
        if region.p != math.inf and math.isfinite(region.eps):
            qn = {1.0: math.inf, 2.0: 2.0}[region.p]
            ball = Gx @ T(region.x0) + region.eps * torch.linalg.vector_norm(Gx, ord=qn, dim=1)
            sup = torch.minimum(sup, ball) if region.lower is not None else ball
        return (const + sup).sum()

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # many small products: one thread (the machine may be shared)
    opt = torch.optim.Adam(params, lr=lr)
    t0 = time.perf_counter()
    best = (math.inf, None)
    for _ in range(int(steps)):
        opt.zero_grad()
        val = bound()
        v = float(val.detach())
        if v < best[0]:
            best = (v, [p.detach().clone() for p in params])
        val.backward()
        opt.step()
        if time.perf_counter() - t0 > seconds:
            break
    torch.set_num_threads(threads)
    if best[1] is None:
        return base
    with torch.no_grad():
        for p, v in zip(params, best[1]):
            p.copy_(v)
        # -- certified evaluation with the best parameters ------------------------------------------------------
        new_up, new_lo, lines_np, a_low_np = [], [], ([], [], [], []), []
        for k, e in enumerate(layers):
            for side, store in (("up", new_up), ("lo", new_lo)):
                cg, ca, _ = planes(e, side)
                cg, ca = cg.numpy().copy(), ca.numpy().copy()
                c_up, c_low = certified_planes(ctx.dl[k], ctx.du[k], rb.gl[k], rb.gu[k], cg, ca)
                store.append((cg, ca, c_up if side == "up" else c_low))
            s_up, s_low = (x.numpy().copy() for x in lines(e))
            if e["relu"] is not None:  # clip into the certified ranges (float rounding of sigmoid * s_max)
                s_up = np.clip(s_up, 0.0, e["smax_u"].numpy())
                s_low = np.clip(s_low, 0.0, e["smax_l"].numpy())
            for lst, arr in zip(lines_np, (s_low, T_low[k], s_up, T_up[k])):
                lst.append(arr)
            al = crown_low(e).numpy().copy()
            if e["relu"] is not None:
                al = np.clip(al, e["relu"], 1.0)
            a_low_np.append(al)
    zmax = ctx.zmax
    ctx2 = replace(
        ctx, variants={"optimised": lines_np}, a_low=a_low_np,
        relax_err_low=[_safe_mul(np.abs(a), z) + np.abs(bl) for a, z, bl in zip(a_low_np, zmax, ctx.b_low)],
    )
    rb2 = replace(rb, up=new_up, lo=new_lo)
    alpha_best = alpha_of(best[1][0]).numpy().copy()
    val = row_norm_upper(ctx2, rb2, lower, upper, q, "optimised", alpha=alpha_best)
    return min(base, val)


def optimised_row_norms(network, jac, *, seconds: float = 10.0, steps: int = DEFAULT_STEPS) -> np.ndarray:
    """Certified upper bounds of ``max_{x in S} ||J[i, :](x)||_q`` per output row of a ``linear-jacobian`` result
    (``q`` the dual norm of ``jac.p``: 1 or 2), with optimised relaxations (:func:`optimise_row_norm`, ``seconds``
    per row).  For one output row this is a certified local Lipschitz constant (``p = inf``: also the induced
    norm for several rows, as their maximum).

    Parameters
    ----------
    network : Network
        The network ``jac`` was computed for (without the output selection).
    jac : JacobianBounds
        From ``jacobian_bounds(..., method="linear-jacobian")`` (its states kept: the default).

    Raises
    ------
    InputError
        For another method, or a norm whose dual is not 1 or 2.
    """
    from .linear_rows import result_rows, row_norms
    from ..layer_bounds.base import dual_norm

    if jac.method != "linear-jacobian":
        raise InputError(f"optimised row norms need a linear-jacobian result, got method {jac.method!r}")
    q = dual_norm(jac.p)
    if q not in (1.0, 2.0):
        raise InputError(f"optimised row norms exist for p = inf and p = 2 (dual norms 1, 2); got p = {jac.p}")
    found = result_rows(network, jac)
    lower = np.asarray(jac.lower, np.float64)
    upper = np.asarray(jac.upper, np.float64)
    if found is None:
        M = np.maximum(np.abs(lower), np.abs(upper))
        return np.linalg.norm(M, ord=q, axis=1) * (1.0 + 4 * _U * M.shape[1]) + 1e-300
    ctx, rows = found
    acts = network.with_outputs(jac.outputs).activations
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        plain = row_norms(ctx, rows, lower, upper, q)
        return np.array([min(plain[i], optimise_row_norm(ctx, rb, lower[i], upper[i], q, acts, seconds=seconds,
                                                         steps=steps)) for i, rb in enumerate(rows)])
