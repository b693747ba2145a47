#!/usr/bin/env python
"""Where the time of the RecurJac layer steps goes (F0, F1, B): the share of each layer step's task time spent
inside GEMM calls, and the rate inside those calls against the machine's GEMM rate measured in the same run.

Since the shared variant multiplies each row only on its non-zero per-row factors, most steps of F0 / F1 at the 5%
radius do little GEMM work and spend their time in the elementwise passes (Term I, the sign rules); this tells
the GEMM-bound steps (a large share) from the others.  One row block of the plan's default blocking, every column
block of every step, in the engine's block functions, one process, one BLAS thread; each step's per-process
shared factors are computed by an untimed first call (as for every task after a worker's first).

    python benchmarks/bench_gemm_share.py [--method recurjac-f0] [--radius 0] [--runs 3]   # results/gemm_share.md
    python benchmarks/bench_gemm_share.py --method ... --report   # the same report from the saved result files
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_scale as bs  # noqa: E402
from report_scale import NAMES  # noqa: E402


GEMM_BOUND = 0.75
"""A step is GEMM-bound when at least this share of its task time is spent inside GEMM calls."""


def measure(method: str, radius: int) -> dict:
    from recurjac_scale.engine.blocks import BoundChain
    from recurjac_scale.engine.schedulers import blas_single_thread
    from recurjac_scale.jacobian import products as ch
    from recurjac_scale.jacobian import recurjac_levels as rjl
    from recurjac_scale.jacobian import recurjac_shared as rjs

    bs.warmup(method, "crown")
    gemm_before = bs.gemm_rate(repeats=3)["gflops"]
    store, net, x0, label, pred, eps, frac = bs.setup(radius)
    plan = bs._plan(store, x0, eps, method, "crown", pred, None, total_threads=1)
    ctx = plan.context
    bc = BoundChain(ctx.method, ctx.chain)
    shape = ctx.shape
    acc = {"t": 0.0, "f": 0.0}

    def wrap(mod, name):
        f = getattr(mod, name)

        def g(A, B, *a, **k):
            t0 = time.perf_counter()
            out = f(A, B, *a, **k)
            acc["t"] += time.perf_counter() - t0
            acc["f"] += 2.0 * A.shape[0] * A.shape[1] * B.shape[1]
            return out

        setattr(mod, name, g)

    for mod in (rjl, rjs, ch):
        for n in ("panel_matmul", "tile_matmul"):
            if hasattr(mod, n):
                wrap(mod, n)
    rb_, cb_ = plan.row_block, plan.col_block
    nrb = plan.steps[0].n_row_blocks
    r0, r1 = (nrb // 2) * rb_, min(plan.n_rows, (nrb // 2 + 1) * rb_)
    state: dict = {}
    rows = []
    for sp in plan.steps:
        t = sp.step
        priors = {s: {k: state[s][k] for k in shape.state_keys} for s in shape.prior_steps(t)}
        outs = {k: np.empty((r1 - r0, sp.width)) for k in shape.state_keys}
        total = 0.0
        for cb in range(sp.n_col_blocks):
            c0, c1 = cb * cb_, min(sp.width, (cb + 1) * cb_)
            if cb == 0:
                with blas_single_thread():
                    bc.step_block(t, slice(r0, r1), slice(c0, c1), priors)
                acc["t"] = acc["f"] = 0.0
            t0 = time.perf_counter()
            with blas_single_thread():
                out = bc.step_block(t, slice(r0, r1), slice(c0, c1), priors)
            total += time.perf_counter() - t0
            for k in shape.state_keys:
                outs[k][:, c0:c1] = out[k]
        state[t] = outs
        inside = acc["f"] / max(acc["t"], 1e-12) / 1e9
        rows.append({"step": t, "seconds": total, "gemm_seconds": acc["t"], "gemm_share": acc["t"] / max(total, 1e-12),
                     "gflop": acc["f"] / 1e9, "gflops_inside": inside,
                     "gflops_step": acc["f"] / max(total, 1e-12) / 1e9})
        print(rows[-1], file=sys.stderr, flush=True)
    # The machine is shared and noisy: the GEMM rate is measured before and after the steps and the larger one is
    # the reference (the conservative choice: it gives the lower ratios).
    gemm_after = bs.gemm_rate(repeats=3)["gflops"]
    gemm = max(gemm_before, gemm_after)
    for r in rows:
        r["ratio_inside"] = r["gflops_inside"] / gemm
        r["ratio_step"] = r["gflops_step"] / gemm
    return {"kind": "gemm_share", "command": bs.command_line(), "machine": bs.machine(), "method": method,
            "radius_target": bs.RADIUS_TARGETS[radius], "eps": eps, "gemm_gflops": gemm,
            "gemm_gflops_before_after": [gemm_before, gemm_after], "row_block": rb_,
            "col_block": cb_, "rows_measured": [r0, r1], "n_rows": plan.n_rows, "steps": rows}


def _before_after(v: dict) -> str:
    ba = v.get("gemm_gflops_before_after")
    return f" (the larger of {ba[0]:.1f} before and {ba[1]:.1f} after the steps)" if ba else ""


def report(results: list[dict]) -> str:
    L = ["## Where the RecurJac steps' time goes (GEMM share)", ""]
    if results:
        m = results[0]["machine"]
        L.append(f"Measured {m['date_utc'][:16].replace('T', ' ')} UTC, load average {m['loadavg'][0]:.2f} at the "
                 f"start; `python benchmarks/bench_gemm_share.py`. One row block of the plan's default blocks, every "
                 "column block of every step, one BLAS thread; GEMM time = inside `panel_matmul` / `tile_matmul`; "
                 "rate against the GEMM rate measured in the same run. A step is GEMM-bound (**bold**) when at "
                 f"least {GEMM_BOUND:.0%} of its time is in GEMM calls; the target (issue 5) is a whole-step ratio "
                 ">= 0.5 for those steps.")
        L.append("")
        # every step that is GEMM-bound in some run, with its share and ratio over all runs
        cells = []
        for v in results:
            runs = v.get("runs") or [v]
            for i, r in enumerate(v["steps"]):
                per_run = [w["steps"][i] for w in runs]
                if max(x["gemm_share"] for x in per_run) >= GEMM_BOUND:
                    shares = sorted(x["gemm_share"] for x in per_run)
                    ratios = sorted(x["ratio_step"] for x in per_run)
                    cells.append(f"{NAMES.get(v['method'], v['method'])} step {r['step']} "
                                 f"({shares[0]:.0%}-{shares[-1]:.0%} in GEMM calls): "
                                 f"{ratios[0]:.2f}-{ratios[-1]:.2f}")
        n_runs = max(len(v.get("runs") or [v]) for v in results)
        if cells:
            L.append(f"GEMM-bound steps (range over {n_runs} run(s) of each method): " + "; ".join(cells) + ".")
            L.append("")
        if n_runs > 1:
            L.append("The tables show the first run.")
            L.append("")
    for v in results:
        runs = v.get("runs")
        if runs:
            v = runs[0]
        L.append(f"**{NAMES.get(v['method'], v['method'])}**, radius {v['radius_target']:.0%}, rows "
                 f"{v['rows_measured'][0]}-{v['rows_measured'][1]} of {v['n_rows']}, blocks {v['row_block']} × "
                 f"{v['col_block']}, GEMM rate {v['gemm_gflops']:.1f} GFLOP/s{_before_after(v)}:")
        L.append("")
        L.append("| step | task time | in GEMM calls | share | GFLOP | rate inside GEMMs (ratio) | whole step ratio |")
        L.append("|---|---|---|---|---|---|---|")
        for r in v["steps"]:
            b = "**" if r["gemm_share"] >= GEMM_BOUND else ""
            L.append(f"| {b}{r['step']}{b} | {r['seconds']:.2f} s | {r['gemm_seconds']:.2f} s | {r['gemm_share']:.0%} | "
                     f"{r['gflop']:.1f} | {r['gflops_inside']:.1f} GF/s ({r['ratio_inside']:.2f}) | "
                     f"{r['ratio_step']:.2f} |")
        L.append("")
    return "\n".join(L) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", action="append",
                    help="recurjac-f0 / recurjac-f1 / recurjac-b (repeatable; default F0 and F1)")
    ap.add_argument("--radius", type=int, default=0, help="radius index (0: 5%%, 1: 30%%, 2: 100%%)")
    ap.add_argument("--runs", type=int, default=1, help="measure each method this many times (default 1)")
    ap.add_argument("--report", action="store_true",
                    help="only rewrite results/gemm_share.md from the saved result files of these methods")
    args = ap.parse_args()
    results = []
    for method in args.method or ["recurjac-f0", "recurjac-f1"]:
        name = f"gemm_share-{method}-r{args.radius}"
        if args.report:
            v = json.loads((bs.results_dir() / f"{name}.json").read_text())
        else:
            runs = [measure(method, args.radius) for _ in range(max(1, args.runs))]
            v = dict(runs[0], runs=runs) if len(runs) > 1 else runs[0]
            bs.save(name, v)
        results.append(v)
    out = Path(__file__).resolve().parent / "results" / "gemm_share.md"
    out.write_text(report(results))
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
