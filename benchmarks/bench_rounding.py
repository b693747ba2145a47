"""Certified rounding on the paper's CIFAR shape: widths, allowance share and time, before and after (issue 12, part 2).

Run: ``python benchmarks/bench_rounding.py --before <checkout of the previous code> [--runs 3] [--eps 1e-3 1e-5]``

Network and input as in the issue's comparison with the authors' reference: 3072-2048-2048-1024-1024-512-512-256-
256-128-10 ReLU, He-uniform weights (``random_network``, seed 2019), zero biases, ``x0 ~ U[-0.5, 0.5]``, no input
domain, l-inf radius ``eps``, the logit of the predicted class.  Layer bounds: the default (``crown``), computed
once per process and not timed.  Every method (Fast-Lip, RecurJac-B, F0, F1) runs in a fresh subprocess per run,
alternating the previous code (``--before``: a checkout put first on ``PYTHONPATH``) and this checkout, one BLAS
thread; reported: the median wall and CPU time (``time.process_time``) of the Jacobian bounds after one warm-up of
the numba kernels, the mean width, Proposition 2's local Lipschitz bound (``sum_k max(|l_k|, |u_k|)``, l-inf), the
rounding share (this checkout: ``JacobianBounds.rounding_share``), and the uncertified float64 bounds of this
checkout (no widening, no sign slack: what the certification is compared with).  Writes
``benchmarks/results/rounding.md`` and ``benchmarks/results/raw/rounding.json``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

_REPO = Path(__file__).resolve().parents[1]

METHODS = ("fastlip", "recurjac-b", "recurjac-f0", "recurjac-f1")
LABELS = {"fastlip": "Fast-Lip", "recurjac-b": "RecurJac-B", "recurjac-f0": "RecurJac-F0", "recurjac-f1": "RecurJac-F1"}
REFERENCE = {"b_width_ratio_before": 2.07, "prop2_before": 82.17, "prop2_reference": 68.73}
"""The issue's figures at eps 1e-5 (the authors' reference computes in float32 without certification)."""

WORKER = r"""
import json, math, sys, time
import numpy as np
from threadpoolctl import threadpool_limits
sys.path.insert(0, sys.argv[1])
from benchmarks.cifar_setup import CIFAR_WIDTHS
from recurjac_scale import jacobian_bounds, kernels
from recurjac_scale.layer_bounds import layer_bounds
from recurjac_scale.testing import random_network

eps, methods, uncertified = float(sys.argv[2]), sys.argv[3].split(","), sys.argv[4] == "1"
if uncertified:  # the same recursion without widening and without sign slack
    from recurjac_scale.jacobian import fastlip, methods as mth, recurjac as rj, recurjac_shared as rjs
    ident = lambda lower, upper, *w: (lower, upper)
    for mod in (rj, fastlip, mth):
        mod.widen_outward = ident
    rj.sign_slack = rjs.sign_slack = lambda a, dtype=None: np.zeros_like(np.asarray(a, dtype=dtype))
rng = np.random.default_rng(2019)
net = random_network(CIFAR_WIDTHS, "relu", rng, bias_scale=0.0)
x0 = rng.uniform(-0.5, 0.5, CIFAR_WIDTHS[0])
pred = int(np.argmax(net.forward(x0[None])[0]))
out = []
with threadpool_limits(limits=1, user_api="blas"):
    lb = layer_bounds(net.with_outputs(np.eye(CIFAR_WIDTHS[-1])[[pred]]), x0, eps, math.inf)
    kernels.ensure_compiled(np.float64)
    for m in methods:
        t, c = time.perf_counter(), time.process_time()
        jb = jacobian_bounds(net, x0, eps, math.inf, method=m, layer_bounds=lb, outputs=pred, keep_states=False)
        cpu, wall = time.process_time() - c, time.perf_counter() - t
        share = getattr(jb, "rounding_share", None)
        out.append({"method": m, "wall_s": wall, "cpu_s": cpu, "mean_width": float(np.mean(jb.upper - jb.lower)),
                    "prop2": float(np.maximum(np.abs(jb.lower), np.abs(jb.upper)).sum()),
                    "rounding_share": None if share is None else float(share),
                    "lower": jb.lower.ravel().tolist(), "upper": jb.upper.ravel().tolist()})
print("JSON" + json.dumps({"eps": eps, "pred": pred, "results": out}))
"""


def run_worker(checkout: Path, eps: float, methods, uncertified: bool = False) -> dict:
    env = dict(os.environ, PYTHONPATH=str(checkout), OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-c", WORKER, str(checkout), repr(eps), ",".join(methods),
                        "1" if uncertified else "0"], env=env, capture_output=True, text=True, cwd=str(checkout))
    if p.returncode != 0:
        raise RuntimeError(p.stderr[-3000:])
    line = [l for l in p.stdout.splitlines() if l.startswith("JSON")][-1]
    return json.loads(line[4:])


def _width_ratio(a: dict, b: dict) -> float:
    """Mean over entries of ``width(a) / width(b)``."""
    import numpy as np

    wa = np.asarray(a["upper"]) - np.asarray(a["lower"])
    wb = np.asarray(b["upper"]) - np.asarray(b["lower"])
    ok = wb > 0
    return float(np.mean(wa[ok] / wb[ok])) if ok.any() else float("nan")


def machine() -> str:
    sys.path.insert(0, str(_REPO))
    from benchmarks.bench_layer_bounds import machine as m

    return m()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", required=False, help="checkout of the previous code (git worktree)")
    ap.add_argument("--runs", type=int, default=3, help="alternated runs per method (median)")
    ap.add_argument("--runs-forward", type=int, default=None, help="runs for F0 / F1 (default: --runs)")
    ap.add_argument("--eps", type=float, nargs="+", default=[1e-3, 1e-5])
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--from-json", help="rewrite the report from a saved raw JSON")
    ap.add_argument("--out", default=str(_REPO / "benchmarks" / "results" / "rounding.md"))
    args = ap.parse_args(argv)
    raw_path = _REPO / "benchmarks" / "results" / "raw" / "rounding.json"
    if args.from_json:
        write(json.loads(Path(args.from_json).read_text()), Path(args.out))
        return
    before = Path(args.before).resolve()
    raw = {"machine": machine(), "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "runs": args.runs, "cases": []}
    for eps in args.eps:
        case = {"eps": eps, "methods": {}}
        for m in args.methods:
            runs = args.runs if m in ("fastlip", "recurjac-b") else (args.runs_forward or args.runs)
            rec = {"before": [], "after": []}
            for r in range(runs):
                order = (("before", before), ("after", _REPO)) if r % 2 == 0 else (("after", _REPO), ("before", before))
                for side, checkout in order:
                    res = run_worker(checkout, eps, [m])["results"][0]
                    print(f"eps {eps:g} {m} run {r} {side}: wall {res['wall_s']:.2f} s cpu {res['cpu_s']:.2f} s "
                          f"width {res['mean_width']:.6g} share {res['rounding_share']}", flush=True)
                    rec[side].append(res)
            unc = run_worker(_REPO, eps, [m], uncertified=True)["results"][0]
            b, a = rec["before"][-1], rec["after"][-1]
            case["methods"][m] = {
                "before_wall_s": [x["wall_s"] for x in rec["before"]], "after_wall_s": [x["wall_s"] for x in rec["after"]],
                "before_cpu_s": [x["cpu_s"] for x in rec["before"]], "after_cpu_s": [x["cpu_s"] for x in rec["after"]],
                "width_before": b["mean_width"], "width_after": a["mean_width"], "width_uncertified": unc["mean_width"],
                "prop2_before": b["prop2"], "prop2_after": a["prop2"], "prop2_uncertified": unc["prop2"],
                "rounding_share": a["rounding_share"],
                "width_ratio_after_to_uncertified": _width_ratio(a, unc),
                "width_ratio_before_to_uncertified": _width_ratio(b, unc),
            }
            raw_path.parent.mkdir(parents=True, exist_ok=True)
            raw_path.write_text(json.dumps(raw | {"cases": raw["cases"] + [case]}, indent=1))
        raw["cases"].append(case)
    raw_path.write_text(json.dumps(raw, indent=1))
    write(raw, Path(args.out))


def write(raw: dict, out: Path) -> None:
    med = statistics.median
    lines = [
        "# Certified rounding on the CIFAR shape (issue 12, part 2)",
        "",
        f"{raw['date']}; {raw['machine']}.",
        "",
        "Network 3072-2048-2048-1024-1024-512-512-256-256-128-10 ReLU, He-uniform (`random_network`, seed 2019), zero "
        "biases, `x0 ~ U[-0.5, 0.5]`, l-inf, the predicted class's logit; default (`crown`) layer bounds, not timed. "
        "*Before*: the previous code (allowance `gamma(N_t) mag_t`, the magnitude chain); *after*: the running "
        "allowance (`recurjac_scale.jacobian.rounding`); *uncertified*: this code with the widening and the sign "
        "slack removed (plain float64).  Times: Jacobian bounds only, median of the alternated runs (each in a fresh "
        "process after one warm-up of the kernels, one BLAS thread); CPU = `time.process_time`.  Share = "
        "`rounding_share`, the largest allowance / width over the 3,072 entries.  Prop. 2 = `sum_k max(|l_k|, |u_k|)`.",
        "",
        "| eps | method | mean width before | after | uncertified | width after / uncertified | share (after) | "
        "Prop. 2 before | after | uncertified | wall before (s) | after (s) | ratio | CPU before (s) | after (s) | "
        "ratio | runs |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for case in raw["cases"]:
        for m, r in case["methods"].items():
            wb, wa = med(r["before_wall_s"]), med(r["after_wall_s"])
            cb, ca = med(r["before_cpu_s"]), med(r["after_cpu_s"])
            lines.append(
                f"| {case['eps']:g} | {LABELS.get(m, m)} | {r['width_before']:.6g} | {r['width_after']:.6g} | "
                f"{r['width_uncertified']:.6g} | {r['width_ratio_after_to_uncertified']:.7f} | "
                f"{r['rounding_share']:.2g} | {r['prop2_before']:.6g} | {r['prop2_after']:.6g} | "
                f"{r['prop2_uncertified']:.6g} | {wb:.2f} | {wa:.2f} | {wa / wb:.2f} | {cb:.2f} | {ca:.2f} | "
                f"{ca / cb:.2f} | {len(r['after_wall_s'])} |"
            )
    lines += [
        "",
        f"The issue's figures (eps 1e-5, its own network draw): RecurJac-B {REFERENCE['b_width_ratio_before']}x wider "
        f"than the authors' reference before; Prop. 2 {REFERENCE['prop2_before']} before against the reference's "
        f"{REFERENCE['prop2_reference']} (float32, uncertified).",
    ]
    out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
