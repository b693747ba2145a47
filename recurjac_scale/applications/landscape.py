"""The landscape radius ``R*`` (Zhang et al. 2019, Figure 2): how far from ``x0`` an output provably has no
stationary point.

``R*`` is the largest radius found such that over ``B_p[x0, R*] ∩ D`` some entry ``k`` of the gradient of output
``K`` keeps a strict sign: certified Jacobian bounds with ``L[K, k] > 0`` or ``U[K, k] < 0``.  Then
``∂f_K/∂x_k`` cannot vanish anywhere in the ball, so ``f_K`` has no stationary point (no local extremum or
saddle) there.  Strict inequalities: an all-zero column (an input the output does not depend on) certifies
nothing.  ``R* = inf`` when the global bounds (``eps = inf``: over the whole domain, or all of R^n) already fix a
sign.  The search doubles from ``r0`` while the sign test holds, then bisects ``steps`` times; the value returned
is the largest radius at which the test held, so it is certified (a lower bound of the exact ``R*``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from ..errors import InputError
from ..network.model import Network

__all__ = ["LandscapeResult", "landscape_radius", "fixed_sign_coordinate"]


@dataclass(frozen=True)
class LandscapeResult:
    """``R*`` for one input and one output.

    Attributes
    ----------
    output : int
        The output ``K``.
    r_star : float
        Certified: some gradient entry of ``f_K`` keeps a strict sign over ``B_p[x0, r_star] ∩ D`` (``inf``:
        everywhere); 0 when not even at ``x0`` (eps = 0).
    coordinate : int or None
        An input coordinate ``k`` whose entry keeps its sign at ``r_star``.
    sign : int
        ``+1`` or ``-1`` (0 when ``coordinate`` is None).
    evaluations : int
        Jacobian-bound computations spent.
    time_s : float
    method, layer_bounds : str
    p : float
    """

    output: int
    r_star: float
    coordinate: int | None
    sign: int
    evaluations: int
    time_s: float
    method: str
    layer_bounds: str
    p: float

    def to_dict(self) -> dict:
        from ..lipschitz import format_norm

        return {
            "output": self.output,
            "r_star": self.r_star if math.isfinite(self.r_star) else "inf",
            "coordinate": self.coordinate,
            "sign": self.sign,
            "evaluations": self.evaluations,
            "time_s": self.time_s,
            "method": self.method,
            "layer_bounds": self.layer_bounds,
            "p": format_norm(self.p),
        }


def fixed_sign_coordinate(lower: np.ndarray, upper: np.ndarray) -> tuple[int | None, int]:
    """The coordinate with the widest strict sign margin (``max(L, -U) > 0``), and its sign; ``(None, 0)``."""
    lower = np.asarray(lower, dtype=np.float64).reshape(-1)
    upper = np.asarray(upper, dtype=np.float64).reshape(-1)
    margin = np.maximum(lower, -upper)
    k = int(np.argmax(margin)) if margin.size else 0
    if margin.size == 0 or not margin[k] > 0:
        return None, 0
    return k, (1 if lower[k] > 0 else -1)


def landscape_radius(
    network: Network,
    x0,
    output: int | None = None,
    p=2,
    *,
    method: str = "recurjac-b",
    layer_bounds: str | None = None,
    steps: int = 15,
    r0: float = 0.01,
) -> LandscapeResult:
    """Certified landscape radius ``R*`` of output ``output`` (default: the predicted class) around ``x0``.

    Parameters
    ----------
    network : Network
    x0 : array_like, shape (n_0,)
    output : int, optional
    p : {1, 2, inf}
        Norm of the ball (the paper: 2 and inf).
    method, layer_bounds : str
        Jacobian and pre-activation bound methods.
    steps : int
        Bisection steps after the bracket.
    r0 : float
        First radius of the bracket (> 0).

    Returns
    -------
    LandscapeResult
    """
    from ..jacobian import get_jacobian_method, jacobian_bounds
    from ..layer_bounds.base import parse_norm

    t0 = time.perf_counter()
    p = parse_norm(p)
    net = network.materialize() if network.is_lazy else network
    x = net.input_spec.check(x0)[0]
    method = get_jacobian_method(method).name
    lb_name = "crown" if layer_bounds is None else str(layer_bounds).strip().lower()
    K = int(np.argmax(net.forward(x))) if output is None else int(output)
    if not 0 <= K < net.n_outputs:
        raise InputError(f"output {output!r} is out of range; accepted: 0..{net.n_outputs - 1}")
    if not r0 > 0:
        raise InputError(f"r0={r0!r}: the first radius must be > 0")
    count = [0]

    def test(r):
        count[0] += 1
        jb = jacobian_bounds(net, x, r, p, method=method, layer_bounds=lb_name, outputs=K, keep_states=False)
        return fixed_sign_coordinate(jb.lower, jb.upper)

    def result(r, kc):
        return LandscapeResult(K, float(r), kc[0], int(kc[1]), count[0], time.perf_counter() - t0, method, lb_name, p)

    g = test(math.inf)
    if g[0] is not None:
        return result(math.inf, g)
    best = test(0.0)
    if best[0] is None:
        return result(0.0, best)
    lo, hi, r = 0.0, None, float(r0)
    for _ in range(60):
        kc = test(r)
        if kc[0] is None:
            hi = r
            break
        lo, best = r, kc
        r *= 2.0
    if hi is None:
        return result(lo, best)
    for _ in range(int(steps)):
        mid = 0.5 * (lo + hi)
        kc = test(mid)
        if kc[0] is None:
            hi = mid
        else:
            lo, best = mid, kc
    return result(lo, best)
