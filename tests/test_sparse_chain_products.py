"""Sparse x dense in every product of the Jacobian methods (issue 5, pruned networks): the column-panel products
(RecurJac step 1, the magnitude chain, Fast-Lip) and the F1 finish with ``W(1)`` run on CSR copies when the chain
holds them (``Chain.with_sparse``).

What is checked, per method (fastlip, recurjac-b, recurjac-f0, recurjac-f1) on pruned ReLU and tanh networks:
- the sparse result equals the dense result to <= 1e-12 relative to the largest bound magnitude (not bitwise:
  scipy sums a row's stored entries in index order, BLAS in its own blocked order);
- the exact Jacobian (``Network.jacobian``) at random points, box vertices and attack points of the region lies in
  the sparse bounds;
- the sparse result is bitwise independent of uneven row / column blocks;
- scipy's product is a fixed-order sum per output entry (bitwise equal under changed row / column sets), which is
  what the blocking invariance rests on.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import scipy.sparse as sp

from recurjac_scale.jacobian import jacobian_bounds
from recurjac_scale.jacobian.chain import (
    Chain,
    finish_products,
    level_is_sparse,
    panel_csr_t,
    panel_products,
)
from recurjac_scale.jacobian.driver import run_chain
from recurjac_scale.jacobian.methods import get_jacobian_method
from recurjac_scale.layer_bounds import Region
from recurjac_scale.network import Network
from recurjac_scale.network.sparse import density, prune
from recurjac_scale.testing import jacobian_attack_points, project, random_network, sample_region

METHODS = ("fastlip", "recurjac-b", "recurjac-f0", "recurjac-f1")


def _pruned(rng, widths=(6, 28, 24, 20, 3), fractions=(0.85, 0.9, 0.8, 0.85), act="relu"):
    """Every layer pruned below 30% density, so every product of every method has a sparse operand."""
    net = random_network(list(widths), act, rng, domain=(0.0, 1.0))
    ws = [prune(w, f) / np.sqrt(1 - f) for w, f in zip(net.weights, fractions)]
    return Network(ws, net.biases, net.activations, input_spec=net.input_spec)


def _sparse_panel(rng, d, c, frac=0.8):
    V = rng.standard_normal((d, c))
    V[rng.random((d, c)) < frac] = 0.0
    V[:, 3] = 0.0  # an all-zero column
    return V


# -- the products themselves ------------------------------------------------------------------------------------------


def test_panel_products_fixed_order_under_any_row_and_column_set(rng):
    d, c, R = 57, 23, 37
    V = _sparse_panel(rng, d, c)
    A = rng.standard_normal((R, d)) * np.exp(rng.uniform(-20, 20, (R, d)))  # wide range: order matters
    chain = _one_level_chain(V, R)
    assert level_is_sparse(chain, 1)
    full, full_abs = panel_products(chain, 1, V, (A, False), (A, True))
    np.testing.assert_allclose(full, A @ V, rtol=0, atol=1e-12 * (np.abs(A) @ np.abs(V)).max())
    # every output entry equals the sequential sum over the column's stored entries in index order
    for i, k in itertools.product(range(0, R, 7), range(c)):
        acc = 0.0
        for r in np.flatnonzero(V[:, k]):
            acc = acc + A[i, r] * V[r, k]
        assert full[i, k] == acc
    for rows, cols in [
        (slice(0, 1), slice(0, 1)), (slice(5, 6), slice(2, 13)), (slice(3, 20), slice(7, 8)),
        (slice(1, 36), slice(4, 23)), (np.array([30, 2, 17]), np.array([22, 0, 9, 3])),
    ]:
        part, part_abs = panel_products(chain, 1, np.ascontiguousarray(V[:, cols]), (A[rows], False), (A[rows], True))
        np.testing.assert_array_equal(part, full[rows][:, cols])
        np.testing.assert_array_equal(part_abs, full_abs[rows][:, cols])
    # the dense panel's CSR transpose is canonical: sorted, no zeros stored
    Bt = panel_csr_t(V)
    assert Bt.has_sorted_indices and Bt.nnz == np.count_nonzero(V)


def _one_level_chain(V, R):
    d, c = V.shape
    z = np.zeros(d)
    return Chain(top=np.zeros((R, d)), mats=(V,), dl=(z,), du=(z + 1,)).with_sparse(0.3)


def test_finish_products_fixed_order_under_any_column_set(rng):
    n1, n0, m = 41, 19, 9
    W1 = _sparse_panel(rng, n1, n0).copy()
    top = rng.standard_normal((5, n1))
    ch = Chain(
        top=top, mats=(rng.standard_normal((n1, m)),), dl=(np.zeros(n1),), du=(np.ones(n1),), direction="forward",
        finish_mat=W1, finish_dl=np.zeros(n1), finish_du=np.ones(n1),
    )
    sc = ch.with_sparse(0.3)
    assert sc.sparse_finish is not None and sc.sparse_finish.shape == (n0, n1)
    np.testing.assert_array_equal(sc.sparse_finish.toarray(), W1.T)
    B = rng.standard_normal((n1, m)) * np.exp(rng.uniform(-15, 15, (n1, m)))
    full, full_abs = finish_products(sc, (B, False), (B, True))
    dense, dense_abs = finish_products(ch, (B, False), (B, True))
    np.testing.assert_allclose(full, dense, rtol=1e-9, atol=1e-9 * (np.abs(W1.T) @ np.abs(B)).max())
    for cols in (slice(0, 1), slice(2, 7), np.array([8, 1, 4])):
        part, part_abs = finish_products(sc, (np.ascontiguousarray(B[:, cols]), False), (B[:, cols], True))
        np.testing.assert_array_equal(part, full[:, cols])
        np.testing.assert_array_equal(part_abs, full_abs[:, cols])
    # On a subset of the layer-1 neurons (the live ones of the F1 finish): the products over those rows of B only.
    keep = np.array([0, 3, 4, 17, 40])
    Bk = np.ascontiguousarray(B[keep])
    for c in (sc, ch):
        sub, sub_abs = finish_products(c, (Bk, False), (Bk, True), keep=keep)
        ref = W1.T[:, keep]
        np.testing.assert_allclose(sub, ref @ Bk, rtol=1e-12, atol=1e-12 * (np.abs(ref) @ np.abs(Bk)).max())
        np.testing.assert_allclose(sub_abs, np.abs(ref) @ Bk, rtol=1e-12,
                                   atol=1e-12 * (np.abs(ref) @ np.abs(Bk)).max())


def test_with_sparse_levels_and_finish_selection(rng):
    net = _pruned(rng)
    res = jacobian_bounds(net, np.full(net.n_inputs, 0.5), 0.05, method="recurjac-f1")
    T = res.chain.n_steps
    sc = res.chain.with_sparse(0.3)
    assert all(s is not None for s in sc.sparse_mats) and sc.sparse_finish is not None and sc.is_sparse
    only = res.chain.with_sparse(np.inf, levels=[1, T + 1])
    assert [s is not None for s in only.sparse_mats] == [t == 1 for t in range(1, T + 1)]
    assert only.sparse_finish is not None
    none = res.chain.with_sparse(0.0)
    assert none.sparse_mats == () and none.sparse_finish is None and not none.is_sparse
    with pytest.raises(Exception):
        res.chain.with_sparse(0.3, levels=[T + 2])


# -- every method, end to end --------------------------------------------------------------------------------------


def _vertices(region, n0):
    corners = np.array(list(itertools.product([-1.0, 1.0], repeat=n0)))
    return project(region, region.x0 + region.eps * corners)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("act", ["relu", "tanh"])
def test_every_product_sparse_equal_dense_and_sound(method, act, rng):
    net = _pruned(rng, act=act)
    assert all(density(w) < 0.3 for w in net.weights)
    jm = get_jacobian_method(method)
    x0 = rng.uniform(0.2, 0.8, net.n_inputs)
    for eps in (0.03, 0.25):
        res = jacobian_bounds(net, x0, eps, method=method)  # dense kernels
        sc = res.chain.with_sparse(0.3)
        assert level_is_sparse(sc, 1)  # step 1 / Fast-Lip's first panel runs sparse
        if method == "recurjac-f1":
            assert sc.sparse_finish is not None
        lo, up, _ = run_chain(jm, sc)
        # equal to the dense kernels up to the summation order (not bitwise): 1e-12 of the largest magnitude
        scale = max(np.abs(res.lower).max(), np.abs(res.upper).max(), 1e-300)
        assert np.abs(lo - res.lower).max() <= 1e-12 * scale
        assert np.abs(up - res.upper).max() <= 1e-12 * scale
        # uneven blockings: bitwise the same
        for rb, cb in ((1, 1), (2, 7), (5, 3)):
            lo_b, up_b, _ = run_chain(jm, sc, row_block=rb, col_block=cb)
            np.testing.assert_array_equal(lo_b, lo)
            np.testing.assert_array_equal(up_b, up)
        # containment of the exact Jacobian at random points, all box vertices and attack points
        region = Region.of(net, x0, eps)
        X = np.vstack([
            sample_region(region, 300, rng),
            _vertices(region, net.n_inputs),
            jacobian_attack_points(net, region, rng, entries=2, steps=15),
        ])
        J = np.einsum("mh,khn->kmn", res.outputs, net.jacobian(X))
        bad = (J < lo) | (J > up)
        assert not bad.any(), f"{method}/{act}/eps={eps}: exact Jacobian outside at {np.argwhere(bad)[0]}"


@pytest.mark.parametrize("method", METHODS)
def test_sparse_product_actually_used(method, rng, monkeypatch):
    """Corrupting the sparse product changes the result: the sparse paths are the ones that ran."""
    import recurjac_scale.jacobian.products as ch

    net = _pruned(rng)
    jm = get_jacobian_method(method)
    x0 = rng.uniform(0.2, 0.8, net.n_inputs)
    res = jacobian_bounds(net, x0, 0.05, method=method)
    sc = res.chain.with_sparse(0.3)
    lo, up, _ = run_chain(jm, sc)
    orig = ch._csr_times_dense_t
    monkeypatch.setattr(ch, "_csr_times_dense_t", lambda B, A: 1.01 * orig(B, A))
    lo2, up2, _ = run_chain(jm, sc)
    assert not (np.array_equal(lo, lo2) and np.array_equal(up, up2))
