"""Network, InputSpec and the activation registry: the float64 ground truth every later test compares with.

The analytic Jacobian is checked against central finite differences for every registered activation (hidden and
output), the derivative bounds against sampled derivatives, and the transformations (normalisation folding, output
selection) against the network they claim to compute.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from recurjac_scale.activations import (
    ACTIVATIONS,
    REJECTED_ACTIVATIONS,
    activation_from_spec,
    get_activation,
)
from recurjac_scale.errors import (
    InputError,
    NonFiniteError,
    RecurJacError,
    ShapeMismatchError,
    UnsupportedActivationError,
)
from recurjac_scale.network.model import InputSpec, Network

# Parameters other than the defaults, to check that parameters are used and round-trip.
PARAMS = {"leaky_relu": {"alpha": 0.2}, "elu": {"alpha": 0.7}, "hard_sigmoid": {"alpha": 0.3, "beta": 0.4}}


def _kinks(act) -> list[float]:
    """Points where the activation is not differentiable (finite differences are invalid near them)."""
    name = act.name
    if name in ("relu", "leaky_relu", "elu"):
        return [0.0]
    if name == "hard_sigmoid":
        return [-act.beta / act.alpha, (1.0 - act.beta) / act.alpha]
    return []


def _random_net(rng, widths, act, out=None, scale=1.0):
    ws = [scale * rng.standard_normal((widths[k + 1], widths[k])) / np.sqrt(widths[k]) for k in range(len(widths) - 1)]
    bs = [0.3 * rng.standard_normal(widths[k + 1]) for k in range(len(widths) - 1)]
    return Network(ws, bs, [act] * (len(widths) - 2), output_activation=out)


def _manual_forward(net, x):
    h = np.asarray(x, dtype=np.float64)
    for w, b, a in zip(net.weights, net.biases, net.layer_activations):
        h = a.value(h @ np.asarray(w, dtype=np.float64).T + b)
    return h


def _fd_jacobian(net, x, h=1e-6):
    n0 = x.size
    J = np.empty((net.n_outputs, n0))
    for i in range(n0):
        e = np.zeros(n0)
        e[i] = h
        J[:, i] = (net.forward(x + e) - net.forward(x - e)) / (2 * h)
    return J


def _far_from_kinks(net, x, margin=1e-3) -> bool:
    for z, act in zip(net.pre_activations(x), net.layer_activations):
        for k in _kinks(act):
            if np.min(np.abs(z - k)) < margin:
                return False
    return True


ALL = sorted(ACTIVATIONS)


# -- activations ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL)
def test_activation_spec_round_trip(name):
    act = get_activation(name, **PARAMS.get(name, {}))
    spec = act.to_spec()
    json.dumps(spec)
    again = activation_from_spec(spec)
    assert again == act and again.to_spec() == spec
    assert activation_from_spec(json.loads(json.dumps(spec))) == act


@pytest.mark.parametrize("name", ALL)
def test_activation_derivative_matches_value(name, rng):
    act = get_activation(name, **PARAMS.get(name, {}))
    z = rng.uniform(-6, 6, size=2000)
    z = z[np.all([np.abs(z - k) > 1e-4 for k in _kinks(act)] or [np.ones_like(z, bool)], axis=0)]
    h = 1e-6
    fd = (act.value(z + h) - act.value(z - h)) / (2 * h)
    np.testing.assert_allclose(act.derivative(z), fd, rtol=1e-6, atol=1e-8)
    lo, hi = act.derivative_range
    d = act.derivative(z)
    assert 0.0 <= lo and (d >= lo - 1e-15).all() and (d <= hi + 1e-15).all()


@pytest.mark.parametrize("name", ALL)
def test_activation_derivative_bounds_contain_sampled_derivatives(name, rng):
    act = get_activation(name, **PARAMS.get(name, {}))
    a = rng.uniform(-6, 6, size=400)
    b = a + rng.exponential(1.5, size=400)
    b[:50] = a[:50]  # degenerate intervals
    a[50:60], b[60:70] = -np.inf, np.inf  # unbounded intervals
    kinks = _kinks(act)
    if kinks:  # intervals starting or ending exactly at a kink
        a[70:80] = kinks[0]
        b[70:80] = np.maximum(b[70:80], a[70:80])
        b[80:90] = kinks[-1]
        a[80:90] = np.minimum(a[80:90], b[80:90])
    assert (a <= b).all()
    dl, du = act.derivative_bounds(a, b)
    assert dl.shape == a.shape and du.shape == a.shape
    assert (dl >= 0).all() and (dl <= du).all()
    for t in np.linspace(0.0, 1.0, 41):
        lo_f, hi_f = np.nan_to_num(a, neginf=-1e6), np.nan_to_num(b, posinf=1e6)
        z = np.clip(lo_f + t * (hi_f - lo_f), lo_f, hi_f)  # clip: the sum can round past an endpoint
        d = act.derivative(z)
        assert (dl <= d).all() and (d <= du).all(), (name, t)
    # Both one-sided derivatives at a kink strictly inside the interval.  (At an end point only the derivative
    # from inside the interval matters: on [0, u] a ReLU is the identity, so [1, 1] is a valid bound there.)
    for k in kinks:
        inside = (a < k) & (k < b)
        left = act.derivative(np.full(a.shape, np.nextafter(k, -np.inf)))
        right = act.derivative(np.full(a.shape, k))
        assert (dl[inside] <= np.minimum(left, right)[inside]).all()
        assert (np.maximum(left, right)[inside] <= du[inside]).all()


@pytest.mark.parametrize("name", sorted(REJECTED_ACTIVATIONS))
def test_rejected_activations_cite_assumption_2(name):
    with pytest.raises(UnsupportedActivationError, match="Assumption 2"):
        get_activation(name)
    with pytest.raises(UnsupportedActivationError, match="Assumption 2"):
        Network([np.eye(2), np.eye(2)], [np.zeros(2)] * 2, [name])


@pytest.mark.parametrize(
    "name, params", [("leaky_relu", {"alpha": -0.1}), ("leaky_relu", {"alpha": 1.5}), ("elu", {"alpha": 2.0}),
                     ("hard_sigmoid", {"alpha": -1.0}), ("relu", {"alpha": 0.1}), ("tanh", {"gain": 2.0}),
                     ("no_such_thing", {})],
)
def test_bad_activation_parameters(name, params):
    with pytest.raises(UnsupportedActivationError):
        get_activation(name, **params)


# -- InputSpec -------------------------------------------------------------------------------------------------


def test_input_spec_round_trip(rng):
    lo = rng.uniform(-1, 0, size=12)
    specs = [
        InputSpec(shape=(12,)),
        InputSpec(shape=(3, 2, 2), layout="CHW", domain_lower=0.0, domain_upper=1.0, mean=[0.1, 0.2, 0.3], std=[1, 2, 3]),
        InputSpec(shape=(2, 2, 3), layout="HWC", domain_lower=lo, domain_upper=lo + 1.0, mean=0.5, std=0.25),
    ]
    for s in specs:
        d = json.loads(json.dumps(s.to_dict()))
        back = InputSpec.from_dict(d)
        assert back.shape == s.shape and back.layout == s.layout and back.size == 12
        for attr in ("domain_lower", "domain_upper", "mean", "std"):
            a, b = getattr(s, attr), getattr(back, attr)
            assert (a is None and b is None) or np.array_equal(a, b)


def test_input_spec_check(rng):
    spec = InputSpec(shape=(1, 2, 3), domain_lower=0.0, domain_upper=1.0)
    x = rng.uniform(0, 1, size=(4, 6))
    assert spec.check(x).shape == (4, 6)
    assert spec.check(x[0]).shape == (1, 6)
    assert spec.check(x.reshape(4, 1, 2, 3)).shape == (4, 6)
    assert spec.check(x[0].reshape(1, 2, 3)).shape == (1, 6)
    with pytest.raises(ShapeMismatchError, match="does not match"):
        spec.check(np.zeros((4, 5)))
    bad = x.copy()
    bad[2, 1] = np.nan
    with pytest.raises(NonFiniteError):
        spec.check(bad)
    out = x.copy()
    out[3, 4] = 1.5
    with pytest.raises(InputError, match="input 3 coordinate 4"):
        spec.check(out)
    assert spec.check(out, atol=0.6).shape == (4, 6)


@pytest.mark.parametrize(
    "kwargs, exc",
    [(dict(shape=()), ShapeMismatchError), (dict(shape=(0, 3)), ShapeMismatchError),
     (dict(shape=(3,), domain_lower=0.0), InputError), (dict(shape=(3,), domain_lower=1.0, domain_upper=0.0), InputError),
     (dict(shape=(3,), domain_lower=[0, np.nan, 0], domain_upper=1.0), InputError)],
)
def test_input_spec_invalid(kwargs, exc):
    with pytest.raises(exc):
        InputSpec(**kwargs)


# -- Network: construction errors ------------------------------------------------------------------------------


def test_network_construction_errors(rng):
    w0, w1 = rng.standard_normal((4, 3)), rng.standard_normal((2, 4))
    b0, b1 = np.zeros(4), np.zeros(2)
    with pytest.raises(ShapeMismatchError, match="at least one"):
        Network([], [], [])
    with pytest.raises(ShapeMismatchError, match="bias vectors"):
        Network([w0, w1], [b0], ["relu"])
    with pytest.raises(ShapeMismatchError, match="hidden activations"):
        Network([w0, w1], [b0, b1], [])
    with pytest.raises(ShapeMismatchError, match="expects 5 inputs"):
        Network([w0, rng.standard_normal((2, 5))], [b0, b1], ["relu"])
    with pytest.raises(ShapeMismatchError, match="bias of shape"):
        Network([w0, w1], [b0, np.zeros(3)], ["relu"])
    with pytest.raises(ShapeMismatchError, match="2-D"):
        Network([w0[None], w1], [b0, b1], ["relu"])
    with pytest.raises(ShapeMismatchError):
        Network([w0, w1], [b0, b1], ["relu"], input_spec=InputSpec(shape=(5,)))
    nan = w1.copy()
    nan[1, 2] = np.nan
    with pytest.raises(NonFiniteError, match="layer 1 weight"):
        Network([w0, nan], [b0, b1], ["relu"])
    with pytest.raises(NonFiniteError, match="layer 0 bias"):
        Network([w0, w1], [np.array([0, 0, np.inf, 0]), b1], ["relu"])
    net = Network([w0, w1], [b0, b1], ["relu"])
    with pytest.raises(ShapeMismatchError):
        net.forward(np.zeros(4))
    with pytest.raises(ShapeMismatchError):
        net.jacobian(np.zeros((2, 2, 3)))
    assert all(issubclass(e, RecurJacError) and issubclass(e, ValueError)
               for e in (ShapeMismatchError, NonFiniteError, InputError, UnsupportedActivationError))


def test_network_structure(rng):
    net = _random_net(rng, (5, 7, 6, 3), "tanh", out="sigmoid")
    assert net.widths == (5, 7, 6, 3) and net.n_layers == 3 and net.n_inputs == 5 and net.n_outputs == 3
    assert net.n_parameters == 5 * 7 + 7 + 7 * 6 + 6 + 6 * 3 + 3
    assert [a.name for a in net.layer_activations] == ["tanh", "tanh", "sigmoid"]
    d = json.loads(json.dumps(net.describe()))
    assert d["widths"] == [5, 7, 6, 3] and d["output_activation"] == {"name": "sigmoid"}


# -- forward and Jacobian ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("where", ["hidden", "output"])
def test_forward_and_jacobian_vs_finite_differences(name, where, rng):
    act = get_activation(name, **PARAMS.get(name, {}))
    if where == "hidden":
        net = _random_net(rng, (6, 9, 8, 4), act, scale=2.0)
    else:
        net = _random_net(rng, (6, 9, 4), "tanh", out=act, scale=2.0)
    xs = []
    while len(xs) < 3:
        x = rng.uniform(-2, 2, size=6)
        if _far_from_kinks(net, x):
            xs.append(x)
    X = np.stack(xs)
    np.testing.assert_allclose(net.forward(X), _manual_forward(net, X), rtol=1e-13, atol=1e-14)
    J = net.jacobian(X)
    assert J.shape == (3, 4, 6)
    for b, x in enumerate(xs):
        # single and batched evaluations agree (to BLAS rounding: batched products may sum in another order)
        np.testing.assert_allclose(net.jacobian(x), J[b], rtol=1e-13, atol=1e-15)
        np.testing.assert_allclose(net.forward(x), net.forward(X)[b], rtol=1e-13, atol=1e-15)
        np.testing.assert_allclose(J[b], _fd_jacobian(net, x), rtol=1e-5, atol=1e-7)


def test_jacobian_deep_relu_against_masks(rng):
    """For ReLU the exact Jacobian is W_H D_{H-1} W_{H-1} ... D_1 W_1 with 0/1 masks."""
    net = _random_net(rng, (10, 20, 20, 20, 5), "relu")
    x = rng.uniform(-1, 1, size=10)
    zs = net.pre_activations(x)
    J = net.weights[0]
    for k in range(1, net.n_layers):
        J = net.weights[k] @ ((zs[k - 1][0] >= 0)[:, None] * J)
    np.testing.assert_allclose(net.jacobian(x), J, rtol=1e-13, atol=1e-15)


def test_jacobian_right_derivative_at_kinks():
    # z = x exactly, so at x = 0 every ReLU sits on its kink: the right derivative (1) is used.
    net = Network([np.eye(2), np.array([[2.0, -3.0]])], [np.zeros(2), np.zeros(1)], ["relu"])
    assert np.array_equal(net.jacobian(np.zeros(2)), [[2.0, -3.0]])
    leaky = Network([np.eye(2), np.array([[2.0, -3.0]])], [np.zeros(2), np.zeros(1)], [get_activation("leaky_relu", alpha=0.25)])
    assert np.array_equal(leaky.jacobian(np.array([0.0, -1.0])), [[2.0, -0.75]])


def test_lazy_network_evaluates_like_numpy(rng):
    da = pytest.importorskip("dask.array")
    net = _random_net(rng, (7, 11, 5), "sigmoid")
    lazy = Network([da.from_array(w, chunks=3) for w in net.weights], [da.from_array(b, chunks=4) for b in net.biases],
                   net.activations)
    assert lazy.is_lazy and not lazy.materialize().is_lazy
    x = rng.uniform(-1, 1, size=(4, 7))
    assert np.array_equal(lazy.forward(x), net.forward(x))
    assert np.array_equal(lazy.jacobian(x), net.jacobian(x))
    m = lazy.materialize(np.float32)
    assert m.weights[0].dtype == np.float32
    bad = net.weights[1].copy()
    bad[0, 0] = np.inf
    lazy_bad = Network([net.weights[0], da.from_array(bad)], net.biases, net.activations)  # not computed yet
    with pytest.raises(NonFiniteError):
        lazy_bad.validate(lazy=True)


# -- transformations ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape, layout, mean, std",
    [((12,), "flat", 0.5, 0.25), ((3, 2, 2), "CHW", [0.1, 0.5, 0.9], [0.2, 0.3, 0.4]),
     ((2, 2, 3), "HWC", [0.1, 0.5, 0.9], [0.2, 0.3, 0.4]), ((12,), "flat", np.linspace(0, 1, 12), np.linspace(1, 2, 12))],
)
def test_with_normalization(rng, shape, layout, mean, std):
    base = _random_net(rng, (12, 8, 3), "tanh")
    base = Network(base.weights, base.biases, base.activations, input_spec=InputSpec(shape=shape, layout=layout))
    net = base.with_normalization(mean, std)
    # Reference: normalise the raw input explicitly, channel by channel, and run the original network.
    x = rng.uniform(0, 1, size=(5, *shape))
    m = np.asarray(mean, float)
    s = np.asarray(std, float)
    if m.size == 3 and layout == "CHW":
        xn = (x - m[None, :, None, None]) / s[None, :, None, None]
    elif m.size == 3 and layout == "HWC":
        xn = (x - m) / s
    else:
        xn = (x - m.reshape((1, *shape)) if m.size > 1 else x - m) / (s.reshape((1, *shape)) if s.size > 1 else s)
    flat = x.reshape(5, -1)
    np.testing.assert_allclose(net.forward(flat), base.forward(xn.reshape(5, -1)), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(
        net.jacobian(flat[0]), base.jacobian(xn.reshape(5, -1)[0]) / net.input_spec.normalization_vectors()[1][None, :],
        rtol=1e-12, atol=1e-14,
    )
    assert np.array_equal(net.input_spec.mean, np.atleast_1d(m)) and np.array_equal(net.input_spec.std, np.atleast_1d(s))
    assert base.input_spec.mean is None  # the original is untouched
    with pytest.raises(InputError, match="already"):
        net.with_normalization(0.0, 1.0)


def test_with_normalization_errors(rng):
    net = _random_net(rng, (12, 4, 2), "relu")
    with pytest.raises(InputError, match="non-zero"):
        net.with_normalization(0.0, 0.0)
    with pytest.raises(InputError):
        net.with_normalization(np.nan, 1.0)
    with pytest.raises(ShapeMismatchError, match="does not broadcast"):
        net.with_normalization([0.0] * 5, 1.0)


def test_with_outputs_linear_output(rng):
    net = _random_net(rng, (6, 10, 4), "elu")
    C = rng.standard_normal((3, 4))
    sel = net.with_outputs(C)
    assert sel.n_layers == net.n_layers and sel.widths == (6, 10, 3)
    x = rng.uniform(-1, 1, size=(5, 6))
    np.testing.assert_allclose(sel.forward(x), net.forward(x) @ C.T, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(sel.jacobian(x), np.einsum("ij,bjk->bik", C, net.jacobian(x)), rtol=1e-12, atol=1e-13)
    # The usual margin selection e_c - e_j.
    margin = np.zeros((3, 4))
    margin[:, 2] = 1.0
    margin[[0, 1, 2], [0, 1, 3]] = -1.0
    f = net.forward(x)
    np.testing.assert_allclose(net.with_outputs(margin).forward(x), f[:, [2]] - f[:, [0, 1, 3]], rtol=1e-12, atol=1e-13)


def test_with_outputs_output_activation(rng):
    net = _random_net(rng, (6, 10, 4), "relu", out="sigmoid")
    C = rng.standard_normal((2, 4))
    sel = net.with_outputs(C)
    assert sel.n_layers == net.n_layers + 1 and sel.output_activation.is_identity
    assert sel.activations[-1].name == "sigmoid"
    x = rng.uniform(-1, 1, size=(5, 6))
    np.testing.assert_allclose(sel.forward(x), net.forward(x) @ C.T, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(sel.jacobian(x), np.einsum("ij,bjk->bik", C, net.jacobian(x)), rtol=1e-12, atol=1e-13)


def test_with_outputs_errors(rng):
    net = _random_net(rng, (6, 10, 4), "relu")
    with pytest.raises(ShapeMismatchError, match="4 columns"):
        net.with_outputs(np.ones((2, 3)))
    with pytest.raises(ShapeMismatchError):
        net.with_outputs(np.ones(4))
    with pytest.raises(NonFiniteError):
        net.with_outputs(np.full((1, 4), np.nan))
