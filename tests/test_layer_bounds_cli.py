"""``recurjac-scale layer-bounds``: output layout, batch inputs, errors (run in-process through ``cli.main``)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from recurjac_scale.cli import main
from recurjac_scale.layer_bounds import layer_bounds
from recurjac_scale.testing import random_network


@pytest.fixture
def model(tmp_path, rng):
    from recurjac_scale.network.store import save_network

    net = random_network([6, 10, 8, 3], "relu", rng, domain=(0.0, 1.0))
    path = tmp_path / "m.zarr"
    save_network(net, path)
    x = rng.uniform(0.2, 0.8, size=(3, 6))
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "x1.npy", x[1])
    return net, path, x, tmp_path


@pytest.mark.parametrize("method", ["ibp", "fastlin", "crown"])
@pytest.mark.parametrize("norm", ["1", "2", "inf"])
def test_cli_writes_one_pair_per_activated_layer(model, method, norm, capsys):
    net, path, x, tmp = model
    out = tmp / f"o_{method}_{norm}.npz"
    rc = main(["layer-bounds", str(path), "--input", str(tmp / "x1.npy"), "--eps", "0.05", "--norm", norm,
               "--method", method, "-o", str(out)])
    assert rc == 0
    assert str(out) in capsys.readouterr().out
    z = np.load(out)
    assert sorted(k for k in z if k.startswith(("lower", "upper"))) == ["lower0", "lower1", "upper0", "upper1"]
    np.testing.assert_array_equal(z["layers"], [0, 1])
    p = math.inf if norm == "inf" else float(norm)
    ref = layer_bounds(net, x[1], 0.05, p, method)
    for i in range(2):
        np.testing.assert_allclose(z[f"lower{i}"], ref.lower[i], rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(z[f"upper{i}"], ref.upper[i], rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(z["unstable"], ref.unstable[:2])
    assert str(z["method"]) == method and float(z["eps"]) == 0.05 and float(z["p"]) == p
    assert "certified" in str(z["rounding"])


def test_cli_batch_needs_index(model, capsys):
    net, path, x, tmp = model
    out = tmp / "o.npz"
    rc = main(["layer-bounds", str(path), "--input", str(tmp / "x.npy"), "--eps", "0.05", "-o", str(out)])
    assert rc == 1 and "--index" in capsys.readouterr().err and not out.exists()
    rc = main(["layer-bounds", str(path), "--input", str(tmp / "x.npy"), "--index", "2", "--eps", "0.05",
               "--block-rows", "3", "--dtype", "float32", "-o", str(out), "--quiet"])
    assert rc == 0 and capsys.readouterr().out == ""
    z = np.load(out)
    np.testing.assert_array_equal(z["x0"], x[2])
    assert int(z["index"]) == 2 and str(z["dtype"]) == "float32" and int(z["block_rows"]) == 3
    zs = net.pre_activations(x[2][None])
    for i in range(2):
        assert z[f"lower{i}"][None].shape == zs[i].shape
        assert (z[f"lower{i}"] <= zs[i][0]).all() and (zs[i][0] <= z[f"upper{i}"]).all()


def test_cli_output_activation_layer_is_written(tmp_path, rng):
    from recurjac_scale.network.store import save_network

    net = random_network([4, 6, 2], "tanh", rng, output_activation="sigmoid")
    save_network(net, tmp_path / "m.zarr")
    np.save(tmp_path / "x.npy", np.zeros(4))
    out = tmp_path / "o.npz"
    assert main(["layer-bounds", str(tmp_path / "m.zarr"), "--input", str(tmp_path / "x.npy"), "--eps", "inf",
                 "--method", "crown", "-o", str(out), "--quiet"]) == 0
    z = np.load(out)
    np.testing.assert_array_equal(z["layers"], [0, 1])
    assert np.isposinf(z["upper0"]).all() and np.isfinite(z["upper1"]).all()


def test_cli_errors(model, capsys):
    net, path, x, tmp = model
    out = tmp / "o.npz"
    base = ["layer-bounds", str(path), "--input", str(tmp / "x1.npy"), "-o", str(out)]
    assert main(base + ["--eps", "-1"]) == 1
    assert "eps" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(base + ["--eps", "0.1", "--method", "deeppoly"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        main(base + ["--eps", "0.1", "--norm", "3"])
    assert exc.value.code == 2
    assert main(base + ["--eps", "0.1", "--block-rows", "0"]) == 1
    assert "block_rows" in capsys.readouterr().err
    assert main(base + ["--eps", "0.1", "--quiet"]) == 0
    assert main(base + ["--eps", "0.1"]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert main(base + ["--eps", "0.1", "--overwrite", "--quiet"]) == 0


def test_cli_fastlin_on_tanh_names_alternatives(tmp_path, rng, capsys):
    from recurjac_scale.network.store import save_network

    net = random_network([4, 6, 2], "tanh", rng)
    save_network(net, tmp_path / "m.zarr")
    np.save(tmp_path / "x.npy", np.zeros(4))
    rc = main(["layer-bounds", str(tmp_path / "m.zarr"), "--input", str(tmp_path / "x.npy"), "--eps", "0.1",
               "--method", "fastlin", "-o", str(tmp_path / "o.npz")])
    err = capsys.readouterr().err
    assert rc == 1 and "crown" in err and "ibp" in err


def test_cli_float32_weights_out_of_range_is_one_line(tmp_path, rng, capsys):
    from recurjac_scale.network.model import Network
    from recurjac_scale.network.store import save_network

    net = random_network([4, 6, 2], "relu", rng)
    W = [np.array(w) for w in net.weights]
    W[0] = W[0] * 1e300
    save_network(Network(W, [np.array(b) for b in net.biases], net.activations), tmp_path / "m.zarr")
    np.save(tmp_path / "x.npy", np.zeros(4))
    args = ["layer-bounds", str(tmp_path / "m.zarr"), "--input", str(tmp_path / "x.npy"), "--eps", "0.1",
            "--method", "crown", "-o", str(tmp_path / "o.npz")]
    assert main(args + ["--dtype", "float32"]) == 1
    err = capsys.readouterr().err.strip()
    assert "float32 range" in err and "float64" in err and "\n" not in err and "Traceback" not in err
    assert not (tmp_path / "o.npz").exists()
    assert main(args + ["--quiet"]) == 0
