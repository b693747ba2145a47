"""Benchmark of the pre-activation bound methods (ibp, fastlin, crown) on the 784-1024-1024-1024-10 shape.

Run: ``python benchmarks/bench_layer_bounds.py [--repeats 5] [--threads 1] [--out benchmarks/results/layer_bounds.md]``

Seeded He-uniform ReLU (and tanh) networks with inputs in the domain [0, 1], eps = 0.01 (l-inf) and 0.5 (l2).
For each method: median wall time of ``--repeats`` runs after one warm-up call, the float64 GEMM rate measured in
the same run (n = 2048, same BLAS thread count), and the ratio of the method's back-substitution GEMM work (the
flops of the GEMMs it actually issues, counted from the active neurons) to what the machine's GEMM rate would take.
There are no numba kernels in these methods (compile time 0).  Writes a Markdown section.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import math
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import numpy as np

from recurjac_scale.layer_bounds import layer_bounds
from recurjac_scale.testing import random_network

SHAPE = (784, 1024, 1024, 1024, 10)


def gemm_rate(n: int = 2048, repeats: int = 5, dtype=np.float64) -> float:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n)).astype(dtype)
    b = rng.standard_normal((n, n)).astype(dtype)
    a @ b
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        ts.append(time.perf_counter() - t)
    return 2.0 * n**3 / statistics.median(ts)


def backsub_flops(lb, net, variants: int) -> float:
    """Flops of the chain GEMMs for one pass: target layer t, block of n_t rows, both chains; each GEMM has as
    inner dimension the neurons of layer k that carry coefficients (not dead: upper bound > 0 for ReLU)."""
    widths = net.widths
    active = [int(np.count_nonzero(u > 0)) for u in lb.upper[:-1]]  # ReLU neurons that are not dead
    total = 0.0
    for t in range(1, net.n_layers):
        for k in range(t - 1, -1, -1):
            total += 2.0 * widths[t + 1] * active[k] * widths[k]
    return 2.0 * total * variants  # upper and lower chain


def find_shared() -> Path | None:
    """``$RECURJAC_SHARED`` or a ``shared/`` folder beside a parent of this checkout (as tests/conftest.py)."""
    env = os.environ.get("RECURJAC_SHARED")
    cands = [Path(env)] if env else []
    cands += [p / "shared" for p in Path(__file__).resolve().parents]
    return next((c for c in cands if (c / "nets").is_dir()), None)


def mnist_section() -> list[str]:
    """Unstable neurons per layer and mean widths on auto_LiRPA's mnist_fc_3layer, first 10 ERAN images, eps 0.01."""
    from recurjac_scale.network.model import InputSpec, Network

    shared = find_shared()
    if shared is None:
        return ["(shared data folder not found: MNIST section skipped)"]
    z = np.load(shared / "nets" / "auto_lirpa" / "mnist_fc_3layer.npz")
    net = Network([z[f"W{i}"].astype(np.float64) for i in range(3)], [z[f"b{i}"].astype(np.float64) for i in range(3)],
                  ["relu", "relu"], input_spec=InputSpec(shape=(784,), domain_lower=0.0, domain_upper=1.0))
    X = np.loadtxt(shared / "data" / "eran" / "mnist_test.csv", delimiter=",", max_rows=10)[:, 1:] / 255.0
    lines = [
        "mnist_fc_3layer (784-128-64-10 ReLU, auto_LiRPA), first 10 ERAN MNIST test images, pixels/255, domain "
        "[0, 1], eps = 0.01 l-inf (containment is checked in tests/test_layer_bounds_mnist.py):",
        "",
        "| method | unstable (layer 0, layer 1) per image | total unstable | mean width layer 0 / 1 / output |",
        "|---|---|---|---|",
    ]
    for m in ("ibp", "fastlin", "crown"):
        res = [layer_bounds(net, x, 0.01, math.inf, m) for x in X]
        unst = [tuple(int(v) for v in r.unstable[:2]) for r in res]
        w = [np.mean([float(np.mean(r.upper[k] - r.lower[k])) for r in res]) for k in range(3)]
        lines.append(f"| {m} | {unst} | {sum(map(sum, unst))} | {w[0]:.4g} / {w[1]:.4g} / {w[2]:.4g} |")
    return lines


def machine() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next((l.split(":", 1)[1].strip() for l in out.splitlines() if l.startswith("Model name")), "?")
    except OSError:  # pragma: no cover
        model = platform.processor() or "?"
    load = ", load average %.1f / %.1f / %.1f (other jobs share the machine)" % os.getloadavg()
    return f"{model}, {os.cpu_count()} CPUs (nproc), Python {platform.python_version()}, numpy {np.__version__}{load}"


def ordering_widths(seed: int = 5) -> list[tuple[str, dict]]:
    """Mean widths (over all layers and neurons) of ibp / fastlin / crown / plain CROWN-Ada on small random
    networks: depth 2-6 hidden layers of width 8-20, p in {1, 2, inf}."""
    rng = np.random.default_rng(seed)
    out = []
    for act, params in (("relu", {}), ("leaky_relu", {"alpha": 0.2}), ("tanh", {}), ("sigmoid", {}), ("elu", {})):
        sums: dict[str, float] = {}
        for trial in range(15):
            depth = 2 + trial % 5
            widths = [8] + [int(rng.integers(8, 20)) for _ in range(depth)] + [4]
            net = random_network(widths, act, rng, **params)
            x0 = rng.uniform(-1, 1, 8)
            for p, eps in ((1.0, 0.5), (2.0, 0.2), (math.inf, 0.05)):
                runs = {"ibp": ("ibp", {}), "crown": ("crown", {})}
                if act in ("relu", "leaky_relu"):
                    runs["fastlin"] = ("fastlin", {})
                    runs["crown-ada (plain)"] = ("crown", {"never_looser_than_fastlin": False, "intersect_ibp": False})
                for name, (m, opts) in runs.items():
                    lb = layer_bounds(net, x0, eps, p, m, **opts)
                    w = float(np.mean(np.concatenate([u - l for l, u in zip(lb.lower, lb.upper)])))
                    sums[name] = sums.get(name, 0.0) + w / 45.0
        out.append((act, sums))
    return out


def time_call(fn, repeats: int) -> tuple[float, float, object]:
    t = time.perf_counter()
    res = fn()
    first = time.perf_counter() - t
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        res = fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts), first, res


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "layer_bounds.md"))
    args = ap.parse_args(argv)
    from threadpoolctl import threadpool_limits

    rows = []
    with threadpool_limits(limits=args.threads, user_api="blas"):
        rate64 = gemm_rate()
        rate32 = gemm_rate(dtype=np.float32)
        rng = np.random.default_rng(2019)
        net = random_network(SHAPE, "relu", rng, domain=(0.0, 1.0))
        x0 = rng.uniform(0.0, 1.0, SHAPE[0])
        tanh = random_network(SHAPE, "tanh", np.random.default_rng(2020), domain=(0.0, 1.0))
        configs = [
            ("relu", net, "ibp", math.inf, 0.01, {}, 0),
            ("relu", net, "fastlin", math.inf, 0.01, {}, 1),
            ("relu", net, "crown", math.inf, 0.01, {"never_looser_than_fastlin": False}, 1),
            ("relu", net, "crown", math.inf, 0.01, {}, 2),
            ("relu", net, "crown", math.inf, 0.01, {"dtype": np.float32}, 2),
            ("relu", net, "crown", 2.0, 0.5, {}, 2),
            ("relu", net, "crown", math.inf, 0.01, {"block_rows": 64}, 2),
            ("tanh", tanh, "ibp", math.inf, 0.01, {}, 0),
            ("tanh", tanh, "crown", math.inf, 0.01, {}, 1),
        ]
        for act, nw, method, p, eps, opts, variants in configs:
            med, first, lb = time_call(lambda: layer_bounds(nw, x0, eps, p, method, **opts), args.repeats)
            widths = [float(np.mean(u - l)) for l, u in zip(lb.lower, lb.upper)]
            rate = rate32 if opts.get("dtype") == np.float32 else rate64
            if variants and act == "relu":
                fl = backsub_flops(lb, nw, variants)
            elif variants:
                fl = 2.0 * sum(2.0 * nw.widths[t + 1] * nw.widths[k + 1] * nw.widths[k]
                               for t in range(1, nw.n_layers) for k in range(t))
            else:
                fl = 0.0
            ratio = (fl / rate) / med if fl else float("nan")
            label = method + ("" if not opts else " (" + ", ".join(
                f"{k}={getattr(v, '__name__', v)}" for k, v in opts.items()) + ")")
            rows.append((act, label, "inf" if p == math.inf else f"{p:g}", eps, med, first, fl / 1e9, ratio,
                         list(lb.unstable[:-1]), widths[:-1]))
            print(rows[-1], flush=True)

    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "## Layer bounds (IBP, Fast-Lin, CROWN) on 784-1024-1024-1024-10",
        "",
        f"- Machine: {machine()}; BLAS threads: {args.threads} (threadpoolctl); "
        f"OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', '(unset)')}.",
        f"- Date: {date}. Median of {args.repeats} runs after one warm-up call; no numba kernels (compile 0 s).",
        f"- GEMM rate measured in the same run (n = 2048): float64 {rate64 / 1e9:.1f} GF/s, float32 "
        f"{rate32 / 1e9:.1f} GF/s.",
        "- Networks: seeded He-uniform (`random_network`, seed 2019 relu / 2020 tanh), domain [0, 1], x0 uniform in "
        "[0, 1].  GF = flops of the back-substitution GEMMs actually issued (both chains, every pass; dead ReLU "
        "neurons are skipped); ratio = (GF / GEMM rate) / time, i.e. the fraction of the machine's GEMM rate "
        "achieved (1.0 = all time spent in GEMM at full rate).  `crown` on ReLU nets runs 2 passes (CROWN-Ada "
        "and Fast-Lin alongside, intersected per layer) so that it is never looser than Fast-Lin; "
        "`never_looser_than_fastlin=False` is plain CROWN-Ada (1 pass).  The GF count of a 2-pass run "
        "approximates Fast-Lin's dead-neuron count by CROWN's.",
        "",
        "| act | method | p | eps | median s | first call s | GF | ratio | unstable per hidden layer | mean width per hidden layer |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for act, label, p, eps, med, first, gf, ratio, unst, widths in rows:
        lines.append(
            f"| {act} | {label} | {p} | {eps:g} | {med:.3f} | {first:.3f} | {gf:.2f} | "
            f"{'-' if math.isnan(ratio) else f'{ratio:.2f}'} | {unst} | {', '.join(f'{w:.4g}' for w in widths)} |"
        )
    lines += [
        "",
        "Mean widths on small random networks (15 networks per activation, 2-6 hidden layers of width 8-20, "
        "p = 1 / 2 / inf with eps = 0.5 / 0.2 / 0.05; mean over all layers and neurons):",
        "",
        "| act | " + " | ".join(("ibp", "fastlin", "crown-ada (plain)", "crown")) + " |",
        "|---|---|---|---|---|",
    ]
    for act, sums in ordering_widths():
        cells = [f"{sums[m]:.4g}" if m in sums else "-" for m in ("ibp", "fastlin", "crown-ada (plain)", "crown")]
        lines.append(f"| {act} | " + " | ".join(cells) + " |")
    lines += [""] + mnist_section()
    lines.append("")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
