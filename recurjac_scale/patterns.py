"""Activation patterns of small ReLU / leaky-ReLU networks with one output row: the gradient and the affine
pre-activation maps on a pattern's region, an interior point of that region in S (an LP), and bounds of the
backward quantities ``∂f/∂h_k`` over S.  Shared by the exact constants (:mod:`recurjac_scale.exact`,
:mod:`recurjac_scale.exact_regions`) and branch-and-bound (:mod:`recurjac_scale.bab`).

Everything here is float64 arithmetic on the network's own weights: the gradients and maps are exact up to
rounding, not certified bounds (the interior point is what callers evaluate the network at).
"""

from __future__ import annotations

import math

import numpy as np

from .activations import LeakyReLU
from .errors import InputError, UnsupportedActivationError
from .layer_bounds.base import LayerBounds, Region
from .network.model import Network

__all__ = [
    "float_weights",
    "gradient_bounds",
    "json_number",
    "pattern_affine",
    "pattern_gradient",
    "pattern_interior_point",
    "region_box",
    "relu_family_alphas",
]


def relu_family_alphas(network: Network) -> list[float]:
    """The negative-side slope ``alpha`` of every hidden layer (ReLU: 0).

    Raises
    ------
    UnsupportedActivationError
        If a hidden layer is not ReLU / leaky ReLU, or the network has an output activation.
    """
    if not network.output_activation.is_identity:
        raise UnsupportedActivationError(
            f"output activation {network.output_activation} is not supported here; accepted: none (identity)"
        )
    out = []
    for k, act in enumerate(network.activations):
        if not isinstance(act, LeakyReLU):
            raise UnsupportedActivationError(
                f"hidden layer {k} has activation {act}; activation patterns are defined for relu and leaky_relu"
            )
        out.append(float(act.alpha))
    return out


def float_weights(network: Network) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The weights and biases as float64 arrays."""
    return ([np.asarray(w, np.float64) for w in network.weights], [np.asarray(b, np.float64) for b in network.biases])


def pattern_gradient(network: Network, pattern) -> np.ndarray:
    """The gradient ``∇f_δ`` (shape ``(n_0,)``) of the single-output ReLU-family ``network`` on the region of the
    activation pattern ``δ`` (``pattern[k]``: 0/1 array of hidden layer k+1), in float64."""
    ws, _ = float_weights(network)
    alphas = relu_family_alphas(network)
    g = ws[-1][0].copy()
    for k in range(len(ws) - 2, -1, -1):
        d = np.where(np.asarray(pattern[k]) > 0, 1.0, alphas[k])
        g = ws[k].T @ (d * g)
    return g


def pattern_affine(network: Network, pattern) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per hidden layer k, ``(A_k, c_k)`` with ``z_k(x) = A_k x + c_k`` on the region of pattern ``δ``
    (shapes ``(n_k, n_0)``, ``(n_k,)``), float64."""
    ws, bs = float_weights(network)
    alphas = relu_family_alphas(network)
    n0 = ws[0].shape[1]
    A, c = np.eye(n0), np.zeros(n0)
    out = []
    for k in range(len(ws) - 1):
        A, c = ws[k] @ A, ws[k] @ c + bs[k]
        out.append((A, c))
        d = np.where(np.asarray(pattern[k]) > 0, 1.0, alphas[k])
        A, c = d[:, None] * A, d * c
    return out


def region_box(region: Region) -> tuple[np.ndarray, np.ndarray]:
    """The box of S, refused when it is unbounded."""
    lo, hi = region.box
    if not (np.isfinite(lo).all() and np.isfinite(hi).all()):
        raise InputError("exact constants need a bounded region: finite eps (or a bounded input domain)")
    return lo, hi


def pattern_interior_point(network: Network, region: Region, pattern) -> tuple[float, np.ndarray | None]:
    """The pattern's region in S: the largest margin ``τ`` (<= 1) such that some ``x`` of S has
    ``(2 δ_j - 1) z_j(x) >= τ ||∂z_j/∂x||_2`` for every hidden neuron ``j`` whose ``z_j`` depends on ``x``, and that
    point (``None`` if the LP is infeasible, i.e. the closed region misses S).  ``τ > 0``: the pattern holds on an
    open set of S."""
    from scipy.optimize import linprog

    lo, hi = region_box(region)
    n0 = lo.shape[0]
    rows, rhs = [], []
    for (A, c), d in zip(pattern_affine(network, pattern), pattern):
        s = np.where(np.asarray(d) > 0, -1.0, 1.0)  # constraint s z + τ ||a|| <= 0
        nrm = np.linalg.norm(A, axis=1)
        live = nrm > 0
        if (~live).any() and ((s[~live] * c[~live]) > 0).any():
            return -math.inf, None  # a constant pre-activation with the wrong sign
        rows.append(np.hstack([(s[live, None] * A[live]) / nrm[live, None], np.ones((int(live.sum()), 1))]))
        rhs.append(-(s[live] * c[live]) / nrm[live])
    extra_bounds = [(float(a), float(b)) for a, b in zip(lo, hi)]
    A_ub, b_ub = np.vstack(rows), np.concatenate(rhs)
    n_var = n0 + 1
    bounds = extra_bounds + [(None, 1.0)]
    if region.p == 1.0 and math.isfinite(region.eps):
        # |x - x0|_1 <= eps with d+ - d- = x - x0
        A_ub = np.hstack([A_ub, np.zeros((A_ub.shape[0], 2 * n0))])
        row = np.concatenate([np.zeros(n_var), np.ones(2 * n0)])
        A_ub = np.vstack([A_ub, row])
        b_ub = np.append(b_ub, region.eps)
        A_eq = np.hstack([np.eye(n0), np.zeros((n0, 1)), -np.eye(n0), np.eye(n0)])
        b_eq = region.x0.copy()
        bounds += [(0.0, None)] * (2 * n0)
        n_var += 2 * n0
    else:
        A_eq = b_eq = None
    cost = np.zeros(n_var)
    cost[n0] = -1.0
    res = linprog(cost, A_ub=A_ub, b_ub=b_ub, A_eq=A_eq, b_eq=b_eq, bounds=bounds, method="highs")
    if res.status != 0:
        return -math.inf, None
    return float(res.x[n0]), np.clip(res.x[:n0], lo, hi)


def json_number(v) -> float | str | None:
    """A result number for JSON: a float, ``"inf"`` / ``"-inf"``, or ``None`` for NaN (not computed)."""
    v = float(v)
    return None if math.isnan(v) else ("inf" if v == math.inf else "-inf" if v == -math.inf else v)


def gradient_bounds(network: Network, lb: LayerBounds, region: Region) -> list[tuple[np.ndarray, np.ndarray]]:
    """Bounds ``[gl, gu]`` of ``g_k = ∂f/∂h_k`` for k = 0 .. H-1 (``g_0`` is the gradient ``v``) over the region:
    interval propagation of the derivative bounds, intersected with RecurJac-B's certified bounds of the same
    quantities (its backward states)."""
    from .jacobian import jacobian_bounds

    ws, _ = float_weights(network)
    H = len(ws)
    dbs = lb.derivative_bounds(network)
    g = ws[-1][0]
    out = [None] * H
    out[H - 1] = (g.copy(), g.copy())
    gl, gu = g.copy(), g.copy()
    for k in range(H - 1, 0, -1):
        dl, du = dbs[k - 1]
        cands = np.stack([dl * gl, dl * gu, du * gl, du * gu])
        rl, ru = cands.min(axis=0), cands.max(axis=0)
        mid, rad = 0.5 * (rl + ru), 0.5 * (ru - rl)
        gl = ws[k - 1].T @ mid - np.abs(ws[k - 1]).T @ rad
        gu = ws[k - 1].T @ mid + np.abs(ws[k - 1]).T @ rad
        out[k - 1] = (gl, gu)
    jb = jacobian_bounds(network, region.x0, region.eps, region.p, method="recurjac-b", layer_bounds=lb, outputs=0)
    if jb.states is not None:
        for t, st in enumerate(jb.states):
            k = H - 1 - t
            if 0 <= k < H - 1:
                lo, hi = out[k]
                out[k] = (np.maximum(lo, st["lower"][0]), np.minimum(hi, st["upper"][0]))
    lo, hi = out[0]
    out[0] = (np.maximum(lo, jb.lower[0]), np.minimum(hi, jb.upper[0]))
    return [(np.minimum(lo, hi), np.maximum(lo, hi)) for lo, hi in out]
