"""Element-wise activation functions, as data.

Each activation is one object with its value, its derivative, certified bounds of its derivative on an interval
(Zhang et al. 2019, Eq. 6-8) and linear relaxations (for the CROWN layer bounds).  They live in one registry,
:data:`ACTIVATIONS`; :func:`get_activation` builds one from a name and parameters.

Every registered activation satisfies Assumption 2 of the paper: ``0 <= sigma'(z) <= C`` wherever the derivative
exists.  Activations whose derivative can be negative (GELU, SiLU/swish, Mish, sin, ...) are rejected with an
error that cites the assumption: RecurJac's bounds are not valid for them.

Conventions
-----------
At a kink (ReLU at 0, hard-sigmoid at its break points) :meth:`Activation.derivative` returns the right
derivative; :meth:`Activation.derivative_bounds` contains ``sigma'(z)`` (the right derivative) at every point of the
interval, and both one-sided derivatives at kinks strictly inside it.  At a kink that is exactly an end point
(ReLU on ``[0, u]``) it follows the paper's Eq. 7-8 and holds the derivative of the side inside the interval.
"""

from __future__ import annotations

from .._registry import Registry
from ..errors import UnsupportedActivationError
from .base import Activation
from .piecewise import HardSigmoid, Identity, LeakyReLU, ReLU  # noqa: F401 (re-exported)
from .smooth import ELU, Arctan, Sigmoid, Softplus, Tanh  # noqa: F401 (re-exported)

__all__ = [
    "Activation",
    "ACTIVATIONS",
    "REJECTED_ACTIVATIONS",
    "register_activation",
    "get_activation",
    "activation_from_spec",
]


ACTIVATIONS: Registry = Registry("activation", sep="_", error=UnsupportedActivationError)
"""Registry: name -> activation class.  Extend with :func:`register_activation`."""
ACTIVATIONS.add_aliases(
    {"linear": "identity", "none": "identity", "leakyrelu": "leaky_relu", "leaky": "leaky_relu", "atan": "arctan",
     "hardsigmoid": "hard_sigmoid"}
)

REJECTED_ACTIVATIONS: dict[str, str] = {
    "gelu": "its derivative is negative for z < -0.75",
    "silu": "its derivative is negative for z < -1.28",
    "swish": "its derivative is negative for z < -1.28",
    "mish": "its derivative is negative for z < -1.19",
    "sin": "its derivative cos(z) is negative on half of the real line",
    "cos": "its derivative -sin(z) is negative on half of the real line",
}
"""Known activations that are refused, with the reason (Assumption 2 of Zhang et al. 2019: 0 <= sigma' <= C)."""


def register_activation(cls: type[Activation]) -> type[Activation]:
    """Add an :class:`Activation` subclass to :data:`ACTIVATIONS` under ``cls.name``.

    The class must guarantee ``0 <= sigma' <= C`` (Assumption 2 of Zhang et al. 2019) and certified
    ``derivative_bounds``; every registered activation is exercised by the test suite's registry tests.
    """
    if not cls.name:
        raise ValueError("an activation class needs a non-empty name")
    return ACTIVATIONS.register(cls.name, cls)


for _cls in (Identity, ReLU, LeakyReLU, HardSigmoid, ELU, Softplus, Sigmoid, Tanh, Arctan):
    register_activation(_cls)


def get_activation(name: str | Activation | None, **params) -> Activation:
    """Build a registered activation from its name and parameters.

    Parameters
    ----------
    name : str, Activation or None
        Registry name (case-insensitive; aliases ``linear``, ``leaky``, ``atan``, ... accepted).  ``None`` means
        the identity.  An :class:`Activation` instance is returned unchanged.
    **params
        Parameters of the activation, e.g. ``alpha`` for ``leaky_relu``.

    Raises
    ------
    UnsupportedActivationError
        For an unknown name, a name in :data:`REJECTED_ACTIVATIONS` (derivative can be negative, which breaks
        Assumption 2 of Zhang et al. 2019), or parameters out of range.
    """
    if isinstance(name, Activation):
        return name
    if name is None:
        return Identity()
    key = ACTIVATIONS.resolve(name)
    if key in REJECTED_ACTIVATIONS:
        raise UnsupportedActivationError(
            f"activation {name!r} is not supported: {REJECTED_ACTIVATIONS[key]}, which breaks Assumption 2 of "
            f"Zhang et al. 2019 (0 <= sigma' <= C); supported: {', '.join(sorted(ACTIVATIONS))}"
        )
    if key not in ACTIVATIONS:
        raise UnsupportedActivationError(
            f"unknown activation {name!r}; supported: {', '.join(sorted(ACTIVATIONS))} (activations whose "
            "derivative can be negative are refused by Assumption 2 of Zhang et al. 2019)"
        )
    try:
        return ACTIVATIONS[key](**params)
    except TypeError as exc:
        raise UnsupportedActivationError(f"bad parameters {params!r} for activation {key!r}: {exc}") from None


def activation_from_spec(spec: dict | str | None) -> Activation:
    """Inverse of :meth:`Activation.to_spec`: ``{"name": "leaky_relu", "alpha": 0.3}`` -> activation."""
    if spec is None or isinstance(spec, str):
        return get_activation(spec)
    spec = dict(spec)
    name = spec.pop("name", None)
    return get_activation(name, **spec)
