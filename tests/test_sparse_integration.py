"""Pruned networks end to end: CSR layers in the model store (save / open / verify / info, corrupt stores) and the
opt-in sparse x dense kernels of the Jacobian chain (``Chain.with_sparse``): sound on pruned networks and equal to
the dense kernels up to the summation order."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.sparse as sp
import zarr

from recurjac_scale.errors import InputError, StoreError
from recurjac_scale.jacobian import jacobian_bounds
from recurjac_scale.jacobian import recurjac as rj
from recurjac_scale.jacobian.chain import Chain, panel_matmul
from recurjac_scale.jacobian.driver import run_chain
from recurjac_scale.jacobian.methods import get_jacobian_method
from recurjac_scale.layer_bounds import Region
from recurjac_scale.network import Network
from recurjac_scale.network.sparse import density, prune
from recurjac_scale.network.store import (
    FORMAT_VERSION,
    SPARSE_FORMAT_VERSION,
    layer_arrays,
    network_store_info,
    open_network,
    save_network,
    verify_network_store,
)
from recurjac_scale.testing import jacobian_attack_points, random_network, sample_region

METHODS = ("recurjac-b", "recurjac-f0", "recurjac-f1", "fastlip")


def _pruned_net(rng, widths=(12, 30, 26, 20, 4), fractions=(0.85, 0.5, 0.9, 0.2), act="relu", **kw):
    net = random_network(list(widths), act, rng, **kw)
    ws = [prune(w, f) for w, f in zip(net.weights, fractions)]
    return Network(ws, net.biases, net.activations, input_spec=net.input_spec)


# -- store ----------------------------------------------------------------------------------------------------------


@pytest.fixture
def sparse_store(tmp_path, rng):
    net = _pruned_net(rng)
    path = save_network(net, tmp_path / "pruned.zarr", sparse_threshold=0.3)
    return net, path


def test_store_round_trip_is_exact_and_forward_matches(sparse_store, rng):
    net, path = sparse_store
    expected = [k for k, w in enumerate(net.weights) if density(w) < 0.3]
    assert expected == [0, 2]
    for k in range(net.n_layers):  # CSR groups where sparse, dense arrays elsewhere
        node = zarr.open_group(str(path), mode="r")[f"layers/{k}/weight"]
        assert isinstance(node, zarr.Group) == (k in expected)
    opened = open_network(path)
    assert opened.is_lazy
    assert opened.provenance["sparse_layers"] == expected
    m = opened.materialize()
    for a, b in zip(m.weights, net.weights):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    for a, b in zip(m.biases, net.biases):
        np.testing.assert_array_equal(a, b)
    X = rng.uniform(-1, 1, size=(9, net.n_inputs))
    np.testing.assert_array_equal(opened.forward(X), net.forward(X))
    np.testing.assert_array_equal(m.jacobian(X), net.jacobian(X))
    # row / column slices of the lazy weight read the right panels
    w0 = opened.weights[0]
    np.testing.assert_array_equal(w0[3:17, 2:9].compute(), net.weights[0][3:17, 2:9])
    verify_network_store(path)
    info = network_store_info(path)
    assert info["format_version"] == SPARSE_FORMAT_VERSION and info["complete"]
    assert info["layers"][0]["weight"]["storage"] == "csr"
    assert info["layers"][0]["weight"]["nnz"] == np.count_nonzero(net.weights[0])
    assert "storage" not in info["layers"][1]["weight"]
    json.dumps(info)
    arrays = layer_arrays(path)
    w2 = arrays[2][0]
    np.testing.assert_array_equal(w2[:, :], net.weights[2])
    # orthogonal indexing (what the engine's streamed matrices use on zarr arrays)
    rows, cols = np.array([7, 2, 15]), np.array([0, 19, 4])
    np.testing.assert_array_equal(w2.oindex[rows, cols], net.weights[2][np.ix_(rows, cols)])
    np.testing.assert_array_equal(w2.oindex[3:9, cols], net.weights[2][3:9][:, cols])
    np.testing.assert_array_equal(w2.oindex[rows, 1:5], net.weights[2][rows, 1:5])


def test_dense_default_and_no_sparse_layer_keep_format_1(tmp_path, rng):
    net = _pruned_net(rng)
    for i, thr in enumerate((None, 0.05)):  # 0.05: no layer is that sparse
        p = save_network(net, tmp_path / f"d{i}.zarr", sparse_threshold=thr)
        attrs = json.loads((p / "zarr.json").read_text())["attributes"]
        assert attrs["format_version"] == FORMAT_VERSION and "sparse_layers" not in attrs
        assert "sparse_layers" not in open_network(p).provenance
        for k in range(net.n_layers):
            assert isinstance(zarr.open_group(str(p), mode="r")[f"layers/{k}/weight"], zarr.Array)


def test_float32_and_lazy_sparse_save(tmp_path, rng):
    net = _pruned_net(rng)
    p = save_network(net, tmp_path / "f32.zarr", sparse_threshold=0.3, dtype="float32")
    o = open_network(p)
    assert all(w.dtype == np.float32 for w in o.weights)
    m = o.materialize(np.float32)
    for a, b in zip(m.weights, net.weights):
        assert a.dtype == np.float32
        np.testing.assert_array_equal(a, b.astype(np.float32))
    # a lazy (dask) network is converted too; re-saving an opened sparse store is exact
    p2 = save_network(open_network(p), tmp_path / "again.zarr", sparse_threshold=0.3)
    m2 = open_network(p2).materialize()
    assert open_network(p2).provenance["sparse_layers"] == [0, 2]
    for a, b in zip(m2.weights, m.weights):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(InputError):
        save_network(net, tmp_path / "bad.zarr", sparse_threshold=1.5)


def _attrs(path, edit, member=""):
    f = path / member / "zarr.json"
    meta = json.loads(f.read_text())
    edit(meta["attributes"])
    f.write_text(json.dumps(meta))


def _refused(path, match):
    with pytest.raises(StoreError, match=match):
        m = open_network(path)
        verify_network_store(path)
        m.materialize()


def test_bad_csr_stores_fail_with_store_error(sparse_store, tmp_path):
    import shutil

    _net, good = sparse_store

    def copy(name):
        dst = tmp_path / name
        shutil.copytree(good, dst)
        return dst

    # wrong shape attribute of the CSR group
    p = copy("shape.zarr")
    _attrs(p, lambda a: a.update(shape=[a["shape"][0], a["shape"][1] + 1]), "layers/0/weight")
    _refused(p, "shape")
    # not a CSR group
    p = copy("fmt.zarr")
    _attrs(p, lambda a: a.update(format="something-else"), "layers/0/weight")
    _refused(p, "not a recurjac-scale-csr group")
    # declared sparse layer list missing: a version-2 store without it is "newer" than this reader
    p = copy("nolist.zarr")
    _attrs(p, lambda a: a.pop("sparse_layers"))
    _refused(p, "upgrade")
    # a sparse layer not declared: the CSR group is where an array should be
    p = copy("undeclared.zarr")
    _attrs(p, lambda a: a.update(sparse_layers=[0]))
    _refused(p, "is a group, expected an array")
    # a declared layer that is dense
    p = copy("declared.zarr")
    _attrs(p, lambda a: a.update(sparse_layers=[0, 1, 2]))
    _refused(p, "declared sparse")
    # invalid list
    p = copy("badlist.zarr")
    _attrs(p, lambda a: a.update(sparse_layers=[0, 7]))
    _refused(p, "sparse_layers")
    # a version-1 reader's view: the same store claiming version 1 is refused (the weight is a group)
    p = copy("v1.zarr")
    _attrs(p, lambda a: a.update(format_version=1))
    _refused(p, "is a group, expected an array")
    # lost chunk of the data array (reads as the NaN fill value) and of indices (reads as -1)
    p = copy("lostdata.zarr")
    shutil.rmtree(p / "layers/0/weight/data/c")
    _refused(p, "non-finite|corrupt")
    p = copy("lostidx.zarr")
    shutil.rmtree(p / "layers/2/weight/indices/c")
    _refused(p, "corrupt|column index")
    # missing array of the group
    p = copy("noptr.zarr")
    shutil.rmtree(p / "layers/0/weight/indptr")
    _refused(p, "indptr")


# -- kernels --------------------------------------------------------------------------------------------------------


def test_panel_matmul_sparse_equals_dense_blocking_invariant(rng):
    M = prune(rng.standard_normal((23, 40)), 0.9)
    X = rng.standard_normal((40, 3 * 16))
    S = sp.csr_array(M)
    out = panel_matmul(S, X, 16)
    np.testing.assert_allclose(out, M @ X, rtol=1e-13, atol=1e-13)
    # a column does not depend on the other columns (the blocking invariance the chain relies on)
    part = panel_matmul(S, np.ascontiguousarray(X[:, 16:32]), 16)
    np.testing.assert_array_equal(part, out[:, 16:32])


def test_with_sparse_selects_pruned_levels(rng):
    net = _pruned_net(rng)
    res = jacobian_bounds(net, np.full(net.n_inputs, 0.5), 0.1, method="recurjac-b")
    sc = res.chain.with_sparse(0.3)
    assert [s is not None for s in sc.sparse_mats] == [density(m) < 0.3 for m in sc.mats]
    for s, m in zip(sc.sparse_mats, sc.mats):
        if s is not None:
            np.testing.assert_array_equal(s.toarray(), m)
    assert res.chain.with_sparse(0.0).sparse_mats == ()
    assert res.chain.sparse_mats == ()  # default: dense
    # the constructors take the option too
    db = [(dl, du) for dl, du in zip(res.chain.dl[::-1], res.chain.du[::-1])]
    c2 = Chain.backward(net.with_outputs(res.outputs), db, sparse_threshold=0.3)
    assert [s is None for s in c2.sparse_mats] == [s is None for s in sc.sparse_mats]
    with pytest.raises(InputError):
        res.chain.with_sparse(-1)


def _assert_contains(lower, upper, C, net, X, what):
    J = np.einsum("mh,khn->kmn", C, net.jacobian(X))
    bad = (J < lower) | (J > upper)
    assert not bad.any(), f"{what}: exact Jacobian outside the sparse-kernel bounds at {np.argwhere(bad)[0]}"


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("act", ["relu", "tanh"])
def test_sparse_kernels_sound_and_equal_dense(method, act, rng):
    net = _pruned_net(rng, act=act, domain=(0.0, 1.0))
    x0 = rng.uniform(0, 1, net.n_inputs)
    jm = get_jacobian_method(method)
    used_sparse = 0
    for eps in (0.02, 0.15, 0.6):
        res = jacobian_bounds(net, x0, eps, method=method)
        sc = res.chain.with_sparse(0.3)
        used_sparse += sum(s is not None for s in sc.sparse_mats)
        lo, up, _ = run_chain(jm, sc)
        lo_b, up_b, _ = run_chain(jm, sc, row_block=3, col_block=5)
        # blocking invariance holds bitwise on the sparse path too
        np.testing.assert_array_equal(lo, lo_b)
        np.testing.assert_array_equal(up, up_b)
        # equal to the dense kernels up to the summation order (scipy sums a row's stored entries in index
        # order, BLAS in its own order): 1e-12 relative to the largest bound
        scale = max(np.abs(res.lower).max(), np.abs(res.upper).max(), 1e-300)
        assert np.abs(lo - res.lower).max() <= 1e-12 * scale
        assert np.abs(up - res.upper).max() <= 1e-12 * scale
        region = Region.of(net, x0, eps)
        X = np.vstack(
            [sample_region(region, 300, rng), jacobian_attack_points(net, region, rng, entries=2, steps=15)]
        )
        _assert_contains(lo, up, res.outputs, net, X, f"{method}/{act}/eps={eps}")
    assert used_sparse > 0


@pytest.mark.parametrize("method", ["recurjac-b", "recurjac-f0"])
def test_sparse_kernels_with_sharing_across_rows(method, rng, monkeypatch):
    """The shared-rows variant (forced) also runs sparse and stays equal to the dense kernels."""
    net = _pruned_net(rng, widths=(10, 24, 24, 24, 3), fractions=(0.8, 0.85, 0.9, 0.5))
    x0 = rng.uniform(0, 1, net.n_inputs)
    monkeypatch.setattr("recurjac_scale.jacobian.recurjac_shared.SHARE_RATIO", np.inf)
    jm = get_jacobian_method(method)
    res = jacobian_bounds(net, x0, 0.05, method=method)
    assert any(rj.uses_sharing(res.chain, t) for t in range(2, res.chain.n_steps + 1))
    sc = res.chain.with_sparse(0.3)
    assert sc.sparse_mats
    lo, up, _ = run_chain(jm, sc)
    scale = max(np.abs(res.lower).max(), np.abs(res.upper).max())
    assert np.abs(lo - res.lower).max() <= 1e-12 * scale
    assert np.abs(up - res.upper).max() <= 1e-12 * scale
    X = sample_region(Region.of(net, x0, 0.05), 500, rng)
    _assert_contains(lo, up, res.outputs, net, X, f"{method}/sharing")


def test_sparse_kernels_from_a_sparse_store(sparse_store):
    """A pruned network read from a CSR store gives the same bounds as its in-memory twin (dense kernels) and,
    with sparse kernels, the same up to the summation order."""
    net, path = sparse_store
    x0 = np.full(net.n_inputs, 0.3)
    a = jacobian_bounds(net, x0, 0.05, method="recurjac-f0")
    b = jacobian_bounds(open_network(path), x0, 0.05, method="recurjac-f0")
    np.testing.assert_array_equal(a.lower, b.lower)
    np.testing.assert_array_equal(a.upper, b.upper)
    lo, up, _ = run_chain(get_jacobian_method("recurjac-f0"), b.chain.with_sparse(0.3))
    scale = max(np.abs(a.lower).max(), np.abs(a.upper).max())
    assert np.abs(lo - a.lower).max() <= 1e-12 * scale and np.abs(up - a.upper).max() <= 1e-12 * scale
