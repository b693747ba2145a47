"""One preparation for every Jacobian computation of a region: :func:`prepare` -> :class:`Job`.

Everything a Jacobian method needs before its chain is built, computed once, in this process:

1. the network materialised (a store-backed network is read here) with the output selection ``C`` folded into the
   last layer (:func:`output_matrix`, :meth:`Network.with_outputs`);
2. the region ``B_p[x0, eps] ∩ D`` (:class:`~recurjac_scale.layer_bounds.Region`);
3. the pre-activation bounds: given, the global ones for ``eps = inf`` without a domain, or computed by the default
   (or named) layer-bound method;
4. the derivative bounds ``(dl, du)`` of every hidden layer (:func:`.derivative_bounds.derivative_bounds_for`).

:func:`recurjac_scale.jacobian.jacobian_bounds` (in memory), the engine's plan
(:func:`recurjac_scale.engine.plan_jacobian`) and applications all start here, so they compute the same bounds.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from ..errors import InputError, ShapeMismatchError
from ..layer_bounds.base import LAYER_BOUND_METHODS, LayerBounds, Region, layer_bounds as compute_layer_bounds
from ..network.model import Network
from .derivative_bounds import derivative_bounds_for
from .sparse_policy import stored_sparse_layers

__all__ = ["Job", "prepare", "output_matrix", "parse_output_selection", "default_layer_bound_method"]

_PREFERRED = ("crown", "fastlin", "ibp")


def default_layer_bound_method() -> str:
    """``crown`` when registered, else the best registered of ``fastlin``, ``ibp``."""
    for name in _PREFERRED:
        if name in LAYER_BOUND_METHODS:
            return name
    raise InputError("no layer-bound method is registered")  # pragma: no cover


def parse_output_selection(text: str):
    """An output selection as text: ``"all"`` (or empty) -> ``None``, ``"K"`` -> ``K``, ``"C,J"`` -> ``(C, J)``
    (the margin ``f_C - f_J``); indices are checked against the network by :func:`output_matrix`.

    Raises
    ------
    InputError
        For anything else.
    """
    s = str(text).strip().lower()
    if s in ("", "all"):
        return None
    parts = [p.strip() for p in s.split(",")]
    try:
        vals = [int(p) for p in parts]
    except ValueError:
        vals = None
    if vals is None or len(vals) > 2:
        raise InputError(f"outputs={text!r}; accepted: 'all', a logit index 'K', or 'C,J' for the margin f_C - f_J")
    return vals[0] if len(vals) == 1 else (vals[0], vals[1])


def output_matrix(outputs, n_outputs: int) -> np.ndarray:
    """The output selection ``C`` of shape ``(m, n_H)``.

    Parameters
    ----------
    outputs : None, "all", int, (c, j), "K", "C,J" or array of shape (m, n_H)
        ``None`` / ``"all"``: every output (``C = I``); ``k``: output ``k``; ``(c, j)``: the margin
        ``f_c - f_j`` (``j = None``: output ``c``); a matrix: its rows.
    n_outputs : int
        ``n_H``.
    """
    n = int(n_outputs)

    def idx(v) -> int:
        try:
            k = int(v)
        except (TypeError, ValueError):
            raise InputError(f"output index {v!r} is not an integer; accepted: 0..{n - 1}") from None
        if isinstance(v, float) and v != k:
            raise InputError(f"output index {v!r} is not an integer")
        if not 0 <= k < n:
            raise InputError(f"output index {k} out of range; accepted: 0..{n - 1}")
        return k

    if isinstance(outputs, str):
        outputs = parse_output_selection(outputs)
    if outputs is None:
        return np.eye(n)
    if isinstance(outputs, (int, np.integer)):
        C = np.zeros((1, n))
        C[0, idx(outputs)] = 1.0
        return C
    if isinstance(outputs, tuple) and len(outputs) == 2 and not isinstance(outputs[0], (list, tuple, np.ndarray)):
        c = idx(outputs[0])
        C = np.zeros((1, n))
        C[0, c] = 1.0
        if outputs[1] is not None:
            j = idx(outputs[1])
            if j == c:
                raise InputError(f"margin f_c - f_j needs c != j (got c = j = {c})")
            C[0, j] = -1.0
        return C
    C = np.asarray(outputs, dtype=np.float64)
    if C.ndim == 1:
        C = C[None, :]
    if C.ndim != 2 or C.shape[1] != n or C.shape[0] == 0:
        raise ShapeMismatchError(f"output matrix of shape {C.shape}; need (m, {n}) with m >= 1")
    if not np.isfinite(C).all():
        raise InputError("output matrix contains NaN or infinite values")
    return C


def global_layer_bounds(network: Network, region: Region) -> LayerBounds:
    """The trivially sound bounds ``(-inf, inf)`` of every pre-activation (``eps = inf`` without a domain): the
    derivative bounds are then the activations' global derivative ranges."""
    lowers = tuple(np.full(n, -np.inf) for n in network.widths[1:])
    uppers = tuple(np.full(n, np.inf) for n in network.widths[1:])
    unstable = tuple(
        int(np.count_nonzero(np.less(*a.derivative_bounds(l, u))))
        for a, l, u in zip(network.layer_activations, lowers, uppers)
    )
    return LayerBounds(lower=lowers, upper=uppers, method="global", region=region, unstable=unstable)


@dataclass(frozen=True)
class Job:
    """A region of one network, prepared for any Jacobian method (:func:`prepare`).

    Attributes
    ----------
    network : Network
        Materialised (numpy weights), with the output selection folded in (identity output activation).
    region : Region
        ``B_p[x0, eps] ∩ D`` (``x0`` of shape ``(n_0,)``).
    outputs : ndarray, shape (m, n_H)
        The output selection ``C``.
    layer_bounds : LayerBounds
        Certified pre-activation bounds of ``network`` over the region.
    layer_bound_method : str
        Their method (``"global"`` for ``eps = inf`` without a domain).
    derivative_bounds : tuple of (ndarray, ndarray)
        ``(dl, du)`` of every hidden layer, float64, ``0 <= dl <= σ' <= du`` over the region (Eq. 6-8).
    sparse_layers : tuple of int
        Layers the source model store holds as CSR (the ``"auto"`` sparse-kernel choice).
    layer_bounds_seconds : float
        Time spent computing the layer bounds.
    """

    network: Network
    region: Region
    outputs: np.ndarray
    layer_bounds: LayerBounds
    layer_bound_method: str
    derivative_bounds: tuple
    sparse_layers: tuple = ()
    layer_bounds_seconds: float = 0.0

    @property
    def unstable(self) -> tuple[int, ...]:
        """Per hidden layer, neurons whose derivative interval has a radius (``dl < du``)."""
        return tuple(int(np.count_nonzero(dl < du)) for dl, du in self.derivative_bounds)

    @property
    def dead(self) -> tuple[int, ...]:
        """Per hidden layer, neurons with ``du = 0`` (every product through them is an exact zero)."""
        return tuple(int(np.count_nonzero(du == 0)) for _dl, du in self.derivative_bounds)


def prepare(network: Network, x0, eps: float, p=math.inf, outputs=None, layer_bounds=None) -> Job:
    """Prepare a region of ``network`` for the Jacobian methods (module docstring).

    Parameters
    ----------
    network : Network
        Numpy or store-backed (read here, with dask's threaded scheduler: never through a distributed client).
    x0 : array_like, shape (n_0,)
    eps : float
        Radius in ``[0, inf]``.
    p : {1, 2, inf}
    outputs : None, "all", int, (c, j), "K", "C,J" or array (m, n_H)
        Output selection (:func:`output_matrix`).
    layer_bounds : str, LayerBounds or None
        A layer-bound method name (``None``: :func:`default_layer_bound_method`), or precomputed bounds of the
        network with the outputs folded in (the caller vouches that they hold over the region).

    Returns
    -------
    Job
    """
    if network.is_lazy:
        import dask

        with dask.config.set(scheduler="threads"):
            net = network.materialize()
    else:
        net = network
    region = Region.of(net, x0, eps, p)
    C = output_matrix(outputs, net.n_outputs)
    netC = net.with_outputs(C)
    t0 = time.perf_counter()
    if isinstance(layer_bounds, LayerBounds):
        lb = layer_bounds
        lb_name = lb.method
    elif math.isinf(region.eps) and region.lower is None:
        lb = global_layer_bounds(netC, region)
        lb_name = "global"
    else:
        lb_name = default_layer_bound_method() if layer_bounds is None else LAYER_BOUND_METHODS.resolve(layer_bounds)
        lb = compute_layer_bounds(netC, region.x0, region.eps, region.p, method=lb_name)
    t_lb = time.perf_counter() - t0
    db = tuple(derivative_bounds_for(netC, lb))
    return Job(
        network=netC,
        region=region,
        outputs=C,
        layer_bounds=lb,
        layer_bound_method=lb_name,
        derivative_bounds=db,
        sparse_layers=stored_sparse_layers(network),
        layer_bounds_seconds=t_lb,
    )
