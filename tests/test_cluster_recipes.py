"""Cluster recipes (recurjac_scale.cluster): SLURM job scripts (no SLURM here: the script text is checked), a real
LocalCluster on loopback with the worker thread environment, argument validation."""

from __future__ import annotations

import sys

import pytest

from recurjac_scale import cluster
from recurjac_scale.errors import InputError, MissingDependencyError

SLURM_ARGS = dict(
    queue="compute",
    account="proj42",
    cores=4,
    processes=2,
    memory="16GiB",
    walltime="02:30:00",
    job_extra_directives=["--exclusive", "--constraint=avx512"],
    env={"OPENBLAS_CORETYPE": "Haswell"},
    prologue=["source /opt/venv/bin/activate"],
)


def _directives(script: str) -> list[str]:
    return [line[len("#SBATCH "):].strip() for line in script.splitlines() if line.startswith("#SBATCH")]


def _check_slurm_script(script: str, scheduler_address: str) -> None:
    d = _directives(script)
    assert "-p compute" in d
    assert "-A proj42" in d
    assert "--cpus-per-task=4" in d
    assert "-t 02:30:00" in d
    assert "--exclusive" in d and "--constraint=avx512" in d
    # 16 GiB per job: dask-jobqueue writes --mem in whole units (G or M)
    mem = [x for x in d if x.startswith("--mem=")]
    assert mem and mem[0] in ("--mem=16G", "--mem=17180M", "--mem=16384M")
    lines = script.splitlines()
    exports = [line for line in lines if line.startswith("export ")]
    for k in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        assert f"export {k}=1" in exports
    assert "export OPENBLAS_CORETYPE=Haswell" in exports
    worker = [line for line in lines if "dask_worker" in line or "dask worker" in line or "dask-worker" in line]
    assert len(worker) == 1
    cmd = worker[0]
    assert scheduler_address in cmd
    # 4 cores in 2 processes: 2 threads each; 16 GiB split in two
    assert "--nworkers 2" in cmd and "--nthreads 2" in cmd
    assert "8.00GiB" in cmd
    # the prologue and the exports come before the worker starts
    assert lines.index("source /opt/venv/bin/activate") < lines.index(cmd)
    assert max(lines.index(e) for e in exports) < lines.index(cmd)


def test_slurm_cluster_job_script_directives():
    jq = pytest.importorskip("dask_jobqueue")
    kwargs = cluster.slurm_cluster_kwargs(**SLURM_ARGS)
    # A real SLURMCluster object (its scheduler runs here, on loopback); no job is submitted.
    with jq.SLURMCluster(**kwargs, scheduler_options={"host": "127.0.0.1", "dashboard": False, "dashboard_address": "127.0.0.1:0"}) as c:
        script = c.job_script()
        _check_slurm_script(script, c.scheduler_address)


def test_slurm_job_script_without_scheduler_matches():
    pytest.importorskip("dask_jobqueue")
    script = cluster.slurm_job_script(**SLURM_ARGS)
    _check_slurm_script(script, "tcp://SCHEDULER:8786")


def test_slurm_kwargs_validation():
    with pytest.raises(InputError, match="processes"):
        cluster.slurm_cluster_kwargs(cores=2, processes=4)
    with pytest.raises(InputError, match="cores"):
        cluster.slurm_cluster_kwargs(cores=0)
    kw = cluster.slurm_cluster_kwargs(cores=3)
    assert kw["processes"] == 3  # one single-threaded worker process per core by default


def test_missing_jobqueue_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "dask_jobqueue", None)  # makes `import dask_jobqueue` fail
    with pytest.raises(MissingDependencyError, match=r"recurjac-scale\[cluster\]"):
        cluster.slurm_cluster(cores=1)


@pytest.mark.parametrize("bad", ["spark", "local:two", "tcp:/x"])
def test_get_client_rejects_unknown_schedulers(bad):
    with pytest.raises(InputError):
        cluster.get_client(bad)


def test_get_client_in_process_schedulers_need_no_client():
    for s in (None, "threads", "processes", "synchronous"):
        assert cluster.get_client(s) is None
    with pytest.raises(InputError, match="cannot be combined"):
        cluster.get_client("tcp://127.0.0.1:1", workers=2)
    with pytest.raises(InputError):
        cluster.connect("127.0.0.1:8786")


def test_worker_env_overrides():
    env = cluster.worker_env({"OMP_NUM_THREADS": 2, "FOO": "bar"})
    assert env["OMP_NUM_THREADS"] == "2" and env["FOO"] == "bar" and env["NUMBA_NUM_THREADS"] == "1"


@pytest.mark.cluster
def test_local_cluster_loopback_env_and_task(monkeypatch):
    # A hostile parent environment: the recipe must still give every worker one thread everywhere.
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "2")
    monkeypatch.setenv("NUMBA_NUM_THREADS", "2")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)

    def probe():
        import os

        import numba
        import numpy as np
        from threadpoolctl import threadpool_info

        blas = [d["num_threads"] for d in threadpool_info() if d.get("user_api") == "blas"]
        return {
            "env": {k: os.environ.get(k) for k in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                                   "MKL_NUM_THREADS", "RJ_TEST_MARK", "MALLOC_MMAP_THRESHOLD_",
                                                   "MALLOC_TRIM_THRESHOLD_")},
            "numba_threads": numba.config.NUMBA_NUM_THREADS,
            "blas_threads": blas,
            "pid": os.getpid(),
            "sum": float(np.arange(10.0).sum()),
        }

    client = cluster.get_client("local:2", memory_limit="600MiB", env={"RJ_TEST_MARK": "yes", **cluster.MALLOC_ENV})
    try:
        info = client.scheduler_info(n_workers=-1)
        assert client.scheduler.address.startswith("tcp://127.0.0.1:")
        workers = info["workers"]
        assert len(workers) == 2
        for addr, w in workers.items():
            assert addr.startswith("tcp://127.0.0.1:")
            assert w["nthreads"] == 1
            assert w["memory_limit"] == 600 * 2**20
        results = client.run(probe)
        assert len(results) == 2
        import os

        pids = set()
        for r in results.values():
            # (and not dask's MALLOC_TRIM_THRESHOLD_=65536, which page-faults every task's arrays in again)
            assert r["env"] == {"NUMBA_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
                                "MKL_NUM_THREADS": "1", "RJ_TEST_MARK": "yes",
                                "MALLOC_MMAP_THRESHOLD_": str(32 * 2**20), "MALLOC_TRIM_THRESHOLD_": str(256 * 2**20)}
            assert r["numba_threads"] == 1
            assert r["blas_threads"] and all(t == 1 for t in r["blas_threads"])
            assert r["pid"] != os.getpid()
            pids.add(r["pid"])
        assert len(pids) == 2
        # a trivial task graph runs
        futs = client.map(lambda i: i * i, range(10))
        assert sum(client.gather(futs)) == sum(i * i for i in range(10))
    finally:
        client.close()
    # the caller's environment is restored
    assert os.environ["OPENBLAS_NUM_THREADS"] == "2" and os.environ["NUMBA_NUM_THREADS"] == "2"
    assert "OMP_NUM_THREADS" not in os.environ
