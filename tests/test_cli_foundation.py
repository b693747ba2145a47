"""`recurjac-scale import` and `recurjac-scale info`: output, exit codes, no tracebacks, no silent overwrites."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from recurjac_scale.cli import main
from recurjac_scale.network.default import default_model_path
from recurjac_scale.network.model import InputSpec, Network
from recurjac_scale.network.store import FORMAT_VERSION, network_store_info, open_network, save_network

REPO = Path(__file__).resolve().parents[1]


def _run(*args, cwd=None):
    """The real command line in a fresh interpreter."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "recurjac_scale.cli", *map(str, args)], capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=300)


def _one_line_error(r, code=1):
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    if code == 1:
        assert len(lines) == 1, r.stderr
    return r.stderr


def _write_npz(path: Path, rng, widths=(20, 12, 8, 3), acts=("relu", "tanh", "linear")):
    data = {}
    for k in range(len(widths) - 1):
        data[f"W{k}"] = rng.standard_normal((widths[k + 1], widths[k]))
        data[f"b{k}"] = rng.standard_normal(widths[k + 1])
    np.savez(path, acts=np.array(acts), **data)
    return data


def _reference_forward(data, x, acts=("relu", "tanh", "linear")):
    f = {"relu": lambda z: np.maximum(z, 0), "tanh": np.tanh, "linear": lambda z: z}
    h = x
    for k, a in enumerate(acts):
        h = f[a](h @ data[f"W{k}"].T + data[f"b{k}"])
    return h


# -- info -------------------------------------------------------------------------------------------------------


def test_info_default(capsys):
    assert main(["info", "default"]) == 0
    out = capsys.readouterr().out
    for needle in ("64-32-32-10", "3,466 parameters", "relu, relu", "output: identity", "shape (1, 8, 8)",
                   "domain [0, 1]", "on disk", "zstd", "provenance", "sklearn.datasets.load_digits", "32 x 64"):
        assert needle in out, needle


def test_info_json_matches_store_info(capsys, tmp_path, rng):
    net = Network([rng.standard_normal((7, 5)), rng.standard_normal((2, 7))], [np.zeros(7), np.ones(2)],
                  ["sigmoid"], output_activation="tanh",
                  input_spec=InputSpec(shape=(5,), domain_lower=-1.0, domain_upper=2.0),
                  provenance={"source": "unit-test", "sha256": "0" * 64})
    p = save_network(net, tmp_path / "m.zarr", chunk_edge=3)
    assert main(["info", str(p), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got == json.loads(json.dumps(network_store_info(p)))
    assert got["widths"] == [5, 7, 2] and got["output_activation"] == {"name": "tanh"}
    assert got["layers"][0]["weight"]["chunks"] == [3, 3] and got["layers"][0]["weight"]["n_chunks"] == 6
    assert got["provenance"]["source"] == "unit-test"
    assert main(["info", str(p)]) == 0
    text = capsys.readouterr().out
    assert "5-7-2" in text and "sigmoid" in text and "[-1, 2] for every coordinate" in text and "3 x 3" in text


def test_info_reports_missing_chunks(capsys, tmp_path, rng):
    import shutil

    net = Network([rng.standard_normal((7, 5))], [np.zeros(7)], [])
    p = save_network(net, tmp_path / "m.zarr", chunk_edge=2)
    shutil.rmtree(p / "layers" / "0" / "weight" / "c" / "1")
    assert main(["info", str(p)]) == 0
    assert "missing" in capsys.readouterr().out


def test_info_subprocess_default_and_errors(tmp_path):
    r = _run("info", "default")
    assert r.returncode == 0 and "64-32-32-10" in r.stdout, r.stderr
    err = _one_line_error(_run("info", tmp_path / "nope.zarr"))
    assert "no such model store" in err and "nope.zarr" in err
    # A store written by a newer version of the format.
    p = save_network(open_network(default_model_path()), tmp_path / "new.zarr")
    meta = json.loads((p / "zarr.json").read_text())
    meta["attributes"]["format_version"] = FORMAT_VERSION + 1
    (p / "zarr.json").write_text(json.dumps(meta))
    err = _one_line_error(_run("info", p))
    assert "newer" in err and str(p) in err
    # Unknown activation in the metadata.
    meta["attributes"].update(format_version=FORMAT_VERSION, activations=[{"name": "gelu"}, {"name": "relu"}])
    (p / "zarr.json").write_text(json.dumps(meta))
    err = _one_line_error(_run("info", p))
    assert "gelu" in err and "Assumption 2" in err
    # --debug shows the traceback instead.
    r = _run("--debug", "info", tmp_path / "nope.zarr")
    assert r.returncode != 0 and "Traceback" in r.stderr


@pytest.mark.parametrize("argv", [["info"], ["info", "a", "b"], ["info", "--bogus", "x"], ["nosuchcommand"], []])
def test_usage_errors_exit_2(argv):
    r = _run(*argv)
    _one_line_error(r, code=2)
    assert "usage:" in r.stderr


def test_help_texts(capsys):
    for argv, needles in (
        (["--help"], ["import", "info", "MODEL"]),
        (["info", "--help"], ["--json", "MODEL", "provenance", "default"]),
        (["import", "--help"], ["SRC", "--output", "--format", "--chunks", "--domain", "--mean", "--std",
                                "--input-shape", "--layout", "--overwrite", "onnx", "npz", "Assumption 2"]),
    ):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 0
        out = capsys.readouterr().out
        for n in needles:
            assert n in out, (argv, n)


# -- import -----------------------------------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def _needs_importers(request):
    """The import tests need the importers package (the info tests above do not)."""
    if request.node.name.startswith("test_import"):
        pytest.importorskip("recurjac_scale.network.importers")


def test_import_npz_with_metadata(tmp_path, rng, capsys):
    src = tmp_path / "net.npz"
    data = _write_npz(src, rng)
    out = tmp_path / "net.zarr"
    rc = main(["import", str(src), "-o", str(out), "--domain", "0,1", "--input-shape", "1,4,5", "--layout", "CHW",
               "--mean", "0.5", "--std", "0.25", "--chunks", "4"])
    assert rc == 0
    line = capsys.readouterr().out.strip()
    assert "\n" not in line and "20-12-8-3" in line and str(out) in line and "parameters" in line
    net = open_network(out)
    spec = net.input_spec
    assert spec.shape == (1, 4, 5) and spec.layout == "CHW"
    assert (spec.domain_lower == 0).all() and (spec.domain_upper == 1).all()
    assert np.array_equal(spec.mean, [0.5]) and np.array_equal(spec.std, [0.25])
    x = rng.uniform(0, 1, size=(6, 20))
    # The normalisation is folded: the store takes raw inputs and computes the network on (x - 0.5) / 0.25.
    np.testing.assert_allclose(net.forward(x), _reference_forward(data, (x - 0.5) / 0.25), rtol=1e-12, atol=1e-12)
    info = network_store_info(out)
    assert info["layers"][0]["weight"]["chunks"] == [4, 4]
    prov = info["provenance"]
    assert hashlib.sha256(src.read_bytes()).hexdigest() in json.dumps(prov)
    assert "net.npz" in json.dumps(prov) and "created" in prov


def test_import_per_channel_normalisation(tmp_path, rng):
    src = tmp_path / "net.npz"
    data = _write_npz(src, rng, widths=(12, 6, 3), acts=("relu", "linear"))
    out = tmp_path / "net.zarr"
    r = _run("import", src, "-o", out, "--input-shape", "3,2,2", "--layout", "CHW", "--mean", "0.1,0.2,0.3",
             "--std", "0.5,1,2")
    assert r.returncode == 0, r.stderr
    m = np.repeat([0.1, 0.2, 0.3], 4)
    s = np.repeat([0.5, 1.0, 2.0], 4)
    x = rng.uniform(0, 1, size=(4, 12))
    np.testing.assert_allclose(open_network(out).forward(x), _reference_forward(data, (x - m) / s, ("relu", "linear")),
                               rtol=1e-12, atol=1e-12)


def test_import_never_overwrites_without_flag(tmp_path, rng):
    src = tmp_path / "net.npz"
    _write_npz(src, rng)
    out = tmp_path / "net.zarr"
    assert _run("import", src, "-o", out).returncode == 0
    before = (out / "zarr.json").read_bytes()
    other = tmp_path / "other.npz"
    _write_npz(other, rng)
    err = _one_line_error(_run("import", other, "-o", out))
    assert "already exists" in err and "--overwrite" in err
    assert (out / "zarr.json").read_bytes() == before
    r = _run("import", other, "-o", out, "--overwrite")
    assert r.returncode == 0, r.stderr
    assert "other.npz" in json.dumps(network_store_info(out)["provenance"])


def test_import_invalid_data_exit_1(tmp_path, rng):
    src = tmp_path / "net.npz"
    _write_npz(src, rng)
    # input shape that does not match n_0 = 20
    err = _one_line_error(_run("import", src, "-o", tmp_path / "a.zarr", "--input-shape", "3,2,2"))
    assert "20" in err
    assert not (tmp_path / "a.zarr").exists()
    # std with a zero
    _one_line_error(_run("import", src, "-o", tmp_path / "b.zarr", "--std", "0"))
    # per-channel statistic without a channel layout
    _one_line_error(_run("import", src, "-o", tmp_path / "c.zarr", "--mean", "0.1,0.2,0.3"))
    # NaN weights
    bad = tmp_path / "nan.npz"
    W = rng.standard_normal((3, 4))
    W[1, 1] = np.nan
    np.savez(bad, W0=W, b0=np.zeros(3), acts=np.array(["linear"]))
    _one_line_error(_run("import", bad, "-o", tmp_path / "d.zarr"))
    # a refused activation
    gelu = tmp_path / "gelu.npz"
    np.savez(gelu, W0=np.ones((3, 4)), b0=np.zeros(3), W1=np.ones((2, 3)), b1=np.zeros(2),
             acts=np.array(["gelu", "linear"]))
    err = _one_line_error(_run("import", gelu, "-o", tmp_path / "e.zarr"))
    assert "Assumption 2" in err
    # missing source, unknown suffix, output folder that does not exist
    _one_line_error(_run("import", tmp_path / "missing.npz", "-o", tmp_path / "f.zarr"))
    junk = tmp_path / "model.xyz"
    junk.write_text("hello")
    _one_line_error(_run("import", junk, "-o", tmp_path / "g.zarr"))
    _one_line_error(_run("import", src, "-o", tmp_path / "no" / "dir" / "h.zarr"))
    # a file that is not what --format says
    _one_line_error(_run("import", junk, "-o", tmp_path / "i.zarr", "--format", "npz"))
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p.suffix not in (".npz", ".xyz"))
    assert leftovers == [], leftovers


@pytest.mark.parametrize(
    "extra",
    [["--domain", "1,0"], ["--domain", "0"], ["--domain", "a,b"], ["--chunks", "0"], ["--chunks", "x"],
     ["--format", "caffe"], ["--layout", "NCHW"], ["--input-shape", "3,-1"], ["--mean", "nan"]],
)
def test_import_usage_errors_exit_2(tmp_path, rng, extra):
    src = tmp_path / "net.npz"
    _write_npz(src, rng)
    r = _run("import", src, "-o", tmp_path / "x.zarr", *extra)
    _one_line_error(r, code=2)
    assert not (tmp_path / "x.zarr").exists()


def test_import_requires_output(tmp_path, rng):
    src = tmp_path / "net.npz"
    _write_npz(src, rng)
    _one_line_error(_run("import", src), code=2)
