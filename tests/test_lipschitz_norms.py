"""Norms of the magnitude bound M, the naive constant and the Algorithm 2 combination (no Jacobian bounds needed)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from recurjac_scale.errors import ShapeMismatchError
from recurjac_scale.lipschitz import (
    algorithm2_row_l1,
    algorithm2_signs,
    bound_magnitude,
    dual_row_norms,
    induced_norm,
    lipschitz_from_bounds,
    naive_constant,
    operator_norm,
)
from recurjac_scale.testing import random_network

NP_ORD = {1.0: 1, 2.0: 2, math.inf: np.inf}


def _matrices(rng):
    yield rng.random((1, 7))
    yield rng.random((5, 9))
    yield rng.random((30, 4))
    yield np.outer(rng.random(6), rng.random(8))  # rank one
    M = np.zeros((6, 6))
    M[:3, :3] = rng.random((3, 3))
    M[3:, 3:] = 5 * rng.random((3, 3))  # reducible: two blocks, the second dominant
    yield M
    M = rng.random((8, 12))
    M[:, 3] = 0.0
    M[2, :] = 0.0
    yield M
    yield np.diag([1.0, 5.0, 2.0])
    yield rng.random((10, 784)) * (rng.random((10, 784)) < 0.1)


@pytest.mark.parametrize("p", [1.0, 2.0, math.inf])
def test_induced_norm_is_tight_upper_bound(rng, p):
    for M in _matrices(rng):
        exact = np.linalg.norm(M, ord=NP_ORD[p]) if M.shape[0] > 1 else np.linalg.norm(M[0], ord=NP_ORD[{1.0: math.inf, 2.0: 2.0, math.inf: 1.0}[p]])
        got = induced_norm(M, p)
        assert got >= exact
        assert got <= exact * (1 + 1e-6) + 1e-300


@pytest.mark.parametrize("p", [1.0, 2.0, math.inf])
def test_induced_norm_of_M_bounds_every_signed_J(rng, p):
    for M in _matrices(rng):
        bound = induced_norm(M, p)
        for _ in range(20):
            J = M * rng.uniform(-1, 1, size=M.shape)
            J[rng.random(M.shape) < 0.3] = 0
            if M.shape[0] == 1:
                val = np.linalg.norm(J[0], ord=NP_ORD[{1.0: math.inf, 2.0: 2.0, math.inf: 1.0}[p]])
            else:
                val = np.linalg.norm(J, ord=NP_ORD[p])
            assert val <= bound


def test_dual_row_norms(rng):
    M = rng.random((6, 50))
    for q in (1.0, 2.0, math.inf):
        got = dual_row_norms(M, q)
        exact = np.linalg.norm(M, ord=NP_ORD[q], axis=1)
        assert (got >= exact).all()
        np.testing.assert_allclose(got, exact, rtol=1e-12)


@pytest.mark.parametrize("p", [1.0, 2.0, math.inf])
def test_operator_norm(rng, p):
    for shape in [(1, 9), (7, 1), (20, 30), (64, 16)]:
        W = rng.normal(size=shape)
        got = operator_norm(W, p)
        exact = np.linalg.norm(W, ord=NP_ORD[p])
        assert exact <= got <= exact * (1 + 1e-8)


def test_bound_magnitude_and_shapes():
    L = np.array([[-2.0, 0.5, -1.0]])
    U = np.array([[1.0, 3.0, -0.5]])
    np.testing.assert_array_equal(bound_magnitude(L, U), [[2.0, 3.0, 1.0]])
    with pytest.raises(ShapeMismatchError):
        bound_magnitude(L, U.T)


@pytest.mark.parametrize("act", ["relu", "leaky_relu", "sigmoid", "tanh", "arctan", "elu", "softplus", "hard_sigmoid"])
@pytest.mark.parametrize("p", [1.0, 2.0, math.inf])
def test_naive_constant_bounds_sampled_gradients(rng, act, p):
    """The naive constant bounds ||J(x)||_{p->p} (dual norm for one row) at points anywhere, and the quotient
    ||f(x) - f(y)|| / ||x - y|| for random pairs."""
    net = random_network((6, 12, 9, 4), act, rng)
    for sel in (None, np.eye(4)[[2]]):
        n = net if sel is None else net.with_outputs(sel)
        L = naive_constant(n, p)
        X = rng.normal(scale=3.0, size=(400, 6))
        Js = n.jacobian(X)
        if n.n_outputs == 1:
            norms = np.linalg.norm(Js[:, 0, :], ord=NP_ORD[{1.0: math.inf, 2.0: 2.0, math.inf: 1.0}[p]], axis=1)
        else:
            norms = np.array([np.linalg.norm(J, ord=NP_ORD[p]) for J in Js])
        assert norms.max() <= L
        Y = X + rng.normal(scale=0.5, size=X.shape)
        num = np.linalg.norm(n.forward(X) - n.forward(Y), ord=NP_ORD[p], axis=1)
        den = np.linalg.norm(X - Y, ord=NP_ORD[p], axis=1)
        assert (num / den).max() <= L


def test_naive_constant_by_hand():
    """Two layers, ReLU, p = inf: ||W1||_inf * ||W2||_inf; sigmoid adds 1/4; one output row: its l1 norm."""
    from recurjac_scale.network.model import Network

    W1 = np.array([[1.0, -2.0], [0.5, 0.5], [3.0, 0.0]])
    W2 = np.array([[1.0, 1.0, -1.0]])
    net = Network([W1, W2], [np.zeros(3), np.zeros(1)], ["relu"])
    assert naive_constant(net, "inf") == pytest.approx(3.0 * 3.0, rel=1e-12)
    assert naive_constant(net, "inf") >= 9.0
    net_s = Network([W1, W2], [np.zeros(3), np.zeros(1)], ["sigmoid"])
    assert naive_constant(net_s, 1) == pytest.approx(4.5 * 0.25 * 1.0, rel=1e-12)
    s2 = np.linalg.norm(W1, 2)
    assert naive_constant(net, 2) == pytest.approx(s2 * math.sqrt(3.0), rel=1e-9)


def test_algorithm2_signs_are_strict():
    L = np.array([[0.0, 0.1, -1.0, -2.0]])
    U = np.array([[1.0, 0.3, 0.0, -0.5]])
    np.testing.assert_array_equal(algorithm2_signs(L, U), [[0.0, 1.0, 0.0, -1.0]])


def test_algorithm2_row_l1(rng):
    """With the exact max of J·s over a finite set of Jacobians, Algorithm 2 bounds every row's l1 norm, never
    exceeds the plain sum of M, and is strictly tighter when entries of known sign can cancel."""
    m, n = 3, 10
    Js = rng.normal(size=(50, m, n))
    Js[:, :, :4] = np.abs(Js[:, :, :4]) + 0.1  # positive columns
    Js[:, :, 4:7] = -np.abs(Js[:, :, 4:7]) - 0.1  # negative columns
    L, U = Js.min(axis=0), Js.max(axis=0)
    S = algorithm2_signs(L, U)
    ys = np.einsum("bjk,jk->bj", Js, S).max(axis=0)
    a2 = algorithm2_row_l1(L, U, S, ys)
    l1 = np.abs(Js).sum(axis=2).max(axis=0)
    assert (a2 >= l1).all()
    plain = bound_magnitude(L, U).sum(axis=1)
    assert (a2 <= plain * (1 + 1e-12)).all()
    assert (a2 < plain).all()
    # the result moves one for one with upper(J·s) (no hidden padding that could mask a bad directional bound)
    np.testing.assert_allclose(algorithm2_row_l1(L, U, S, ys - 1.0), a2 - 1.0, rtol=1e-12)


def test_lipschitz_from_bounds_exact_point(rng):
    """L = U = J: every value is the norm of J (up to rounding), for every p; Algorithm 2 equals ||J||_1."""
    J = rng.normal(size=(1, 20))
    for p, q in ((1.0, np.inf), (2.0, 2), (math.inf, 1)):
        prop2, a2, rows = lipschitz_from_bounds(J, J, p, upper_ys=np.abs(J).sum(axis=1))
        assert prop2 == pytest.approx(np.linalg.norm(J[0], ord=q), rel=1e-12)
        assert prop2 >= np.linalg.norm(J[0], ord=q)
        if p == math.inf:
            assert a2 == pytest.approx(np.abs(J).sum(), rel=1e-12)
        else:
            assert a2 is None
    J = rng.normal(size=(4, 6))
    prop2, _, _ = lipschitz_from_bounds(J, J, 2.0)
    assert prop2 == pytest.approx(np.linalg.norm(np.abs(J), 2), rel=1e-9)
