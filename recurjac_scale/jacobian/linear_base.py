"""The data the ``linear-jacobian`` propagation (:mod:`.linear`) carries: :class:`LinearContext` (per network,
region and layer bounds; built by :func:`recurjac_scale.jacobian.linear.linear_context`) and :class:`RowBounds`
(per output row; built by :func:`recurjac_scale.jacobian.linear_planes.row_bounds`).

Nothing is computed here.  What the fields certify is stated on each; every array is float64.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["LinearContext", "RowBounds"]


@dataclass
class LinearContext:
    """Everything the propagation needs for one network, region and set of layer bounds (all float64).

    Attributes
    ----------
    W, b : list of ndarray
        ``W[k]`` of shape ``(d_k, d_{k-1})`` (``d_{-1} = n_0``), ``b[k]`` of shape ``(d_k,)``, ``k = 0..H-1``.
    dl, du : list of ndarray
        Derivative bounds of the hidden layers ``k = 0..H-2``.
    variants : dict
        Slope choice -> ``(s_low, t_low, s_up, t_up)``, lists of ``(d_k,)`` arrays: certified lines of ``sigma_k'``
        on the layer bounds (:func:`~recurjac_scale.jacobian.derivative_lines.derivative_lines`).
    a_low, b_low, a_up, b_up : list of ndarray
        CROWN's certified lines of ``sigma_k`` (back-substitution).
    zmax, hmax : list of ndarray
        Bounds of ``|z(k)|`` and ``|h(k)|``.
    bounds : list of (ndarray, ndarray)
        The pre-activation bounds ``(l, u)`` of the hidden layers.
    compact : dict
        The weights restricted to the neurons whose terms can be non-zero
        (:func:`recurjac_scale.jacobian.linear._compact`).
    a0 : list of ndarray
        ``sigma_k'(z0(k))`` at the centre (steers the choice of McCormick planes).
    fold_first : bool
        Fold the first hidden layer's exact-line neurons in :func:`~.linear_passes.bound_objectives_variants`
        (:data:`recurjac_scale.jacobian.linear.FOLD_FIRST_LAYER` when the context was built).
    adaptive : int
        Skip the variants with slopes for an output row's remaining objectives once this many were bounded with
        every variant and slopes never won (:data:`recurjac_scale.jacobian.linear.ADAPTIVE_AFTER`; 0: never skip).
    region : Region
    """

    W: list
    b: list
    absW: list
    dl: list
    du: list
    variants: dict
    a_low: list
    b_low: list
    a_up: list
    b_up: list
    relax_err_up: list
    relax_err_low: list
    zmax: list
    hmax: list
    xmax: np.ndarray
    a0: list
    region: object
    bounds: list = None
    compact: dict = None
    adaptive: int = 0
    fold_first: bool = True

    @property
    def H(self) -> int:
        return len(self.W)


@dataclass
class RowBounds:
    """Per output row: RecurJac's certified bounds ``gl(k) <= ∂f_i/∂h(k) <= gu(k)`` (``k = 0..H-2``) and the
    McCormick plane coefficients chosen for them."""

    gl: list
    gu: list
    ymax: list
    up: list  # per k: (coef_g, coef_a, const) of the upper plane
    lo: list  # per k: lower plane
    v: list  # per k < H-2: |W[k+1]|^T ymax(k+1)
    top: np.ndarray  # W[H-1][i]
    g0: list = None  # the gradient at the centre (heuristics)
    planes: str = "auto"
    under: float = 0.0  # underflow allowance of one objective (:func:`.linear_passes._underflow`)
    slope_stats: list = field(default_factory=lambda: [0, 0])  # objectives bounded with every variant, slope wins
    row: int = 0  # the output row (index into the selected outputs)
