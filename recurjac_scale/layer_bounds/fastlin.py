"""Fast-Lin (Weng et al. 2018): back-substitution with parallel linear bounds, for ReLU and leaky-ReLU networks."""

from __future__ import annotations

import numpy as np

from ..activations import Activation, LeakyReLU
from ..errors import InputError
from ..network.model import Network
from .backsub import backsubstitute
from .base import Region, register_layer_bound_method

__all__ = ["fastlin", "fastlin_relaxation"]


def fastlin_relaxation(act: Activation, lower: np.ndarray, upper: np.ndarray):
    """Fast-Lin's relaxation: for an unstable ReLU / leaky-ReLU neuron, upper chord and a lower line of the same
    slope through the origin (Weng et al. 2018, Eq. 5); stable neurons and identity layers are exact."""
    if isinstance(act, LeakyReLU):
        return act.relaxation(lower, upper, lower_slope="parallel")
    if act.is_identity:
        return act.relaxation(lower, upper)
    raise InputError(
        f"fastlin supports only relu and leaky_relu hidden layers, got {act}; use method 'crown' (general "
        "activations) or 'ibp'"
    )


@register_layer_bound_method("fastlin")
def fastlin(
    network: Network,
    region: Region,
    *,
    block_rows: int | None = None,
    dtype=np.float64,
    intersect_ibp: bool = True,
    fused: bool = True,
    clip=None,
    lowrank: bool | None = None,
) -> tuple[list, list]:
    """Fast-Lin bounds of every pre-activation over ``B_p[x0, eps] ∩ D`` (Weng et al. 2018, Theorem 3.5).

    Same back-substitution engine as :func:`~recurjac_scale.layer_bounds.crown.crown` (block rows, dtype,
    certified rounding); only the relaxation differs.  Fast-Lin's lines are parallel, so with finite bounds one
    back-substitution chain serves both the upper and the lower bound (``fused``, see
    :mod:`recurjac_scale.layer_bounds.fused`); ``fused=False`` runs the plain numpy chains (same bounds up to the
    order of summation, twice the GEMMs).  ``clip``: known bounds of the layers over the region (see
    :func:`~recurjac_scale.layer_bounds.backsub.backsubstitute`).

    Raises
    ------
    InputError
        When a hidden layer has an activation other than relu, leaky_relu or identity (the output layer's
        activation is never relaxed).
    """
    for act in network.layer_activations[:-1]:
        fastlin_relaxation(act, np.zeros(1), np.zeros(1))  # raises for unsupported activations
    return backsubstitute(
        network, region, fastlin_relaxation, block_rows=block_rows, dtype=dtype, intersect_ibp=intersect_ibp,
        fused=fused, clip=clip, lowrank=lowrank,
    )
