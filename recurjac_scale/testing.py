"""Test utilities shipped with the package: random networks and points of a region, including points found by
search, used to check that certified bounds contain the true values (ALGORITHM.md, "How to know it is right").

Nothing here is certified; everything here is meant to *attack* a certificate.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

from .layer_bounds.base import Region
from .network.model import InputSpec, Network

__all__ = [
    "assert_tasks_within_plan_memory",
    "random_network",
    "project",
    "sample_region",
    "hill_climb",
    "neuron_attack_points",
    "jacobian_attack_points",
    "networks",
    "norms",
    "radii",
    "chunkings",
    "activation_names",
    "PROPERTY_ACTIVATIONS",
]

PROPERTY_ACTIVATIONS = ("relu", "leaky_relu", "hard_sigmoid", "elu", "softplus", "sigmoid", "tanh", "arctan")
"""The activations the property strategies draw from: every registered one satisfying Assumption 2, except the
identity (a linear layer)."""


def random_network(
    widths: Sequence[int],
    activation: str = "relu",
    rng: np.random.Generator | None = None,
    *,
    output_activation: str | None = None,
    bias_scale: float = 0.1,
    domain: tuple[float, float] | None = None,
    **act_params,
) -> Network:
    """A He-uniform random MLP with the given widths ``(n_0, ..., n_H)`` and one activation on every hidden layer.

    Biases are N(0, bias_scale^2) (as in the golden networks).
    """
    rng = np.random.default_rng(0) if rng is None else rng
    from .activations import get_activation

    act = get_activation(activation, **act_params)
    ws, bs = [], []
    for n_in, n_out in zip(widths[:-1], widths[1:]):
        lim = math.sqrt(6.0 / n_in)
        ws.append(rng.uniform(-lim, lim, size=(n_out, n_in)))
        bs.append(rng.normal(0.0, bias_scale, size=n_out))
    spec = InputSpec(
        shape=(widths[0],),
        domain_lower=None if domain is None else domain[0],
        domain_upper=None if domain is None else domain[1],
    )
    return Network(ws, bs, [act] * (len(widths) - 2), output_activation=output_activation, input_spec=spec)


def project(region: Region, x: np.ndarray) -> np.ndarray:
    """Map points ``x`` of shape ``(n, n_0)`` into ``S = B_p[x0, eps] ∩ D``: onto the ball (exactly for p = 2 and
    inf; by scaling for p = 1), then clipped to the domain box, which keeps them in the ball because ``x0`` is in
    the box and every p-norm is monotone in the absolute coordinates."""
    x = np.atleast_2d(np.asarray(x, dtype=np.float64))
    d = x - region.x0
    eps = region.eps
    if math.isfinite(eps):
        if region.p == math.inf:
            d = np.clip(d, -eps, eps)
        else:
            norms = np.linalg.norm(d, ord=region.p, axis=1)
            scale = np.where(norms > eps, eps / np.maximum(norms, 1e-300), 1.0)
            d = d * scale[:, None]
    x = region.x0 + d
    if region.lower is not None:
        x = np.clip(x, region.lower, region.upper)
    # Rounding can push a coordinate 1 ulp outside; shrink towards x0 by a hair.
    if math.isfinite(eps) and eps > 0:
        d = x - region.x0
        nrm = np.linalg.norm(d, ord=region.p, axis=1) if region.p != math.inf else np.abs(d).max(axis=1)
        over = nrm > eps
        if over.any():
            d[over] *= (eps / nrm[over] * (1 - 1e-12))[:, None]
            x = region.x0 + d
    return x


def sample_region(region: Region, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` points of ``S`` of shape ``(n, n_0)``: a mix of interior points, points on the boundary of the ball
    (box vertices for p = inf, sphere points for p = 2, signed scaled unit vectors for p = 1) and the centre.

    For ``eps = inf`` the region is the domain box (or, without one, a box of radius 10 around ``x0``)."""
    n0 = region.x0.shape[0]
    eps = region.eps
    if not math.isfinite(eps):
        if region.lower is not None:
            lo, hi = region.lower, region.upper
        else:
            lo, hi = region.x0 - 10.0, region.x0 + 10.0
        k = n // 2
        inner = rng.uniform(lo, hi, size=(k, n0))
        verts = np.where(rng.random((n - k, n0)) < 0.5, lo, hi)
        return np.vstack([inner, verts])
    if eps == 0:
        return np.repeat(region.x0[None, :], max(n, 1), axis=0)
    k1 = n // 3
    k2 = n // 3
    k3 = n - k1 - k2
    if region.p == math.inf:
        inner = rng.uniform(-eps, eps, size=(k1, n0))
        bnd = eps * rng.choice([-1.0, 1.0], size=(k2 + k3, n0))
    elif region.p == 2:
        g = rng.normal(size=(k1, n0))
        g /= np.linalg.norm(g, axis=1, keepdims=True)
        inner = g * eps * rng.random((k1, 1)) ** (1.0 / n0)
        s = rng.normal(size=(k2 + k3, n0))
        bnd = eps * s / np.linalg.norm(s, axis=1, keepdims=True)
    else:
        e = rng.exponential(size=(k1, n0 + 1))
        inner = eps * rng.choice([-1.0, 1.0], size=(k1, n0)) * (e[:, :n0] / e.sum(axis=1, keepdims=True))
        idx = rng.integers(0, n0, size=k2 + k3)
        bnd = np.zeros((k2 + k3, n0))
        bnd[np.arange(k2 + k3), idx] = eps * rng.choice([-1.0, 1.0], size=k2 + k3)
    pts = np.vstack([np.zeros((1, n0)), inner, bnd])[:n] + region.x0
    return project(region, pts)


def hill_climb(
    region: Region,
    objective: Callable[[np.ndarray], np.ndarray],
    rng: np.random.Generator,
    *,
    starts: int = 8,
    steps: int = 60,
    population: int = 16,
) -> np.ndarray:
    """Maximise a batched objective ``objective(X) -> (n,)`` over ``S`` by projected random search with step-size
    adaptation (works for piecewise-constant objectives such as ReLU Jacobian entries, where gradients vanish).

    Returns every accepted point, shape ``(k, n_0)``.
    """
    eps = region.eps if math.isfinite(region.eps) else 10.0
    if eps == 0:
        return region.x0[None, :].copy()
    x = sample_region(region, starts, rng)
    fx = objective(x)
    step = np.full(starts, 0.5 * eps)
    visited = [x.copy()]
    n0 = x.shape[1]
    for _ in range(steps):
        cand = x[:, None, :] + step[:, None, None] * rng.normal(size=(starts, population, n0)) / math.sqrt(n0) * 3
        # also try jumps to the boundary along a random sign pattern
        cand[:, 0, :] = region.x0 + eps * np.sign(rng.normal(size=(starts, n0)))
        cand = project(region, cand.reshape(-1, n0)).reshape(starts, population, n0)
        fc = objective(cand.reshape(-1, n0)).reshape(starts, population)
        best = fc.argmax(axis=1)
        fb = fc[np.arange(starts), best]
        better = fb > fx
        x[better] = cand[np.arange(starts), best][better]
        fx[better] = fb[better]
        step = np.where(better, step * 1.5, step * 0.7)
        step = np.clip(step, 1e-6 * eps, 2 * eps)
        if better.any():
            visited.append(x[better].copy())
    return np.vstack(visited)


def neuron_attack_points(
    network: Network, region: Region, rng: np.random.Generator, *, neurons_per_layer: int = 4, steps: int = 30
) -> np.ndarray:
    """Points of ``S`` found by gradient steps that push single pre-activations up and down.

    For a few neurons of every layer, projected (sign-)gradient ascent and descent on ``z_r(x)`` from the centre
    and from random points; returns all iterates, shape ``(k, n_0)``."""
    pts = []
    eps = region.eps if math.isfinite(region.eps) else 10.0
    if eps == 0:
        return region.x0[None, :].copy()
    for layer in range(network.n_layers):
        n = network.widths[layer + 1]
        sub = _truncate(network, layer)
        for r in rng.choice(n, size=min(n, neurons_per_layer), replace=False):
            for sign in (1.0, -1.0):
                x = sample_region(region, 2, rng)
                x[0] = region.x0
                lr = eps / 4
                for _ in range(steps):
                    g = sub.jacobian(x)[:, r, :] * sign
                    if region.p == math.inf:
                        d = np.sign(g)
                    else:
                        d = g / np.maximum(np.linalg.norm(g, ord=region.q if region.q != math.inf else 2, axis=1, keepdims=True), 1e-300)
                    x = project(region, x + lr * d)
                    pts.append(x.copy())
                    lr *= 0.93
    return np.vstack(pts)


def _truncate(network: Network, layer: int) -> Network:
    """The network's first ``layer + 1`` affine layers, with the pre-activation of layer ``layer`` as output."""
    return Network(
        network.weights[: layer + 1],
        network.biases[: layer + 1],
        network.layer_activations[:layer],
        input_spec=network.input_spec,
        validate=False,
    )


def jacobian_attack_points(
    network: Network,
    region: Region,
    rng: np.random.Generator,
    *,
    entries: int = 6,
    steps: int = 40,
) -> np.ndarray:
    """Points of ``S`` that push single Jacobian entries ``J[j, k](x)`` up and down (projected random search, see
    :func:`hill_climb`; the entries are drawn at random).  Returns all accepted points, shape ``(k, n_0)``."""
    m, n0 = network.n_outputs, network.n_inputs
    pts = []
    for _ in range(entries):
        j, k = int(rng.integers(m)), int(rng.integers(n0))
        for sign in (1.0, -1.0):
            pts.append(
                hill_climb(region, lambda X, j=j, k=k, s=sign: s * network.jacobian(X)[:, j, k], rng, steps=steps)
            )
    return np.vstack(pts)


def assert_tasks_within_plan_memory(plan, max_rows: int, max_cols: int) -> None:
    """Run one task of every layer step of an engine plan in this process (rows ``0:max_rows``, columns
    ``0:max_cols``, priors from the in-memory chain) and check that the memory it allocates (tracemalloc peak)
    is at most the plan's estimate of a task's working memory (``task_peak_bytes - task_state_bytes``)."""
    import tracemalloc

    from .jacobian import run_chain

    ctx = plan.context
    spec = ctx.worker_spec()
    bc = spec.chain()
    _, _, states = run_chain(ctx.method, ctx.chain)
    for sp in plan.steps:
        t = sp.step
        rows, cols = slice(0, min(max_rows, plan.n_rows)), slice(0, min(max_cols, sp.width))
        pri = {s: {k: np.ascontiguousarray(states[s][k][rows]) for k in spec.state_keys} for s in spec.prior_steps(t)}
        tracemalloc.start()
        try:
            bc.step_block(t, rows, cols, pri)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak <= sp.task_peak_bytes - sp.task_state_bytes, (t, peak, sp.task_peak_bytes)


# -- hypothesis strategies (hypothesis is a test dependency: imported when a strategy is built) ---------------
def activation_names(names: Sequence[str] = PROPERTY_ACTIVATIONS):
    """Strategy: an activation name (and its parameters) as ``(name, params)``; ``leaky_relu`` draws its slope in
    [0, 1]."""
    from hypothesis import strategies as st

    def with_params(name):
        if name == "leaky_relu":
            return st.tuples(st.just(name), st.fixed_dictionaries({"alpha": st.floats(0.0, 1.0)}))
        return st.just((name, {}))

    return st.sampled_from(list(names)).flatmap(with_params)


def networks(
    *,
    min_depth: int = 1,
    max_depth: int = 4,
    min_width: int = 1,
    max_width: int = 8,
    activations: Sequence[str] = PROPERTY_ACTIVATIONS,
    domain: bool | None = None,
):
    """Strategy: a random :class:`Network` (:func:`random_network`) with ``min_depth..max_depth`` hidden layers of
    ``min_width..max_width`` neurons, inputs and outputs of 1..max_width, one drawn activation, bias scale in
    {0, 0.1, 1}, and an input domain [-1, 1] (``domain=None``: drawn).  Shrinks towards small shallow ReLU
    networks."""
    from hypothesis import strategies as st

    @st.composite
    def build(draw):
        depth = draw(st.integers(min_depth, max_depth))
        widths = [draw(st.integers(1, max_width))]
        widths += [draw(st.integers(min_width, max_width)) for _ in range(depth)]
        widths.append(draw(st.integers(1, max_width)))
        name, params = draw(activation_names(activations))
        bias = draw(st.sampled_from([0.1, 0.0, 1.0]))
        dom = draw(st.booleans()) if domain is None else domain
        seed = draw(st.integers(0, 2**32 - 1))
        return random_network(widths, name, np.random.default_rng(seed), bias_scale=bias,
                              domain=(-1.0, 1.0) if dom else None, **params)

    return build()


def norms():
    """Strategy: an input norm p in {1, 2, inf}."""
    from hypothesis import strategies as st

    return st.sampled_from([math.inf, 1.0, 2.0])


def radii(*, max_eps: float = 1.0, zero: bool = True):
    """Strategy: a radius: 0 (when ``zero``), or log-uniform in [1e-6, max_eps] (from "all stable" to "many
    unstable" neurons)."""
    from hypothesis import strategies as st

    pos = st.floats(-6.0, math.log10(max_eps)).map(lambda e: float(10.0**e))
    return st.one_of(st.just(0.0), pos) if zero else pos


def chunkings(max_block: int = 6):
    """Strategy: ``(row_block, col_block)`` for the engine or the in-memory driver; ``None`` lets the code choose."""
    from hypothesis import strategies as st

    size = st.one_of(st.none(), st.integers(1, max_block))
    return st.tuples(size, size)
