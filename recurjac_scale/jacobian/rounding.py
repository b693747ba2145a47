"""Certified rounding of the Jacobian bound recursion: a running (a-posteriori) allowance per bound.

Every step of a method (:mod:`recurjac_scale.jacobian.chain`, block interface) returns, next to its bounds
``"lower"`` / ``"upper"`` of ``P_t``, an array ``"allowance"`` of the same shape (``(R_blk, c)``).  The bounds are
certified: they hold for the exact real-number ``P_t`` of the network (float64 weights) whatever the rounding of
the computation.  The allowance ``a_t`` is a certified bound of what certification costs: how far the bounds may
lie from the bounds ALGORITHM.md's recursion gives in exact arithmetic from the same derivative bounds (as long as
both class the neurons alike).  It feeds the sign classes of later steps (:func:`sign_slack`) and the reported
share of the width (:func:`rounding_share`).

Rounding
--------
Notation: ``u`` the unit roundoff of the chain's dtype, ``gamma(n)`` (:func:`recurjac_scale._fp.gamma`) twice
Higham's ``gamma_n = n u / (1 - n u)`` (the factor 2 and the ``+2`` in its length cover the few roundings of the
allowance computation itself: products of coefficients, the sums below, each rounded once more).  ``|.|`` and
inequalities are entry-wise.  ``kappa_s = D(du_s) max(|L_{s-1}|, |U_{s-1}|)`` (shape ``(R, d_s)``) is built from
the certified bounds of ``P_{s-1}`` that the step reads (state ``s - 1``; state 0 is ``M_0`` itself), so
``|P_{s-1}[j, r] sigma'_r| <= kappa_s[j, r]`` for every realisable Jacobian.

*The key step (why errors do not compound).*  Fix a block row ``j`` and the upper chain of step ``t`` (the lower
chain is symmetric).  The recursion carries an operand ``x_s`` (a column of floats, ``d_s`` entries) from level
``s = t`` (``x_t = V``, the column panel) down to the top.  Whatever ``x_s`` is, the quantity it stands for is
``v_s = Y_s sigma'_s x_s`` with ``Y_s = P_{s-1}[j]`` the true row: at level ``s`` Term I (Eq. 14-15) bounds the
``I_j`` part of ``v_s`` by a sum of products of the certified priors with ``x_s``, and Term II (Lemma 2) bounds the
rest by ``Y_s xp_s = Y_{s-1} sigma'_{s-1} (M_{s-1} xp_s)`` with ``xp_s`` the merged operand, which in exact
arithmetic is ``v_{s-1}`` for ``x_{s-1} = M_{s-1} xp_s``.  The computation continues with the computed
``x~_{s-1} = fl(M_{s-1} fl(xp_s))`` instead, which is equally a column of floats: the recursion from there on
bounds ``Y_{s-1} sigma' x~_{s-1}`` exactly as it would any operand, and the only loss is
``|Y_{s-1} sigma' (x_{s-1} - x~_{s-1})| <= kappa_{s-1} |x_{s-1} - x~_{s-1}|``.  So each level's rounding is weighted
once by the certified priors of that level and never carried through later products: no magnitude chain
``|M_0| D |M_1| ...`` (about ``1e11`` times the values on the paper's CIFAR shape, where random layers cancel).

*Step ``t`` of RecurJac, dense per row* (:func:`level_coefficients`).  With ``K_s = kappa_{s-1} |M_{s-1}|``
(``(R, d_s)``; bounded without a GEMM by ``q_{s-1} colsum|M_{s-1}|``, ``q_{s-1}[j] = max_r kappa_{s-1}[j, r]``,
:func:`column_abs_sums`, rounded up), the upper bound computed by the step differs from the exact Term I / Term II
sum on the computed operands by at most::

    e_t[j, k] = sum_{s=1..t} sum_r ( gT kappa_s[j, r] + gG du_s[r] q_{s-1}[j] colsum_{s-1}[r] ) |x~_s[r, k]|

- ``gG = gamma(d_s + 3)`` bounds the product ``fl(M_{s-1} fl(xp_s))`` (its length ``<= d_s``: dead neurons and the
  per-row compacted / sparse products drop exact zeros only; one rounding of ``xp`` by its factor ``a``, one for
  the stable part added by :func:`recurjac_scale.jacobian.recurjac_levels._first_level`, one for the float32 weights
  below), and ``|xp_s| <= du_s |x~_s|``.
- ``gT = gamma(N_t)`` (``N_t`` = :meth:`Chain.rounding_length`, at least the number of terms added into a bound,
  ``<= 3 sum d_s + 4t + 4``, plus two roundings per term) bounds the accumulation of Term I, the sign-slack
  corrections and the exact top: each term is at most ``kappa_s |x~_s|`` (Term I ``du max(|L|,|U|) |x|``; the
  correction ``(du - dl) max(0, -L) |x|``; the top ``du |M_0[j]| |x|``), and the rounding of the merged operand
  (``|fl(a x) - a x| <= u |a x|``, which Term II multiplies by ``Y``) is one more such term.
- The accumulation of ``e_t`` itself in the dtype loses at most ``gamma`` of it: the step multiplies by
  ``1 + gT``.

The step widens its bounds by ``w_t = e_t (1 + gT) + n tiny + underflow_allowance`` (outward, per chain).

*Sharing across rows* (:func:`recurjac_scale.jacobian.recurjac_shared._shared_levels`).  The full operand of level ``s``
is represented as ``x_s = Xsh_s + G_s z`` (shared part, chain-only factor ``G_s``, per-row factor ``z``), taken as
exact real numbers.  Forming level ``s - 1`` from level ``s`` rounds ``Ms = fl(M[:, st] D(du))``, the shared
product ``fl(Ms Xsh_s[st])`` and the factor ``fl(Ms G_s[st])``: their errors are at most
``gG |M[:, st]| D(du) (|Xsh_s[st]| + |G_s[st]| |z|)``, weighted by ``kappa_{s-1}``, i.e. at most
``gG q_{s-1}[j] (cX_s[k] + cG_s . |z|)`` with the chain-only / shared vectors ``cX_s = (colsum D(du))[st] |Xsh_s[st]|``
and ``cG_s = (colsum D(du))[st] |G_s[st]|``.  On the unstable neurons the computed ``x~_s[u] = fl(fl(G_s[u] z) +
Xsh_s[u])`` differs from the representation by at most ``gamma(r_s + 1) (|G_s[u]| |z| + |Xsh_s[u]|)``, weighted by
``kappa_s[u] <= p_s[j] = max_u kappa_s[j, u]``; Term I and the corrections are counted on ``x~_s[u]`` in the
preparation kernel as in the dense case.  The top (``Y = M_0[j]`` exact) adds the shared products ``Tsh``,
``H = fl(B1 G_1[st])`` and ``H z``: at most ``gT q_1[j] (sum_r |Xsh_1[r]| + colsum|G_1| . |z|)``.  The per-row dots
with ``|z|`` are summed once at the end (:func:`recurjac_scale.kernels.rowdot_abs_acc`).

*Step 1, Fast-Lip and the F1 finish* use only their local error: their inputs are certified floats used as they
are.  A product ``mid(Z) V + rad(Z) |V|`` of length ``n`` errs by at most ``gamma(n + 8) max(|zl|, |zu|) |V|``
(step 1: ``|M_0| D(du) |V|``), computed in the same product with ``|V|`` as the radius (stacked operands), as is
the propagated allowance ``(du a_{t-1}) |V|``.

*float32.*  The chain's matrices are the weights rounded to float32: ``|W - M| <= u |M|`` (normal range; the
weights are checked to fit, :func:`recurjac_scale._fp.cast_weights`).  In the argument above ``M_{s-1} xp`` is
replaced by ``W_{s-1} xp``: one more relative rounding of every product with a weight (counted in ``gG``, in the
``+8`` of the local lengths, and for ``V`` and ``M_0`` in ``N_t``, which adds ``4 t + 4`` in float32).  The
derivative bounds are rounded outward (:func:`recurjac_scale.jacobian.chain._outward`).

*Underflow.*  A product that underflows errs by at most ``eta`` absolutely (:func:`recurjac_scale._fp.
underflow_unit`), which no relative bound sees.  :func:`underflow_allowance` (chain-only, ``2 eta Lambda_t N_t^2``)
bounds every such error of step ``t`` weighted by the largest factor any prior or later product can apply; each
step adds it (``1e-280`` on the paper's CIFAR shape; it matters only for weights like ``1e-170``).  The local
computations add ``n tiny``.

*Sparse levels* (:meth:`Chain.with_sparse`) sum a row's stored entries only (a shorter sum of the same terms):
every allowance above holds.

*The allowance state* (what certification costs).  Our step ``t`` differs from the exact recursion with exact
priors through (i) its own rounding, at most ``e_t`` before and ``w_t`` after widening, so ``2 w_t`` in all, and
(ii) the priors it reads: Term I is linear in a prior bound with coefficient ``du |x|``, and the sign-slack
correction of a neuron classed ``P`` / ``N`` is at most ``(du - dl) slack |x|`` with ``slack = SLACK a_{s-1}``.
So, when the classes agree, the step is within::

    a_t = 2 w_t + sum_s sum_{r unstable} PROP du_s[r] a_{s-1}[j, r] |x~_s[r, k]|,   PROP = 1 + SLACK

of the exact recursion (accumulated per chain in the same kernels, both chains' maximum stored).  Only the
unstable neurons (``dl < du``) read a prior bound, so ``a_t`` compounds only through them, where the widths are
large.  Fast-Lip: ``a_t = 2 w_t + (du a_{t-1}) |V|`` (the hull moves by at most ``du`` times a prior's change, and
so do its midpoint and radius together); the F1 finish alike with ``|W(1)ᵀ|``.

*Sign slack* (:func:`sign_slack`).  ALGORITHM.md classes a neuron by the sign of the exact bound.  A stored lower
bound ``L`` is within ``a`` of the exact one, so an exact bound ``>= 0`` gives ``L >= -a``: the kernels class
``P`` when ``L >= -SLACK a`` (``SLACK = 2`` leaves room for the rounding of the float oracle the tests compare
with).  Any slack is sound (:func:`recurjac_scale.kernels.prep_level` adds the correction for the residual
``max(0, -L) <= slack``); the correction is counted in ``a_t`` above and, as a term dominated by ``kappa |x|``, in
the accumulation bound ``gT``.
"""

from __future__ import annotations

import numpy as np

from .._fp import gamma, underflow_unit
from .chain import LevelMatrix

__all__ = [
    "SLACK",
    "PROP",
    "widening",
    "underflow_allowance",
    "widen_outward",
    "sign_slack",
    "kappa",
    "column_abs_sums",
    "abs_col_sums",
    "level_coefficients",
    "step_widening",
    "rounding_share",
]

SLACK = 2.0
"""Sign-slack factor: a bound is classed by sign with slack ``SLACK * allowance`` (module docstring)."""

PROP = 1.0 + SLACK
"""Weight of a prior's allowance in the allowance of a step that reads it (Term I plus the slack correction)."""


def widening(chain, t: int, mag: np.ndarray, n: int | None = None) -> np.ndarray:
    """``gamma(N) * mag * (1 + gamma) + tiny``: the allowance of a computation whose terms are dominated by ``mag``
    (shape of ``mag``), with ``N = N_t`` (:meth:`Chain.rounding_length`) unless a local summation length ``n`` is
    given; without ``n`` the :func:`underflow_allowance` of step ``t`` is added."""
    local = n is not None
    n = chain.rounding_length(t) if n is None else int(n)
    g = gamma(n, chain.dtype)
    tiny = np.finfo(chain.dtype).tiny * n
    if not local:
        tiny = tiny + underflow_allowance(chain, t)
    with np.errstate(over="ignore", invalid="ignore"):
        return (g * (1.0 + g)) * mag + tiny


def abs_col_sums(V: np.ndarray, dtype, rows=None, weights=None) -> np.ndarray:
    """``sum_i w_i |V[rows_i, :]|`` of a dense ``(d, c)`` panel (default: every row, weights 1), rounded up
    (``(1 + gamma(n))``), shape ``(c,)``; each column summed in row order
    (:func:`recurjac_scale.kernels.abs_col_sums`), so the result does not depend on the blocking."""
    from .. import kernels

    dtype = np.dtype(dtype)
    rows = np.arange(V.shape[0], dtype=np.int64) if rows is None else np.ascontiguousarray(rows, dtype=np.int64)
    w = np.ones(rows.size, dtype=dtype) if weights is None else np.ascontiguousarray(weights, dtype=dtype)
    s = np.empty(V.shape[1], dtype=dtype)
    with np.errstate(over="ignore", invalid="ignore"):
        kernels.abs_col_sums(np.asarray(V, dtype=dtype), rows, w, s)
        return s * dtype.type(1.0 + gamma(rows.size + 1, dtype))


def column_abs_sums(chain, s: int) -> np.ndarray:
    """``colsum |M_s|`` (shape ``(d_{s+1},)``, rounded up) of the chain matrix ``M_s`` (``s >= 1``: ``mats[s - 1]``;
    ``s = 0``: the top).  Chain-only: computed once per process (:meth:`Chain.memo`)."""
    memo = chain.memo()
    cache = memo.setdefault("column_abs_sums", {})
    if s not in cache:
        m = chain.top if s == 0 else chain.mats[s - 1]
        if isinstance(m, LevelMatrix):  # streamed from the store: one row panel at a time
            n_rows, n_cols = (int(x) for x in m.shape)
            acc = np.zeros(n_cols)
            step = max(1, int(m.panel_rows()))
            for r0 in range(0, n_rows, step):
                acc += np.abs(np.asarray(m[r0 : min(n_rows, r0 + step), :], dtype=np.float64)).sum(axis=0)
            out = acc * (1.0 + gamma(max(1, n_rows)))
        else:
            sm = chain.sparse_mats[s - 1] if (s >= 1 and chain.sparse_mats) else None
            a = sm if sm is not None else np.asarray(m if not hasattr(m, "compute") else m.compute())
            out = np.asarray(abs(a).sum(axis=0), dtype=np.float64).reshape(-1) * (1.0 + gamma(max(1, a.shape[0])))
        cache[s] = np.asarray(out, dtype=chain.dtype)
    return cache[s]


def kappa(chain, s: int, prior: dict, cols=None) -> np.ndarray:
    """``D(du_s) max(|L_{s-1}|, |U_{s-1}|)`` restricted to the neurons ``cols`` of level ``s``, shape
    ``(R_blk, |cols|)``: a bound of ``|P_{s-1}[j, r] sigma'_r|`` from the certified state ``prior`` of step
    ``s - 1`` (``s = 1``: the top state, exact)."""
    dt = np.dtype(chain.dtype)
    L = np.asarray(prior["lower"], dtype=dt)
    U = np.asarray(prior["upper"], dtype=dt)
    du = chain.du[s - 1]
    if cols is not None:
        L, U, du = L[:, cols], U[:, cols], du[cols]
    with np.errstate(over="ignore", invalid="ignore"):
        return np.maximum(np.abs(L), np.abs(U)) * du[None, :]


def level_coefficients(chain, t: int, s: int, priors, alive: np.ndarray, *, unstable_only: bool = False):
    """Per-entry coefficients of level ``s`` of step ``t`` for the preparation kernels, each ``(R_blk, |alive|)``:
    ``(local, prop)`` with ``local = gT kappa_s + gG du_s q_{s-1} colsum_{s-1}`` and ``prop = PROP du_s a_{s-1}`` on
    the unstable neurons (0 elsewhere); the kernels add ``local |x|`` to the widening and ``prop |x|`` to the
    allowance (module docstring).  ``s = 1`` (the top): ``local = gT kappa_1``, no prop.  ``unstable_only``: the
    shared variant, whose stable-neuron and operand errors are bounded separately (``local = gT kappa_s``)."""
    dt = np.dtype(chain.dtype)
    gT = dt.type(gamma(chain.rounding_length(t), dt))
    kap = kappa(chain, s, priors[s - 1], alive)
    with np.errstate(over="ignore", invalid="ignore"):
        local = gT * kap
        if s >= 2 and not unstable_only:
            q = row_max(kappa(chain, s - 1, priors[s - 2]))
            gG = dt.type(gamma(chain.widths[s - 1] + 3, dt))
            colw = (column_abs_sums(chain, s - 1)[alive] * chain.du[s - 1][alive]).astype(dt)
            local = local + (gG * q)[:, None] * colw[None, :]
        if s >= 2:
            unst = (chain.dl[s - 1][alive] < chain.du[s - 1][alive]).astype(dt)
            a = np.asarray(priors[s - 1]["allowance"], dtype=dt)[:, alive]
            prop = a * (dt.type(PROP) * chain.du[s - 1][alive] * unst)[None, :]
        else:
            prop = np.zeros_like(local)
    return np.ascontiguousarray(local), np.ascontiguousarray(prop)


def row_max(a: np.ndarray) -> np.ndarray:
    """``max_r a[j, r]`` per row (0 for an empty row), shape ``(R,)``."""
    if a.shape[1] == 0:
        return np.zeros(a.shape[0], dtype=a.dtype)
    return a.max(axis=1)


def step_widening(chain, t: int, err: np.ndarray) -> np.ndarray:
    """The widening ``w_t = e_t (1 + gT) + N_t tiny + underflow_allowance`` of a RecurJac step from its accumulated
    error bound ``e_t`` (any shape)."""
    dt = np.dtype(chain.dtype)
    gT = gamma(chain.rounding_length(t), dt)
    n = chain.rounding_length(t)
    with np.errstate(over="ignore", invalid="ignore"):
        return err * dt.type(1.0 + gT) + dt.type(np.finfo(dt).tiny * n + underflow_allowance(chain, t))


def _abs_sum_bound(m) -> float:
    """An upper bound of ``max(max row sum, max column sum)`` of ``|m|`` (float64, rounded up)."""
    if isinstance(m, LevelMatrix):  # a streamed matrix (network.store_matrix.StoreMatrix): one row panel at a time
        n_rows, n_cols = (int(x) for x in m.shape)
        if n_rows == 0 or n_cols == 0:
            return 0.0
        step = max(1, int(m.panel_rows()))
        rmax, csum = 0.0, np.zeros(n_cols)
        with np.errstate(over="ignore"):
            for r0 in range(0, n_rows, step):
                a = np.abs(np.asarray(m[r0 : min(n_rows, r0 + step), :], dtype=np.float64))
                rmax = max(rmax, float(a.sum(axis=1).max()))
                csum += a.sum(axis=0)
            r = max(rmax, float(csum.max()))
        return r * (1.0 + gamma(max(n_rows, n_cols)))
    a = np.abs(np.asarray(m.compute() if hasattr(m, "compute") and not isinstance(m, np.ndarray) else m,
                          dtype=np.float64))
    if a.size == 0:
        return 0.0
    with np.errstate(over="ignore"):
        r = max(float(a.sum(axis=1).max()), float(a.sum(axis=0).max()))
    return r * (1.0 + gamma(max(a.shape)))


def underflow_allowance(chain, t: int) -> float:
    """Absolute allowance for underflow in step ``t`` of the recursion: ``2 eta Lambda_t N_t^2``.

    ``eta`` (:func:`recurjac_scale._fp.underflow_unit`) bounds the error of one multiplication whose result
    underflows (additions are exact then).  Every value a step computes is built from products of entries of
    ``M_0, ..., M_t``, of derivative bounds ``<= du`` and of earlier bounds (which are themselves dominated by
    such products), so the error of one underflow reaching an output entry is multiplied by at most
    ``Lambda_t = prod_{s<=t} max(1, ||M_s||) * prod_{s<=t} max(1, max du_s)``, with ``||M||`` the larger of the
    largest absolute row and column sums (every factor applied after the underflow, including the weights
    ``kappa`` of the running allowance, is dominated by a sub-product of the chain).  A path of the recursion has
    at most ``N_t`` multiplications per level entry and the shared variant's products have length
    ``<= sum d <= N_t``, so ``N_t^2`` bounds the number of underflows that reach one entry.  Chain-only: computed
    once per process (:meth:`Chain.memo`).  For a network of ordinary scale this is negligible (e.g. ``1e-280`` on
    the paper's CIFAR shape); it matters only where partial products fall below the smallest normal number
    (weights like ``1e-170``).
    """
    memo = chain.memo()
    norms = memo.get("abs_sum_bounds")
    if norms is None:
        norms = (_abs_sum_bound(chain.top), *(_abs_sum_bound(m) for m in chain.mats))
        memo["abs_sum_bounds"] = norms
    lam = 1.0
    for s in range(t + 1):
        lam *= max(1.0, norms[s])
    for s in range(t):
        du = chain.du[s]
        lam *= max(1.0, float(np.max(du)) if du.size else 0.0)
    n = chain.rounding_length(t)
    return 2.0 * underflow_unit(chain.dtype) * lam * float(n) * float(n)


def widen_outward(lower: np.ndarray, upper: np.ndarray, w_lower, w_upper=None) -> tuple[np.ndarray, np.ndarray]:
    """``(lower - w_lower, upper + w_upper)`` (``w_upper = w_lower`` when not given); a NaN (only possible after an
    overflow) becomes ``-inf`` / ``+inf``, which keeps the bounds sound."""
    if w_upper is None:
        w_upper = w_lower
    with np.errstate(invalid="ignore", over="ignore"):
        lo = lower - w_lower
        hi = upper + w_upper
    if np.isnan(lo).any() or np.isnan(hi).any():
        lo = np.where(np.isnan(lo), -np.inf, lo)
        hi = np.where(np.isnan(hi), np.inf, hi)
    return lo, hi


def sign_slack(allowance: np.ndarray, dtype=None) -> np.ndarray:
    """The slack ``SLACK * allowance`` with which a prior's bounds are classed by sign at a later step
    (:func:`recurjac_scale.kernels.prep_level`), same shape as ``allowance`` (module docstring: an exact bound
    ``>= 0`` is stored as ``>= -allowance``)."""
    a = np.asarray(allowance, dtype=dtype)
    with np.errstate(over="ignore"):
        return np.ascontiguousarray(a * a.dtype.type(SLACK))


def rounding_share(lower: np.ndarray, upper: np.ndarray, allowance: np.ndarray) -> float:
    """The share of the bound width that certification may cost: ``max over entries of allowance / width`` (entries
    of zero width count with an allowance of zero; ``inf`` when an entry of zero width has a positive
    allowance, ``0.0`` for an empty result)."""
    a = np.asarray(allowance, dtype=np.float64)
    w = np.asarray(upper, dtype=np.float64) - np.asarray(lower, dtype=np.float64)
    if a.size == 0:
        return 0.0
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(a > 0, a / w, 0.0)
    r = np.where(np.isnan(r), np.inf, r)
    return float(np.max(r))
