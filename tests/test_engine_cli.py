"""``recurjac-scale plan`` and ``recurjac-scale run``: output, result store, checkpoint defaults, a local cluster
started by ``--workers``, and the kill test: SIGKILL the CLI mid-run, rerun, same result, blocks reused."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from recurjac_scale.cli import main
from recurjac_scale.jacobian import jacobian_bounds
from recurjac_scale.testing import random_network

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    from recurjac_scale.network.store import save_network

    d = tmp_path_factory.mktemp("cli")
    rng = np.random.default_rng(11)
    net = random_network([10, 17, 15, 13, 4], "relu", rng, domain=(0.0, 1.0))
    x0 = rng.uniform(0.2, 0.8, size=10)
    save_network(net, d / "m.zarr")
    np.save(d / "x.npy", x0)
    return d, net, x0


def _args(d, method="recurjac-f0", eps="0.05", extra=()):
    return [str(d / "m.zarr"), "--input", str(d / "x.npy"), "--eps", eps, "--method", method, "--layer-bounds", "ibp", *extra]


def _read(out):
    import zarr

    g = zarr.open_group(str(out), mode="r")
    return g["lower"][...], g["upper"][...], dict(g.attrs)


def test_plan_prints_and_json(job, capsys):
    d, net, x0 = job
    assert main(["plan", *_args(d, extra=["--row-block", "3", "--col-block", "4"])]) == 0
    text = capsys.readouterr().out
    assert "tasks" in text and "GFLOP" in text and "peak memory per worker" in text
    assert main(["plan", *_args(d, extra=["--row-block", "3", "--col-block", "4", "--json"])]) == 0
    plan = json.loads(capsys.readouterr().out)
    # F0: 10 input rows in blocks of 3 (4 row blocks); state widths 15, 13, 4 in blocks of 4 (4, 4, 1)
    assert [s["n_tasks"] for s in plan["steps"]] == [16, 16, 4]
    assert plan["n_tasks"] == 37 and plan["row_block"] == 3 and plan["col_block"] == 4
    assert not list(d.glob("*.checkpoint"))  # planning writes nothing


def test_plan_memory_budget_and_errors(job, capsys):
    d, _, _ = job
    # a worker process holds ~0.25 GiB before any task (the plan counts it): the budget must cover it
    assert main(["plan", *_args(d, extra=["--memory-budget", "300MiB", "--json"])]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["peak_worker_bytes"] <= 300 * 2**20 and plan["memory_budget"] == 300 * 2**20
    assert plan["worker_baseline_bytes"] == 256 * 2**20 < plan["peak_worker_bytes"]
    assert main(["plan", *_args(d, extra=["--memory-budget", "1KiB"])]) == 1
    assert "too small" in capsys.readouterr().err
    assert main(["plan", *_args(d, method="nope")]) == 1
    with pytest.raises(SystemExit) as e:
        main(["plan", *_args(d, extra=["--row-block", "0"])])
    assert e.value.code == 2


def test_run_writes_result_store(job, tmp_path, capsys):
    d, net, x0 = job
    ref = jacobian_bounds(net, x0, 0.05, math.inf, method="recurjac-f0", layer_bounds="ibp")
    out = tmp_path / "r.zarr"
    rc = main(["run", *_args(d, extra=["--row-block", "3", "--col-block", "4", "--quiet"]), "-o", str(out)])
    assert rc == 0
    assert capsys.readouterr().out == ""
    lo, up, attrs = _read(out)
    np.testing.assert_array_equal(lo, ref.lower)
    np.testing.assert_array_equal(up, ref.upper)
    assert attrs["result"]["method"] == "recurjac-f0" and attrs["result"]["shape"] == [4, 10]
    assert attrs["result"]["lipschitz"] > 0
    # the default checkpoint folder is removed after success; the output is not overwritten
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.zarr"]
    assert main(["run", *_args(d), "-o", str(out), "--quiet"]) == 1
    assert "already exists" in capsys.readouterr().err
    rc = main(["run", *_args(d, extra=["--no-checkpoint", "--json", "--scheduler", "synchronous"]), "-o", str(out), "--overwrite"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["blocks_reused"] == 0 and summary["executor"]["scheduler"] == "synchronous"
    lo2, up2, _ = _read(out)
    np.testing.assert_array_equal(lo2, ref.lower)


def test_run_stream_weights(job, tmp_path, capsys):
    d, net, x0 = job
    ref = jacobian_bounds(net, x0, 0.05, math.inf, method="recurjac-b", layer_bounds="ibp")
    out = tmp_path / "r.zarr"
    assert main(["plan", *_args(d, method="recurjac-b", extra=["--stream-weights", "--json"])]) == 0
    assert json.loads(capsys.readouterr().out)["stream_weights"] is True
    assert main(["run", *_args(d, method="recurjac-b", extra=["--stream-weights", "--quiet"]), "-o", str(out)]) == 0
    lo, up, attrs = _read(out)
    np.testing.assert_array_equal(lo, ref.lower)
    np.testing.assert_array_equal(up, ref.upper)
    assert attrs["plan"]["stream_weights"] is True


def test_run_explicit_checkpoint_is_kept_and_reused(job, tmp_path, capsys):
    d, _, _ = job
    ck = tmp_path / "ck"
    base = ["run", *_args(d, method="recurjac-b", extra=["--checkpoint", str(ck), "--json", "--quiet"])]
    assert main([*base, "-o", str(tmp_path / "a.zarr")]) == 0
    first = json.loads(capsys.readouterr().out)
    assert ck.is_dir() and first["blocks_reused"] == 0
    assert main([*base, "-o", str(tmp_path / "b.zarr")]) == 0
    second = json.loads(capsys.readouterr().out)
    assert second["blocks_reused"] == first["blocks_total"] and second["blocks_computed"] == 0
    # a different job refuses the folder
    assert main(["run", *_args(d, method="recurjac-b", eps="0.1", extra=["--checkpoint", str(ck)]), "-o", str(tmp_path / "c.zarr"), "--quiet"]) == 1
    assert "another job" in capsys.readouterr().err


@pytest.mark.cluster
def test_run_on_local_cluster_started_by_workers(job, tmp_path, capsys):
    d, net, x0 = job
    ref = jacobian_bounds(net, x0, 0.05, math.inf, method="recurjac-f1", layer_bounds="ibp")
    out = tmp_path / "r.zarr"
    rc = main(["run", *_args(d, method="recurjac-f1", extra=["--workers", "2", "--row-block", "4", "--col-block", "5", "--json"]), "-o", str(out)])
    assert rc == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert summary["executor"]["scheduler"] == "distributed" and summary["executor"]["n_workers"] == 2
    assert summary["executor"]["address"].startswith("tcp://127.0.0.1:")
    assert "dashboard" in captured.err and "127.0.0.1" in captured.err
    lo, up, _ = _read(out)
    np.testing.assert_array_equal(lo, ref.lower)
    np.testing.assert_array_equal(up, ref.upper)


def _records(ck: Path) -> int:
    return len(list((ck / "done").glob("step-*/*.json"))) if (ck / "done").exists() else 0


def test_kill_cli_and_resume(tmp_path):
    """SIGKILL the whole CLI process once some blocks are recorded; the rerun reuses exactly those blocks and gives
    the uninterrupted result."""
    from recurjac_scale.network.store import save_network

    rng = np.random.default_rng(5)
    net = random_network([16, 40, 40, 40, 5], "relu", rng, domain=(0.0, 1.0))
    x0 = rng.uniform(0.3, 0.7, size=16)
    save_network(net, tmp_path / "m.zarr")
    np.save(tmp_path / "x.npy", x0)
    ref = jacobian_bounds(net, x0, 0.03, math.inf, method="recurjac-f0", layer_bounds="ibp")
    ck = tmp_path / "ck"
    out = tmp_path / "r.zarr"
    cmd = [
        sys.executable, "-m", "recurjac_scale.cli", "run", str(tmp_path / "m.zarr"), "--input", str(tmp_path / "x.npy"),
        "--eps", "0.03", "--method", "recurjac-f0", "--layer-bounds", "ibp", "--row-block", "1", "--col-block", "4",
        "--scheduler", "threads", "--threads-per-worker", "2", "--checkpoint", str(ck), "-o", str(out), "--json",
        "--quiet",
    ]
    total = 16 * (10 + 10 + 2)
    env = dict(os.environ)
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 90
        while _records(ck) < 20 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    n_done = _records(ck)
    assert 0 < n_done < total, f"kill not mid-run ({n_done} of {total} blocks recorded); make the job longer"
    assert not out.exists()
    rerun = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    summary = json.loads(rerun.stdout)
    assert summary["blocks_total"] == total
    assert summary["blocks_reused"] == n_done
    assert summary["blocks_computed"] == total - n_done
    lo, up, _ = _read(out)
    np.testing.assert_array_equal(lo, ref.lower)
    np.testing.assert_array_equal(up, ref.upper)
