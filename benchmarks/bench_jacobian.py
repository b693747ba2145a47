"""Speed of the in-memory Jacobian bound methods (recurjac_scale.jacobian), single-threaded BLAS.

Shapes: the MNIST 7-layer MLP 784-1024-512-256-128-64-32-10 and a CIFAR-like slice 3072-1024-512-256-10 (He-uniform
weights, biases N(0, 0.1^2), ReLU, a random input in [0, 1], l-inf).  Reports the median of several timed runs (after
one warm-up call, numba compile time reported separately), the GEMM flops actually executed (counted on the
package's canonical GEMM helpers, padding included) and their rate against the float64 GEMM rate measured in the
same run, the flops the plain dense recursion would need ("dense-equivalent": what dead-neuron removal, per-row
I_j sparsity and sharing across rows save), plus mean bound widths (Fast-Lip vs RecurJac-B vs F0 vs F1).

Usage:  python benchmarks/bench_jacobian.py [--repeat 3] [--quick] [--out benchmarks/results/jacobian_speed.md]
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import statistics
import subprocess
import time

import numpy as np
from threadpoolctl import threadpool_limits

from recurjac_scale import kernels
from recurjac_scale.jacobian import chain as chain_mod
from recurjac_scale.jacobian import fastlip as fl_mod
from recurjac_scale.jacobian import jacobian_bounds
from recurjac_scale.jacobian import methods as meth_mod
from recurjac_scale.jacobian import recurjac as rj_mod
from recurjac_scale.jacobian import recurjac_levels as rjl_mod
from recurjac_scale.jacobian import recurjac_shared as rjs_mod
from recurjac_scale.layer_bounds import layer_bounds
from recurjac_scale.testing import random_network

FLOPS = [0.0]

NOTES = """Notes.
- The authors' reference (float32, no outward rounding, their trained MNIST 7-layer net, this machine, ALGORITHM.md):
  B 0.17 s, F0 21.7 s, F1 6.2 s.  The networks here are random He-init nets of the same shapes (not the same
  weights, so the regimes differ); results are float64 and certified (outward rounding).
- "GFLOP executed" counts the GEMMs actually run (dead neurons removed on both sides, rows whose operand vanished
  skipped, per-row compaction to ``S_j`` when ``I_j`` is large, sharing of the stable part across rows, padding of
  the fixed-shape panels included).  They are a small fraction of the dense recursion ("dense-equivalent"), so the
  remaining time is dominated by the memory-bound numba passes (masks/signs/Term I) and copies: the executed-GEMM
  rate is only a fraction of the machine's GEMM rate, while the dense-equivalent rate is several times above it.
- The machine is shared with other jobs; the GEMM rate measured in different runs varied between 14 and 50 GFLOP/s.
- Results are bitwise independent of the row/column blocking (fixed-shape GEMM panels, row-local choices).
"""


def _count(fn):
    def wrapped(A, B, *args, **kw):
        out = fn(A, B, *args, **kw)
        FLOPS[0] += 2.0 * A.shape[0] * A.shape[1] * B.shape[1]
        return out

    return wrapped


def _install_counters():
    for mod in (rj_mod, rjl_mod, rjs_mod, fl_mod, meth_mod):
        for name in ("panel_matmul", "tile_matmul"):
            if hasattr(mod, name):
                setattr(mod, name, _count(getattr(chain_mod, name)))


def gemm_rate(n=2048, repeat=3) -> float:
    rng = np.random.default_rng(0)
    A, B = rng.standard_normal((n, n)), rng.standard_normal((n, n))
    A @ B
    ts = []
    for _ in range(repeat):
        t = time.perf_counter()
        A @ B
        ts.append(time.perf_counter() - t)
    return 2 * n**3 / min(ts) / 1e9


def machine() -> str:
    try:
        model = [l.split(":", 1)[1].strip() for l in subprocess.check_output(["lscpu"], text=True).splitlines() if l.startswith("Model name")][0]
    except Exception:  # pragma: no cover
        model = platform.processor()
    return f"{model}, {os.cpu_count()} logical CPUs, Python {platform.python_version()}, numpy {np.__version__}"


def dense_flops(chain) -> float:
    """Flops of the plain dense recursion on this chain (no dead-neuron removal, no sparsity, no sharing): per step
    ``t``, ``4 R c_t sum_{s=2..t} d_{s-1} d_s`` plus the top, both chains (Fast-Lip: ``4 R d_t c_t``)."""
    R = chain.n_rows
    d = chain.widths  # d_1 .. d_{T+1}
    tot = 0.0
    for t in range(1, chain.n_steps + 1):
        c = d[t]
        tot += 4.0 * R * c * (sum(d[s - 2] * d[s - 1] for s in range(2, t + 1)) + d[0])
    return tot


def run_case(net, x0, eps, method, repeat, lb):
    res = jacobian_bounds(net, x0, eps, method=method, layer_bounds=lb)  # warm-up
    times, flops = [], []
    for _ in range(repeat):
        FLOPS[0] = 0.0
        r = jacobian_bounds(net, x0, eps, method=method, layer_bounds=lb)
        times.append(r.timings["jacobian"])
        flops.append(FLOPS[0])
    return res, statistics.median(times), statistics.median(flops)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "jacobian_speed.md"))
    args = ap.parse_args(argv)
    _install_counters()
    lines = []
    with threadpool_limits(1):
        t0 = time.perf_counter()
        compile_s = kernels.ensure_compiled(np.float64)
        rate = gemm_rate()
        lines.append(f"## Jacobian bounds (in-memory, `recurjac_scale.jacobian`)\n")
        lines.append(f"- Machine: {machine()}; date {datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M UTC')}")
        lines.append(f"- BLAS: 1 thread (threadpoolctl); OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', 'unset')}")
        lines.append(f"- float64 GEMM rate (n = 2048, best of 3): **{rate:.1f} GFLOP/s**")
        lines.append(f"- numba compile/load of the kernels: {compile_s:.2f} s (once per process; cached on disk)")
        lines.append(f"- Timings: median of {args.repeat} runs after a warm-up; GFLOP = GEMM flops executed (padding included)")
        lines.append("")
        cases = [
            ("MNIST 7-layer 784-1024-512-256-128-64-32-10", [784, 1024, 512, 256, 128, 64, 32, 10],
             [(e, m) for e in (0.001, 0.01, 0.1) for m in ("fastlip", "recurjac-b")]
             + [(e, m) for e in ((0.001, 0.01) if not args.quick else (0.01,)) for m in ("recurjac-f0", "recurjac-f1")]),
            ("CIFAR-like 3072-1024-512-256-10", [3072, 1024, 512, 256, 10],
             [(e, m) for e in (0.001, 0.01) for m in ("fastlip", "recurjac-b", "recurjac-f1")]
             + ([] if args.quick else [(0.001, "recurjac-f0")])),
        ]
        for title, widths, runs in cases:
            rng = np.random.default_rng(2019)
            net = random_network(widths, "relu", rng)
            x0 = rng.uniform(0.0, 1.0, widths[0])
            lines.append(f"### {title}\n")
            lines.append("| eps | method | layer bounds (crown) s | unstable per layer | jacobian s | GFLOP executed | GFLOP/s | x GEMM rate | dense-equivalent GFLOP | dense-equiv. GFLOP/s | mean width |")
            lines.append("|---|---|---|---|---|---|---|---|---|---|---|")
            lbs = {}
            for eps, method in runs:
                if eps not in lbs:
                    t = time.perf_counter()
                    lbs[eps] = layer_bounds(net, x0, eps, math.inf, method="crown")
                    lbs[eps] = (lbs[eps], time.perf_counter() - t)
                lb, t_lb = lbs[eps]
                res, t_jac, fl = run_case(net, x0, eps, method, args.repeat, lb)
                g = fl / 1e9
                dg = (dense_flops(res.chain) if method != "fastlip" else 4.0 * sum(
                    res.chain.n_rows * a * b for a, b in zip(res.chain.widths[:-1], res.chain.widths[1:]))) / 1e9
                lines.append(
                    f"| {eps:g} | {method} | {t_lb:.2f} | {', '.join(map(str, res.unstable))} | {t_jac:.3f} | "
                    f"{g:.2f} | {g / t_jac:.1f} | {g / t_jac / rate:.2f} | {dg:.1f} | {dg / t_jac:.1f} | "
                    f"{float(np.mean(res.width)):.4g} |"
                )
                print(lines[-1], flush=True)
            lines.append("")
        # Tightness: Fast-Lip vs RecurJac-B vs F0 on small random ReLU nets (mean width of the bounds).
        lines.append("### Mean bound width on random ReLU nets (same CROWN layer bounds)\n")
        lines.append("| net | eps | fastlip | recurjac-b | recurjac-f0 | recurjac-f1 |")
        lines.append("|---|---|---|---|---|---|")
        for widths in ([20, 64, 64, 64, 10], [50, 40, 40, 40, 40, 40, 10]):
            rng = np.random.default_rng(7)
            net = random_network(widths, "relu", rng)
            x0 = rng.uniform(0.0, 1.0, widths[0])
            for eps in (0.003, 0.01, 0.03):
                lb = layer_bounds(net, x0, eps, math.inf, method="crown")
                w = [float(np.mean(jacobian_bounds(net, x0, eps, method=m, layer_bounds=lb).width))
                     for m in ("fastlip", "recurjac-b", "recurjac-f0", "recurjac-f1")]
                lines.append(f"| {'-'.join(map(str, widths))} | {eps:g} | " + " | ".join(f"{v:.4g}" for v in w) + " |")
        lines.append("")
        lines.append(NOTES)
        lines.append(f"Total benchmark time {time.perf_counter() - t0:.0f} s.")
    text = "\n".join(lines) + "\n"
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        fh.write(text)
    print(text)


if __name__ == "__main__":
    main()
