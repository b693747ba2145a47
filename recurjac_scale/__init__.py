"""recurjac_scale: certified bounds on a neural network's input Jacobian (RecurJac, Zhang et al. AAAI 2019),
Lipschitz constants and robustness radii, computed blockwise on zarr + Dask + Numba.

Importing the package does no work: no numba compilation, no dask client, no file access.
"""

from ._version import __version__
from .activations import ACTIVATIONS, Activation, get_activation, register_activation
from .bab import BabResult, bab_lipschitz
from .engine import plan_jacobian, run_plan
from .errors import RecurJacError
from .exact import ExactResult, exact_lipschitz
from .jacobian import JACOBIAN_METHODS, JacobianBounds, jacobian_bounds
from .lipschitz import LipschitzResult, lipschitz, naive_constant
from .layer_bounds import LAYER_BOUND_METHODS, LayerBounds, layer_bounds
from .network import InputSpec, Network


__all__ = [
    "ACTIVATIONS",
    "Activation",
    "BabResult",
    "ExactResult",
    "InputSpec",
    "JACOBIAN_METHODS",
    "JacobianBounds",
    "LAYER_BOUND_METHODS",
    "LayerBounds",
    "LipschitzResult",
    "Network",
    "RecurJacError",
    "__version__",
    "bab_lipschitz",
    "exact_lipschitz",
    "get_activation",
    "jacobian_bounds",
    "layer_bounds",
    "lipschitz",
    "naive_constant",
    "plan_jacobian",
    "run_plan",
    "register_activation",
]
