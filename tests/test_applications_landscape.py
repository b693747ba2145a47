"""The landscape radius R* (recurjac_scale.applications.landscape) and Lipschitz sweeps: projected gradient
descent on |∇f_K|^2 started inside the certified ball finds no stationary point there (and the certified
coordinate keeps its sign along the way); R* = inf when the global bounds fix a sign; sweep values against the
exact gradient and sampled gradients."""

from __future__ import annotations

import math

import numpy as np
import pytest

from recurjac_scale.applications import landscape_radius, lipschitz_sweep
from recurjac_scale.network.model import InputSpec, Network
from recurjac_scale.network.train import load_dataset, train_mlp


@pytest.fixture(scope="module")
def tanh_digits():
    pytest.importorskip("sklearn")
    data = load_dataset("digits", seed=0)
    net, report = train_mlp((64, 20, 20, 10), "tanh", data=data, epochs=8, seed=0)
    assert report["test_accuracy"] > 0.8
    return net, data.x_test[:4]


def _grad_sq(net, x, K):
    g = net.jacobian(x)[K]
    return float(g @ g)


def _project(x, x0, R, p):
    d = x - x0
    if p == math.inf:
        d = np.clip(d, -R, R)
    else:
        n = np.linalg.norm(d)
        if n > R:
            d *= R / n
    return np.clip(x0 + d, 0.0, 1.0)


@pytest.mark.parametrize("p", [2, "inf"])
def test_no_stationary_point_inside_r_star(tanh_digits, p, rng):
    net, X = tanh_digits
    pn = math.inf if p == "inf" else 2.0
    x0 = X[0]
    res = landscape_radius(net, x0, None, p)
    K = res.output
    assert 0 < res.r_star < math.inf and res.coordinate is not None
    h = 1e-6
    min_grad, worst_entry = math.inf, math.inf
    for start in range(3):
        x = _project(x0 + rng.uniform(-1, 1, x0.shape) * res.r_star, x0, res.r_star, pn)
        for _ in range(40):
            # finite-difference gradient of |∇f_K|^2 (smooth for tanh)
            gsq = np.array([(_grad_sq(net, x + h * e, K) - _grad_sq(net, x - h * e, K)) / (2 * h)
                            for e in np.eye(x.size)])
            step = np.sign(gsq) if pn == math.inf else gsq / max(np.linalg.norm(gsq), 1e-300)
            x = _project(x - 0.05 * res.r_star * step, x0, res.r_star, pn)
            J = net.jacobian(x)[K]
            min_grad = min(min_grad, float(np.linalg.norm(J)))
            worst_entry = min(worst_entry, res.sign * float(J[res.coordinate]))
    assert worst_entry > 0  # the certified entry kept its strict sign at every iterate
    assert min_grad > 0


def test_r_star_inf_when_global_bounds_fix_a_sign(rng):
    """Positive weights and tanh on the domain [0, 1]^n: every entry of the gradient is > 0 everywhere."""
    W1 = rng.uniform(0.1, 1.0, size=(6, 4))
    W2 = rng.uniform(0.1, 1.0, size=(3, 6))
    spec = InputSpec(shape=(4,), domain_lower=0.0, domain_upper=1.0)
    net = Network([W1, W2], [np.zeros(6), np.zeros(3)], ["tanh"], input_spec=spec)
    res = landscape_radius(net, np.full(4, 0.5), 1, 2)
    assert res.r_star == math.inf and res.sign == 1


def test_r_star_below_the_first_stationary_point():
    """f(x) = tanh(4x - 2) - 200 tanh(0.01 x) on [0, 1]: f'(0.5) > 0 and f' vanishes at 0.5 ± 0.2203;
    R* around 0.5 must be positive and below that distance."""
    spec = InputSpec(shape=(1,), domain_lower=0.0, domain_upper=1.0)
    net = Network([np.array([[4.0], [0.01]]), np.array([[1.0, -200.0]])], [np.array([-2.0, 0.0]), np.zeros(1)],
                  ["tanh"], input_spec=spec)
    lo, hi = 0.5, 1.0  # the zero of f' right of 0.5, by bisection on the exact derivative
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if net.jacobian(np.array([mid]))[0, 0] > 0 else (lo, mid)
    d = lo - 0.5
    assert 0.21 < d < 0.23
    for p in (2, "inf"):
        res = landscape_radius(net, np.array([0.5]), 0, p)
        assert 0 < res.r_star < d and res.sign == 1


def test_sweep_against_exact_and_sampled_gradients(tanh_digits, rng):
    net, X = tanh_digits
    x0 = X[1]
    K = int(np.argmax(net.forward(x0)))
    eps = [0.0, 0.01, 0.05]
    s = lipschitz_sweep(net, x0, eps, ("fastlip", "recurjac-b"), "inf", outputs=K)
    g0 = float(np.abs(net.jacobian(x0)[K]).sum())
    for m, vals in s.values.items():
        assert vals[0] == pytest.approx(g0, rel=1e-9)  # eps = 0: the gradient's l1 norm
        assert all(v <= s.naive for v in vals) and s.global_values[m] <= s.naive
        for e, v in zip(eps[1:], vals[1:]):
            pts = np.clip(x0 + rng.uniform(-e, e, size=(300, x0.size)), 0, 1)
            assert np.abs(net.jacobian(pts)[:, K, :]).sum(axis=1).max() <= v
