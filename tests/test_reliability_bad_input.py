"""Bad input through the command line (issue "Reliability"): every case ends with exit code != 0, one line on
stderr naming the value and what is accepted, no traceback, and nothing written or overwritten.  The library-level
checks behind them have their own tests (test_store.py, test_importers_*.py); here the real CLI process runs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from recurjac_scale.cli import main
from recurjac_scale.errors import ShapeMismatchError
from recurjac_scale.network.model import Network
from recurjac_scale.testing import random_network

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def d(tmp_path_factory):
    from recurjac_scale.network.store import save_network

    d = tmp_path_factory.mktemp("bad")
    rng = np.random.default_rng(0)
    net = random_network([6, 8, 4], "relu", rng, domain=(0.0, 1.0))
    save_network(net, d / "m.zarr")
    np.save(d / "x.npy", rng.uniform(0.2, 0.8, 6))
    return d


def cli(*args, cwd=None, expect=1, pre=()):
    """Run the CLI as a process; check the exit code and that stderr is exactly one error line."""
    r = subprocess.run([*pre, sys.executable, "-m", "recurjac_scale.cli", *map(str, args)], capture_output=True,
                       text=True, cwd=cwd, timeout=300)
    assert r.returncode == expect, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    if expect == 1:
        assert len(lines) == 1 and "error:" in lines[0], r.stderr
    else:  # usage errors (argparse): the usage, then one error line
        assert lines[-1].startswith("recurjac-scale") and "error:" in lines[-1], r.stderr
    return lines[-1]


def bounds(d, *extra, x="x.npy", out="o.npz"):
    return ["bounds", d / "m.zarr", "--input", d / x, "--eps", "0.1", "--method", "recurjac-b",
            "--layer-bounds", "ibp", "-o", d / out, *extra]


# -- model files ---------------------------------------------------------------------------------------------
def test_truncated_and_corrupt_model_files(d):
    pytest.importorskip("h5py")
    pytest.importorskip("onnx")
    import h5py

    with h5py.File(d / "k.h5", "w") as f:
        f.create_dataset("a", data=np.ones(50000))
    data = (d / "k.h5").read_bytes()
    (d / "trunc.h5").write_bytes(data[: len(data) // 3])
    assert "trunc.h5" in cli("import", d / "trunc.h5", "-o", d / "h.zarr")
    (d / "bad.onnx").write_bytes(b"\x00garbage" * 10)
    assert "cannot read it as an ONNX model" in cli("import", d / "bad.onnx", "-o", d / "o.zarr")
    assert not (d / "h.zarr").exists() and not (d / "o.zarr").exists()


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_corrupt_zarr_chunk(d, damage):
    """A damaged weight chunk (checksum mismatch, truncated file) is an error naming the store and the array."""
    shutil.rmtree(d / "c.zarr", ignore_errors=True)
    shutil.copytree(d / "m.zarr", d / "c.zarr")
    chunk = d / "c.zarr" / "layers" / "0" / "weight" / "c" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF
    else:
        data = data[:5]
    chunk.write_bytes(bytes(data))
    msg = cli("bounds", d / "c.zarr", "--input", d / "x.npy", "--eps", "0.1", "-o", d / "c.npz")
    assert "c.zarr" in msg and "layers/0/weight" in msg and "cannot be read" in msg
    assert not (d / "c.npz").exists()


def _onnx_model(path, op, **attrs):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(1)
    w1 = numpy_helper.from_array(rng.normal(size=(4, 3)).astype(np.float32), "W1")
    b1 = numpy_helper.from_array(np.zeros(4, np.float32), "B1")
    w2 = numpy_helper.from_array(rng.normal(size=(2, 4)).astype(np.float32), "W2")
    b2 = numpy_helper.from_array(np.zeros(2, np.float32), "B2")
    nodes = [
        helper.make_node("Gemm", ["x", "W1", "B1"], ["h"], transB=1),
        helper.make_node(op, ["h"], ["a"], **attrs),
        helper.make_node("Gemm", ["a", "W2", "B2"], ["y"], transB=1),
    ]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])], [w1, b1, w2, b2])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def test_unsupported_op_and_assumption_2(d):
    _onnx_model(d / "det.onnx", "Det")
    assert "Det" in cli("import", d / "det.onnx", "-o", d / "det.zarr")
    _onnx_model(d / "sin.onnx", "Sin")  # sin' = cos can be negative
    msg = cli("import", d / "sin.onnx", "-o", d / "sin.zarr")
    assert "Sin" in msg or "sin" in msg
    assert "Assumption 2" in msg or "negative" in msg
    assert not (d / "det.zarr").exists() and not (d / "sin.zarr").exists()


@pytest.mark.parametrize("case", ["nan", "inf", "mismatch", "zero-width"])
def test_bad_weights_in_a_model_file(d, case):
    rng = np.random.default_rng(2)
    W0, W1 = rng.normal(size=(5, 4)), rng.normal(size=(3, 5))
    if case == "nan":
        W0[1, 2] = np.nan
    elif case == "inf":
        W1[0, 0] = np.inf
    elif case == "mismatch":
        W1 = rng.normal(size=(3, 6))
    else:
        W0, W1 = np.zeros((0, 4)), np.zeros((3, 0))
    np.savez(d / f"{case}.npz", W0=W0, b0=np.zeros(W0.shape[0]), W1=W1, b1=np.zeros(3),
             acts=np.array(["relu", "linear"]))
    msg = cli("import", d / f"{case}.npz", "-o", d / f"{case}.zarr")
    want = {"nan": "NaN", "inf": "inf", "mismatch": "(3, 6)", "zero-width": "zero-width"}[case]
    assert want in msg
    assert not (d / f"{case}.zarr").exists()


def test_zero_width_layer_refused_by_the_network():
    with pytest.raises(ShapeMismatchError, match=r"layer 0: weight of shape \(0, 4\) has a zero-width side"):
        Network([np.ones((0, 4)), np.ones((3, 0))], [np.ones(0), np.ones(3)], ["relu"])


def test_newer_format_version_and_file_instead_of_store(d):
    shutil.rmtree(d / "v.zarr", ignore_errors=True)
    shutil.copytree(d / "m.zarr", d / "v.zarr")
    meta = json.loads((d / "v.zarr" / "zarr.json").read_text())
    meta["attributes"]["format_version"] = 99
    (d / "v.zarr" / "zarr.json").write_text(json.dumps(meta))
    assert "newer" in cli(*bounds(d, out="v.npz")[:1], d / "v.zarr", *bounds(d, out="v.npz")[2:])
    assert "it is a file, not a folder" in cli("info", d / "x.npy")
    assert "no such model store" in cli("info", d / "missing.zarr")


def _drop_privileges_prefix(tmp: Path) -> list:
    """A command prefix running the CLI as user 'nobody' (uid 65534), with the modules loaded while still root
    (the interpreter's own files may not be readable by nobody)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to switch to another user")
    script = tmp / "as_nobody.py"
    script.write_text(
        "import os, sys\n"
        f"sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})\n"
        "import numpy, zarr, dask.array, numcodecs\n"
        "import recurjac_scale.cli as cli\n"
        "cli.build_parser()\n"
        "from recurjac_scale.network import store\n"
        "os.setgroups([]); os.setgid(65534); os.setuid(65534)\n"
        "sys.exit(cli.main(sys.argv[1:]))\n"
    )
    return [sys.executable, str(script)]


@pytest.fixture
def open_tmp():
    """A temporary folder every user can reach (pytest's own tmp_path sits in a folder only its owner can enter)."""
    import tempfile

    p = Path(tempfile.mkdtemp(prefix="recurjac-perm-"))
    os.chmod(p, 0o777)
    try:
        yield p
    finally:
        shutil.rmtree(p, ignore_errors=True)


def test_no_read_permission(open_tmp):
    from recurjac_scale.network.store import save_network

    tmp_path = open_tmp
    rng = np.random.default_rng(3)
    save_network(random_network([6, 8, 4], "relu", rng, domain=(0.0, 1.0)), tmp_path / "m.zarr")
    np.save(tmp_path / "x.npy", rng.uniform(0.2, 0.8, 6))
    os.chmod(tmp_path, 0o777)
    os.chmod(tmp_path / "x.npy", 0o644)
    pre = _drop_privileges_prefix(tmp_path)
    for root, dirs, files in os.walk(tmp_path / "m.zarr"):
        os.chmod(root, 0o755)
        for f in files:
            os.chmod(os.path.join(root, f), 0o644)
    chunk = tmp_path / "m.zarr" / "layers" / "0" / "weight" / "c" / "0" / "0"
    os.chmod(chunk, 0o600)  # one weight chunk unreadable
    r = subprocess.run([*pre, "bounds", tmp_path / "m.zarr", "--input", tmp_path / "x.npy", "--eps", "0.1",
                        "--layer-bounds", "ibp", "-o", tmp_path / "o.npz"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 1 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "layers/0/weight" in r.stderr and "no read permission" in r.stderr
    os.chmod(tmp_path / "m.zarr", 0o700)  # the whole store unreadable
    r = subprocess.run([*pre, "info", tmp_path / "m.zarr"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "Permission denied" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o.npz").exists()


# -- inputs --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "value, match",
    [
        (np.full(5, 0.5), r"input of shape \(5,\) does not match the network's input shape \(6,\)"),
        (np.array([0.5, np.nan, 0.5, 0.5, 0.5, 0.5]), "input 0 coordinate 1 is nan; accepted: finite numbers"),
        (np.array([0.5, 0.5, -np.inf, 0.5, 0.5, 0.5]), "input 0 coordinate 2 is -inf; accepted: finite numbers"),
        (np.array([1.5, 0.5, 0.5, 0.5, 0.5, 0.5]), r"coordinate 0 = 1.5 is outside the declared input domain \[0, 1\]"),
        (np.zeros((0, 6)), "holds no inputs"),
    ],
    ids=["dimension", "nan", "inf", "domain", "empty"],
)
def test_bad_inputs(d, value, match):
    import re

    np.save(d / "bad.npy", value)
    assert re.search(match, cli(*bounds(d, x="bad.npy")))
    assert not (d / "o.npz").exists()


def test_clip_on_request(d, capsys):
    np.save(d / "out.npy", np.array([1.5, 0.5, -0.25, 0.5, 0.5, 0.5]))
    np.save(d / "clipped.npy", np.array([1.0, 0.5, 0.0, 0.5, 0.5, 0.5]))
    assert main([str(a) for a in bounds(d, "--clip", x="out.npy", out="a.npz")]) == 0
    assert main([str(a) for a in bounds(d, x="clipped.npy", out="b.npz")]) == 0
    a, b = np.load(d / "a.npz"), np.load(d / "b.npz")
    np.testing.assert_array_equal(a["lower"], b["lower"])
    np.testing.assert_array_equal(a["upper"], b["upper"])


def test_labels_out_of_range(d):
    assert "output index 7 out of range; accepted: 0..3" in cli(*bounds(d, "--outputs", "7"))
    assert "output index 9 out of range" in cli(*bounds(d, "--outputs", "0,9"))
    assert "--index 3 is out of range" in cli(*bounds(d, "--index", "3"))


def test_bad_eps_norm_method(d):
    base = ["bounds", d / "m.zarr", "--input", d / "x.npy", "-o", d / "o.npz"]
    assert "eps=-1 is negative; accepted: a radius in [0, inf]" in cli(*base, "--eps", "-1")
    assert "invalid radius 'nan'" in cli(*base, "--eps", "nan", expect=2)
    assert "invalid choice: '3'" in cli(*base, "--eps", "0.1", "--norm", "3", expect=2)
    assert "unknown Jacobian method 'foo'; accepted:" in cli(*base, "--eps", "0.1", "--method", "foo")
    assert not (d / "o.npz").exists()


def test_eps_grid_start_after_end(d):
    msg = cli("lipschitz", d / "m.zarr", "--input", d / "x.npy", "--eps-grid", "0.5:0.1:4", expect=2)
    assert "START = 0.5 > END = 0.1; accepted: START <= END" in msg


# -- resources -----------------------------------------------------------------------------------------------
def test_existing_output_is_kept(d):
    (d / "keep.npz").write_text("keep")
    assert "already exists; pass --overwrite" in cli(*bounds(d, out="keep.npz"))
    assert (d / "keep.npz").read_text() == "keep"
    (d / "keep.zarr").mkdir()
    (d / "keep.zarr" / "mine").write_text("keep")
    assert "already exists" in cli("run", d / "m.zarr", "--input", d / "x.npy", "--eps", "0.1", "-o", d / "keep.zarr")
    assert (d / "keep.zarr" / "mine").read_text() == "keep"
