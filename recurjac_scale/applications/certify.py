"""Certified robustness radii (Zhang et al. 2019, Lemma 1 and Theorem 2) and the layer-bound margin certificate.

For an input ``x0`` of class ``c`` (its true label when given, else the prediction) and a target ``j``, let
``g = f_c - f_j``.  Along the segment from ``x0`` to any ``x`` of ``B_p[x0, R] ∩ D`` (``D`` convex and ``x0 ∈ D``,
so the point at distance ``t`` lies in ``B_p[x0, t] ∩ D``), ``|d/dt g| <= ||∇g||_q <= L(t)``, where ``L(t)`` is a
certified local Lipschitz constant of ``g`` over ``B_p[x0, t] ∩ D`` (:func:`recurjac_scale.lipschitz`).  Hence
(Theorem 2) ``g(x) >= g(x0) - ∫_0^{||x - x0||} L(t) dt`` and every ``R`` with ``∫_0^R L(t) dt < g(x0)`` is a
certified radius: no ``x`` in the ball has ``f_j(x) >= f_c(x)``.

The upper bound of the integral from a few evaluated constants (the *stand-in argument*) and the searches
over ``R`` (the default grid search, the authors' procedure as ``search="paper"``, and ``search="replay"`` with the
proof that it is never below the authors') are in :mod:`recurjac_scale.applications.search`.

The margin-bound certificate reported beside it: the largest ``eps`` (bracketed by doubling, then ``s`` bisection
steps) at which the layer-bound method's (CROWN / Fast-Lin / IBP) lower bound of ``g`` over ``B_p[x0, eps] ∩ D``
is positive.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..errors import InputError
from ..network.model import Network
from .search import SEARCHES, LocalConstants, integral_radius

__all__ = [
    "CertifyResult",
    "TARGETS",
    "SEARCHES",
    "certify",
    "resolve_targets",
    "integral_radius",
    "margin_bound_radius",
    "LocalConstants",
    "register_target",
    "check_target",
]

# -- targets --------------------------------------------------------------------------------------------------

TargetFn = Callable[[np.ndarray, int, np.random.Generator], "int | None"]
TARGETS: dict[str, TargetFn] = {}
"""Registry: target kind -> ``fn(logits (n_H,), c, rng) -> j`` (``None``: untargeted, all ``j != c``)."""


def register_target(name: str):
    def deco(fn: TargetFn) -> TargetFn:
        TARGETS[name] = fn
        return fn

    return deco


@register_target("runnerup")
def _runnerup(logits, c, rng):
    z = np.array(logits, dtype=np.float64)
    z[c] = -np.inf
    return int(np.argmax(z))


@register_target("least")
def _least(logits, c, rng):
    z = np.array(logits, dtype=np.float64)
    z[c] = np.inf
    return int(np.argmin(z))


@register_target("random")
def _random(logits, c, rng):
    others = [k for k in range(len(logits)) if k != c]
    return int(others[int(rng.integers(len(others)))])


@register_target("untargeted")
def _untargeted(logits, c, rng):
    return None


def resolve_targets(target, logits: np.ndarray, c: int, *, seed: int = 0, index: int = 0) -> int | None:
    """The target class ``j`` of one input: a kind in :data:`TARGETS` or a class index.

    ``random`` draws from a generator seeded by ``(seed, index)``, so a record does not depend on the order in
    which a batch computes its items.  Returns ``None`` for ``untargeted``.

    Raises
    ------
    InputError
        Unknown kind, or a class index out of range or equal to ``c``.
    """
    n = len(logits)
    key = str(target).strip().lower().replace("-", "").replace("_", "")
    key = {"runnerup": "runnerup", "runner": "runnerup", "leastlikely": "least"}.get(key, key)
    if key in TARGETS:
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(index), 7]))
        return TARGETS[key](logits, c, rng)
    try:
        j = int(str(target))
    except ValueError:
        raise InputError(
            f"unknown target {target!r}; accepted: {', '.join(sorted(TARGETS))} or a class index 0..{n - 1}"
        ) from None
    if not 0 <= j < n:
        raise InputError(f"target class {j} is out of range; accepted: 0..{n - 1}")
    return j


def check_target(target, n_outputs: int) -> str:
    """Validate a target given by name or class index (before any work); returns it normalised."""
    t = str(target).strip()
    if t.isdigit():
        if not 0 <= int(t) < n_outputs:
            raise InputError(f"target class {t} is out of range; accepted: 0..{n_outputs - 1}")
        return t
    resolve_targets(t, np.zeros(n_outputs), 0)
    return t


# -- margin bound ---------------------------------------------------------------------------------------------


def margin_bound_radius(network: Network, x0, C: np.ndarray, p=math.inf, method: str = "crown", *,
                        steps: int = 15, r0: float = 0.01) -> float:
    """Largest ``eps`` found with the layer-bound method's certified lower bound of every row of ``C f`` over
    ``B_p[x0, eps] ∩ D`` positive: doubling (or halving) from ``r0``, then ``steps`` bisection steps."""
    from ..layer_bounds import layer_bounds

    netc = network.with_outputs(C)

    def ok(eps):
        lb = layer_bounds(netc, x0, eps, p, method=method)
        return bool(np.all(lb.lower[-1] > 0))

    if not ok(0.0):
        return 0.0
    lo, hi, r = 0.0, None, float(r0)
    for _ in range(40):
        if ok(r):
            lo = r
            r *= 2.0
        else:
            hi = r
            break
    if hi is None:
        return lo
    for _ in range(int(steps)):
        mid = 0.5 * (lo + hi)
        if ok(mid):
            lo = mid
        else:
            hi = mid
    return lo


# -- the entry point ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CertifyResult:
    """A certified robustness radius for one (input, target).

    Attributes
    ----------
    label, prediction : int
        ``c`` (the true label, or the prediction when no label was given) and the predicted class.
    target : int or None
        ``j`` (``None``: untargeted, the minimum over ``j != c``).
    radius : float
        Certified: no ``x`` in ``B_p[x0, radius] ∩ D`` has ``f_j(x) >= f_c(x)`` (0 when misclassified).
    margin_bound_radius : float or None
        The same from the layer-bound method's output bounds alone (``None`` if not computed).
    margin : float
        Certified lower bound of ``g(x0) = f_c(x0) - f_j(x0)`` (the smallest over ``j`` when untargeted).
    misclassified : bool
    evaluations : int
        Number of local-constant evaluations (layer + Jacobian bounds) spent.
    radii, constants : tuple
        Every evaluated radius and its constant (the smallest over rows) -- the eps grid of the record.
    time_s, margin_bound_time_s : float
    method, layer_bounds, p, search : str / float
    """

    label: int
    prediction: int
    target: int | None
    radius: float
    margin_bound_radius: float | None
    margin: float
    misclassified: bool
    evaluations: int
    radii: tuple
    constants: tuple
    time_s: float
    margin_bound_time_s: float
    method: str
    layer_bounds: str
    p: float
    search: str

    def to_dict(self) -> dict:
        from ..lipschitz import format_norm

        return {
            "label": self.label,
            "prediction": self.prediction,
            "target": self.target,
            "radius": self.radius,
            "margin_bound_radius": self.margin_bound_radius,
            "margin": self.margin,
            "misclassified": self.misclassified,
            "evaluations": self.evaluations,
            "eps_grid": list(self.radii),
            "lipschitz": [v if math.isfinite(v) else "inf" for v in self.constants],
            "time_s": self.time_s,
            "margin_bound_time_s": self.margin_bound_time_s,
            "method": self.method,
            "layer_bounds": self.layer_bounds,
            "p": format_norm(self.p),
            "search": self.search,
        }


def _margin_rows(n_out: int, c: int, j: int | None) -> np.ndarray:
    js = [k for k in range(n_out) if k != c] if j is None else [j]
    C = np.zeros((len(js), n_out))
    C[:, c] = 1.0
    C[np.arange(len(js)), js] = -1.0
    return C


def certify(
    network: Network,
    x0,
    label: int | None = None,
    target="runnerup",
    p=math.inf,
    *,
    method: str = "recurjac-b",
    layer_bounds: str | None = None,
    search: str = "grid",
    margin_bound: bool = True,
    seed: int = 0,
    index: int = 0,
    n: int = 15,
    steps: int = 15,
    budget: int | None = None,
    reuse: bool | None = None,
) -> CertifyResult:
    """Certified robustness radius of ``x0`` against ``target`` (Theorem 2), and the margin-bound radius.

    Parameters
    ----------
    network : Network
    x0 : array_like, shape (n_0,)
        Input, raw units, inside the model's domain.
    label : int, optional
        True label ``c``; default the prediction.  A misclassified input gets radius 0.
    target : str or int
        ``runnerup``, ``random`` (seeded by ``(seed, index)``), ``least``, ``untargeted`` or a class index.
    p : {1, 2, inf}
    method : str
        Jacobian bound method (:data:`recurjac_scale.JACOBIAN_METHODS`).
    layer_bounds : str, optional
        Pre-activation bound method (default ``crown``); also used for the margin-bound certificate.
    search : {"grid", "replay", "paper"}
        See :mod:`recurjac_scale.applications.search`.  ``"grid"`` (default): the fastest; its radius is at or
        above ``"paper"``'s on the MNIST benchmark, a measurement.  ``"replay"``: never below ``"paper"``'s, for
        every input, by construction (about twice the evaluations of ``"grid"``).  ``"paper"``: the authors'
        procedure.  Every one returns a certified radius.
    margin_bound : bool
        Also compute the layer-bound margin certificate.
    n, steps : int
        Intervals and bisection steps of ``search="paper"`` (and bisection steps of the margin bound).
    budget : int, optional
        Local-constant evaluations of ``search="grid"`` (default
        :data:`~recurjac_scale.applications.search.GRID_BUDGET`) or of the grid phase of ``search="replay"`` (default ``REPLAY_BUDGET``; the replay adds its own).
    reuse : bool, optional
        Reuse work across radii and targets where the constants provably stay the same bytes
        (:mod:`recurjac_scale.applications.search`, "Reuse"); default: for every search but ``"paper"``, which
        recomputes every point as the authors' code does.

    Returns
    -------
    CertifyResult
    """
    from ..jacobian import get_jacobian_method
    from ..layer_bounds import layer_bounds as compute_layer_bounds
    from ..layer_bounds.base import dual_norm, parse_norm

    t0 = time.perf_counter()
    p = parse_norm(p)
    net = network.materialize() if network.is_lazy else network
    x = net.input_spec.check(x0)[0]
    method = get_jacobian_method(method).name
    lb_name = "crown" if layer_bounds is None else str(layer_bounds).strip().lower()
    skey = str(search).strip().lower()
    if skey not in SEARCHES:
        raise InputError(f"unknown search {search!r}; accepted: {', '.join(sorted(SEARCHES))}")
    logits = net.forward(x)
    pred = int(np.argmax(logits))
    if label is not None:
        c = int(label)
        if not 0 <= c < net.n_outputs:
            raise InputError(f"label {label!r} is out of range; accepted: 0..{net.n_outputs - 1}")
    else:
        c = pred
    j = resolve_targets(target, logits, c, seed=seed, index=index)
    if j is not None and j == c:
        raise InputError(f"target class {j} equals the input's class c = {c}; choose another target")
    C = _margin_rows(net.n_outputs, c, j)
    # g(x0) from certified output bounds at eps = 0 (lower bound of the exact margins)
    g0 = np.asarray(compute_layer_bounds(net.with_outputs(C), x, 0.0, p, method="ibp").lower[-1], dtype=np.float64)
    misclassified = pred != c or not bool(np.all(g0 > 0))
    radius, evals, radii, consts = 0.0, 0, (), ()
    mb, t_mb = (0.0 if margin_bound else None), 0.0
    if not misclassified:
        J = net.jacobian(x)
        grads = C @ J
        q = dual_norm(p)
        gnorm = np.linalg.norm(grads, ord=q, axis=1)
        r_cap = float(np.min(np.where(gnorm > 0, g0 / np.maximum(gnorm, 1e-300), np.inf)))
        if not math.isfinite(r_cap):
            r_cap = 1.0
        lc = LocalConstants(net, x, C, p, method, lb_name, reuse=skey != "paper" if reuse is None else bool(reuse))
        radius = float(SEARCHES[skey](lc, g0, r_cap, n=n, steps=steps, budget=budget, grad_norm=gnorm))
        evals = lc.evaluations
        rs = sorted(lc.cache)
        radii = tuple(float(r) for r in rs)
        consts = tuple(float(np.max(lc.cache[r])) for r in rs)
        if margin_bound:
            tm = time.perf_counter()
            mb = margin_bound_radius(net, x, C, p, lb_name, steps=steps, r0=max(radius, 1e-4))
            t_mb = time.perf_counter() - tm
    return CertifyResult(
        label=c,
        prediction=pred,
        target=j,
        radius=radius,
        margin_bound_radius=mb,
        margin=float(np.min(g0)),
        misclassified=bool(misclassified),
        evaluations=int(evals),
        radii=radii,
        constants=consts,
        time_s=time.perf_counter() - t0 - t_mb,
        margin_bound_time_s=t_mb,
        method=method,
        layer_bounds=lb_name,
        p=p,
        search=skey,
    )
