"""Benchmark of ``linear-jacobian`` (issue 16, part 1): l-inf local Lipschitz constants against RecurJac-B / F0
and the auto_LiRPA figures quoted in the issue.

Rows (the issue's recipes):

- 16-16-16-10 and 32-32-32-10 ReLU: ``random_network(widths, "relu", default_rng(0))`` (He-uniform weights,
  N(0, 0.1) biases), then ``x0 = rng.uniform(0, 1, n_0)`` from the same generator, output 1, no domain;
- ``nets/auto_lirpa/mnist_fc_3layer`` with ERAN MNIST test images 0 and 2 (pixels / 255, domain [0, 1]), output =
  the true label;
- 784-1024-512-256-128-64-32-10 ReLU, same recipe as the small random networks (``x0 ~ U[0, 1]``, output 1).

Value = the certified upper bound of ``max ||∇f_c||_1`` over the l-inf ball (the reported ``lipschitz``), for
RecurJac-B, RecurJac-F0, ``linear-jacobian`` and its optimised row norms
(:func:`recurjac_scale.jacobian.linear_opt.optimised_row_norms`, ``--opt-seconds`` per row on top of the plain
run), with wall and CPU time (``time.process_time``: the machine may be shared) and the peak of traced memory
(``tracemalloc``, numpy buffers included; one separate traced run, as tracing slows the call down) of the whole
computation (layer bounds + Jacobian bounds + norms), medians over ``--runs`` alternated untraced runs after a warm-up
call (numba compilation).  "no skip" is ``linear-jacobian`` with the adaptive skip of the slope variants off
(:data:`recurjac_scale.jacobian.linear.ADAPTIVE_AFTER` = 0).  "sampled" is the largest
``||∇f_c(x)||_1`` found at sampled and hill-climbed points (a lower bound of the true constant).  BLAS: 1 thread.

Usage::

    python benchmarks/bench_linear_jacobian.py [--runs 3] [--opt-seconds 10] [--skip-big] [--out ...]
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time
import tracemalloc
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from recurjac_scale.jacobian import jacobian_bounds, linear  # noqa: E402
from recurjac_scale.jacobian.linear_opt import optimised_row_norms  # noqa: E402
from recurjac_scale.layer_bounds.base import Region  # noqa: E402
from recurjac_scale.lipschitz import lipschitz  # noqa: E402
from recurjac_scale.network.model import InputSpec, Network  # noqa: E402
from recurjac_scale.testing import hill_climb, random_network, sample_region  # noqa: E402

METHODS = ("recurjac-b", "recurjac-f0", "linear-jacobian", "linear-jacobian (no skip)", "linear-jacobian (opt)")
# auto_LiRPA's figures and the sampled values quoted in the issue, per (row, eps)
AUTO_LIRPA = {
    ("16-16-16-10", 0.05): 15.57, ("16-16-16-10", 0.1): 24.69, ("16-16-16-10", 0.3): 43.13,
    ("32-32-32-10", 0.05): 16.98, ("32-32-32-10", 0.1): 36.94,
    ("mnist_fc_3layer img 0", 0.005): 200.3, ("mnist_fc_3layer img 0", 0.02): 325.0,
    ("mnist_fc_3layer img 2", 0.005): 245.8, ("mnist_fc_3layer img 2", 0.02): 478.7,
    ("784-1024-512-256-128-64-32-10", 0.001): 106.7, ("784-1024-512-256-128-64-32-10", 0.01): 3.8e6,
}


def find_shared() -> Path | None:
    env = os.environ.get("RECURJAC_SHARED")
    cands = [Path(env)] if env else []
    cands += [p / "shared" for p in HERE.parents]
    for c in cands:
        if (c / "nets").is_dir() and (c / "data").is_dir():
            return c
    return None


def random_case(widths):
    rng = np.random.default_rng(0)
    net = random_network(widths, "relu", rng)
    x0 = rng.uniform(0, 1, widths[0])
    return net, x0, 1


def mnist_cases(shared: Path):
    z = np.load(shared / "nets" / "auto_lirpa" / "mnist_fc_3layer.npz")
    net = Network([z[f"W{i}"].astype(np.float64) for i in range(3)], [z[f"b{i}"].astype(np.float64) for i in range(3)],
                  ["relu", "relu"], input_spec=InputSpec(shape=(784,), domain_lower=0.0, domain_upper=1.0))
    rows = np.loadtxt(shared / "data" / "eran" / "mnist_test.csv", delimiter=",", max_rows=3)
    return [(f"mnist_fc_3layer img {i}", net, rows[i, 1:] / 255.0, int(rows[i, 0])) for i in (0, 2)]


def sampled_norm(net, x0, eps, c, rng, n_sample):
    region = Region.of(net, x0, eps, math.inf)
    X = sample_region(region, n_sample, rng)

    def obj(X):
        return np.abs(net.jacobian(X)[:, c, :]).sum(axis=1)

    X = np.vstack([X, hill_climb(region, obj, rng, starts=4, steps=30, population=8)])
    return float(obj(X).max())


def measure(fn, traced=False):
    """``(value, wall, cpu, peak MiB)`` of one call; the peak of traced memory only with ``traced`` (tracing slows
    the call down, so timed runs are not traced), else 0."""
    if traced:
        tracemalloc.start()
    t0, c0 = time.perf_counter(), time.process_time()
    v = fn()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak = 0.0
    if traced:
        peak = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
    return v, wall, cpu, peak


def run_method(method, net, x0, eps, c, opt_seconds):
    if method == "linear-jacobian (no skip)":  # every slope variant for every objective (ADAPTIVE_AFTER = 0)
        def fn():
            keep = linear.ADAPTIVE_AFTER
            linear.ADAPTIVE_AFTER = 0
            try:
                return lipschitz(net, x0, eps, math.inf, method="linear-jacobian", outputs=c).points[0].lipschitz
            finally:
                linear.ADAPTIVE_AFTER = keep
        return fn
    if method == "linear-jacobian (opt)":
        def fn():
            jl = jacobian_bounds(net, x0, eps, math.inf, method="linear-jacobian", outputs=c)
            return float(optimised_row_norms(net, jl, seconds=opt_seconds)[0])
        return fn
    return lambda: lipschitz(net, x0, eps, math.inf, method=method, outputs=c).points[0].lipschitz


def bench(cases, runs, opt_seconds, n_sample, rng, log):
    out = []
    for name, net, x0, c, eps_list in cases:
        for eps in eps_list:
            samp = sampled_norm(net, x0, eps, c, rng, n_sample)
            for m in METHODS:  # warm-up (numba compilation, caches)
                if m != "linear-jacobian (opt)":
                    run_method(m, net, x0, eps, c, opt_seconds)()
            res = {m: [] for m in METHODS}
            for r in range(runs):
                order = METHODS if r % 2 == 0 else tuple(reversed(METHODS))
                for m in order:
                    if m == "linear-jacobian (opt)" and r > 0:
                        continue  # one optimised run (its time is its budget), traced
                    res[m].append(measure(run_method(m, net, x0, eps, c, opt_seconds), m == "linear-jacobian (opt)"))
            mem = {m: measure(run_method(m, net, x0, eps, c, opt_seconds), True)[3] for m in METHODS
                   if m != "linear-jacobian (opt)"}  # one traced run each for the peak memory
            row = {"name": name, "eps": eps, "sampled": samp, "auto_lirpa": AUTO_LIRPA.get((name, eps))}
            for m in METHODS:
                vals = res[m]
                row[m] = {
                    "value": min(v[0] for v in vals),
                    "values": sorted({v[0] for v in vals}),
                    "wall": statistics.median(v[1] for v in vals),
                    "cpu": statistics.median(v[2] for v in vals),
                    "mem": mem.get(m, max(v[3] for v in vals)),
                }
            log(f"{name} eps={eps}: sampled {samp:.4g}, " + ", ".join(
                f"{m} {row[m]['value']:.4g} ({row[m]['cpu']:.2f} s cpu)" for m in METHODS))
            out.append(row)
    return out


def fmt(v):
    return f"{v:.5g}" if v is not None else "-"


def table(rows):
    L = ["| network | eps | sampled | auto_LiRPA | RecurJac-B | F0 | linear-jacobian | opt | "
         "linear / auto_LiRPA | opt / auto_LiRPA | linear / best(B, F0) |",
         "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        a = r["auto_lirpa"]
        lj, op = r["linear-jacobian"]["value"], r["linear-jacobian (opt)"]["value"]
        best = min(r["recurjac-b"]["value"], r["recurjac-f0"]["value"])
        ratios = f"{lj / a:.4f} | {op / a:.4f}" if a else "- | -"
        L.append(f"| {r['name']} | {r['eps']} | {fmt(r['sampled'])} | {fmt(a)} | {fmt(r['recurjac-b']['value'])} | "
                 f"{fmt(r['recurjac-f0']['value'])} | {fmt(lj)} | {fmt(op)} | {ratios} | {lj / best:.3f} |")
    L += ["", "Time (median wall / CPU seconds of the timed runs, whole computation: layer bounds, Jacobian bounds, "
          "norms) and peak traced memory (MiB, one separate traced run). \"no skip\": every slope variant for every "
          "objective (`linear.ADAPTIVE_AFTER = 0`); its value is the same as linear-jacobian's where the last column "
          "says so.", "",
          "| network | eps | " + " | ".join(METHODS) + " | linear / B (CPU) | no skip / B (CPU) | same value |",
          "|---|---|" + "---|" * len(METHODS) + "---|---|---|"]
    for r in rows:
        cells = [f"{r[m]['wall']:.2f} / {r[m]['cpu']:.2f} s, {r[m]['mem']:.0f} MiB" for m in METHODS]
        b = max(r["recurjac-b"]["cpu"], 1e-9)
        same = r["linear-jacobian"]["values"] == r["linear-jacobian (no skip)"]["values"]
        L.append(f"| {r['name']} | {r['eps']} | " + " | ".join(cells) + f" | {r['linear-jacobian']['cpu'] / b:.1f}x | "
                 f"{r['linear-jacobian (no skip)']['cpu'] / b:.1f}x | {'yes' if same else 'NO'} |")
    return L


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--opt-seconds", type=float, default=10.0)
    ap.add_argument("--samples", type=int, default=20000)
    ap.add_argument("--skip-big", action="store_true", help="skip the 784-1024-...-10 network")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "linear_jacobian.md")
    args = ap.parse_args(argv)
    rng = np.random.default_rng(1)
    cases = [("16-16-16-10", *random_case((16, 16, 16, 10)), (0.05, 0.1, 0.3)),
             ("32-32-32-10", *random_case((32, 32, 32, 10)), (0.05, 0.1))]
    shared = find_shared()
    if shared is not None:
        cases += [(n, net, x0, c, (0.005, 0.02)) for n, net, x0, c in mnist_cases(shared)]
    big = [] if args.skip_big else [("784-1024-512-256-128-64-32-10",
                                     *random_case((784, 1024, 512, 256, 128, 64, 32, 10)), (0.001, 0.01))]
    with threadpool_limits(1):
        rows = bench(cases, args.runs, args.opt_seconds, args.samples, rng, print)
        rows += bench(big, args.runs, args.opt_seconds, 2000, rng, print)
    head = [
        "# Linear-bound Jacobian (issue 16, part 1)",
        "",
        f"Generated by `benchmarks/bench_linear_jacobian.py --runs {args.runs} --opt-seconds {args.opt_seconds:g}` on "
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.machine()}, {os.cpu_count()} cores (shared with "
        "other jobs: wall time is inflated, CPU time is the fairer figure), Python "
        f"{platform.python_version()}, numpy {np.__version__}, BLAS 1 thread.",
        "",
        "l-inf local Lipschitz constant of logit c (certified upper bound of max ||grad f_c||_1 over the ball; lower "
        "is tighter); auto_LiRPA: the figures quoted in the issue (same recipes, instances rebuilt here: the RecurJac "
        "values reproduce the issue's).",
        "",
    ]
    text = "\n".join(head + table(rows)) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
