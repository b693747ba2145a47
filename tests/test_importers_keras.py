"""Keras HDF5 importer: files laid out as Keras 2 ``model.save`` writes them, built here with h5py."""

from __future__ import annotations

import json

import numpy as np
import pytest

h5py = pytest.importorskip("h5py")

from recurjac_scale.errors import ModelFormatError, NonFiniteError, RecurJacError, UnsupportedActivationError  # noqa: E402
from recurjac_scale.network.importers import import_network  # noqa: E402


def _layer(cls, name, **config):
    return {"class_name": cls, "config": {"name": name, "trainable": True, "dtype": "float32", **config}}


def write_keras_h5(path, layers, weights, *, keras_version="2.2.4", old_style=False, model_class="Sequential",
                   text_attrs=False):
    """Write a Keras 2 HDF5 model file: root attributes ``model_config``, ``keras_version``, ``backend``; group
    ``model_weights`` with ``layer_names`` and, per layer, ``weight_names`` and datasets ``<layer>/<layer>/kernel:0``.

    ``weights``: layer name -> {"kernel": (in, out) array, "bias": (out,) array}.  Keras 2.0-2.2 stores the
    string attributes as bytes; later versions (and tf.keras) as str (``text_attrs=True``).
    """
    enc = (lambda s: s) if text_attrs else (lambda s: s.encode("utf8"))  # noqa: E731
    config = layers if old_style else {"name": "sequential_1", "layers": layers}
    with h5py.File(path, "w") as f:
        f.attrs["keras_version"] = enc(keras_version)
        f.attrs["backend"] = enc("tensorflow")
        f.attrs["model_config"] = enc(json.dumps({"class_name": model_class, "config": config}))
        f.attrs["training_config"] = enc(json.dumps({"loss": "categorical_crossentropy"}))
        g = f.create_group("model_weights")
        names = [lay["config"]["name"] for lay in layers]
        g.attrs["layer_names"] = [enc(n) for n in names]
        g.attrs["backend"] = enc("tensorflow")
        g.attrs["keras_version"] = enc(keras_version)
        for n in names:
            lg = g.create_group(n)
            ws = weights.get(n, {})
            wnames = [f"{n}/{k}:0" for k in ws]
            lg.attrs["weight_names"] = [enc(w) for w in wnames]
            for wn, val in zip(wnames, ws.values()):
                lg.create_dataset(wn, data=val)
    return path


def paper_model(rng, act="relu", hidden=(12, 10), image=(4, 4, 1), leaky_alpha=0.3, dtype=np.float32):
    """The shape of the RecurJac training script (mnist_cifar_models.NLayerModel)."""
    layers = [_layer("Flatten", "flatten_1", batch_input_shape=[None, *image], data_format="channels_last")]
    weights = {}
    n_in = int(np.prod(image))
    for i, n in enumerate(hidden, start=1):
        name = f"dense_{i}"
        layers.append(_layer("Dense", name, units=n, activation="linear", use_bias=True))
        weights[name] = {
            "kernel": (rng.standard_normal((n_in, n)) / np.sqrt(n_in)).astype(dtype),
            "bias": (0.1 * rng.standard_normal(n)).astype(dtype),
        }
        if act == "leaky":
            layers.append(_layer("LeakyReLU", f"leaky_{i}", alpha=leaky_alpha))
        elif act == "arctan":
            layers.append(_layer("Lambda", f"arctan_{i}", function=["4wEAAAAAAAAA...", None, None],
                                 function_type="lambda", output_shape=None, arguments={}))
        else:
            layers.append(_layer("Activation", f"{act}_{i}", activation=act))
        n_in = n
    name = f"dense_{len(hidden) + 1}"
    layers.append(_layer("Dense", name, units=10, activation="linear", use_bias=True))
    weights[name] = {"kernel": rng.standard_normal((n_in, 10)).astype(dtype), "bias": rng.standard_normal(10).astype(dtype)}
    return layers, weights


def keras_reference(layers, weights, x):
    """Keras semantics written out: ``h @ kernel + bias`` with kernel (in, out), then the activation."""
    fns = {
        "relu": lambda z: np.maximum(z, 0),
        "linear": lambda z: z,
        "tanh": np.tanh,
        "sigmoid": lambda z: 1 / (1 + np.exp(-z)),
        "softplus": lambda z: np.log1p(np.exp(z)),
        "elu": lambda z: np.where(z > 0, z, np.expm1(z)),
        "hard_sigmoid": lambda z: np.clip(0.2 * z + 0.5, 0, 1),
    }
    h = x.reshape(x.shape[0], -1).astype(np.float64)
    for lay in layers:
        cls, conf = lay["class_name"], lay["config"]
        if cls == "Dense":
            w = weights[conf["name"]]
            h = h @ w["kernel"].astype(np.float64) + w["bias"].astype(np.float64)
            h = fns[conf["activation"]](h)
        elif cls == "Activation":
            h = fns[conf["activation"]](h)
        elif cls == "LeakyReLU":
            h = np.where(h > 0, h, conf["alpha"] * h)
        elif cls == "Lambda":
            h = np.arctan(h)
    return h


@pytest.mark.parametrize("act", ["relu", "tanh", "sigmoid", "leaky", "arctan", "softplus", "elu", "hard_sigmoid"])
def test_paper_training_script_layout(tmp_path, rng, act):
    layers, weights = paper_model(rng, act=act)
    p = write_keras_h5(tmp_path / f"mnist_{act}.h5", layers, weights)
    net = import_network(p)
    assert net.widths == (16, 12, 10, 10)
    assert net.input_spec.shape == (4, 4, 1) and net.input_spec.layout == "HWC"
    x = rng.uniform(0, 1, (20, 16)) * 3 - 1
    np.testing.assert_allclose(net.forward(x), keras_reference(layers, weights, x), rtol=1e-10, atol=1e-12)
    expect = {"leaky": "leaky_relu"}.get(act, act)
    assert [a.name for a in net.activations] == [expect, expect]
    if act == "leaky":
        assert net.activations[0].to_spec() == {"name": "leaky_relu", "alpha": 0.3}
    assert net.provenance["format"] == "keras" and net.provenance["keras_version"] == "2.2.4"
    assert net.weights[0].dtype == np.float32  # the file's dtype is kept


def test_dense_activation_keras_2_0_config_and_no_bias(tmp_path, rng):
    layers = [
        _layer("InputLayer", "input_1", batch_input_shape=[None, 5]),
        _layer("Dense", "d1", units=4, activation="tanh", use_bias=True),
        _layer("Dropout", "drop", rate=0.5),
        _layer("Dense", "d2", units=3, activation="relu", use_bias=False),
        _layer("Dense", "d3", units=2, activation="sigmoid", use_bias=True),
    ]
    weights = {
        "d1": {"kernel": rng.standard_normal((5, 4)), "bias": rng.standard_normal(4)},
        "d2": {"kernel": rng.standard_normal((4, 3))},
        "d3": {"kernel": rng.standard_normal((3, 2)), "bias": rng.standard_normal(2)},
    }
    p = write_keras_h5(tmp_path / "old.h5", layers, weights, keras_version="2.0.8", old_style=True, text_attrs=True)
    net = import_network(p)
    ref_w = dict(weights)
    ref_w["d2"] = {"kernel": weights["d2"]["kernel"], "bias": np.zeros(3)}
    x = rng.standard_normal((10, 5))
    np.testing.assert_allclose(net.forward(x), keras_reference(layers, ref_w, x), rtol=1e-10, atol=1e-12)
    assert net.output_activation.name == "sigmoid"
    assert net.input_spec.shape == (5,)


def test_errors(tmp_path, rng):
    layers, weights = paper_model(rng)

    def expect(exc, match, name, lay=None, w=None, **kw):
        p = write_keras_h5(tmp_path / name, layers if lay is None else lay, weights if w is None else w, **kw)
        with pytest.raises(exc, match=match) as ei:
            import_network(p)
        assert name in str(ei.value) and "\n" not in str(ei.value)

    soft = layers + [_layer("Activation", "softmax_1", activation="softmax")]
    expect(UnsupportedActivationError, "softmax", "softmax.h5", lay=soft)
    selu = [*layers[:2], _layer("Activation", "selu_1", activation="selu"), *layers[3:]]
    expect(UnsupportedActivationError, "selu", "selu.h5", lay=selu)
    conv = [*layers[:1], _layer("Conv2D", "conv2d_1", filters=2, kernel_size=[3, 3]), *layers[1:]]
    expect(ModelFormatError, r"layer 1 \('conv2d_1', Conv2D\)", "conv.h5", lay=conv)
    w = {k: dict(v) for k, v in weights.items()}
    del w["dense_2"]["bias"]
    expect(ModelFormatError, "bias", "nobias.h5", w=w)
    w = {k: dict(v) for k, v in weights.items()}
    w["dense_2"]["kernel"] = w["dense_2"]["kernel"][:5]
    expect(RecurJacError, "dense_2|shape", "shape.h5", w=w)
    w = {k: dict(v) for k, v in weights.items()}
    w["dense_1"]["kernel"] = w["dense_1"]["kernel"].copy()
    w["dense_1"]["kernel"][0, 0] = np.nan
    expect(NonFiniteError, "NaN", "nan.h5", w=w)
    expect(ModelFormatError, "Sequential", "functional.h5", model_class="Model")
    # weights-only file, not HDF5 at all, truncated
    with h5py.File(tmp_path / "weights_only.h5", "w") as f:
        f.attrs["layer_names"] = [b"dense_1"]
    with pytest.raises(ModelFormatError, match="model_config"):
        import_network(tmp_path / "weights_only.h5")
    (tmp_path / "text.h5").write_text("not an hdf5 file\n")
    with pytest.raises(ModelFormatError, match="text.h5"):
        import_network(tmp_path / "text.h5")
    good = write_keras_h5(tmp_path / "good.h5", layers, weights).read_bytes()
    (tmp_path / "trunc.h5").write_bytes(good[: len(good) // 2])
    with pytest.raises(ModelFormatError) as ei:
        import_network(tmp_path / "trunc.h5")
    assert "trunc.h5" in str(ei.value) and "\n" not in str(ei.value)
