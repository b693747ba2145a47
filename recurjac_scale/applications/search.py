"""Certified robustness radii from local Lipschitz constants: the integral bound and the searches over ``R``.

See :mod:`recurjac_scale.applications.certify` for the certificate (Theorem 2): a radius ``R`` is certified when
``∫_0^R L(t) dt < g(x0)``, ``L(t)`` a certified local constant of ``g = f_c - f_j`` over ``B_p[x0, t] ∩ D``.

The integral from above: the **sound stand-in argument**
--------------------------------------------------------
Let ``L*(t)`` be the exact sup of ``||∇g||_q`` over ``B_p[x0, t] ∩ D``.  ``L*`` is non-decreasing in ``t`` (the
regions nest), and every computed constant satisfies ``L(r) >= L*(r)``.  So for any set of evaluated radii
``r_1 < ... < r_k`` and any ``t <= r_i``: ``L*(t) <= L*(r_i) <= L(r_i)``.  The step function
``E(t) = min_{r_i >= t} L(r_i)`` is therefore ``>= L*(t)`` everywhere on ``(0, r_k]`` -- any evaluated radius at or
above ``t`` is a sound stand-in, and the smallest such value is the best -- and ``∫_0^R E(t) dt`` (exact, piecewise
linear in ``R``) bounds the integral from above.  This holds whether or not the computed ``L(r)`` is itself
monotone (layer bounds of nested regions need not be).  Adding radii only lowers ``E``, so a larger set never
gives a smaller radius.  ``g(x0)`` itself is taken from certified output bounds at ``eps = 0`` (a lower bound of the
exact margin), and the radius returned is shrunk by a relative ``1e-12`` against the rounding of the sum.

Three searches use this:

- ``search="paper"``: the procedure of the authors' code: a probe at ``R`` succeeds when the Theorem 2 sum over
  ``n`` equal intervals with right end points, ``P(R) = sum_i L(R i / n) R / n``, is below ``g(x0)`` (``n`` full
  recomputations of layer and Jacobian bounds; the sum is itself a certificate by the argument above).  ``R``
  is multiplied by 10 while probes succeed and divided by 10 while they fail, then bisected with ``s`` probes;
  the largest success is returned.  Cost ``n (s + bracketing)`` evaluations (about 250 with ``n = s = 15``).
- ``search="grid"`` (default): the constants are computed once per (input, target) on a set of radii that is
  reused for every candidate ``R``: a geometric grid ``R_cap · 2^-i`` (``R_cap = g(x0) / ||∇g(x0)||_q``, an
  upper bound of any radius this integral certificate can give, because ``L(t) >= L*(t) >= ||∇g(x0)||_q``),
  descending until a grid radius lies at or below the radius certified so far, then greedy bisection: each new
  radius halves the grid interval below the current radius where ``E`` overestimates most (width times the rise
  of the constant); ``budget`` evaluations in all (:data:`GRID_BUDGET` by default).  The result is the stand-in
  radius of the evaluated radii, a certificate by the argument above.  It is usually *larger* than the paper
  search's: both bound the integral by a step function from the right, the paper with 15 equal steps, this one
  with about 20 steps placed where the constant rises; but that is a measurement, not a theorem (the computed
  constants need not be monotone, and the paper's 15 points can happen to fall where they are low).  On every
  correctly classified image of the 100 of the MNIST benchmark (auto_LiRPA MLP, RecurJac-B, CROWN, l-inf) x the
  runner-up / random / least-likely targets, it is at or above the paper's radius
  (``benchmarks/check_certify_search_full.py``: smallest ratio 1.0009; with 24 radii one of the 297 items was
  0.99993 of it).  Use ``search="replay"`` where "never below the authors' procedure" must hold for every input.
- ``search="replay"``: the grid search with ``budget`` evaluations (20 by default), then the authors' driver
  (the same code) replayed with cheaper probes, below.  The result is the larger of the replay's best success and
  the stand-in radius of every radius evaluated by both phases; **never below the paper search's, for every
  input, by construction.**  It costs about twice as many evaluations as ``search="grid"``.

``search="replay"``: never below the paper's search (a construction, not a tuning)
-------------------------------------------------------------------------------
The replay decides a probe at ``R`` as follows, with every evaluated constant kept:

- *success* if the stand-in certificate of the radii evaluated so far certifies ``R`` (no evaluation);
- *failure* if the authors' sum with each unevaluated ``L(R i / n)`` replaced by the lower bound
  ``||∇g(x0)||_q (1 - 1e-9)`` already fails their test (every computed constant is at least the exact gradient
  norm at ``x0``; the sum is formed in their order and IEEE rounding is monotone, so their computed sum is at
  least this one);
- otherwise it evaluates their points ``R i / n``, largest first, re-checking both rules after each; with every
  point evaluated it takes their decision exactly (same values, same arithmetic).

So the replay succeeds wherever the authors' probe succeeds (with all ``n`` points evaluated, ``E <= L(R i / n)``
on the ``i``-th interval, so the stand-in integral is at most their sum), and fails only where theirs provably
fails.  Until the first probe where the two differ (necessarily: replay succeeds, theirs fails at some ``R``), the
two runs visit the same probes with the same outcomes (the computed constant at a radius is deterministic, and
the probe radii are formed by the same code).  After a failure at ``R`` the driver only probes radii
below ``R`` (bisection keeps ``hi <= R``; the bracket divides by 10 from ``R``); the one exception, a bisection
from 0 after nine failed bracket probes, is excluded by deciding the ninth bracket probe exactly as they do.  So
the authors' result is at most ``max(best before that probe, R)``, which the replay has reached, and the replay's
best only grows: **the replay's radius is >= the paper search's radius for every input**, whatever the computed
constants (monotone or not).  (Without a difference, the two runs are the same and so are their results.)

Once some difference is *known* -- the replay succeeded at a probe ``R`` of its run and the lower-bound sum proves
the authors' probe fails there -- the first difference lies at or before it, so the replay stops.  To reach
that point early, when a probe needs evaluations the replay first
tries to prove the authors' failure at its largest stand-in success (evaluating that probe's points, largest
first) if the evaluated constants, interpolated, predict a failure there; the guess only chooses where to spend
evaluations, never a decision.  The remaining cost is the failing probes above the stand-in radius, whose proofs
need most of their ``n`` points when ``R`` is within a few percent of the threshold.

Why the replay is not the default: these proofs need the authors' own constants at their points (the only sound
lower bound of an unevaluated constant is ``||∇g(x0)||_q``; the exact local constant ``L*`` is no help, the
computed one is about twice the largest gradient norm found by sampling), and the first probe where the two
searches differ lies within about 1 % of the authors' threshold, because both integrals are within about 1 % of
the exact one.  So the replay spends about 30 evaluations on proofs after its grid; on the MNIST benchmark it
is 6.8x faster than the paper search in CPU time, the grid search 10.4x (``benchmarks/bench_certify_search.py``).

Reuse: the same constants for less work (grid and replay searches)
-----------------------------------------------------------------
An evaluation at ``r`` is: pre-activation bounds of every layer over ``B_p[x0, r] ∩ D`` (``layer_bounds``), the
derivative bounds ``(dl, du)`` of each hidden neuron from them, then the Jacobian bound method and Algorithm 2
on the chain built from the weights, ``C`` and those derivative bounds.  Three savings return the same bytes:

- *Only the hidden layers' bounds.*  The Jacobian methods read the layer bounds only through the derivative
  bounds of the hidden layers (:func:`recurjac_scale.jacobian.derivative_bounds.derivative_bounds_for`; the output
  layer's bounds are unused), and the bounds of layer ``k`` are computed from layers ``0 .. k`` alone, so they
  are computed on the network cut after its last hidden layer.  The cut is refused where the layer-bound method
  would choose its passes differently for it (CROWN's Fast-Lin pass depends on the activations present) and for
  methods with their own runner (``linear-jacobian`` reads the region too).  Every search gets this (it is no
  reuse, just less work).
- *Targets of one input share layer bounds.*  The hidden layers' bounds of ``B_p[x0, r] ∩ D`` do not depend on
  the target (``C`` enters only the output layer), so they are kept per (network, ``x0``, ``p``, method, ``r``)
  in a small process-wide LRU store (:data:`LAYER_BOUNDS_CACHE`, keys are SHA-256 digests of the bytes) and
  reused by the other targets.  The replayed probes of the authors' driver coincide across targets as long as
  their outcomes do (the grid's radii scale with each target's ``R_cap``; a grid of powers of two shared by the
  targets saved about 3 % of the CPU time for slightly smaller radii, and was not kept).
- *Same derivative bounds, same constant.*  Given the network, ``C``, ``p`` and the method, the Jacobian bounds
  and Algorithm 2 are a deterministic function of the derivative bounds alone (the radius and the centre enter
  only through them).  For ReLU networks these are ``0``, ``1`` or ``[0, 1]`` per neuron, so nearby radii (the
  ``n`` points of nearby probes) often share them exactly; the constant of an earlier radius whose derivative
  bounds are the same bytes (SHA-256 of them) is reused.  A neuron stable on ``B(x0, R)`` is also stable on
  ``B(x0, r)``, ``r < R``, but the computed bounds of nested regions are not nested (CROWN's adaptive slopes), so
  nothing is assumed from it: the layer bounds are computed at every radius and only exact repeats are reused.

None of this changes a computed constant (tests compare the bytes with the plain computation), so the argument
above holds unchanged.  ``search="paper"`` recomputes every point of every probe, as the authors' code does.
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..network.model import Network

__all__ = ["SEARCHES", "SEARCH_REVISIONS", "SHRINK", "GRID_BUDGET", "REPLAY_BUDGET", "LAYER_BOUNDS_CACHE", "LocalConstants",
           "integral_radius"]

SHRINK = 1e-12

GRID_BUDGET = 25
"""Evaluations of ``search="grid"`` (the default) unless ``budget`` is given."""

REPLAY_BUDGET = 20
"""Evaluations of the grid phase of ``search="replay"`` unless ``budget`` is given (the replay adds its own)."""


# -- the integral bound ---------------------------------------------------------------------------------------


def integral_radius(radii, constants, g0: float) -> float:
    """Largest ``R`` with ``∫_0^R E(t) dt < g0``, ``E(t) = min_{r_i >= t} L_i`` (see the module docstring).

    Parameters
    ----------
    radii : array_like, shape (k,)
        Evaluated radii ``> 0`` (any order).
    constants : array_like, shape (k,)
        Certified local constants ``L_i`` over ``B_p[x0, r_i] ∩ D`` (``inf`` allowed).
    g0 : float
        Certified lower bound of ``g(x0)``.

    Returns
    -------
    float
        A certified radius (``0`` when ``g0 <= 0``); at most ``max(radii)``.
    """
    r = np.asarray(radii, dtype=np.float64)
    L = np.asarray(constants, dtype=np.float64)
    if not g0 > 0 or r.size == 0:
        return 0.0
    order = np.argsort(r, kind="stable")
    r, L = r[order], L[order]
    env = np.minimum.accumulate(L[::-1])[::-1]
    acc, prev = 0.0, 0.0
    for ri, ei in zip(r, env):
        if ri <= prev:
            continue
        seg = (ri - prev) * ei
        if acc + seg >= g0:
            if not math.isfinite(ei):
                return prev * (1.0 - SHRINK)
            return (prev + (g0 - acc) / ei) * (1.0 - SHRINK)
        acc += seg
        prev = ri
    return prev * (1.0 - SHRINK)


# -- reuse ----------------------------------------------------------------------------------------------------


def _digest(*arrays) -> bytes:
    """SHA-256 of the shapes, dtypes and bytes of ``arrays`` (a key that two different inputs cannot share
    short of a hash collision)."""
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(repr((a.shape, a.dtype.str)).encode())
        h.update(a.tobytes())
    return h.digest()


def _crown_choice(activations) -> tuple:
    """What the layer-bound methods decide from the network's activations as a whole (CROWN: whether it adds
    the Fast-Lin pass); the hidden-layer network must decide alike."""
    from ..activations import LeakyReLU

    return (any(isinstance(a, LeakyReLU) and a.alpha != 1.0 for a in activations),
            all(isinstance(a, LeakyReLU) or a.is_identity for a in activations))


def _hidden_network(network: Network, method: str) -> Network | None:
    """The affine layers ``0 .. H-2`` of ``network`` (the hidden pre-activations as outputs), or ``None`` when
    the reuse does not apply: no hidden layer, a Jacobian method that reads more than the derivative bounds (one
    with its own runner), or activations from which the layer-bound method would decide differently."""
    from ..jacobian import get_jacobian_method

    H = network.n_layers
    if H < 2 or get_jacobian_method(method).run is not None:
        return None
    if _crown_choice(network.activations[: H - 2]) != _crown_choice(network.activations):
        return None
    return Network(network.weights[: H - 1], network.biases[: H - 1], network.activations[: H - 2],
                   input_spec=network.input_spec, validate=False)


class _BoundsCache:
    """A least-recently-used store of hidden-layer bounds, keyed by (network, centre, p, method, radius) digests,
    holding at most ``max_bytes`` of bound arrays (an entry larger than that is not kept); thread-safe."""

    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self._items: OrderedDict = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()  # batches run items on threads too

    @staticmethod
    def _size(lb) -> int:
        return sum(np.asarray(a).nbytes for a in (*lb.lower, *lb.upper))

    def get(self, key):
        with self._lock:
            lb = self._items.get(key)
            if lb is not None:
                self._items.move_to_end(key)
            return lb

    def put(self, key, lb) -> None:
        size = self._size(lb)
        with self._lock:
            if size > self.max_bytes or key in self._items:
                return
            self._items[key] = lb
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, old = self._items.popitem(last=False)
                self._bytes -= self._size(old)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0

    def __len__(self) -> int:
        return len(self._items)


LAYER_BOUNDS_CACHE = _BoundsCache(64 * 2**20)
"""Hidden-layer bounds of the regions evaluated by the grid and replay searches in this process (64 MiB at most), shared
by the targets of one input: they do not depend on the target."""


@dataclass
class LocalConstants:
    """Certified local constants of the rows of ``C f`` (margins ``f_c - f_j``), cached per radius.

    Calling it with a radius returns the per-row constants, shape ``(m,)``: the better of Proposition 2 /
    Algorithm 2 per row (``LipschitzPoint.row_norms``) and the naive global constant of that row.

    Every evaluation computes the layer bounds of the hidden layers only (the output layer's are not used by
    the Jacobian bounds).  With ``reuse`` (every search but ``"paper"``) it also reuses earlier work where the result
    provably does not change (module docstring, "Reuse"): hidden-layer bounds of the same region computed for
    another target of the same input (:data:`LAYER_BOUNDS_CACHE`), and the Jacobian / Algorithm 2 part of an
    earlier radius whose derivative bounds are the same bytes.  ``evaluations`` counts the radii evaluated,
    ``jacobian_runs`` the Jacobian computations actually run and ``layer_bound_runs`` the layer bounds actually
    computed.
    """

    network: Network
    x0: np.ndarray
    C: np.ndarray
    p: float
    method: str
    layer_bounds: str | None
    reuse: bool = False
    cache: dict = field(default_factory=dict)
    evaluations: int = 0
    jacobian_runs: int = 0
    layer_bound_runs: int = 0
    patterns: dict = field(default_factory=dict)

    def __post_init__(self):
        from ..lipschitz_norms import naive_constant

        self.naive = np.array([naive_constant(self.network.with_outputs(self.C[i : i + 1]), self.p)
                               for i in range(self.C.shape[0])])
        self._hidden = _hidden_network(self.network, self.method)
        if self._hidden is not None:
            from ..jacobian.prepare import default_layer_bound_method
            from ..layer_bounds.base import LAYER_BOUND_METHODS

            lb = self.layer_bounds
            self._lb_name = default_layer_bound_method() if lb is None else LAYER_BOUND_METHODS.resolve(lb)
            self._region_key = (_digest(*self.network.weights, *self.network.biases),
                                _digest(np.asarray(self.x0, dtype=np.float64)), float(self.p), self._lb_name)

    def __call__(self, r: float) -> np.ndarray:
        r = float(r)
        if r not in self.cache:
            rows = self._plain(r) if self._hidden is None else self._reused(r)
            self.cache[r] = np.minimum(rows, self.naive)
            self.evaluations += 1
        return self.cache[r]

    def _plain(self, r: float, layer_bounds=None) -> np.ndarray:
        from ..lipschitz import lipschitz

        res = lipschitz(self.network, self.x0, r, self.p, method=self.method,
                        layer_bounds=self.layer_bounds if layer_bounds is None else layer_bounds, outputs=self.C)
        self.jacobian_runs += 1
        if layer_bounds is None:
            self.layer_bound_runs += 1
        return np.asarray(res.points[0].row_norms, dtype=np.float64)

    def _reused(self, r: float) -> np.ndarray:
        from ..jacobian.derivative_bounds import derivative_bounds_for
        from ..layer_bounds import layer_bounds as compute_layer_bounds

        key = self._region_key + (r,)
        lb = LAYER_BOUNDS_CACHE.get(key) if self.reuse else None
        if lb is None:
            lb = compute_layer_bounds(self._hidden, self.x0, r, self.p, method=self._lb_name)
            self.layer_bound_runs += 1
            if self.reuse:
                LAYER_BOUNDS_CACHE.put(key, lb)
        if not self.reuse:
            return self._plain(r, lb)
        db = derivative_bounds_for(self.network, lb)
        pattern = _digest(*(a for pair in db for a in pair))
        if pattern not in self.patterns:
            self.patterns[pattern] = self._plain(r, lb)
        return self.patterns[pattern]

    def radius(self, g0: np.ndarray) -> float:
        """Certified radius from every evaluated radius: the smallest over rows of :func:`integral_radius`."""
        rs = sorted(r for r in self.cache if r > 0)
        if not rs:
            return 0.0
        Ls = np.array([self.cache[r] for r in rs])
        return min(integral_radius(rs, Ls[:, i], float(g0[i])) for i in range(len(g0)))


# -- searches -------------------------------------------------------------------------------------------------

SearchFn = Callable[..., float]
SEARCHES: dict[str, SearchFn] = {}
"""Registry: search name -> ``fn(lc: LocalConstants, g0 (m,), r_cap, **options) -> radius``."""

SEARCH_REVISIONS: dict[str, int] = {"grid": 2, "replay": 1, "paper": 1}
"""Search name -> revision of the procedure behind it, part of a batch job's identity
(:class:`recurjac_scale.applications.batch.BatchJob`), so that a store written by another procedure under the same
name is not resumed as if it were this one.  Revision 1 of ``grid`` was today's ``replay``; raise a revision whenever a
search can return a different radius for the same arguments."""


def _register_search(name):
    def deco(fn):
        SEARCHES[name] = fn
        return fn

    return deco


@_register_search("grid")
def _grid_search(lc: LocalConstants, g0, r_cap, *, geometric=8, budget=None, grad_norm=None, **_):
    """Geometric descent ``r_cap 2^-i`` until a radius at or below the current certified radius has been
    evaluated (at most ``geometric`` points), then greedy bisection up to ``budget`` evaluations: each new radius
    halves the grid interval below the current radius where the stand-in step function most overestimates
    (interval width times the rise of the constant across it; ``grad_norm``, the exact gradient norm, is the value
    at 0); ``budget`` defaults to :data:`GRID_BUDGET`."""
    budget = GRID_BUDGET if budget is None else budget
    if not r_cap > 0:
        return 0.0
    R = 0.0
    for r in r_cap * 2.0 ** -np.arange(int(geometric)):
        lc(r)
        R = lc.radius(g0)
        if r <= R:
            break
    l0 = np.zeros(len(g0)) if grad_norm is None else np.asarray(grad_norm, dtype=np.float64)
    while lc.evaluations < int(budget):
        rs = sorted(r for r in lc.cache if r > 0)
        Ls = np.array([lc.cache[r] for r in rs])
        env = np.minimum.accumulate(Ls[::-1], axis=0)[::-1]
        best, best_area, prev, prev_e = None, 0.0, 0.0, l0
        for r, e in zip(rs, env):
            if prev >= R:
                break
            rise = float(np.max(np.where(np.isfinite(e), e - prev_e, 1e300)))
            area = (min(r, R) - prev) * max(rise, 0.0)
            if area > best_area:
                best, best_area = 0.5 * (prev + r), area
            prev, prev_e = r, e
        if best is None or best in lc.cache:
            break
        lc(best)
        R = lc.radius(g0)
    return R


def _paper_total(values, R: float, n: int) -> np.ndarray:
    """The authors' right-end-point sum ``sum_i L(R i / n) R / n`` (per row), in their order of summation;
    ``values[i - 1]`` is the constant (or a lower bound of it) at ``R * i / n``."""
    total = np.zeros(len(values[0]))
    for v in values:
        total = total + v * (R / n)
    return total


def _paper_holds(total: np.ndarray, g0, n: int) -> bool:
    return bool(np.all(total * (1.0 + 4 * n * 2.0**-53) < g0))


def _paper_points(R: float, n: int) -> list:
    return [R * i / n for i in range(1, n + 1)]


def _paper_probe(lc: LocalConstants, g0, R: float, n: int) -> bool:
    return _paper_holds(_paper_total([lc(t) for t in _paper_points(R, n)], R, n), g0, n)


class _Stop(Exception):
    """Raised by a probe to end :func:`_bracket_bisect` early (its ``best`` so far is returned)."""


def _bracket_bisect(probe, *, steps: int, eps0: float, state: dict) -> float:
    """The authors' driver (ALGORITHM.md, "Robustness search"): ``R = eps0`` multiplied by 10 while probes
    succeed and divided by 10 while they fail (8 rounds), then ``steps`` bisection steps; the largest success.

    ``probe(R, last_bracket)`` returns success; ``last_bracket`` is true for the ninth bracketing probe, the only
    probe that may be followed by a larger one after failing.  ``state["best"]`` holds the largest success so far
    (returned if ``probe`` raises :class:`_Stop`)."""
    state["best"] = 0.0

    def run():
        R = float(eps0)
        ok = probe(R, False)
        lo = hi = None
        for k in range(8):  # bracket: x10 while succeeding, /10 while failing
            if ok:
                state["best"] = max(state["best"], R)
                lo = R
                if hi is not None:
                    break
                R *= 10.0
            else:
                hi = R
                if lo is not None:
                    break
                R /= 10.0
            ok = probe(R, k == 7)
        if ok:
            state["best"] = max(state["best"], R)
            lo = R if lo is None or R > lo else lo
        if lo is None:
            lo = 0.0
        if hi is None:
            return
        for _ in range(int(steps)):
            mid = 0.5 * (lo + hi)
            if probe(mid, False):
                state["best"] = max(state["best"], mid)
                lo = mid
            else:
                hi = mid

    try:
        run()
    except _Stop:
        pass
    return state["best"]


@_register_search("paper")
def _paper_search(lc: LocalConstants, g0, r_cap, *, n=15, steps=15, eps0=0.01, **_):
    """The authors' procedure (ALGORITHM.md, "Robustness search"); each probe is a fresh set of ``n``
    evaluations (its cache entries are not reused across probes, as in the reference)."""

    def probe(R, last_bracket):
        lc.cache.clear()
        return _paper_probe(lc, g0, R, int(n))

    return _bracket_bisect(probe, steps=steps, eps0=eps0, state={})


@_register_search("replay")
def _dominating_search(lc: LocalConstants, g0, r_cap, *, n=15, steps=15, eps0=0.01, budget=None, grad_norm=None,
                       **kw):
    """:func:`_grid_search` with ``budget`` evaluations (:data:`REPLAY_BUDGET` by default), then the authors' driver
    replayed with probes decided by the stand-in certificate where it suffices (see the module docstring, "never
    below the paper's search"); returns the larger of the replay's best success and the stand-in radius of every radius
    evaluated."""
    n = int(n)
    _grid_search(lc, g0, r_cap, budget=REPLAY_BUDGET if budget is None else budget, grad_norm=grad_norm, **kw)
    # a certified lower bound of every computed constant (it bounds the gradient norm at x0 from above)
    lower = (np.zeros(len(g0)) if grad_norm is None else np.asarray(grad_norm, dtype=np.float64)) * (1.0 - 1e-9)
    lower = np.maximum(lower, 0.0)

    def standin(R):
        return lc.radius(g0) >= R

    def paper_fails(pts, R):
        # the authors' sum with the unevaluated constants replaced by lower bounds; IEEE rounding is monotone,
        # so this computed sum is <= the one the authors' probe computes: if it fails, theirs fails
        vals = [lc.cache[t] if t in lc.cache else lower for t in pts]
        return not _paper_holds(_paper_total(vals, R, n), g0, n)

    def predicted_total(R):
        # the authors' sum at R estimated from the evaluated constants (linear interpolation): a guess, used
        # only to choose where to spend evaluations, never to decide
        rs = sorted(lc.cache)
        Ls = np.array([lc.cache[r] for r in rs])
        ts = np.array(_paper_points(R, n))
        vals = [np.interp(ts, [0.0] + rs, np.concatenate([[lower[i]], Ls[:, i]])) for i in range(len(g0))]
        return np.array(vals).T

    def try_divergence():
        # the largest success on the path not yet known to be a success of the authors' probe: prove that their
        # probe fails there (evaluating its points, largest first) -> stop
        R = state.get("unproven")
        if R is None or R in tried:
            return
        tried.add(R)
        if _paper_holds(_paper_total(predicted_total(R), R, n), g0, n):
            return
        pts = _paper_points(R, n)
        while not paper_fails(pts, R):
            missing = [t for t in pts if t not in lc.cache]
            if not missing:
                return
            lc(max(missing))
        raise _Stop

    def probe(R, last_bracket):
        pts = _paper_points(R, n)
        if not last_bracket and standin(R):
            if paper_fails(pts, R):
                state["best"] = max(state["best"], R)
                raise _Stop
            state["unproven"] = max(state.get("unproven", 0.0), R)
            return True
        if not paper_fails(pts, R):
            try_divergence()
        while True:
            if paper_fails(pts, R):
                return False
            missing = [t for t in pts if t not in lc.cache]
            if not missing:
                # every point evaluated: the authors' decision exactly (their probe is itself a certificate)
                return _paper_probe(lc, g0, R, n)
            lc(max(missing))
            if not last_bracket and standin(R):
                if paper_fails(pts, R):
                    state["best"] = max(state["best"], R)
                    raise _Stop
                state["unproven"] = max(state.get("unproven", 0.0), R)
                return True

    state: dict = {}
    tried: set = set()

    best = _bracket_bisect(probe, steps=steps, eps0=eps0, state=state)
    return max(best, lc.radius(g0))
