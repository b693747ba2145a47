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

__all__ = ["gradient_norm_attack"]


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
