"""Linear relaxations of every registered activation: a_low z + b_low <= sigma(z) <= a_up z + b_up on [l, u].

Checked on dense grids for intervals of every sign pattern, tiny and huge widths and far saturation, on unbounded
intervals, and (with mpmath) in high precision at the points where a float check could be fooled by rounding.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from recurjac_scale.activations import ACTIVATIONS, LeakyReLU, get_activation

ACTS = [
    ("identity", {}),
    ("relu", {}),
    ("leaky_relu", {"alpha": 0.3}),
    ("leaky_relu", {"alpha": 0.01}),
    ("hard_sigmoid", {}),
    ("hard_sigmoid", {"alpha": 0.3, "beta": 0.1}),
    ("elu", {}),
    ("elu", {"alpha": 0.5}),
    ("softplus", {}),
    ("sigmoid", {}),
    ("tanh", {}),
    ("arctan", {}),
]
IDS = [f"{n}{''.join(f'-{k}{v}' for k, v in p.items())}" for n, p in ACTS]


def test_every_registered_activation_is_covered():
    assert {n for n, _ in ACTS} == set(ACTIVATIONS)


def _intervals():
    """Intervals of every sign pattern (negative, positive, mixed, touching 0), widths from 0 to 1e6, centres
    far in the saturation regions."""
    out = []
    for c in (-1e4, -800.0, -50.0, -12.0, -3.0, -1.0, -0.2, 0.0, 0.2, 1.0, 3.0, 12.0, 50.0, 800.0, 1e4):
        for w in (0.0, 1e-13, 1e-7, 1e-3, 0.1, 0.7, 2.0, 5.0, 13.0, 31.0, 100.0, 1e3, 1e6):
            out += [(c - w / 2, c + w / 2), (c, c + w), (c - w, c)]
    out += [(-1.0, 0.0), (0.0, 1.0), (-5.0, 7.0), (-7.0, 5.0), (-1e-300, 1e-300), (-5.0, 0.0), (0.0, 5.0)]
    lo = np.array([a for a, _ in out])
    hi = np.array([b for _, b in out])
    return lo, hi


def _check_grid(act, lo, hi, a_l, b_l, a_u, b_u, n=1501):
    """Max violation (positive = unsound) of the relaxation on a grid of each interval (incl. ends, 0, kinks)."""
    worst = 0.0
    kinks = [0.0]
    if hasattr(act, "_breaks"):
        kinks += list(act._breaks)
    for i in range(lo.shape[0]):
        l, u = max(lo[i], -1e8), min(hi[i], 1e8)
        z = np.concatenate([np.linspace(l, u, n), [l, u], [k for k in kinks if l <= k <= u]])
        if np.isfinite(lo[i]) and np.isfinite(hi[i]):
            # a geometric grid near each end resolves tiny features of huge intervals
            for e, s in ((l, 1.0), (u, -1.0)):
                z = np.concatenate([z, e + s * np.minimum(np.geomspace(1e-12, max(u - l, 1e-12), 200), u - l)])
        z = z[(z >= lo[i]) & (z <= hi[i])]
        s = act.value(z)
        up = a_u[i] * z + b_u[i]
        low = a_l[i] * z + b_l[i]
        worst = max(worst, float(np.max(s - up)), float(np.max(low - s)))
    return worst


@pytest.mark.parametrize("name,params", ACTS, ids=IDS)
def test_relaxation_encloses_on_dense_grid(name, params):
    act = get_activation(name, **params)
    lo, hi = _intervals()
    a_l, b_l, a_u, b_u = act.relaxation(lo, hi)
    for arr in (a_l, b_l, a_u, b_u):
        assert arr.shape == lo.shape and arr.dtype == np.float64
        assert not np.isnan(arr).any()
    assert np.isfinite(a_l).all() and np.isfinite(a_u).all()
    assert _check_grid(act, lo, hi, a_l, b_l, a_u, b_u) <= 0.0


@pytest.mark.parametrize("name,params", ACTS, ids=IDS)
def test_relaxation_random_intervals(name, params, rng):
    act = get_activation(name, **params)
    c = rng.normal(0, 4, 400) * np.exp(rng.normal(0, 1.5, 400))
    w = np.exp(rng.uniform(-25, 6, 400))
    lo, hi = c - w * rng.random(400), c + w * rng.random(400)
    a_l, b_l, a_u, b_u = act.relaxation(lo, hi)
    assert _check_grid(act, lo, hi, a_l, b_l, a_u, b_u, n=301) <= 0.0


@pytest.mark.parametrize("name,params", ACTS, ids=IDS)
def test_relaxation_unbounded_intervals(name, params):
    act = get_activation(name, **params)
    lo = np.array([-np.inf, -np.inf, -np.inf, -np.inf, -3.0, 0.0, 2.0, -np.inf])
    hi = np.array([np.inf, 0.0, 2.0, -4.0, np.inf, np.inf, np.inf, -1e300])
    a_l, b_l, a_u, b_u = act.relaxation(lo, hi)
    for arr in (a_l, b_l, a_u, b_u):
        assert not np.isnan(arr).any()
    assert np.isfinite(a_l).all() and np.isfinite(a_u).all()
    assert not np.isneginf(b_u).any() and not np.isposinf(b_l).any()
    assert _check_grid(act, lo, hi, a_l, b_l, a_u, b_u) <= 0.0
    # far out along the unbounded directions
    for i in range(lo.shape[0]):
        for z in (-1e12, -1e6, -40.0, 40.0, 1e6, 1e12):
            if lo[i] <= z <= hi[i]:
                s = act.value(np.array([z]))[0]
                with np.errstate(invalid="ignore"):
                    assert a_l[i] * z + b_l[i] <= s <= a_u[i] * z + b_u[i]
    # bounded activations get finite lines everywhere
    if name in ("sigmoid", "tanh", "arctan", "hard_sigmoid"):
        assert np.isfinite(b_l).all() and np.isfinite(b_u).all()


@pytest.mark.parametrize("name", ["sigmoid", "tanh", "arctan", "elu", "softplus"])
def test_relaxation_exact_in_high_precision(name, rng):
    """The float grid can miss a violation of a few ulps: recheck the touching points (ends, 0, the tangent
    point, the grid minimum of the gap) with 50-digit arithmetic."""
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 50
    fns = {
        "sigmoid": lambda z: 1 / (1 + mpmath.exp(-z)),
        "tanh": mpmath.tanh,
        "arctan": mpmath.atan,
        "elu": lambda z: z if z >= 0 else mpmath.expm1(z),
        "softplus": lambda z: mpmath.log1p(mpmath.exp(z)),
    }
    f = fns[name]
    act = get_activation(name)
    lo, hi = _intervals()
    keep = np.isfinite(lo) & (np.abs(lo) < 1e3) & (np.abs(hi) < 1e3)
    lo, hi = lo[keep], hi[keep]
    a_l, b_l, a_u, b_u = act.relaxation(lo, hi)
    for i in range(lo.shape[0]):
        z = np.linspace(lo[i], hi[i], 201)
        s = act.value(z)
        cand = {lo[i], hi[i], 0.5 * (lo[i] + hi[i]), float(z[np.argmin(a_u[i] * z + b_u[i] - s)]),
                float(z[np.argmin(s - a_l[i] * z - b_l[i])])}
        if lo[i] <= 0 <= hi[i]:
            cand.add(0.0)
        for zc in cand:
            zm = mpmath.mpf(zc)
            fz = f(zm)
            assert mpmath.mpf(a_u[i]) * zm + mpmath.mpf(b_u[i]) >= fz, (lo[i], hi[i], zc)
            assert mpmath.mpf(a_l[i]) * zm + mpmath.mpf(b_l[i]) <= fz, (lo[i], hi[i], zc)


@pytest.mark.parametrize("name", ["sigmoid", "tanh", "arctan"])
def test_sigmoid_family_is_tight(name):
    """The certified lines are the CROWN lines up to the rounding allowance: the upper line touches sigma at the
    tangent point / chord ends (gap ~ 1e-12), so the certification costs no tightness."""
    act = get_activation(name)
    lo = np.array([-4.0, 0.5, -2.0, -20.0, -0.3])
    hi = np.array([-0.5, 4.0, 3.0, 25.0, 0.2])
    a_l, b_l, a_u, b_u = act.relaxation(lo, hi)
    for i in range(lo.shape[0]):
        z = np.linspace(lo[i], hi[i], 20001)
        s = act.value(z)
        assert np.min(a_u[i] * z + b_u[i] - s) < 1e-9
        assert np.min(s - a_l[i] * z - b_l[i]) < 1e-9
    # negative interval: upper line is the chord (touches both ends); positive: lower line is the chord
    for i, end_checks in ((0, "up"), (1, "low")):
        for z in (lo[i], hi[i]):
            s = act.value(np.array([z]))[0]
            line = (a_u[i] * z + b_u[i]) if end_checks == "up" else (a_l[i] * z + b_l[i])
            assert abs(line - s) < 1e-12


@pytest.mark.parametrize("name", ["sigmoid", "arctan", "tanh"])
def test_wide_intervals_do_not_cut_through(name):
    """The reference's 10-step bisection cuts through sigmoid/arctan on wide intervals (u - l >~ 12 / 30)."""
    act = get_activation(name)
    lo = -np.linspace(0.5, 60.0, 120)
    hi = np.linspace(60.0, 0.5, 120)
    a_l, b_l, a_u, b_u = act.relaxation(lo, hi)
    assert _check_grid(act, lo, hi, a_l, b_l, a_u, b_u, n=4001) <= 0.0


def test_relu_family_lines():
    relu = get_activation("relu")
    lo, hi = np.array([-1.0, -3.0, 1.0, -2.0]), np.array([3.0, 1.0, 2.0, -1.0])
    a_l, b_l, a_u, b_u = relu.relaxation(lo, hi)
    # chord above, exact on stable neurons, adaptive slope below
    np.testing.assert_allclose(a_u, [0.75, 0.25, 1.0, 0.0])
    np.testing.assert_allclose(b_u, [0.75, 0.75, 0.0, 0.0], atol=1e-12)
    assert b_u[0] >= 0.75 and b_u[1] >= 0.75
    np.testing.assert_array_equal(a_l, [1.0, 0.0, 1.0, 0.0])
    np.testing.assert_array_equal(b_l, 0.0)
    a_l, *_ = relu.relaxation(lo, hi, lower_slope="parallel")
    np.testing.assert_allclose(a_l, [0.75, 0.25, 1.0, 0.0])
    leaky = get_activation("leaky_relu", alpha=0.3)
    a_l, b_l, a_u, b_u = leaky.relaxation(lo, hi)
    np.testing.assert_array_equal(a_l, [1.0, 0.3, 1.0, 0.3])
    with pytest.raises(ValueError):
        relu.relaxation(lo, hi, lower_slope="steep")


def test_hard_sigmoid_is_exact_on_pieces():
    hs = get_activation("hard_sigmoid")  # breaks at -2.5 and 2.5
    lo, hi = np.array([-9.0, -2.0, 3.0]), np.array([-3.0, 2.0, 9.0])
    a_l, b_l, a_u, b_u = hs.relaxation(lo, hi)
    np.testing.assert_allclose(a_l, [0.0, 0.2, 0.0])
    np.testing.assert_allclose(a_u, [0.0, 0.2, 0.0])
    np.testing.assert_allclose(b_u, [0.0, 0.5, 1.0], atol=1e-12)
    np.testing.assert_allclose(b_l, [0.0, 0.5, 1.0], atol=1e-12)


def test_relaxation_accepts_scalars_and_lists():
    for name, params in ACTS:
        act = get_activation(name, **params)
        out = act.relaxation([-1.0, 0.5], [1.0, 2.0])
        assert all(o.shape == (2,) for o in out)
        out = act.relaxation(-1.0, 1.0)
        assert all(o.shape == (1,) for o in out)


def test_relaxation_rejects_bad_intervals():
    from recurjac_scale.errors import InputError, NonFiniteError, ShapeMismatchError

    act = get_activation("tanh")
    with pytest.raises(InputError):
        act.relaxation(np.array([1.0]), np.array([0.0]))
    with pytest.raises(NonFiniteError):
        act.relaxation(np.array([np.nan]), np.array([0.0]))
    with pytest.raises(ShapeMismatchError):
        act.relaxation(np.zeros(2), np.zeros(3))
