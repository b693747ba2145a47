"""Memory defaults (issue "Reliability"): without ``--memory-budget`` a job is sized for what the machine or the
cluster can give, a job that cannot fit is refused with the memory it needs, a LocalCluster started by the engine
gets a memory limit, and a scheduler address that does not answer times out with a message."""

from __future__ import annotations

import json
import math
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from recurjac_scale.cli import main
from recurjac_scale.engine import plan_jacobian
from recurjac_scale.engine.memory import SAFETY_FRACTION, default_memory_budget, local_memory_limit
from recurjac_scale.errors import ClusterError, InputError
from recurjac_scale.testing import random_network

REPO = Path(__file__).resolve().parents[1]
CIFAR_WIDTHS = [3072, 2048, 2048, 1024, 1024, 512, 512, 256, 256, 128, 10]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from recurjac_scale.network.store import save_network

    d = tmp_path_factory.mktemp("mem")
    rng = np.random.default_rng(3)
    net = random_network([12, 20, 16, 5], "relu", rng, domain=(0.0, 1.0))
    save_network(net, d / "m.zarr")
    np.save(d / "x.npy", rng.uniform(0.2, 0.8, size=12))
    return d


def _avail_budget(n):
    return SAFETY_FRACTION * psutil.virtual_memory().available / n


def test_default_budget_is_a_share_of_the_available_memory():
    lo = _avail_budget(2)
    budget, source = default_memory_budget(2)
    hi = _avail_budget(2)
    # available memory moves while other programs run: allow 512 MiB of drift either way
    assert min(lo, hi) - 2**29 <= budget <= max(lo, hi) + 2**29
    assert budget < psutil.virtual_memory().total / 2
    assert "available" in source and "2 worker" in source


def test_machine_sized_job_default_plan_fits_the_budget():
    """F0 on the paper's CIFAR shape with 2 local workers and no budget: the plan used to predict 23.9 GiB per
    worker on a 23.5 GiB machine; now its predicted peak is at most the default budget, itself at most 80 % of the
    available memory over the 2 workers (plan only: nothing is run)."""
    rng = np.random.default_rng(0)
    net = random_network(CIFAR_WIDTHS, "relu", rng, domain=(0.0, 1.0))
    x0 = rng.uniform(0.0, 1.0, size=3072)
    before = _avail_budget(2)
    plan = plan_jacobian(net, x0, 1e-3, math.inf, "recurjac-f0", layer_bounds="ibp", threads_per_worker=1,
                         total_threads=2, n_workers=2)
    after = _avail_budget(2)
    assert plan.memory_budget is not None and plan.budget_source.startswith("default")
    assert plan.memory_budget <= max(before, after) + 2**29
    assert plan.peak_worker_bytes <= plan.memory_budget
    # the budget really constrained the blocks: the old default (256 x 512) does not fit in it
    assert (plan.row_block, plan.col_block) != (256, 512)


def test_cli_plan_with_workers_reports_the_default_budget(store, capsys):
    d = store
    assert main(["plan", str(d / "m.zarr"), "--input", str(d / "x.npy"), "--eps", "0.05", "--method", "recurjac-f0",
                 "--layer-bounds", "ibp", "--workers", "2", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["budget_source"].startswith("default")
    assert plan["memory_budget"] <= _avail_budget(2) + 2**29
    assert plan["peak_worker_bytes"] <= plan["memory_budget"]


def test_job_that_cannot_fit_the_machine_is_refused(monkeypatch, store, capsys):
    """A machine with 100 MiB available cannot hold a worker's baseline: the default plan refuses the job, saying
    how much it needs and where the budget came from (the machine's size is the only thing faked here)."""
    import recurjac_scale.engine.memory as memory

    monkeypatch.setattr(memory, "available_memory", lambda: 100 * 2**20)
    d = store
    with pytest.raises(InputError, match=r"too small.*need.*give --memory-budget >= .*available on this machine"):
        plan_jacobian(d / "m.zarr", np.load(d / "x.npy"), 0.05, math.inf, "recurjac-b", layer_bounds="ibp")
    rc = main(["run", str(d / "m.zarr"), "--input", str(d / "x.npy"), "--eps", "0.05", "--method", "recurjac-b",
               "--layer-bounds", "ibp", "-o", str(d / "never.zarr")])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and len(err.splitlines()) == 1 and "need" in err
    assert not (d / "never.zarr").exists()


def test_budget_too_small_for_one_block_says_how_much(store):
    d = store
    cmd = [sys.executable, "-m", "recurjac_scale.cli", "run", str(d / "m.zarr"), "--input", str(d / "x.npy"),
           "--eps", "0.05", "--method", "recurjac-f0", "--memory-budget", "10MB", "-o", str(d / "small.zarr")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert "too small" in r.stderr and "give --memory-budget >=" in r.stderr
    assert not (d / "small.zarr").exists()


@pytest.mark.cluster
def test_local_cluster_started_by_the_cli_gets_a_memory_limit(store, tmp_path, capsys):
    d = store
    out = tmp_path / "r.zarr"
    assert main(["run", str(d / "m.zarr"), "--input", str(d / "x.npy"), "--eps", "0.05", "--method", "recurjac-b",
                 "--layer-bounds", "ibp", "--workers", "1", "--memory-budget", "1GiB", "-o", str(out), "--json",
                 "--quiet"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["executor"]["scheduler"] == "distributed"
    assert res["executor"]["memory_limit"] == local_memory_limit(2**30)
    assert 2**30 <= res["executor"]["memory_limit"] <= 1.06 * 2**30


def _black_hole():
    """A TCP server that accepts connections and never says anything (a scheduler that does not answer)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    conns = []

    def accept():
        while True:
            try:
                conns.append(srv.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    return srv, conns


@pytest.mark.parametrize("kind", ["silent", "closed"])
def test_unanswering_scheduler_times_out_with_a_message(store, kind):
    d = store
    if kind == "silent":
        srv, conns = _black_hole()
        port = srv.getsockname()[1]
    else:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()  # nothing listens there now
    try:
        cmd = [sys.executable, "-m", "recurjac_scale.cli", "run", str(d / "m.zarr"), "--input", str(d / "x.npy"),
               "--eps", "0.05", "--method", "recurjac-b", "--layer-bounds", "ibp", "--scheduler",
               f"tcp://127.0.0.1:{port}", "--connect-timeout", "2", "-o", str(d / "remote.zarr")]
        t0 = time.monotonic()
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        elapsed = time.monotonic() - t0
    finally:
        if kind == "silent":
            srv.close()
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert f"no dask scheduler answered at 'tcp://127.0.0.1:{port}' within 2 s" in r.stderr
    assert elapsed < 60
    assert not (d / "remote.zarr").exists()


def test_connect_raises_cluster_error():
    from recurjac_scale.engine.schedulers import connect

    srv, _ = _black_hole()
    try:
        t0 = time.monotonic()
        with pytest.raises(ClusterError, match="within 1 s"):
            connect(f"tcp://127.0.0.1:{srv.getsockname()[1]}", timeout=1)
        assert time.monotonic() - t0 < 20
    finally:
        srv.close()


@pytest.mark.cluster
def test_remote_cluster_budget_is_the_workers_memory_limit(store, capsys):
    import dask
    from distributed import LocalCluster

    from recurjac_scale.engine.schedulers import WORKER_ENV

    d = store
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None,
                      memory_limit=2**30, env=dict(WORKER_ENV)) as cluster:
        assert main(["plan", str(d / "m.zarr"), "--input", str(d / "x.npy"), "--eps", "0.05", "--method",
                     "recurjac-b", "--layer-bounds", "ibp", "--scheduler", cluster.scheduler_address, "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    frac = dask.config.get("distributed.worker.memory.terminate")
    assert plan["memory_budget"] == int(2**30 * frac)
    assert "memory_limit" in plan["budget_source"]


@pytest.mark.slow
@pytest.mark.cluster
def test_measured_worker_rss_within_the_plan(tmp_path):
    """A job the plan puts at >= 2 GB per worker (F0, 784-1024-1024-1024-10, blocks 784 x 1024, one worker of 2
    threads): the worker process's resident memory, sampled every 20 ms with psutil, never exceeds the plan's
    prediction by more than 20 %."""
    from recurjac_scale.network.store import save_network

    rng = np.random.default_rng(0)
    net = random_network([784, 1024, 1024, 1024, 10], "relu", rng, domain=(0.0, 1.0))
    save_network(net, tmp_path / "m.zarr")
    np.save(tmp_path / "x.npy", rng.uniform(0.0, 1.0, size=784))
    base = [sys.executable, "-m", "recurjac_scale.cli"]
    job = [str(tmp_path / "m.zarr"), "--input", str(tmp_path / "x.npy"), "--eps", "1e-3", "--method", "recurjac-f0",
           "--layer-bounds", "ibp", "--row-block", "784", "--col-block", "1024", "--workers", "1",
           "--threads-per-worker", "2", "--memory-budget", "3GiB"]
    plan = json.loads(subprocess.run(base + ["plan", *job, "--json"], capture_output=True, text=True, check=True,
                                     timeout=300).stdout)
    predicted = plan["peak_worker_bytes"]
    assert predicted >= 2e9
    proc = subprocess.Popen(base + ["run", *job, "-o", str(tmp_path / "r.zarr"), "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    peak: dict[int, int] = {}
    cli = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            for c in cli.children(recursive=True):
                try:
                    peak[c.pid] = max(peak.get(c.pid, 0), c.memory_info().rss)
                except psutil.Error:
                    pass
        except psutil.Error:
            pass
        time.sleep(0.02)
    out, err = proc.communicate()
    assert proc.returncode == 0, err
    worker_peak = max(peak.values())
    print(f"\npredicted {predicted / 2**30:.3f} GiB per worker, measured worker RSS peak {worker_peak / 2**30:.3f} GiB "
          f"({worker_peak / predicted:.2f} x)")
    assert worker_peak <= 1.2 * predicted
