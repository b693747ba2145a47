"""The ``bounds`` and ``lipschitz`` subcommands: outputs, metadata and error handling (in-process, via ``main``)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from recurjac_scale.cli import main
from recurjac_scale.layer_bounds.base import Region
from recurjac_scale.network.store import save_network
from recurjac_scale.testing import random_network, sample_region


@pytest.fixture
def store(tmp_path, rng):
    net = random_network((6, 10, 8, 3), "relu", rng, domain=(0.0, 1.0))
    path = tmp_path / "m.zarr"
    save_network(net, path)
    X = rng.uniform(0.1, 0.9, size=(3, 6))
    np.save(tmp_path / "x.npy", X)
    np.save(tmp_path / "x1.npy", X[1])
    return net, path, tmp_path, X


def run(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("method", ["fastlip", "recurjac-b", "recurjac-f0", "recurjac-f1"])
def test_bounds_writes_npz_that_contains_the_jacobian(store, capsys, rng, method):
    net, path, d, X = store
    out = d / "b.npz"
    code, so, se = run(["bounds", path, "--input", d / "x1.npy", "--eps", "0.05", "--method", method, "-o", out], capsys)
    assert code == 0, se
    assert "->" in so
    z = np.load(out, allow_pickle=False)
    L, U = z["lower"], z["upper"]
    assert L.shape == U.shape == (3, 6)
    assert str(z["method"]) == method and str(z["layer_bounds"]) == "crown"
    assert float(z["eps"]) == 0.05 and float(z["p"]) == math.inf
    np.testing.assert_array_equal(z["x0"], X[1])
    np.testing.assert_array_equal(z["outputs"], np.eye(3))
    assert z["unstable"].shape == (2,)
    names = list(z["timing_names"])
    assert "total" in names and z["timing_values"].shape == (len(names),)
    assert str(z["dtype"]) == "float64"
    # the bounds hold at points of the region
    region = Region.of(net, X[1], 0.05, math.inf)
    Js = net.jacobian(sample_region(region, 2000, rng))
    assert ((Js >= L) & (Js <= U)).all()


def test_bounds_outputs_and_norms(store, capsys):
    net, path, d, X = store
    J = net.jacobian(X[0])
    for outputs, want in (("2", J[[2]]), ("0,1", J[[0]] - J[[1]]), ("all", J)):
        for norm in ("1", "2", "inf"):
            out = d / f"b_{outputs.replace(',', '_')}_{norm}.npz"
            code, _, se = run(
                ["bounds", path, "--input", d / "x.npy", "--index", 0, "--eps", 0, "--norm", norm, "--outputs", outputs,
                 "--layer-bounds", "ibp", "-o", out, "--quiet"], capsys,
            )
            assert code == 0, se
            z = np.load(out)
            np.testing.assert_allclose(z["lower"], want, rtol=1e-10, atol=1e-12)
            np.testing.assert_allclose(z["upper"], want, rtol=1e-10, atol=1e-12)
            assert str(z["layer_bounds"]) == "ibp"


def test_bounds_quiet_and_overwrite(store, capsys):
    net, path, d, X = store
    out = d / "b.npz"
    args = ["bounds", path, "--input", d / "x1.npy", "--eps", "0.01", "-o", out, "--quiet"]
    code, so, _ = run(args, capsys)
    assert code == 0 and so == ""
    code, so, se = run(args, capsys)
    assert code == 1 and "--overwrite" in se and len(se.strip().splitlines()) == 1
    code, _, _ = run(args + ["--overwrite"], capsys)
    assert code == 0


def _bounds_args(path, d, **kw):
    a = ["bounds", path, "--input", kw.get("input", d / "x1.npy"), "--eps", kw.get("eps", "0.1"), "-o", d / "c.npz"]
    return a + kw.get("extra", [])


@pytest.mark.parametrize(
    "case, code",
    [
        ("negative_eps", 1),
        ("unknown_method", 1),
        ("unknown_layer_bounds", 1),
        ("unknown_norm", 2),
        ("bad_eps_text", 2),
        ("bad_outputs", 2),
        ("output_index", 1),
        ("wrong_shape", 1),
        ("outside_domain", 1),
        ("batch_without_index", 1),
        ("index_out_of_range", 1),
        ("missing_input", 1),
    ],
)
def test_bounds_errors(store, capsys, case, code):
    net, path, d, X = store
    np.save(d / "wrong.npy", np.zeros(5))
    np.save(d / "outside.npy", np.full(6, 1.5))
    kw = {
        "negative_eps": dict(eps="-0.5"),
        "unknown_method": dict(extra=["--method", "nope"]),
        "unknown_layer_bounds": dict(extra=["--layer-bounds", "nope"]),
        "unknown_norm": dict(extra=["--norm", "3"]),
        "bad_eps_text": dict(eps="abc"),
        "bad_outputs": dict(extra=["--outputs", "1,2,3"]),
        "output_index": dict(extra=["--outputs", "7"]),
        "wrong_shape": dict(input=d / "wrong.npy"),
        "outside_domain": dict(input=d / "outside.npy"),
        "batch_without_index": dict(input=d / "x.npy"),
        "index_out_of_range": dict(input=d / "x.npy", extra=["--index", "9"]),
        "missing_input": dict(input=d / "nothing.npy"),
    }[case]
    if code == 2:
        with pytest.raises(SystemExit) as exc:
            main([str(a) for a in _bounds_args(path, d, **kw)])
        assert exc.value.code == 2
        capsys.readouterr()
        return
    rc, so, se = run(_bounds_args(path, d, **kw), capsys)
    assert rc == 1
    assert se.startswith("recurjac-scale bounds: error:") and len(se.strip().splitlines()) == 1
    assert "Traceback" not in se
    assert not (d / "c.npz").exists()


def test_lipschitz_table_and_json(store, capsys, rng):
    net, path, d, X = store
    js = d / "l.json"
    code, so, se = run(
        ["lipschitz", path, "--input", d / "x.npy", "--index", 2, "--eps", "0,0.01,0.1", "--outputs", "1", "--json", js], capsys
    )
    assert code == 0, se
    lines = so.strip().splitlines()
    assert "lipschitz" in lines[1] and len(lines) == 2 + 3 + 1 and "naive" in lines[-1]
    doc = json.loads(js.read_text())
    assert [r["eps"] for r in doc["results"]] == [0.0, 0.01, 0.1]
    assert {"eps", "lipschitz", "time_s"} <= set(doc["results"][0])
    assert doc["naive_global"] >= max(r["lipschitz"] for r in doc["results"])
    assert doc["method"] == "recurjac-b" and doc["p"] == "inf" and doc["n_outputs"] == 1
    # certified: >= the l1 norm of the gradient of logit 1 at sampled points; eps = 0 is the gradient norm
    g0 = np.abs(net.jacobian(X[2])[1]).sum()
    assert doc["results"][0]["lipschitz"] == pytest.approx(g0, rel=1e-9)
    for r in doc["results"][1:]:
        region = Region.of(net, X[2], r["eps"], math.inf)
        Js = net.jacobian(sample_region(region, 2000, rng))[:, 1, :]
        assert r["lipschitz"] >= np.abs(Js).sum(axis=1).max()
    # the table shows the same numbers
    assert f"{doc['results'][2]['lipschitz']:.8g}" in so


def test_lipschitz_grid_global_and_errors(store, capsys):
    net, path, d, X = store
    js = d / "g.json"
    code, so, se = run(
        ["lipschitz", path, "--input", d / "x1.npy", "--eps-grid", "1e-3:1e-1:3", "--norm", "2", "--method", "fastlip",
         "--json", js, "--quiet"], capsys,
    )
    assert code == 0, se
    assert so == ""
    eps = [r["eps"] for r in json.loads(js.read_text())["results"]]
    np.testing.assert_allclose(eps, [1e-3, 1e-2, 1e-1], rtol=1e-12)
    code, _, se = run(["lipschitz", path, "--input", d / "x1.npy", "--global", "--json", js], capsys)
    assert code == 1 and "--overwrite" in se
    code, so, se = run(["lipschitz", path, "--input", d / "x1.npy", "--global", "--json", js, "--overwrite"], capsys)
    assert code == 0, se
    doc = json.loads(js.read_text())
    assert doc["results"][0]["eps"] == "inf"
    assert doc["results"][0]["lipschitz"] <= doc["naive_global"]
    # over the whole domain: >= gradient norms sampled anywhere in [0, 1]^6
    rng = np.random.default_rng(5)
    Js = net.jacobian(rng.uniform(0, 1, size=(5000, 6)))
    assert doc["results"][0]["lipschitz"] >= max(np.linalg.norm(J, np.inf) for J in Js)
    for argv, rc in (
        (["--eps", "-1"], 1),
        (["--eps", "0.1", "--method", "nope"], 1),
        (["--eps-grid", "0:1:3"], 2),
        (["--eps-grid", "1:2"], 2),
        (["--eps", "0.1", "--global"], 2),
        ([], 2),
    ):
        full = [path, "--input", d / "x1.npy", *argv]
        if rc == 2:
            with pytest.raises(SystemExit) as exc:
                main(["lipschitz", *[str(a) for a in full]])
            assert exc.value.code == 2
            capsys.readouterr()
        else:
            code, _, se = run(["lipschitz", *full], capsys)
            assert code == 1 and len(se.strip().splitlines()) == 1 and "Traceback" not in se


def test_default_model(capsys, tmp_path):
    from recurjac_scale.network.default import default_inputs_path

    code, so, se = run(
        ["lipschitz", "default", "--input", default_inputs_path(), "--index", 0, "--eps", "0,0.01", "--outputs", "0"],
        capsys,
    )
    assert code == 0, se
    assert "naive global constant" in so
