"""RecurJac (Zhang, Zhang & Hsieh, AAAI 2019, Algorithm 1) as a block function on a chain.

One step ``t`` bounds ``P_{t-1} Σ_t V`` for a block of rows and a column panel ``V`` (Theorem 1): for every row
``j``, two chains (upper with the merged weights ``Ŵ(j)``, lower with ``W̃(j)``, Eq. 17-18) descend from level
``t`` to the exact top.  At each level ``s`` the neurons split by the row's known bounds of ``P_{s-1}`` into
``I_j`` (Term I, Eq. 14-15: ``Y σ' ∈ [du Lm, du Um]``), ``P_j`` / ``N_j`` (sign of ``Y`` known: ``σ'`` fixed to
``dl`` or ``du`` per entry by the sign of ``Y V``, and ``Y`` expanded one level further: Term II, Lemma 2) and
``E_j`` (``dl == du``: expanded exactly whatever the sign).  At the top ``Y = M_0[j]`` is exact (Eq. 10-11).

Kernels
-------
- Dense per row: the rows of the block and both chains share one GEMM per level,
  ``M_{s-1}[alive_{s-1}, alive_s] @ X'`` with ``X'`` of shape ``(|alive_s|, 2 R c)`` (padded to whole panels);
  ``alive`` drops neurons with ``du = 0`` (dead for every row) on both sides of the GEMM.  Rows whose operand
  vanished are skipped, and rows with many ``I_j`` neurons (zero rows of their ``X'``) get their own GEMM on the
  compacted ``M[:, S_j]`` (structural sparsity; :func:`_level_matmul`).  The first level of a step shares the
  stable-neuron part ``M[:, stable] D(du) V[stable]`` across rows (:func:`_first_level`).
- Sharing across rows (nearly-linear regime, :func:`uses_sharing`): the operand of every level is kept as a part
  shared by all rows plus a low-rank per-row part on the unstable neurons (:func:`_shared_levels`); per row only the
  unstable neurons are prepared and multiplied, each row on its own non-zero per-row factors (its Term I neurons
  leave exact zeros, most of them deep in the chain; :func:`_shared_matmul`), a few rows at a time so that the
  per-row factors stay in cache.
- The mask / sign / scale preparation of ``X'``, Term I and the exact top are fused numba passes
  (:mod:`recurjac_scale.kernels`).  Step 1 (``P_0 = M_0`` exact) is two tiled GEMMs in midpoint-radius form:
  ``A D(mid) V ± |A| D(rad) |V|``.

Every choice between these variants depends on the chain or on the row alone, never on the blocking, and every
GEMM runs on fixed-shape panels: the results are bitwise independent of the row and column blocks.  All variants
compute the same real-number sums (the paper's bound) in different orders; the running rounding allowance of
:mod:`recurjac_scale.jacobian.rounding` is accumulated alongside in each of them.

This module holds the step (step 1 and the dense per-row recursion); the level machinery (level matrices, one
level, the row-wise products) is in :mod:`recurjac_scale.jacobian.recurjac_levels`, sharing across rows in
:mod:`recurjac_scale.jacobian.recurjac_shared`.  Their tunables are re-exported here for reading; set them on the
module that reads them.
"""

from __future__ import annotations

import numpy as np

from .. import kernels
from .._fp import gamma
from .chain import Chain
from .products import live_neurons, panel_products, unstable_neurons
from .recurjac_levels import GATHER_BYTES, SPARSE_FRACTION  # noqa: F401 (re-exported)
from .recurjac_levels import _alive, _first_level, _level, _level_matrix
from .recurjac_shared import (  # noqa: F401 (re-exported)
    SHARE_RATIO,
    SHARED_CACHE_BYTES,
    SHARED_TILE_BYTES,
    UNSTABLE_FRACTION,
    shared_row_chunk,
)
from .recurjac_shared import _shared_levels, uses_sharing
from .rounding import (
    abs_col_sums,
    column_abs_sums,
    kappa,
    level_coefficients,
    row_max,
    sign_slack,
    step_widening,
    widen_outward,
    widening,
)

__all__ = [
    "recurjac_step",
    # re-exported from recurjac_levels / recurjac_shared (set these tunables on those modules, where they are read)
    "uses_sharing",
    "shared_row_chunk",
    "SHARE_RATIO",
    "UNSTABLE_FRACTION",
    "SHARED_CACHE_BYTES",
    "SHARED_TILE_BYTES",
    "SPARSE_FRACTION",
    "GATHER_BYTES",
]


def _scaled_cols(A: np.ndarray, cols: np.ndarray, scale: np.ndarray, absolute: bool = False) -> np.ndarray:
    """``A[:, cols] * scale`` (``|A[:, cols]| * scale`` when ``absolute``), shape ``(R, cols.size)``, in one pass
    (:func:`recurjac_scale.kernels.gather_cols_scaled`); the same values, bit for bit."""
    A = np.ascontiguousarray(A)
    dt = np.result_type(A.dtype, scale.dtype)
    out = np.empty((A.shape[0], cols.size), dtype=dt)
    if out.size:
        kernels.gather_cols_scaled(A.astype(dt, copy=False), np.ascontiguousarray(cols, dtype=np.int64),
                                   np.ascontiguousarray(scale, dtype=dt), bool(absolute), out)
    return out


def recurjac_step(chain: Chain, t: int, V: np.ndarray, priors) -> dict:
    """Certified bounds of ``P_{t-1} Σ_t V`` for a block of rows (Zhang et al. 2019, Algorithm 1, Theorem 1).

    Parameters
    ----------
    chain : Chain
        Only ``chain.mats[:t-1]``, ``chain.dl[:t]``, ``chain.du[:t]`` and ``chain.panel`` are read.
    t : int
        Layer step, ``1 <= t <= chain.n_steps``.
    V : ndarray, shape (d_t, c) or (R_blk, d_t, c)
        The column panel ``M_t[:, cols]``, or one operand per row (Algorithm 2 pushes ``V_j = W(1) s_j`` through
        the last step ``t = T`` of the backward chain: ``V`` of shape ``(R_blk, n_1, 1)``).
    priors : sequence of dict
        ``priors[s]`` for ``s = 0..t-1``: the state of step ``s`` for the block's rows (all columns):
        ``"lower"``, ``"upper"``, ``"allowance"`` of shape ``(R_blk, d_{s+1})``; ``priors[0]`` is :func:`top_state`.

    Returns
    -------
    dict
        ``"lower"``, ``"upper"``: certified bounds, shape ``(R_blk, c)``, widened outward for rounding;
        ``"allowance"``: what rounding may have cost them (:mod:`recurjac_scale.jacobian.rounding`).
    """
    dt = np.dtype(chain.dtype)
    V = np.asarray(V, dtype=dt)
    A = np.asarray(priors[0]["upper"], dtype=dt)
    R = A.shape[0]
    perrow = V.ndim == 3
    c = V.shape[-1]
    dl_t, du_t = chain.dl[t - 1], chain.du[t - 1]
    if R == 0 or c == 0:
        z = np.zeros((R, c), dtype=dt)
        return {"lower": z, "upper": z.copy(), "allowance": z.copy()}

    if t == 1 and not perrow:
        # P_0 = M_0 exact: max/min over sigma in [dl, du] of A D(sigma) V = A D(mid) V ± |A| D(rad) |V| (Eq. 10-11),
        # the centre over the live neurons (mid = 0 on dead ones), the radius over the unstable ones (rad = 0 on the
        # others).  (Sparse x dense when level 1 is pruned: fixed-order sums of <= d_1 terms, panel_products.)
        live, unst = live_neurons(chain, t), unstable_neurons(chain, t)
        mid = 0.5 * (dl_t[live] + du_t[live])
        rad = 0.5 * (du_t[unst] - dl_t[unst])
        center, radius, mag = panel_products(
            chain, t, V, (_scaled_cols(A, live, mid), False, live), (_scaled_cols(A, unst, rad, True), True, unst),
            (_scaled_cols(A, live, du_t[live], True), True, live),
        )
        # Local error: terms |A| mid |V| + |A| rad |V| = |A| D(du) |V| (rounding module), one product of length d_1.
        n = V.shape[0] + 8 + (0 if dt == np.float64 else 8)
        w = widening(chain, t, mag, n=n)
        lower, upper = widen_outward(center - radius, center + radius, w)
        return {"lower": lower, "upper": upper, "allowance": 2.0 * w}

    P = chain.panel
    ncols = 2 * R * c
    npad = -(-ncols // P) * P
    acc = np.zeros((2, R, c), dtype=dt)
    err = np.zeros((4, R, c), dtype=dt)  # running allowance: rounding per chain, then prior allowances per chain
    alive = _alive(du_t)
    if not perrow and uses_sharing(chain, t):
        _shared_levels(chain, t, V, priors, A, R, c, P, acc, err)
        return _finish_step(chain, t, acc, err)
    if perrow:
        X = np.zeros((alive.size, npad), dtype=dt)
        Xv = np.transpose(V[:, alive, :], (1, 0, 2)).reshape(alive.size, R * c)
        X[:, : R * c] = Xv
        X[:, R * c : ncols] = Xv
        shared = False
    else:
        X = np.ascontiguousarray(V[alive])  # shared by every row and both chains at the first level
        shared = True
    for s in range(t, 1, -1):
        # Level s: Y = P_{s-1} is bounded by priors[s-1]; expand into M_{s-1} = chain.mats[s-2].
        lo, hi = chain.dl[s - 1][alive], chain.du[s - 1][alive]
        Lp = np.asarray(priors[s - 1]["lower"], dtype=dt)[:, alive]
        Up = np.asarray(priors[s - 1]["upper"], dtype=dt)[:, alive]
        Sp = sign_slack(np.asarray(priors[s - 1]["allowance"], dtype=dt)[:, alive])
        Cl, Cq = level_coefficients(chain, t, s, priors, alive)
        alive_up = _alive(chain.du[s - 2])
        M = _level_matrix(chain, s - 2, alive_up, alive, dt)
        if shared:
            X = _first_level(X, M, Lp, Up, Sp, lo, hi, R, c, P, npad, acc, Cl, Cq, err,
                             _stable_error(chain, s, priors, alive, X))
        elif perrow and s == t and (lo == hi).any():
            # The stable neurons' allowance as in _first_level (row by row): the same bits as a shared V per row.
            st = np.flatnonzero(lo == hi)
            Cl[:, st] = 0.0
            for j in range(R):
                e_st = _stable_error(chain, s, [{k: v[j : j + 1] for k, v in p.items()} if p is not None else None
                                                for p in priors], alive, V[j][alive])(st)
                err[0, j] += e_st[0]
                err[1, j] += e_st[0]
            X = _level(X, False, M, Lp, Up, Sp, lo, hi, R, c, P, npad, acc, Cl, Cq, err)
        else:
            X = _level(X, False, M, Lp, Up, Sp, lo, hi, R, c, P, npad, acc, Cl, Cq, err)
        shared = False
        alive = alive_up
        if X is None:  # all operands vanished (every neuron of every row in I_j or dead)
            break
    if X is not None:
        kernels.top_level(
            X,
            np.ascontiguousarray(A[:, alive]),
            np.ascontiguousarray(chain.dl[0][alive]),
            np.ascontiguousarray(chain.du[0][alive]),
            R,
            c,
            acc,
            kernels.no_add(dt),
            level_coefficients(chain, t, 1, priors, alive)[0],
            err,
        )
    return _finish_step(chain, t, acc, err)


def _stable_error(chain: Chain, s: int, priors, alive: np.ndarray, V: np.ndarray):
    """The allowance of the shared stable product of :func:`_first_level` at level ``s``: a function of the stable
    neurons ``st`` (indices into ``alive``) returning ``gG q_{s-1}[j] (colsum_{s-1} du)[st] . |V[st, k]|``, shape
    ``(R, c)`` (rounding module: the GEMM error of ``M[:, st] D(du) V[st]`` weighted by the priors of level
    ``s - 1``)."""
    dt = np.dtype(chain.dtype)

    def err(st):
        cols = alive[st]
        colw = (column_abs_sums(chain, s - 1)[cols] * chain.du[s - 1][cols]).astype(dt)
        with np.errstate(over="ignore", invalid="ignore"):
            w = abs_col_sums(V, dt, st, colw)  # (c,)
            q = row_max(kappa(chain, s - 1, priors[s - 2]))
            g = gamma(chain.widths[s - 1] + 3, dt)
            return (dt.type(g) * q)[:, None] * w[None, :]

    return err


def _finish_step(chain: Chain, t: int, acc: np.ndarray, err: np.ndarray) -> dict:
    """Widen the step's bounds (``acc[0]`` upper, ``acc[1]`` lower) by their rounding allowance and state the
    allowance of the result (rounding module: ``2 w_t`` plus the propagated allowance of the priors)."""
    w_up = step_widening(chain, t, err[0])
    w_lo = step_widening(chain, t, err[1])
    lower, upper = widen_outward(acc[1], acc[0], w_lo, w_up)
    with np.errstate(over="ignore", invalid="ignore"):
        prop = np.maximum(err[2], err[3]) * (1.0 + gamma(chain.rounding_length(t), chain.dtype))
        allowance = 2.0 * np.maximum(w_up, w_lo) + prop
    allowance = np.where(np.isnan(allowance), np.inf, allowance)
    return {"lower": lower, "upper": upper, "allowance": allowance}
