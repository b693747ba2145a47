"""Scale benchmarks of issue 5 on the paper's CIFAR network shape (see benchmarks/cifar_setup.py).

Each subcommand measures one thing in its own process (so peak memory and numba warm-up are per measurement) and
writes one JSON file into ``$RECURJAC_BENCH_DIR/results`` (default ``<tmp>/recurjac_bench/results``); ``report``
turns them into ``benchmarks/results/scale.md``.  Run one heavy subcommand at a time (2-core machine).

Subcommands
-----------
``gemm``                 float64 GEMM rate (1 BLAS thread) and the numba compile time of the engine's kernels
``full``                 a complete engine run (Fast-Lip, RecurJac-B): total, per-layer-step, FLOPs, GFLOP/s, memory
``sample``               F0/F1: the plan's tasks for a measured fraction of its row blocks, every column block of
                         every layer step, then extrapolation to all rows (rows are independent: exact separation
                         of the work) and wall-time estimates for 8, 64, 512 workers from the task graph
``workers``              1 vs 2 LocalCluster workers on the same F0 fraction (wall time of the engine run)
``ooc``                  out-of-core: a 4-layer 8192-wide network, workers limited below its size, RecurJac-B
``sparse``               90%-pruned CIFAR layer vs its dense twin: one recursion-step GEMM with scipy.sparse vs BLAS
``report``               write benchmarks/results/scale.md from the JSON files
``report-ooc``           write benchmarks/results/scale_ooc.md from the out-of-core JSON files only
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

_HERE = Path(__file__).resolve().parent
_REPO = _HERE.parent
for p in (str(_REPO), str(_HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)

import cifar_setup  # noqa: E402

RADIUS_TARGETS = (0.05, 0.30, 1.0)


# -- measurement helpers ------------------------------------------------------------------------------------------


def results_dir() -> Path:
    d = cifar_setup.work_dir() / "results"
    d.mkdir(parents=True, exist_ok=True)
    return d


def machine() -> dict:
    """Machine, date, load, library versions and BLAS environment."""
    import dask
    import numba
    import scipy

    model = platform.processor()
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return {
        "date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu": model,
        "nproc": os.cpu_count(),
        "mem_total_gib": round(_meminfo_gib(), 1),
        "loadavg": list(os.getloadavg()),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "numba": numba.__version__,
        "dask": dask.__version__,
        "code_sha256": _code_hash(),
        "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE"),
        "OPENBLAS_L2_SIZE": os.environ.get("OPENBLAS_L2_SIZE"),
    }


def _code_hash() -> str:
    """Short SHA-256 of the package's Python sources (the tree changes during development: this ties a result to
    the code that produced it)."""
    import hashlib

    h = hashlib.sha256()
    for f in sorted((_REPO / "recurjac_scale").rglob("*.py")):
        h.update(str(f.relative_to(_REPO)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:12]


def _meminfo_gib() -> float:
    try:
        import psutil

        return psutil.virtual_memory().total / 2**30
    except ImportError:  # pragma: no cover
        return float("nan")


def gemm_rate(n: int = 2048, repeats: int = 5) -> dict:
    """Median float64 GEMM rate (GFLOP/s) with one BLAS thread, ``n x n @ n x n``."""
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n))
    b = rng.standard_normal((n, n))
    times = []
    with threadpool_limits(1, user_api="blas"):
        a @ b
        for _ in range(repeats):
            t = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t)
    med = float(np.median(times))
    return {"n": n, "seconds_median": med, "gflops": 2.0 * n**3 / med / 1e9, "repeats": repeats}


class _Sampler:
    """A background thread calling ``self._sample()`` (defined by each subclass: the memory samplers below) every
    ``interval`` seconds between ``__enter__`` and ``__exit__``."""

    def __init__(self, interval: float):
        self._interval = interval
        self._stop = threading.Event()

    def _run(self):
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self._interval)

    def __enter__(self):
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        return False


class PeakRSS(_Sampler):
    """Peak resident memory of this process and its children while the block runs (psutil, 20 ms sampling), and
    ``ru_maxrss`` of the process (whole lifetime)."""

    def __init__(self, interval: float = 0.02):
        import psutil

        super().__init__(interval)
        self._proc = psutil.Process()
        self.peak = 0
        self.baseline = 0

    def _rss(self) -> int:
        total = 0
        try:
            total = self._proc.memory_info().rss
            for c in self._proc.children(recursive=True):
                try:
                    total += c.memory_info().rss
                except Exception:  # noqa: BLE001 - a child that just exited
                    pass
        except Exception:  # noqa: BLE001
            pass
        return total

    def _sample(self):
        self.peak = max(self.peak, self._rss())

    def __enter__(self):
        self.baseline = self._rss()
        self.peak = self.baseline
        return super().__enter__()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        self.peak = max(self.peak, self._rss())
        self.ru_maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return False

    def to_dict(self) -> dict:
        return {"peak_rss_mib": self.peak / 2**20, "baseline_rss_mib": self.baseline / 2**20,
                "ru_maxrss_mib": getattr(self, "ru_maxrss", 0) / 2**20}


class FlopCounter:
    """Counts the GEMM FLOPs the Jacobian methods actually issue, in this process.

    Wraps the two GEMM helpers every method calls (``panel_matmul``, ``tile_matmul`` of
    :mod:`recurjac_scale.jacobian.products`) where the method modules imported them: ``2 * a * K * N`` per call
    (``panel_matmul``: as issued, including the zero-padded columns of the last panel; ``tile_matmul``: the
    unpadded product).  Elementwise numba passes (masks, sign splits, Term I) are not counted.  Per layer step:
    :meth:`BoundChain.step_block` is wrapped too, so in-process schedulers attribute FLOPs to steps.
    """

    def __init__(self):
        self.total = 0.0
        self.per_step: dict[int, float] = {}
        self._saved = []

    def __enter__(self):
        import importlib

        from recurjac_scale.engine import blocks

        counter = self

        def wrap_panel(f):
            def panel_matmul(M, X, panel, out=None):
                counter.total += 2.0 * M.shape[0] * M.shape[1] * X.shape[1]
                return f(M, X, panel, out) if out is not None else f(M, X, panel)
            return panel_matmul

        def wrap_tile(f):
            def tile_matmul(A, B, panel, *args, **kw):
                counter.total += 2.0 * A.shape[0] * A.shape[1] * B.shape[1]
                return f(A, B, panel, *args, **kw)
            return tile_matmul

        # "products": its panel_products / finish_products call tile_matmul there (step 1, magnitude chain, Fast-Lip,
        # F1 finish); every other module imported the helpers by name.  Each call goes through one name: no
        # double counting.  Sparse x dense products (pruned levels) are not counted.
        for modname in ("products", "chain", "recurjac", "fastlip", "methods", "driver"):
            try:
                mod = importlib.import_module(f"recurjac_scale.jacobian.{modname}")
            except ImportError:
                continue
            for name, wrap in (("panel_matmul", wrap_panel), ("tile_matmul", wrap_tile)):
                if hasattr(mod, name):
                    self._saved.append((mod, name, getattr(mod, name)))
                    setattr(mod, name, wrap(getattr(mod, name)))
        orig = blocks.BoundChain.step_block

        def step_block(bc, t, rows, cols, priors):
            before = counter.total
            try:
                return orig(bc, t, rows, cols, priors)
            finally:
                counter.per_step[t] = counter.per_step.get(t, 0.0) + counter.total - before

        self._saved.append((blocks.BoundChain, "step_block", orig))
        blocks.BoundChain.step_block = step_block
        return self

    def __exit__(self, *exc):
        for obj, name, val in reversed(self._saved):
            setattr(obj, name, val)
        self._saved.clear()
        return False


def best_layer_bound_method() -> str:
    from recurjac_scale.layer_bounds import LAYER_BOUND_METHODS

    for name in ("crown", "fastlin", "ibp"):
        if name in LAYER_BOUND_METHODS:
            return name
    raise SystemExit("no layer-bound method registered")


def setup(radius_index: int, image: int = 0, pruned: bool = False):
    """The store, the network (in memory), the image, its label / predicted class and the radius (chosen on this
    network: the pruned twin gets its own radii)."""
    from recurjac_scale.network.store import open_network

    store = (cifar_setup.cifar_store("cifar_pruned90.zarr", prune_fraction=0.9) if pruned
             else cifar_setup.cifar_store())
    net = open_network(store).materialize()
    x, y = cifar_setup.cifar_images(image + 1)
    x0 = x[image]
    pred = int(np.argmax(net.forward(x0[None, :])[0]))
    eps = cifar_setup.eps_for_unstable_fraction(net, x0, RADIUS_TARGETS[radius_index])
    frac = cifar_setup.first_layer_unstable_fraction(net, x0, eps)
    return store, net, x0, int(y[image]), pred, eps, frac


def warmup(method: str, lbm: str) -> float:
    """Run the method once on a tiny network through the same engine path: numba compile (or cache load) and
    imports.  Returns the seconds it took."""
    from recurjac_scale import InputSpec, Network
    from recurjac_scale.engine.plan import plan_jacobian

    rng = np.random.default_rng(1)
    widths = (12, 9, 8, 7, 3)
    ws = [rng.standard_normal((o, i)) * np.sqrt(2 / i) for i, o in zip(widths[:-1], widths[1:])]
    bs = [rng.standard_normal(o) * 0.1 for o in widths[1:]]
    net = Network(ws, bs, ["relu"] * 3, input_spec=InputSpec((12,), domain_lower=0.0, domain_upper=1.0))
    t = time.perf_counter()
    plan = plan_jacobian(net, np.full(12, 0.5), 0.05, "inf", method, layer_bounds=lbm, outputs=0)
    plan.compute(scheduler="synchronous")
    return time.perf_counter() - t


def load_chain_on_worker(spec) -> int:
    """Build (and cache) the job's chain in a worker process before the graph runs, so that the timed run does not
    include reading the store (the engine's block tasks build it on first use the same way, reading the store with
    dask's synchronous scheduler inside the task)."""
    import dask

    with dask.config.set(scheduler="synchronous"):
        spec.chain()
    return os.getpid()


def save(name: str, obj: dict) -> Path:
    path = results_dir() / f"{name}.json"
    path.write_text(json.dumps(obj, indent=1, default=_json_default))
    print(f"wrote {path}", file=sys.stderr)
    return path


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, tuple):
        return list(o)
    return str(o)


def command_line() -> str:
    return "python benchmarks/bench_scale.py " + " ".join(sys.argv[1:])


# -- subcommands --------------------------------------------------------------------------------------------------


def cmd_gemm(args) -> None:
    """GEMM rate and the true numba compile time (fresh cache directory, in a subprocess)."""
    out = {"machine": machine(), "gemm": gemm_rate(), "command": command_line()}
    lbm = best_layer_bound_method()
    compile_times = {}
    for method in ("fastlip", "recurjac-b", "recurjac-f0", "recurjac-f1"):
        with tempfile.TemporaryDirectory() as cache:
            env = dict(os.environ, NUMBA_CACHE_DIR=cache)
            code = (f"import sys; sys.path[:0] = [{str(_REPO)!r}, {str(_HERE)!r}]; import bench_scale as b; "
                    f"t1 = b.warmup({method!r}, {lbm!r}); t2 = b.warmup({method!r}, {lbm!r}); print(t1, t2)")
            r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
            if r.returncode:
                compile_times[method] = {"error": r.stderr.strip().splitlines()[-1:]}
            else:
                t1, t2 = (float(v) for v in r.stdout.split())
                compile_times[method] = {"first_call_s": t1, "second_call_s": t2, "compile_s": t1 - t2}
    out["numba_compile"] = compile_times
    out["layer_bound_method"] = lbm
    save("gemm", out)


def _plan(store, x0, eps, method, lbm, pred, budget, total_threads=2, row_block=None, col_block=None):
    from recurjac_scale.engine.plan import plan_jacobian

    return plan_jacobian(str(store), x0, eps, "inf", method, layer_bounds=lbm, outputs=pred,
                         memory_budget=budget, total_threads=total_threads, row_block=row_block,
                         col_block=col_block)


def cmd_full(args) -> None:
    """A complete engine run of one method at one radius."""
    from threadpoolctl import threadpool_limits

    lbm = args.layer_bounds or best_layer_bound_method()
    t_warm = warmup(args.method, lbm)
    gemm = gemm_rate(repeats=3)
    store, net, x0, label, pred, eps, frac = setup(args.radius, pruned=args.pruned)
    load0 = os.getloadavg()
    runs = []
    for rep in range(args.repeats):
        t0 = time.perf_counter()
        plan = _plan(store, x0, eps, args.method, lbm, pred, args.memory_budget, total_threads=args.threads)
        t_plan = time.perf_counter() - t0
        with PeakRSS() as mem, threadpool_limits(1, user_api="blas"), FlopCounter() as fc:
            res = plan.compute(scheduler=args.scheduler, threads_per_worker=args.threads if args.scheduler == "threads" else None)
        if args.scheduler != "synchronous":
            # concurrent tasks mix their counts per step: keep the (unattributed) total only
            fc.per_step = {sp.step: sp.flops * fc.total / plan.flops for sp in plan.steps}
        runs.append({
            "flops_counted": fc.total,
            "flops_counted_per_step": dict(fc.per_step),
            "plan_seconds": t_plan,
            "layer_bounds_seconds": plan.layer_bounds_seconds,
            "run_seconds": res.seconds,
            "total_seconds": t_plan + res.seconds,
            "step_task_seconds": {int(k): v for k, v in res.step_seconds.items()},
            "memory": mem.to_dict(),
            "lipschitz": res.lipschitz,
        })
    load1 = os.getloadavg()
    steps = [s.to_dict() for s in plan.steps]
    best = min(runs, key=lambda r: r["run_seconds"])
    med_run = float(np.median([r["run_seconds"] for r in runs]))
    per_step = []
    counted = runs[0]["flops_counted_per_step"]
    for s in plan.steps:
        sec = float(np.median([r["step_task_seconds"][s.step] for r in runs]))
        fl = counted.get(s.step, 0.0)
        per_step.append({"step": s.step, "width": s.width, "tasks": s.n_tasks, "flops_plan": s.flops,
                         "flops": fl, "task_seconds": sec,
                         "gflops": fl / sec / 1e9 if sec > 0 else None,
                         "ratio_to_gemm": (fl / sec / 1e9) / gemm["gflops"] if sec > 0 else None})
    task_total = sum(p["task_seconds"] for p in per_step)
    flops_counted = runs[0]["flops_counted"]
    out = {
        "kind": "full", "command": command_line(), "machine": machine(), "gemm": gemm,
        "method": args.method, "layer_bound_method": lbm, "radius_target": RADIUS_TARGETS[args.radius],
        "eps": eps, "unstable_first_layer": frac, "unstable": list(plan.unstable), "dead": list(plan.dead),
        "label": label, "predicted": pred, "outputs": f"logit of the predicted class ({pred})",
        "scheduler": args.scheduler, "threads": args.threads, "row_block": plan.row_block, "col_block": plan.col_block,
        "n_tasks": plan.n_tasks, "flops_plan": plan.flops, "flops": flops_counted, "warmup_seconds": t_warm,
        "runs": runs, "run_seconds_median": med_run, "best": best, "per_step": per_step,
        "gflops_task_time": flops_counted / task_total / 1e9 if task_total > 0 else None,
        "gflops_wall": flops_counted / med_run / 1e9,
        "loadavg_before": list(load0), "loadavg_after": list(load1),
    }
    tag = "" if args.scheduler == "synchronous" else f"-{args.scheduler}{args.threads}"
    if args.layer_bounds:
        tag += f"-{args.layer_bounds}"
    if args.pruned:
        tag += "-pruned90"
    out["network"] = "pruned90" if args.pruned else "dense"
    save(f"full-{args.method}-r{args.radius}{tag}", out)


def _sample_blocks(plan, row_blocks: list[int], gemm_gflops: float) -> dict:
    """Run every task (all column blocks of all layer steps) of the given row blocks in this process, in the
    engine's block functions, one BLAS thread; returns per-task times."""
    from recurjac_scale.engine.blocks import BoundChain
    from recurjac_scale.engine.schedulers import blas_single_thread

    ctx = plan.context
    bc = BoundChain(ctx.method, ctx.chain)
    shape = ctx.shape
    R, rb_, cb_ = plan.n_rows, plan.row_block, plan.col_block
    tasks = []  # (t, rb, cb, seconds)
    for rb in row_blocks:
        r0, r1 = rb * rb_, min(R, (rb + 1) * rb_)
        state: dict[int, dict] = {}
        for sp in plan.steps:
            t = sp.step
            priors = {s: {k: state[s][k] for k in shape.state_keys} for s in shape.prior_steps(t)}
            outs = {k: np.empty((r1 - r0, sp.width)) for k in shape.state_keys}
            for cb in range(sp.n_col_blocks):
                c0, c1 = cb * cb_, min(sp.width, (cb + 1) * cb_)
                t0 = time.perf_counter()
                with blas_single_thread():
                    out = bc.step_block(t, slice(r0, r1), slice(c0, c1), priors)
                sec = time.perf_counter() - t0
                for k in shape.state_keys:
                    outs[k][:, c0:c1] = out[k]
                tasks.append({"t": t, "rb": rb, "cb": cb, "rows": r1 - r0, "cols": c1 - c0, "seconds": sec})
                print(f"  step {t} rb {rb} cb {cb}: {sec:.2f} s", file=sys.stderr, flush=True)
            state[t] = outs
    return {"tasks": tasks}


def scaling_estimate(plan, tasks: list[dict], workers=(1, 2, 8, 64, 512), overhead_per_task: float = 0.0) -> dict:
    """Wall-time estimate of the whole plan on P single-threaded workers from measured per-task times.

    Per layer step, the mean measured task time (per row of the block, scaled to the plan's block) times the number
    of tasks gives the total work ``W``.  Dependencies: a task of step t waits for every column block of step t-1
    of the same row block, so one row block's chain is the critical path ``CP = sum_t max_cb task(t, cb)``.  Any
    greedy schedule finishes within ``[max(W/P, CP), W/P + CP]`` (Graham / Brent); ``overhead_per_task`` (seconds of
    scheduler time per task) is added to the work.
    """
    R, rb_ = plan.n_rows, plan.row_block
    W = 0.0
    CP = 0.0
    per_step = []
    for sp in plan.steps:
        ts = [x for x in tasks if x["t"] == sp.step]
        if not ts:
            continue
        # scale each measured task to a full row block (the last block may be shorter)
        per_row = [x["seconds"] / x["rows"] for x in ts]
        mean_task = float(np.mean(per_row)) * min(rb_, R)
        work = float(np.sum([x["seconds"] / x["rows"] for x in ts])) / len({x["rb"] for x in ts}) * R
        # work: measured seconds per row (all column blocks) times all rows
        max_task = float(np.max(per_row)) * min(rb_, R)
        W += work + overhead_per_task * sp.n_tasks
        CP += max_task + overhead_per_task
        per_step.append({"step": sp.step, "tasks": sp.n_tasks, "mean_task_s": mean_task, "work_s": work,
                         "max_task_s": max_task})
    est = {}
    for P in workers:
        est[str(P)] = {"lower_s": max(W / P, CP), "upper_s": W / P + CP}
    return {"work_s": W, "critical_path_s": CP, "per_step": per_step, "workers": est,
            "overhead_per_task_s": overhead_per_task}


def cmd_sample(args) -> None:
    """F0 / F1 on a measured fraction of the row blocks, extrapolated."""
    lbm = args.layer_bounds or best_layer_bound_method()
    t_warm = warmup(args.method, lbm)
    gemm = gemm_rate(repeats=3)
    store, net, x0, label, pred, eps, frac = setup(args.radius, pruned=args.pruned)
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    plan = _plan(store, x0, eps, args.method, lbm, pred, args.memory_budget, total_threads=args.threads,
                 row_block=args.row_block, col_block=args.col_block)
    t_plan = time.perf_counter() - t0
    nrb = plan.steps[0].n_row_blocks
    rng = np.random.default_rng(7)
    chosen = sorted(int(i) for i in rng.choice(nrb, size=min(args.row_blocks, nrb), replace=False))
    print(plan.describe(), file=sys.stderr)
    print(f"sampling row blocks {chosen} of {nrb}", file=sys.stderr, flush=True)
    with PeakRSS() as mem, FlopCounter() as fc:
        t1 = time.perf_counter()
        sample = _sample_blocks(plan, chosen, gemm["gflops"])
        t_sample = time.perf_counter() - t1
    load1 = os.getloadavg()
    rows_done = sum(min(plan.n_rows, (rb + 1) * plan.row_block) - rb * plan.row_block for rb in chosen)
    fraction = rows_done / plan.n_rows
    per_step = []
    for sp in plan.steps:
        ts = [x for x in sample["tasks"] if x["t"] == sp.step]
        sec = float(sum(x["seconds"] for x in ts))
        flops = fc.per_step.get(sp.step, 0.0)
        per_step.append({"step": sp.step, "width": sp.width, "tasks": sp.n_tasks, "sampled_tasks": len(ts),
                         "sampled_seconds": sec, "extrapolated_seconds": sec / fraction, "flops_sampled": flops,
                         "flops_plan_sampled": sp.flops * fraction,
                         "gflops": flops / sec / 1e9 if sec > 0 else None,
                         "ratio_to_gemm": flops / sec / 1e9 / gemm["gflops"] if sec > 0 else None})
    total_sampled = sum(p["sampled_seconds"] for p in per_step)
    out = {
        "kind": "sample", "command": command_line(), "machine": machine(), "gemm": gemm,
        "method": args.method, "layer_bound_method": lbm, "radius_target": RADIUS_TARGETS[args.radius], "eps": eps,
        "unstable_first_layer": frac, "unstable": list(plan.unstable), "dead": list(plan.dead),
        "label": label, "predicted": pred, "row_block": plan.row_block, "col_block": plan.col_block,
        "n_rows": plan.n_rows, "n_row_blocks": nrb, "sampled_row_blocks": chosen, "rows_sampled": rows_done,
        "fraction": fraction, "plan_seconds": t_plan, "layer_bounds_seconds": plan.layer_bounds_seconds,
        "warmup_seconds": t_warm, "sample_seconds": t_sample, "task_seconds_sampled": total_sampled,
        "extrapolated_one_core_seconds": total_sampled / fraction, "flops_plan": plan.flops,
        "flops_sampled": fc.total, "flops": fc.total / fraction,
        "gflops": fc.total / total_sampled / 1e9,
        "per_step": per_step, "memory": mem.to_dict(), "tasks": sample["tasks"],
        "estimate": scaling_estimate(plan, sample["tasks"], overhead_per_task=args.overhead),
        "loadavg_before": list(load0), "loadavg_after": list(load1), "plan": plan.describe(),
    }
    out["network"] = "pruned90" if args.pruned else "dense"
    save(f"sample-{args.method}-r{args.radius}" + ("-pruned90" if args.pruned else ""), out)


def cmd_workers(args) -> None:
    """1 vs 2 LocalCluster workers on the same fraction of an F0 job (first ``--blocks`` blocks of the graph)."""
    from recurjac_scale.cluster import MALLOC_ENV, local_client

    lbm = args.layer_bounds or best_layer_bound_method()
    warmup(args.method, lbm)
    store, net, x0, label, pred, eps, frac = setup(args.radius)
    plan = _plan(store, x0, eps, args.method, lbm, pred, args.memory_budget, total_threads=2,
                 row_block=args.row_block, col_block=args.col_block)
    print(plan.describe(), file=sys.stderr)
    out = {"kind": "workers", "command": command_line(), "machine": machine(), "method": args.method,
           "eps": eps, "unstable_first_layer": frac, "layer_bound_method": lbm, "blocks": args.blocks,
           "row_block": plan.row_block, "col_block": plan.col_block, "runs": {},
           "malloc_env": None if args.dask_malloc else dict(MALLOC_ENV)}
    env = None if args.dask_malloc else MALLOC_ENV
    for n in (1, 2) * args.repeats:
        # the allocator settings measured faster for these workers (recurjac_scale.cluster.MALLOC_ENV, opt-in)
        with local_client(n_workers=n, threads_per_worker=1, memory_limit=args.worker_memory, env=env) as client:
            # warm the workers (imports, numba cache load, chain build) on the tiny network
            client.run(warmup, args.method, lbm)
            client.run(load_chain_on_worker, plan.context.worker_spec())
            with tempfile.TemporaryDirectory(dir=cifar_setup.work_dir()) as ck:
                load = os.getloadavg()
                t = time.perf_counter()
                try:
                    plan.compute(client=client, checkpoint=ck, max_blocks=args.blocks)
                    complete = True
                except RuntimeError:
                    complete = False
                sec = time.perf_counter() - t
            out["runs"].setdefault(str(n), []).append({"seconds": sec, "loadavg": list(load), "complete": complete})
            print(f"{n} worker(s): {sec:.1f} s", file=sys.stderr, flush=True)
    med = {n: float(np.median([r["seconds"] for r in rs])) for n, rs in out["runs"].items()}
    out["median_seconds"] = med
    out["speedup"] = med["1"] / med["2"] if "2" in med else None
    tag = "" if (plan.row_block, plan.col_block, args.blocks) == (128, 128, 576) else (
        f"-{plan.row_block}x{plan.col_block}-{args.blocks}")
    tag += "-dask-malloc" if args.dask_malloc else ""
    save(f"workers-{args.method}{tag}", out)


class WorkerRSS(_Sampler):
    """Peak resident memory of every worker process of a LocalCluster (the children of this process: the nannies
    run here), sampled every ``interval`` seconds; a worker pid not seen at the start is a restarted worker."""

    def __init__(self, initial_pids, interval: float = 0.1):
        import psutil

        super().__init__(interval)
        self._me = psutil.Process()
        self.initial = set(int(p) for p in initial_pids)
        self.peak: dict[int, int] = {}

    def _sample(self):
        for c in self._me.children(recursive=True):
            try:
                if c.pid in self.initial or "python" in c.name():
                    self.peak[c.pid] = max(self.peak.get(c.pid, 0), c.memory_info().rss)
            except Exception:  # noqa: BLE001 - a process that just exited
                pass

    def to_dict(self, final_pids) -> dict:
        final = set(int(p) for p in final_pids)
        # worker processes: the initial and final ones, and any other python child that grew past 64 MiB (a
        # restarted worker that died again); small helpers (multiprocessing's resource tracker) are left out
        workers = {p: v for p, v in self.peak.items() if p in self.initial or p in final or v > 64 * 2**20}
        return {
            "interval_s": self._interval,
            "peak_rss_mib_per_worker": {str(p): v / 2**20 for p, v in sorted(workers.items())},
            "peak_rss_mib": max(workers.values(), default=0) / 2**20,
            "worker_pids_start": sorted(self.initial),
            "worker_pids_end": sorted(final),
            "restarted": self.initial != final or any(p not in self.initial for p in workers),
        }


def _worker_rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def cmd_ooc(args) -> None:
    """Out-of-core: a 4-layer 8192-wide network in zarr, workers limited below its size, RecurJac-B.

    The cluster starts first; its workers are warmed (imports, numba kernels) and the plan is made with the
    client (budget = the workers' memory limit x the nanny's terminate fraction, baseline = the larger of the
    documented constant and the warmed workers' RSS); the layer bounds are computed here, in the client, with the
    whole network in this process's memory."""
    from recurjac_scale.cluster import local_client
    from recurjac_scale.engine.plan import parse_bytes, plan_jacobian
    from recurjac_scale.network.store import save_network

    widths = (args.width,) * 4 + (10,)
    path = cifar_setup.work_dir() / f"ooc_{args.width}.zarr"
    if not path.exists():
        save_network(cifar_setup.he_network(widths=widths, seed=3), path, overwrite=True)
    size = sum(8 * a * b for a, b in zip(widths[:-1], widths[1:]))
    lbm = args.layer_bounds or best_layer_bound_method()
    limit = parse_bytes(args.worker_memory)
    out = {"kind": "ooc", "command": command_line(), "machine": machine(), "widths": list(widths),
           "weights_bytes": size, "worker_memory": args.worker_memory, "worker_memory_bytes": limit,
           "layer_bound_method": lbm, "eps": 1e-3, "output": 0, "n_workers": 2, "threads_per_worker": 1}
    x0 = np.random.default_rng(0).uniform(0, 1, args.width)
    try:
        with local_client(n_workers=2, threads_per_worker=1, memory_limit=limit) as client:
            client.run(warmup, "recurjac-b", "ibp")
            out["worker_rss_after_warmup_mib"] = {k: v / 2**20 for k, v in client.run(_worker_rss).items()}
            t = time.perf_counter()
            plan = plan_jacobian(str(path), x0, 1e-3, "inf", "recurjac-b", layer_bounds=lbm, outputs=0,
                                 total_threads=2, client=client)
            out["plan_seconds"] = time.perf_counter() - t
            out["plan"] = plan.describe()
            out["plan_dict"] = {k: v for k, v in plan.to_dict().items() if k != "steps"}
            print(plan.describe(), file=sys.stderr, flush=True)
            pids = list(client.run(os.getpid).values())
            out["loadavg_before"] = list(os.getloadavg())
            with WorkerRSS(pids) as rss:
                t = time.perf_counter()
                try:
                    client.run(load_chain_on_worker, plan.context.worker_spec())
                    res = plan.compute(client=client)
                    out["seconds"] = time.perf_counter() - t
                    out["status"] = "completed"
                    out["lipschitz"] = res.lipschitz
                except Exception as exc:  # noqa: BLE001 - the outcome is the measurement
                    out["seconds"] = time.perf_counter() - t
                    out["status"] = f"failed: {type(exc).__name__}: {str(exc)[:500]}"
            out["loadavg_after"] = list(os.getloadavg())
            out["workers"] = rss.to_dict(client.run(os.getpid).values())
    except Exception as exc:  # noqa: BLE001
        out.setdefault("status", f"failed: {type(exc).__name__}: {str(exc)[:500]}")
    print(json.dumps({k: out.get(k) for k in ("status", "seconds", "workers")}, default=str), file=sys.stderr)
    save(f"ooc-{args.width}-{args.worker_memory}", out)


def cmd_report_ooc(args) -> None:
    from report_scale import write_ooc_section

    write_ooc_section(_load_all(), Path(args.output))


def cmd_sparse(args) -> None:
    """One recursion-step GEMM of a 90%-pruned CIFAR layer, scipy.sparse vs dense BLAS, one thread."""
    import scipy.sparse as sp
    from threadpoolctl import threadpool_limits

    from recurjac_scale.network import sparse as S

    rng = np.random.default_rng(11)
    gemm = gemm_rate(repeats=3)
    rows = []
    with threadpool_limits(1, user_api="blas"):
        for (n_out, n_in) in ((2048, 2048), (1024, 2048)):
            w = rng.standard_normal((n_out, n_in)) * np.sqrt(2 / n_in)
            for frac in (0.9, 0.7):
                wp = S.prune(w, frac)
                csr = S.to_csr(wp)
                csc = sp.csc_array(csr)
                for c in (1, 16, 128, 512):
                    x = rng.standard_normal((n_in, c))
                    xf = np.asfortranarray(x)

                    def timeit(f, reps=args.repeats):
                        f()
                        ts = []
                        for _ in range(reps):
                            t = time.perf_counter()
                            f()
                            ts.append(time.perf_counter() - t)
                        return float(np.median(ts))

                    t_dense = timeit(lambda: wp @ x)
                    t_csr = timeit(lambda: csr @ x)
                    t_csc = timeit(lambda: csc @ x)
                    t_csr_f = timeit(lambda: csr @ xf)
                    # the same product through the package helper (column selection S: half the neurons alive)
                    alive = np.flatnonzero(rng.random(n_in) < 0.5)
                    t_sel_dense = timeit(lambda: wp[:, alive] @ x[alive])
                    t_sel_sparse = timeit(lambda: S.sparse_matmul(csr, x[alive], cols=alive))
                    nnz = csr.nnz
                    rows.append({
                        "shape": [n_out, n_in], "pruned": frac, "density": S.density(wp), "c": c,
                        "dense_s": t_dense, "csr_s": t_csr, "csc_s": t_csc, "csr_fortran_rhs_s": t_csr_f,
                        "dense_gflops": 2 * n_out * n_in * c / t_dense / 1e9,
                        "csr_useful_gflops": 2 * nnz * c / t_csr / 1e9,
                        "speedup_csr_vs_dense": t_dense / t_csr, "speedup_csc_vs_dense": t_dense / t_csc,
                        "masked_dense_s": t_sel_dense, "masked_sparse_s": t_sel_sparse,
                        "speedup_masked": t_sel_dense / t_sel_sparse,
                    })
                    print(rows[-1], file=sys.stderr, flush=True)
    # storage
    from recurjac_scale.network.store import save_network

    dense_store = cifar_setup.cifar_store()
    pruned_net = cifar_setup.he_network(prune_fraction=0.9)
    pruned_path = cifar_setup.work_dir() / "cifar_pruned90.zarr"
    save_network(pruned_net, pruned_path, overwrite=True)
    import zarr

    csr_path = cifar_setup.work_dir() / "cifar_pruned90_csr.zarr"
    g = zarr.open_group(str(csr_path), mode="w", zarr_format=3)
    for k, w in enumerate(pruned_net.weights):
        S.write_csr(g, f"w{k}", w)

    def du(p):
        return sum(f.stat().st_size for f in Path(p).rglob("*") if f.is_file())

    out = {"kind": "sparse", "command": command_line(), "machine": machine(), "gemm": gemm, "rows": rows,
           "store_bytes": {"dense_he": du(dense_store), "pruned90_dense_zarr": du(pruned_path),
                           "pruned90_csr_zarr": du(csr_path)},
           "pruned_store": pruned_path.name}  # relative to the bench directory
    save("sparse", out)


# -- report -------------------------------------------------------------------------------------------------------


def _load_all() -> dict:
    """The JSON results this report is written from (``bench_gemm_share.py`` writes its own report)."""
    out = {}
    for f in sorted(results_dir().glob("*.json")):
        if not f.stem.startswith("gemm_share-"):
            out[f.stem] = json.loads(f.read_text())
    return out


def cmd_report(args) -> None:
    from report_scale import write_report

    write_report(_load_all(), Path(args.output))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--radius", type=int, default=0, choices=(0, 1, 2),
                        help="0, 1, 2: radius with about 5%%, 30%%, 100%% of layer-1 neurons unstable")
    common.add_argument("--layer-bounds", default=None, help="layer-bound method (default: crown if available)")
    common.add_argument("--memory-budget", default="3GB")
    common.add_argument("--threads", type=int, default=1)
    common.add_argument("--pruned", action="store_true",
                        help="the 90%%-pruned twin of the CIFAR network (stored dense; see 'sparse')")
    p = sub.add_parser("gemm")
    p.set_defaults(func=cmd_gemm)
    p = sub.add_parser("full", parents=[common])
    p.add_argument("--method", required=True)
    p.add_argument("--scheduler", default="synchronous")
    p.add_argument("--repeats", type=int, default=3)
    p.set_defaults(func=cmd_full)
    p = sub.add_parser("sample", parents=[common])
    p.add_argument("--method", required=True)
    p.add_argument("--row-blocks", type=int, default=1)
    p.add_argument("--row-block", type=int, default=None)
    p.add_argument("--col-block", type=int, default=None)
    p.add_argument("--overhead", type=float, default=0.005, help="scheduler seconds per task for the estimate")
    p.set_defaults(func=cmd_sample)
    p = sub.add_parser("workers", parents=[common])
    p.add_argument("--method", default="recurjac-f0")
    p.add_argument("--blocks", type=int, default=8)
    p.add_argument("--row-block", type=int, default=None)
    p.add_argument("--col-block", type=int, default=None)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--worker-memory", default="4GiB")
    p.add_argument("--dask-malloc", action="store_true",
                   help="workers with dask's own allocator settings instead of recurjac_scale.cluster.MALLOC_ENV")
    p.set_defaults(func=cmd_workers)
    p = sub.add_parser("ooc", parents=[common])
    p.add_argument("--width", type=int, default=8192)
    p.add_argument("--worker-memory", default="1GiB")
    p.set_defaults(func=cmd_ooc)
    p = sub.add_parser("report-ooc")
    p.add_argument("--output", default=str(_HERE / "results" / "scale_ooc.md"))
    p.set_defaults(func=cmd_report_ooc)
    p = sub.add_parser("sparse")
    p.add_argument("--repeats", type=int, default=5)
    p.set_defaults(func=cmd_sparse)
    p = sub.add_parser("report")
    p.add_argument("--output", default=str(_HERE / "results" / "scale.md"))
    p.set_defaults(func=cmd_report)
    args = ap.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
