"""Projected gradient descent (PGD) attacks on a :class:`~recurjac_scale.network.model.Network`, in numpy.

Used to check certified robustness radii from the other side: an adversarial example found at distance ``d``
from ``x0`` proves that no sound certificate can exceed ``d``.  Nothing here is certified; the attack is a
heuristic upper bound on the minimal adversarial distance.

The gradient is the network's own exact float64 backward pass (:meth:`Network.jacobian`, right derivatives at
activation kinks).  The loss for a target ``j`` of an input of class ``c`` is the margin ``f_j - f_c``
(untargeted: ``max_{j != c} f_j - f_c``); an adversarial example has loss ``> 0``.  Steps: l-inf, the sign of the
gradient; l2, the normalised gradient; after each step the point is projected on ``B_p[x0, eps]`` and then clipped
to the model's input domain (clipping a coordinate towards a box containing ``x0`` never moves it away from ``x0``,
so the result lies in both sets).  Restarts start at seeded uniform random points of the ball.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import InputError
from ..network.model import Network

__all__ = ["AttackResult", "pgd_attack", "attack_radius"]


@dataclass(frozen=True)
class AttackResult:
    """Outcome of one attack.

    Attributes
    ----------
    success : bool
        An input with margin loss ``> 0`` (misclassified towards the target) was found.
    x_adv : ndarray, shape (n_0,) or None
        The adversarial example (the best point found when ``success`` is False).
    distance : float
        ``||x_adv - x0||_p`` (``inf`` when no example was found).
    loss : float
        The margin ``f_j - f_c`` at ``x_adv`` (untargeted: the largest over ``j != c``).
    eps : float
        The radius the attack was confined to.
    """

    success: bool
    x_adv: np.ndarray | None
    distance: float
    loss: float
    eps: float

    def to_dict(self) -> dict:
        return {"success": self.success, "distance": self.distance, "loss": self.loss, "eps": self.eps}


def _norm(v: np.ndarray, p: float) -> np.ndarray:
    """Row norms of a batch ``(b, n)``."""
    if p == math.inf:
        return np.abs(v).max(axis=1)
    if p == 2.0:
        return np.sqrt((v * v).sum(axis=1))
    return np.abs(v).sum(axis=1)


def _project(x: np.ndarray, x0: np.ndarray, eps: float, p: float, lo, hi) -> np.ndarray:
    d = x - x0
    if p == math.inf:
        d = np.clip(d, -eps, eps)
    else:
        n = _norm(d, p)
        scale = np.where(n > eps, eps / np.maximum(n, 1e-300), 1.0)
        d = d * scale[:, None]
    x = x0 + d
    if lo is not None:
        x = np.clip(x, lo, hi)
    return x


def _losses(net: Network, x: np.ndarray, c: int, target) -> tuple[np.ndarray, np.ndarray]:
    """Margin loss per row of ``x`` and the gradient of the active term (b, n_0)."""
    out = net.forward(x)
    J = net.jacobian(x)  # (b, n_H, n_0)
    b = x.shape[0]
    if target is None:
        other = out.copy()
        other[:, c] = -np.inf
        j = other.argmax(axis=1)
    else:
        j = np.full(b, int(target))
    rows = np.arange(b)
    loss = out[rows, j] - out[:, c]
    grad = J[rows, j, :] - J[:, c, :]
    return loss, grad


def pgd_attack(
    network: Network,
    x0,
    label: int,
    eps: float,
    p=math.inf,
    *,
    target: int | None = None,
    steps: int = 100,
    restarts: int = 5,
    step_size: float | None = None,
    seed: int = 0,
) -> AttackResult:
    """PGD on the margin ``f_target - f_label`` inside ``B_p[x0, eps] ∩ D``.

    Parameters
    ----------
    network : Network
    x0 : array_like, shape (n_0,)
    label : int
        The class ``c`` to move away from.
    eps : float
        Radius (> 0).
    p : {2, inf}
        Norm of the ball.
    target : int or None
        Class to move to; ``None``: untargeted (any class but ``label``).
    steps, restarts : int
        Iterations per restart, and restarts (the first starts at ``x0``, the others at random points).
    step_size : float, optional
        Default ``2.5 eps / steps`` (Madry et al.).
    seed : int
        Seeds the random starts.

    Returns
    -------
    AttackResult
        The first adversarial example found (smallest distance among the restarts that succeeded), or the point
        of largest loss.
    """
    from ..layer_bounds.base import parse_norm

    p = parse_norm(p)
    if p not in (2.0, math.inf):
        raise InputError(f"PGD supports p = 2 and inf, got p={p:g}")
    eps = float(eps)
    if not eps > 0:
        raise InputError(f"eps={eps!r}: the attack needs a radius > 0")
    net = network.materialize() if network.is_lazy else network
    x0 = np.asarray(x0, dtype=np.float64).reshape(1, -1)
    lo, hi = net.input_spec.domain_lower, net.input_spec.domain_upper
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 1729]))
    n = x0.shape[1]
    starts = [x0.copy()]
    for _ in range(max(int(restarts), 1) - 1):
        if p == math.inf:
            d = rng.uniform(-eps, eps, size=(1, n))
        else:
            d = rng.normal(size=(1, n))
            d *= eps * rng.uniform() ** (1.0 / n) / max(float(np.sqrt((d * d).sum())), 1e-300)
        starts.append(x0 + d)
    x = _project(np.concatenate(starts), x0, eps, p, lo, hi)
    alpha = float(step_size) if step_size is not None else 2.5 * eps / max(int(steps), 1)
    best_x = x.copy()
    best_loss = np.full(x.shape[0], -np.inf)
    for _ in range(int(steps) + 1):
        loss, grad = _losses(net, x, int(label), target)
        better = loss > best_loss
        best_loss = np.where(better, loss, best_loss)
        best_x[better] = x[better]
        if (loss > 0).any():
            break
        if p == math.inf:
            step = np.sign(grad)
        else:
            gn = _norm(grad, 2.0)
            step = grad / np.maximum(gn, 1e-300)[:, None]
        x = _project(x + alpha * step, x0, eps, p, lo, hi)
    ok = best_loss > 0
    if ok.any():
        dist = _norm(best_x - x0, p)
        i = int(np.argmin(np.where(ok, dist, np.inf)))
        return AttackResult(True, best_x[i].copy(), float(dist[i]), float(best_loss[i]), eps)
    i = int(np.argmax(best_loss))
    return AttackResult(False, best_x[i].copy(), math.inf, float(best_loss[i]), eps)


def attack_radius(
    network: Network,
    x0,
    label: int,
    p=math.inf,
    *,
    target: int | None = None,
    eps_max: float = 1.0,
    search_steps: int = 12,
    steps: int = 100,
    restarts: int = 5,
    seed: int = 0,
) -> AttackResult:
    """The smallest radius at which :func:`pgd_attack` succeeds, by bisection on ``eps`` in ``(0, eps_max]``.

    Returns the successful attack of smallest distance found (``success`` False when none at ``eps_max``).
    ``result.distance`` is an upper bound of the minimal adversarial distance (a certified radius can never be
    larger).
    """
    kw = dict(target=target, steps=steps, restarts=restarts, seed=seed)
    best = pgd_attack(network, x0, label, eps_max, p, **kw)
    if not best.success:
        return best
    lo, hi = 0.0, min(eps_max, best.distance)
    for _ in range(int(search_steps)):
        mid = 0.5 * (lo + hi)
        if mid <= 0:
            break
        r = pgd_attack(network, x0, label, mid, p, **kw)
        if r.success:
            if r.distance < best.distance:
                best = r
            hi = min(mid, r.distance)
        else:
            lo = mid
    return best
