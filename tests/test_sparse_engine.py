"""The engine on pruned networks (issue 5): a model store with CSR layers runs its layers sparse x dense by default
(``sparse_threshold="auto"``), in every worker process, and the result equals the in-memory sparse result bitwise
(threads scheduler, streamed weights, a real 2-worker LocalCluster on 127.0.0.1); the plan counts the sparse
levels by their stored entries."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from recurjac_scale.engine import plan_jacobian
from recurjac_scale.jacobian import JACOBIAN_METHODS, jacobian_bounds
from recurjac_scale.network import Network
from recurjac_scale.network.sparse import prune
from recurjac_scale.network.store import open_network, save_network
from recurjac_scale.testing import random_network


METHODS = sorted(n for n, m in JACOBIAN_METHODS.items() if m.run is None)  # the engine's methods


@pytest.fixture
def pruned_store(tmp_path, rng):
    net = random_network([7, 26, 22, 18, 4], "relu", rng, domain=(0.0, 1.0))
    fr = (0.85, 0.9, 0.8, 0.5)  # the last layer stays dense (density 50%)
    ws = [prune(w, f) / math.sqrt(1 - f) for w, f in zip(net.weights, fr)]
    net = Network(ws, net.biases, net.activations, input_spec=net.input_spec)
    path = save_network(net, tmp_path / "pruned.zarr", sparse_threshold=0.3, chunk_edge=8)
    x0 = rng.uniform(0.2, 0.8, size=7)
    return net, path, x0


def _reference(path, x0, method):
    """The in-memory result through the sparse kernels of the store's CSR layers."""
    return jacobian_bounds(open_network(path), x0, 0.06, math.inf, method=method, layer_bounds="crown",
                           sparse_threshold="auto")


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("stream", [False, True])
def test_store_with_csr_layers_runs_sparse_and_equals_in_memory(pruned_store, method, stream):
    net, path, x0 = pruned_store
    ref = _reference(path, x0, method)
    assert ref.chain.is_sparse
    dense = jacobian_bounds(net, x0, 0.06, math.inf, method=method, layer_bounds="crown")
    scale = max(np.abs(dense.lower).max(), np.abs(dense.upper).max())
    assert np.abs(ref.lower - dense.lower).max() <= 1e-12 * scale  # summation order only
    assert np.abs(ref.upper - dense.upper).max() <= 1e-12 * scale
    plan = plan_jacobian(path, x0, 0.06, math.inf, method, layer_bounds="crown", row_block=3, col_block=4,
                         stream_weights=stream)
    assert plan.sparse_levels and "sparse x dense" in plan.describe()
    assert set(plan.context.sparse_levels) == set(ref.chain.sparse_levels())
    res = plan.compute(scheduler="threads", durable=False)
    np.testing.assert_array_equal(res.lower, ref.lower)
    np.testing.assert_array_equal(res.upper, ref.upper)


def test_threshold_zero_is_dense_and_plan_counts_nnz(pruned_store):
    net, path, x0 = pruned_store
    sp_plan = plan_jacobian(path, x0, 0.06, math.inf, "recurjac-b", layer_bounds="crown")
    dn_plan = plan_jacobian(path, x0, 0.06, math.inf, "recurjac-b", layer_bounds="crown", sparse_threshold=0)
    assert dn_plan.sparse_levels == () and sp_plan.sparse_levels
    assert dn_plan.job_id != sp_plan.job_id  # a checkpoint never mixes sparse and dense blocks
    # every step reads a sparse level (level GEMMs or the step's panel): FLOPs by nnz are smaller
    for a, b in zip(sp_plan.steps, dn_plan.steps):
        assert a.flops < b.flops and a.flops_dense < b.flops_dense
    assert sp_plan.weights_bytes > dn_plan.weights_bytes  # the CSR copies are held besides the dense matrices
    res = dn_plan.compute(scheduler="synchronous", durable=False)
    ref = jacobian_bounds(net, x0, 0.06, math.inf, method="recurjac-b", layer_bounds="crown")
    np.testing.assert_array_equal(res.lower, ref.lower)
    np.testing.assert_array_equal(res.upper, ref.upper)


def test_explicit_threshold_on_an_in_memory_network(pruned_store):
    net, _path, x0 = pruned_store
    ref = jacobian_bounds(net, x0, 0.06, math.inf, method="recurjac-f1", layer_bounds="crown", sparse_threshold=0.3)
    assert ref.chain.sparse_finish is not None
    plan = plan_jacobian(net, x0, 0.06, math.inf, "recurjac-f1", layer_bounds="crown", row_block=5, col_block=3,
                         sparse_threshold=0.3)
    assert "W(1) finish" in plan.sparse_levels
    res = plan.compute(scheduler="threads", durable=False)
    np.testing.assert_array_equal(res.lower, ref.lower)
    np.testing.assert_array_equal(res.upper, ref.upper)
    # an in-memory network has no stored CSR layers: "auto" is dense
    assert plan_jacobian(net, x0, 0.06, math.inf, "recurjac-f1", layer_bounds="crown").sparse_levels == ()


@pytest.mark.cluster
@pytest.mark.parametrize("method", METHODS)
def test_cluster_sparse_store_equals_in_memory(client, pruned_store, method):  # noqa: F811
    _net, path, x0 = pruned_store
    ref = _reference(path, x0, method)
    plan = plan_jacobian(path, x0, 0.06, math.inf, method, layer_bounds="crown", row_block=2, col_block=5)
    assert plan.sparse_levels
    res = plan.compute(client=client, durable=False)
    assert res.executor["scheduler"] == "distributed" and res.executor["n_workers"] == 2
    np.testing.assert_array_equal(res.lower, ref.lower)
    np.testing.assert_array_equal(res.upper, ref.upper)
    # the workers run this checkout's code, and the chains they built (once per process) hold the CSR copies
    import recurjac_scale

    files = client.run(lambda: __import__("recurjac_scale").__file__)
    assert set(files.values()) == {recurjac_scale.__file__}
    sparse = client.run(_worker_chains_sparse)
    assert any(v for v in sparse.values()) and all(all(v) for v in sparse.values())


def _worker_chains_sparse():
    from recurjac_scale.engine import blocks

    return [bool(c.chain.is_sparse) for c in blocks._CHAINS.values()]


def test_cli_sparse_threshold(pruned_store, tmp_path, capsys):
    from recurjac_scale.cli import main

    _net, path, x0 = pruned_store
    np.save(tmp_path / "x.npy", x0)
    common = [str(path), "--input", str(tmp_path / "x.npy"), "--eps", "0.06", "--layer-bounds", "crown"]
    assert main(["plan", *common, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["sparse_levels"]  # auto: the store's CSR layers
    assert main(["plan", *common, "--json", "--sparse-threshold", "0"]) == 0
    assert json.loads(capsys.readouterr().out)["sparse_levels"] == []
    for thr in ("auto", "0"):
        assert main(["bounds", *common, "--sparse-threshold", thr, "-o", str(tmp_path / f"b{thr}.npz"), "--quiet"]) == 0
    a, b = np.load(tmp_path / "bauto.npz"), np.load(tmp_path / "b0.npz")
    ref = _reference(path, x0, "recurjac-b")
    np.testing.assert_array_equal(a["lower"], ref.lower)
    scale = np.abs(b["upper"]).max()
    assert np.abs(a["upper"] - b["upper"]).max() <= 1e-12 * scale
    assert main(["run", *common, "-o", str(tmp_path / "r.zarr"), "--quiet", "--no-checkpoint"]) == 0
    import zarr

    np.testing.assert_array_equal(zarr.open_group(str(tmp_path / "r.zarr"), mode="r")["upper"][...], ref.upper)
    with pytest.raises(SystemExit):
        main(["plan", *common, "--sparse-threshold", "-1"])
    assert "--sparse-threshold" in capsys.readouterr().err
