"""``linear-jacobian`` through the engine (its blockwise form: RecurJac-B's layer steps, then tightening, entry and
row norm tasks; recurjac_scale.engine.linear_stage): equal to the in-memory method up to the summation order for
every blocking, scheduler and worker count, sound at sampled points, checkpointed, and refused when the memory
budget cannot hold its second stage."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

from recurjac_scale.cli import main
from recurjac_scale.engine import plan_jacobian
from recurjac_scale.engine.linear_stage import MIN_BLOCK, plan_stage
from recurjac_scale.errors import IncompleteRunError, InputError
from recurjac_scale.jacobian import jacobian_bounds
from recurjac_scale.jacobian.linear_blocks import LINEAR_STAGE, collapse_bytes, context_bytes, task_bytes
from recurjac_scale.layer_bounds.base import Region
from recurjac_scale.lipschitz import lipschitz
from recurjac_scale.network.store import save_network
from recurjac_scale.testing import random_network, sample_region

RTOL = 1e-12  # the same numbers in another summation order (GEMM blocking) only


@pytest.fixture(autouse=True)
def _every_variant(monkeypatch):
    """The in-memory references run every slope variant for every objective, as the engine's tasks do (the adaptive
    skip of :data:`recurjac_scale.jacobian.linear.ADAPTIVE_AFTER` depends on the order in which one process meets
    a row's objectives; each task of the engine starts afresh and bounds one block, so it never skips)."""
    from recurjac_scale.jacobian import linear

    monkeypatch.setattr(linear, "ADAPTIVE_AFTER", 0)


def _case(tmp_path, rng, widths=(12, 16, 14, 10, 4), act="relu", chunk_edge=5):
    net = random_network(widths, act, rng)
    x0 = rng.uniform(0.0, 1.0, widths[0])
    save_network(net, tmp_path / "m.zarr", chunk_edge=chunk_edge)
    return net, x0, tmp_path / "m.zarr"


def _close(a, b, scale):
    np.testing.assert_allclose(a, b, rtol=RTOL, atol=RTOL * scale)


@pytest.mark.parametrize("act,p", [("relu", math.inf), ("tanh", 2.0), ("leaky_relu", 1.0)])
@pytest.mark.parametrize("block,row_block,col_block,chunk_edge", [(3, 1, 4, 5), (5, 3, 7, 3), (256, None, None, 64)])
def test_equals_in_memory(tmp_path, rng, act, p, block, row_block, col_block, chunk_edge):
    net, x0, store = _case(tmp_path, rng, act=act, chunk_edge=chunk_edge)
    eps = 0.08
    ref = jacobian_bounds(net, x0, eps, p, method="linear-jacobian", outputs="all")
    rb = jacobian_bounds(net, x0, eps, p, method="recurjac-b", outputs="all")
    plan = plan_jacobian(store, x0, eps, p, "linear-jacobian", outputs="all", stage_block=block,
                         row_block=row_block, col_block=col_block)
    assert plan.method == "linear-jacobian" and plan.stage is not None and plan.stage.block == block
    res = plan.compute(scheduler="synchronous")
    scale = float(np.abs(ref.upper).max())
    _close(res.lower, ref.lower, scale)
    _close(res.upper, ref.upper, scale)
    # the stage ran: tighter than RecurJac-B somewhere (this case has unstable neurons)
    assert ((res.upper - res.lower) < (rb.upper - rb.lower) - 1e-9).any()
    # both report what certified rounding may cost, the same way
    assert ref.rounding_share is not None and 0.0 < ref.rounding_share < 1e-9
    assert res.rounding_share == pytest.approx(ref.rounding_share, rel=1e-6)


@pytest.mark.parametrize("p", [math.inf, 2.0])
def test_lipschitz_equals_in_memory_threads(tmp_path, rng, p):
    net, x0, store = _case(tmp_path, rng, widths=(10, 20, 20, 6))
    eps = 0.1
    ref = lipschitz(net, x0, eps, p, method="linear-jacobian", outputs=2).points[0]
    plan = plan_jacobian(store, x0, eps, p, "linear-jacobian", outputs=2, stage_block=6, threads_per_worker=2)
    res = plan.compute(scheduler="threads", threads_per_worker=2)
    assert res.lipschitz == pytest.approx(ref.lipschitz, rel=RTOL)
    # the row norm objective is below Proposition 2 of the same bounds (so it is the one used)
    from recurjac_scale.lipschitz import lipschitz_from_bounds

    assert res.lipschitz < lipschitz_from_bounds(res.lower, res.upper, p)[0]
    # sound: no sampled gradient norm exceeds it
    region = Region.of(net, x0, eps, p)
    X = sample_region(region, 3000, rng)
    q = {math.inf: 1, 2.0: 2}[p]
    norms = np.linalg.norm(net.jacobian(X)[:, 2, :], ord=q, axis=1)
    assert norms.max() <= res.lipschitz


def test_contains_sampled_jacobians(tmp_path, rng):
    net, x0, store = _case(tmp_path, rng, widths=(8, 24, 24, 24, 5), act="sigmoid")
    eps = 0.3
    res = plan_jacobian(store, x0, eps, math.inf, "linear-jacobian", outputs="all", stage_block=7).compute(
        scheduler="synchronous")
    region = Region.of(net, x0, eps, math.inf)
    J = net.jacobian(sample_region(region, 4000, rng))
    assert ((J >= res.lower) & (J <= res.upper)).all()


def test_checkpoint_resume_and_reuse(tmp_path, rng):
    net, x0, store = _case(tmp_path, rng)
    ck = tmp_path / "ck"
    plan = plan_jacobian(store, x0, 0.08, math.inf, "linear-jacobian", outputs="all", stage_block=4, row_block=2,
                         col_block=5)
    with pytest.raises(IncompleteRunError):
        plan.compute(scheduler="synchronous", checkpoint=ck, max_blocks=3)
    first = plan.compute(scheduler="synchronous", checkpoint=ck)
    assert {"tighten", "entry", "rownorm"} <= set(first.step_seconds)
    stage_records = [p for p in (ck / "done").glob("step-*") if int(p.name[5:]) >= 1000]
    assert len(stage_records) == 2 + 1 + 1  # two tightened layers (k = 1, 0), entries, row norms
    again = plan.compute(scheduler="synchronous", checkpoint=ck)
    assert again.blocks_computed == 0
    assert not {"tighten", "entry", "rownorm"} & set(again.step_seconds)  # every stage task reused
    np.testing.assert_array_equal(again.lower, first.lower)
    np.testing.assert_array_equal(again.upper, first.upper)
    assert again.lipschitz == first.lipschitz


def test_memory_budget_shrinks_the_block_or_refuses():
    widths = (3072, 2048, 2048, 1024, 1024, 512, 512, 256, 256, 128, 1)
    held = 600 * 2**20
    big = plan_stage(LINEAR_STAGE, widths, 1, budget=8 * 2**30, held_bytes=held)
    assert big.block == LINEAR_STAGE.block
    assert big.peak_worker_bytes == held + context_bytes(widths) + task_bytes(widths, big.block)
    budget = held + context_bytes(widths) + task_bytes(widths, 32)
    mid = plan_stage(LINEAR_STAGE, widths, 1, budget=budget, held_bytes=held)
    assert mid.block == 32 and mid.peak_worker_bytes <= budget
    need = held + context_bytes(widths) + 2 * task_bytes(widths, MIN_BLOCK)
    with pytest.raises(InputError, match="too small for the second stage"):
        plan_stage(LINEAR_STAGE, widths, 1, budget=need - 1, held_bytes=held, threads_per_worker=2)
    assert plan_stage(LINEAR_STAGE, widths, 1, budget=need, held_bytes=held, threads_per_worker=2).block == MIN_BLOCK
    # tasks: 8 hidden layers below the top one are tightened in blocks, then the 3072 columns, then one row norm
    assert big.n_tasks == big.n_tighten_tasks + big.n_entry_tasks + 1
    assert big.n_entry_tasks == 3072 // 256


def _nbytes(obj) -> int:
    if isinstance(obj, np.ndarray):
        return obj.nbytes
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    return 0


@pytest.mark.parametrize("act", ["relu", "leaky_relu", "hard_sigmoid", "tanh"])
def test_collapse_estimate_covers_the_maps(act):
    """The plan's estimate of the maps through the exact neurons (collapse_bytes) is at least what
    linear_stable.stable_collapse holds, from all-stable to all-unstable radii."""
    from recurjac_scale.jacobian import linear
    from recurjac_scale.jacobian.prepare import prepare

    for widths in ((20, 30, 25, 20, 3), (50, 64, 32, 16, 10)):
        for eps in (0.0, 0.01, 0.1, 0.5):
            rng = np.random.default_rng(1)
            net = random_network(widths, act, rng)
            job = prepare(net, rng.uniform(-0.5, 0.5, widths[0]), eps, math.inf, 0, None)
            ctx = linear.linear_context(job.network, job.region, job.layer_bounds, job.derivative_bounds)
            if ctx is None:
                continue
            held = _nbytes(ctx.compact["stable"])
            est = collapse_bytes(job.network.widths, job.derivative_bounds, list(job.network.activations))
            assert held <= est, (widths, eps, held, est)
            assert held <= collapse_bytes(job.network.widths)  # without derivative bounds: every neuron counted


def test_plan_refuses_a_budget_without_room_for_the_stage(tmp_path, rng):
    net, x0, store = _case(tmp_path, rng, widths=(300, 400, 400, 3), chunk_edge=200)
    free = plan_jacobian(store, x0, 0.01, math.inf, "linear-jacobian", outputs=1, memory_budget="64GB")
    st = free.stage
    with pytest.raises(InputError, match="too small for the second stage"):
        plan_jacobian(store, x0, 0.01, math.inf, "linear-jacobian", outputs=1,
                      memory_budget=st.held_bytes + st.context_bytes + task_bytes(free.widths, MIN_BLOCK) - 1)
    fit = plan_jacobian(store, x0, 0.01, math.inf, "linear-jacobian", outputs=1,
                        memory_budget=st.held_bytes + st.context_bytes + task_bytes(free.widths, 16))
    assert fit.stage.block == 16 and fit.peak_worker_bytes <= fit.memory_budget


def test_cli_run_linear_jacobian(tmp_path, rng, capsys):
    net, x0, store = _case(tmp_path, rng)
    np.save(tmp_path / "x.npy", x0)
    out = tmp_path / "r.zarr"
    code = main(["run", str(store), "--input", str(tmp_path / "x.npy"), "--eps", "0.08", "--method",
                 "linear-jacobian", "--outputs", "1", "--scheduler", "synchronous", "-o", str(out), "--json",
                 "--quiet"])
    assert code == 0, capsys.readouterr().err
    summary = json.loads(capsys.readouterr().out)
    ref = lipschitz(net, x0, 0.08, math.inf, method="linear-jacobian", outputs=1).points[0]
    assert summary["method"] == "linear-jacobian"
    assert summary["lipschitz"] == pytest.approx(ref.lipschitz, rel=RTOL)
    import zarr

    g = zarr.open_group(str(out), mode="r")
    ref_b = jacobian_bounds(net, x0, 0.08, math.inf, method="linear-jacobian", outputs=1)
    _close(np.asarray(g["upper"][...]), ref_b.upper, float(np.abs(ref_b.upper).max()))


def test_no_hidden_layer_gives_recurjac(tmp_path, rng):
    net, x0, store = _case(tmp_path, rng, widths=(6, 3))
    plan = plan_jacobian(store, x0, 0.1, math.inf, "linear-jacobian", outputs="all")
    assert plan.stage is None
    res = plan.compute(scheduler="synchronous")
    ref = jacobian_bounds(net, x0, 0.1, math.inf, method="linear-jacobian", outputs="all")
    np.testing.assert_array_equal(res.upper, ref.upper)


@pytest.mark.cluster
def test_local_cluster_two_workers_equals_in_memory(client, tmp_path, rng):
    net, x0, store = _case(tmp_path, rng, widths=(14, 18, 16, 12, 3))
    eps = 0.08
    ref = jacobian_bounds(net, x0, eps, math.inf, method="linear-jacobian", outputs="all")
    ref_l = lipschitz(net, x0, eps, math.inf, method="linear-jacobian", outputs="all").points[0]
    ck = tmp_path / "ck"
    plan = plan_jacobian(store, x0, eps, math.inf, "linear-jacobian", outputs="all", stage_block=4, row_block=1,
                         client=client)
    res = plan.compute(scheduler=client.scheduler.address, checkpoint=ck)
    scale = float(np.abs(ref.upper).max())
    _close(res.lower, ref.lower, scale)
    _close(res.upper, ref.upper, scale)
    assert res.lipschitz == pytest.approx(ref_l.lipschitz, rel=RTOL)
    pids = {json.loads(p.read_text())["pid"] for p in (ck / "done").glob("step-1*/*.json")}
    assert os.getpid() not in pids and len(pids) == 2  # stage tasks ran on both worker processes


def test_stage_tightens_only_the_neurons_it_names(tmp_path, rng, monkeypatch):
    """The engine tightens exactly the neurons ``stage.tightened_neurons`` names: none gives the in-memory
    propagation without tightening; the unstable ones only gives bounds between that and the full method."""
    from recurjac_scale.jacobian.chain import derivative_bounds_for
    from recurjac_scale.jacobian.linear import entry_bounds, linear_context
    from recurjac_scale.jacobian.linear_blocks import LinearStage

    net, x0, store = _case(tmp_path, rng, widths=(10, 14, 12, 12, 3))
    eps = 0.1
    full = jacobian_bounds(net, x0, eps, math.inf, method="linear-jacobian", outputs="all")
    rb = jacobian_bounds(net, x0, eps, math.inf, method="recurjac-b", outputs="all", keep_states=True)
    netc = net.with_outputs(np.eye(3))
    ctx = linear_context(netc, Region.of(netc, x0, eps, math.inf), rb.layer_bounds,
                         derivative_bounds_for(netc, rb.layer_bounds))
    plain_lo, plain_up, _, _ = entry_bounds(ctx, rb.states, rb.lower, rb.upper, tighten=False)
    monkeypatch.setattr(LinearStage, "tightened_neurons", lambda self, dl, du: np.arange(0))
    none = plan_jacobian(store, x0, eps, math.inf, "linear-jacobian", outputs="all", stage_block=5).compute(
        scheduler="synchronous")
    scale = float(np.abs(full.upper).max())
    _close(none.lower, plain_lo, scale)
    _close(none.upper, plain_up, scale)
    monkeypatch.setattr(LinearStage, "tightened_neurons", lambda self, dl, du: np.flatnonzero(dl < du))
    some = plan_jacobian(store, x0, eps, math.inf, "linear-jacobian", outputs="all", stage_block=3).compute(
        scheduler="synchronous")
    tol = RTOL * scale
    assert (some.upper <= plain_up + tol).all() and (some.lower >= plain_lo - tol).all()
    assert (some.upper >= full.upper - tol).all() and (some.lower <= full.lower + tol).all()
    assert ((plain_up - plain_lo) > (full.upper - full.lower) + 1e-9).any()  # tightening matters in this case
    J = net.jacobian(sample_region(Region.of(net, x0, eps, math.inf), 2000, rng))
    assert ((J >= some.lower) & (J <= some.upper)).all()
