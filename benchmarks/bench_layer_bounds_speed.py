"""Default layer bounds on the paper's CIFAR shape: this checkout against an earlier one, alternated in one run.

Run: ``python benchmarks/bench_layer_bounds_speed.py --old-src DIR [--runs 3] [--eps 1e-3 1e-5]``

``DIR`` is a checkout of the code to compare against (for instance ``git worktree add ../old <commit>``).  Every
measurement is a fresh process (``PYTHONPATH`` = the checkout) that builds the network, makes one warm-up call
(numba compile or cache load, not timed) and times one call of ``layer_bounds(..., "crown")`` (the default) with
one BLAS thread (threadpoolctl): CPU time (``time.process_time``) and wall time.  The versions alternate within
every run (the order reversed every other run).  Measured per run as well: the float64 GEMM rate (CPU time, one
thread, n = 2048), so that every time is also given in GEMM-seconds x rate = GFLOP-equivalents.

Network and input as in ``bench_layer_bounds_cifar.py`` (the issue's comparison with the authors' reference):
3072-2048-2048-1024-1024-512-512-256-256-128-10 ReLU, He-uniform (``random_network``, seed 2019), zero biases,
``x0 ~ U[-0.5, 0.5]``, no domain, l-inf radius ``eps``.  Also reported: how far the new bounds reach outside the
old ones and outside Fast-Lin's (absolute, and relative to the interval's width), and the unstable counts.
Writes ``benchmarks/results/layer_bounds_speed.md`` and ``benchmarks/results/raw/layer_bounds_speed.json``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

_REPO = Path(__file__).resolve().parents[1]
SEED = 2019
WIDTHS = (3072, 2048, 2048, 1024, 1024, 512, 512, 256, 256, 128, 10)
REFERENCE_SECONDS = (2.7, 3.1)
"""The authors' "crown-adaptive" on this shape, as quoted in issue 12 (not installed here, not measured)."""
OLD_DEFAULT_SECONDS = (5.6, 7.2)
"""The default of that time (two unfused passes, ``crown(fused=False)`` now), measured alongside it (same source)."""

WORKER = r"""
import json, math, sys, time
import numpy as np
from threadpoolctl import threadpool_limits
from recurjac_scale.layer_bounds import layer_bounds
from recurjac_scale.testing import random_network
eps, method, opts, out = float(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3]), sys.argv[4]
rng = np.random.default_rng(%(seed)d)
net = random_network(%(widths)r, "relu", rng, bias_scale=0.0)
x0 = rng.uniform(-0.5, 0.5, %(widths)r[0])
with threadpool_limits(limits=1, user_api="blas"):
    layer_bounds(net, x0, eps, math.inf, method, **opts)
    c, t = time.process_time(), time.perf_counter()
    lb = layer_bounds(net, x0, eps, math.inf, method, **opts)
    cpu, wall = time.process_time() - c, time.perf_counter() - t
np.savez(out, *lb.lower, *lb.upper)
print(json.dumps({"cpu": cpu, "wall": wall, "unstable": [int(u) for u in lb.unstable]}))
""" % {"seed": SEED, "widths": WIDTHS}


def gemm_rate_cpu(n: int = 2048, repeats: int = 3) -> float:
    """float64 GEMM rate in flop per CPU second, one BLAS thread (best of ``repeats``)."""
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((n, n)), rng.standard_normal((n, n))
    with threadpool_limits(limits=1, user_api="blas"):
        a @ b
        best = math.inf
        for _ in range(repeats):
            c = time.process_time()
            a @ b
            best = min(best, time.process_time() - c)
    return 2.0 * n**3 / best


def measure(src: Path, eps: float, method: str = "crown", opts: dict | None = None) -> tuple[dict, list]:
    """One timed call in a fresh process on checkout ``src``: (timings, bounds as [lower..., upper...])."""
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "bounds.npz"
        env = dict(os.environ, PYTHONPATH=str(src))
        res = subprocess.run([sys.executable, "-c", WORKER, repr(eps), method, json.dumps(opts or {}), str(out)],
                             env=env, cwd=d, capture_output=True, text=True, check=True)
        with np.load(out) as z:
            arrs = [z[f"arr_{i}"] for i in range(len(z.files))]
    return json.loads(res.stdout.strip().splitlines()[-1]), arrs


def outside(a: list, b: list) -> tuple[float, float]:
    """How far intervals ``a`` reach outside ``b``: (largest absolute excess, largest excess / width of ``b``);
    <= 0 when every interval of ``a`` is inside ``b``."""
    h = len(a) // 2
    worst_abs = worst_rel = -math.inf
    for al, au, bl, bu in zip(a[:h], a[h:], b[:h], b[h:]):
        d = np.maximum(bl - al, au - bu)
        worst_abs = max(worst_abs, float(d.max()))
        worst_rel = max(worst_rel, float(np.max(d / np.maximum(bu - bl, 1e-300))))
    return worst_abs, worst_rel


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--old-src", help="checkout of the code to compare against")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--eps", type=float, nargs="+", default=[1e-3, 1e-5])
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "layer_bounds_speed.md"))
    ap.add_argument("--from-json", help="rewrite the Markdown from a raw JSON file of an earlier run")
    args = ap.parse_args(argv)
    raw_path = Path(args.out).parent / "raw" / "layer_bounds_speed.json"
    if args.from_json:
        write(json.loads(Path(args.from_json).read_text()), Path(args.out))
        return
    if not args.old_src:
        ap.error("--old-src is required (a checkout of the code to compare against)")
    sys.path.insert(0, str(_REPO))
    from benchmarks.bench_layer_bounds import machine

    versions = {"old": (Path(args.old_src).resolve(), {}), "new": (_REPO, {}),
                "new, lowrank=False": (_REPO, {"lowrank": False})}
    old_rev = subprocess.run(["git", "-C", str(versions["old"][0]), "log", "-1", "--format=%h %s"],
                             capture_output=True, text=True).stdout.strip()[:100]
    new_rev = subprocess.run(["git", "-C", str(_REPO), "log", "-1", "--format=%h %s"],
                             capture_output=True, text=True).stdout.strip()[:100]
    raw = {"machine": machine(), "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "runs": args.runs, "old_rev": old_rev, "new_rev": new_rev, "cases": []}
    for eps in args.eps:
        times = {k: [] for k in versions}
        bounds, rates, unstable = {}, [], {}
        for run in range(args.runs):
            rates.append(gemm_rate_cpu())
            order = list(versions) if run % 2 == 0 else list(versions)[::-1]
            for name in order:
                src, opts = versions[name]
                res, bounds[name] = measure(src, eps, opts=opts)
                times[name].append(res)
                unstable[name] = res["unstable"]
                print(f"eps {eps:g} run {run}: {name} cpu {res['cpu']:.2f} s, wall {res['wall']:.2f} s", flush=True)
        _, fastlin = measure(versions["old"][0], eps, "fastlin")
        rate = statistics.median(rates)
        case = {"eps": eps, "gemm_rate_cpu_gflops": [r / 1e9 for r in rates], "versions": []}
        for name in versions:
            cpu = [r["cpu"] for r in times[name]]
            wall = [r["wall"] for r in times[name]]
            case["versions"].append({"name": name, "cpu_s": cpu, "wall_s": wall, "median_cpu_s": statistics.median(cpu),
                                     "median_wall_s": statistics.median(wall), "unstable": unstable[name],
                                     "gflop_equivalent": statistics.median(cpu) * rate / 1e9})
        case["new_outside_old"] = outside(bounds["new"], bounds["old"])
        case["old_outside_new"] = outside(bounds["old"], bounds["new"])
        case["new_outside_fastlin"] = outside(bounds["new"], fastlin)
        raw["cases"].append(case)
    raw_path.parent.mkdir(parents=True, exist_ok=True)
    raw_path.write_text(json.dumps(raw, indent=1))
    write(raw, Path(args.out))


def write(raw: dict, out: Path) -> None:
    lo_ref, hi_ref = REFERENCE_SECONDS
    lo_old, hi_old = OLD_DEFAULT_SECONDS
    lines = [
        "## Default layer bounds on the CIFAR shape: low-rank chains and one-pass box concretisation (issue 12, "
        "part 3)",
        "",
        f"- Machine: {raw['machine']}; BLAS threads: 1 (threadpoolctl).  Shared with other jobs: compare the CPU-time "
        "ratios (versions alternated within each run, order reversed every other run), not the seconds.",
        f"- Date: {raw['date']}.  Median of {raw['runs']} runs, each a fresh process after one untimed warm-up call "
        "(numba compile or cache load excluded).",
        f"- `old` = {raw['old_rev']!r}; `new` = {raw['new_rev']!r}; `new, lowrank=False` = the new code without "
        "the low-rank chains (fused engine plus the one-pass box concretisation).",
        "- Network: 3072-2048-2048-1024-1024-512-512-256-256-128-10 ReLU, He-uniform (`random_network`, seed "
        f"{SEED}), zero biases, x0 ~ U[-0.5, 0.5], no domain, l-inf; method `crown` with its defaults "
        "(CROWN-Ada intersected with Fast-Lin).",
        f"- Reference: the authors' 'crown-adaptive' took {lo_ref}-{hi_ref} s where the default of that time took "
        f"{lo_old}-{hi_old} s (quoted from issue 12, **not measured in this run**): reference / that default = "
        f"{lo_ref / hi_old:.2f}-{hi_ref / lo_old:.2f}.  `old` took 0.62x (eps 1e-3) / 0.50x (eps 1e-5) the CPU "
        "time of that default (measured in the previous run, results/layer_bounds_cifar.md), so the column "
        "'vs reference' is (CPU time / old's, measured here) x (0.62 or 0.50) / (reference / that default, "
        "quoted), over the quoted range.",
        "- GFLOP-equivalent = median CPU seconds x the GEMM rate measured in the same run (float64, n = 2048, one "
        "thread, CPU time): the work expressed as the GEMM flops the machine does in that time.",
        "",
    ]
    prev_ratio = {1e-3: 0.62, 1e-5: 0.50}
    for case in raw["cases"]:
        rates = case["gemm_rate_cpu_gflops"]
        old = next(v for v in case["versions"] if v["name"] == "old")
        no, nr = case["new_outside_old"]
        fo, fr = case["new_outside_fastlin"]
        lines += [
            f"### eps = {case['eps']:g}",
            "",
            f"GEMM rate (CPU time) per run: {', '.join(f'{r:.1f}' for r in rates)} GFLOP/s.  New bounds outside "
            f"the old ones by at most {no:.3g} absolute, {nr:.3g} of the interval's width (<= 0: inside); outside "
            f"Fast-Lin's by at most {fo:.3g} absolute, {fr:.3g} of the width.  Old outside new by at most "
            f"{case['old_outside_new'][0]:.3g} absolute.",
            "",
            "| version | median CPU s | runs CPU s | / old (CPU) | median wall s | runs wall s | / old (wall) | "
            "GFLOP-equivalent | vs reference (CPU) | unstable per hidden layer |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        pr = prev_ratio.get(case["eps"])
        for v in case["versions"]:
            rc = v["median_cpu_s"] / old["median_cpu_s"]
            rw = v["median_wall_s"] / old["median_wall_s"]
            vs = "-" if pr is None else f"{rc * pr * lo_old / hi_ref:.2f}-{rc * pr * hi_old / lo_ref:.2f}x"
            lines.append(
                f"| {v['name']} | {v['median_cpu_s']:.2f} | {', '.join(f'{x:.2f}' for x in v['cpu_s'])} | {rc:.2f} | "
                f"{v['median_wall_s']:.2f} | {', '.join(f'{x:.2f}' for x in v['wall_s'])} | {rw:.2f} | "
                f"{v['gflop_equivalent']:.0f} | {vs} | {v['unstable'][:-1]} |")
        lines.append("")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
