"""Lower bounds of the local Lipschitz constant: the largest exact gradient norm ``||∇f(x)||_q`` found at points
of ``S`` by projected gradient ascent on the gradient norm.

For ReLU-family networks ``||∇f||_q`` is piecewise constant (its gradient vanishes almost everywhere), so the
ascent direction comes from a smoothed network: the derivative ``σ'`` of each hidden neuron is replaced by
``alpha + (1 - alpha) * sigmoid(z / tau)`` with a temperature ``tau`` that shrinks during the run (smooth
activations use their own derivative).  With ``G(x)`` the smoothed gradient and ``s = ∂||G||_q / ∂G`` (the sign
vector for ``q = 1``), the ascent direction of ``||G(x)||_q`` is ``H(x) s = d/dt G(x + t s)``, taken by a central
difference.  Steps are PGD-style: sign steps for ``p = inf``, normalised steps otherwise, projected onto S; they
start from the best points of a sample of S and end with a random local search (``testing.hill_climb``).  Every
iterate is scored with the exact float64 gradient (:meth:`Network.jacobian`), so the result is a true lower bound
(an attained value), whatever the smoothing does.  Nothing here is certified.
"""

from __future__ import annotations

import math
import time

import numpy as np

from ..layer_bounds.base import Region
from ..network.model import Network

__all__ = ["gradient_norm_attack", "region_walk"]


def _smoothed_gradients(network: Network, X: np.ndarray, tau: np.ndarray | None, alphas) -> np.ndarray:
    """``G(X)`` of shape ``(batch, n_0)``: the gradient of the single output with smoothed ReLU derivatives
    (``tau[k]`` per hidden layer) or the exact derivatives of smooth activations."""
    ws = [np.asarray(w, np.float64) for w in network.weights]
    bs = [np.asarray(b, np.float64) for b in network.biases]
    acts = network.activations
    h = X
    ds = []
    for k in range(len(ws) - 1):
        z = h @ ws[k].T + bs[k]
        if alphas is not None:
            a = alphas[k]
            with np.errstate(over="ignore"):
                sg = 1.0 / (1.0 + np.exp(-z / tau[k]))
            ds.append(a + (1.0 - a) * sg)
        else:
            ds.append(acts[k].derivative(z))
        h = acts[k].value(z)
    g = np.broadcast_to(ws[-1][0], (X.shape[0], ws[-1].shape[1]))
    for k in range(len(ws) - 2, -1, -1):
        g = (g * ds[k]) @ ws[k]
    return g


def _dual_direction(G: np.ndarray, q: float) -> np.ndarray:
    """``∂||G||_q / ∂G`` row by row."""
    if q == 1.0:
        return np.sign(G)
    if q == 2.0:
        return G / np.maximum(np.linalg.norm(G, axis=1, keepdims=True), 1e-300)
    out = np.zeros_like(G)
    i = np.argmax(np.abs(G), axis=1)
    out[np.arange(G.shape[0]), i] = np.sign(G[np.arange(G.shape[0]), i])
    return out


def gradient_norm_attack(
    network: Network,
    region: Region,
    q: float,
    *,
    alphas=None,
    layer_widths=None,
    restarts: int = 16,
    steps: int = 60,
    samples: int = 2048,
    rng: np.random.Generator | None = None,
    time_budget: float | None = None,
) -> tuple[float, np.ndarray]:
    """The largest ``||∇f(x)||_q`` found at points ``x`` of S (module docstring).

    Parameters
    ----------
    network : Network
        One output row.
    region : Region
        ``S``.
    q : float
        Dual norm of the region's ``p``.
    alphas : tuple of float, optional
        ReLU-family slopes (smoothing on); ``None`` for smooth activations.
    layer_widths : sequence of ndarray, optional
        Per hidden layer, a scale of the pre-activation ranges over S (e.g. ``upper - lower``); sets the initial
        smoothing temperature (default 1).
    restarts, steps : int
        Starting points (the best ``restarts`` of ``samples`` points of S: the centre, interior points, box
        vertices) and ascent steps.
    samples : int
        Size of that sample.
    rng : numpy Generator, optional
    time_budget : float, optional
        Stop after this many seconds.

    Returns
    -------
    value : float
        The best exact gradient norm found (a lower bound of the local Lipschitz constant).
    x : ndarray, shape (n_0,)
        Where it was found (a point of S).
    """
    from ..testing import project, sample_region

    t0 = time.perf_counter()
    rng = np.random.default_rng(0) if rng is None else rng
    eps = region.eps if math.isfinite(region.eps) else 1.0

    def score(P):
        return np.linalg.norm(network.jacobian(P)[:, 0, :], ord=q, axis=1)

    # starting points: the best of a sample of S (centre, interior, vertices / boundary)
    X = sample_region(region, max(samples, restarts, 1), rng)
    s = score(X)
    keep = np.argsort(-s)[: max(restarts, 1)]
    X, s = X[keep], s[keep]
    best_i = int(np.argmax(s))
    best, best_x = float(s[best_i]), X[best_i].copy()
    if eps == 0:
        return best, best_x
    n_hidden = len(network.weights) - 1
    scale = [1.0] * n_hidden if layer_widths is None else [max(float(np.median(w)), 1e-12) for w in layer_widths]
    h = 1e-4 * eps
    for it in range(steps):
        if time_budget is not None and time.perf_counter() - t0 > time_budget:
            break
        frac = it / max(steps - 1, 1)
        tau = np.array([sc * 0.3 * (0.01 / 0.3) ** frac for sc in scale])
        G = _smoothed_gradients(network, X, tau, alphas)
        S = _dual_direction(G, q)
        Gp = _smoothed_gradients(network, project(region, X + h * S), tau, alphas)
        Gm = _smoothed_gradients(network, project(region, X - h * S), tau, alphas)
        # ascent direction of ||G||_q: d/dx (S . G(x)) = H S, a positive multiple of G(x + hS) - G(x - hS)
        d = Gp - Gm
        step = eps * 0.5 * (1.0 - frac) + eps * 0.02
        if region.p == math.inf:
            move = np.sign(d)
        else:
            move = d / np.maximum(np.linalg.norm(d, ord=region.p, axis=1, keepdims=True), 1e-300)
        X = project(region, X + step * move)
        s = score(X)
        i = int(np.argmax(s))
        if s[i] > best:
            best, best_x = float(s[i]), X[i].copy()
    # finish with a random local search around the best point (piecewise-constant objective)
    if time_budget is None or time.perf_counter() - t0 < time_budget:
        from ..testing import hill_climb

        sub = Region(x0=best_x, eps=0.5 * eps, p=region.p, lower=region.lower, upper=region.upper)
        P = project(region, hill_climb(sub, score, rng, starts=8, steps=max(steps // 2, 1)))
        s = score(P)
        i = int(np.argmax(s))
        if s[i] > best:
            best, best_x = float(s[i]), P[i].copy()
    return best, best_x


def _pattern_at(network: Network, x: np.ndarray) -> list[np.ndarray]:
    """The activation pattern (1 where ``z >= 0``) of every hidden layer at ``x``."""
    return [(z >= 0).astype(np.int8) for z in network.pre_activations(np.asarray(x, np.float64)[None, :])[:-1]
            for z in (z[0],)]


def _flip_gradients(network: Network, pattern, alphas) -> tuple[np.ndarray, np.ndarray]:
    """Gradients of every single-neuron flip of ``pattern``: ``(layer, neuron)`` pairs (shape ``(m, 2)``) and the
    gradients (shape ``(m, n_0)``), with ``∇f_δ = W(0)^T D_1 ... D_{H-1} w``; flipping neuron ``j`` of layer
    ``k`` changes ``D_k[j]`` by ``±(1 - alpha)``: a rank-one change of the product."""
    ws = [np.asarray(w, np.float64) for w in network.weights]
    H = len(ws)
    ds = [np.where(np.asarray(pattern[k]) > 0, 1.0, alphas[k]) for k in range(H - 1)]
    # back[k] = ∂f/∂h_k (length n_k+1 ... ) : g after layer k's weights, before D_k
    back = [None] * (H - 1)
    g = ws[-1][0].copy()
    for k in range(H - 2, -1, -1):
        back[k] = g  # ∂f/∂h_{k+1} (output of hidden layer k)
        g = ws[k].T @ (ds[k] * g)
    base = g
    # fwd[k] = ∂h_k^-/∂x rows: J_k = W(k) D_{k-1} ... W(0), shape (n_{k+1}, n_0): ∂z_{k+1}/∂x
    fwd = []
    J = ws[0]
    for k in range(H - 1):
        fwd.append(J)
        if k + 1 < H - 1:
            J = ws[k + 1] @ (ds[k][:, None] * J)
    idx, grads = [], []
    for k in range(H - 1):
        delta = np.where(np.asarray(pattern[k]) > 0, alphas[k] - 1.0, 1.0 - alphas[k])  # change of D_k[j]
        grads.append(base[None, :] + (delta * back[k])[:, None] * fwd[k])
        idx.append(np.stack([np.full(len(delta), k), np.arange(len(delta))], axis=1))
    return np.vstack(idx), np.vstack(grads)


def region_walk(
    network: Network,
    region: Region,
    q: float,
    starts: np.ndarray,
    *,
    alphas,
    max_steps: int = 200,
    tries: int = 6,
    time_budget: float | None = None,
) -> tuple[float, np.ndarray]:
    """Ascent over the linear regions of a ReLU-family network: from the region of each start point, move to the
    adjacent region (one neuron's sign flipped) with the largest gradient norm among those that meet the interior
    of S (an LP, :func:`recurjac_scale.patterns.pattern_interior_point`), until no neighbour is better.  On a region
    the gradient is constant, so this maximises ``||∇f||_q`` over feasible activation patterns locally.

    Every value returned is recomputed by :meth:`Network.jacobian` at an interior point of the region (a point of
    S), so it is an attained value: a lower bound of the local Lipschitz constant.

    Parameters
    ----------
    network : Network
        One output row, ReLU-family hidden layers.
    region : Region
    q : float
    starts : ndarray, shape (k, n_0)
        Points of S to start from.
    alphas : sequence of float
        Negative-side slopes of the hidden layers.
    max_steps : int
        Moves per start.
    tries : int
        Improving neighbours (best first) tested for feasibility before a start stops.
    time_budget : float, optional

    Returns
    -------
    value, x : float, ndarray of shape (n_0,)
        The best attained norm and its point (``-inf`` and the first start if nothing was attained).
    """
    from ..patterns import pattern_interior_point
    from ..testing import project

    t0 = time.perf_counter()
    starts = np.atleast_2d(np.asarray(starts, np.float64))
    best, best_x = -math.inf, starts[0].copy()

    def attained(x):
        return float(np.linalg.norm(network.jacobian(x)[0], ord=q))

    for x in starts:
        val = attained(x)
        if val > best:
            best, best_x = val, x.copy()
        pattern = _pattern_at(network, x)
        for _ in range(max_steps):
            if time_budget is not None and time.perf_counter() - t0 > time_budget:
                return best, best_x
            idx, grads = _flip_gradients(network, pattern, alphas)
            norms = np.linalg.norm(grads, ord=q, axis=1)
            order = [i for i in np.argsort(-norms) if norms[i] > val * (1.0 + 1e-12)][: max(int(tries), 1)]
            moved = False
            for i in order:
                k, j = int(idx[i, 0]), int(idx[i, 1])
                cand = [d.copy() for d in pattern]
                cand[k][j] = 1 - cand[k][j]
                margin, xi = pattern_interior_point(network, region, cand)
                if xi is None or not margin > 0:
                    continue
                # the LP keeps x in S's box (and l1 ball, up to its tolerance), not in an l2 ball: map it into S
                xi = project(region, xi)[0]
                v = attained(xi)
                if v > val * (1.0 + 1e-12):
                    pattern, val, moved = _pattern_at(network, xi), v, True
                    if v > best:
                        best, best_x = v, xi.copy()
                    break
            if not moved:
                break
    return best, best_x
