"""The engine on a real dask.distributed LocalCluster (2 worker processes on 127.0.0.1): every method equals the
in-memory result bitwise with uneven blockings, connecting by address works, and a worker killed mid-run does not
change the result.  One cluster is shared by the module (start-up ~2 s)."""

from __future__ import annotations

import math
import os
import signal
import threading
import time

import numpy as np
import pytest

from recurjac_scale.engine import plan_jacobian
from recurjac_scale.jacobian import JACOBIAN_METHODS, jacobian_bounds
from recurjac_scale.testing import random_network

pytestmark = pytest.mark.cluster

METHODS = sorted(n for n, m in JACOBIAN_METHODS.items() if m.run is None)  # the engine's methods


def _loopback(addr: str) -> bool:
    return addr.startswith("tcp://127.0.0.1:")


def _listening(pids) -> list:
    import psutil

    out = []
    for p in pids:
        for conn in psutil.Process(p).net_connections(kind="inet"):
            if conn.status == psutil.CONN_LISTEN:
                out.append(conn.laddr.ip)
    return out


def test_cluster_binds_loopback_only(client):
    info = client.scheduler_info()
    assert _loopback(info["address"])
    assert len(info["workers"]) == 2 and all(_loopback(a) for a in info["workers"])
    ips = _listening([os.getpid(), *client.run(os.getpid).values()])
    assert ips and set(ips) == {"127.0.0.1"}
    # the workers got the one-thread environment
    env = client.run(lambda: (os.environ.get("NUMBA_NUM_THREADS"), os.environ.get("OPENBLAS_NUM_THREADS")))
    assert set(env.values()) == {("1", "1")}


@pytest.mark.parametrize("method", METHODS)
def test_cluster_result_equals_in_memory(client, method, rng):
    net = random_network([7, 13, 11, 9, 5], "relu", rng, domain=(0.0, 1.0))
    x0 = rng.uniform(0.2, 0.8, size=7)
    ref = jacobian_bounds(net, x0, 0.08, math.inf, method=method, layer_bounds="crown")
    plan = plan_jacobian(net, x0, 0.08, math.inf, method, layer_bounds="crown", row_block=3, col_block=4)
    res = plan.compute(client=client, durable=False)
    np.testing.assert_array_equal(res.lower, ref.lower)
    np.testing.assert_array_equal(res.upper, ref.upper)
    assert res.executor["scheduler"] == "distributed" and res.executor["n_workers"] == 2
    # both workers took part (pids recorded per block)
    assert res.blocks_computed == res.blocks_total


@pytest.mark.parametrize("stream", [False, True])
def test_cluster_by_address_with_store_backed_weights(client, tmp_path, rng, stream):
    from recurjac_scale.network.store import save_network

    net = random_network([9, 14, 12, 4], "tanh", rng)
    x0 = rng.normal(size=9)
    save_network(net, tmp_path / "m.zarr", chunk_edge=6)
    ref = jacobian_bounds(net, x0, 0.1, 2.0, method="recurjac-b", layer_bounds="ibp")
    plan = plan_jacobian(tmp_path / "m.zarr", x0, 0.1, 2.0, "recurjac-b", layer_bounds="ibp", row_block=3, col_block=5,
                         stream_weights=stream)
    assert plan.stream_weights == stream
    assert plan.context.worker_spec().network is None  # weights are read from the store by the workers
    ck = tmp_path / "ck"
    res = plan.compute(scheduler=client.scheduler.address, checkpoint=ck)
    np.testing.assert_array_equal(res.lower, ref.lower)
    np.testing.assert_array_equal(res.upper, ref.upper)
    import json

    pids = {json.loads(p.read_text())["pid"] for p in (ck / "done").glob("step-*/*.json")}
    assert os.getpid() not in pids  # the blocks ran in the worker processes


def test_worker_killed_mid_run_same_result(client, tmp_path, rng):
    net = random_network([16, 32, 32, 32, 4], "relu", rng, domain=(0.0, 1.0))
    x0 = rng.uniform(0.3, 0.7, size=16)
    ref = jacobian_bounds(net, x0, 0.02, math.inf, method="recurjac-f0", layer_bounds="ibp")
    plan = plan_jacobian(net, x0, 0.02, math.inf, "recurjac-f0", layer_bounds="ibp", row_block=1, col_block=8)
    total = sum(s.n_tasks for s in plan.steps)
    ck = tmp_path / "ck"
    box: dict = {}

    def run():
        try:
            box["res"] = plan.compute(client=client, checkpoint=ck, durable=False)
        except BaseException as exc:  # noqa: BLE001 - reported below
            box["err"] = exc

    th = threading.Thread(target=run)
    th.start()
    deadline = time.monotonic() + 60
    done = lambda: len(list((ck / "done").glob("step-*/*.json"))) if (ck / "done").exists() else 0  # noqa: E731
    while done() < 10 and time.monotonic() < deadline and th.is_alive():
        time.sleep(0.01)
    pids = client.run(os.getpid)
    victim = sorted(pids.values())[0]
    n_at_kill = done()
    os.kill(victim, signal.SIGKILL)
    th.join(120)
    assert not th.is_alive()
    assert "err" not in box, box.get("err")
    assert 0 < n_at_kill < total, "the kill did not happen mid-run; make the job longer"
    res = box["res"]
    np.testing.assert_array_equal(res.lower, ref.lower)
    np.testing.assert_array_equal(res.upper, ref.upper)
    client.wait_for_workers(2, timeout=60)
    assert victim not in set(client.run(os.getpid).values())
