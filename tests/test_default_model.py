"""The bundled default model, its example inputs, the training code and scripts/train_mlp.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from recurjac_scale.network import default as default_mod
from recurjac_scale.network.default import DEFAULT_TRAINING, default_inputs, default_inputs_path, default_model_path
from recurjac_scale.network.store import network_store_info, open_network, save_network
from recurjac_scale.network.train import GEN_ROWS, accuracy, he_network, load_dataset, parse_widths, train_mlp

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "train_mlp.py"


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_bundled_default_model_is_in_the_package():
    p = default_model_path()
    assert p.is_dir() and (p / "zarr.json").is_file()
    assert p.parent.name == "data" and p.parent.parent.name == "recurjac_scale"  # inside the package
    net = open_network(p)
    assert net.widths == tuple(DEFAULT_TRAINING["widths"])
    assert [a.name for a in net.activations] == ["relu", "relu"] and net.output_activation.is_identity
    spec = net.input_spec
    assert spec.shape == (1, 8, 8) and spec.layout == "CHW"
    assert (spec.domain_lower == 0).all() and (spec.domain_upper == 1).all()
    info = network_store_info(p)
    assert info["bytes_on_disk"] < 300 * 1024 and info["complete"]
    assert info["provenance"]["source"] == "sklearn.datasets.load_digits"


def test_default_model_accuracy_and_inputs():
    pytest.importorskip("sklearn")
    net = open_network(default_model_path()).materialize()
    data = load_dataset("digits", seed=DEFAULT_TRAINING["seed"])
    acc = accuracy(net, data.x_test, data.y_test)
    assert acc > 0.9, acc
    x = default_inputs()
    assert x.shape == (5, 64) and x.dtype == np.float64
    assert (x >= 0).all() and (x <= 1).all()
    assert np.array_equal(x, data.x_test[:5])  # the first five held-out digits
    net.input_spec.check(x)
    assert default_inputs_path().name == "default_inputs.npy"


def test_default_model_rebuilt_into_cache_when_missing(tmp_path, monkeypatch):
    pytest.importorskip("sklearn")
    monkeypatch.setenv("RECURJAC_SCALE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(default_mod, "_bundled", lambda name: None)
    p = default_model_path()
    assert p == tmp_path / "cache" / "default_model.zarr" and (p / "zarr.json").is_file()
    assert default_inputs_path() == tmp_path / "cache" / "default_inputs.npy"
    rebuilt = open_network(p).materialize()
    monkeypatch.undo()
    bundled = open_network(default_model_path()).materialize()
    # Same training code and seed: equal up to BLAS rounding across machines (bitwise on the machine that built it).
    for a, b in zip(rebuilt.weights + rebuilt.biases, bundled.weights + bundled.biases):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8)
    assert np.array_equal(np.load(tmp_path / "cache" / "default_inputs.npy"), default_inputs())


def test_training_is_seeded_and_reproducible():
    pytest.importorskip("sklearn")
    data = load_dataset("digits", seed=3)
    a, ra = train_mlp((64, 16, 10), "tanh", data=data, epochs=3, seed=3)
    b, rb = train_mlp((64, 16, 10), "tanh", data=data, epochs=3, seed=3)
    c, _ = train_mlp((64, 16, 10), "tanh", data=data, epochs=3, seed=4)
    assert all(np.array_equal(x, y) for x, y in zip(a.weights + a.biases, b.weights + b.biases))
    assert not np.array_equal(a.weights[0], c.weights[0])
    assert ra == rb and ra["test_accuracy"] > 0.5  # three epochs already learn something
    assert a.provenance["seed"] == 3 and a.provenance["epochs"] == 3


def test_training_learns_random_data_and_checks_widths():
    from recurjac_scale.errors import InputError

    data = load_dataset("random", n_inputs=10, n_classes=3, n_samples=600, seed=1)
    net, rep = train_mlp((10, 32, 3), "relu", data=data, epochs=40, lr=3e-3, seed=1)
    assert rep["test_accuracy"] > 0.8  # labels are a linear function of the inputs
    with pytest.raises(InputError, match="input width"):
        train_mlp((11, 4, 3), "relu", data=data, epochs=1)
    with pytest.raises(InputError, match="classes"):
        train_mlp((10, 4, 4), "relu", data=data, epochs=1)
    with pytest.raises(InputError):
        load_dataset("imagenet")
    assert parse_widths("784-1024x1024,10") == (784, 1024, 1024, 10)
    for bad in ("10", "a-b", "10-0-3"):
        with pytest.raises(InputError):
            parse_widths(bad)


def test_he_network_lazy_equals_eager_and_has_he_scale(tmp_path):
    widths = (300, 2 * GEN_ROWS + 17, 40)
    eager = he_network(widths, "relu", seed=7)
    lazy = he_network(widths, "relu", seed=7, lazy=True)
    assert lazy.is_lazy and not eager.is_lazy
    for a, b in zip(eager.weights + eager.biases, lazy.weights + lazy.biases):
        assert np.array_equal(a, b.compute())
    w = eager.weights[0]
    assert abs(w.mean()) < 0.01 and abs(w.var() * 300 / 2 - 1) < 0.05
    # Stored through dask block by block (different chunking), the values do not change.
    p = save_network(lazy, tmp_path / "he.zarr", chunk_edge=100)
    assert np.array_equal(open_network(p).weights[0].compute(), w)
    assert not np.array_equal(he_network(widths, "relu", seed=8).weights[0], w)


def test_train_script_trains_and_refuses_overwrite(tmp_path):
    pytest.importorskip("sklearn")
    out = tmp_path / "m.zarr"
    inputs = tmp_path / "x.npy"
    cmd = [sys.executable, str(SCRIPT), "--widths", "64-16-10", "--activation", "leaky_relu:alpha=0.1",
           "--epochs", "5", "--seed", "2", "-o", str(out), "--inputs-out", str(inputs), "--n-inputs", "3"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
    assert r.returncode == 0, r.stderr
    assert "test accuracy" in r.stdout
    net = open_network(out)
    assert net.activations[0].to_spec() == {"name": "leaky_relu", "alpha": 0.1}
    assert np.load(inputs).shape == (3, 64)
    r2 = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
    assert r2.returncode == 1 and "already exists" in r2.stderr and "Traceback" not in r2.stderr


def test_train_script_he_init_paper_shape(tmp_path):
    out = tmp_path / "big.zarr"
    cmd = [sys.executable, str(SCRIPT), "--dataset", "random", "--widths", "784-600-600-10", "--activation", "tanh",
           "--epochs", "0", "--seed", "1", "--input-shape", "1,28,28", "--dtype", "float32", "--chunks", "256",
           "-o", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
    assert r.returncode == 0, r.stderr
    info = network_store_info(out)
    assert info["widths"] == [784, 600, 600, 10] and info["dtype"] == "float32"
    assert info["input"]["shape"] == [1, 28, 28] and info["layers"][0]["weight"]["chunks"] == [256, 256]
    net = open_network(out)
    ref = he_network((784, 600, 600, 10), "tanh", seed=1, dtype=np.float32)
    assert np.array_equal(net.weights[1].compute(), ref.weights[1])
    bad = subprocess.run([sys.executable, str(SCRIPT), "--widths", "5", "-o", str(tmp_path / "x.zarr")],
                         capture_output=True, text=True, env=_env(), timeout=300)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr


@pytest.mark.slow
def test_wheel_contains_the_default_model(tmp_path):
    """`pip wheel` of a copy of the checkout ships the zarr.json files and chunks of the default model."""
    import shutil
    import zipfile

    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".git", "*.egg-info", "build", "__pycache__", ".pytest_cache"))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "-w", str(tmp_path / "whl"), "--no-deps",
                        "--no-build-isolation"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    (whl,) = (tmp_path / "whl").glob("*.whl")
    names = set(zipfile.ZipFile(whl).namelist())
    bundled = REPO / "recurjac_scale" / "data"
    expected = {str(p.relative_to(REPO)) for p in bundled.rglob("*") if p.is_file()}
    assert expected and expected <= names, sorted(expected - names)
