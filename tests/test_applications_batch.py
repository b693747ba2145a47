"""Batch jobs (recurjac_scale.applications.batch and the certify / landscape / lipschitz commands): a real SIGKILL
of the command during a certify batch and a resume that reuses the finished records and ends equal to an
uninterrupted run; a store of another job refused; corrupted and truncated records recomputed; a worker killed in a
2-worker LocalCluster; one-line errors for bad input."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from recurjac_scale.applications.batch import BatchJob, read_store, record_checksum, run_batch
from recurjac_scale.cli import main
from recurjac_scale.errors import ClusterError, StoreError
from recurjac_scale.network.default import default_inputs, default_model_path

REPO = Path(__file__).resolve().parents[1]
OPTS = dict(p=float("inf"), method="fastlip", layer_bounds="ibp", search="grid", margin_bound=False, seed=0)


def _inputs(n: int) -> np.ndarray:
    rng = np.random.default_rng(5)
    base = default_inputs()
    return np.clip(base[np.arange(n) % 5] + rng.uniform(-0.05, 0.05, size=(n, 64)), 0.0, 1.0)


def _job(x, targets=("runnerup",)) -> BatchJob:
    return BatchJob("certify", str(default_model_path()), x, None, tuple(range(len(x))), targets, dict(OPTS))


def _strip(rec: dict) -> dict:
    return {k: v for k, v in rec.items() if k not in ("time_s", "margin_bound_time_s", "checksum")}


def _records(path: Path) -> list[dict]:
    out = []
    for line in path.read_text().splitlines()[1:]:
        d = json.loads(line)
        if "summary" not in d:
            out.append(d)
    return out


def _cli(*args, env=None, pipes=True):
    pipe = subprocess.PIPE if pipes else subprocess.DEVNULL
    return subprocess.Popen([sys.executable, "-m", "recurjac_scale.cli", *args], cwd=REPO, env=env,
                            stdout=pipe, stderr=pipe, text=True)


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return env


def test_sigkill_then_resume_equals_uninterrupted(tmp_path):
    n = 50
    x = _inputs(n)
    np.save(tmp_path / "x.npy", x)
    out = tmp_path / "c.jsonl"
    args = ["certify", "default", "--inputs", str(tmp_path / "x.npy"), "--target", "runnerup", "--norm", "inf",
            "--method", "fastlip", "--layer-bounds", "ibp", "--no-margin-bound", "--scheduler", "synchronous",
            "--json", str(out), "--quiet"]
    proc = _cli(*args, env=_env(), pipes=False)
    deadline = time.time() + 120
    while time.time() < deadline:
        if out.exists() and len(out.read_text().splitlines()) >= 1 + 8:
            break
        if proc.poll() is not None:
            pytest.fail("the batch ended before it could be killed")
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    before = {r["key"]: r for r in _records(out) if r.get("checksum") == record_checksum(r)}
    assert 8 <= len(before) < n
    assert "summary" not in out.read_text()  # an interrupted store is never presented as complete

    proc = _cli(*args, env=_env())
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    lines = out.read_text().splitlines()
    summary = json.loads(lines[-1])["summary"]
    assert summary["reused"] == len(before) and summary["records"] == n
    after = {r["key"]: r for r in _records(out)}
    for k, r in before.items():
        assert after[k] == r  # reused verbatim, time_s included: not recomputed

    ref = run_batch(_job(x), None, scheduler="synchronous")
    assert [_strip(r) for r in _records(out)] == [_strip(r) for r in ref.records]


def test_store_of_another_job_refused(tmp_path):
    x = _inputs(3)
    out = tmp_path / "c.jsonl"
    run_batch(_job(x), out, scheduler="synchronous")
    text = out.read_text()
    with pytest.raises(StoreError, match="different job"):
        run_batch(_job(x, ("least",)), out, scheduler="synchronous")
    assert out.read_text() == text
    np.save(tmp_path / "x.npy", x)
    proc = _cli("certify", "default", "--inputs", str(tmp_path / "x.npy"), "--target", "least", "--method", "fastlip",
                "--layer-bounds", "ibp", "--no-margin-bound", "--json", str(out), "--quiet", env=_env())
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and "different job" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert out.read_text() == text
    res = run_batch(_job(x, ("least",)), out, scheduler="synchronous", overwrite=True)
    assert res.reused == 0 and res.computed == 3


def test_store_of_another_search_revision_refused(tmp_path):
    """A store written when ``search="grid"`` named another procedure (no or another ``search_revision`` in its job)
    is not resumed: its radii could differ from what this version computes."""
    x = _inputs(2)
    out = tmp_path / "c.jsonl"
    run_batch(_job(x), out, scheduler="synchronous")
    lines = out.read_text().splitlines()
    header = json.loads(lines[0])
    assert header["job"]["search_revision"] == 2
    del header["job"]["search_revision"]  # as the previous version wrote it
    header["job_id"] = hashlib.sha256(json.dumps(header["job"], sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    out.write_text("\n".join([json.dumps(header), *lines[1:]]) + "\n")
    text = out.read_text()
    with pytest.raises(StoreError, match="different job.*search_revision"):
        run_batch(_job(x), out, scheduler="synchronous")
    assert out.read_text() == text


def test_corrupted_and_truncated_records_recomputed(tmp_path):
    x = _inputs(4)
    out = tmp_path / "c.jsonl"
    ref = run_batch(_job(x), out, scheduler="synchronous")
    lines = out.read_text().splitlines()
    bad = json.loads(lines[2])
    bad["radius"] = bad["radius"] * 10  # a silently altered value: the checksum no longer matches
    lines[2] = json.dumps(bad, sort_keys=True, separators=(",", ":"))
    lines[3] = lines[3][: len(lines[3]) // 2]  # a torn write
    out.write_text("\n".join(lines[:-1]) + "\n")  # and no summary
    _, recs, corrupt = read_store(out, _job(x))
    assert corrupt == 2 and len(recs) == 2
    res = run_batch(_job(x), out, scheduler="synchronous")
    assert res.reused == 2 and res.computed == 2 and res.summary["corrupt_recomputed"] == 2
    assert [_strip(r) for r in res.records] == [_strip(r) for r in ref.records]


def test_threads_scheduler_equals_synchronous():
    x = _inputs(4)
    a = run_batch(_job(x, ("runnerup", "random")), None, scheduler="synchronous")
    b = run_batch(_job(x, ("runnerup", "random")), None, scheduler="threads", threads_per_worker=2)
    assert [_strip(r) for r in a.records] == [_strip(r) for r in b.records]


@pytest.mark.cluster
def test_worker_killed_in_local_cluster(tmp_path):
    from recurjac_scale.cluster import local_client

    x = _inputs(12)
    ref = run_batch(_job(x), None, scheduler="synchronous")
    killed = []
    with local_client(2, memory_limit=None) as client:
        pids = client.run(os.getpid)

        def on_record(rec, done, total):
            if not killed:
                addr, pid = next(iter(pids.items()))
                os.kill(pid, signal.SIGKILL)
                killed.append(addr)

        res = run_batch(_job(x), tmp_path / "c.jsonl", client=client, on_record=on_record)
    assert killed
    assert [_strip(r) for r in res.records] == [_strip(r) for r in ref.records]
    assert res.summary["records"] == 12 and res.summary["failed"] == 0


def test_cli_errors_are_one_line(tmp_path, capsys):
    np.save(tmp_path / "x.npy", _inputs(2))
    cases = [
        (["certify", "default", "--inputs", str(tmp_path / "missing.npy")], "does not exist"),
        (["certify", "default", "--inputs", str(tmp_path / "x.npy"), "--index", "1,7"], "out of range"),
        (["certify", "default", "--inputs", str(tmp_path / "x.npy"), "--target", "second"], "unknown target"),
        (["certify", "default", "--inputs", str(tmp_path / "x.npy"), "--target", "12"], "out of range"),
        (["certify", "default", "--inputs", str(tmp_path / "x.npy"), "--method", "nope"], "nope"),
        (["landscape", "default", "--inputs", str(tmp_path / "x.npy"), "--output", "10"], "--output"),
        (["lipschitz", "default", "--inputs", str(tmp_path / "x.npy"), "--input", "default", "--eps", "0"], "exactly one"),
    ]
    for argv, msg in cases:
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert msg in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_cli_certify_and_landscape_and_lipschitz_batch(tmp_path, capsys):
    np.save(tmp_path / "x.npy", _inputs(2))
    np.save(tmp_path / "y.npy", np.array([3, 3]))
    out = tmp_path / "c.jsonl"
    assert main(["certify", "default", "--inputs", str(tmp_path / "x.npy"), "--labels", str(tmp_path / "y.npy"),
                 "--target", "runnerup,least", "--json", str(out)]) == 0
    cap = capsys.readouterr()
    assert "misclassified" in cap.out and cap.err == ""  # no progress bar when stderr is not a terminal
    recs = _records(out)
    assert [r["key"] for r in recs] == ["0:runnerup", "0:least", "1:runnerup", "1:least"]
    pred = [r["prediction"] for r in recs]
    for r in recs:
        for k in ("index", "label", "prediction", "target", "radius", "margin_bound_radius", "time_s", "method",
                  "p", "eps_grid", "checksum"):
            assert k in r
        assert r["label"] == 3
        assert (r["radius"] == 0.0) == (r["prediction"] != 3) == r["misclassified"]
    summary = json.loads(out.read_text().splitlines()[-1])["summary"]
    assert summary["misclassified"] == len({r["index"] for r in recs if r["prediction"] != 3})
    assert pred  # both the correct and the misclassified cases are reported, none skipped
    assert main(["landscape", "default", "--inputs", str(tmp_path / "x.npy"), "--json", str(tmp_path / "l.jsonl"),
                 "--quiet"]) == 0
    assert all(r["r_star"] == "inf" or r["r_star"] > 0 for r in _records(tmp_path / "l.jsonl"))
    assert main(["lipschitz", "default", "--inputs", str(tmp_path / "x.npy"), "--eps-grid", "1e-3:1e-1:3",
                 "--method", "fastlip,recurjac-b", "--outputs", "3", "--json", str(tmp_path / "s.jsonl"), "--quiet"]) == 0
    r = _records(tmp_path / "s.jsonl")[0]
    assert set(r["lipschitz"]) == {"fastlip", "recurjac-b"} and len(r["eps_grid"]) == 3


def _slurm_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("slurm_job", REPO / "scripts" / "slurm_job.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cli_certify_search_names(tmp_path, capsys):
    """--search grid (the default) / replay / paper reach certify: each record names its search and has the radius
    and evaluation count of the API call with that search; replay is never below paper."""
    from recurjac_scale.applications import certify
    from recurjac_scale.network.store import open_network

    x = _inputs(1)
    np.save(tmp_path / "x.npy", x)
    net = open_network(default_model_path()).materialize()
    radii = {}
    for search in (None, "grid", "replay", "paper"):
        out = tmp_path / f"{search}.jsonl"
        extra = [] if search is None else ["--search", search]
        assert main(["certify", "default", "--inputs", str(tmp_path / "x.npy"), "--method", "fastlip",
                     "--layer-bounds", "ibp", "--no-margin-bound", "--json", str(out), *extra]) == 0
        (rec,) = _records(out)
        want = certify(net, x[0], None, "runnerup", "inf", method="fastlip", layer_bounds="ibp",
                       search=search or "grid", margin_bound=False)
        assert rec["search"] == (search or "grid")
        assert (rec["radius"], rec["evaluations"]) == (want.radius, want.evaluations)
        radii[search] = rec["radius"]
    capsys.readouterr()
    assert radii["replay"] >= radii["paper"] > 0


def test_slurm_recipe_certify_dry_run(capsys):
    pytest.importorskip("dask_jobqueue")
    mod = _slurm_script()
    rc = mod.main(["certify", "default", "--inputs", "default", "--json", "c.jsonl", "--queue", "compute",
                   "--cores", "2", "--memory", "4GiB", "--dry-run"])
    assert rc == 0
    cap = capsys.readouterr()
    assert "#SBATCH -p compute" in cap.out
    assert "recurjac-scale certify default --inputs default --json c.jsonl --scheduler tcp://" in cap.err
    assert mod.main(["certify", "default", "--inputs", "default"]) == 2  # --json is required


@pytest.mark.slow
@pytest.mark.cluster
def test_slurm_recipe_certify_local_test(tmp_path):
    """The recipe's --local-test path: the certify batch on a 2-worker local cluster equals a synchronous run."""
    mod = _slurm_script()
    x = _inputs(4)
    np.save(tmp_path / "x.npy", x)
    out = tmp_path / "c.jsonl"
    rc = mod.main(["certify", "default", "--inputs", str(tmp_path / "x.npy"), "--method", "fastlip",
                   "--layer-bounds", "ibp", "--no-margin-bound", "--json", str(out), "--quiet", "--local-test", "2"])
    assert rc == 0
    ref = run_batch(_job(x), None, scheduler="synchronous")
    assert [_strip(r) for r in _records(out)] == [_strip(r) for r in ref.records]


def test_cli_box_regions_vnnlib_and_npy(tmp_path):
    """--vnnlib and --box-lower/--box-upper give the same record; it equals certify on the box network."""
    from recurjac_scale.applications import certify
    from recurjac_scale.applications.inputs import box_network
    from recurjac_scale.network.store import open_network

    x0 = default_inputs()[0]
    lo, hi = np.clip(x0 - 0.02, 0, 1), np.clip(x0 + 0.03, 0, 1)
    lines = ["; box around a digit"] + [f"(declare-const X_{i} Real)" for i in range(64)]
    lines += [f"(assert (>= X_{i} {float(lo[i])!r}))\n(assert (<= X_{i} {float(hi[i])!r}))" for i in range(64)]
    lines += ["(declare-const Y_0 Real)", "(assert (<= Y_0 0.0))"]
    (tmp_path / "p.vnnlib").write_text("\n".join(lines) + "\n")
    np.save(tmp_path / "lo.npy", lo)
    np.save(tmp_path / "hi.npy", hi)
    common = ["certify", "default", "--method", "fastlip", "--layer-bounds", "ibp", "--no-margin-bound", "--quiet"]
    assert main(common + ["--vnnlib", str(tmp_path / "p.vnnlib"), "--json", str(tmp_path / "a.jsonl")]) == 0
    assert main(common + ["--box-lower", str(tmp_path / "lo.npy"), "--box-upper", str(tmp_path / "hi.npy"),
                          "--json", str(tmp_path / "b.jsonl")]) == 0
    a, b = _records(tmp_path / "a.jsonl")[0], _records(tmp_path / "b.jsonl")[0]
    assert _strip(a) == _strip(b)
    net_u, u0 = box_network(open_network(default_model_path()).materialize(), lo, hi)
    ref = certify(net_u, u0, None, "runnerup", "inf", method="fastlip", layer_bounds="ibp", margin_bound=False)
    assert a["radius"] == ref.radius and a["target"] == ref.target
    assert main(common + ["--vnnlib", str(tmp_path / "p.vnnlib"), "--norm", "2"]) == 1  # boxes need p = inf


@pytest.mark.slow
def test_cli_plots(tmp_path):
    """--plot writes a PNG for each command (matplotlib is an optional extra)."""
    pytest.importorskip("matplotlib")
    np.save(tmp_path / "x.npy", _inputs(2))
    x = str(tmp_path / "x.npy")
    fast = ["--method", "fastlip", "--layer-bounds", "ibp", "--quiet"]
    assert main(["certify", "default", "--inputs", x, *fast, "--plot", str(tmp_path / "c.png")]) == 0
    assert main(["landscape", "default", "--inputs", x, *fast, "--plot", str(tmp_path / "l.png")]) == 0
    assert main(["lipschitz", "default", "--inputs", x, "--eps-grid", "1e-3:1e-1:3", "--outputs", "0", *fast,
                 "--plot", str(tmp_path / "s.png")]) == 0
    for name in ("c.png", "l.png", "s.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.cluster
def test_batch_workers_get_the_allocator_settings_and_no_profiler():
    """The worker environment of a batch's own local cluster takes effect in the worker processes: glibc's
    thresholds (freed arrays reused instead of page-faulted in again) and dask's profiler switched off."""
    import dask

    from recurjac_scale.applications.batch import BATCH_WORKER_CONFIG, BATCH_WORKER_ENV
    from recurjac_scale.cluster import local_client

    def probe():
        return ({k: os.environ.get(k) for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")},
                dask.config.get("distributed.worker.profile.enabled"))

    with dask.config.set(BATCH_WORKER_CONFIG), local_client(1, memory_limit="1GiB", env=BATCH_WORKER_ENV) as client:
        (env, profiling), = client.run(probe).values()
    assert env == {"MALLOC_MMAP_THRESHOLD_": str(32 * 2**20), "MALLOC_TRIM_THRESHOLD_": str(256 * 2**20)}
    assert profiling is False


@pytest.mark.cluster
def test_certify_on_its_own_local_cluster_from_a_fresh_process(tmp_path):
    """``certify --workers 2`` in a new process (distributed not imported before the batch starts its cluster):
    completes, exit 0, no traceback, and equals the synchronous run."""
    outs = {}
    for mode in (["--workers", "2"], ["--scheduler", "synchronous"]):
        out = tmp_path / f"c{len(outs)}.jsonl"
        proc = _cli("certify", "default", "--inputs", "default", "--index", "0-1", "--target", "runnerup",
                    "--method", "fastlip", "--layer-bounds", "ibp", "--json", str(out), "--quiet", *mode, env=_env())
        _, err = proc.communicate(timeout=240)
        assert proc.returncode == 0 and "Traceback" not in err, err
        outs[mode[0]] = {k: r["radius"] for k, r in read_store(out)[1].items()}
    assert len(outs["--workers"]) == 2 and outs["--workers"] == outs["--scheduler"]


def test_unreachable_scheduler_leaves_no_store(tmp_path):
    """A batch that computed nothing (its scheduler could not be reached) leaves no new store behind; an existing
    store with finished records is kept as it was."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    x = _inputs(2)
    out = tmp_path / "c.jsonl"
    with pytest.raises(ClusterError, match="cannot connect"):
        run_batch(_job(x), out, scheduler=f"tcp://127.0.0.1:{port}", connect_timeout=2)
    assert not out.exists()
    run_batch(_job(x[:1]), tmp_path / "one.jsonl", scheduler="synchronous")
    part = _records(tmp_path / "one.jsonl")
    # the same job with one record finished: the failed rerun keeps it
    job = _job(x)
    lines = (tmp_path / "one.jsonl").read_text().splitlines()
    header = json.loads(lines[0])
    header["job_id"], header["job"] = job.job_id, job.to_dict()
    out.write_text(json.dumps(header) + "\n" + json.dumps(part[0]) + "\n")
    with pytest.raises(ClusterError, match="cannot connect"):
        run_batch(job, out, scheduler=f"tcp://127.0.0.1:{port}", connect_timeout=2)
    assert [r["key"] for r in _records(out)] == [part[0]["key"]]


def test_cli_unreachable_scheduler_one_line_and_no_store(tmp_path, capsys):
    """certify --scheduler ADDRESS --connect-timeout S: one line naming the address, exit 1, no store left."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    np.save(tmp_path / "x.npy", _inputs(2))
    out = tmp_path / "c.jsonl"
    t0 = time.monotonic()
    rc = main(["certify", "default", "--inputs", str(tmp_path / "x.npy"), "--method", "fastlip", "--layer-bounds",
               "ibp", "--no-margin-bound", "--json", str(out), "--quiet", "--scheduler", f"tcp://127.0.0.1:{port}",
               "--connect-timeout", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and f"127.0.0.1:{port}" in err[0] and "Traceback" not in err[0], err
    assert time.monotonic() - t0 < 25
    assert not out.exists()
