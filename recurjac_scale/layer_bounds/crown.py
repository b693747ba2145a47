"""CROWN (Zhang et al. 2018): back-substituted linear relaxations for general activations."""

from __future__ import annotations

import numpy as np

from ..activations import Activation, LeakyReLU
from ..errors import InputError
from ..network.model import Network
from .backsub import backsubstitute
from .base import Region, register_layer_bound_method
from .fastlin import fastlin_relaxation

__all__ = ["crown", "crown_relaxation"]

RELU_LOWER_SLOPES = ("adaptive", "parallel", "alpha", "one")


def crown_relaxation(act: Activation, lower: np.ndarray, upper: np.ndarray, relu_lower: str = "adaptive"):
    """CROWN's relaxation of one layer: each activation's own :meth:`~recurjac_scale.activations.Activation.
    relaxation`, with the ReLU-family lower slope chosen by ``relu_lower`` (``"adaptive"``: CROWN-Ada)."""
    if isinstance(act, LeakyReLU):
        return act.relaxation(lower, upper, lower_slope=relu_lower)
    return act.relaxation(lower, upper)


@register_layer_bound_method("crown")
def crown(
    network: Network,
    region: Region,
    *,
    block_rows: int | None = None,
    dtype=np.float64,
    relu_lower: str = "adaptive",
    intersect_ibp: bool = True,
    never_looser_than_fastlin: bool = True,
    fused: bool = True,
    clip=None,
    lowrank: bool | None = None,
) -> tuple[list, list]:
    """CROWN bounds of every pre-activation over ``B_p[x0, eps] ∩ D`` (Zhang et al. 2018, Theorem 3.2).

    Each layer's neurons get linear upper/lower relaxations from their certified pre-activation interval
    (:meth:`Activation.relaxation`: adaptive lower slope for the ReLU family; chord / tangent / tangent through an
    end point for sigmoid, tanh, arctan; chord above and tangent below for the convex ELU and softplus; vertex
    hull for hard-sigmoid), which are back-substituted through all earlier layers
    (:func:`~recurjac_scale.layer_bounds.backsub.backsubstitute`) and concretised with the dual norm ``q``.

    What is certified: every returned interval contains the exact real-number pre-activation for every ``x`` in
    the region, whatever the options: each pass is sound with the rounding allowances of
    :mod:`~recurjac_scale.layer_bounds.backsub` (for the working dtype), and so is the intersection of passes.
    With the defaults, on ReLU-family networks, every interval is also inside Fast-Lin's (it is intersected
    with Fast-Lin run on its own earlier bounds, exactly as :func:`~recurjac_scale.layer_bounds.fastlin.fastlin`
    runs alone, up to the order of summation).

    Parameters
    ----------
    network : Network
    region : Region
    block_rows : int, optional
        Rows per block in the back-substitution (results do not depend on it).
    dtype : {numpy.float64, numpy.float32}
        Working precision of the GEMMs (float32 results are certified with float32 allowances).
    relu_lower : {"adaptive", "parallel", "alpha", "one"}
        Lower slope of unstable ReLU-family neurons; ``"parallel"`` reproduces Fast-Lin's.
    intersect_ibp : bool
        Intersect every layer with the interval bound from the previous layer's bounds.
    never_looser_than_fastlin : bool
        For ReLU / leaky-ReLU networks with ``relu_lower="adaptive"``: run Fast-Lin alongside (on its own
        earlier bounds, exactly as it runs alone) and intersect every layer with it.  The adaptive slope alone is
        looser than Fast-Lin on some neurons (about 20% of them in random networks); with this option CROWN is
        never looser than Fast-Lin, by construction (and about 2% tighter on average, since the tighter bounds
        feed the later layers).  Fast-Lin's lines are parallel, so with ``fused`` its pass runs one chain for
        both bounds instead of two, and its first affine step is shared with CROWN-Ada's: the default costs
        about 1.5 times plain CROWN-Ada instead of 2 times; where few neurons are unstable, the low-rank chains
        (``lowrank``) run all three chains for about the price of one (benchmarks/RESULTS.md).  ``False`` gives
        plain CROWN-Ada.
    fused : bool
        Run the back-substitution through :mod:`recurjac_scale.layer_bounds.fused` (one pass over the
        coefficients per relaxation step, upper and lower chains stacked into one GEMM, one shared chain for
        linear relaxations).  ``False`` runs the plain numpy chains, one per bound and pass, as before (kept as
        the reference the fused engine is tested against); the two agree up to the order of summation.
    lowrank : bool or None
        Carry the chains as one shared chain plus low-rank corrections where that saves flops (``None``), always
        (``True``) or never (``False``); see :func:`~recurjac_scale.layer_bounds.backsub.backsubstitute`.
    clip : sequence of (lower, upper) or None
        Known bounds of the layers over the region (see :func:`~recurjac_scale.layer_bounds.backsub.
        backsubstitute`).

    Returns
    -------
    lowers, uppers : list of ndarray, shapes (n_k,) for k = 1..H, float64, certified
    """
    if relu_lower not in RELU_LOWER_SLOPES:
        raise InputError(f"relu_lower={relu_lower!r}; accepted: {', '.join(RELU_LOWER_SLOPES)}")

    def relax(act, lower, upper, slope=relu_lower):
        return crown_relaxation(act, lower, upper, slope)

    relaxes = [relax]
    independent = []
    relu_family = any(isinstance(a, LeakyReLU) and a.alpha != 1.0 for a in network.activations)
    fastlin_ok = all(isinstance(a, LeakyReLU) or a.is_identity for a in network.activations)
    if relu_family and fastlin_ok and relu_lower == "adaptive" and never_looser_than_fastlin:
        independent.append(fastlin_relaxation)
    return backsubstitute(
        network,
        region,
        relaxes,
        block_rows=block_rows,
        dtype=dtype,
        intersect_ibp=intersect_ibp,
        independent=independent,
        fused=fused,
        clip=clip,
        lowrank=lowrank,
    )
