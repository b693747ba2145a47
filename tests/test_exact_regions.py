"""The exact l-inf local Lipschitz constant by region enumeration (recurjac_scale.exact_regions), checked against
brute force over every activation pattern (tests/test_exact.py's helper: each pattern's closed region tested by an
LP written there), against the activation-pattern MIP, and against a real gradient-norm attack."""

from __future__ import annotations

import math

import numpy as np
import pytest
from test_exact import _brute_force

from recurjac_scale.bab import gradient_norm_attack
from recurjac_scale.bab.parts import relu_alphas
from recurjac_scale.errors import InputError, UnsupportedActivationError
from recurjac_scale.exact import exact_lipschitz
from recurjac_scale.exact_regions import exact_lipschitz_regions
from recurjac_scale.layer_bounds import Region
from recurjac_scale.testing import random_network


def _net(widths, act, rng, **kw):
    if act == "leaky_relu":
        kw.setdefault("alpha", 0.1)
    return random_network(widths, act, rng=rng, **kw).with_outputs(np.eye(widths[-1])[:1])


def _check_point(net, res, lo, hi):
    """The reported point lies in the box and the network's exact gradient there has norm ``attained``."""
    assert np.all(res.x >= lo) and np.all(res.x <= hi)
    g = net.jacobian(res.x[None])[0, 0]
    assert float(np.abs(g).sum()) == pytest.approx(res.attained, rel=1e-12)


BRUTE = [
    ((3, 6, 2), "relu", 1.0),
    ((3, 5, 2), "leaky_relu", 1.0),
    ((4, 7, 3), "relu", 0.3),
    ((3, 8, 2), "relu", 0.5),
    ((3, 3, 3, 2), "relu", 1.0),
    ((3, 4, 3, 2), "leaky_relu", 0.5),
    pytest.param((3, 4, 4, 2), "relu", 0.4, marks=pytest.mark.slow),
    pytest.param((4, 7, 3), "leaky_relu", 0.4, marks=pytest.mark.slow),
]


@pytest.mark.parametrize("widths,act,eps", BRUTE)
def test_regions_equal_brute_force(widths, act, eps, rng):
    net = _net(widths, act, rng)
    x0 = rng.uniform(0, 1, widths[0])
    ref = _brute_force(net, x0, eps, math.inf)
    res = exact_lipschitz_regions(net, x0, eps)
    assert res.optimal and res.status == "optimal"
    assert res.value == pytest.approx(ref, rel=1e-9)
    assert res.upper == res.value
    assert res.validated and res.attained == pytest.approx(ref, rel=1e-9)
    _check_point(net, res, x0 - eps, x0 + eps)
    assert res.n_unstable >= 2
    # without the exact enumeration inside the node bounds (intervals only): the same value
    plain = exact_lipschitz_regions(net, x0, eps, enumerate_neurons=0)
    assert plain.value == pytest.approx(ref, rel=1e-9)


@pytest.mark.parametrize("stable_layer", [2, 1])
def test_regions_with_a_stable_hidden_layer_equal_brute_force(stable_layer, rng):
    """A hidden layer with no unstable neuron (large biases): the search passes through it."""
    net = random_network((3, 3, 3, 3, 2), "relu", rng=rng).with_outputs(np.eye(2)[:1])
    bs = [np.asarray(b, float).copy() for b in net.biases]
    bs[stable_layer] += 50.0
    bs[stable_layer + 1] -= 50.0 * np.asarray(net.weights[stable_layer + 1], float).sum(axis=1)
    net = net._replace(biases=tuple(bs))
    x0 = rng.uniform(0, 1, 3)
    res = exact_lipschitz_regions(net, x0, 1.0)
    assert res.optimal and res.value == pytest.approx(_brute_force(net, x0, 1.0, math.inf), rel=1e-9)


@pytest.mark.parametrize("widths,act,eps", [
    ((5, 8, 8, 2), "relu", 0.3),
    ((4, 6, 6, 3), "leaky_relu", 0.5),
    ((5, 6, 6, 6, 2), "relu", 0.2),
    pytest.param((8, 12, 12, 2), "relu", 0.3, marks=pytest.mark.slow),
])
def test_regions_equal_mip(widths, act, eps, rng):
    net = _net(widths, act, rng)
    x0 = rng.uniform(0, 1, widths[0])
    mip = exact_lipschitz(net, x0, eps, math.inf)
    assert mip.optimal and mip.validated
    res = exact_lipschitz_regions(net, x0, eps)
    assert res.optimal and res.validated
    assert res.value == pytest.approx(mip.value, rel=1e-7)
    assert res.n_unstable >= 4


def test_regions_against_a_real_attack_and_time_limit(rng):
    """The exact value is >= every gradient norm a real attack attains; a run stopped at once brackets the
    MIP's exact value between its attained value and its upper bound."""
    net = _net((6, 8, 8, 2), "relu", rng)
    x0 = rng.uniform(0, 1, 6)
    eps = 0.4
    region = Region.of(net, x0, eps, math.inf)
    seen, x_att = gradient_norm_attack(net, region, 1.0, alphas=relu_alphas(net), restarts=8, steps=40,
                                       rng=np.random.default_rng(1))
    res = exact_lipschitz_regions(net, x0, eps)
    assert res.optimal and res.validated
    assert res.value >= seen * (1 - 1e-12)
    _check_point(net, res, x0 - eps, x0 + eps)
    # seeded with the attack's point: same value
    seeded = exact_lipschitz_regions(net, x0, eps, lower_bound_point=x_att)
    assert seeded.value == pytest.approx(res.value, rel=1e-12)
    mip = exact_lipschitz(net, x0, eps, math.inf)
    assert mip.value == pytest.approx(res.value, rel=1e-7)
    stopped = exact_lipschitz_regions(net, x0, eps, time_limit=0.0)
    assert stopped.status == "time_limit" and not stopped.optimal
    assert stopped.attained <= mip.value * (1 + 1e-9)
    assert stopped.upper >= mip.value * (1 - 1e-9)
    assert stopped.upper > stopped.attained
    _check_point(net, stopped, x0 - eps, x0 + eps)


def test_regions_margin_output_and_domain():
    """A margin f_0 - f_2 over a box cut by the input domain [0, 1] (a case where the cut lowers the constant):
    the MIP's value, the point inside the cut box; without the domain, the MIP's larger value."""
    net = random_network((3, 6, 6, 3), "relu", rng=np.random.default_rng(2), domain=(0.0, 1.0))
    free = random_network((3, 6, 6, 3), "relu", rng=np.random.default_rng(2))
    x0 = np.array([0.05, 0.5, 0.97])
    res = exact_lipschitz_regions(net, x0, 0.3, "inf", outputs=(0, 2))
    mip = exact_lipschitz(net, x0, 0.3, "inf", outputs=(0, 2))
    assert res.optimal and res.validated
    assert res.value == pytest.approx(mip.value, rel=1e-7)
    lo, hi = np.maximum(x0 - 0.3, 0), np.minimum(x0 + 0.3, 1)
    assert np.all(res.x >= lo) and np.all(res.x <= hi)
    d = res.to_dict()
    assert d["method"] == "regions" and d["value"] == res.value and d["status"] == "optimal"
    res_free = exact_lipschitz_regions(free, x0, 0.3, "inf", outputs=(0, 2))
    mip_free = exact_lipschitz(free, x0, 0.3, "inf", outputs=(0, 2))
    assert mip_free.value > 1.2 * mip.value
    assert res_free.value == pytest.approx(mip_free.value, rel=1e-7)


def test_exact_lipschitz_dispatches_to_regions(rng):
    net = _net((3, 6, 2), "relu", rng)
    x0 = rng.uniform(0, 1, 3)
    res = exact_lipschitz(net, x0, 1.0, "inf", method="regions")
    assert res.value == pytest.approx(_brute_force(net, x0, 1.0, math.inf), rel=1e-9)
    with pytest.raises(InputError, match="method 'simplex'.*mip, regions"):
        exact_lipschitz(net, x0, 1.0, "inf", method="simplex")


def test_regions_bad_input(rng):
    net = random_network((3, 4, 2), "relu", rng=rng)
    x0 = np.zeros(3)
    with pytest.raises(InputError, match="p=inf only, got p=1"):
        exact_lipschitz_regions(net, x0, 0.1, 1)
    with pytest.raises(InputError, match="p=inf only, got p=2"):
        exact_lipschitz_regions(net, x0, 0.1, 2)
    with pytest.raises(InputError, match="one output row"):
        exact_lipschitz_regions(net, x0, 0.1, "inf", outputs="all")
    with pytest.raises(InputError, match="bounded region"):
        exact_lipschitz_regions(net, x0, math.inf, "inf")
    with pytest.raises(UnsupportedActivationError, match="relu and leaky_relu"):
        exact_lipschitz_regions(random_network((3, 4, 2), "tanh", rng=rng), x0, 0.1, "inf")
    with pytest.raises(InputError, match=r"enumerate_neurons must be an integer in \[0, 16\], got 40"):
        exact_lipschitz_regions(net, x0, 0.1, "inf", enumerate_neurons=40)


@pytest.mark.slow
@pytest.mark.parametrize("eps,expected", [(0.05, 11.7342), (0.1, 13.8604)])
def test_regions_known_values_16_16_16_10(eps, expected):
    """The issue's 16-16-16-10 recipe (seed 0, c = 1): the MIP's exact values (benchmarks/results/bab.md)."""
    rng = np.random.default_rng(0)
    net = random_network((16, 16, 16, 10), rng=rng)
    x0 = rng.uniform(0.0, 1.0, 16)
    res = exact_lipschitz_regions(net, x0, eps, "inf", outputs=1)
    assert res.optimal and res.validated
    assert res.value == pytest.approx(expected, abs=5e-5)


def test_cli_bab_exact_regions(tmp_path, rng, capsys):
    """``recurjac-scale bab --exact --exact-method regions``: the MIP's value in the JSON, between bab's
    brackets; p = 1 is refused with one line before any search."""
    import json

    from recurjac_scale.cli import main
    from recurjac_scale.network.store import save_network

    net = random_network((3, 5, 4, 3), "relu", rng=rng)
    model = tmp_path / "m.zarr"
    save_network(net, model)
    x0 = rng.uniform(0, 1, 3)
    x = tmp_path / "x.npy"
    np.save(x, x0)
    out = tmp_path / "r.json"
    args = ["bab", str(model), "--input", str(x), "--eps", "0.3", "--outputs", "1", "--time-budget", "2",
            "--gap", "0", "--scheduler", "synchronous", "--exact", "--exact-method", "regions"]
    assert main(args + ["--json", str(out)]) == 0
    d = json.loads(out.read_text())
    mip = exact_lipschitz(net, x0, 0.3, "inf", outputs=1)
    assert d["exact"]["method"] == "regions" and d["exact"]["optimal"]
    assert d["exact"]["value"] == pytest.approx(mip.value, rel=1e-7)
    assert d["lower"] <= d["exact"]["value"] * (1 + 1e-12) <= d["upper"] * (1 + 1e-12)
    assert "regions optimal" in capsys.readouterr().out
    assert main(args + ["--norm", "1"]) == 1
    err = capsys.readouterr().err.strip()
    assert "--exact-method regions supports --norm inf only, got --norm 1" in err and len(err.splitlines()) == 1
