"""Anytime, distributed branch-and-bound for the local Lipschitz constant of one output:
:func:`bab_lipschitz`.

The search keeps a *frontier* of parts of ``S = B_p[x0, eps] ∩ D`` (:mod:`recurjac_scale.bab.parts`), each with a
certified upper bound of ``||∇f||_q`` on it.  Each round takes the parts with the largest bounds, splits each in two
(the sign of an unstable neuron, or an input coordinate), and bounds the children in dask tasks (a list of
parts per task; threads, processes or a ``dask.distributed`` cluster).  A child's bound is the smaller of its own
and its parent's (both hold on the child).  Reported:

- ``upper`` = max over the frontier and the closed parts of their bounds: a certified upper bound of the local
  Lipschitz constant that only decreases from round to round (it starts at the Jacobian method's bound on S);
- ``lower`` = the largest exact gradient norm found at a point of S (an attack by smoothed gradient ascent,
  :mod:`recurjac_scale.bab.attack`, and the points met while bounding parts): ``lower <= L* <= upper``.

It stops when ``upper <= (1 + gap) * lower``, at the time budget, when the frontier is empty (every part closed or
proved empty: ``upper`` is then the exact constant up to the bounds of the closed parts), or at ``max_frontier``
parts.  With ``checkpoint=PATH`` the frontier and the bounds are written there (JSON with a SHA-256 checksum of its
content, written to a temporary name then renamed) every ``checkpoint_every`` seconds and at the end; a run given an
existing checkpoint of the same problem resumes from it (a checkpoint of another problem, or a corrupted one, is
refused).
"""

from __future__ import annotations

import hashlib
import heapq
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InputError, StoreError
from ..layer_bounds.base import Region, dual_norm, get_layer_bound_method, parse_norm
from ..network.model import Network
from ..paths import write_atomic
from .lp import resolve_lp_mode
from .parts import SIGN_MAX_INPUTS, SIGN_SEARCH, SPLIT_MODES, BabProblem, bound_parts, relu_alphas, root_part, split_part

__all__ = ["BabResult", "bab_lipschitz", "CHECKPOINT_FORMAT"]

CHECKPOINT_FORMAT = "recurjac-scale-bab-checkpoint"
CHECKPOINT_VERSION = 1
WALK_STARTS = 64
"""Region walks started from sample points of distinct activation patterns (within the walk's time budget)."""


def _enc(v: float):
    v = float(v)
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return v


def _dec(v) -> float:
    return float(v)


@dataclass(frozen=True)
class BabResult:
    """The result of :func:`bab_lipschitz`.

    Attributes
    ----------
    upper : float
        Certified upper bound of the local Lipschitz constant ``max_{x in S} ||∇f(x)||_q``.
    lower : float
        The largest exact ``||∇f(x)||_q`` found at a point of S (a lower bound).
    root_upper : float
        The Jacobian method's bound on all of S (before any split).
    status : str
        Why it stopped: ``"gap"``, ``"time"``, ``"exhausted"`` (frontier empty) or ``"frontier_limit"``.
    lower_x : ndarray, shape (n_0,)
        Where ``lower`` was found.
    n_bounded, n_frontier, n_closed, n_empty, rounds : int
        Parts bounded (this run and any resumed ones), left open, closed (one activation pattern), proved empty;
        rounds of the search.
    method, layer_bounds, split : str
    p, q, eps : float
    time_s, cpu_s : float
        Wall and CPU time of this run (CPU of the calling process only; workers' CPU is not included).
    elapsed_total_s : float
        Wall time including the runs this one resumed from.
    history : tuple of (float, float, float)
        ``(elapsed seconds, upper, lower)`` after each round.
    scheduler : dict
        Where the parts were bounded.
    resumed : bool
        Whether the run started from a checkpoint.
    lp_tighten : str
        The LP tightening mode the parts were bounded with (``off``, ``splits`` or ``all``).
    """

    upper: float
    lower: float
    root_upper: float
    status: str
    lower_x: np.ndarray
    n_bounded: int
    n_frontier: int
    n_closed: int
    n_empty: int
    rounds: int
    method: str
    layer_bounds: str
    split: str
    p: float
    q: float
    eps: float
    time_s: float
    cpu_s: float
    elapsed_total_s: float
    history: tuple = ()
    scheduler: dict = field(default_factory=dict)
    resumed: bool = False
    lp_tighten: str = "off"

    @property
    def ratio(self) -> float:
        """``upper / lower`` (inf when ``lower`` is 0)."""
        return self.upper / self.lower if self.lower > 0 else math.inf

    def to_dict(self) -> dict:
        return {
            "upper": _enc(self.upper),
            "lower": _enc(self.lower),
            "ratio": _enc(self.ratio),
            "root_upper": _enc(self.root_upper),
            "status": self.status,
            "lower_x": [float(v) for v in self.lower_x],
            "n_bounded": self.n_bounded,
            "n_frontier": self.n_frontier,
            "n_closed": self.n_closed,
            "n_empty": self.n_empty,
            "rounds": self.rounds,
            "method": self.method,
            "layer_bounds": self.layer_bounds,
            "split": self.split,
            "p": "inf" if self.p == math.inf else int(self.p),
            "q": "inf" if self.q == math.inf else int(self.q),
            "eps": _enc(self.eps),
            "time_s": self.time_s,
            "cpu_s": self.cpu_s,
            "elapsed_total_s": self.elapsed_total_s,
            "history": [[float(t), _enc(u), _enc(lo)] for t, u, lo in self.history],
            "scheduler": dict(self.scheduler),
            "resumed": self.resumed,
            "lp_tighten": self.lp_tighten,
        }


def _fingerprint(prob: BabProblem) -> str:
    h = hashlib.sha256()
    for w, b in zip(prob.network.weights, prob.network.biases):
        h.update(np.ascontiguousarray(w, np.float64).tobytes())
        h.update(np.ascontiguousarray(b, np.float64).tobytes())
    spec = prob.network.input_spec
    for v in (spec.domain_lower, spec.domain_upper):
        if v is not None:
            h.update(np.ascontiguousarray(v, np.float64).tobytes())
    h.update(np.ascontiguousarray(prob.x0, np.float64).tobytes())
    h.update(json.dumps([_enc(prob.eps), _enc(prob.p), prob.method, prob.layer_bound_method, prob.split, prob.branching,
                         prob.sign_bound, prob.sign_search, prob.lp_tighten,
                         [list(kv) for kv in prob.layer_bound_options],
                         [a.to_spec() for a in prob.network.activations]], sort_keys=True, default=str).encode())
    return h.hexdigest()


def _write_checkpoint(path: Path, state: dict) -> None:
    body = json.dumps(state, sort_keys=True, separators=(",", ":"))
    doc = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
           "sha256": hashlib.sha256(body.encode()).hexdigest(), "state": state}
    write_atomic(path, lambda fh: fh.write(json.dumps(doc, sort_keys=True, separators=(",", ":"))))


def _read_checkpoint(path: Path, fingerprint: str) -> dict:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise StoreError(f"checkpoint {path} cannot be read as JSON ({exc}); remove it to start afresh") from None
    if not isinstance(doc, dict) or doc.get("format") != CHECKPOINT_FORMAT:
        raise StoreError(f"{path} is not a branch-and-bound checkpoint (format {doc.get('format') if isinstance(doc, dict) else None!r})")
    if doc.get("version") != CHECKPOINT_VERSION:
        raise StoreError(f"checkpoint {path} has version {doc.get('version')!r}; this version reads {CHECKPOINT_VERSION}")
    state = doc.get("state")
    body = json.dumps(state, sort_keys=True, separators=(",", ":"))
    if hashlib.sha256(body.encode()).hexdigest() != doc.get("sha256"):
        raise StoreError(f"checkpoint {path} fails its SHA-256 checksum (corrupted or edited); remove it to start afresh")
    if state.get("fingerprint") != fingerprint:
        raise InputError(
            f"checkpoint {path} belongs to another problem (network, input, eps, norm, method, split or sign search "
            "differ); give another --checkpoint path or remove it"
        )
    return state


def _resolve_split(split: str, alphas, p: float) -> str:
    s = str(split).strip().lower()
    if s not in SPLIT_MODES:
        raise InputError(f"split={split!r}; accepted: {', '.join(SPLIT_MODES)}")
    if s == "auto":
        s = "neuron" if alphas is not None else "input"
    if s == "neuron" and alphas is None:
        raise InputError("split='neuron' needs relu / leaky_relu hidden layers (and no output activation); use split='input'")
    if s == "input" and p != math.inf:
        raise InputError(f"split='input' needs p=inf (box parts), got p={p:g}; use split='neuron'")
    return s


BRANCHING = ("score", "layer")


def _check_branching(b: str) -> str:
    s = str(b).strip().lower()
    if s not in BRANCHING:
        raise InputError(f"branching={b!r}; accepted: {', '.join(BRANCHING)}")
    return s


def _check_sign_search(n) -> int:
    try:
        v = int(n)
    except (TypeError, ValueError):
        v = -1
    if v < 0 or isinstance(n, bool) or float(n) != v:
        raise InputError(f"sign_search={n!r}; accepted: an integer >= 0 (node bounds per part; 0: off)")
    return v


def _executor(scheduler, workers, client):
    from ..engine.schedulers import open_executor

    return open_executor(scheduler or "threads", workers=workers, client=client, dashboard=False)


def _bound_parts_json(prob: BabProblem, text: str) -> list:
    return bound_parts(prob, json.loads(text))


def _run_round(ex, prob: BabProblem, chunks: list[list]) -> list[list]:
    """Bound the parts of every chunk, one task per chunk.  Keys are unique per round (a distributed scheduler
    keeps results by key: a repeated key would return an earlier round's parts)."""
    import uuid

    tag = uuid.uuid4().hex
    dsk = {f"bab-problem-{tag}": prob}
    keys = []
    for i, chunk in enumerate(chunks):
        key = (f"bab-parts-{tag}", i)
        dsk[key] = (_bound_parts_json, f"bab-problem-{tag}", json.dumps(chunk))
        keys.append(key)
    return ex.run(dsk, keys)


def bab_lipschitz(
    network: Network,
    x0,
    eps: float,
    p=math.inf,
    *,
    outputs=0,
    method: str | None = None,
    layer_bounds: str = "crown",
    layer_bound_options: dict | None = None,
    split: str = "auto",
    branching: str = "score",
    time_budget: float = 60.0,
    gap: float = 0.01,
    scheduler: str | None = "threads",
    workers: int | None = None,
    client=None,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: float = 10.0,
    parts_per_task: int | None = None,
    max_frontier: int = 200_000,
    attack_steps: int = 60,
    attack_restarts: int = 16,
    seed: int = 0,
    max_rounds: int | None = None,
    dives: bool = True,
    walk: bool = True,
    sign_bound: bool = True,
    sign_search: int | None = None,
    lp_tighten: str | None = None,
    progress=None,
) -> BabResult:
    """Branch-and-bound bounds ``lower <= max_{x in S} ||∇f(x)||_q <= upper`` of the local Lipschitz constant of
    one output over ``S = B_p[x0, eps] ∩ D`` (module docstring).

    Parameters
    ----------
    network : Network
    x0 : array_like, shape (n_0,)
    eps : float
        Radius (finite, or ``inf`` with a bounded domain).
    p : {1, 2, inf}
        Input norm (``q`` its dual); input splits need ``inf``.
    outputs : int, (c, j) or array (1, n_H)
        One output row (:func:`recurjac_scale.jacobian.output_matrix`).
    method : str, optional
        Jacobian method bounding each part.  Default: ``linear-jacobian`` for ``p = inf`` on networks with at most
        ``SIGN_MAX_INPUTS`` (64) inputs, where the search over sign vectors of its linear objectives
        (``sign_search``) bounds the parts far tighter than ``recurjac-b`` (``benchmarks/results/bab.md``);
        ``recurjac-b`` otherwise (``linear-jacobian`` costs about 1 s per part on 784-input MNIST networks).
        Both get the parts' clipped layer bounds and the split neurons' fixed derivatives.
    layer_bounds : str
        Pre-activation bound method for the parts (default ``crown``).
    layer_bound_options : dict, optional
        Its options (e.g. ``{"never_looser_than_fastlin": False}``: crown without its Fast-Lin pass, faster).
    split : {"auto", "neuron", "input"}
        ``auto``: neuron splits for relu / leaky_relu networks, input splits otherwise.
    branching : {"score", "layer"}
        Neuron choice (:class:`~recurjac_scale.bab.parts.BabProblem`).
    time_budget : float
        Seconds of wall time for this run (> 0); a round in flight is finished.
    gap : float
        Stop when ``upper <= (1 + gap) * lower`` (>= 0).
    scheduler, workers, client
        Where parts are bounded: ``threads`` (default), ``synchronous``, ``processes``, ``distributed`` (a
        LocalCluster of ``workers`` processes on 127.0.0.1), a cluster address, or a ``distributed.Client``.
    checkpoint : path, optional
        JSON checkpoint of the frontier; an existing one of the same problem is resumed.
    checkpoint_every : float
        Seconds between checkpoint writes.
    parts_per_task : int, optional
        Parts bounded per dask task (default: adapted so a task takes about 0.3 s).
    max_frontier : int
        Stop when the frontier holds this many parts (memory guard).
    attack_steps, attack_restarts, seed : int
        The lower-bound attack (:func:`recurjac_scale.bab.attack.gradient_norm_attack`).
    max_rounds : int, optional
        Stop after this many rounds of this run (testing, interruption).
    dives : bool
        Besides the best-first parts, split one part per round along a greedy path (the child with the larger
        bound) down to a leaf: its activation pattern gives an attained lower bound early.
    walk : bool
        ReLU family: after the attack, an ascent over adjacent linear regions
        (:func:`recurjac_scale.bab.attack.region_walk`) from the attack's point and the best points of a sample
        of S, and from every better point the parts give (attained values: lower bounds).
    sign_bound : bool
        ``p = inf``, at most ``SIGN_MAX_INPUTS`` (64) inputs: also bound each part with one sign vector for all
        gradient coordinates (:mod:`recurjac_scale.bab.signs`); the smaller bound is kept.
    sign_search : int, optional
        With ``sign_bound`` and ``method="linear-jacobian"``: node bounds per part of the search over sign vectors
        (:func:`recurjac_scale.bab.signs.l1_sign_search`; default ``SIGN_SEARCH``, 0: off).
    lp_tighten : {"off", "splits", "all"}, optional
        ReLU family: tighten the parts' unstable neurons by certified LPs over the split constraints
        (:mod:`recurjac_scale.bab.lp`; ``splits``: parts with splits, from their earliest split layer on).
        Default: ``splits`` for networks with at most ``LP_MAX_INPUTS`` (64) inputs and ``LP_MAX_HIDDEN`` (512)
        hidden neurons, else ``off`` (always ``off`` for other activations).
    progress : callable, optional
        Called after each round with ``(elapsed_s, upper, lower, n_frontier)``.

    Returns
    -------
    BabResult
    """
    from ..jacobian import get_jacobian_method, output_matrix
    from ..layer_bounds import layer_bounds as compute_layer_bounds
    from .attack import gradient_norm_attack, region_walk

    t0, c0 = time.perf_counter(), time.process_time()
    p = parse_norm(p)
    q = dual_norm(p)
    try:
        time_budget = float(time_budget)
        gap = float(gap)
    except (TypeError, ValueError):
        raise InputError(f"time_budget={time_budget!r} / gap={gap!r} must be numbers") from None
    if not (time_budget > 0) or math.isnan(time_budget):
        raise InputError(f"time_budget={time_budget!r}; accepted: seconds > 0")
    if not (gap >= 0) or math.isnan(gap):
        raise InputError(f"gap={gap!r}; accepted: a tolerance >= 0 (stop when upper <= (1 + gap) lower)")
    if int(max_frontier) < 2:
        raise InputError(f"max_frontier={max_frontier!r}; accepted: an integer >= 2")
    if method is None:
        method = "linear-jacobian" if (p == math.inf and network.n_inputs <= SIGN_MAX_INPUTS) else "recurjac-b"
    method = get_jacobian_method(method).name
    lbm = str(layer_bounds).strip().lower()
    get_layer_bound_method(lbm)
    net = network.materialize() if network.is_lazy else network
    C = output_matrix(outputs, net.n_outputs)
    if C.shape[0] != 1:
        raise InputError(f"branch-and-bound bounds one output row, got {C.shape[0]}; give outputs=K or (c, j)")
    net1 = net.with_outputs(C)
    region = Region.of(net1, x0, eps, p)
    lo_box, hi_box = region.box
    if not (np.isfinite(lo_box).all() and np.isfinite(hi_box).all()):
        raise InputError("branch-and-bound needs a bounded region: finite eps, or a bounded input domain")
    alphas = relu_alphas(net1)
    split = _resolve_split(split, alphas, p)
    lb_opts = tuple(sorted((layer_bound_options or {}).items()))
    root_lb = compute_layer_bounds(net1, region.x0, region.eps, p, method=lbm, **dict(lb_opts))
    prob = BabProblem(
        network=net1, x0=region.x0, eps=region.eps, p=p, q=q, method=method, layer_bound_method=lbm,
        root_lower=tuple(root_lb.lower), root_upper=tuple(root_lb.upper), split=split, alphas=alphas,
        branching=_check_branching(branching), layer_bound_options=lb_opts, sign_bound=bool(sign_bound),
        sign_search=SIGN_SEARCH if sign_search is None else _check_sign_search(sign_search),
        lp_tighten=resolve_lp_mode(lp_tighten, alphas, net1),
    )
    fp = _fingerprint(prob)
    ck = Path(checkpoint) if checkpoint is not None else None
    state = _read_checkpoint(ck, fp) if ck is not None and ck.exists() else None
    resumed = state is not None

    # lower bound: the attack (also on resume: cheap, and the checkpoint's point is kept)
    widths = [np.asarray(u) - np.asarray(lo) for lo, u in zip(root_lb.lower[:-1], root_lb.upper[:-1])]
    att_budget = min(0.1 * time_budget, 10.0)
    lower, lower_x = gradient_norm_attack(
        net1, region, q, alphas=alphas, layer_widths=widths, restarts=attack_restarts, steps=attack_steps,
        rng=np.random.default_rng(seed), time_budget=att_budget,
    )
    if alphas is not None and walk:
        # ascent over adjacent linear regions from the attack's point and the best points of a sample
        from ..testing import sample_region

        # starts: the attack's point, then the best sample points of distinct activation patterns
        # (for p = inf also from the best vertices of the box: gradient norms there are often larger; the two
        # lists interleaved, best first)
        wrng = np.random.default_rng(seed + 1)
        pools = [sample_region(region, 4096, wrng)]
        if p == math.inf:
            pools.append(np.where(wrng.uniform(size=(4096, lo_box.size)) < 0.5, lo_box, hi_box))
        picked = []
        for S in pools:
            sc = np.linalg.norm(net1.jacobian(S)[:, 0, :], ord=q, axis=1)
            order = np.argsort(-sc, kind="stable")
            keys = np.hstack([z[order] > 0 for z in net1.pre_activations(S)[:-1]])
            _, first = np.unique(keys, axis=0, return_index=True)
            picked.append(S[order[np.sort(first)][:WALK_STARTS]])
        n_max = max(len(a) for a in picked)
        starts = np.vstack([lower_x[None, :]] + [a[i:i + 1] for i in range(n_max) for a in picked if i < len(a)])
        w, wx = region_walk(net1, region, q, starts, alphas=alphas, time_budget=min(0.1 * time_budget, 10.0))
        if w > lower:
            lower, lower_x = w, wx
    frontier: list = []
    seq = 0
    closed_upper = -math.inf
    n_bounded = n_closed = n_empty = rounds_total = 0
    history: list = []
    elapsed_before = 0.0
    root_upper = math.nan
    if resumed:
        if _dec(state["lower"]) > lower:
            lower, lower_x = _dec(state["lower"]), np.asarray(state["lower_x"], np.float64)
        closed_upper = _dec(state["closed_upper"])
        n_bounded, n_closed, n_empty = state["n_bounded"], state["n_closed"], state["n_empty"]
        rounds_total = state["rounds"]
        elapsed_before = float(state["elapsed"])
        root_upper = _dec(state["root_upper"])
        history = [tuple(_dec(v) for v in h) for h in state["history"]]
        for e in state["frontier"]:
            heapq.heappush(frontier, (-_dec(e["bound"]), seq, e))
            seq += 1

    walked = lower  # the lower bound after the last region walk
    dive = None  # the part being dived into (not in the heap): (bound, entry)

    def upper_now() -> float:
        top = -frontier[0][0] if frontier else -math.inf
        return max(top, closed_upper, dive[0] if dive is not None else -math.inf)

    def save(now: float) -> None:
        if ck is None:
            return
        st = {
            "fingerprint": fp,
            # in the heap's order (bound, then insertion), so a resumed run pops the same parts first
            "frontier": [e for _, _, e in sorted(frontier, key=lambda it: it[:2])]
            + ([dive[1]] if dive is not None else []),
            "closed_upper": _enc(closed_upper),
            "lower": _enc(lower),
            "lower_x": [float(v) for v in lower_x],
            "n_bounded": n_bounded, "n_closed": n_closed, "n_empty": n_empty, "rounds": rounds_total,
            "elapsed": elapsed_before + now, "root_upper": _enc(root_upper),
            "history": [[float(t), _enc(u), _enc(lo)] for t, u, lo in history],
        }
        _write_checkpoint(ck, st)

    def absorb(parent_bound: float, part: dict, res: dict):
        """Record a bounded part; returns its open frontier entry ``(bound, entry)`` or ``None``."""
        nonlocal closed_upper, n_bounded, n_closed, n_empty, lower, lower_x
        n_bounded += 1
        if res["x"] is not None and res["lower"] > lower:
            lower, lower_x = float(res["lower"]), np.asarray(res["x"], np.float64)
        if res["bound"] is None:
            n_empty += 1
            return None
        b = min(float(res["bound"]), parent_bound)
        if res["branch"] is None:
            n_closed += 1
            closed_upper = max(closed_upper, b)
            return None
        return b, {"part": part, "bound": _enc(b), "branch": res["branch"]}

    def push(item) -> None:
        nonlocal seq
        heapq.heappush(frontier, (-item[0], seq, item[1]))
        seq += 1

    status = "time"
    with _executor(scheduler, workers, client) as ex:
        slots = max(1, ex.total_threads)
        per_task = int(parts_per_task) if parts_per_task else 4
        if not resumed:
            part = root_part()
            (res,), = _run_round(ex, prob, [[part]])
            root_upper = float(res["bound"]) if res["bound"] is not None else -math.inf
            item = absorb(math.inf, part, res)
            if item is not None:
                push(item)
        last_save = time.perf_counter()
        rounds = 0
        while True:
            now = time.perf_counter() - t0
            up = upper_now()
            if not frontier and dive is None:
                status = "exhausted"
                break
            if lower > 0 and up <= (1.0 + gap) * lower:
                status = "gap"
                break
            if now >= time_budget:
                status = "time"
                break
            if len(frontier) >= max_frontier:
                status = "frontier_limit"
                break
            if max_rounds is not None and rounds >= max_rounds:
                status = "time"
                break
            # best-first: the parts with the largest bounds; plus one dive (greedy descent to a leaf, whose
            # pattern gives a good attained lower bound early)
            if dive is None and dives and frontier:
                nb, _, e = heapq.heappop(frontier)
                dive = (-nb, e)
            n_parents = max(1, (slots * per_task) // 2)
            parents = [heapq.heappop(frontier) for _ in range(min(n_parents, len(frontier)))]
            if dive is not None:
                parents.append((-dive[0], -1, dive[1]))
                dive = None
            children = []
            for nb, sq, e in parents:
                for ch in split_part(prob, e["part"], e["branch"]):
                    children.append((-nb, ch, sq == -1))
            chunks = [children[i:i + per_task] for i in range(0, len(children), per_task)]
            tr = time.perf_counter()
            results = _run_round(ex, prob, [[c for _, c, _ in chunk] for chunk in chunks])
            dt = time.perf_counter() - tr
            dive_items = []
            for chunk, res_list in zip(chunks, results):
                for (pb, part, from_dive), res in zip(chunk, res_list):
                    item = absorb(pb, part, res)
                    if item is None:
                        continue
                    if from_dive:
                        dive_items.append(item)
                    else:
                        push(item)
            if dive_items:
                dive_items.sort(key=lambda it: -it[0])
                dive = dive_items[0]
                for it in dive_items[1:]:
                    push(it)
            if alphas is not None and walk and lower > walked:
                # a better point came from the parts: walk on from its region
                w, wx = region_walk(net1, region, q, lower_x[None, :], alphas=alphas,
                                    time_budget=min(0.02 * time_budget, 2.0))
                if w > lower:
                    lower, lower_x = w, wx
                walked = lower
            rounds += 1
            rounds_total += 1
            history.append((elapsed_before + time.perf_counter() - t0, upper_now(), lower))
            if progress is not None:
                progress(time.perf_counter() - t0, upper_now(), lower, len(frontier))
            if parts_per_task is None:  # aim at ~0.3 s per task, and rounds short enough to stop on time
                per_part = dt * slots / max(len(children), 1)
                per_task = int(min(64, max(1, 0.3 / max(per_part, 1e-4))))
            if time.perf_counter() - last_save >= checkpoint_every:
                save(time.perf_counter() - t0)
                last_save = time.perf_counter()
        sched = ex.describe()
    elapsed = time.perf_counter() - t0
    save(elapsed)
    up = upper_now()
    if up == -math.inf:  # every part proved empty cannot happen for a non-empty S; keep the root bound
        up = root_upper
    return BabResult(
        upper=float(up), lower=float(lower), root_upper=float(root_upper), status=status,
        lower_x=np.asarray(lower_x, np.float64), n_bounded=n_bounded, n_frontier=len(frontier) + (dive is not None), n_closed=n_closed,
        n_empty=n_empty, rounds=rounds_total, method=method, layer_bounds=lbm, split=split, p=p, q=q,
        eps=region.eps, time_s=elapsed, cpu_s=time.process_time() - c0, elapsed_total_s=elapsed_before + elapsed,
        history=tuple(history), scheduler=sched, resumed=resumed, lp_tighten=prob.lp_tighten,
    )
