"""PyTorch importer: state dicts with a layer description, nn.Sequential objects, and the auto_LiRPA MNIST net."""

from __future__ import annotations

import hashlib
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

from recurjac_scale.errors import (  # noqa: E402
    ModelFormatError,
    NonFiniteError,
    RecurJacError,
    UnsupportedActivationError,
)
from recurjac_scale.network.importers import from_torch_module, import_network  # noqa: E402

ACT_MODULES = [
    (nn.ReLU(), "relu"),
    (nn.LeakyReLU(0.2), "leaky_relu"),
    (nn.Sigmoid(), "sigmoid"),
    (nn.Tanh(), "tanh"),
    (nn.ELU(0.6), "elu"),
    (nn.Softplus(), "softplus"),
    (nn.Hardsigmoid(), "hard_sigmoid"),
]


def make_seq(act, seed=0, dims=(6, 9, 7, 3), out_act=None):
    torch.manual_seed(seed)
    mods = [nn.Flatten()]
    for i in range(len(dims) - 1):
        mods.append(nn.Linear(dims[i], dims[i + 1]))
        if i < len(dims) - 2:
            mods.append(act)
    if out_act is not None:
        mods.append(out_act)
    return nn.Sequential(*mods).double().eval()


def torch_forward(module, x):
    with torch.no_grad():
        return module(torch.from_numpy(x)).numpy()


@pytest.mark.parametrize("act,name", ACT_MODULES, ids=[n for _, n in ACT_MODULES])
def test_sequential_object(rng, act, name):
    seq = make_seq(act)
    x = rng.standard_normal((25, 6)) * 4
    for net in (import_network(seq), from_torch_module(seq)):
        assert [a.name for a in net.activations] == [name, name]
        np.testing.assert_allclose(net.forward(x), torch_forward(seq, x), rtol=1e-10, atol=1e-12)
        assert net.provenance["format"] == "torch-module"


def test_sequential_parameters_and_extras(rng):
    torch.manual_seed(1)
    seq = nn.Sequential(
        nn.Linear(4, 5), nn.LeakyReLU(0.3), nn.Dropout(0.5), nn.Sequential(nn.Linear(5, 5, bias=False), nn.Identity()),
        nn.ELU(0.5), nn.Linear(5, 2), nn.Sigmoid(),
    ).double().eval()
    net = import_network(seq, input_shape=(2, 2))
    assert net.activations[0].to_spec() == {"name": "leaky_relu", "alpha": 0.3}
    assert net.activations[1].to_spec() == {"name": "elu", "alpha": 0.5}
    assert net.output_activation.name == "sigmoid"
    assert net.input_spec.shape == (2, 2)
    x = rng.standard_normal((10, 4))
    np.testing.assert_allclose(net.forward(x), torch_forward(seq, x), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "layers",
    [
        ["linear", "tanh", "linear", "tanh", "linear"],
        "linear, tanh, linear, tanh, linear",
        "tanh,tanh,linear",
        ["tanh", "tanh", "identity"],
    ],
    ids=["full-list", "full-string", "compact-string", "compact-list"],
)
def test_state_dict_with_layer_description(tmp_path, rng, layers):
    seq = make_seq(nn.Tanh(), seed=3)
    p = tmp_path / "sd.pth"
    torch.save(seq.state_dict(), p)
    net = import_network(p, layers=layers)
    x = rng.standard_normal((10, 6))
    np.testing.assert_allclose(net.forward(x), torch_forward(seq, x), rtol=1e-10, atol=1e-12)
    assert net.provenance["sha256"] == hashlib.sha256(p.read_bytes()).hexdigest()
    assert net.provenance["format"] == "torch" and net.provenance["source"] == "sd.pth"


def test_state_dict_parameterised_and_output_activation(tmp_path, rng):
    seq = make_seq(nn.LeakyReLU(0.25), seed=4, out_act=nn.Sigmoid())
    p = tmp_path / "leaky.pt"
    torch.save({"epoch": 3, "state_dict": seq.state_dict()}, p)  # a checkpoint dict
    net = import_network(p, layers=["linear", "leaky_relu:0.25", "linear", "leaky_relu:0.25", "linear", "sigmoid"])
    assert net.output_activation.name == "sigmoid"
    x = rng.standard_normal((10, 6))
    np.testing.assert_allclose(net.forward(x), torch_forward(seq, x), rtol=1e-10, atol=1e-12)


def test_half_precision_state_dict(tmp_path, rng):
    seq = make_seq(nn.ReLU(), seed=5)
    sd = {k: v.to(torch.bfloat16) for k, v in seq.state_dict().items()}
    torch.save(sd, tmp_path / "bf16.pt")
    net = import_network(tmp_path / "bf16.pt", layers="relu,relu,linear")
    assert net.weights[0].dtype == np.float64
    np.testing.assert_array_equal(net.weights[1], sd["3.weight"].to(torch.float64).numpy())


def test_pickled_module_is_refused(tmp_path):
    seq = make_seq(nn.ReLU())
    p = tmp_path / "whole.pt"
    torch.save(seq, p)
    with pytest.raises(ModelFormatError) as ei:
        import_network(p, layers="relu,relu,linear")
    msg = str(ei.value)
    assert "whole.pt" in msg and "state_dict" in msg and "\n" not in msg


def test_state_dict_errors(tmp_path):
    seq = make_seq(nn.ReLU())
    p = tmp_path / "sd.pth"
    torch.save(seq.state_dict(), p)
    with pytest.raises(ModelFormatError, match="layers="):
        import_network(p)
    with pytest.raises(ModelFormatError, match="does not match the 3 Linear"):
        import_network(p, layers="relu,linear")
    with pytest.raises(UnsupportedActivationError, match="Assumption 2"):
        import_network(p, layers="gelu,gelu,linear")
    bn = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))
    torch.save(bn.state_dict(), tmp_path / "bn.pth")
    with pytest.raises(ModelFormatError, match="bn.pth") as ei:
        import_network(tmp_path / "bn.pth", layers="relu,linear")
    assert "running_mean" in str(ei.value) or "not a Linear weight" in str(ei.value)
    sd = seq.state_dict()
    sd["3.weight"] = sd["3.weight"].clone()
    sd["3.weight"][0, 0] = float("nan")
    torch.save(sd, tmp_path / "nan.pth")
    with pytest.raises(NonFiniteError, match="nan.pth"):
        import_network(tmp_path / "nan.pth", layers="relu,relu,linear")
    sd = seq.state_dict()
    sd["3.weight"] = sd["3.weight"][:, :4].clone()
    torch.save(sd, tmp_path / "shape.pth")
    with pytest.raises(RecurJacError, match="shape.pth"):
        import_network(tmp_path / "shape.pth", layers="relu,relu,linear")
    data = p.read_bytes()
    (tmp_path / "trunc.pth").write_bytes(data[: len(data) // 3])
    with pytest.raises(ModelFormatError) as ei:
        import_network(tmp_path / "trunc.pth", layers="relu,relu,linear")
    assert "trunc.pth" in str(ei.value) and "\n" not in str(ei.value)
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(ModelFormatError, match="not a state dict"):
        import_network(tmp_path / "list.pt", layers="linear")


def test_unsupported_modules():
    with pytest.raises(UnsupportedActivationError, match="Assumption 2") as ei:
        import_network(nn.Sequential(nn.Linear(3, 3), nn.GELU(), nn.Linear(3, 1)))
    assert "position 1" in str(ei.value)
    with pytest.raises(ModelFormatError, match="Conv1d") as ei:
        import_network(nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Conv1d(1, 1, 1)))
    assert "position 2" in str(ei.value)
    with pytest.raises(UnsupportedActivationError, match="Hardswish"):
        import_network(nn.Sequential(nn.Linear(3, 3), nn.Hardswish(), nn.Linear(3, 1)))
    with pytest.raises(ModelFormatError, match="custom nn.Module"):

        class Custom(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = nn.Linear(2, 2)

        import_network(Custom())
    with pytest.raises(ModelFormatError, match="two activations"):
        from recurjac_scale.network.importers.torch import parse_layers

        parse_layers("linear,relu,tanh,linear", 2)


def test_consecutive_activations_and_subclass(rng):
    class MySeq(nn.Sequential):
        pass

    seq = MySeq(nn.Linear(4, 5), nn.ReLU(), nn.Tanh(), nn.Linear(5, 2)).double()
    net = import_network(seq)
    assert net.widths == (4, 5, 5, 2)  # an identity layer between the two activations
    x = rng.standard_normal((10, 4))
    np.testing.assert_allclose(net.forward(x), torch_forward(seq, x), rtol=1e-10, atol=1e-12)


def test_torchscript_archive_is_refused(tmp_path):
    p = tmp_path / "script.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit is deprecated, but such files exist
        torch.jit.save(torch.jit.script(nn.Sequential(nn.Linear(3, 2))), str(p))
    with pytest.raises(ModelFormatError, match="TorchScript") as ei:
        import_network(p, layers="linear")
    assert "script.pt" in str(ei.value)
    with pytest.raises(UnsupportedActivationError, match="beta"):
        import_network(nn.Sequential(nn.Linear(3, 3), nn.Softplus(beta=2.0), nn.Linear(3, 1)))


def _mnist(shared_dir):
    data = np.loadtxt(shared_dir / "data" / "eran" / "mnist_test.csv", delimiter=",")
    return data[:, 1:] / 255.0, data[:, 0].astype(int)


def test_auto_lirpa_mnist_checkpoint(shared_dir):
    pth = shared_dir / "nets" / "auto_lirpa" / "mnist_fc_3layer.pth"
    net = import_network(pth, layers="relu,relu,linear", input_shape=(1, 28, 28))
    assert net.widths == (784, 128, 64, 10)
    assert net.input_spec.shape == (1, 28, 28) and not net.input_spec.has_domain
    x, labels = _mnist(shared_dir)
    assert x.shape == (100, 784)
    correct = int((net.forward(x).argmax(axis=1) == labels).sum())
    assert correct >= 99
    ref = np.load(shared_dir / "nets" / "auto_lirpa" / "mnist_fc_3layer.npz")
    for k in range(3):
        np.testing.assert_array_equal(net.weights[k], ref[f"W{k}"])
        np.testing.assert_array_equal(net.biases[k], ref[f"b{k}"])
    # the same network through the full layer list, and against torch itself
    net2 = import_network(pth, layers=["linear", "relu", "linear", "relu", "linear"])
    sd = torch.load(pth, map_location="cpu", weights_only=True)
    h = torch.from_numpy(x)
    with torch.no_grad():
        for i, k in enumerate(("fc1", "fc2", "fc3")):
            h = h @ sd[f"{k}.weight"].double().T + sd[f"{k}.bias"].double()
            if i < 2:
                h = torch.relu(h)
    np.testing.assert_allclose(net2.forward(x), h.numpy(), rtol=1e-10, atol=1e-10)
