"""The one registry type: every registry of the package normalises names the same way, accepts its aliases and
names the accepted entries when a name is unknown."""

from __future__ import annotations

import pytest

from recurjac_scale._registry import Registry
from recurjac_scale.activations import ACTIVATIONS, get_activation
from recurjac_scale.errors import InputError, ModelFormatError, UnsupportedActivationError
from recurjac_scale.jacobian import JACOBIAN_METHODS, get_jacobian_method
from recurjac_scale.layer_bounds import LAYER_BOUND_METHODS
from recurjac_scale.layer_bounds.base import get_layer_bound_method
from recurjac_scale.network.importers import IMPORTERS


def test_registry_normalises_names_and_aliases():
    r = Registry("widget", sep="-")
    r.register("big-one", 1, aliases=("b1",))
    r.add_aliases({"large": "big-one"})
    for name in ("big-one", " BIG_ONE ", "Big-One", "b1", "B1", "large", "big_one"):
        assert r.lookup(name) == 1, name
    assert r.get("nope") is None  # dict.get keeps its meaning
    with pytest.raises(InputError, match=r"unknown widget 'nope'; accepted: big-one"):
        r.lookup("nope")
    u = Registry("thing", sep="_", error=ModelFormatError)
    u.register("two-words", 2)
    assert "two_words" in u and u.lookup("Two-Words") == 2
    with pytest.raises(ModelFormatError):
        u.lookup("three")
    with pytest.raises(ValueError):
        Registry("x", sep="/")


@pytest.mark.parametrize(
    "lookup, names, expected",
    [
        (get_jacobian_method, ["b", "RecurJac", "recurjac_b", "recurjac-backward"], "recurjac-b"),
        (get_jacobian_method, ["F0", "recurjac_forward"], "recurjac-f0"),
        (get_jacobian_method, ["f1", "RECURJAC_F1"], "recurjac-f1"),
        (get_jacobian_method, ["fast-lip", "FastLip"], "fastlip"),
        (lambda n: get_activation(n).name, ["LeakyReLU", "leaky-relu", "leaky"], "leaky_relu"),
        (lambda n: get_activation(n).name, ["hard-sigmoid", "HardSigmoid"], "hard_sigmoid"),
        (lambda n: get_activation(n).name, ["linear", "None"], "identity"),
    ],
)
def test_every_registry_accepts_its_aliases(lookup, names, expected):
    for n in names:
        got = lookup(n)
        assert (got if isinstance(got, str) else got.name) == expected, n


def test_every_registry_is_a_registry_and_names_the_accepted_entries():
    for reg in (ACTIVATIONS, JACOBIAN_METHODS, LAYER_BOUND_METHODS, IMPORTERS):
        assert isinstance(reg, Registry) and len(reg) > 0
        for name in reg:
            assert reg.lookup(name) is reg[name]
    with pytest.raises(InputError, match="accepted: fastlip, linear-jacobian, recurjac-b"):
        get_jacobian_method("recurjac-x")
    with pytest.raises(InputError, match="accepted: .*crown"):
        get_layer_bound_method("zonotope")
    assert get_layer_bound_method("CROWN") is LAYER_BOUND_METHODS["crown"]
    with pytest.raises(UnsupportedActivationError, match="unknown activation 'swishy'"):
        get_activation("swishy")
