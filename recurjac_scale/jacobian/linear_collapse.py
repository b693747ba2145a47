"""The last step of ``linear-jacobian``'s network pass with the first hidden layer's linear neurons folded in.

In the network pass of :mod:`recurjac_scale.jacobian.linear` the coefficients ``Gam`` on ``z(1)`` go to ``h(0)``
through ``W[1]``, are relaxed to ``z(0)`` and go to ``x`` through ``W[0]``: two GEMMs of ``K x d_1 x d_0`` and
``K x d_0 x n_0``.  A neuron ``r`` of layer 0 whose relaxation is one exact line (``a_up = a_low = a``, ``b_up =
b_low = beta``: ``h(0)_r = a z(0)_r + beta`` on the region, e.g. a stable ReLU) and that receives no coefficient
from the lines of ``sigma'`` (zero slopes in every variant) adds the linear function

    sum_r (Gam W[1])_r (a_r (W[0][r] x + b[0]_r) + beta_r) = x · (Gam P) + Gam · p,
    P = W[1][:, L] diag(a_L) W[0][L, :],   p = W[1][:, L] (a_L b[0]_L + beta_L)

over the set ``L`` of these neurons.  ``P`` (``d_1 x n_0``) and ``p`` are computed once per context; a pass then
needs ``K x d_1 x n_0`` for them plus the two GEMMs restricted to the other neurons, which pays when many neurons of
layer 0 are stable (small radii).

Rounding (added to the bound per objective, with ``|Gam|`` the absolute coefficients on ``z(1)``):

- ``P`` and ``p`` as computed differ from the exact ones by at most ``gamma(|L| + 2) |W[1]_L| (|a| |W[0]_L|)``
  and ``gamma(|L| + 2) |W[1]_L| (|a| |b[0]| + |beta|)`` (one product per term, sums of ``|L|`` terms), plus
  underflow (``eta`` per product, :func:`recurjac_scale._fp.underflow_unit`);
- the GEMMs ``Gam P`` and ``Gam p`` (sums over the ``m = |act(1)|`` coefficients) err by ``gamma(m + 2) |Gam| |P|``
  and ``gamma(m + 2) |Gam| |p|`` (plus ``m eta`` per entry); on the linear form, ``P``'s errors count times
  ``|x|max``;
- the sum of the two parts of the coefficients on ``x`` is charged ``gamma(2) |Gx| |x|max`` by the caller.

The product ``Gam W[1]`` is the one charged by the caller's affine step of layer 1 (whole layer), as before.
"""

from __future__ import annotations

import numpy as np

from .._fp import gamma, underflow_unit

__all__ = ["first_layer_collapse"]


def first_layer_collapse(ctx) -> dict | None:
    """The folded last step for a :class:`~recurjac_scale.jacobian.linear.LinearContext` (module docstring), or
    ``None`` when the network has fewer than two hidden layers or folding would not save GEMM work.

    Returns
    -------
    dict
        ``net1``: ``W[1][act(1)][:, rest]`` (the GEMM to the other kept neurons of layer 0), ``pos``: their columns
        per neuron of layer 0 (``-1`` elsewhere), ``act``: the other neurons with a non-zero coefficient,
        ``first``: ``W[0][act]``, ``P`` (``|act(1)| x n_0``), ``p`` (``|act(1)|``), ``e``: the allowance per unit
        of ``|Gam|`` (``|act(1)|``), ``eta``: the absolute underflow allowance of one objective.
    """
    if ctx.H < 3:
        return None
    cp = ctx.compact
    act1, kept0, act0 = cp["act"][1], cp["kept"][0], cp["act"][0]
    a_up, a_low, b_up, b_low = ctx.a_up[0], ctx.a_low[0], ctx.b_up[0], ctx.b_low[0]
    no_slope = np.ones(a_up.size, dtype=bool)
    for S_low, _, S_up, _ in ctx.variants.values():
        no_slope &= (S_up[0] == 0) & (S_low[0] == 0)
    exact = (a_up == a_low) & (b_up == b_low) & no_slope & np.isfinite(a_up) & np.isfinite(b_up)
    in_kept = np.zeros(a_up.size, dtype=bool)
    in_kept[kept0] = True
    L = np.flatnonzero(exact & in_kept)
    rest = np.flatnonzero(in_kept & ~exact)
    act_rest = act0[~exact[act0]]
    n0 = ctx.W[0].shape[1]
    na = act1.size
    old = na * kept0.size + act0.size * n0
    new = na * n0 + na * rest.size + act_rest.size * n0
    if L.size == 0 or new >= 0.8 * old:
        return None
    W1 = ctx.W[1][act1]
    W1L = W1[:, L]
    a = a_up[L]
    P = (W1L * a) @ ctx.W[0][L]
    p = W1L @ (a * ctx.b[0][L] + b_up[L])
    absW1L = np.abs(W1L)
    xmax = ctx.xmax
    gL = gamma(L.size + 2)
    gG = gamma(na + 2)  # the GEMMs Gam P, Gam p sum over the na = |act(1)| coefficients
    eta = underflow_unit(np.float64)
    wx = ctx.absW[0][L] @ xmax
    sx = float(np.sum(xmax))
    e = (gL * (absW1L @ (np.abs(a) * wx))
         + gL * (absW1L @ (np.abs(a) * np.abs(ctx.b[0][L]) + np.abs(b_up[L])))
         + gG * (np.abs(P) @ xmax + np.abs(p))
         # underflow in P and p: the |L| products of each entry, and W[1] a times |W[0]|, |b[0]|
         + eta * ((L.size + 2) * (sx + 1.0) + float(np.sum(wx)) + float(np.sum(np.abs(ctx.b[0][L])))))
    pos = np.full(a_up.size, -1, dtype=np.int64)
    pos[rest] = np.arange(rest.size)
    return {
        "net1": np.ascontiguousarray(W1[:, rest]),
        "pos": pos,
        "act": act_rest.astype(np.int64),
        "first": np.ascontiguousarray(ctx.W[0][act_rest]),
        "P": np.ascontiguousarray(P),
        "p": p,
        "e": e,
        "eta": eta * (na + 2) * (sx + 1.0),  # underflow in the GEMMs Gam P and Gam p
    }
