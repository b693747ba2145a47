"""Faults (issue "Reliability"): Ctrl-C stops the CLI within seconds with exit code 130 and says where the
finished blocks are; damaged or hand-edited checkpoint records and chunks, and edited result stores, are detected by
their SHA-256 checksums and recomputed (never trusted); a full disk or a file system made read-only mid-run fails
cleanly and leaves a checkpoint the rerun completes from.  (A worker killed mid-run: test_engine_cluster.py; the
CLI killed with SIGKILL mid-run: test_engine_cli.py.)"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from recurjac_scale.engine import plan_jacobian
from recurjac_scale.engine.result_store import read_result_store
from recurjac_scale.errors import IncompleteRunError, IntegrityError
from recurjac_scale.jacobian import jacobian_bounds
from recurjac_scale.testing import random_network

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    from recurjac_scale.network.store import save_network

    d = tmp_path_factory.mktemp("faults")
    rng = np.random.default_rng(5)
    net = random_network([16, 40, 40, 40, 5], "relu", rng, domain=(0.0, 1.0))
    x0 = rng.uniform(0.3, 0.7, size=16)
    save_network(net, d / "m.zarr")
    np.save(d / "x.npy", x0)
    ref = jacobian_bounds(net, x0, 0.03, math.inf, method="recurjac-f0", layer_bounds="ibp")
    return d, net, x0, ref


TOTAL = 16 * (10 + 10 + 2)  # F0 rows = 16 inputs, one per block; widths 40, 40, 5 in column blocks of 4


def _cmd(d, ck, out):
    return [
        sys.executable, "-m", "recurjac_scale.cli", "run", str(d / "m.zarr"), "--input", str(d / "x.npy"),
        "--eps", "0.03", "--method", "recurjac-f0", "--layer-bounds", "ibp", "--row-block", "1", "--col-block", "4",
        "--scheduler", "threads", "--threads-per-worker", "2", "--checkpoint", str(ck), "-o", str(out), "--json",
        "--quiet", "--memory-budget", "2GiB",
    ]


def _records(ck: Path) -> int:
    return len(list((ck / "done").glob("step-*/*.json"))) if (ck / "done").exists() else 0


def _read(out):
    import zarr

    g = zarr.open_group(str(out), mode="r")
    return g["lower"][...], g["upper"][...]


def _start_and_wait(cmd, ck, n=20):
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while _records(ck) < n and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.005)
    return proc


def test_ctrl_c_stops_quickly_says_where_and_resumes(job, tmp_path):
    d, _, _, ref = job
    ck, out = tmp_path / "ck", tmp_path / "r.zarr"
    cmd = _cmd(d, ck, out)
    proc = _start_and_wait(cmd, ck)
    t_int = time.monotonic()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    stopped_after = time.monotonic() - t_int
    assert proc.returncode == 130, err
    assert stopped_after < 5, f"took {stopped_after:.1f} s to stop"
    assert "Traceback" not in err
    n_done = _records(ck)
    assert 0 < n_done < TOTAL, "the interrupt did not happen mid-run; make the job longer"
    import re

    m = re.search(rf"interrupted: (\d+) of {TOTAL} block\(s\) are finished and kept in {re.escape(str(ck))}", err)
    assert m, err
    # a task already running when the interrupt came may still finish and be recorded on the way out
    assert n_done - 2 <= int(m.group(1)) <= n_done
    assert not out.exists()
    rerun = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    summary = json.loads(rerun.stdout)
    assert summary["blocks_reused"] == n_done and summary["blocks_computed"] == TOTAL - n_done
    lo, up = _read(out)
    np.testing.assert_array_equal(lo, ref.lower)
    np.testing.assert_array_equal(up, ref.upper)


def _plan(job):
    d, _, x0, _ = job
    return plan_jacobian(d / "m.zarr", x0, 0.03, math.inf, "recurjac-f0", layer_bounds="ibp", row_block=4,
                         col_block=8, memory_budget="2GiB")


def test_damaged_checkpoint_is_recomputed_never_trusted(job, tmp_path):
    """Finish part of a job, then damage it three ways: flip bytes of a recorded block's chunk of the LAST step
    (its values go straight into the result), edit a record's content by hand, and truncate a record file.  The
    rerun recomputes exactly those blocks and gives the uninterrupted result."""
    d, _, _, ref = job
    plan = _plan(job)
    ck = tmp_path / "ck"
    with pytest.raises(IncompleteRunError, match="max_blocks") as ei:
        plan.compute(checkpoint=ck, max_blocks=sum(s.n_tasks for s in plan.steps) - 2, scheduler="synchronous",
                     durable=False)
    assert ei.value.checkpoint == str(ck) and ei.value.done == ei.value.total - 2
    T = plan.steps[-1].step
    recs = sorted((ck / "done" / f"step-{T:03d}").glob("*.json"))
    assert len(recs) >= 1
    rec = json.loads(recs[0].read_text())
    chunk = ck / next(iter(rec["sha256"]))
    data = bytearray(chunk.read_bytes())
    data[8] ^= 0x40  # one float64 of the stored bound changes
    chunk.write_bytes(bytes(data))
    earlier = sorted((ck / "done" / "step-001").glob("*.json"))
    edited = json.loads(earlier[0].read_text())
    edited["rows"] = [0, 1]  # hand-edited, still valid JSON of the same job
    earlier[0].write_text(json.dumps(edited))
    earlier[1].write_text(earlier[1].read_text()[:20])  # torn record
    logs = []
    res = plan.compute(checkpoint=ck, scheduler="synchronous", durable=False, log=logs.append)
    np.testing.assert_array_equal(res.lower, ref.lower)
    np.testing.assert_array_equal(res.upper, ref.upper)
    assert res.blocks_reused == res.blocks_total - 2 - 3
    damaged = [m for m in logs if m.startswith("checkpoint block")]
    assert len(damaged) == 2  # the torn record is simply not a record
    assert any("does not match its checksum" in m for m in damaged)


def test_malformed_checkpoint_records_are_recomputed(job, tmp_path):
    """Records edited into valid JSON of the wrong shape (a non-integer step, a missing field, a list, a record
    copied under another block's name) are not records: their blocks are recomputed, the run does not crash."""
    d, _, _, ref = job
    plan = _plan(job)
    ck = tmp_path / "ck"
    plan.compute(checkpoint=ck, scheduler="synchronous", durable=False)
    recs = sorted((ck / "done" / "step-001").glob("*.json"))
    assert len(recs) >= 4
    bodies = [json.loads(f.read_text()) for f in recs[:4]]
    recs[0].write_text(json.dumps(dict(bodies[0], step="x")))
    recs[1].write_text(json.dumps({k: v for k, v in bodies[1].items() if k != "rb"}))
    recs[2].write_text(json.dumps([bodies[2]]))
    recs[3].write_text(json.dumps(bodies[0]))  # block 0's intact record under block 3's name
    res = plan.compute(checkpoint=ck, scheduler="synchronous", durable=False)
    np.testing.assert_array_equal(res.lower, ref.lower)
    np.testing.assert_array_equal(res.upper, ref.upper)
    assert res.blocks_reused == res.blocks_total - 4


def test_edited_result_store_is_detected(job, tmp_path):
    d, _, _, ref = job
    out = tmp_path / "r.zarr"
    _plan(job).compute(output=out, scheduler="synchronous", durable=False)
    lo, up, attrs = read_result_store(out)
    np.testing.assert_array_equal(lo, ref.lower)
    assert attrs["complete"] is True
    import zarr

    g = zarr.open_group(str(out), mode="r+")
    a = g["upper"][...]
    a[0, 0] += 1e-12  # a tiny hand edit
    g["upper"][...] = a
    with pytest.raises(IntegrityError, match=r"'upper' does not match its SHA-256 checksum"):
        read_result_store(out)
    g.attrs["complete"] = False
    with pytest.raises(IncompleteRunError, match="not marked complete"):
        read_result_store(out)


def _mount_tmpfs(path: Path, size: str) -> None:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    path.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")


def _umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.mark.parametrize("fault", ["full", "read-only"])
def test_full_disk_or_read_only_mid_run(job, tmp_path, fault):
    """Checkpoint and output on a small tmpfs: it fills up (or is remounted read-only mid-run).  The CLI fails with
    one line saying what is kept, no result store appears, and the checkpoint, copied elsewhere, completes to the
    uninterrupted result reusing every recorded block."""
    d, _, _, ref = job
    mnt = tmp_path / "mnt"
    _mount_tmpfs(mnt, "600k" if fault == "full" else "64m")
    try:
        ck, out = mnt / "ck", mnt / "r.zarr"
        cmd = _cmd(d, ck, out)
        if fault == "full":
            r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
            rc, err = r.returncode, r.stderr
        else:
            proc = _start_and_wait(cmd, ck)
            subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
            _, err = proc.communicate(timeout=120)
            rc = proc.returncode
        assert rc == 1, err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert ("No space left" if fault == "full" else "Read-only") in err
        assert f"are finished and kept in {ck}" in err
        assert not out.exists()
        n_done = _records(ck)
        assert 0 < n_done < TOTAL
        shutil.copytree(ck, tmp_path / "ck2")
    finally:
        _umount(mnt)
    out2 = tmp_path / "r2.zarr"
    cmd = _cmd(d, tmp_path / "ck2", out2)
    rerun = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    summary = json.loads(rerun.stdout)
    assert summary["blocks_reused"] == n_done
    lo, up = _read(out2)
    np.testing.assert_array_equal(lo, ref.lower)
    np.testing.assert_array_equal(up, ref.upper)
