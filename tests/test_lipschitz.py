"""Soundness of the Lipschitz constants on random networks: every method x p x activation.

A certified constant over ``S`` must be >= the gradient norm at every point of ``S`` (dual norm of the row for one
output, induced p->p norm for several).  Points: random, boundary (vertices / sphere), points found by a search that
maximises the gradient norm itself, and points that push single neurons and Jacobian entries
(:mod:`recurjac_scale.testing`).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from recurjac_scale.jacobian import JACOBIAN_METHODS, jacobian_bounds
from recurjac_scale.layer_bounds.base import Region
from recurjac_scale.lipschitz import (
    ALGORITHM2_METHODS,
    LipschitzResult,
    algorithm2_signs,
    lipschitz,
    naive_constant,
)
from recurjac_scale.testing import hill_climb, jacobian_attack_points, neuron_attack_points, random_network, sample_region

METHODS = sorted(JACOBIAN_METHODS)


@pytest.fixture(autouse=True, scope="module")
def _one_blas_thread():
    """One BLAS thread: many small products, on a shared 2-core machine (STACK.md)."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        yield
ACTIVATIONS = ["relu", "leaky_relu", "sigmoid", "tanh", "arctan", "elu", "softplus", "hard_sigmoid"]
DUAL = {1.0: math.inf, 2.0: 2.0, math.inf: 1.0}
NP_ORD = {1.0: 1, 2.0: 2, math.inf: np.inf}


def grad_norms(J: np.ndarray, p: float) -> np.ndarray:
    """Per point, the norm the constant bounds: ``||J[0]||_q`` for one row, ``||J||_{p->p}`` otherwise.
    ``J``: (k, m, n_0)."""
    if J.shape[1] == 1:
        return np.linalg.norm(J[:, 0, :], ord=NP_ORD[DUAL[p]], axis=1)
    if p == 2.0:
        return np.linalg.norm(J, ord=2, axis=(1, 2))
    return np.array([np.linalg.norm(Jk, ord=NP_ORD[p]) for Jk in J])


def attack_points(net, region, rng, p, *, n_sample=1500):
    """Points of S likely to maximise the gradient norm."""
    pts = [sample_region(region, n_sample, rng)]
    if region.eps > 0:
        pts.append(hill_climb(region, lambda X: grad_norms(net.jacobian(X), p), rng, starts=6, steps=30))
        pts.append(neuron_attack_points(net, region, rng, neurons_per_layer=2, steps=12))
        pts.append(jacobian_attack_points(net, region, rng, entries=2, steps=15))
    return np.vstack(pts)


def _net(act, rng, depth, domain=None):
    n0 = int(rng.integers(4, 9))
    widths = [n0] + [int(rng.integers(5, 17)) for _ in range(depth - 1)] + [int(rng.integers(2, 5))]
    params = {"alpha": 0.1} if act == "leaky_relu" else {}
    return random_network(widths, act, rng, domain=domain, **params)


@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("p", [1.0, 2.0, math.inf])
def test_lipschitz_bounds_sampled_and_attacked_gradients(act, p, rng):
    """For each method and several radii (including eps = inf over the domain), the reported constant, the
    Proposition 2 value and (p = inf) the Algorithm 2 value are >= the largest gradient norm found."""
    depth = 2 + (ACTIVATIONS.index(act) + int(p if p != math.inf else 3)) % 3  # 2..4 affine layers
    domain = (-1.0, 1.0) if act in ("relu", "tanh") else None
    net = _net(act, rng, depth, domain)
    x0 = rng.uniform(-0.5, 0.5, size=net.n_inputs)
    m = net.n_outputs
    eps_list = [0.0, 0.02, 0.2] + ([math.inf] if domain is not None else [])
    for outputs in (None, 0, (0, m - 1)):
        sel = np.eye(m) if outputs is None else (np.eye(m)[[0]] if outputs == 0 else (np.eye(m)[[0]] - np.eye(m)[[m - 1]]))
        netc = net.with_outputs(sel)
        worst = {}
        for e in eps_list:
            region = Region.of(net, x0, e, p)
            X = attack_points(netc, region, rng, p, n_sample=600)
            worst[e] = grad_norms(netc.jacobian(X), p).max()
        for method in METHODS:
            res = lipschitz(net, x0, eps_list, p, method=method, outputs=outputs)
            assert isinstance(res, LipschitzResult)
            assert res.n_outputs == sel.shape[0]
            for pt in res.points:
                w = worst[pt.eps]
                assert pt.lipschitz >= w, (method, pt.eps, pt.lipschitz, w)
                assert pt.prop2 >= w, (method, pt.eps)
                if pt.algorithm2 is not None:
                    assert pt.algorithm2 >= w, (method, pt.eps)
                    assert pt.algorithm2 <= pt.prop2
                assert pt.lipschitz <= min(pt.prop2, res.naive_global)
                assert res.naive_global >= pt.lipschitz
            # Algorithm 2 only for the RecurJac methods and p = inf
            has_a2 = p == math.inf and method in ALGORITHM2_METHODS
            assert all((pt.algorithm2 is not None) == has_a2 for pt in res.points)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("p", [1.0, 2.0, math.inf])
@pytest.mark.parametrize("act", ["relu", "tanh", "sigmoid"])
def test_eps_zero_gives_gradient_norm(method, p, act, rng):
    """At eps = 0 the constant is the gradient norm at x0, up to rounding (one row: dual norm; several rows with
    p = 1, inf: the induced norm of J; p = 2: the spectral norm of |J|, which Proposition 2 bounds)."""
    net = _net(act, rng, 3)
    x0 = rng.uniform(-0.5, 0.5, size=net.n_inputs)
    J = net.jacobian(x0)
    for outputs, Jsel in ((1, J[[1]]), ((0, 1), J[[0]] - J[[1]]), (None, J)):
        res = lipschitz(net, x0, 0.0, p, method=method, outputs=outputs)
        got = res.points[0].lipschitz
        if Jsel.shape[0] == 1:
            want = np.linalg.norm(Jsel[0], ord=NP_ORD[DUAL[p]])
        elif p == 2.0:
            want = np.linalg.norm(np.abs(Jsel), 2)
            assert got >= np.linalg.norm(Jsel, 2)
        else:
            want = np.linalg.norm(Jsel, ord=NP_ORD[p])
        assert got >= want * (1 - 1e-15)
        assert got == pytest.approx(want, rel=1e-9)


@pytest.mark.parametrize("method", sorted(ALGORITHM2_METHODS))
@pytest.mark.parametrize("act", ["relu", "leaky_relu", "tanh", "softplus"])
def test_algorithm2_directional_bound_is_sound(method, act, rng):
    """The raw Algorithm 2 ingredient, ``upper(J[j,:]·s_j)``, is >= ``J[j,:](x)·s_j`` at sampled and attacked
    points, for every row with its own sign vector; and the per-row l1 bound is >= the sampled l1 norms while
    being no larger than the plain row sum of M."""
    net = _net(act, rng, 4)
    x0 = rng.uniform(-0.5, 0.5, size=net.n_inputs)
    for eps in (0.005, 0.03):
        jac = jacobian_bounds(net, x0, eps, math.inf, method=method)
        S = algorithm2_signs(jac.lower, jac.upper)
        ys = ALGORITHM2_METHODS[method](net, jac, S)
        assert ys.shape == (net.n_outputs,)
        region = Region.of(net, x0, eps, math.inf)
        X = [sample_region(region, 800, rng)]
        for j in range(net.n_outputs):
            X.append(hill_climb(region, lambda Z, j=j: net.jacobian(Z)[:, j, :] @ S[j], rng, starts=4, steps=25))
        X = np.vstack(X)
        Js = net.jacobian(X)
        dirs = np.einsum("bjk,jk->bj", Js, S).max(axis=0)
        assert (ys >= dirs).all(), (ys, dirs)
        res = lipschitz(net, x0, eps, math.inf, method=method)
        pt = res.points[0]
        l1 = np.abs(Js).sum(axis=2).max(axis=0)
        assert (np.array(pt.row_norms) >= l1).all()
        M = np.maximum(np.abs(jac.lower), np.abs(jac.upper))
        assert pt.algorithm2 <= M.sum(axis=1).max() * (1 + 1e-12)


def test_algorithm2_is_tighter_somewhere(rng):
    """On a ReLU network at a small radius Algorithm 2 beats the plain dual norm (it is not a no-op)."""
    net = _net("relu", rng, 4)
    x0 = rng.uniform(-0.5, 0.5, size=net.n_inputs)
    gains = []
    for eps in (0.01, 0.03, 0.06):
        res = lipschitz(net, x0, eps, math.inf, method="recurjac-b", outputs=0)
        pt = res.points[0]
        gains.append(pt.prop2 - pt.algorithm2)
    assert max(gains) > 0


@pytest.mark.parametrize("act", ["relu", "sigmoid", "tanh"])
@pytest.mark.parametrize("p", [1.0, 2.0, math.inf])
def test_global_constant(act, p, rng):
    """eps = inf without a domain: the constant bounds gradient norms sampled over a wide region (radius 10 and
    far-away points); it is the minimum of the RecurJac value and the naive product, and says which won."""
    net = _net(act, rng, 3)
    x0 = np.zeros(net.n_inputs)
    for outputs in (None, 0):
        netc = net if outputs is None else net.with_outputs(np.eye(net.n_outputs)[[0]])
        X = np.vstack([rng.uniform(-10, 10, size=(3000, net.n_inputs)), rng.normal(scale=100, size=(500, net.n_inputs))])
        worst = grad_norms(netc.jacobian(X), p).max()
        for method in METHODS:
            res = lipschitz(net, x0, math.inf, p, method=method, outputs=outputs)
            pt = res.points[0]
            assert pt.lipschitz >= worst
            assert res.naive_global >= pt.lipschitz
            assert res.naive_global == pytest.approx(naive_constant(netc, p))
            cands = {"prop2": pt.prop2, "naive": res.naive_global}
            if pt.algorithm2 is not None:
                cands["algorithm2"] = pt.algorithm2
            assert pt.lipschitz == min(cands.values())
            assert cands[pt.source] == pt.lipschitz


def test_result_to_dict_and_eps_list(rng):
    import json

    net = _net("relu", rng, 3)
    x0 = rng.uniform(-0.5, 0.5, size=net.n_inputs)
    res = lipschitz(net, x0, [0.0, 0.1, math.inf], "inf", method="recurjac-b")
    d = res.to_dict()
    json.dumps(d, allow_nan=False)
    assert [r["eps"] for r in d["results"]] == [0.0, 0.1, "inf"]
    for r, pt in zip(d["results"], res.points):
        assert r["lipschitz"] == pt.lipschitz and r["time_s"] >= 0
        assert set(r["timings"]) == {"layer_bounds", "jacobian", "algorithm2", "norms", "compile"}
    assert d["p"] == "inf" and d["naive_global"] == res.naive_global
    # constants grow with the radius (nested regions), here on the same method
    v = res.values
    assert v[0] <= v[1] * (1 + 1e-12) and v[1] <= v[2] * (1 + 1e-12)


def test_bad_arguments(rng):
    from recurjac_scale.errors import InputError

    net = _net("relu", rng, 2)
    x0 = np.zeros(net.n_inputs)
    with pytest.raises(InputError):
        lipschitz(net, x0, -0.1)
    with pytest.raises(InputError):
        lipschitz(net, x0, 0.1, p=3)
    with pytest.raises(InputError):
        lipschitz(net, x0, 0.1, method="nope")
    with pytest.raises(InputError):
        lipschitz(net, x0, 0.1, outputs=99)


@pytest.mark.parametrize("method", METHODS)
def test_no_hidden_layer_and_output_activation(method, rng):
    """A purely linear network: the constant is the norm of W at every radius (Algorithm 2 included).  A network
    with a sigmoid on its outputs: the constant bounds sampled gradient norms of the squashed outputs."""
    from recurjac_scale.network.model import Network

    W = rng.normal(size=(3, 5))
    lin = Network([W], [rng.normal(size=3)], [])
    for p in (1.0, 2.0, math.inf):
        res = lipschitz(lin, np.zeros(5), [0.0, 0.3, math.inf], p, method=method, outputs=1)
        for pt in res.points:
            assert pt.lipschitz == pytest.approx(np.linalg.norm(W[1], ord=NP_ORD[DUAL[p]]), rel=1e-12)
    net = random_network((5, 9, 7, 3), "tanh", rng, output_activation="sigmoid")
    x0 = rng.uniform(-0.5, 0.5, size=5)
    for p in (2.0, math.inf):
        res = lipschitz(net, x0, [0.05, 0.5], p, method=method)
        for pt in res.points:
            region = Region.of(net, x0, pt.eps, p)
            X = attack_points(net, region, rng, p, n_sample=500)
            assert pt.lipschitz >= grad_norms(net.jacobian(X), p).max()
        # the sigmoid's sup derivative 1/4 enters the naive constant
        assert res.naive_global <= naive_constant(net.with_outputs(np.eye(3)), p) * (1 + 1e-12)
