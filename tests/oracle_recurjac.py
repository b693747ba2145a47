"""A plain numpy transcription of ALGORITHM.md (RecurJac-B, F0, F1 and Fast-Lip), written for clarity, not speed.

This is the test oracle: the project's kernels must equal it up to their rounding allowance, never looser.  It
follows the page line by line, in its notation, with no blocking, no sharing across rows, no masks of dead
neurons and no rounding allowance (plain float64):

- a *chain* is ``P = A Σ_1 M_1 Σ_2 ... Σ_T M_T`` with the exact top ``A`` (``R x d_1``) and derivative bounds
  ``dl_t <= σ'_t <= du_t``;  ``P_t = A Σ_1 M_1 ... Σ_t M_t``;
- ``bound(t, V)`` bounds ``P_{t-1} Σ_t V`` (Algorithm 1, ComputeLU): at ``t = 1`` the exact top (Eq. 10-11);
  below, per output row ``j``, the sets ``I_j``, ``P_j``, ``N_j``, ``E_j`` from the known bounds of ``P_{t-1}``,
  Term I on ``I_j`` (Eq. 14-15) and Term II (Eq. 17-18) by one recursive call per row with the merged weights
  ``Ŵ(j)`` (upper) or ``W̃(j)`` (lower);
- the driver sets the bounds of ``P_t`` to ``bound(t, M_t)`` for ``t = 1..T``.

Backward (B): ``A = C W(H)``, ``M_t = W(H - t)``, ``Σ_t`` = hidden layer ``H - t``.  F0: the transposed chain,
``A = W(1)ᵀ``, ``M_t = W(t + 1)ᵀ`` (the last one ``(C W(H))ᵀ``), ``Σ_t`` = hidden layer ``t``; the result is
transposed.  F1: F0 on the sub-network from ``h(1)``, then per neuron of layer 1 the hull of ``[L, U] [dl, du]``
times ``W(1)`` in midpoint-radius form.  Fast-Lip: ``P_t = hull(P_{t-1} [dl_t, du_t]) M_t`` in midpoint-radius
form, from the exact top.
"""

from __future__ import annotations

import numpy as np

__all__ = ["oracle_bounds", "oracle_chain", "magnitude_chain", "ORACLE_METHODS"]


def _fold(C, W) -> np.ndarray:
    """``C @ W`` rounded once per entry from the exact sum (rational arithmetic): the "exact top" ``A = C W(H)``.
    A plain product of a general output matrix can lose far more than one ulp to cancellation, which no rounding
    allowance relative to ``|C W(H)|`` covers; the package folds its output layer correctly rounded too."""
    from fractions import Fraction

    C = np.asarray(C, dtype=np.float64)
    W = np.asarray(W, dtype=np.float64)
    out = np.empty((C.shape[0], W.shape[1]))
    Cf = [[Fraction(float(v)) for v in row] for row in C]
    Wf = [[Fraction(float(v)) for v in row] for row in W]
    for i, crow in enumerate(Cf):
        for j in range(W.shape[1]):
            out[i, j] = float(sum((c * Wf[k][j] for k, c in enumerate(crow) if c), Fraction(0)))
    return out


def _pos(a):
    return np.maximum(a, 0.0)


def _neg(a):
    return np.minimum(a, 0.0)


class _Chain:
    """``A`` (R, d_1), ``mats[t-1] = M_t`` (d_t, d_{t+1}), ``dl[t-1], du[t-1]`` (d_t,) for t = 1..T."""

    def __init__(self, A, mats, dl, du):
        self.A = np.asarray(A, dtype=np.float64)
        self.mats = [np.asarray(m, dtype=np.float64) for m in mats]
        self.dl = [np.asarray(d, dtype=np.float64) for d in dl]
        self.du = [np.asarray(d, dtype=np.float64) for d in du]
        self.T = len(self.mats)
        self.LB = [self.A]  # LB[t], UB[t]: bounds of P_t, (R, d_{t+1})
        self.UB = [self.A]

    def bound_row(self, t: int, j: int, V: np.ndarray, upper: bool) -> np.ndarray:
        """Row ``j`` of the upper (or lower) bound of ``P_{t-1} Σ_t V``, shape (c,)."""
        dl, du = self.dl[t - 1], self.du[t - 1]
        if t == 1:  # top: Y = A exact (Eq. 10-11)
            a = self.A[j]
            ap, an = _pos(a), _neg(a)
            Vp, Vn = _pos(V), _neg(V)
            if upper:
                return (ap * du) @ Vp + (an * du) @ Vn + (ap * dl) @ Vn + (an * dl) @ Vp
            return (ap * dl) @ Vp + (an * dl) @ Vn + (ap * du) @ Vn + (an * du) @ Vp
        Lm, Um = self.LB[t - 1][j], self.UB[t - 1][j]  # bounds of Y = P_{t-1}[j], shape (d_t,)
        I = (Lm < 0) & (Um > 0) & (dl < du)
        P = Lm >= 0
        N = (Um <= 0) & ~P
        E = ~I & ~P & ~N  # dl == du: expanded whatever the sign of Y; counted in p (moot, dl == du)
        p = (P | E).astype(np.float64)
        n = N.astype(np.float64)
        MI = I.astype(np.float64)
        Vp, Vn = _pos(V), _neg(V)
        # Term I (Eq. 14-15)
        if upper:
            term1 = (MI * Um * du) @ Vp + (MI * Lm * du) @ Vn
        else:
            term1 = (MI * Lm * du) @ Vp + (MI * Um * du) @ Vn
        # Term II (Eq. 17-18): merged weights through M_{t-1} (shape (d_{t-1}, d_t))
        M = self.mats[t - 2]
        if upper:
            W = M @ ((p * du + n * dl)[:, None] * Vp + (p * dl + n * du)[:, None] * Vn)
        else:
            W = M @ ((p * dl + n * du)[:, None] * Vp + (p * du + n * dl)[:, None] * Vn)
        return term1 + self.bound_row(t - 1, j, W, upper)

    def bound(self, t: int, V: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        R = self.A.shape[0]
        L = np.stack([self.bound_row(t, j, V, False) for j in range(R)]) if R else np.zeros((0, V.shape[1]))
        U = np.stack([self.bound_row(t, j, V, True) for j in range(R)]) if R else np.zeros((0, V.shape[1]))
        return L, U

    def run(self) -> tuple[np.ndarray, np.ndarray]:
        for t in range(1, self.T + 1):
            L, U = self.bound(t, self.mats[t - 1])
            self.LB.append(L)
            self.UB.append(U)
        return self.LB[-1], self.UB[-1]

    def run_fastlip(self) -> tuple[np.ndarray, np.ndarray]:
        L, U = self.A, self.A
        for t in range(1, self.T + 1):
            dl, du = self.dl[t - 1], self.du[t - 1]
            zl = np.where(L >= 0, L * dl, L * du)
            zu = np.where(U >= 0, U * du, U * dl)
            mid, rad = 0.5 * (zl + zu), 0.5 * (zu - zl)
            M = self.mats[t - 1]
            L, U = mid @ M - rad @ np.abs(M), mid @ M + rad @ np.abs(M)
        return L, U


def oracle_chain(method: str, weights, C, db):
    """The chain of ``method`` for weights ``weights[k]`` (shape (n_{k+1}, n_k)), output selection ``C`` (m, n_H)
    and hidden-layer derivative bounds ``db[k] = (dl, du)`` of ``h(k+1)``.  Returns ``_Chain`` (for F1 without its
    finish)."""
    H = len(weights)
    WC = [np.asarray(w, dtype=np.float64) for w in weights[:-1]] + [_fold(C, weights[-1])]
    if method in ("recurjac-b", "fastlip"):
        mats = [WC[H - 1 - t] for t in range(1, H)]
        ds = [db[H - 1 - t] for t in range(1, H)]
        return _Chain(WC[H - 1], mats, [d[0] for d in ds], [d[1] for d in ds])
    if method == "recurjac-f0":
        return _Chain(WC[0].T, [WC[t].T for t in range(1, H)], [d[0] for d in db], [d[1] for d in db])
    if method == "recurjac-f1":
        return _Chain(WC[1].T, [WC[t].T for t in range(2, H)], [d[0] for d in db[1:]], [d[1] for d in db[1:]])
    raise ValueError(method)


def oracle_bounds(method: str, weights, C, db) -> tuple[np.ndarray, np.ndarray]:
    """Bounds ``(lower, upper)`` of the Jacobian of ``C f``, shape (m, n_0), by the plain transcription."""
    weights = [np.asarray(w, dtype=np.float64) for w in weights]
    H = len(weights)
    if H == 1:
        J = _fold(C, weights[0])
        return J, J.copy()
    if method == "recurjac-f1" and H == 2:
        Y = _fold(C, weights[1]).T  # (n_1, m): ∂f/∂h(1) exact
        L, U = Y, Y
    else:
        ch = oracle_chain(method, weights, C, db)
        L, U = ch.run_fastlip() if method == "fastlip" else ch.run()
    if method in ("recurjac-b", "fastlip"):
        return L, U
    if method == "recurjac-f0":
        return L.T, U.T
    # F1 finish: per neuron r of layer 1, hull([L_r, U_r] [dl_r, du_r]) (rows r of the (n_1, m) bounds), then W(1)
    dl, du = db[0]
    zl = np.where(L >= 0, L * dl[:, None], L * du[:, None])
    zu = np.where(U >= 0, U * du[:, None], U * dl[:, None])
    mid, rad = 0.5 * (zl + zu), 0.5 * (zu - zl)
    W1 = weights[0]
    return (mid.T @ W1 - rad.T @ np.abs(W1)), (mid.T @ W1 + rad.T @ np.abs(W1))


def magnitude_chain(weights, C, db) -> np.ndarray:
    """``|C W(H)| D(du) |W(H-1)| ... D(du) |W(1)|``, shape (m, n_0): dominates every partial sum of every method
    (the scale of their rounding allowances)."""
    M = np.abs(_fold(C, weights[-1]))
    for k in range(len(weights) - 2, -1, -1):
        M = (M * db[k][1][None, :]) @ np.abs(weights[k])
    return M


ORACLE_METHODS = ("recurjac-b", "recurjac-f0", "recurjac-f1", "fastlip")
