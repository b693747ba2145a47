"""Both passes of the ``linear-jacobian`` propagation with the exact-line neurons eliminated.

A hidden neuron ``r`` of layer ``k`` is *exact* on the region when its derivative is one number (``dl = du``), its
relaxation of ``sigma`` is one line with that slope (``a_up = a_low = a = du``, ``b_up = b_low = beta``: ``h_r = a z_r
+ beta``) and no line of ``sigma'`` has a slope there (stable ReLUs, for example).  Then ``y_r = du g_r`` exactly in the gradient
graph and ``h_r = a z_r + beta`` exactly in the network, so the propagation is linear through it: only the other
neurons ``U(k)`` (unstable ones, where relaxations are chosen by the sign of a coefficient) need per-objective work.
Neurons with ``du = a = beta = 0`` (dead ReLUs) contribute nothing and are dropped.

:func:`stable_collapse` precomputes, once per context, the maps through the exact neurons (``S(k)``):

    z(t)[U(t)] = R(t) x + sum_{i < t} C(t, i) h(i)[U(i)] + c(t)        (t = 0 .. H-1; t = H-1: the output rows)

(pass 2 uses the maps of the hidden layers, computed downward; pass 1 uses the same blocks transposed, computed
upward, and the output rows' blocks ``Top``)

(``C(t, i)`` of shape ``(|U(t)|, |U(i)|)``, ``R(t)`` of shape ``(|U(t)|, n_0)``; blocks that are exactly zero, because
some layer between has no exact neuron, are absent).  The same blocks, transposed, carry the gradient graph
upward: ``g(i)[U(i)] = sum_{t > i} C(t, i)^T y(t)[U(t)] + C(H-1, i)[row]^T`` and ``g(-1) = J[row] = sum_t R(t)^T
y(t)[U(t)] + R(H-1)[row]``.  :func:`bound_gradient_variants` bounds objectives ``c · g(i0)`` (``i0 = -1``: a
combination of Jacobian entries; ``i0 >= 0``: of the gradient of hidden layer ``i0``, supported on ``U(i0)``) with
the planes and lines of :mod:`.linear_passes` applied on ``U`` only (same relaxations, same values in real
arithmetic), then back-substitutes the coefficients on ``z(t)[U(t)]`` through these maps.

Rounding (added per objective, on top of the per-step allowances of :mod:`.linear_passes`, which are charged as
there on the ``U`` neurons).  As there, each computed map is taken as exact for the values it holds, and each step
of its computation is charged with the absolute values of its actual (computed) factors times certified magnitudes
of the variables they multiply, never with products of absolute weight matrices:

- pass 2 (maps computed downward, per target layer): the step through ``S(i)`` errs by at most ``gamma(d_i + 4)
  |T_S| (|a| (|W[i]_S| |h(i-1)|max + |b[i]_S|) + |beta|)`` (``|h|max`` from the layer bounds, ``|x|max`` at the
  input), and the pass's own products with the blocks by ``g_pass`` times ``|C| |h|max + |R| |x|max + |c|``; the sum
  ``E2(t)`` is charged per unit of ``|G(t)|``;
- pass 1 (maps computed upward, per source layer, so that the objective's coefficients flow the way the maps were
  built): the step through ``S(s)`` errs by at most ``gamma(|S| + 2) |Ms| (|W[s+1]_S|^T ymax(s+1))`` (the row's
  ``v``; ``|W[H-1][row]|`` at the output), plus ``g_pass`` times ``|Up| ymax + |Top[:, row]|``; charged per unit of
  ``|kappa|`` (:func:`grad_magnitudes`, per output row).  A block made of one step only (one layer of exact neurons,
  and none in the layer it ends at) is one product of two matrices either way round, with the same entrywise bound
  ``gamma(|S| + 2) |W[t]_S| |a| |W[s]_S|``: pass 1 then takes pass 2's product, transposed;
- ``g_pass = gamma(n_0 + sum d_k + H + 4)`` covers the inner lengths of a pass's GEMMs and the sums of their
  results;
- underflow: ``eta`` per product (:func:`recurjac_scale._fp.underflow_unit`), charged generously as ``2 eta N`` times
  the l1 norms of the coefficients carried through the maps and the sum of the context's magnitudes.

Exact neurons are eliminated only in layers where they are at least :data:`ELIMINATE_SHARE` of the neurons that are
not dropped (the others run as the unstable ones, exactly as well).
"""

from __future__ import annotations

import numpy as np

from .._fp import TINY, gamma, underflow_unit
from ..layer_bounds.backsub import _concretise_upper
from .linear_base import LinearContext, RowBounds
from .linear_kernels import plane_lines_step, relax_step

__all__ = ["stable_collapse", "grad_magnitudes", "bound_gradient_variants", "ELIMINATE_SHARE"]

ELIMINATE_SHARE = 0.5
"""A layer's exact neurons are eliminated only when they are at least this share of its neurons that are not
dropped; otherwise they are handled as the others (exactly as well: their planes and relaxations are exact), which is
cheaper when they are few (the maps through them would cost more GEMM work than they save)."""

_U = np.finfo(np.float64).eps / 2


def stable_collapse(ctx: LinearContext) -> dict:
    """The maps through the exact neurons (module docstring) for ``ctx``, and their rounding allowances.

    Returns
    -------
    dict
        ``U``, ``S``: per hidden layer, the indices of the other and of the exact (not dropped) neurons.  Pass 2
        (computed downward, per target layer ``t``): ``Down[t]`` = ``[C(t, t-1) | ... | C(t, 0)]`` (existing blocks,
        offsets ``Down_off[t]``), ``Rstack`` (the ``R(t)`` stacked, offsets ``R_off``), ``c[t]``, and ``E2[t]``:
        the allowance per unit of ``|G(t)|``.  Pass 1 (computed upward, per source ``i = -1 .. H-2``): ``Up[i]`` =
        ``[C(i+1, i)^T | ...]`` (offsets ``Up_off[i]``), ``Top[i]`` (``|U(i)| x m``: the output rows), and what
        :func:`grad_magnitudes` needs for the allowance per row.  Per layer the relaxation arrays restricted to
        ``U`` (``a_up``, ``a_low``, ``b_up``, ``b_low``, ``r_up``, ``r_low``, ``zmax``).
    """
    H = ctx.H
    n0 = ctx.W[0].shape[1]
    U, S, aS, bS = [], [], [], []
    for k in range(H - 1):
        dl, du = ctx.dl[k], ctx.du[k]
        au, al, bu, bl = ctx.a_up[k], ctx.a_low[k], ctx.b_up[k], ctx.b_low[k]
        with np.errstate(invalid="ignore"):
            ex = (dl == du) & (au == al) & (au == du) & (bu == bl) & np.isfinite(au) & np.isfinite(bu)
        for s_low, _, s_up, _ in ctx.variants.values():
            ex &= (s_low[k] == 0) & (s_up[k] == 0)
        drop = ex & (du == 0) & (bu == 0)
        if np.count_nonzero(ex & ~drop) < ELIMINATE_SHARE * np.count_nonzero(~drop):
            ex = drop  # few exact neurons: eliminating them would cost more than it saves; they run as the others
        U.append(np.flatnonzero(~ex))
        s = np.flatnonzero(ex & ~drop)
        S.append(s)
        aS.append(au[s])
        bS.append(bu[s])
    width = n0 + sum(w.shape[0] for w in ctx.W)
    g_pass = gamma(width + H + 4)  # the GEMMs of a pass with these blocks (inner lengths <= sum |U|) and their sums
    wmag = [(ctx.absW[k] @ (ctx.hmax[k - 1] if k >= 1 else ctx.xmax) + np.abs(ctx.b[k]))
            * (1.0 + gamma(ctx.W[k].shape[1] + 2)) for k in range(H - 1)]
    out = {"U": U, "S": S, "N": 2 * width + 8 * H + 16}
    # -- pass 2: downward, per target layer t; allowance of each step with the magnitudes of h (hmax, |x|max) ----
    C = [[None] * (H - 1) for _ in range(H - 1)]
    R, cst, E2 = [None] * (H - 1), [None] * (H - 1), [None] * (H - 1)
    # T runs over the neurons of layer i in the order [U(i), S(i)] (dropped neurons: h = 0 exactly), over x at the end
    order = [np.concatenate([U[k], S[k]]) for k in range(H - 1)]
    WS = [ctx.W[i][np.ix_(S[i], order[i - 1])] if i >= 1 else ctx.W[0][S[0]] for i in range(H - 1)]
    for t in range(H - 1):
        T = ctx.W[t][np.ix_(U[t], order[t - 1])] if t >= 1 else ctx.W[0][U[0]]
        c = ctx.b[t][U[t]].copy()
        e = np.zeros(U[t].size)
        for i in range(t - 1, -1, -1):
            nu_ = U[i].size
            if nu_:
                C[t][i] = np.ascontiguousarray(T[:, :nu_])
            s = S[i]
            if s.size == 0 or T.shape[0] == 0:
                T = None
                break
            Ts = T[:, nu_:]
            Ta = Ts * aS[i]
            # h(i)_S = a (W[i]_S h(i-1) + b[i]_S) + beta: the products and sums of this step err by at most
            # gamma(d_i + 4) |T_S| (|a| (|W[i]_S| |h(i-1)|max + |b[i]_S|) + |beta|)
            e += gamma(ctx.W[i].shape[0] + 4) * (np.abs(Ts) @ (np.abs(aS[i]) * wmag[i][s] + np.abs(bS[i])))
            c = c + Ta @ ctx.b[i][s] + Ts @ bS[i]
            T = Ta @ WS[i]
        R[t] = None if T is None else np.ascontiguousarray(T)
        cst[t] = c
        # the pass's own products with these blocks: gamma times the magnitudes of the computed map
        y = np.abs(c)
        for i in range(t):
            if C[t][i] is not None:
                y = y + np.abs(C[t][i]) @ ctx.hmax[i][U[i]]
        if R[t] is not None:
            y = y + np.abs(R[t]) @ ctx.xmax
        E2[t] = (e + g_pass * y) * (1.0 + 8 * _U)
    down, down_off = [], []
    for t in range(H - 1):
        blocks, offs, o = [], {}, 0
        for i in range(t - 1, -1, -1):
            if C[t][i] is not None:
                blocks.append(C[t][i])
                offs[i] = (o, o + U[i].size)
                o += U[i].size
        down.append(np.ascontiguousarray(np.concatenate(blocks, axis=1)) if blocks else None)
        down_off.append(offs)
    r_off, o = {}, 0
    for t in range(H - 1):
        if R[t] is not None and U[t].size:
            r_off[t] = (o, o + U[t].size)
            o += U[t].size
    out.update(Down=down, Down_off=down_off, R_off=r_off, c=cst, E2=E2,
               Rstack=np.ascontiguousarray(np.concatenate([R[t] for t in r_off], axis=0)) if r_off else None)
    # -- pass 1: upward, per source i (g(i)[U(i)]; i = -1: the Jacobian row, every input) ----------------------
    # M: coefficients on y(s) (all neurons of layer s) of the sources; y(s)_S = du g(s)_S, g(s) = W[s+1]^T y(s+1)
    Up, Up_off, Top, steps = [], [], [], []
    # M runs over the neurons of layer s in the order [U(s), S(s)] (dead neurons: y = 0 exactly), over the output
    # rows at the top
    WU = [ctx.W[s_ + 1][np.ix_(order[s_ + 1], S[s_])].T if s_ + 1 < H - 1 else ctx.W[H - 1][:, S[s_]].T
          for s_ in range(H - 1)]
    for i in range(-1, H - 1):
        rows = slice(None) if i == -1 else U[i]
        M = (ctx.W[i + 1][order[i + 1]][:, rows].T if i + 1 < H - 1 else ctx.W[H - 1][:, rows].T)
        blocks, offs, o, st = [], {}, 0, []
        top = M if i == H - 2 else None
        for s_ in range(i + 1, H - 1):
            u, s = U[s_], S[s_]
            if u.size:
                blocks.append(M[:, :u.size])
                offs[s_] = (o, o + u.size)
                o += u.size
            if s.size == 0 or M.shape[0] == 0:
                M = None
                break
            Ms = M[:, u.size:] * aS[s_]
            # this step errs by at most gamma(|S| + 2) |Ms| |W[s+1]_S|^T |y(s+1)|: per row (grad_magnitudes)
            st.append((s_, s, np.abs(Ms), gamma(s.size + 2)))
            t1 = s_ + 1
            done = (R[t1] if i == -1 else C[t1][i]) if (t1 < H - 1 and S[t1].size == 0 and s_ == i + 1) else None
            if done is not None:
                # one step only, and the chain ends at layer t1: the same product as pass 2's block (one GEMM,
                # either way round, with the same entrywise error bound gamma(|S| + 2) |W[t1]_S| |a| |W[s]_S|)
                M = done.T
            else:
                M = Ms @ WU[s_]
            if s_ == H - 2:
                top = M
        Up.append(np.ascontiguousarray(np.concatenate(blocks, axis=1)) if blocks else None)
        Up_off.append(offs)
        Top.append(None if top is None else np.ascontiguousarray(top))
        steps.append(st)
    # index i + 1 holds source i
    out.update(Up=Up, Up_off=Up_off, Top=Top, steps=steps, absUp=[None if a is None else np.abs(a) for a in Up],
               g_pass=g_pass)
    for name, src in (("a_up", ctx.a_up), ("a_low", ctx.a_low), ("b_up", ctx.b_up), ("b_low", ctx.b_low),
                      ("r_up", ctx.relax_err_up), ("r_low", ctx.relax_err_low), ("zmax", ctx.zmax)):
        out[name] = [np.ascontiguousarray(src[k][U[k]]) for k in range(H - 1)]
    mag = float(np.sum(ctx.xmax)) + sum(float(np.sum(w)) + float(np.sum(h)) + float(np.sum(z)) + float(np.sum(e))
                                        for w, h, z, e in zip(wmag, ctx.hmax, ctx.zmax, E2))
    out["mag"] = mag
    return out


def grad_magnitudes(ctx: LinearContext, rb: RowBounds, i0: int) -> list:
    """Pass 1's allowance per unit of ``|kappa|`` for the sources ``i = i0 .. H-2`` (index ``i - i0``; source -1 has
    ``n_0`` entries, source ``i >= 0`` has ``|U(i)|``): the steps of the upward chains, ``gamma |Ms| (|W[s+1]_S|^T
    ymax(s+1))`` (``rb.v``; the output row's ``|W[H-1][row]|`` at the top), plus the pass's products, ``g_pass``
    times ``|Up| ymax(U) + |Top[:, row]|``; rounded up.  Cached on ``rb`` for its current ``ymax`` and ``v``."""
    cl = ctx.compact["stable"]
    H = ctx.H
    U = cl["U"]
    cache = getattr(rb, "_stable_m", None)
    if (cache is not None and cache[0] <= i0 and all(a is b for a, b in zip(cache[1], rb.ymax))
            and all(a is b for a, b in zip(cache[2], rb.v))):
        return cache[3][i0 - cache[0]:]
    ytop = np.abs(rb.top)
    ystack = [np.ascontiguousarray(rb.ymax[s][U[s]]) for s in range(H - 1)]
    out = []
    for i in range(i0, H - 1):
        n = (ctx.W[0].shape[1] if i == -1 else U[i].size)
        e = np.zeros(n)
        for s_, s, absMs, g in cl["steps"][i + 1]:
            vv = rb.v[s_] if s_ < H - 2 else ytop
            e += g * (absMs @ vv[s])
        y = np.zeros(n)
        if cl["absUp"][i + 1] is not None:
            ys = np.concatenate([ystack[t] for t in cl["Up_off"][i + 1]])
            y += cl["absUp"][i + 1] @ ys
        if cl["Top"][i + 1] is not None:
            y += np.abs(cl["Top"][i + 1][:, rb.row])
        out.append((e + cl["g_pass"] * y) * (1.0 + 8 * _U))
    rb._stable_m = (i0, list(rb.ymax), list(rb.v), out)
    return out


def bound_gradient_variants(ctx: LinearContext, rb: RowBounds, i0: int, unit=None, c=None, variants=None,
                            allowance: list | None = None, adaptive: bool = True) -> np.ndarray:
    """Certified upper bounds of the objectives ``c[q] · g(i0)`` over the region, rounding included, for several
    slope variants of the lines of ``sigma'`` (as :func:`.linear_passes.bound_objectives_variants`, whose
    objectives on ``y(i0 + 1)`` are these after the gradient step; same relaxations, exact neurons eliminated).

    Parameters
    ----------
    i0 : int
        ``-1``: objectives on the Jacobian row ``g(-1) = J[row, :]`` (``n_0`` coefficients); ``0 .. H-3``: on the
        gradient ``g(i0)`` of hidden layer ``i0``, whose support must lie in ``U(i0)`` (neurons that are not exact).
    unit : (ndarray of int, ndarray), optional
        ``(idx, sign)``, shape ``(K,)`` each: objective ``q`` is ``sign[q] * g(i0)[idx[q]]`` (``sign`` = +-1); or
        shape ``(K, r)`` each: ``sum_j sign[q, j] * g(i0)[idx[q, j]]`` (a few coordinates per objective).
    c : ndarray, shape (K, d_{i0}), optional
        General coefficients (instead of ``unit``).
    variants, allowance
        As :func:`.linear_passes.bound_objectives_variants`.
    adaptive : bool
        ``False``: every variant runs whatever :attr:`LinearContext.adaptive` says (and the objectives are not
        counted for it).

    Returns
    -------
    ndarray, shape (V, K)
    """
    variants = tuple(ctx.variants) if variants is None else tuple(variants)
    cl = ctx.compact["stable"]
    H = ctx.H
    U = cl["U"]
    m = grad_magnitudes(ctx, rb, i0)
    row = rb.row
    if unit is not None:
        idx, sign = (np.asarray(a) for a in unit)
        sign = sign.astype(np.float64)
        if idx.ndim == 1:
            idx, sign = idx[:, None], sign[:, None]
        K = idx.shape[0]
        if i0 >= 0:
            pos = np.full(ctx.du[i0].size, -1, dtype=np.int64)
            pos[U[i0]] = np.arange(U[i0].size)
            pidx = pos[idx]
            if (pidx < 0).any():
                raise ValueError("objectives on g(i0) must lie on the neurons that are not exact (U(i0))")
        asg = np.abs(sign)
        c_abs1 = asg.sum(axis=1)
        err = (asg * m[0][pidx if i0 >= 0 else idx]).sum(axis=1)
    else:
        c = np.asarray(c, dtype=np.float64)
        K = c.shape[0]
        if i0 >= 0:
            off = np.ones(ctx.du[i0].size, dtype=bool)
            off[U[i0]] = False
            if (c[:, off] != 0).any():
                raise ValueError("objectives on g(i0) must lie on the neurons that are not exact (U(i0))")
        c_abs1 = np.abs(c).sum(axis=1)
        err = np.abs(c if i0 == -1 else c[:, U[i0]]) @ m[0]
    const = np.zeros(K)
    cabs = np.zeros(K)
    sabs = c_abs1.copy()  # l1 norms of every coefficient carried through a collapsed map (underflow)
    # the objectives' own coefficients on y(t)[U(t)] (t > i0) and the constant (output row) through exact neurons
    Lacc = [None] * (H - 1)
    # the objectives' coefficients on y(t)[U(t)] (t > i0) and the constant (output row), through exact neurons
    cU = None if unit is not None else (c if i0 == -1 else np.ascontiguousarray(c[:, U[i0]]))
    sel = None if unit is None else (idx if i0 == -1 else pidx)
    up = cl["Up"][i0 + 1]
    if up is not None:
        if unit is not None:
            A = up[sel[:, 0]] * sign[:, :1]
            for j in range(1, sel.shape[1]):
                A += up[sel[:, j]] * sign[:, j:j + 1]
        else:
            A = cU @ up
        for t, (o0, o1) in cl["Up_off"][i0 + 1].items():
            Lacc[t] = A[:, o0:o1]
    topb = cl["Top"][i0 + 1]
    if topb is not None:
        top = (sign * topb[sel, row]).sum(axis=1) if unit is not None else cU @ topb[:, row]
        const += top
        cabs += np.abs(top)
    const_lines = [iv for iv, key in enumerate(variants)
                   if not any(ctx.variants[key][j][k].any() for j in (0, 2) for k in range(i0 + 1, H - 1))]
    skip = (adaptive and ctx.adaptive > 0 and len(const_lines) > 0 and rb.slope_stats[0] >= ctx.adaptive
            and rb.slope_stats[1] == 0)
    active = const_lines + [iv for iv in range(len(variants)) if iv not in const_lines and not skip]
    V = len(active)
    nus = [[None] * (H - 1) for _ in range(V)]
    nnz = np.zeros(V, dtype=np.int64)
    c_l, cabs_l, err_l = np.zeros((V, K)), np.zeros((V, K)), np.zeros((V, K))
    term, ey, ek = np.empty(K), np.empty(K), np.empty(K)
    lterm, le = np.empty((V, K)), np.empty((V, K))
    # -- pass 1: up the gradient graph on the U neurons ----------------------------------------------------------
    for k in range(i0 + 1, H - 1):
        u = U[k]
        n = u.size
        if n == 0:
            continue
        d = ctx.dl[k].size
        if Lacc[k] is None:  # no coefficient reaches y(k)[U(k)]: every term of this layer is zero
            continue
        Lam = np.ascontiguousarray(Lacc[k])
        kappa = np.empty((K, n))
        mk = m[k - i0]
        S_low, T_low, S_up, T_up, w, has, slot = _lines_on_U(ctx, k, tuple(variants[iv] for iv in active))
        nu_k = np.empty((int(sum(has)), K, n))
        plane_lines_step(Lam, *(p[u] for p in rb.up[k]), *(p[u] for p in rb.lo[k]), rb.ymax[k][u], mk, S_up,
                         S_low, T_up, T_low, w, slot, kappa, nu_k, term, ey, ek, lterm, le, nnz)
        for v in range(V):
            if slot[v] >= 0:
                nus[v][k] = nu_k[slot[v]]
        const += term
        cabs += np.abs(term)
        err += gamma(d + 16) * ey + ek
        c_l += lterm
        cabs_l += np.abs(lterm)
        err_l += gamma(d + 8) * le
        sabs += np.abs(kappa).sum(axis=1)
        up = cl["Up"][k + 1]
        if up is not None:
            A = kappa @ up
            for t, (o0, o1) in cl["Up_off"][k + 1].items():
                Lacc[t] = A[:, o0:o1] if Lacc[t] is None else Lacc[t] + A[:, o0:o1]
        topb = cl["Top"][k + 1]
        if topb is not None:
            tt = kappa @ topb[:, row]
            const += tt
            cabs += np.abs(tt)
    # -- per variant: the network pass ---------------------------------------------------------------------------
    out = np.full((len(variants), K), np.inf)
    errs = [np.zeros(K) for _ in variants]
    for v, iv in enumerate(active):
        out[iv], errs[iv] = _network_pass_stable(ctx, rb, nus[v] if nnz[v] else None, c_l[v] + const,
                                                 cabs_l[v] + cabs, err_l[v] + err, sabs)
    if adaptive and not skip and const_lines and len(const_lines) < len(variants):
        rb.slope_stats[0] += K
        rb.slope_stats[1] += int(np.count_nonzero(np.delete(out, const_lines, axis=0).min(axis=0)
                                                  < out[const_lines].min(axis=0)))
    if allowance is not None:
        allowance.extend(errs)
    return out


def _lines_on_U(ctx, k: int, keys: tuple):
    """The lines of ``sigma'`` of the variants ``keys`` on ``U(k)``, stacked ``(V, |U(k)|)``, their allowance
    magnitude, which variants have a slope, and the slots of their coefficients on ``z`` (cached per context)."""
    cache = ctx.compact["stable"].setdefault("lines", {})
    hit = cache.get((k, keys))
    if hit is None:
        u = ctx.compact["stable"]["U"][k]
        lines = [ctx.variants[key] for key in keys]
        S_low, T_low, S_up, T_up = (np.stack([ln[j][k][u] for ln in lines]) for j in range(4))
        w = np.maximum(np.abs(S_up), np.abs(S_low)) * ctx.compact["stable"]["zmax"][k] + np.maximum(
            np.abs(T_up), np.abs(T_low))
        has = [bool(S_up[v].any() or S_low[v].any()) for v in range(len(keys))]
        slot = np.cumsum(has, dtype=np.int64) - 1
        slot[~np.asarray(has, dtype=bool)] = -1
        hit = cache[(k, keys)] = (S_low, T_low, S_up, T_up, w, has, slot)
    return hit


def _network_pass_stable(ctx, rb, nus, const, cabs, err, sabs):
    """Pass 2 on the ``U`` neurons (module docstring): the coefficients ``nus[t]`` on ``z(t)[U(t)]`` (``None``:
    none) back-substituted through the collapsed maps and concretised; returns ``(bounds, allowances)``."""
    H = ctx.H
    K = const.size
    cl = ctx.compact["stable"]
    eta = underflow_unit(np.float64)
    if nus is None:  # no coefficient on any z (constant lines): nothing to do
        err = err + gamma(4 * H + 8) * cabs + TINY + rb.under + 2.0 * eta * cl["N"] * sabs * cl["mag"]
        return np.where(np.isnan(const + err), np.inf, const + err), err
    U = cl["U"]
    n0 = ctx.W[0].shape[1]
    Hacc = [None] * (H - 1)
    r_off = cl["R_off"]
    Gall = np.zeros((K, cl["Rstack"].shape[0])) if r_off else None  # the G(t) of the layers with R(t)
    out5 = np.empty((5, K))
    sabs = sabs.copy()
    top = max((k for k in range(H - 1) if nus[k] is not None), default=-1)
    for t in range(top, -1, -1):
        n = U[t].size
        if n == 0:
            continue
        nu = nus[t]
        if Hacc[t] is None:
            if nu is None:
                continue
            Gt = nu
            tb = Gt @ cl["c"][t]
            ew = np.abs(Gt) @ cl["E2"][t]
        else:
            Gt = np.empty((K, n))
            ar = np.arange(n, dtype=np.int64)
            relax_step(np.ascontiguousarray(Hacc[t]), ar, np.empty((0, 0)) if nu is None else nu, ar,
                       nu is not None, cl["a_up"][t], cl["a_low"][t], cl["b_up"][t], cl["b_low"][t],
                       cl["r_up"][t], cl["r_low"][t], cl["zmax"][t], cl["c"][t], cl["E2"][t], ar, Gt, out5)
            const += out5[0]
            cabs += np.abs(out5[0])
            err += gamma(ctx.dl[t].size + 2) * out5[1] + 4 * _U * out5[2]
            tb, ew = out5[3].copy(), out5[4].copy()
        const += tb
        cabs += np.abs(tb)
        err += ew
        sabs += np.abs(Gt).sum(axis=1)
        if t in r_off:
            Gall[:, r_off[t][0]:r_off[t][1]] = Gt
        dn = cl["Down"][t]
        if dn is None:
            continue
        A = Gt @ dn
        for i, (o0, o1) in cl["Down_off"][t].items():
            Hacc[i] = A[:, o0:o1] if Hacc[i] is None else Hacc[i] + A[:, o0:o1]
    if Gall is None:
        sup = np.zeros(K)
    else:
        lo, hi = ctx.region.box
        sup = _concretise_upper(Gall @ cl["Rstack"], ctx.region, lo, hi, gamma(n0 + 2))
    total = const + sup
    err = (err + gamma(4 * H + 8) * (cabs + np.abs(sup)) + TINY + rb.under
           + 2.0 * eta * cl["N"] * sabs * cl["mag"])
    with np.errstate(invalid="ignore"):
        res = total + err
    return np.where(np.isnan(res), np.inf, res), err
