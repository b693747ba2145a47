"""ONNX importer: graphs written with onnx.helper from weights made here, checked against onnx's ReferenceEvaluator."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402
from onnx.reference import ReferenceEvaluator  # noqa: E402

from recurjac_scale.errors import (  # noqa: E402
    ModelFormatError,
    NonFiniteError,
    RecurJacError,
    UnsupportedActivationError,
)
from recurjac_scale.network.importers import import_network  # noqa: E402

DT = TensorProto.DOUBLE


# -- a small graph builder --------------------------------------------------------------------------------------


class G:
    """Collects nodes and initializers of a chain; ``x`` is the current tensor name."""

    def __init__(self, in_dims, elem=DT, name="X"):
        self.nodes, self.inits, self.elem = [], [], elem
        self.in_dims = in_dims
        self.x = name
        self.k = 0
        self.npdt = np.float64 if elem == DT else np.float32

    def const(self, arr, as_node=False):
        self.k += 1
        name = f"c{self.k}"
        arr = np.asarray(arr)
        if arr.dtype.kind == "f":
            arr = arr.astype(self.npdt)
        if as_node:
            self.nodes.append(helper.make_node("Constant", [], [name], value=numpy_helper.from_array(arr, name)))
        else:
            self.inits.append(numpy_helper.from_array(arr, name))
        return name

    def op(self, op_type, *extra_inputs, data_pos=0, name=None, **attrs):
        self.k += 1
        out = f"t{self.k}"
        ins = list(extra_inputs)
        ins.insert(data_pos, self.x)
        self.nodes.append(helper.make_node(op_type, ins, [out], name=name or f"{op_type}_{self.k}", **attrs))
        self.x = out
        return self

    def gemm(self, rng, n_in, n_out, **attrs):
        w = rng.standard_normal((n_out, n_in)) / np.sqrt(n_in)
        b = rng.standard_normal(n_out) * 0.1
        return self.op("Gemm", self.const(w), self.const(b), transB=1, **attrs)

    def model(self, out_dims=None, opset=17):
        graph = helper.make_graph(
            self.nodes,
            "g",
            [helper.make_tensor_value_info("X", self.elem, self.in_dims)],
            [helper.make_tensor_value_info(self.x, self.elem, out_dims)],
            initializer=self.inits,
        )
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        m.ir_version = 8
        return m

    def save(self, path, **kw):
        m = self.model(**kw)
        onnx.save(m, str(path))
        return path


def reference(path, x, feed_shape):
    ev = ReferenceEvaluator(str(path))
    outs = [np.asarray(ev.run(None, {"X": xi.reshape(feed_shape)})[0]).ravel() for xi in x]
    return np.stack(outs)


def check_forward(path, x, feed_shape, rtol=1e-6):
    net = import_network(path)
    y_ref = reference(path, x, feed_shape)
    y = net.forward(x)
    np.testing.assert_allclose(y, y_ref, rtol=rtol, atol=1e-12 * max(1.0, np.abs(y_ref).max()))
    return net


def one_line_error(exc_info, fname):
    msg = str(exc_info.value)
    assert "\n" not in msg
    assert fname in msg
    return msg


# -- supported ops ----------------------------------------------------------------------------------------------

ACTS = [
    ("Relu", {}, "relu", {}),
    ("LeakyRelu", {"alpha": 0.2}, "leaky_relu", {"alpha": 0.2}),
    ("Sigmoid", {}, "sigmoid", {}),
    ("Tanh", {}, "tanh", {}),
    ("Atan", {}, "arctan", {}),
    ("Elu", {"alpha": 0.7}, "elu", {"alpha": 0.7}),
    ("Softplus", {}, "softplus", {}),
    ("HardSigmoid", {"alpha": 0.3, "beta": 0.4}, "hard_sigmoid", {"alpha": 0.3, "beta": 0.4}),
    ("LeakyRelu", {}, "leaky_relu", {"alpha": 0.01}),  # ONNX default
    ("HardSigmoid", {}, "hard_sigmoid", {"alpha": 0.2, "beta": 0.5}),
]


@pytest.mark.parametrize("op,attrs,name,params", ACTS, ids=[f"{a[0]}{a[1]}" for a in ACTS])
def test_every_activation(tmp_path, rng, op, attrs, name, params):
    g = G(["N", 6])
    g.gemm(rng, 6, 8).op(op, **attrs).gemm(rng, 8, 7).op(op, **attrs).gemm(rng, 7, 3)
    p = g.save(tmp_path / "net.onnx")
    x = rng.standard_normal((20, 6)) * 3
    net = check_forward(p, x, (1, 6))
    assert net.widths == (6, 8, 7, 3)
    # ONNX float attributes are float32: the imported parameter is exactly the file's value
    expect = {"name": name, **{k: float(np.float32(v)) for k, v in params.items()}}
    for a in net.activations:
        assert a.to_spec() == expect
    assert net.output_activation.is_identity
    assert net.input_spec.shape == (6,)


def test_output_activation(tmp_path, rng):
    g = G(["batch", 5])
    g.gemm(rng, 5, 4).op("Tanh").gemm(rng, 4, 2).op("Sigmoid")
    p = g.save(tmp_path / "out_act.onnx")
    net = check_forward(p, rng.standard_normal((10, 5)), (1, 5))
    assert net.output_activation.name == "sigmoid"
    assert [a.name for a in net.activations] == ["tanh"]


GEMMS = [
    dict(transB=1),
    dict(transB=0),
    dict(transB=1, alpha=0.5, beta=2.0),
    dict(transB=0, alpha=-1.5, beta=0.0),
    dict(transA=1, transB=1),
    dict(transB=1, bias="row"),
    dict(transB=1, bias="scalar"),
    dict(transB=1, bias="none"),
    dict(data_second=True),
    dict(data_second=True, transA=1, alpha=2.0, beta=0.5),
]


@pytest.mark.parametrize("cfg", GEMMS, ids=[str(c) for c in GEMMS])
def test_gemm_attributes(tmp_path, rng, cfg):
    cfg = dict(cfg)
    n_in, n_out = 6, 4
    data_second = cfg.pop("data_second", False)
    bias = cfg.pop("bias", "vector")
    transA, transB = cfg.get("transA", 0), cfg.get("transB", 0)
    if data_second:
        in_dims, feed = [n_in, 1], (n_in, 1)
        A = rng.standard_normal((n_in, n_out) if transA else (n_out, n_in))
        g = G(in_dims)
        C = g.const(rng.standard_normal((n_out, 1)))
        g.op("Gemm", g.const(A), C, data_pos=1, **cfg)
    else:
        in_dims, feed = ([n_in, 1], (n_in, 1)) if transA else ([1, n_in], (1, n_in))
        B = rng.standard_normal((n_out, n_in) if transB else (n_in, n_out))
        g = G(in_dims)
        extra = [g.const(B)]
        if bias == "vector":
            extra.append(g.const(rng.standard_normal(n_out)))
        elif bias == "row":
            extra.append(g.const(rng.standard_normal((1, n_out))))
        elif bias == "scalar":
            extra.append(g.const(np.array(0.7)))
        g.op("Gemm", *extra, **cfg)
    g.op("Relu")
    g.gemm(rng, n_out, 3) if not data_second else g.op("MatMul", g.const(rng.standard_normal((3, n_out))), data_pos=1)
    p = g.save(tmp_path / "gemm.onnx")
    check_forward(p, rng.standard_normal((15, n_in)), feed)


def test_matmul_add_both_orientations(tmp_path, rng):
    # x @ W + b (row convention, batch dim) ...
    g = G(["N", 5])
    g.op("MatMul", g.const(rng.standard_normal((5, 7)))).op("Add", g.const(rng.standard_normal(7)))
    g.op("Relu").op("MatMul", g.const(rng.standard_normal((7, 3)))).op("Add", g.const(rng.standard_normal(3)))
    p = g.save(tmp_path / "row.onnx")
    check_forward(p, rng.standard_normal((10, 5)), (1, 5))
    # ... and W @ x + b on a 1-D input (the ERAN ACAS Xu convention), bias added with the constant first
    g = G([5])
    g.op("MatMul", g.const(rng.standard_normal((7, 5))), data_pos=1)
    g.op("Add", g.const(rng.standard_normal(7)), data_pos=1).op("Relu")
    g.op("MatMul", g.const(rng.standard_normal((2, 7))), data_pos=1).op("Add", g.const(rng.standard_normal(2)))
    p = g.save(tmp_path / "col.onnx")
    net = check_forward(p, rng.standard_normal((10, 5)), (5,))
    assert net.widths == (5, 7, 2)


# -- input normalisation ----------------------------------------------------------------------------------------


def test_sub_div_normalisation_recorded_exactly(tmp_path, rng):
    mean = rng.uniform(0.1, 0.9, 6)
    std = rng.uniform(0.2, 2.0, 6)
    g = G(["N", 6])
    g.op("Sub", g.const(mean)).op("Div", g.const(std)).gemm(rng, 6, 5).op("Relu").gemm(rng, 5, 2)
    p = g.save(tmp_path / "norm.onnx")
    net = check_forward(p, rng.uniform(0, 1, (12, 6)), (1, 6))
    np.testing.assert_array_equal(net.input_spec.mean, mean)
    np.testing.assert_array_equal(net.input_spec.std, std)


def test_per_channel_normalisation_with_flatten(tmp_path, rng):
    # (x - mean_c) / std_c on a 1x3x4x4 image, constants given as Constant nodes, then Flatten and Gemm
    mean = rng.uniform(0.3, 0.6, (1, 3, 1, 1))
    std = rng.uniform(0.2, 0.3, (1, 3, 1, 1))
    g = G(["N", 3, 4, 4])
    g.op("Sub", g.const(mean, as_node=True)).op("Div", g.const(std, as_node=True)).op("Flatten", axis=1)
    g.gemm(rng, 48, 10).op("Relu").gemm(rng, 10, 4)
    p = g.save(tmp_path / "chan.onnx")
    net = check_forward(p, rng.uniform(0, 1, (8, 48)), (1, 3, 4, 4))
    assert net.input_spec.shape == (3, 4, 4) and net.input_spec.layout == "CHW"
    vec_mean, vec_std = net.input_spec.normalization_vectors()
    np.testing.assert_array_equal(vec_mean, np.repeat(mean.ravel(), 16))
    np.testing.assert_array_equal(vec_std, np.repeat(std.ravel(), 16))


@pytest.mark.parametrize(
    "ops",
    [
        [("Mul", "s"), ("Add", "v")],
        [("Div", "s"), ("Sub", "v"), ("Mul", "v")],
        [("Sub", "v", 1)],  # c - x
        [("Add", "scalar"), ("Mul", "scalar", 1)],
    ],
    ids=["mul_add", "div_sub_mul", "const_minus_x", "scalars_const_first"],
)
def test_other_normalisation_variants(tmp_path, rng, ops):
    g = G([1, 6])
    for op, kind, *pos in ops:
        c = {"s": rng.uniform(0.5, 2.0, 6), "v": rng.uniform(-1, 1, 6), "scalar": np.array(1.7)}[kind]
        g.op(op, g.const(c), data_pos=pos[0] if pos else 0)
    g.gemm(rng, 6, 5).op("Elu", alpha=0.5).gemm(rng, 5, 3)
    p = g.save(tmp_path / "variants.onnx")
    net = check_forward(p, rng.uniform(-2, 2, (12, 6)), (1, 6))
    assert net.input_spec.mean is not None


def test_affine_ops_between_layers_and_reshape(tmp_path, rng):
    # Gemm, Mul, Add, Identity, Reshape, Gemm all compose into one affine layer; a Div after an activation too
    g = G([1, 2, 3])
    g.op("Reshape", g.const(np.array([0, -1], dtype=np.int64))).gemm(rng, 6, 5)
    g.op("Mul", g.const(rng.uniform(0.5, 2, 5))).op("Identity").op("Add", g.const(rng.standard_normal(5)))
    g.op("Sub", g.const(rng.standard_normal(5)), data_pos=1)  # c - t
    g.op("Relu").op("Div", g.const(rng.uniform(1, 3, 5))).gemm(rng, 5, 4).op("Relu").op("Relu")
    g.gemm(rng, 4, 2)
    p = g.save(tmp_path / "compose.onnx")
    net = check_forward(p, rng.standard_normal((10, 6)), (1, 2, 3))
    # relu, relu (two in a row become relu, identity-layer, relu) : 4 affine layers
    assert net.widths == (6, 5, 4, 4, 2)
    assert net.input_spec.shape == (2, 3)


def test_constant_subgraphs_are_folded(tmp_path, rng):
    # a float16 weight cast to double and transposed, and a Reshape target computed by Concat of constants
    w16 = rng.standard_normal((6, 4)).astype(np.float16)
    g = G(["N", 2, 3])
    wname = g.const(w16)
    g.inits[-1] = numpy_helper.from_array(w16, wname)  # keep float16
    g.nodes.append(helper.make_node("Cast", [wname], ["w64"], to=DT))
    g.nodes.append(helper.make_node("Transpose", ["w64"], ["wT"], perm=[1, 0]))
    a, b = g.const(np.array([1], dtype=np.int64)), g.const(np.array([-1], dtype=np.int64))
    g.nodes.append(helper.make_node("Concat", [a, b], ["shape"], axis=0))
    g.op("Reshape", "shape").op("Gemm", "wT", g.const(rng.standard_normal(4)), transB=1).op("Tanh")
    g.gemm(rng, 4, 2)
    p = g.save(tmp_path / "folded.onnx")
    net = check_forward(p, rng.standard_normal((8, 6)), (1, 2, 3))
    np.testing.assert_array_equal(net.weights[0], w16.astype(np.float64).T)


def test_float32_file(tmp_path, rng):
    g = G(["N", 6], elem=TensorProto.FLOAT)
    g.gemm(rng, 6, 8).op("Relu").gemm(rng, 8, 3)
    p = g.save(tmp_path / "f32.onnx")
    net = check_forward(p, rng.standard_normal((10, 6)).astype(np.float32).astype(np.float64), (1, 6), rtol=1e-5)
    assert net.weights[0].dtype in (np.float32, np.float64)


# -- errors -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("op", ["Conv", "Softmax", "MaxPool", "BatchNormalization"])
def test_unsupported_node_named_with_position(tmp_path, rng, op):
    g = G(["N", 6])
    g.gemm(rng, 6, 4).op("Relu")
    g.op(op, name="the_bad_node")
    g.gemm(rng, 4, 2)
    p = g.save(tmp_path / "bad.onnx")
    with pytest.raises(ModelFormatError) as ei:
        import_network(p)
    msg = one_line_error(ei, "bad.onnx")
    assert "the_bad_node" in msg and op in msg and "node 2" in msg


@pytest.mark.parametrize("op", ["Gelu", "Mish", "Sin"])
def test_negative_derivative_activation_cites_assumption_2(tmp_path, rng, op):
    g = G(["N", 6])
    g.gemm(rng, 6, 4).op(op, name="act").gemm(rng, 4, 2)
    p = g.save(tmp_path / "neg.onnx", opset=20)
    with pytest.raises(UnsupportedActivationError) as ei:
        import_network(p)
    msg = one_line_error(ei, "neg.onnx")
    assert "Assumption 2" in msg and op in msg and "node 1" in msg


@pytest.mark.parametrize("op", ["HardSwish", "PRelu"])
def test_other_refused_activations(tmp_path, rng, op):
    g = G(["N", 6])
    g.gemm(rng, 6, 4)
    g.op(op, *([g.const(np.full(4, 0.1))] if op == "PRelu" else [])).gemm(rng, 4, 2)
    p = g.save(tmp_path / "neg2.onnx")
    with pytest.raises(UnsupportedActivationError, match="Assumption 2"):
        import_network(p)


def test_initializers_listed_as_inputs(tmp_path, rng):
    # IR version 3 style: every initializer also appears in graph.input
    g = G([1, 5])
    g.gemm(rng, 5, 4).op("Relu").gemm(rng, 4, 2)
    m = g.model()
    for t in m.graph.initializer:
        m.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    onnx.save(m, str(tmp_path / "ir3.onnx"))
    check_forward(tmp_path / "ir3.onnx", rng.standard_normal((6, 5)), (1, 5))


def test_leaky_slope_out_of_range(tmp_path, rng):
    g = G(["N", 6])
    g.gemm(rng, 6, 4).op("LeakyRelu", alpha=-0.1).gemm(rng, 4, 2)
    p = g.save(tmp_path / "slope.onnx")
    with pytest.raises(UnsupportedActivationError, match="Assumption 2"):
        import_network(p)


def test_not_a_chain(tmp_path, rng):
    # residual: y = relu(W1 x) + W2 x
    g = G(["N", 4])
    g.gemm(rng, 4, 4)
    skip = g.x
    g.op("Relu")
    g.nodes.append(helper.make_node("Add", [g.x, skip], ["res"], name="residual"))
    g.x = "res"
    p = g.save(tmp_path / "res.onnx")
    with pytest.raises(ModelFormatError, match="not a simple chain") as ei:
        import_network(p)
    one_line_error(ei, "res.onnx")


def test_two_inputs_and_division_by_data(tmp_path, rng):
    g = G(["N", 4])
    g.gemm(rng, 4, 2)
    m = g.model()
    m.graph.input.append(helper.make_tensor_value_info("Y", DT, ["N", 4]))
    onnx.save(m, str(tmp_path / "two.onnx"))
    with pytest.raises(ModelFormatError, match="data inputs"):
        import_network(tmp_path / "two.onnx")
    g = G(["N", 4])
    g.op("Div", g.const(np.ones(4)), data_pos=1).gemm(rng, 4, 2)
    p = g.save(tmp_path / "div.onnx")
    with pytest.raises(ModelFormatError, match="not affine"):
        import_network(p)


def test_shape_mismatch_and_nan_weights(tmp_path, rng):
    g = G(["N", 6])
    g.op("Gemm", g.const(rng.standard_normal((4, 5))), g.const(np.zeros(4)), transB=1)
    p = g.save(tmp_path / "shape.onnx")
    with pytest.raises(ModelFormatError) as ei:
        import_network(p)
    assert "Gemm" in one_line_error(ei, "shape.onnx")
    w = rng.standard_normal((4, 6))
    w[1, 2] = np.nan
    g = G(["N", 6])
    g.op("Gemm", g.const(w), g.const(np.zeros(4)), transB=1)
    p = g.save(tmp_path / "nan.onnx")
    with pytest.raises(NonFiniteError) as ei:
        import_network(p)
    one_line_error(ei, "nan.onnx")


def test_truncated_and_garbage_files(tmp_path, rng):
    g = G(["N", 6])
    g.gemm(rng, 6, 4).op("Relu").gemm(rng, 4, 2)
    data = g.model().SerializeToString()
    (tmp_path / "trunc.onnx").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.onnx").write_bytes(b"\x07\xff not a protobuf at all \x00\x13" * 5)
    (tmp_path / "empty.onnx").write_bytes(b"")
    for name in ("trunc.onnx", "garbage.onnx", "empty.onnx"):
        with pytest.raises(RecurJacError) as ei:
            import_network(tmp_path / name)
        one_line_error(ei, name)


def test_provenance(tmp_path, rng):
    import hashlib

    g = G(["N", 3])
    g.gemm(rng, 3, 2)
    p = g.save(tmp_path / "prov.onnx")
    prov = import_network(p).provenance
    assert prov["source"] == "prov.onnx"
    assert prov["sha256"] == hashlib.sha256(p.read_bytes()).hexdigest()
    assert prov["format"] == "onnx"
    assert prov["importer"].startswith("recurjac_scale.network.importers.onnx ")


# -- the real ERAN ACAS Xu networks -----------------------------------------------------------------------------


def _as_double(model):
    """The same model with float64 initializers and inputs (so the reference runs in float64)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for t in m.graph.initializer:
        arr = numpy_helper.to_array(t)
        if arr.dtype == np.float32:
            t.CopyFrom(numpy_helper.from_array(arr.astype(np.float64), t.name))
    for v in (*m.graph.input, *m.graph.output):
        if v.type.tensor_type.elem_type == TensorProto.FLOAT:
            v.type.tensor_type.elem_type = DT
    return m


def test_eran_acasxu(shared_dir, rng):
    files = sorted((shared_dir / "nets" / "eran_acasxu").glob("*.onnx"))
    assert len(files) >= 3
    for f in files:
        net = import_network(f)
        assert net.widths == (5, 50, 50, 50, 50, 50, 50, 5)
        assert all(a.name == "relu" for a in net.activations) and net.output_activation.is_identity
        model = onnx.load(str(f))
        name = model.graph.input[0].name
        shape = [d.dim_value or 1 for d in model.graph.input[0].type.tensor_type.shape.dim]
        x = rng.uniform(-0.5, 0.5, (25, 5))
        y = net.forward(x)
        ev64 = ReferenceEvaluator(_as_double(model))
        y64 = np.stack([ev64.run(None, {name: xi.reshape(shape)})[0].ravel() for xi in x])
        np.testing.assert_allclose(y, y64, rtol=1e-9, atol=1e-12)
        ev32 = ReferenceEvaluator(model)
        x32 = x.astype(np.float32)
        y32 = np.stack([ev32.run(None, {name: xi.reshape(shape)})[0].ravel() for xi in x32])
        np.testing.assert_allclose(net.forward(x32.astype(np.float64)), y32, rtol=1e-5, atol=1e-7)
