"""Security (issue "Reliability"): no pickles in checkpoints or results, the local scheduler on loopback only,
paths from user-given files confined to the output folder, a dask Security object accepted by the SLURM script."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

from recurjac_scale.engine import plan_jacobian
from recurjac_scale.errors import InputError
from recurjac_scale.paths import resolve_inside, write_atomic
from recurjac_scale.testing import random_network

PICKLE_HEADERS = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")


def test_checkpoints_and_results_hold_no_pickles(tmp_path):
    rng = np.random.default_rng(0)
    net = random_network([6, 9, 7, 3], "relu", rng, domain=(0.0, 1.0))
    x0 = rng.uniform(0.2, 0.8, 6)
    plan = plan_jacobian(net, x0, 0.05, math.inf, "recurjac-b", layer_bounds="ibp", row_block=2, col_block=3,
                         memory_budget="1GiB")
    ck, out = tmp_path / "ck", tmp_path / "r.zarr"
    plan.compute(checkpoint=ck, output=out, scheduler="synchronous", durable=False)
    files = [p for d in (ck, out) for p in d.rglob("*") if p.is_file()]
    assert files
    for f in files:
        data = f.read_bytes()
        assert not data.startswith(PICKLE_HEADERS), f"{f} looks like a pickle"
        assert b"pickle" not in data.lower() and b"numpy.core.multiarray" not in data
        if f.suffix == ".json":
            json.loads(data)  # records and metadata are plain JSON
    codecs = {c.get("name") for f in files if f.name == "zarr.json"
              for c in json.loads(f.read_text()).get("codecs", []) or []}
    assert not {n for n in codecs if n and "pickle" in n}


@pytest.mark.cluster
def test_local_cluster_started_by_the_engine_binds_loopback():
    import psutil

    from recurjac_scale.engine.schedulers import open_executor

    with open_executor("distributed", workers=1, dashboard=False) as ex:
        assert ex.address.startswith("tcp://127.0.0.1:")
        info = ex.client.scheduler_info()
        assert all(a.startswith("tcp://127.0.0.1:") for a in info["workers"])
        pids = [os.getpid(), *ex.client.run(os.getpid).values()]
        ips = {c.laddr.ip for p in pids for c in psutil.Process(p).net_connections(kind="inet")
               if c.status == psutil.CONN_LISTEN}
        assert ips == {"127.0.0.1"}


def test_resolve_inside(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    assert resolve_inside(out, "a/b.npz") == (out / "a" / "b.npz").resolve()
    for bad in ("../x.npz", "a/../../x", "/etc/passwd"):
        with pytest.raises(InputError, match="leaves the folder|is absolute"):
            resolve_inside(out, bad)
    (out / "link").symlink_to(tmp_path)
    with pytest.raises(InputError, match="leaves the folder"):
        resolve_inside(out, "link/escape.npz")


def test_write_atomic_never_follows_a_planted_file(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    out = tmp_path / "out"
    out.mkdir()
    target = out / "r.json"
    # Every name an older version (or a careless writer) would use for its temporary file.
    for name in ("r.json.tmp", ".r.json.tmp", "r.json~"):
        (out / name).symlink_to(victim)
    write_atomic(target, lambda fh: fh.write("new"))
    assert victim.read_text() == "keep" and target.read_text() == "new" and not target.is_symlink()
    assert sorted(p.name for p in out.iterdir()) == [".r.json.tmp", "r.json", "r.json.tmp", "r.json~"]
    assert (target.stat().st_mode & 0o777) == 0o666 & ~_umask()

    def fail(fh):
        fh.write("partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_atomic(target, fail)
    assert target.read_text() == "new"  # the old file stays whole and no temporary file is left behind
    assert sorted(p.name for p in out.iterdir()) == [".r.json.tmp", "r.json", "r.json.tmp", "r.json~"]


def _umask():
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_cli_outputs_never_follow_a_planted_tmp_symlink(tmp_path):
    """Each CLI writer that replaces an output file goes through a fresh temporary file: a symlink planted at
    ``OUT.tmp`` (the name these writers used to write through) leaves its target untouched."""
    from recurjac_scale.cli import main
    from recurjac_scale.network.store import save_network

    rng = np.random.default_rng(3)
    net = random_network([4, 6, 3], "relu", rng, domain=(0.0, 1.0))
    model = tmp_path / "m.zarr"
    save_network(net, model)
    x = tmp_path / "x.npy"
    np.save(x, rng.uniform(0.2, 0.8, (1, 4)))
    victim = tmp_path / "victim.bin"
    victim.write_bytes(b"keep")
    runs = {
        "b.npz": ["bounds", str(model), "--input", str(x), "--eps", "0.05", "--method", "recurjac-b", "--output"],
        "lb.npz": ["layer-bounds", str(model), "--input", str(x), "--eps", "0.05", "--output"],
        "l.json": ["lipschitz", str(model), "--input", str(x), "--eps", "0.05", "--json"],
        "bab.json": ["bab", str(model), "--input", str(x), "--eps", "0.05", "--time-budget", "2", "--json"],
    }
    for name, argv in runs.items():
        out = tmp_path / name
        (tmp_path / (name + ".tmp")).symlink_to(victim)
        assert main([*argv, str(out), "--quiet"]) == 0, name
        assert out.is_file() and not out.is_symlink() and out.stat().st_size > 0, name
    assert victim.read_bytes() == b"keep"


def _slurm_script():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "scripts" / "slurm_job.py"
    spec = importlib.util.spec_from_file_location("slurm_job", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_slurm_script_builds_a_tls_security_object(tmp_path):
    pytest.importorskip("dask_jobqueue")
    from distributed.security import Security

    mod = _slurm_script()
    for name in ("ca.pem", "cert.pem", "key.pem"):
        (tmp_path / name).write_text("-----BEGIN CERTIFICATE-----\n")
    base = ["m.zarr", "--input", "x.npy", "--eps", "0.1", "--checkpoint", "ck", "-o", "r.zarr"]
    args = mod._parser().parse_args([*base, "--tls-ca-file", str(tmp_path / "ca.pem"), "--tls-cert",
                                     str(tmp_path / "cert.pem"), "--tls-key", str(tmp_path / "key.pem")])
    sec = mod.security_from_args(args)
    assert isinstance(sec, Security) and sec.require_encryption
    assert sec.tls_ca_file == str(tmp_path / "ca.pem") and sec.tls_worker_cert == str(tmp_path / "cert.pem")
    from recurjac_scale.cluster import slurm_cluster_kwargs

    assert slurm_cluster_kwargs(cores=2, security=sec)["security"] is sec
    assert mod.security_from_args(mod._parser().parse_args(base)) is None
    with pytest.raises(SystemExit):
        mod.security_from_args(mod._parser().parse_args([*base, "--tls-ca-file", str(tmp_path / "ca.pem")]))
    # certify takes the same options: they are the script's (not passed on to the certify command)
    tls = ["--tls-ca-file", str(tmp_path / "ca.pem"), "--tls-cert", str(tmp_path / "cert.pem"), "--tls-key",
           str(tmp_path / "key.pem")]
    cargs, rest = mod._slurm_parser().parse_known_args(["--cores", "2", *tls, "default", "--json", "o.jsonl"])
    assert rest == ["default", "--json", "o.jsonl"]
    csec = mod.security_from_args(cargs)
    assert isinstance(csec, Security) and csec.require_encryption and csec.tls_client_key == str(tmp_path / "key.pem")
    assert mod.client_tls_config(csec)["distributed.comm.tls.client.cert"] == str(tmp_path / "cert.pem")
    assert mod.certify_main(["--dry-run", *tls, "default", "--json", "o.jsonl"]) == 0
    with pytest.raises(SystemExit):
        mod.certify_main(["--dry-run", "--tls-cert", str(tmp_path / "cert.pem"), "default", "--json", "o.jsonl"])


@pytest.mark.cluster
def test_certify_client_of_the_slurm_script_speaks_tls(tmp_path, capsys):
    """A real TLS LocalCluster (scheduler and worker processes on loopback, certificates in files): the certify
    command run the way the SLURM script runs it completes with the script's Security, and fails with one line
    without it; the engine's connect() also reaches a TLS scheduler with the same configuration."""
    import dask
    from distributed import LocalCluster
    from distributed.security import Security

    from recurjac_scale.engine.schedulers import connect
    from recurjac_scale.network.default import default_inputs

    mod = _slurm_script()
    made = Security.temporary()
    pems = {"ca.pem": made.tls_ca_file, "cert.pem": made.tls_client_cert, "key.pem": made.tls_client_key}
    for name, pem in pems.items():
        (tmp_path / name).write_text(pem)
    args, _ = mod._slurm_parser().parse_known_args(["--tls-ca-file", str(tmp_path / "ca.pem"), "--tls-cert",
                                                    str(tmp_path / "cert.pem"), "--tls-key", str(tmp_path / "key.pem")])
    sec = mod.security_from_args(args)
    np.save(tmp_path / "x.npy", default_inputs()[:2])
    rest = ["default", "--inputs", str(tmp_path / "x.npy"), "--target", "runnerup", "--norm", "inf", "--method",
            "fastlip", "--layer-bounds", "ibp", "--no-margin-bound", "--quiet"]
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, protocol="tls", host="127.0.0.1",
                      security=sec, dashboard_address=None) as cluster:
        addr = cluster.scheduler_address
        assert addr.startswith("tls://127.0.0.1:")
        assert mod.certify_on(addr, [*rest, "--json", str(tmp_path / "plain.jsonl")], None) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "cannot connect to the dask scheduler" in err[0] and "tls" in err[0]
        assert mod.certify_on(addr, [*rest, "--json", str(tmp_path / "tls.jsonl")], sec) == 0
        lines = [json.loads(s) for s in (tmp_path / "tls.jsonl").read_text().splitlines()]
        assert len(lines) == 4 and lines[-1]["summary"]["records"] == 2 and lines[-1]["summary"]["failed"] == 0
        with dask.config.set(mod.client_tls_config(sec)):
            client = connect(addr, 30)
            try:
                assert client.submit(sum, [1, 2]).result() == 3
            finally:
                client.close()


@pytest.mark.cluster
def test_slurm_script_local_test_runs_over_tls(tmp_path, capsys):
    """``--local-test N`` with ``--tls-*`` tries the TLS setup out: the certify batch and the engine job both run on
    a local cluster whose scheduler speaks only TLS (the client of each uses the script's certificates)."""
    from distributed.security import Security

    from recurjac_scale.network.default import default_inputs, default_model_path

    mod = _slurm_script()
    made = Security.temporary()
    for name, pem in {"ca.pem": made.tls_ca_file, "cert.pem": made.tls_client_cert,
                      "key.pem": made.tls_client_key}.items():
        (tmp_path / name).write_text(pem)
    tls = ["--tls-ca-file", str(tmp_path / "ca.pem"), "--tls-cert", str(tmp_path / "cert.pem"), "--tls-key",
           str(tmp_path / "key.pem")]
    np.save(tmp_path / "x.npy", default_inputs()[:2])
    out = tmp_path / "c.jsonl"
    rc = mod.main(["certify", "default", "--inputs", str(tmp_path / "x.npy"), "--method", "fastlip",
                   "--layer-bounds", "ibp", "--no-margin-bound", "--json", str(out), "--quiet", "--local-test", "1",
                   *tls])
    assert rc == 0, capsys.readouterr().err
    lines = [json.loads(s) for s in out.read_text().splitlines()]
    assert len(lines) == 4 and lines[-1]["summary"]["records"] == 2 and lines[-1]["summary"]["failed"] == 0
    capsys.readouterr()
    rc = mod.main([str(default_model_path()), "--input", str(tmp_path / "x.npy"), "--index", "0", "--eps", "0.01",
                   "--method", "recurjac-b", "--layer-bounds", "ibp", "-o", str(tmp_path / "r.zarr"),
                   "--checkpoint", str(tmp_path / "ck"), "--memory", "4GiB", "--local-test", "1", *tls])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    res = json.loads(cap.out)
    assert res["blocks_computed"] == res["blocks_total"] > 0 and res["executor"]["address"].startswith("tls://"), res
    assert (tmp_path / "r.zarr").exists()


def test_umask_is_read_without_being_changed(tmp_path):
    # A fresh interpreter under umask 027: the module reads 027, and files it writes get 0o640.
    code = (
        "import os, sys\n"
        "from recurjac_scale import paths\n"
        "assert paths._UMASK == 0o027, oct(paths._UMASK)\n"
        "paths.write_atomic(sys.argv[1], lambda fh: fh.write('x'))\n"
        "print(oct(os.stat(sys.argv[1]).st_mode & 0o777))\n"
    )
    import subprocess
    import sys

    out = subprocess.run(
        ["sh", "-c", 'umask 027 && exec "$0" -c "$1" "$2"', sys.executable, code, str(tmp_path / "f.txt")],
        capture_output=True, text=True, check=True,
    )
    assert out.stdout.strip() == "0o640"
    from recurjac_scale.paths import _read_umask

    assert _read_umask() == _umask()
