"""Benchmark of the Jacobian bounds on the 7-layer MNIST shape and of the Lipschitz constants on a real network
(issue 4).

1. The 7-layer MNIST shape 784-1024-512-256-128-64-32-10 (He-uniform weights, seed 0, ReLU; inputs: MNIST test
   images scaled to [0, 1]), RecurJac-B and Fast-Lip at eps in {0.001, 0.01, 0.1} (l-inf): median of several runs
   of the Jacobian step alone (the CROWN layer bounds are computed once and timed separately), numba compile time
   measured separately (in a fresh numba cache folder), the FLOPs the recursion actually executes (every
   ``np.matmul`` of one run counted with its operand shapes, zero padding included), the achieved GFLOP/s and
   its ratio to the float64 GEMM rate measured next to each configuration in the same run.  BLAS: 1 thread.
2. The real network ``nets/auto_lirpa/mnist_fc_3layer`` (784-128-64-10) on the first 5 MNIST test images, l-inf,
   eps in {0, 0.001, 0.01, 0.03}: the certified Lipschitz constant of the predicted logit for all four methods
   (Algorithm 2 for the RecurJac methods), with the largest gradient l1 norm found at sampled and attacked points
   (a lower bound of the true constant) and a containment check of the Jacobian bounds at those points.  Any
   violation is printed and marked in the table.

Usage::

    python benchmarks/bench_lipschitz.py [--runs 5] [--images 3] [--out benchmarks/results/jacobian.md]

The results replace only this script's own section of the output file (between HTML comment markers), so other
benchmarks may write to the same file.  The shared data folder is found through ``$RECURJAC_SHARED`` or a
``shared/`` folder beside a parent of this file.  ``OPENBLAS_CORETYPE`` / ``OPENBLAS_L2_SIZE`` are left as the
environment sets them (STACK.md).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

# A fresh numba cache, so that the first call really compiles (the kernels are cache=True).
os.environ.setdefault("NUMBA_CACHE_DIR", tempfile.mkdtemp(prefix="recurjac-bench-numba-"))

import numpy as np  # noqa: E402
from threadpoolctl import threadpool_info, threadpool_limits  # noqa: E402

HERE = Path(__file__).resolve().parent
WIDTHS = (784, 1024, 512, 256, 128, 64, 32, 10)
EPS_BENCH = (0.001, 0.01, 0.1)
EPS_REAL = (0.0, 0.001, 0.01, 0.03)
METHODS_REAL = ("fastlip", "recurjac-b", "recurjac-f0", "recurjac-f1")
START = "<!-- bench_lipschitz.py: start -->"
END = "<!-- bench_lipschitz.py: end -->"


def find_shared() -> Path:
    env = os.environ.get("RECURJAC_SHARED")
    cands = [Path(env)] if env else []
    cands += [p / "shared" for p in HERE.parents]
    for c in cands:
        if (c / "nets").is_dir() and (c / "data").is_dir():
            return c
    sys.exit("shared data folder not found; set RECURJAC_SHARED")


def machine() -> dict:
    info = {"python": platform.python_version(), "numpy": np.__version__, "nproc": os.cpu_count()}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            k, _, v = line.partition(":")
            if k.strip() in ("Model name", "CPU(s)", "L2 cache", "L3 cache"):
                info[k.strip()] = v.strip()
    except (OSError, subprocess.CalledProcessError):
        info["Model name"] = platform.processor()
    import numba

    info["numba"] = numba.__version__
    blas = [
        f"{d.get('internal_api')} {d.get('version')} ({d.get('architecture')})"
        for d in threadpool_info()
        if d.get("user_api") == "blas"
    ]
    info["blas"] = ", ".join(blas)
    info["OPENBLAS_CORETYPE"] = os.environ.get("OPENBLAS_CORETYPE", "(unset)")
    return info


def gemm_rate(n: int = 2048, runs: int = 3) -> float:
    """float64 GEMM GFLOP/s (median of ``runs``), with the BLAS thread limit in force."""
    rng = np.random.default_rng(0)
    A, B = rng.normal(size=(n, n)), rng.normal(size=(n, n))
    A @ B
    ts = []
    for _ in range(runs):
        t = time.perf_counter()
        A @ B
        ts.append(time.perf_counter() - t)
    return 2.0 * n**3 / statistics.median(ts) / 1e9


class FlopCounter:
    """Counts the FLOPs of every ``np.matmul`` call (2 m k n per call, as executed, zero padding included).

    The package's GEMM helpers call ``np.matmul`` through the ``numpy`` module, so patching the attribute sees
    every BLAS product of a run (not the numba passes, which are elementwise preparation)."""

    def __init__(self):
        self.flops = 0
        self.calls = 0
        self._orig = None

    def __enter__(self):
        self._orig = np.matmul
        orig = self._orig

        def counted(a, b, *args, **kw):
            a_, b_ = np.asarray(a), np.asarray(b)
            if a_.ndim >= 2 and b_.ndim >= 2:
                batch = 1
                if max(a_.ndim, b_.ndim) > 2:
                    batch = int(np.prod(np.broadcast_shapes(a_.shape[:-2], b_.shape[:-2])))
                self.flops += 2 * batch * a_.shape[-2] * a_.shape[-1] * b_.shape[-1]
            elif a_.ndim == 2 and b_.ndim == 1:
                self.flops += 2 * a_.shape[0] * a_.shape[1]
            self.calls += 1
            return orig(a, b, *args, **kw)

        np.matmul = counted
        return self

    def __exit__(self, *exc):
        np.matmul = self._orig
        return False


def mnist_images(shared: Path, k: int) -> tuple[np.ndarray, np.ndarray]:
    rows = np.loadtxt(shared / "data" / "eran" / "mnist_test.csv", delimiter=",", max_rows=k, ndmin=2)
    return rows[:, 1:] / 255.0, rows[:, 0].astype(int)


def bench_seven_layer(images: np.ndarray, runs: int, rates: list) -> tuple[list[dict], dict]:
    from recurjac_scale import kernels
    from recurjac_scale.jacobian import jacobian_bounds
    from recurjac_scale.layer_bounds import layer_bounds
    from recurjac_scale.testing import random_network

    t = time.perf_counter()
    compile_s = kernels.ensure_compiled(np.float64)
    compile_wall = time.perf_counter() - t
    net = random_network(WIDTHS, "relu", np.random.default_rng(0), domain=(0.0, 1.0))
    rows = []
    for i, x0 in enumerate(images):
        for eps in EPS_BENCH:
            rates.append(gemm_rate())  # the machine is shared: sample the GEMM rate next to every configuration
            t = time.perf_counter()
            lb = layer_bounds(net, x0, eps, math.inf, method="crown")
            t_lb = time.perf_counter() - t
            for method in ("fastlip", "recurjac-b"):
                jacobian_bounds(net, x0, eps, math.inf, method=method, layer_bounds=lb)  # warm-up
                ts = []
                for _ in range(runs):
                    t = time.perf_counter()
                    res = jacobian_bounds(net, x0, eps, math.inf, method=method, layer_bounds=lb, keep_states=False)
                    ts.append(time.perf_counter() - t)
                with FlopCounter() as fc:
                    jacobian_bounds(net, x0, eps, math.inf, method=method, layer_bounds=lb, keep_states=False)
                med = statistics.median(ts)
                gf = fc.flops / med / 1e9
                rate = rates[-1]
                rows.append(
                    dict(
                        image=i, eps=eps, method=method, layer_bounds_s=t_lb, median_s=med, min_s=min(ts), runs=runs,
                        flops=fc.flops, blas_calls=fc.calls, gflops=gf, gemm=rate, ratio=gf / rate,
                        unstable=res.unstable, mean_width=float(res.width.mean()),
                    )
                )
                print(
                    f"  image {i} eps {eps:g} {method:11s} {med:8.4f} s  {fc.flops / 1e9:8.3f} GFLOP  {gf:6.2f} GF/s"
                    f"  (GEMM {rate:.1f})",
                    flush=True,
                )
    return rows, {"compile_s": compile_s, "compile_wall_s": compile_wall}


def load_real_network(shared: Path):
    from recurjac_scale.network.model import InputSpec, Network

    d = np.load(shared / "nets" / "auto_lirpa" / "mnist_fc_3layer.npz")
    n = int(d["n_layers"])
    return Network(
        [d[f"W{k}"] for k in range(n)],
        [d[f"b{k}"] for k in range(n)],
        [str(a) for a in d["acts"][:-1]],
        input_spec=InputSpec(shape=(784,), domain_lower=0.0, domain_upper=1.0),
    ).materialize()


def bench_real(shared: Path, n_images: int, n_sample: int) -> list[dict]:
    from recurjac_scale.jacobian import jacobian_bounds
    from recurjac_scale.layer_bounds.base import Region
    from recurjac_scale.lipschitz import lipschitz
    from recurjac_scale.testing import hill_climb, jacobian_attack_points, neuron_attack_points, sample_region

    net = load_real_network(shared)
    X, y = mnist_images(shared, n_images)
    rng = np.random.default_rng(2019)
    out = []
    for i, x0 in enumerate(X):
        c = int(net.forward(x0).argmax())
        for eps in EPS_REAL:
            region = Region.of(net, x0, eps, math.inf)
            pts = [sample_region(region, n_sample, rng)]
            if eps > 0:
                pts.append(jacobian_attack_points(net, region, rng, entries=6, steps=20))
                pts.append(neuron_attack_points(net, region, rng, neurons_per_layer=2, steps=10))
                pts.append(
                    hill_climb(region, lambda Z: np.abs(net.jacobian(Z)[:, c, :]).sum(axis=1), rng, starts=6, steps=40)
                )
            P = np.vstack(pts)
            Js = net.jacobian(P)
            g = float(np.abs(Js[:, c, :]).sum(axis=1).max())
            row = dict(image=i, label=int(y[i]), pred=c, eps=eps, points=len(P), sampled_max=g)
            for method in METHODS_REAL:
                jb = jacobian_bounds(net, x0, eps, math.inf, method=method)
                contained = bool(((Js >= jb.lower) & (Js <= jb.upper)).all())
                res = lipschitz(net, x0, eps, math.inf, method=method, outputs=c)
                pt = res.points[0]
                row[method] = dict(
                    lipschitz=pt.lipschitz, prop2=pt.prop2, algorithm2=pt.algorithm2, source=pt.source,
                    time_s=pt.time_s, contained=contained,
                )
                row["naive"] = res.naive_global
                if pt.lipschitz < g or not contained:
                    print(
                        f"  !! UNSOUND: image {i} eps {eps:g} {method}: lipschitz {pt.lipschitz} vs sampled {g}, "
                        f"contained={contained}",
                        flush=True,
                    )
            out.append(row)
            print(
                f"  image {i} eps {eps:g}: " + ", ".join(f"{m} {row[m]['lipschitz']:.4g}" for m in METHODS_REAL)
                + f" (sampled {g:.4g})",
                flush=True,
            )
    return out


def render(info: dict, rates: list, rows: list[dict], comp: dict, real: list[dict], runs: int) -> str:
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    L = [START, "## Jacobian bounds (7-layer MNIST shape) and Lipschitz constants (real network)", ""]
    L.append(
        f"Written by `benchmarks/bench_lipschitz.py` on {now}.  Machine: {info.get('Model name')}, "
        f"{info.get('CPU(s)', info['nproc'])} CPUs (nproc {info['nproc']}), L2 {info.get('L2 cache', '?')}, "
        f"L3 {info.get('L3 cache', '?')}; Python {info['python']}, numpy {info['numpy']}, numba {info['numba']}, "
        f"BLAS {info['blas']}, OPENBLAS_CORETYPE={info['OPENBLAS_CORETYPE']}; BLAS limited to 1 thread."
    )
    L.append("")
    L.append(
        f"float64 GEMM (n = 2048, 1 thread, median of 3), measured {len(rates)} times during the run (before each "
        f"configuration; the machine is shared with other jobs, so it varies): median "
        f"**{statistics.median(rates):.1f} GFLOP/s**, range {min(rates):.1f}-{max(rates):.1f}.  Each row's ratio "
        f"uses the GEMM rate measured just before it (column *GEMM*).  Numba compile time (fresh cache): "
        f"{comp['compile_s']:.2f} s ({comp['compile_wall_s']:.2f} s wall), not included in any timing."
    )
    L.append("")
    L.append("### 7-layer MNIST shape 784-1024-512-256-128-64-32-10 (He-uniform, seed 0, ReLU), l-inf")
    L.append("")
    L.append(
        f"Inputs: MNIST test images 0..{max(r['image'] for r in rows)} (pixels / 255, domain [0, 1]).  Time = "
        f"median of {runs} runs of the Jacobian bounds alone (CROWN layer bounds computed once, timed apart), after "
        "a warm-up call.  FLOPs = every BLAS `matmul` of one run with its executed operand shapes (zero padding "
        "included); the numba preparation passes are not counted."
    )
    L.append("")
    L.append(
        "| image | eps | method | CROWN s | Jacobian s (median) | GFLOP | GFLOP/s | GEMM GFLOP/s | × GEMM "
        "| unstable per layer | mean width |"
    )
    L.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        L.append(
            f"| {r['image']} | {r['eps']:g} | {r['method']} | {r['layer_bounds_s']:.3f} | {r['median_s']:.4f} | "
            f"{r['flops'] / 1e9:.3f} | {r['gflops']:.2f} | {r['gemm']:.1f} | {r['ratio']:.2f} | "
            f"{'-'.join(map(str, r['unstable']))} | {r['mean_width']:.4g} |"
        )
    L.append("")
    L.append(
        "For reference (ALGORITHM.md): the authors' float32 implementation takes 0.17 s for RecurJac-B on this "
        "shape on this machine."
    )
    L.append("")
    L.append("### Real network: auto_LiRPA mnist_fc_3layer (784-128-64-10 ReLU), l-inf, predicted logit")
    L.append("")
    L.append(
        "Certified local Lipschitz constant of the predicted logit f_c (dual norm, i.e. the l1 norm of the "
        "gradient bound; Algorithm 2 for the RecurJac methods), CROWN layer bounds, p = inf.  *sampled max* = the "
        "largest ||∇f_c||_1 found at random, vertex and attacked points (a lower bound of the true constant).  "
        "Algorithm 2 of F0/F1 uses the backward chain for the directional bound (recurjac_scale.lipschitz), so "
        "their values often coincide with B's."
    )
    L.append("")
    all_in = all(r[m]["contained"] for r in real for m in METHODS_REAL)
    bad = [(r["image"], r["eps"], m) for r in real for m in METHODS_REAL if r[m]["lipschitz"] < r["sampled_max"]]
    L.append(
        "Every Jacobian bound contained the exact Jacobian at all those points: "
        + ("**yes**." if all_in else "**NO**.")
        + "  Every certified constant was >= the sampled max: "
        + ("**yes**." if not bad else f"**NO: {bad}** (marked !!).")
    )
    L.append("")
    L.append("| image (label) | eps | points | sampled max | Fast-Lip | RecurJac-B | RecurJac-F0 | RecurJac-F1 | B s | F0 s |")
    L.append("|---|---|---|---|---|---|---|---|---|---|")
    for r in real:
        vals = " | ".join(
            f"{r[m]['lipschitz']:.4g}" + ("" if r[m]["lipschitz"] >= r["sampled_max"] else " !!") for m in METHODS_REAL
        )
        L.append(
            f"| {r['image']} ({r['label']}) | {r['eps']:g} | {r['points']} | {r['sampled_max']:.4g} | {vals} | "
            f"{r['recurjac-b']['time_s']:.3f} | {r['recurjac-f0']['time_s']:.3f} |"
        )
    if real:
        naive = sorted({round(r["naive"], 6) for r in real})
        L.append("")
        L.append(
            "Naive global constant of the predicted logit (product of operator norms): "
            + ", ".join(f"{v:.4g}" for v in naive) + "."
        )
    L.append("")
    L.append(END)
    return "\n".join(L) + "\n"


def write_section(path: Path, text: str) -> None:
    """Replace this script's section of ``path`` (or append it), keeping everything else."""
    path.parent.mkdir(parents=True, exist_ok=True)
    old = path.read_text() if path.exists() else ""
    if START in old and END in old:
        a = old.index(START)
        b = old.index(END) + len(END)
        new = old[:a] + text.rstrip("\n") + old[b:]
    else:
        new = (old.rstrip("\n") + "\n\n" if old.strip() else "") + text
    path.write_text(new)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--images", type=int, default=3, help="MNIST images for the 7-layer benchmark")
    ap.add_argument("--real-images", type=int, default=5)
    ap.add_argument("--real-samples", type=int, default=2000)
    ap.add_argument("--out", default=str(HERE / "results" / "jacobian.md"))
    args = ap.parse_args(argv)
    shared = find_shared()
    info = machine()
    with threadpool_limits(1):
        rates = [gemm_rate()]
        print(f"GEMM float64: {rates[0]:.1f} GFLOP/s", flush=True)
        X, _ = mnist_images(shared, args.images)
        rows, comp = bench_seven_layer(X, args.runs, rates)
        real = bench_real(shared, args.real_images, args.real_samples)
        rates.append(gemm_rate())
    write_section(Path(args.out), render(info, rates, rows, comp, real, args.runs))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
