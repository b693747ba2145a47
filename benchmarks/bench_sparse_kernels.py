"""Whole RecurJac runs through the opt-in sparse x dense kernels (``Chain.with_sparse``) vs the dense kernels, on
a 90%-pruned random network (default 1024-1024-1024-10, ReLU, He-uniform, seed 0; pruned weights rescaled by
1/sqrt(0.1) so the pre-activations keep their scale).  One BLAS thread (threadpoolctl), median of N runs of
``run_chain`` on the same chain (layer bounds and chain construction excluded; the CSR conversion is timed
separately).  Prints one Markdown paragraph + table.

    python benchmarks/bench_sparse_kernels.py [--widths 1024,1024,1024,10] [--methods recurjac-b,recurjac-f1]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import time

import numpy as np
from threadpoolctl import threadpool_limits

from recurjac_scale.jacobian import jacobian_bounds
from recurjac_scale.jacobian.driver import run_chain
from recurjac_scale.jacobian.methods import get_jacobian_method
from recurjac_scale.network import Network
from recurjac_scale.network.sparse import prune
from recurjac_scale.testing import random_network


def gemm_rate(n=1024, reps=3):
    a = np.random.default_rng(0).standard_normal((n, n))
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        a @ a
        ts.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(ts) / 1e9


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--widths", default="1024,1024,1024,10")
    ap.add_argument("--methods", default="recurjac-b,fastlip,recurjac-f1")
    ap.add_argument("--eps", type=float, default=0.005)
    ap.add_argument("--prune", type=float, default=0.9)
    ap.add_argument("--threshold", type=float, default=0.15)
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    widths = [int(w) for w in a.widths.split(",")]
    rng = np.random.default_rng(0)
    net = random_network(widths, "relu", rng)
    ws = [prune(w, a.prune) / np.sqrt(1 - a.prune) for w in net.weights]
    net = Network(ws, net.biases, net.activations, input_spec=net.input_spec)
    x0 = rng.uniform(0, 1, widths[0])
    rows = []
    with threadpool_limits(1):
        g = gemm_rate()
        for m in a.methods.split(","):
            jm = get_jacobian_method(m)
            res = jacobian_bounds(net, x0, a.eps, method=m)  # warm-up (numba) + the dense chain
            t = time.perf_counter()
            sc = res.chain.with_sparse(a.threshold)
            t_conv = time.perf_counter() - t
            td, ts = [], []
            for _ in range(a.runs):
                t = time.perf_counter()
                ld, ud, _ = run_chain(jm, res.chain)
                td.append(time.perf_counter() - t)
                t = time.perf_counter()
                ls, us, _ = run_chain(jm, sc)
                ts.append(time.perf_counter() - t)
            scale = max(np.abs(ld).max(), np.abs(ud).max())
            rel = max(np.abs(ls - ld).max(), np.abs(us - ud).max()) / scale
            unst = ", ".join(f"{u / w:.0%}" for u, w in zip(res.unstable, widths[1:-1]))
            rows.append((m, unst, statistics.median(td), statistics.median(ts), t_conv, rel))
    load = os.getloadavg()
    print(
        f"Sparse kernels, whole runs ({dt.datetime.now(dt.timezone.utc).isoformat(timespec='seconds')}, "
        f"`benchmarks/bench_sparse_kernels.py`): {'-'.join(map(str, widths))} ReLU pruned to "
        f"{1 - a.prune:.0%} density, eps = {a.eps} (l_inf), `run_chain` median of {a.runs}, 1 BLAS thread "
        f"(GEMM rate {g:.1f} GFLOP/s in the same run), load average {load[0]:.2f}, {load[1]:.2f}, {load[2]:.2f}. "
        "Dense = default kernels on the same pruned chain; sparse = `Chain.with_sparse("
        f"{a.threshold})` (CSR copies of the chain matrices, RecurJac level products as scipy sparse x dense). "
        "Fast-Lip does not use the level products (equal by construction). Max difference relative to the "
        "largest bound (summation order differs) in the last column.\n"
    )
    print("| method | unstable (hidden layers) | dense | sparse | speedup | CSR conversion | max rel. diff |")
    print("|---|---|---|---|---|---|---|")
    for m, u, d, s, c, r in rows:
        print(f"| {m} | {u} | {d:.3f} s | {s:.3f} s | {d / s:.2f}× | {c * 1e3:.1f} ms | {r:.1e} |")


if __name__ == "__main__":
    main()
