"""Pre-activation bounds ``l <= z(x) <= u`` over ``B_p[x0, eps] ∩ D`` (Zhang et al. 2019, Eq. 3).

One registry of methods (:data:`LAYER_BOUND_METHODS`): ``ibp``, ``fastlin``, ``crown``.  Entry point:
:func:`layer_bounds`.
"""

from .base import (
    LAYER_BOUND_METHODS,
    LayerBounds,
    Region,
    count_unstable,
    dual_norm,
    get_layer_bound_method,
    layer_bounds,
    parse_norm,
    register_layer_bound_method,
)
from . import ibp  # noqa: F401  (registers "ibp")
from . import fastlin  # noqa: F401  (registers "fastlin")
from . import crown  # noqa: F401  (registers "crown")

__all__ = [
    "LAYER_BOUND_METHODS",
    "LayerBounds",
    "Region",
    "count_unstable",
    "dual_norm",
    "parse_norm",
    "get_layer_bound_method",
    "layer_bounds",
    "register_layer_bound_method",
]
