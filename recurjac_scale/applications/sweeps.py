"""Lipschitz sweeps (Zhang et al. 2019, Figures 1 and 3): certified local constants on a grid of radii for
several Jacobian methods at once, with the global constant (``eps = inf``) and the naive product of operator
norms, for one input (the batch layer runs it over many).

Every value is a certified upper bound of the local Lipschitz constant of ``x -> C f(x)`` over
``B_p[x0, eps] ∩ D`` (:func:`recurjac_scale.lipschitz`); the naive constant bounds all of them.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from ..errors import InputError
from ..network.model import Network

__all__ = ["SweepResult", "lipschitz_sweep", "log_eps_grid"]


def log_eps_grid(start: float, end: float, n: int) -> list[float]:
    """``n`` log-spaced radii from ``start`` to ``end`` (both > 0)."""
    if not (start > 0 and end > 0 and n >= 1 and math.isfinite(start) and math.isfinite(end)):
        raise InputError(f"eps grid {start}:{end}:{n}: need finite start > 0, end > 0 and n >= 1")
    return [float(v) for v in np.geomspace(start, end, int(n))]


def _enc(v: float):
    return v if math.isfinite(v) else "inf"


@dataclass(frozen=True)
class SweepResult:
    """Certified constants of one input on a grid of radii.

    Attributes
    ----------
    eps : tuple of float
        The radii.
    values : dict
        Method name -> tuple of constants, one per radius.
    global_values : dict
        Method name -> the constant at ``eps = inf`` (over the domain); empty when not requested.
    naive : float
        Naive global constant (product of operator norms).
    times : dict
        Method name -> seconds spent on its sweep (global constant included).
    p : float
    layer_bounds : str
    """

    eps: tuple
    values: dict
    global_values: dict
    naive: float
    times: dict
    p: float
    layer_bounds: str

    def to_dict(self) -> dict:
        from ..lipschitz import format_norm

        return {
            "eps_grid": [_enc(e) for e in self.eps],
            "lipschitz": {m: [_enc(v) for v in vs] for m, vs in self.values.items()},
            "global": {m: _enc(v) for m, v in self.global_values.items()},
            "naive": _enc(self.naive),
            "method_time_s": dict(self.times),
            "p": format_norm(self.p),
            "layer_bounds": self.layer_bounds,
        }


def lipschitz_sweep(
    network: Network,
    x0,
    eps,
    methods=("fastlip", "recurjac-b"),
    p=math.inf,
    *,
    layer_bounds: str | None = None,
    outputs=None,
    include_global: bool = True,
    algorithm2: bool = True,
) -> SweepResult:
    """Certified local Lipschitz constants of ``x -> C f(x)`` on the radii ``eps`` for each method.

    Parameters
    ----------
    network : Network
    x0 : array_like, shape (n_0,)
    eps : sequence of float
        Radii in ``[0, inf)`` (see :func:`log_eps_grid`).
    methods : sequence of str
        Jacobian methods (:data:`recurjac_scale.JACOBIAN_METHODS`).
    p : {1, 2, inf}
    layer_bounds : str, optional
    outputs : as :func:`recurjac_scale.lipschitz`
    include_global : bool
        Also the constant at ``eps = inf`` per method.
    algorithm2 : bool
        Algorithm 2 for p = inf (RecurJac methods).

    Returns
    -------
    SweepResult
    """
    from ..jacobian import get_jacobian_method
    from ..layer_bounds.base import parse_norm
    from ..lipschitz import lipschitz
    from ..lipschitz_norms import naive_constant
    from ..jacobian import output_matrix

    p = parse_norm(p)
    eps = [float(e) for e in np.atleast_1d(eps)]
    if not methods:
        raise InputError("no Jacobian method given")
    net = network.materialize() if network.is_lazy else network
    C = output_matrix(outputs, net.n_outputs)
    values, glob, times = {}, {}, {}
    lb_used = ""
    for m in methods:
        name = get_jacobian_method(m).name
        t0 = time.perf_counter()
        res = lipschitz(net, x0, eps, p, method=name, layer_bounds=layer_bounds, outputs=C, algorithm2=algorithm2)
        values[name] = tuple(float(v) for v in res.values)
        lb_used = res.layer_bounds
        if include_global:
            g = lipschitz(net, x0, math.inf, p, method=name, layer_bounds=layer_bounds, outputs=C, algorithm2=algorithm2)
            glob[name] = float(g.values[0])
        times[name] = time.perf_counter() - t0
    naive = naive_constant(net.with_outputs(C), p)
    return SweepResult(tuple(eps), values, glob, float(naive), times, p, lb_used)
