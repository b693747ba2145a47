"""Import an MLP from an ONNX graph.

The graph must be a *simple chain*: one data input, one output, and every node (apart from ``Constant`` nodes)
consumes exactly the tensor the previous node produced, plus constants (initializers or ``Constant`` outputs).
Supported nodes:

========================================  ==================================================================
affine                                    ``Gemm`` (``alpha``, ``beta``, ``transA``, ``transB``), ``MatMul`` with a
                                          2-D constant on either side, ``Add``/``Sub``/``Mul``/``Div`` by a
                                          constant (``Div`` only with the constant as divisor)
shape only (flat order unchanged)         ``Flatten``, ``Reshape``, ``Identity``
activations                               ``Relu``, ``LeakyRelu`` (``alpha``), ``Sigmoid``, ``Tanh``, ``Atan``,
                                          ``Elu`` (``alpha``), ``Softplus``, ``HardSigmoid`` (``alpha``, ``beta``)
========================================  ==================================================================

Nodes whose inputs are all constants (e.g. a ``Cast`` or ``Transpose`` of a weight, or a shape computation
on constants) are evaluated once with ``onnx.reference.ReferenceEvaluator`` and their outputs treated as constants.

Every run of affine nodes between two activations is composed into one affine layer ``z = W h + b`` in float64
(a lone ``Gemm``/``MatMul`` + ``Add`` keeps the file's dtype).  Element-wise ``Sub``/``Div``/``Mul``/``Add`` before
the first ``Gemm``/``MatMul`` are an input normalisation: they are tracked exactly as ``(x - mean) / std`` (a
``Sub`` then ``Div`` gives the file's constants bit for bit) and folded into the first layer with
:meth:`Network.with_normalization`, so ``input_spec.mean/std`` record them.  The imported network computes the
same function as the ONNX graph on raw inputs.

The tensor flowing through the chain is tracked with its shape, batch dimensions set to 1; the network works on
its row-major flattening.  A matrix product that would mix several rows (a batch dimension larger than 1 fixed in
the graph) is refused.  The input shape of the network is the graph input's shape without its batch dimension
(a leading symbolic dimension, or a leading 1 on an input of rank >= 2); a 3-D input shape is labelled ``CHW``
(``HWC`` when only its last dimension looks like a channel count).

Anything else raises :class:`ModelFormatError` naming the node, its op type and its position in ``graph.node``;
activations whose derivative can be negative (``Gelu``, ``Mish``, ``Sin``, ...) raise
:class:`UnsupportedActivationError` citing Assumption 2 of Zhang et al. (2019).

Tensors stored as external data are read only from files inside the model file's folder: a ``location`` that is
absolute, climbs out with ``..`` or goes through a symlink leading out raises :class:`InputError` before any file
is opened (:func:`recurjac_scale.paths.resolve_inside`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from ...activations import REJECTED_ACTIVATIONS, Activation, get_activation
from ...errors import ModelFormatError, UnsupportedActivationError, require
from ...paths import resolve_inside
from ..model import Network
from . import register_importer
from ._common import as_float_array, build_network, provenance, reading

__all__ = ["import_onnx", "ONNX_ACTIVATIONS"]

def _f32(v: float) -> float:
    """An ONNX float attribute default (ONNX float attributes are float32)."""
    return float(np.float32(v))


ONNX_ACTIVATIONS: dict[str, Callable[[dict], Activation]] = {
    "Relu": lambda a: get_activation("relu"),
    "LeakyRelu": lambda a: get_activation("leaky_relu", alpha=a.get("alpha", _f32(0.01))),
    "Sigmoid": lambda a: get_activation("sigmoid"),
    "Tanh": lambda a: get_activation("tanh"),
    "Atan": lambda a: get_activation("arctan"),
    "Elu": lambda a: get_activation("elu", alpha=a.get("alpha", 1.0)),
    "Softplus": lambda a: get_activation("softplus"),
    "HardSigmoid": lambda a: get_activation("hard_sigmoid", alpha=a.get("alpha", _f32(0.2)), beta=a.get("beta", 0.5)),
}
"""ONNX op type -> activation built from the node's attributes (ONNX defaults, as float32 values)."""

_NEGATIVE_DERIVATIVE = {
    "HardSwish": "its derivative is negative on (-3, -1.5)",
    "PRelu": "its learned slopes may be negative (use LeakyRelu with a slope in [0, 1])",
}

_FLOAT_TYPES = {1: "float32", 10: "float16", 11: "float64", 16: "bfloat16"}


@register_importer("onnx", suffixes=(".onnx",))
def import_onnx(path: Path) -> Network:
    """Read an ONNX MLP (supported graphs in the module docstring).

    Parameters
    ----------
    path : Path

    Returns
    -------
    Network
        Input shape from the graph input (without batch dimension); input normalisation folded.

    Raises
    ------
    ModelFormatError
        Unreadable file, a graph that is not a simple chain, an unsupported node (named with op type and position),
        constants whose shapes do not fit.
    UnsupportedActivationError
        An activation outside Assumption 2 of Zhang et al. (2019), or parameters out of range.
    InputError
        An external-data location outside the model file's folder.
    MissingDependencyError
        onnx is not installed (extra ``onnx``).
    """
    onnx = require("onnx", "onnx")
    with reading(path, "an ONNX model"):
        model = onnx.load(str(path), load_external_data=False)
        base = Path(path).resolve().parent
        external = [t for t in _all_tensors(model.graph) if t.data_location == onnx.TensorProto.EXTERNAL]
        for t in external:
            location = {e.key: e.value for e in t.external_data}.get("location", "")
            resolve_inside(base, location)  # InputError for an absolute path, ``..`` or a symlink leading out
        if external:
            onnx.external_data_helper.load_external_data_for_model(model, str(base))
        return _Builder(model, onnx).build(path)


def _all_tensors(graph):
    """Every tensor of a graph: initializers and node attributes (``t``, ``tensors``), subgraphs included."""
    yield from graph.initializer
    for node in graph.node:
        for a in node.attribute:
            if a.HasField("t"):
                yield a.t
            yield from a.tensors
            if a.HasField("g"):
                yield from _all_tensors(a.g)
            for g in a.graphs:
                yield from _all_tensors(g)


def _attrs(node, onnx) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _guess_layout(shape: tuple[int, ...]) -> str:
    """``flat`` unless 3-D; then ``CHW`` (the ONNX convention), or ``HWC`` when only the last dimension looks
    like a channel count (1, 3 or 4), as in a TensorFlow export."""
    if len(shape) != 3:
        return "flat"
    a, _, c = shape
    return "HWC" if c in (1, 3, 4) and a not in (1, 3, 4) else "CHW"


class _Builder:
    """Walks the chain and composes the affine runs (state documented on :meth:`build`)."""

    def __init__(self, model, onnx):
        self.model = model
        self.onnx = onnx
        self.graph = model.graph

    # -- graph structure -----------------------------------------------------------------------------------------
    def _constants(self) -> dict[str, np.ndarray]:
        nh = self.onnx.numpy_helper
        return {t.name: nh.to_array(t) for t in self.graph.initializer}

    def _constant_node(self, node, pos) -> np.ndarray:
        a = _attrs(node, self.onnx)
        if "value" in a:
            return self.onnx.numpy_helper.to_array(a["value"])
        for key in ("value_float", "value_floats", "value_int", "value_ints"):
            if key in a:
                return np.asarray(a[key])
        raise self._node_error(node, pos, f"Constant attribute(s) {sorted(a)} not supported")

    def _node_error(self, node, pos, msg, cls=ModelFormatError):
        return cls(f"node {pos} {node.name or '(unnamed)'!r} (op {node.op_type}): {msg}")

    def _input(self, consts):
        data = [i for i in self.graph.input if i.name not in consts]
        if len(data) != 1:
            raise ModelFormatError(
                f"the graph has {len(data)} data inputs {[i.name for i in data]}; exactly one is supported"
            )
        inp = data[0]
        tt = inp.type.tensor_type
        if not inp.type.HasField("tensor_type"):
            raise ModelFormatError(f"graph input {inp.name!r} is not a tensor")
        if tt.elem_type not in _FLOAT_TYPES:
            raise ModelFormatError(f"graph input {inp.name!r} has element type {tt.elem_type}, not a float type")
        if not tt.HasField("shape") or len(tt.shape.dim) == 0:
            raise ModelFormatError(f"graph input {inp.name!r} has no shape information (a rank >= 1 shape is needed)")
        dims, symbolic = [], []
        for d in tt.shape.dim:
            known = d.HasField("dim_value") and d.dim_value > 0
            dims.append(int(d.dim_value) if known else 1)
            symbolic.append(not known)
        if any(symbolic[1:]):
            raise ModelFormatError(
                f"graph input {inp.name!r} has symbolic dimensions beyond the first: {self._dims_str(tt)}"
            )
        if symbolic[0] or (len(dims) >= 2 and dims[0] == 1):
            spec_shape = tuple(dims[1:]) if len(dims) >= 2 else (1,)
        else:
            spec_shape = tuple(dims)
        return inp.name, tuple(dims), spec_shape

    @staticmethod
    def _dims_str(tt) -> str:
        return "[" + ", ".join(d.dim_param if d.HasField("dim_param") else str(d.dim_value) for d in tt.shape.dim) + "]"

    # -- the walk ------------------------------------------------------------------------------------------------
    def build(self, path) -> Network:
        """Walk the chain.

        State: ``S`` the current tensor's shape (batch = 1); ``n`` the width at the last layer boundary (input or
        activation output); the pending affine map from that boundary to the current tensor, either *diagonal*
        ``t = (h - mean) / std`` (``mean``, ``std`` of shape ``(n,)``) or *dense* ``t = A h + c`` (``A`` of shape
        ``(prod(S), n)``).
        """
        g = self.graph
        consts = self._constants()
        current, S, spec_shape = self._input(consts)
        if len(g.output) != 1:
            raise ModelFormatError(f"the graph has {len(g.output)} outputs; exactly one is supported")
        n = int(np.prod(S))
        mean, std = np.zeros(n), np.ones(n)
        A = c = None  # dense state when A is not None
        layers: list[tuple[np.ndarray, np.ndarray, Activation]] = []
        normalization = None

        def diag_trivial():
            return A is None and not mean.any() and np.all(std == 1.0)

        def diag_dense():
            # the diagonal map as a dense one, in float64
            inv = 1.0 / std
            return np.diag(inv), -mean * inv

        for pos, node in enumerate(g.node):
            op = node.op_type
            if node.domain not in ("", "ai.onnx"):
                raise self._node_error(node, pos, f"custom operator domain {node.domain!r} is not supported")
            if op == "Constant":
                if len(node.output) != 1:
                    raise self._node_error(node, pos, "a Constant needs one output")
                consts[node.output[0]] = self._constant_node(node, pos)
                continue
            ins = [i for i in node.input]
            data = [i for i in ins if i and i not in consts]
            if not data and ins and not op.startswith("Random"):
                self._fold_constant_node(node, pos, consts)
                continue
            if len(data) != 1 or data[0] != current:
                what = "no data input" if not data else f"data inputs {data}"
                raise self._node_error(
                    node, pos,
                    f"the graph is not a simple chain: the node has {what} but the chain is at tensor {current!r} "
                    "(branches, skip connections and computed shapes are not supported)",
                )
            outs = [o for o in node.output if o]
            if len(outs) != 1:
                raise self._node_error(node, pos, f"{len(outs)} outputs; a chain node has exactly one")
            a = _attrs(node, self.onnx)
            k_data = ins.index(current)
            cvals = [consts.get(i) if i else None for i in ins]

            if op in _NEGATIVE_DERIVATIVE:
                raise self._node_error(
                    node, pos,
                    f"{op} is not supported: {_NEGATIVE_DERIVATIVE[op]}, which breaks Assumption 2 of Zhang et al. "
                    "2019 (0 <= sigma' <= C)",
                    UnsupportedActivationError,
                )
            if op in ONNX_ACTIVATIONS or op.lower() in REJECTED_ACTIVATIONS:
                try:
                    act = ONNX_ACTIVATIONS[op](a) if op in ONNX_ACTIVATIONS else get_activation(op.lower())
                except UnsupportedActivationError as exc:
                    raise self._node_error(node, pos, str(exc), UnsupportedActivationError) from None
                if A is None:
                    if layers and diag_trivial():
                        A, c = np.eye(n), np.zeros(n)  # two activations in a row: identity layer between
                    else:
                        A, c = diag_dense()
                layers.append((A, np.zeros(A.shape[0]) if c is None else c, act))
                n = A.shape[0]
                mean, std = np.zeros(n), np.ones(n)
                A = c = None
            elif op in ("MatMul", "Gemm"):
                W, b, S = self._affine(node, pos, op, a, cvals, k_data, S)
                if A is None:
                    if not layers:
                        if not diag_trivial():
                            normalization = (mean, std)
                        A, c = W, b
                    elif diag_trivial():
                        A, c = W, b
                    else:
                        D, d = diag_dense()
                        A = np.asarray(W, np.float64) @ D
                        c = np.asarray(W, np.float64) @ d + (0.0 if b is None else b)
                else:
                    A64 = np.asarray(A, np.float64)
                    W64 = np.asarray(W, np.float64)
                    A = W64 @ A64
                    c = W64 @ (np.zeros(A64.shape[0]) if c is None else np.asarray(c, np.float64)) + (
                        0.0 if b is None else b
                    )
            elif op in ("Add", "Sub", "Mul", "Div"):
                C = as_float_array(cvals[1 - k_data], f"constant {ins[1 - k_data]!r}").astype(np.float64)
                try:
                    out_shape = np.broadcast_shapes(S, C.shape)
                except ValueError:
                    raise self._node_error(node, pos, f"constant of shape {C.shape} does not broadcast to the "
                                           f"tensor shape {S}") from None
                if int(np.prod(out_shape)) != int(np.prod(S)):
                    raise self._node_error(node, pos, f"constant of shape {C.shape} would broadcast the tensor "
                                           f"of shape {S} to {out_shape}")
                S = tuple(out_shape)
                v = np.broadcast_to(C, out_shape).ravel()
                if op == "Div" and k_data == 1:
                    raise self._node_error(node, pos, "division by the data tensor is not affine")
                if op in ("Mul", "Div") and (v == 0).any():
                    raise self._node_error(node, pos, f"{op} by a constant containing zeros is not supported")
                if not np.isfinite(v).all():
                    raise self._node_error(node, pos, "constant contains NaN or infinite values")
                negate = op == "Sub" and k_data == 1  # C - t = -(t) + C
                if A is None:
                    # diagonal state t = (h - mean) / std
                    if negate:
                        std = -std
                        mean = mean - v * std
                    elif op == "Add":
                        mean = mean - v * std
                    elif op == "Sub":
                        mean = mean + v * std
                    elif op == "Mul":
                        std = std / v
                    else:
                        std = std * v
                else:
                    A = np.asarray(A, np.float64)
                    c = np.zeros(A.shape[0]) if c is None else np.asarray(c, np.float64)
                    if negate:
                        A, c = -A, v - c
                    elif op == "Add":
                        c = c + v
                    elif op == "Sub":
                        c = c - v
                    elif op == "Mul":
                        A, c = A * v[:, None], c * v
                    else:
                        A, c = A / v[:, None], c / v
            elif op == "Identity":
                pass
            elif op == "Flatten":
                axis = int(a.get("axis", 1))
                if axis < 0:
                    axis += len(S)
                if not 0 <= axis <= len(S):
                    raise self._node_error(node, pos, f"axis {a.get('axis')} out of range for shape {S}")
                S = (int(np.prod(S[:axis])), int(np.prod(S[axis:])))
            elif op == "Reshape":
                S = self._reshape(node, pos, S, cvals[1] if len(cvals) > 1 else None, a)
            else:
                raise self._node_error(
                    node, pos,
                    "unsupported node; supported: Gemm, MatMul, Add, Sub, Mul, Div (by constants), Flatten, "
                    f"Reshape, Identity, Constant, {', '.join(ONNX_ACTIVATIONS)}",
                )
            current = outs[0]

        if current != g.output[0].name:
            raise ModelFormatError(
                f"the chain ends at tensor {current!r} but the graph output is {g.output[0].name!r} (not a simple chain)"
            )
        if A is not None:
            layers.append((A, np.zeros(A.shape[0]) if c is None else c, get_activation("identity")))
        elif not diag_trivial() or not layers:
            if not layers:
                raise ModelFormatError("the graph has no affine layer (Gemm or MatMul)")
            D, d = diag_dense()
            layers.append((D, d, get_activation("identity")))
        ws = [w for w, _, _ in layers]
        bs = [b for _, b, _ in layers]
        if int(np.prod(spec_shape)) != ws[0].shape[1]:  # pragma: no cover - the walk keeps the flat size
            spec_shape = None
        opset = {o.domain or "ai.onnx": int(o.version) for o in self.model.opset_import}
        return build_network(
            ws,
            bs,
            [act for _, _, act in layers],
            input_shape=spec_shape,
            layout=_guess_layout(spec_shape),
            normalization=normalization,
            provenance=provenance(
                path, "onnx", __name__, onnx_opset=opset.get("ai.onnx"), producer=self.model.producer_name or None
            ),
        )

    def _fold_constant_node(self, node, pos, consts) -> None:
        """Evaluate a node whose inputs are all constants (a Cast or Transpose of a weight, a computed shape) with
        onnx's reference evaluator, and record its outputs as constants."""
        from onnx.reference import ReferenceEvaluator

        opset = {o.domain or "": int(o.version) for o in self.model.opset_import}
        try:
            ev = ReferenceEvaluator(node, opsets={"": opset.get("", opset.get("ai.onnx", 13))})
            outs = ev.run(None, {i: consts[i] for i in node.input if i})
        except Exception as exc:  # noqa: BLE001
            raise self._node_error(node, pos, f"cannot evaluate this node on its constant inputs: "
                                   f"{type(exc).__name__}: {exc}") from None
        for name, val in zip(node.output, outs):
            if name:
                consts[name] = np.asarray(val)

    # -- node helpers --------------------------------------------------------------------------------------------
    def _affine(self, node, pos, op, a, cvals, k_data, S):
        """``(W, b, S_out)`` of a MatMul/Gemm node: ``flat(out) = W flat(in) + b`` (``b`` may be None)."""
        if len(cvals) < 2:
            raise self._node_error(node, pos, "needs two inputs")
        if k_data not in (0, 1):
            raise self._node_error(node, pos, "the data tensor must be the first or second input")
        Wc = as_float_array(cvals[1 - k_data], f"node {pos} weight")
        if Wc.ndim != 2:
            raise self._node_error(node, pos, f"constant operand of shape {Wc.shape} is not a 2-D matrix")
        if op == "MatMul":
            if k_data == 0:  # t @ W, W of shape (K, N)
                K, N = Wc.shape
                if len(S) == 1 and S[0] == K:
                    S_out = (N,)
                elif len(S) >= 2 and S[-1] == K and int(np.prod(S[:-1])) == 1:
                    S_out = (*S[:-1], N)
                else:
                    raise self._node_error(node, pos, f"cannot multiply a tensor of shape {S} (batch 1) by a "
                                           f"matrix of shape {Wc.shape}")
                return Wc.T, None, S_out
            M, K = Wc.shape  # W @ t
            if len(S) == 1 and S[0] == K:
                S_out = (M,)
            elif len(S) >= 2 and S[-2] == K and int(np.prod(S[:-2])) * S[-1] == 1:
                S_out = (*S[:-2], M, S[-1])
            else:
                raise self._node_error(node, pos, f"cannot multiply a matrix of shape {Wc.shape} by a tensor of "
                                       f"shape {S} (batch 1)")
            return Wc, None, S_out
        # Gemm: Y = alpha * A' B' + beta * C
        alpha, beta = float(a.get("alpha", 1.0)), float(a.get("beta", 1.0))
        transA, transB = int(a.get("transA", 0)), int(a.get("transB", 0))
        if len(S) != 2:
            raise self._node_error(node, pos, f"Gemm needs a 2-D tensor, got shape {S}")
        if k_data == 0:
            M, K = (S[1], S[0]) if transA else S
            Bp = Wc.T if transB else Wc
            if M != 1 or Bp.shape[0] != K:
                raise self._node_error(node, pos, f"Gemm of a tensor of shape {S} (transA={transA}, batch 1) with a "
                                       f"constant of shape {Wc.shape} (transB={transB}) does not fit")
            W = Bp.T
            out = (1, Bp.shape[1])
        else:
            Ap = Wc.T if transA else Wc
            K, N = (S[1], S[0]) if transB else S
            if N != 1 or Ap.shape[1] != K:
                raise self._node_error(node, pos, f"Gemm of a constant of shape {Wc.shape} (transA={transA}) with a "
                                       f"tensor of shape {S} (transB={transB}, batch 1) does not fit")
            W = Ap
            out = (Ap.shape[0], 1)
        if alpha != 1.0:
            W = alpha * np.asarray(W, np.float64)
        b = None
        if len(cvals) > 2 and cvals[2] is not None:
            C = as_float_array(cvals[2], f"node {pos} bias")
            try:
                Cb = np.broadcast_to(C, out)
            except ValueError:
                raise self._node_error(node, pos, f"bias C of shape {C.shape} does not broadcast to {out}") from None
            b = Cb.ravel().copy()
            if beta != 1.0:
                b = beta * b.astype(np.float64)
        return W, b, out

    def _reshape(self, node, pos, S, shape_const, a):
        if shape_const is None:
            raise self._node_error(node, pos, "the target shape must be a constant input")
        shape = [int(v) for v in np.asarray(shape_const).ravel()]
        allowzero = int(a.get("allowzero", 0))
        total = int(np.prod(S))
        new = []
        for i, d in enumerate(shape):
            if d == 0 and not allowzero:
                if i >= len(S):
                    raise self._node_error(node, pos, f"target shape {shape} copies dimension {i} of {S}")
                new.append(S[i])
            else:
                new.append(d)
        if new.count(-1) > 1 or any(d < -1 for d in new):
            raise self._node_error(node, pos, f"invalid target shape {shape}")
        if -1 in new:
            known = int(np.prod([d for d in new if d != -1]))
            if known == 0 or total % known:
                raise self._node_error(node, pos, f"cannot reshape {S} to {shape}")
            new[new.index(-1)] = total // known
        if int(np.prod(new)) != total:
            raise self._node_error(node, pos, f"cannot reshape {S} ({total} values, batch 1) to {shape}")
        return tuple(new)
