"""Certified element-wise bounds of a network's input Jacobian (Zhang, Zhang & Hsieh, AAAI 2019).

Methods (one registry, :data:`JACOBIAN_METHODS`): ``fastlip`` (Weng et al. 2018a), ``recurjac-b`` (Algorithm 1,
backward), ``recurjac-f0`` (forward on the transposed chain), ``recurjac-f1`` (forward from ``h(1)`` plus one
interval product), ``linear-jacobian`` (linear bound propagation through the gradient graph, :mod:`.linear`,
:mod:`.linear_method`; blockwise in the engine through :mod:`.linear_blocks`).  Entry point: :func:`jacobian_bounds`.  Every runner (the in-memory driver, the scale engine)
uses a method only through :class:`JacobianMethod` (chain, priors, step, finish, cost model: :mod:`.methods`);
:func:`prepare` computes what every method starts from (:mod:`.prepare`).  The block interface is documented in
:mod:`recurjac_scale.jacobian.chain`.
"""

from .api import default_layer_bound_method, derivative_bounds_for, jacobian_bounds, output_matrix
from .cost import ChainCost
from .chain import DEFAULT_PANEL, STATE_KEYS, Chain, top_state
from .driver import auto_blocks, iter_blocks, run_chain
from .fastlip import fastlip_step
from .prepare import Job, prepare
from .methods import JACOBIAN_METHODS, JacobianMethod, finish_chain, get_jacobian_method, register_jacobian_method
from .recurjac import recurjac_step
from . import linear_method  # noqa: F401  (registers linear-jacobian)
from .result import JacobianBounds

__all__ = [
    "Chain",
    "ChainCost",
    "DEFAULT_PANEL",
    "JACOBIAN_METHODS",
    "JacobianBounds",
    "JacobianMethod",
    "Job",
    "STATE_KEYS",
    "auto_blocks",
    "default_layer_bound_method",
    "derivative_bounds_for",
    "fastlip_step",
    "finish_chain",
    "get_jacobian_method",
    "iter_blocks",
    "jacobian_bounds",
    "output_matrix",
    "prepare",
    "recurjac_step",
    "register_jacobian_method",
    "run_chain",
    "top_state",
]
