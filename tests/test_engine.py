"""The execution engine (recurjac_scale.engine): the blockwise result on every local scheduler equals the in-memory
result bitwise, for every Jacobian method and uneven blockings; the plan's task counts, cost model and block choice;
checkpoint / resume bound to the job; the wall-time estimate.

The cluster (LocalCluster) and kill tests are in tests/test_engine_cluster.py."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from recurjac_scale.engine import estimate_wall_time, plan_jacobian
from recurjac_scale.engine.plan import choose_blocks, parse_bytes
from recurjac_scale.errors import IncompleteRunError, InputError, OutputExistsError, StoreError
from recurjac_scale.jacobian import JACOBIAN_METHODS, jacobian_bounds
from recurjac_scale.testing import assert_tasks_within_plan_memory, random_network

METHODS = sorted(n for n, m in JACOBIAN_METHODS.items() if m.run is None)  # the engine's methods
EPS = 0.08


@pytest.fixture(scope="module")
def small():
    """A 4-layer net whose widths no block size below divides; inputs in the domain [0, 1]."""
    rng = np.random.default_rng(7)
    net = random_network([7, 13, 11, 9, 5], "relu", rng, domain=(0.0, 1.0))
    x0 = rng.uniform(0.2, 0.8, size=7)
    return net, x0


@pytest.fixture(scope="module")
def reference(small):
    net, x0 = small
    return {m: jacobian_bounds(net, x0, EPS, math.inf, method=m, layer_bounds="crown") for m in METHODS}


class _Fast:
    """A plan whose ``compute`` skips the fsyncs (slow on this disk; the kill tests keep them)."""

    def __init__(self, plan):
        self._plan = plan

    def __getattr__(self, name):
        return getattr(self._plan, name)

    def compute(self, **kw):
        kw.setdefault("durable", False)
        return self._plan.compute(**kw)


def _plan(net, x0, method, **kw):
    kw.setdefault("layer_bounds", "crown")
    return _Fast(plan_jacobian(net, x0, EPS, math.inf, method, **kw))


def _same(res, ref):
    assert res.lower.shape == ref.lower.shape
    np.testing.assert_array_equal(res.lower, ref.lower)
    np.testing.assert_array_equal(res.upper, ref.upper)


# -- equality with the in-memory result -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def process_pool():
    """One pool of 2 spawned worker processes shared by the tests (start-up and numba cache loads once)."""
    from recurjac_scale.engine.schedulers import open_executor

    with open_executor("processes", workers=2) as ex:
        yield ex


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("scheduler", ["synchronous", "threads", "processes"])
def test_scheduler_result_equals_in_memory(small, reference, method, scheduler, request):
    net, x0 = small
    plan = _plan(net, x0, method, row_block=3, col_block=4)
    ex = request.getfixturevalue("process_pool") if scheduler == "processes" else None
    res = plan.compute(scheduler=scheduler, executor=ex)
    _same(res, reference[method])
    assert res.blocks_computed == res.blocks_total == sum(s.n_tasks for s in plan.steps)
    assert res.blocks_reused == 0
    assert res.executor["scheduler"] == ("synchronous" if scheduler == "synchronous" else scheduler)


def test_large_in_memory_network_spilled_to_a_store_for_processes(small, reference, process_pool, tmp_path, monkeypatch):
    from recurjac_scale.engine import run as engine_run

    monkeypatch.setattr(engine_run, "SPILL_BYTES", 0)
    net, x0 = small
    res = _plan(net, x0, "recurjac-f1", row_block=3, col_block=4).compute(executor=process_pool, checkpoint=tmp_path / "ck")
    _same(res, reference["recurjac-f1"])
    assert (tmp_path / "ck" / "model.zarr").is_dir()


def test_processes_scheduler_by_name(small, reference):
    net, x0 = small
    res = _plan(net, x0, "recurjac-b", row_block=4, col_block=5).compute(scheduler="processes", workers=2)
    _same(res, reference["recurjac-b"])
    assert res.executor["n_workers"] == 2


@pytest.mark.parametrize("method", ["recurjac-b", "recurjac-f0"])
@pytest.mark.parametrize("blocks", [(1, 3), (2, 5), (4, 1), (100, 100)])
def test_blocking_does_not_change_the_result(small, reference, method, blocks):
    net, x0 = small
    res = _plan(net, x0, method, row_block=blocks[0], col_block=blocks[1]).compute(scheduler="threads")
    _same(res, reference[method])


@pytest.mark.parametrize("cache_bytes", [0, 10**9])
def test_prior_cache_bounded_and_read_only(small, reference, monkeypatch, cache_bytes):
    """Tasks read earlier states through a per-process cache: without it (0 bytes) and with a large one the result
    is the in-memory one bitwise, the cache stays within its bound, and cached rows cannot be modified in place."""
    import recurjac_scale.engine.run as run

    monkeypatch.setattr(run, "PRIOR_CACHE_BYTES", cache_bytes)
    monkeypatch.setattr(run, "_PRIORS", run.OrderedDict())
    monkeypatch.setattr(run, "_PRIORS_BYTES", [0])
    net, x0 = small
    res = _plan(net, x0, "recurjac-f0", row_block=2, col_block=3).compute(scheduler="threads")
    _same(res, reference["recurjac-f0"])
    assert run._PRIORS_BYTES[0] == sum(a.nbytes for a in run._PRIORS.values()) <= cache_bytes
    assert (len(run._PRIORS) > 0) == (cache_bytes > 0)
    for a in run._PRIORS.values():
        assert not a.flags.writeable


def test_other_activations_norms_and_outputs(rng):
    net = random_network([6, 10, 9, 4], "tanh", rng)
    x0 = rng.normal(size=6)
    for p, outputs in ((2.0, None), (1.0, (1, 3)), (math.inf, 2)):
        ref = jacobian_bounds(net, x0, 0.3, p, method="recurjac-f1", layer_bounds="ibp", outputs=outputs)
        res = plan_jacobian(
            net, x0, 0.3, p, "recurjac-f1", layer_bounds="ibp", outputs=outputs, row_block=4, col_block=3
        ).compute(scheduler="threads")
        _same(res, ref)


def test_global_bounds_eps_inf(rng):
    net = random_network([5, 8, 7, 3], "sigmoid", rng)
    x0 = rng.normal(size=5)
    ref = jacobian_bounds(net, x0, math.inf, math.inf, method="recurjac-b")
    res = plan_jacobian(net, x0, math.inf, math.inf, "recurjac-b", row_block=2, col_block=3).compute()
    _same(res, ref)
    assert res.layer_bound_method == "global"


def test_store_backed_network_reads_weights_in_tasks(tmp_path, rng):
    from recurjac_scale.network.store import open_network, save_network

    net = random_network([9, 14, 12, 4], "relu", rng)
    x0 = rng.normal(size=9)
    save_network(net, tmp_path / "m.zarr", chunk_edge=5)
    ref = jacobian_bounds(net, x0, 0.05, math.inf, method="recurjac-f0", layer_bounds="ibp")
    plan = plan_jacobian(tmp_path / "m.zarr", x0, 0.05, math.inf, "recurjac-f0", layer_bounds="ibp", row_block=4, col_block=5)
    assert plan.context.worker_spec().network is None  # workers open the store themselves
    _same(plan.compute(scheduler="threads"), ref)
    # an opened (lazy) network gives the same job
    plan2 = plan_jacobian(open_network(tmp_path / "m.zarr"), x0, 0.05, math.inf, "recurjac-f0", layer_bounds="ibp", row_block=4, col_block=5)
    assert plan2.job_id == plan.job_id


@pytest.mark.parametrize("widths", [[5, 7, 3], [5, 3]])
def test_shallow_networks(widths, rng):
    """One hidden layer (F1 has no layer step left) and none at all (every method: W exactly)."""
    net = random_network(widths, "relu", rng)
    x0 = rng.normal(size=5)
    for m in METHODS:
        ref = jacobian_bounds(net, x0, 0.05, math.inf, method=m, layer_bounds="ibp")
        plan = plan_jacobian(net, x0, 0.05, math.inf, m, layer_bounds="ibp", row_block=2, col_block=2)
        _same(plan.compute(durable=False), ref)
        assert estimate_wall_time(plan, {}, workers=(2,))["n_tasks"] == plan.n_tasks if not plan.steps else True


@pytest.mark.parametrize("method", METHODS)
def test_streamed_weights_equal_in_memory(tmp_path, rng, method):
    """Tasks reading every matrix from the store (workers do not hold the network) give the same bits."""
    from recurjac_scale.engine.streaming import StoreMatrix
    from recurjac_scale.network.store import save_network

    net = random_network([9, 14, 12, 11, 4], "relu", rng)
    x0 = rng.normal(size=9)
    save_network(net, tmp_path / "m.zarr", chunk_edge=5)
    for outputs in (None, (1, 2)):
        ref = jacobian_bounds(net, x0, 0.05, math.inf, method=method, layer_bounds="ibp", outputs=outputs)
        plan = plan_jacobian(tmp_path / "m.zarr", x0, 0.05, math.inf, method, layer_bounds="ibp", row_block=3,
                             col_block=4, stream_weights=True, outputs=outputs)
        assert plan.stream_weights and "streamed" in plan.describe()
        _same(plan.compute(scheduler="threads", durable=False), ref)
        chain = plan.context.worker_spec().chain().chain
        assert any(isinstance(m, StoreMatrix) for m in chain.mats)


def test_streaming_chosen_by_the_memory_budget(tmp_path, rng):
    from recurjac_scale.network.store import save_network

    net = random_network([20, *[200] * 12, 5], "relu", rng)  # deep: the weights dominate a task's memory
    x0 = rng.normal(size=20)
    save_network(net, tmp_path / "m.zarr")
    store = tmp_path / "m.zarr"
    held = plan_jacobian(store, x0, 0.05, math.inf, "recurjac-b", layer_bounds="ibp", row_block=5, col_block=100)
    streamed = plan_jacobian(store, x0, 0.05, math.inf, "recurjac-b", layer_bounds="ibp", row_block=5, col_block=100,
                             stream_weights=True)
    assert not held.stream_weights and streamed.peak_worker_bytes < held.peak_worker_bytes
    budget = (streamed.peak_worker_bytes + held.peak_worker_bytes) // 2  # the held weights do not fit
    plan = plan_jacobian(store, x0, 0.05, math.inf, "recurjac-b", layer_bounds="ibp", row_block=5, col_block=100,
                         memory_budget=budget)
    assert plan.stream_weights and plan.peak_worker_bytes <= budget
    with pytest.raises(InputError, match="model store"):
        plan_jacobian(net, x0, 0.05, math.inf, "recurjac-b", layer_bounds="ibp", stream_weights=True)


# -- the result store -------------------------------------------------------------------------------------------
def test_result_store_written_and_not_overwritten(tmp_path, small, reference):
    import zarr

    net, x0 = small
    out = tmp_path / "r.zarr"
    plan = _plan(net, x0, "recurjac-b", row_block=2, col_block=3)
    res = plan.compute(output=out)
    g = zarr.open_group(str(out), mode="r")
    np.testing.assert_array_equal(g["lower"][...], reference["recurjac-b"].lower)
    np.testing.assert_array_equal(g["upper"][...], reference["recurjac-b"].upper)
    attrs = dict(g.attrs)
    assert attrs["format"] == "recurjac-scale-jacobian-bounds" and attrs["complete"] is True
    assert attrs["result"]["job_id"] == plan.job_id
    assert attrs["result"]["lipschitz"] == pytest.approx(res.lipschitz)
    json.dumps(attrs)  # plain JSON
    with pytest.raises(OutputExistsError):
        plan.compute(output=out)
    plan.compute(output=out, overwrite=True)
    # no stray temporary folders next to the output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.zarr"]


# -- checkpoint / resume ----------------------------------------------------------------------------------------
def _records(ckpt: Path) -> int:
    return len(list((ckpt / "done").glob("step-*/*.json")))


@pytest.mark.parametrize("method", ["recurjac-f0", "fastlip"])
def test_resume_recomputes_no_finished_block(tmp_path, small, reference, method):
    net, x0 = small
    ck = tmp_path / "ck"
    plan = _plan(net, x0, method, row_block=3, col_block=4)
    total = sum(s.n_tasks for s in plan.steps)
    with pytest.raises(IncompleteRunError, match="max_blocks"):
        plan.compute(checkpoint=ck, max_blocks=7, scheduler="synchronous")
    assert _records(ck) == 7
    with pytest.raises(IncompleteRunError, match="max_blocks"):
        plan.compute(checkpoint=ck, max_blocks=5, scheduler="threads")
    assert _records(ck) == 12
    res = plan.compute(checkpoint=ck, scheduler="threads")
    assert res.blocks_reused == 12 and res.blocks_computed == total - 12
    _same(res, reference[method])
    # a rerun of a finished job recomputes nothing
    res2 = plan.compute(checkpoint=ck, scheduler="synchronous")
    assert res2.blocks_reused == total and res2.blocks_computed == 0
    _same(res2, reference[method])


def test_resume_checks_the_recorded_data(tmp_path, small, reference):
    """Recorded data is never trusted blindly: a value tampered with in a recorded block no longer matches the
    block's SHA-256 checksum, so that block (and only it) is recomputed and the result is the true one."""
    import zarr

    net, x0 = small
    ck = tmp_path / "ck"
    plan = _plan(net, x0, "recurjac-b", row_block=2, col_block=3)
    plan.compute(checkpoint=ck)
    T = len(plan.steps)
    a = zarr.open_array(str(ck / "state.zarr" / f"step-{T:03d}" / "upper"), mode="r+")
    a[0, 0] = 1e6
    res = plan.compute(checkpoint=ck)
    assert res.blocks_computed == 1 and res.blocks_reused == res.blocks_total - 1
    _same(res, reference["recurjac-b"])


def test_missing_record_means_recompute(tmp_path, small, reference):
    net, x0 = small
    ck = tmp_path / "ck"
    plan = _plan(net, x0, "recurjac-f1", row_block=3, col_block=4)
    plan.compute(checkpoint=ck)
    recs = sorted((ck / "done").glob("step-*/*.json"))
    for r in recs[:3]:
        r.unlink()
    recs[3].write_text("{not json")  # a torn record counts as not done
    res = plan.compute(checkpoint=ck)
    assert res.blocks_computed == 4
    _same(res, reference["recurjac-f1"])


def test_checkpoint_bound_to_the_job(tmp_path, small):
    net, x0 = small
    ck = tmp_path / "ck"
    _plan(net, x0, "recurjac-b", row_block=2, col_block=3).compute(checkpoint=ck)
    ids = set()
    for kw in (
        dict(method="recurjac-b", row_block=2, col_block=4),  # other blocking
        dict(method="recurjac-f0", row_block=2, col_block=3),  # other method
    ):
        other = _plan(net, x0, kw.pop("method"), **kw)
        ids.add(other.job_id)
        with pytest.raises(StoreError, match="another job"):
            other.compute(checkpoint=ck)
    other_eps = plan_jacobian(net, x0, EPS / 2, math.inf, "recurjac-b", layer_bounds="crown", row_block=2, col_block=3)
    other_x = plan_jacobian(net, x0 + 0.01, EPS, math.inf, "recurjac-b", layer_bounds="crown", row_block=2, col_block=3)
    other_p = plan_jacobian(net, x0, EPS, 2, "recurjac-b", layer_bounds="crown", row_block=2, col_block=3)
    other_lb = plan_jacobian(net, x0, EPS, math.inf, "recurjac-b", layer_bounds="ibp", row_block=2, col_block=3)
    same = _plan(net, x0, "recurjac-b", row_block=2, col_block=3)
    ids |= {other_eps.job_id, other_x.job_id, other_p.job_id, other_lb.job_id}
    assert same.job_id not in ids and len(ids) == 6
    w = [np.array(a, copy=True) for a in net.weights]
    w[1][0, 0] += 1e-9
    from recurjac_scale.network.model import Network

    net2 = Network(w, net.biases, net.activations, input_spec=net.input_spec)
    assert plan_jacobian(net2, x0, EPS, math.inf, "recurjac-b", layer_bounds="crown", row_block=2, col_block=3).job_id != same.job_id
    # overwrite discards a foreign checkpoint
    res = other_eps.compute(checkpoint=ck, overwrite=True)
    assert res.blocks_reused == 0


def test_checkpoint_folder_reused_by_another_job_in_the_same_process(tmp_path, small, reference):
    net, x0 = small
    ck = tmp_path / "ck"
    for method, blocks in (("recurjac-b", (2, 3)), ("recurjac-f0", (3, 2)), ("recurjac-b", (4, 4))):
        res = _plan(net, x0, method, row_block=blocks[0], col_block=blocks[1]).compute(checkpoint=ck, overwrite=True)
        assert res.blocks_reused == 0
        _same(res, reference[method])


def test_not_a_checkpoint_folder_is_never_touched(tmp_path, small):
    net, x0 = small
    d = tmp_path / "precious"
    d.mkdir()
    (d / "data.txt").write_text("keep me")
    with pytest.raises(StoreError, match="not a recurjac-scale checkpoint"):
        _plan(net, x0, "recurjac-b").compute(checkpoint=d, overwrite=True)
    assert (d / "data.txt").read_text() == "keep me"


def test_failed_block_is_not_recorded(tmp_path, small, monkeypatch):
    from recurjac_scale.jacobian import JacobianMethod

    net, x0 = small
    ck = tmp_path / "ck"
    plan = _plan(net, x0, "recurjac-b", row_block=2, col_block=3)
    calls = {"n": 0}
    orig = JacobianMethod.step_block

    def flaky(self, chain, t, rows, cols, priors):
        calls["n"] += 1
        if t == 2 and rows.start == 2:
            raise FloatingPointError("boom")
        return orig(self, chain, t, rows, cols, priors)

    monkeypatch.setattr(JacobianMethod, "step_block", flaky)
    with pytest.raises(FloatingPointError):
        plan.compute(checkpoint=ck, scheduler="synchronous")
    recs = [json.loads(p.read_text()) for p in (ck / "done").glob("step-*/*.json")]
    assert not any(r["step"] == 2 and r["rows"][0] == 2 for r in recs)
    assert ck.exists()  # a given checkpoint survives a failure
    monkeypatch.setattr(JacobianMethod, "step_block", orig)
    res = plan.compute(checkpoint=ck, scheduler="synchronous")
    assert res.blocks_reused == len(recs)


def test_temporary_state_removed(tmp_path, small, monkeypatch):
    import tempfile

    net, x0 = small
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    _plan(net, x0, "fastlip").compute()
    assert list(tmp_path.iterdir()) == []


# -- the plan -------------------------------------------------------------------------------------------------
def test_plan_counts_and_costs(small):
    net, x0 = small
    plan = _plan(net, x0, "recurjac-f0", row_block=3, col_block=4)
    # F0 chain: rows = 7 inputs, widths (d_1 .. d_4) = (13, 11, 9, 5)
    assert plan.n_rows == 7 and plan.chain_widths == (13, 11, 9, 5)
    assert [s.n_tasks for s in plan.steps] == [3 * 3, 3 * 3, 3 * 2]
    assert plan.n_tasks == 9 + 9 + 6 + 1
    for s in plan.steps:
        assert 0 < s.flops <= s.flops_dense
        assert s.task_peak_bytes >= s.task_state_bytes
    # step t reads steps 1..t-1 for 3 rows, three state arrays each
    assert plan.steps[2].task_state_bytes == 3 * (11 + 9) * 3 * 8
    assert plan.steps[0].task_state_bytes == 0
    # dead neurons reduce the count; the dense count is the ALGORITHM.md formula per entry and both chains
    assert sum(plan.dead[:3]) > 0 and plan.flops < sum(s.flops_dense for s in plan.steps)
    d = plan.to_dict()
    json.dumps(d)
    assert d["n_tasks"] == plan.n_tasks and len(d["steps"]) == 3
    assert "GFLOP" in plan.describe()


def test_plan_runs_nothing_heavy(tmp_path, small, monkeypatch):
    from recurjac_scale.jacobian import JacobianMethod

    def boom(*a, **k):
        raise AssertionError("plan must not run blocks")

    monkeypatch.setattr(JacobianMethod, "step_block", boom)
    net, x0 = small
    plan = _plan(net, x0, "recurjac-b")
    assert plan.n_tasks > 0


def test_memory_budget_picks_fitting_blocks(rng):
    net = random_network([24, 40, 40, 40, 6], "relu", rng)
    x0 = rng.normal(size=24)
    free = plan_jacobian(net, x0, 0.1, math.inf, "recurjac-f0", layer_bounds="ibp")
    smallest = plan_jacobian(net, x0, 0.1, math.inf, "recurjac-f0", layer_bounds="ibp", row_block=1, col_block=1)
    assert smallest.peak_worker_bytes < free.peak_worker_bytes
    budget = (free.peak_worker_bytes + smallest.peak_worker_bytes) // 2
    plan = plan_jacobian(net, x0, 0.1, math.inf, "recurjac-f0", layer_bounds="ibp", memory_budget=budget)
    assert plan.peak_worker_bytes <= budget
    assert plan.row_block * plan.col_block < free.row_block * free.col_block
    plan2 = plan_jacobian(net, x0, 0.1, math.inf, "recurjac-f0", layer_bounds="ibp", memory_budget=2 * budget, threads_per_worker=2)
    assert plan2.peak_worker_bytes <= 2 * budget
    with pytest.raises(InputError, match="too small"):
        plan_jacobian(net, x0, 0.1, math.inf, "recurjac-f0", layer_bounds="ibp", memory_budget=free.weights_bytes // 2)
    ref = jacobian_bounds(net, x0, 0.1, math.inf, method="recurjac-f0", layer_bounds="ibp")
    _same(plan.compute(scheduler="threads", durable=False), ref)


def test_parse_bytes():
    assert parse_bytes("4GB") == 4_000_000_000
    assert parse_bytes("512MiB") == 512 * 2**20
    assert parse_bytes("2e3") == 2000
    assert parse_bytes(None) is None
    for bad in ("-1GB", "lots", "0"):
        with pytest.raises(InputError):
            parse_bytes(bad)


def test_bad_arguments(small):
    net, x0 = small
    with pytest.raises(InputError):
        _plan(net, x0, "recurjac-zz")
    with pytest.raises(InputError):
        _plan(net, x0, "recurjac-b", row_block=0, col_block=2)
    with pytest.raises(InputError):
        _plan(net, x0, "recurjac-b").compute(scheduler="gpu")


# -- the wall-time estimate -----------------------------------------------------------------------------------
def test_estimate_wall_time(small):
    net, x0 = small
    plan = _plan(net, x0, "recurjac-f0", row_block=2, col_block=3)
    res = plan.compute(scheduler="synchronous")
    est = estimate_wall_time(plan, res.task_times, workers=(1, 2, 4, 1000))
    total = sum(res.task_times.values())
    assert est["total_work_s"] == pytest.approx(total)
    w = est["workers"]
    assert w[1]["simulated_s"] == pytest.approx(total)  # one worker does everything in sequence
    assert w[1000]["simulated_s"] == pytest.approx(est["critical_path_s"])  # enough workers: the critical path
    assert est["critical_path_s"] < total
    times = [w[k]["simulated_s"] for k in (1, 2, 4, 1000)]
    assert all(a >= b - 1e-12 for a, b in zip(times, times[1:]))
    for k in w:
        assert w[k]["simulated_s"] >= w[k]["lower_bound_s"] - 1e-12
    # extrapolation from a measured fraction: one row block per step
    part = {k: v for k, v in res.task_times.items() if k[1] == 0}
    est2 = estimate_wall_time(plan, part, workers=(8,))
    assert est2["total_work_s"] > 0 and est2["extrapolation"]["1"] == "measured+area"
    with pytest.raises(ValueError):
        estimate_wall_time(plan, {}, workers=(8,))


def test_estimate_from_a_partial_run_checkpoint(tmp_path, small):
    from recurjac_scale.engine import task_times_from_checkpoint

    net, x0 = small
    plan = _plan(net, x0, "recurjac-b", row_block=2, col_block=3)
    with pytest.raises(RuntimeError):
        plan.compute(checkpoint=tmp_path / "ck", max_blocks=6, scheduler="synchronous")
    measured = task_times_from_checkpoint(tmp_path / "ck")
    assert len(measured) == 6
    est = estimate_wall_time(plan, measured, workers=(2,))
    assert est["n_tasks"] == plan.n_tasks and est["total_work_s"] >= sum(measured.values())


@pytest.mark.parametrize("scheduler", ["synchronous", "threads"])
def test_blas_is_single_threaded_inside_tasks(small, monkeypatch, scheduler):
    """Every block runs with one BLAS thread (threadpoolctl), also with concurrent tasks in a thread pool."""
    from threadpoolctl import threadpool_info

    from recurjac_scale.jacobian import JacobianMethod

    net, x0 = small
    jacobian_bounds(net, x0, EPS, math.inf, method="recurjac-b", layer_bounds="crown")  # BLAS used in this thread
    seen = []
    orig = JacobianMethod.step_block

    def spy(self, chain, t, rows, cols, priors):
        seen.append({i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"})
        return orig(self, chain, t, rows, cols, priors)

    monkeypatch.setattr(JacobianMethod, "step_block", spy)
    _plan(net, x0, "recurjac-b", row_block=1, col_block=2).compute(scheduler=scheduler, threads_per_worker=2)
    assert seen and all(s == {1} for s in seen), seen


def test_blas_limit_is_restored_and_its_library_scan_reused(monkeypatch):
    """``blas_single_thread`` restores the previous BLAS thread count when the last task leaves, and scans the
    loaded libraries once (a cached ``ThreadpoolController``) until a module is imported, then again (a BLAS
    library loaded by the new import is limited too)."""
    import sys
    import types

    from threadpoolctl import threadpool_info, threadpool_limits

    from recurjac_scale.engine import schedulers

    def blas_threads():
        return {i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"}

    np.ones((4, 4)) @ np.ones((4, 4))  # BLAS loaded
    with threadpool_limits(limits=2, user_api="blas"):
        assert blas_threads() == {2}
        with schedulers.blas_single_thread():
            assert blas_threads() == {1}
            first = schedulers._controller
            with schedulers.blas_single_thread():  # nested (a second task of the pool): still one thread
                assert blas_threads() == {1}
            assert blas_threads() == {1}
        assert blas_threads() == {2}
        with schedulers.blas_single_thread():
            assert schedulers._controller is first
        monkeypatch.setitem(sys.modules, "_recurjac_test_new_module", types.ModuleType("_recurjac_test_new_module"))
        with schedulers.blas_single_thread():
            assert schedulers._controller is not first and blas_threads() == {1}
        assert blas_threads() == {2}


@pytest.mark.parametrize("method", METHODS)
def test_task_memory_estimate_bounds_the_measured_peak(method, rng):
    """The plan's per-task memory (kernel work + output) is not below what a task really allocates
    (tracemalloc sees numpy's allocations)."""
    net = random_network([20, 50, 40, 30, 5], "relu", rng, domain=(0.0, 1.0))
    x0 = rng.uniform(0.2, 0.8, size=20)
    plan = plan_jacobian(net, x0, 0.05, math.inf, method, layer_bounds="ibp", row_block=8, col_block=16)
    assert_tasks_within_plan_memory(plan, 8, 16)


@pytest.mark.parametrize("method", ["recurjac-f0", "recurjac-b"])
def test_plan_flops_of_a_shared_step_are_the_work_it_issues(method, monkeypatch):
    """A step that shares the stable part across rows is estimated by that variant's cost model: with every row
    multiplied on all its per-row factors (no compaction) and panels of one column (no padding), the GEMM and
    row-dot FLOPs the step issues equal the plan's figure."""
    import recurjac_scale.jacobian.recurjac as rj
    import recurjac_scale.jacobian.recurjac_levels as rjl
    import recurjac_scale.jacobian.recurjac_shared as rjs
    from recurjac_scale import kernels
    from recurjac_scale.jacobian import derivative_bounds_for, get_jacobian_method, run_chain
    from recurjac_scale.layer_bounds import layer_bounds

    monkeypatch.setattr("recurjac_scale.jacobian.recurjac_shared.SHARE_RATIO", math.inf)
    rng = np.random.default_rng(1)
    net = random_network([10, 16, 14, 12, 12, 4], "relu", rng)
    x0 = rng.uniform(-0.5, 0.5, 10)
    db = derivative_bounds_for(net, layer_bounds(net, x0, 0.01, method="crown"))
    jm = get_jacobian_method(method)
    chain = jm.build_chain(net, db).with_panel(1)
    shape = jm.cost(chain)
    assert all(shape.shares[1:]) and not shape.shares[0]
    _, _, states = run_chain(jm, chain)
    count = [0.0]
    pm, tm, rd = rjl.panel_matmul, rjs.tile_matmul, kernels.rowdot_acc

    def panel(M, X, P, *a, **k):
        count[0] += 2.0 * M.shape[0] * M.shape[1] * X.shape[1]
        return pm(M, X, P, *a, **k)

    def tile(A, B, *a, **k):
        count[0] += 2.0 * A.shape[0] * A.shape[1] * B.shape[1]  # rows and columns before the tile padding
        return tm(A, B, *a, **k)

    def rowdot(H, Z, R, c, acc, keep):
        count[0] += 2.0 * 2 * c * H.size  # both chains (the kernel skips the structurally zero factors)
        return rd(H, Z, R, c, acc, keep)

    monkeypatch.setattr(rjl, "panel_matmul", panel)  # the level products
    monkeypatch.setattr(rjs, "panel_matmul", panel)  # the shared products of the shared variant
    monkeypatch.setattr(rjs, "tile_matmul", tile)
    monkeypatch.setattr(rj.kernels, "rowdot_acc", rowdot)
    R = chain.n_rows
    totals = {}
    for fraction in (1.0, rj.SPARSE_FRACTION):
        monkeypatch.setattr("recurjac_scale.jacobian.recurjac_levels.SPARSE_FRACTION", fraction)
        totals[fraction] = [0.0, 0.0]
        for t in range(2, chain.n_steps + 1):
            width = chain.widths[t]
            V = np.asarray(chain.mats[t - 1], dtype=np.float64)
            count[0] = 0.0
            rj.recurjac_step(chain, t, V, [states[s] for s in range(t)])
            est = R * width * shape.flops_per_entry(t, block=(R, width))
            if fraction == 1.0:
                assert count[0] == pytest.approx(est, rel=1e-12), t
            totals[fraction][0] += count[0]
            totals[fraction][1] += est
    # compacted: less in all for F0's 10 rows; not a bound per step, nor for B's 4 rows, because a product with
    # at least half its rows uncompacted runs over every column and then recomputes the compacted rows
    issued, est = totals[rj.SPARSE_FRACTION]
    assert 0 < issued and (issued < est or method == "recurjac-b")
    dense = shape.flops_per_entry(chain.n_steps)
    assert shape.flops_per_entry(chain.n_steps, block=(R, chain.widths[-1])) < dense
