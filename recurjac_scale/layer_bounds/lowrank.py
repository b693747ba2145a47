"""Back-substitution chains carried as one shared chain plus low-rank corrections (float64).

The chains of a block of target neurons (CROWN's upper and lower chains, Fast-Lin's chain) relax every layer with
their own lines, but on most neurons those lines coincide: a stable active ReLU neuron is ``h = z`` (slope 1,
intercept 0) in every chain, a neuron dead in every chain is the zero line.  Call those neurons *shared* (``S_j``,
slope 1) and *void*; the others are *unstable* (``U_j``: unstable in some chain, or stable in one chain and
unstable in another).  Then chain ``c`` holds, at level ``j`` (coefficients on ``h(j)``),

    X_c(j) = sigma_c B(j) + P_c Q(j)

with ``B`` one shared base chain (``B(t-1) = W[t][R, :]``, ``B(j-1) = B(j)[:, S_j] W[j][S_j, :]``: the chain in
which every unstable neuron is cut), ``sigma_c = +-1`` per row (CROWN's lower chain starts from ``-W``), ``Q(j)``
the rows ``W[m][U_m, :]`` of the unstable neurons of the layers ``m > j`` pushed down through the shared neurons
(``Q(j-1) = [Q(j)[:, S_j] W[j][S_j, :]; W[j][U_j, :]]``, common to every chain and every block of rows) and
``P_c`` the chain's own relaxed coefficients of those unstable neurons (``P_c <- [P_c, Z_c]``,
``Z_c = relax_c(X_c(j)[:, U_j])``).  Only the ``|U_j|`` columns where the chains differ are ever formed per chain,
so when few neurons are unstable every chain after the first costs ``rows x rank x |U_j|`` instead of a GEMM
through every layer.  :func:`plan` counts the flops of both ways and picks this one only when it is cheaper.

Certification (all sums and products in float64; ``gamma`` is :func:`recurjac_scale._fp.gamma`).  As in
:mod:`~recurjac_scale.layer_bounds.backsub`, a chain is exact for the matrix it holds and every step charges the
error of the matrix it passes on, bounded against the magnitude of the variable it multiplies.  The matrix held
at level ``j`` is the exact real value of ``sigma B(j) + P Q(j)`` built from the floating-point factors on the
shared columns, and the rounded ``V = fl(sigma B(j)[:, U] + fl(P Q(j)[:, U]))`` on the unstable ones, so:

* forming ``V``: ``|V - X[:, U]| <= gamma(rho + 1) (|P| |Q(j)[:, U]| + |V|)`` elementwise, charged against
  ``hmax(j)[U]``;
* relaxation on ``U``: the fused kernel (:func:`~recurjac_scale.layer_bounds.fused._relax_rows`) with the same
  intercept, relaxation and affine allowances as the other engines; on ``S`` the relaxation is the identity, exact;
* affine step: ``Z W[j][U, :]`` is held exactly (it is the new block of ``P Q``); the two GEMMs ``B(j)[:, S]
  W[j][S, :]`` and ``Q(j)[:, S] W[j][S, :]`` and the bias dot products (``m`` terms: ``|S|``, or the held columns
  with the weight rows of ``U`` set to zero, see :data:`ZEROED_MAX`; then ``P`` times a vector, ``rho`` terms) err
  by at most ``gamma(m + rho + 2) (|B(j)[:, S]| + |P| |Q(j)[:, S]|) (|W[j][S]| hmax(j-1) + |b[j][S]|)`` (the
  classical bound of a dot product by its length; the other engines use ``max(n_j, n_{j-1})`` as a floor);
* at the input, ``M = fl(sigma B(-1) + fl(P Q(-1)))`` with the ``V`` allowance against ``|x| <= xmax``, then the
  concretisation of the other engines; the running intercept sum gets ``gamma(4 t + 8)`` (four terms per level);
* underflow: the per-step allowance of the other engines, plus ``eta`` per product of the two extra GEMMs and of
  ``P Q``, amplified by the row sums of ``|P|`` and the sums of ``hmax``.

Bounds agree with the other engines up to the order of summation and these allowances (the relaxation allowance
of the shared, exact, columns is not charged, so they are never looser for that part).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .._fp import gamma, underflow_unit
from .base import Region
from .fused import _Chain, _relax_rows, affine_gamma

__all__ = ["LowRankPlan", "plan", "lowrank_block_bounds"]

MIN_SAVING = 0.8
"""Use the low-rank chains only when their flop count is below this fraction of the fused engine's."""


ZEROED_MAX = 0.1
"""When the unstable neurons are at most this fraction of a level's held columns, the shared GEMMs run on all held
columns against the weight rows of the unstable ones set to zero (no copy of the coefficient columns); above it,
on a copy of the shared columns."""


@dataclass(frozen=True)
class _Level:
    """Layout of level ``j`` (coefficients on ``h(j)``) for a set of variants: shared neurons ``S``, unstable ``U``,
    held columns ``cols`` (``S | U``, sorted), their positions ``s_pos``, ``u_pos`` in ``cols``; ``w_b``: the
    weights the shared GEMMs multiply (``W[j][cols][:, cols_in]`` with the rows of ``U`` zeroed when ``zeroed``,
    else ``W[j][S][:, cols_in]``), ``w_u = W[j][U][:, cols_in]``, ``mask`` (1 on ``S``, 0 on ``U``, over
    ``cols``) when ``zeroed``."""

    S: np.ndarray
    U: np.ndarray
    cols: np.ndarray
    s_pos: np.ndarray
    u_pos: np.ndarray
    zeroed: bool
    w_b: np.ndarray
    w_u: np.ndarray
    mask: np.ndarray | None
    cols_in: np.ndarray

    def shared_cols(self, m: np.ndarray) -> np.ndarray:
        """The columns of ``m`` (held columns) that the shared GEMMs read."""
        return m if self.zeroed else m[:, self.s_pos]

    def shared_vec(self, v: np.ndarray) -> np.ndarray:
        """A vector over the neurons of layer ``j`` restricted like :meth:`shared_cols` (zero on ``U``)."""
        return v[self.cols] * self.mask if self.zeroed else v[self.S]


def _layout(j: int, variants) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    Ls = [layers[j] for layers, _ in variants]
    shared = np.ones(Ls[0].a_up.size, bool)
    void = np.ones(Ls[0].a_up.size, bool)
    for L in Ls:
        shared &= (L.a_up == 1.0) & (L.a_low == 1.0) & (L.b_up == 0.0) & (L.b_low == 0.0)
        void &= (L.a_up == 0.0) & (L.a_low == 0.0) & (L.b_up == 0.0) & (L.b_low == 0.0)
    return np.flatnonzero(shared), np.flatnonzero(~shared & ~void), np.flatnonzero(~void)


def _level(j: int, variants, wd, cache: dict) -> _Level:
    """The layout of level ``j`` (cached: the layers of every variant are final once bounded)."""
    key = (j, tuple(id(layers[j]) for layers, _ in variants),
           tuple(id(layers[j - 1]) for layers, _ in variants) if j else ())
    if key not in cache:
        S, U, cols = _layout(j, variants)
        cols_in = _layout(j - 1, variants)[2] if j else np.arange(wd[0].shape[1])
        zeroed = U.size <= ZEROED_MAX * cols.size
        w = wd[j]
        if zeroed:
            w_b = np.array(w[np.ix_(cols, cols_in)])
            u_pos = np.searchsorted(cols, U)
            w_b[u_pos] = 0.0
            mask = np.ones(cols.size)
            mask[u_pos] = 0.0
        else:
            w_b, mask = w[np.ix_(S, cols_in)], None
        cache[key] = _Level(S, U, cols, np.searchsorted(cols, S), np.searchsorted(cols, U), zeroed, w_b,
                            w[np.ix_(U, cols_in)], mask, cols_in)
    return cache[key]


@dataclass
class LowRankPlan:
    """The levels ``j = 0 .. t-1`` of a target layer ``t`` (:class:`_Level`), the rank of the correction at each
    level (``rank[j]`` rows of ``Q(j)``; ``rank[-1]`` at the input) and the factors ``Q(j)``, built on first use and
    shared by every block of rows of the target."""

    t: int
    levels: dict
    n_in: int
    rank: dict
    q: dict = field(default_factory=dict)

    def q_at(self, j: int) -> np.ndarray:
        """``Q(j)``: shape (rank[j], number of held columns of level ``j``; every input for ``j = -1``)."""
        if j == self.t - 1:
            return np.zeros((0, self.levels[j].cols.size))
        if j not in self.q:
            up, lv = self.q_at(j + 1), self.levels[j + 1]
            parts = [lv.shared_cols(up) @ lv.w_b] if up.shape[0] else []
            parts.append(lv.w_u)
            self.q[j] = np.concatenate(parts) if len(parts) > 1 else np.ascontiguousarray(parts[0])
        return self.q[j]


def plan(t: int, variants, wd, n_rows: int, block_rows: int, force: bool = False,
         cache: dict | None = None) -> LowRankPlan | None:
    """The low-rank layout of target layer ``t`` for the given variants (all finite, float64), or ``None`` when
    the fused engine needs fewer flops (unless ``force``) or when the factor ``Q`` at the input would be larger
    than the largest weight matrix.  ``cache``: a dict kept across the target layers of one computation (the
    level layouts and weight copies are reused)."""
    cache = {} if cache is None else cache
    lay = {j: _layout(j, variants) for j in range(t)}  # (S, U, cols) per level
    n0 = wd[0].shape[1]
    n_held = {j: lay[j][2].size for j in range(t)}
    n_held[-1] = n0
    blocks = -(-n_rows // block_rows)
    r = min(block_rows, n_rows)
    rows_c = [r if all(L.linear for L in layers[:t]) else 2 * r for layers, _ in variants]
    # flops of the fused engine (per block): every chain through every layer on its kept neurons, except the
    # first affine step, which it already shares on the neurons that are shared here
    S_top, U_top = lay[t - 1][0].size, lay[t - 1][1].size
    dense = r * S_top * n_held[t - 2]
    for (layers, _), rc in zip(variants, rows_c):
        dense += rc * U_top * (n0 if t == 1 else layers[t - 2].kept.size)
        for j in range(t - 1):
            dense += rc * layers[j].active.size * (n0 if j == 0 else layers[j - 1].kept.size)
    # flops of the low-rank chains (per block; the factor Q once per target, spread over its blocks)
    low, rho, rank = 0.0, 0, {}
    for j in range(t - 1, -1, -1):
        S, U, cols = lay[j]
        rank[j] = rho
        n_shared = S.size if U.size > ZEROED_MAX * cols.size else cols.size
        low += (r + rho / blocks) * n_shared * n_held[j - 1] + sum(rows_c) * rho * U.size
        rho += U.size
    rank[-1] = rho
    low += sum(rows_c) * rho * n0
    widest = max(w.size for w in wd[: t + 1])
    if (low > MIN_SAVING * dense and not force) or rho * n0 > widest:
        return None
    levels = {j: _level(j, variants, wd, cache) for j in range(t)}
    return LowRankPlan(t, levels, n0, rank)


def lowrank_block_bounds(pl: LowRankPlan, w_rows, b_rows, wd, bs, variants, region: Region, concretise):
    """Certified (upper, lower) bounds of ``z(t)[R]`` for every variant, as
    :func:`~recurjac_scale.layer_bounds.fused.block_bounds` (same arguments, float64 only) but with the chains
    carried as a shared base chain plus low-rank corrections (module docstring).

    Returns
    -------
    list of (upper, lower), each ndarray of shape (r,), float64, certified
    """
    t = pl.t
    r = w_rows.shape[0]
    eta = underflow_unit(np.float64)
    lo_box, hi_box = region.box
    xmax = np.maximum(np.abs(lo_box), np.abs(hi_box))
    chains, P = [], []
    for layers, _ in variants:
        both = all(L.linear for L in layers[:t])
        chains.append(_Chain(np.empty((r if both else 2 * r, 0)), b_rows if both else np.concatenate(
            [b_rows, -b_rows]), both))
        P.append(None)

    def signed(ch, m):
        """The base's contribution to a chain's rows: ``m`` (rows of the base) for a chain of one sign, ``[m; -m]``
        for CROWN's stacked upper and lower chains."""
        return m if ch.both else np.concatenate([m, -m])

    def add_slack(ch, v):
        ch.slack_up += v
        if ch.both:
            ch.slack_lo += v

    def add_term(ch, v):
        ch.c_up += v
        ch.cabs_up += np.abs(v)
        if ch.both:
            ch.c_lo -= v
            ch.cabs_lo += np.abs(v)

    base = np.ascontiguousarray(w_rows[:, pl.levels[t - 1].cols])
    for j in range(t - 1, -1, -1):
        lv = pl.levels[j]
        U = lv.U
        Q = pl.q_at(j)
        rho = Q.shape[0]
        n_j, n_in = wd[j].shape
        g_k = gamma(n_j + 2)
        g_a = affine_gamma(n_in, n_j, np.float64)
        g_s = gamma(lv.w_b.shape[0] + rho + 2)  # dot products of length <= rows of w_b, then of length rho
        g_v = gamma(rho + 1)
        base_s = lv.shared_cols(base)
        q_s = lv.shared_cols(Q) if rho else None
        b_s = lv.shared_vec(bs[j])
        base_bias = base_s @ b_s
        base_u = base[:, lv.u_pos] if U.size else None
        for i, ((layers, aff), ch) in enumerate(zip(variants, chains)):
            L = layers[j]
            # unstable columns: form them, relax them with the chain's own lines (fused kernel)
            if U.size:
                V = signed(ch, base_u)
                if rho:
                    qu = Q[:, lv.u_pos]
                    V = V + P[i] @ qu
                    hu = L.hmax[U]
                    absP = np.abs(P[i])
                    add_slack(ch, g_v * (absP @ (np.abs(qu) @ hu) + np.abs(V) @ hu)
                              + eta * (rho + 2) * float(np.sum(hu)) * (1.0 + absP.sum(axis=1)))
                V = np.ascontiguousarray(V)
                Z = np.empty_like(V)
                sums = np.empty((V.shape[0], 6))
                vec = [np.ascontiguousarray(v[U]) for v in (L.a_up, L.a_low, L.b_up, L.b_low, L.relax_err_up,
                                                            L.relax_err_low)]
                _relax_rows(V, np.arange(U.size), *vec, np.ascontiguousarray(bs[j][U]),
                            np.ascontiguousarray(aff[j][U]), Z, sums)
                ch.c_up += sums[:, 0]
                ch.cabs_up += np.abs(sums[:, 0])
                ch.c_up += sums[:, 4]
                ch.cabs_up += np.abs(sums[:, 4])
                ch.slack_up += g_k * sums[:, 1] + g_a * sums[:, 5]
                if ch.both:
                    ch.c_lo += sums[:, 2]
                    ch.cabs_lo += np.abs(sums[:, 2])
                    ch.c_lo -= sums[:, 4]
                    ch.cabs_lo += np.abs(sums[:, 4])
                    ch.slack_lo += g_k * sums[:, 3] + g_a * sums[:, 5]
                P[i] = Z if P[i] is None else np.concatenate([P[i], Z], axis=1)
            add_slack(ch, L.underflow_err)
            # shared columns: identity relaxation (exact); bias terms and the affine allowance of the two GEMMs
            if lv.S.size:
                aff_s = lv.shared_vec(aff[j])
                add_term(ch, signed(ch, base_bias))
                mag = signed(ch, np.abs(base_s) @ aff_s)
                if rho:
                    Pold = P[i][:, :rho]
                    absP = np.abs(Pold)
                    add_term(ch, Pold @ (q_s @ b_s))
                    mag = np.abs(mag) + absP @ (np.abs(q_s) @ aff_s)
                    # underflow in the GEMM Q(j)[:, S] W[j][S, :], amplified by |P|
                    hin = float(np.sum(xmax if j == 0 else layers[j - 1].hmax[lv.cols_in]))
                    add_slack(ch, eta * (lv.S.size + 2) * hin * absP.sum(axis=1))
                add_slack(ch, g_s * np.abs(mag))
        # affine step: the shared base GEMM (the chains' new corrections are the new columns of P)
        base = base_s @ lv.w_b if lv.S.size else np.zeros((r, lv.cols_in.size))
    # at the input: form every chain's coefficients and concretise them
    Q = pl.q_at(-1)
    rho = Q.shape[0]
    out = []
    for i, ((layers, aff), ch) in enumerate(zip(variants, chains)):
        if ch.both:
            M = base + P[i] @ Q if rho else base
        else:
            M = np.empty((2 * r, base.shape[1]))
            if rho:
                np.matmul(P[i], Q, out=M)
                M[:r] += base
                M[r:] -= base
            else:
                M[:r] = base
                np.negative(base, out=M[r:])
        if rho:
            absP = np.abs(P[i])
            add_slack(ch, gamma(rho + 1) * (absP @ (np.abs(Q) @ xmax) + np.abs(M) @ xmax)
                      + eta * (rho + 2) * float(np.sum(xmax)) * (1.0 + absP.sum(axis=1)))
        ch.lam = M
        out.append(ch.finish(t, region, np.float64, concretise, g_c=gamma(4 * t + 8)))
    return out
