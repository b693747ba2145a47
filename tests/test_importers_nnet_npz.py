"""NNet (ACAS Xu text format) and .npz importers."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from recurjac_scale.errors import (
    ModelFormatError,
    NonFiniteError,
    RecurJacError,
    ShapeMismatchError,
    UnsupportedActivationError,
)
from recurjac_scale.network.importers import import_network

# -- NNet -------------------------------------------------------------------------------------------------------


def make_nnet(rng, sizes=(3, 5, 4, 2)):
    n_in = sizes[0]
    d = dict(
        sizes=list(sizes),
        mins=rng.uniform(-3, -1, n_in),
        maxs=rng.uniform(1, 3, n_in),
        means=rng.uniform(-0.5, 0.5, n_in + 1),
        ranges=rng.uniform(1, 4, n_in + 1),
        W=[rng.standard_normal((sizes[k + 1], sizes[k])) for k in range(len(sizes) - 1)],
        b=[rng.standard_normal(sizes[k + 1]) for k in range(len(sizes) - 1)],
    )
    return d


def nnet_text(d) -> list[str]:
    sizes = d["sizes"]
    row = lambda v: ",".join(repr(float(x)) for x in v) + ","  # noqa: E731
    lines = ["// Neural Network File Format by Kyle Julian, Stanford 2016", "// a test network"]
    lines.append(f"{len(sizes) - 1},{sizes[0]},{sizes[-1]},{max(sizes)},")
    lines.append(",".join(map(str, sizes)) + ",")
    lines.append("0,")
    for key in ("mins", "maxs", "means", "ranges"):
        lines.append(row(d[key]))
    for W, b in zip(d["W"], d["b"]):
        lines += [row(r) for r in W]
        lines += [row([v]) for v in b]
    return lines


def nnet_reference(d, x):
    """The NNet evaluator: clip to [min, max], normalise, ReLU hidden layers, linear output, de-normalise."""
    n_in = d["sizes"][0]
    h = (np.clip(x, d["mins"], d["maxs"]) - d["means"][:n_in]) / d["ranges"][:n_in]
    for k, (W, b) in enumerate(zip(d["W"], d["b"])):
        h = h @ W.T + b
        if k < len(d["W"]) - 1:
            h = np.maximum(h, 0)
    return h * d["ranges"][-1] + d["means"][-1]


def test_nnet_forward_domain_normalisation(tmp_path, rng):
    d = make_nnet(rng)
    p = tmp_path / "acas.nnet"
    p.write_text("\n".join(nnet_text(d)) + "\n")
    net = import_network(p)
    assert net.widths == (3, 5, 4, 2)
    assert [a.name for a in net.activations] == ["relu", "relu"] and net.output_activation.is_identity
    np.testing.assert_array_equal(net.input_spec.domain_lower, d["mins"])
    np.testing.assert_array_equal(net.input_spec.domain_upper, d["maxs"])
    np.testing.assert_array_equal(net.input_spec.mean, d["means"][:3])
    np.testing.assert_array_equal(net.input_spec.std, d["ranges"][:3])
    x = rng.uniform(d["mins"], d["maxs"], (50, 3))
    np.testing.assert_allclose(net.forward(net.input_spec.check(x)), nnet_reference(d, x), rtol=1e-10, atol=1e-12)
    with pytest.raises(RecurJacError, match="outside the declared input domain"):
        net.input_spec.check(d["maxs"] + 1.0)
    assert net.provenance["sha256"] == hashlib.sha256(p.read_bytes()).hexdigest()
    assert net.provenance["format"] == "nnet"
    # without the output de-normalisation
    raw = import_network(p, denormalize_output=False)
    np.testing.assert_allclose(
        raw.forward(x) * d["ranges"][-1] + d["means"][-1], nnet_reference(d, x), rtol=1e-10, atol=1e-12
    )


def test_nnet_single_layer_and_no_trailing_commas(tmp_path, rng):
    d = make_nnet(rng, sizes=(2, 3))
    text = [ln.rstrip(",") for ln in nnet_text(d)]
    p = tmp_path / "lin.nnet"
    p.write_text("\n".join(text))
    net = import_network(p)
    x = rng.uniform(d["mins"], d["maxs"], (5, 2))
    np.testing.assert_allclose(net.forward(x), nnet_reference(d, x), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "corrupt,exc,match",
    [
        (lambda L: L[:-3], ModelFormatError, "ends early"),
        (lambda L: L[:9] + ["1.0,2.0,"] + L[10:], ModelFormatError, "expected 3 values"),
        (lambda L: L[:9] + ["1.0,abc,2.0,"] + L[10:], ModelFormatError, "cannot parse"),
        (lambda L: L[:9] + ["nan,1.0,2.0,"] + L[10:], NonFiniteError, "NaN"),
        (lambda L: L + ["1.0,"], ModelFormatError, "unexpected data"),
        (lambda L: L[:3] + ["3,5,4,7,"] + L[4:], ModelFormatError, "disagree"),
        (lambda L: L[:8] + [",".join(["0.0"] * 4) + ","] + L[9:], ModelFormatError, "ranges"),
    ],
    ids=["truncated", "short-row", "not-a-number", "nan-weight", "extra-lines", "bad-sizes", "zero-range"],
)
def test_nnet_malformed(tmp_path, rng, corrupt, exc, match):
    lines = nnet_text(make_nnet(rng))
    # lines: 0-1 comments, 2 header, 3 sizes, 4 flag, 5 mins, 6 maxs, 7 means, 8 ranges, 9.. weights
    p = tmp_path / "bad.nnet"
    p.write_text("\n".join(corrupt(lines)) + "\n")
    with pytest.raises(exc, match=match) as ei:
        import_network(p)
    assert "bad.nnet" in str(ei.value) and "\n" not in str(ei.value)


# -- npz --------------------------------------------------------------------------------------------------------


def make_npz(rng, acts=("leaky_relu", "tanh", "linear"), dims=(6, 5, 4, 3), **extra):
    d = {}
    for k in range(len(dims) - 1):
        d[f"W{k}"] = rng.standard_normal((dims[k + 1], dims[k]))
        d[f"b{k}"] = rng.standard_normal(dims[k + 1])
    d["acts"] = np.array(acts)
    d.update(extra)
    return d


def npz_reference(d, x):
    h = x
    if "mean" in d:
        h = (h - d["mean"]) / d["std"]
    fns = {"relu": lambda z, a: np.maximum(z, 0), "tanh": lambda z, a: np.tanh(z), "linear": lambda z, a: z,
           "leaky_relu": lambda z, a: np.where(z >= 0, z, a * z), "sigmoid": lambda z, a: 1 / (1 + np.exp(-z))}
    alphas = d.get("alphas", np.full(len(d["acts"]), 0.01))
    for k, a in enumerate(d["acts"]):
        h = fns[str(a)](h @ d[f"W{k}"].T + d[f"b{k}"], alphas[k])
    return h


def test_npz_full_metadata(tmp_path, rng):
    d = make_npz(
        rng,
        alphas=np.array([0.2, 0.0, 0.0]),
        mean=rng.uniform(0, 1, 6),
        std=rng.uniform(0.5, 2, 6),
        input_shape=np.array([1, 2, 3]),
        domain=np.array([0.0, 1.0]),
    )
    p = tmp_path / "net.npz"
    np.savez(p, **d)
    net = import_network(p)
    assert net.activations[0].to_spec() == {"name": "leaky_relu", "alpha": 0.2}
    assert net.input_spec.shape == (1, 2, 3)
    np.testing.assert_array_equal(net.input_spec.domain_lower, np.zeros(6))
    np.testing.assert_array_equal(net.input_spec.domain_upper, np.ones(6))
    np.testing.assert_array_equal(net.input_spec.mean, d["mean"])
    x = rng.uniform(0, 1, (10, 6))
    np.testing.assert_allclose(net.forward(x), npz_reference(d, x), rtol=1e-10, atol=1e-12)
    assert net.provenance["format"] == "npz" and net.provenance["source"] == "net.npz"


def test_npz_output_activation_and_default_alpha(tmp_path, rng):
    d = make_npz(rng, acts=("leaky_relu", "relu", "sigmoid"))
    np.savez(tmp_path / "n.npz", **d)
    net = import_network(tmp_path / "n.npz")
    assert net.output_activation.name == "sigmoid" and net.activations[0].to_spec()["alpha"] == 0.01
    x = rng.standard_normal((10, 6))
    np.testing.assert_allclose(net.forward(x), npz_reference(d, x), rtol=1e-10, atol=1e-12)


def test_npz_auto_lirpa_example(shared_dir):
    p = shared_dir / "nets" / "auto_lirpa" / "mnist_fc_3layer.npz"
    net = import_network(p)
    ref = np.load(p)
    assert net.widths == (784, 128, 64, 10)
    for k in range(3):
        np.testing.assert_array_equal(net.weights[k], ref[f"W{k}"])
        np.testing.assert_array_equal(net.biases[k], ref[f"b{k}"])
    assert net.input_spec.mean is None  # mean 0 / std 1 is a no-op
    data = np.loadtxt(shared_dir / "data" / "eran" / "mnist_test.csv", delimiter=",")
    assert int((net.forward(data[:, 1:] / 255.0).argmax(1) == data[:, 0]).sum()) >= 99


@pytest.mark.parametrize(
    "change,exc,match",
    [
        (lambda d: d.pop("acts"), ModelFormatError, "acts"),
        (lambda d: d.pop("b1"), ModelFormatError, "missing"),
        (lambda d: d.update(acts=np.array(["relu", "linear"])), ModelFormatError, "2 entries"),
        (lambda d: d.update(acts=np.array(["relu", "gelu", "linear"])), UnsupportedActivationError, "Assumption 2"),
        (lambda d: d.update(W1=np.ones((4, 7))), ShapeMismatchError, "layer 1"),
        (lambda d: d["W2"].__setitem__((0, 0), np.inf), NonFiniteError, "layer 2"),
        (lambda d: d.update(alphas=np.ones(2)), ModelFormatError, "alphas"),
        (lambda d: d.update(weird=np.ones(2)), ModelFormatError, "unknown keys"),
        (lambda d: d.update(W1=np.array(["a", "b"])), ModelFormatError, "non-numeric"),
        (lambda d: d.update(n_layers=np.array(4)), ModelFormatError, "n_layers"),
    ],
    ids=["no-acts", "no-b1", "acts-length", "gelu", "shapes", "inf", "alphas", "unknown-key", "strings", "n_layers"],
)
def test_npz_malformed(tmp_path, rng, change, exc, match):
    d = make_npz(rng)
    change(d)
    p = tmp_path / "bad.npz"
    np.savez(p, **d)
    with pytest.raises(exc, match=match) as ei:
        import_network(p)
    assert "bad.npz" in str(ei.value) and "\n" not in str(ei.value)


def test_npz_object_array_and_truncated(tmp_path, rng):
    d = make_npz(rng)
    d["acts"] = np.array(["relu", "relu", None], dtype=object)
    np.savez(tmp_path / "obj.npz", **d)
    with pytest.raises(ModelFormatError, match="obj.npz"):
        import_network(tmp_path / "obj.npz")
    np.savez(tmp_path / "ok.npz", **make_npz(rng))
    data = (tmp_path / "ok.npz").read_bytes()
    (tmp_path / "trunc.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFormatError) as ei:
        import_network(tmp_path / "trunc.npz")
    assert "trunc.npz" in str(ei.value) and "\n" not in str(ei.value)
