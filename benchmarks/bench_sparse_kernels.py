"""Sparse x dense kernels vs the dense kernels on the same pruned network (issue 5, "benchmark a 90%-pruned version
of the CIFAR shape against its dense twin").

The network is ``cifar_setup.he_network(prune_fraction=0.9)`` (the paper's CIFAR shape 3072-2048-2048-1024-1024-
512-512-256-256-128-10, ReLU, He-initialised, magnitude-pruned to 10% density and rescaled), or any ``--widths``.
The *dense twin* is the same pruned network through the dense kernels (BLAS on the dense matrices, zeros
included); *sparse* is the same chain with CSR copies of every matrix below ``--threshold`` density
(``Chain.with_sparse``: RecurJac level products, step 1, magnitude chain, Fast-Lip and the F1 finish as
scipy.sparse x dense).  Both get the same layer bounds and derivative bounds, computed once.

Measured, one BLAS thread (threadpoolctl), in one process:
- numba compile (or cache load) of the kernels, separately (``kernels.ensure_compiled``), and a warm-up run on a
  tiny chain;
- the float64 GEMM rate (n = 2048) in the same run, as the ratio reference;
- ``--full`` methods (default RecurJac-B, Fast-Lip): a whole ``run_chain``, median of ``--runs`` (>= 3) runs per
  kernel, alternating dense / sparse;
- ``--sample`` methods (default RecurJac-F0): ``--row-blocks`` row blocks of ``--row-block`` rows (seeded choice),
  every layer step for those rows (rows are independent: the chain restricted to them computes exactly their rows),
  ``--sample-runs`` runs per kernel, extrapolated to all rows;
- plan FLOPs of each kernel (``ChainCost.flops_per_entry``: dense counts rows x columns, sparse the stored entries),
  the achieved GFLOP/s and its ratio to the GEMM rate; the load average before and after every measurement; the
  largest difference between the two results relative to the largest bound (summation order differs).

Writes ``benchmarks/results/sparse_kernels.md`` (``--output``) and a JSON file into the benchmark results folder
(``$RECURJAC_BENCH_DIR/results``, see ``cifar_setup.work_dir``).  On the CIFAR shape the input is CIFAR-10 test image
``--image`` from the shared data folder and the radius the one with ``--unstable`` of the first layer's neurons
unstable; with ``--widths`` a seeded uniform input in [0, 1] and ``--eps``.

    python benchmarks/bench_sparse_kernels.py                         # CIFAR shape: heavy (see --help)
    python benchmarks/bench_sparse_kernels.py --widths 256,256,128,10 --output quick.md   # quick check
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

_HERE = Path(__file__).resolve().parent
_REPO = _HERE.parent
for _p in (str(_REPO), str(_HERE)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import cifar_setup  # noqa: E402


def _load() -> list:
    return [round(x, 2) for x in os.getloadavg()]


def _timed(f):
    load0 = _load()
    t = time.perf_counter()
    out = f()
    return time.perf_counter() - t, out, load0, _load()


def _plan_flops(method: str, chain) -> float:
    """The engine plan's FLOP count of a whole run of ``chain`` (sparse levels by their stored entries; a step that
    shares across rows by that variant's model, its shared parts counted once for all rows), before the per-row
    masks."""
    from recurjac_scale.jacobian import get_jacobian_method

    shape = get_jacobian_method(method).cost(chain)
    R, d = shape.n_rows, shape.widths
    return float(sum(R * d[t] * shape.flops_per_entry(t, block=(R, d[t])) for t in range(1, shape.n_steps + 1)))


def _rel_diff(a, b) -> float:
    (la, ua), (lb, ub) = a, b
    scale = max(np.abs(la).max(), np.abs(ua).max(), 1e-300)
    return float(max(np.abs(la - lb).max(), np.abs(ua - ub).max()) / scale)


def _setup(args):
    """The pruned network (outputs: the predicted logit), the input and the radius."""
    from recurjac_scale.network.sparse import density

    widths = tuple(int(w) for w in args.widths.split(",")) if args.widths else cifar_setup.CIFAR_WIDTHS
    net = cifar_setup.he_network(widths=widths, prune_fraction=args.prune)
    if args.widths:
        x0 = np.random.default_rng(cifar_setup.SEED).uniform(0.0, 1.0, widths[0])
        eps = float(args.eps)
        what = f"seeded uniform input, eps = {eps:g}"
    else:
        x, _y = cifar_setup.cifar_images(args.image + 1)
        x0 = x[args.image]
        eps = cifar_setup.eps_for_unstable_fraction(net, x0, args.unstable)
        what = (f"CIFAR-10 test image {args.image}, eps = {eps:.3g} ({args.unstable:.0%} of layer 1 unstable, "
                "l_inf, clipped to [0, 1])")
    pred = int(np.argmax(net.forward(x0[None, :])[0]))
    dens = [density(np.asarray(w)) for w in net.weights]
    return net, widths, x0, eps, pred, what, dens


def _layer_bounds(net, x0, eps, pred, lbm):
    """The network with the predicted logit as output, its pre-activation bounds and their time (computed once)."""
    from recurjac_scale.jacobian.api import output_matrix
    from recurjac_scale.layer_bounds.base import layer_bounds

    netC = net.with_outputs(output_matrix(pred, net.n_outputs))
    t = time.perf_counter()
    lb = layer_bounds(netC, x0, eps, np.inf, method=lbm)
    return netC, lb, time.perf_counter() - t


def _chains(bounds, method, threshold):
    """Dense chain (the same code path as ``jacobian_bounds``), the sparse copy and the CSR conversion time."""
    from recurjac_scale.jacobian.chain import derivative_bounds_for
    from recurjac_scale.jacobian.methods import get_jacobian_method

    netC, lb, t_lb = bounds
    jm = get_jacobian_method(method)
    chain = jm.build_chain(netC, derivative_bounds_for(netC, lb))
    t = time.perf_counter()
    sparse = chain.with_sparse(threshold)
    t_conv = time.perf_counter() - t
    return jm, chain, sparse, t_conv, t_lb, list(lb.unstable)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", default=None, help="comma-separated widths instead of the CIFAR shape (quick runs)")
    ap.add_argument("--eps", type=float, default=0.005, help="radius with --widths (l_inf)")
    ap.add_argument("--image", type=int, default=0, help="CIFAR-10 test image (CIFAR shape)")
    ap.add_argument("--unstable", type=float, default=0.05,
                    help="CIFAR shape: radius with this fraction of layer-1 neurons unstable (default 0.05)")
    ap.add_argument("--prune", type=float, default=0.9, help="pruned fraction of every layer (default 0.9)")
    ap.add_argument("--threshold", type=float, default=0.3, help="density below which a matrix runs sparse")
    ap.add_argument("--layer-bounds", default="crown")
    ap.add_argument("--full", default="recurjac-b,fastlip", help="methods timed as whole runs ('' for none)")
    ap.add_argument("--runs", type=int, default=3, help="runs per kernel of a whole run (median; >= 3)")
    ap.add_argument("--sample", default="recurjac-f0", help="methods timed on sampled row blocks ('' for none)")
    ap.add_argument("--row-block", type=int, default=64, help="rows per sampled block (default 64)")
    ap.add_argument("--row-blocks", type=int, default=1, help="sampled row blocks (default 1)")
    ap.add_argument("--sample-runs", type=int, default=1, help="runs per kernel of the sample (median)")
    ap.add_argument("--output", default=str(_HERE / "results" / "sparse_kernels.md"))
    args = ap.parse_args(argv)
    if args.runs < 3:
        ap.error("--runs must be >= 3 (median of at least three runs)")

    from threadpoolctl import threadpool_limits

    import bench_scale
    from recurjac_scale import kernels
    from recurjac_scale.jacobian.driver import run_chain

    t = time.perf_counter()
    compile_s = kernels.ensure_compiled(np.float64)
    compile_wall = time.perf_counter() - t
    mach = bench_scale.machine()
    gemm = bench_scale.gemm_rate(repeats=3)
    net, widths, x0, eps, pred, what, dens = _setup(args)
    full = [m for m in args.full.split(",") if m]
    sample = [m for m in args.sample.split(",") if m]
    rows = []
    with threadpool_limits(1, user_api="blas"):
        # warm-up: every kernel of both paths on a tiny pruned network (imports, numba, scipy)
        tiny = cifar_setup.he_network(widths=(12, 10, 9, 3), prune_fraction=args.prune)
        for m in sorted(set(full + sample)):
            tb = _layer_bounds(tiny, np.full(12, 0.5), 0.05, 0, args.layer_bounds)
            jm, ch, sc, *_ = _chains(tb, m, args.threshold)
            run_chain(jm, ch)
            run_chain(jm, sc)
        bounds = _layer_bounds(net, x0, eps, pred, args.layer_bounds)
        for kind, methods in (("full", full), ("sample", sample)):
            for m in methods:
                jm, chain, sc, t_conv, t_lb, unstable = _chains(bounds, m, args.threshold)
                R = chain.n_rows
                if kind == "full":
                    sub_d, sub_s, frac, nrep = chain, sc, 1.0, args.runs
                    picked = None
                else:
                    nrb = -(-R // args.row_block)
                    rng = np.random.default_rng(7)
                    picked = sorted(int(i) for i in rng.choice(nrb, size=min(args.row_blocks, nrb), replace=False))
                    idx = np.concatenate([np.arange(b * args.row_block, min(R, (b + 1) * args.row_block))
                                          for b in picked])
                    top = np.asarray(chain.top)[idx]
                    sub_d = dataclasses.replace(chain, top=top)
                    sub_s = dataclasses.replace(sc, top=top)
                    frac, nrep = idx.size / R, args.sample_runs
                times = {"dense": [], "sparse": []}
                loads = []
                res = {}
                for _ in range(nrep):
                    for name, c in (("dense", sub_d), ("sparse", sub_s)):
                        sec, out, l0, l1 = _timed(lambda c=c: run_chain(jm, c, keep_states=False)[:2])
                        times[name].append(sec)
                        loads.append((l0, l1))
                        res[name] = out
                med = {k: statistics.median(v) for k, v in times.items()}
                fl = {"dense": _plan_flops(m, sub_d), "sparse": _plan_flops(m, sub_s)}
                row = {
                    "kind": kind, "method": m, "rows": R, "fraction": frac, "row_blocks": picked,
                    "row_block": args.row_block if picked else None, "runs": nrep, "times": times, "median": med,
                    "extrapolated": {k: v / frac for k, v in med.items()}, "speedup": med["dense"] / med["sparse"],
                    "plan_flops": fl,
                    "gflops": {k: fl[k] / med[k] / 1e9 for k in med},
                    "ratio_to_gemm": {k: fl[k] / med[k] / 1e9 / gemm["gflops"] for k in med},
                    "dense_flops_at_gemm_rate_s": fl["dense"] / (gemm["gflops"] * 1e9) / frac,
                    "csr_conversion_s": t_conv, "layer_bounds_s": t_lb, "unstable": unstable,
                    "sparse_levels": list(sc.sparse_levels()), "max_rel_diff": _rel_diff(res["dense"], res["sparse"]),
                    "loadavg": loads,
                }
                rows.append(row)
                print(json.dumps({k: row[k] for k in ("kind", "method", "median", "speedup", "max_rel_diff")}),
                      file=sys.stderr, flush=True)
    out = {
        "kind": "sparse_kernels", "command": "python benchmarks/bench_sparse_kernels.py " + " ".join(sys.argv[1:]), "machine": mach, "gemm": gemm,
        "compile_seconds": compile_s, "compile_wall_seconds": compile_wall, "widths": list(widths),
        "prune": args.prune, "density": dens, "threshold": args.threshold, "eps": eps, "input": what,
        "predicted": pred, "layer_bounds": args.layer_bounds, "rows": rows, "loadavg_end": _load(),
    }
    bench_scale.save("sparse_kernels" + ("" if not args.widths else "-" + "-".join(map(str, widths))), out)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(report(out))
    print(f"wrote {args.output}", file=sys.stderr)


def report(r: dict) -> str:
    """The Markdown section of one run."""
    m = r["machine"]
    lines = [
        "## Pruned networks: sparse x dense kernels vs the dense twin",
        "",
        f"`{r['command']}` — {m['date_utc']}, {m['cpu']} ({m['nproc']} cores), code {m['code_sha256']}; "
        f"load average at start {m['loadavg'][0]:.2f}, at end {r['loadavg_end'][0]:.2f} (per-run loads in the "
        "JSON file). One BLAS thread; float64 GEMM rate in the same run "
        f"{r['gemm']['gflops']:.1f} GFLOP/s (n = {r['gemm']['n']}); numba compile / cache load "
        f"{r['compile_wall_seconds']:.2f} s (not in the timings below).",
        "",
        f"Network {'-'.join(map(str, r['widths']))} ReLU, He-initialised, {r['prune']:.0%} of every layer pruned "
        f"(densities {', '.join(f'{d:.1%}' for d in r['density'])}); {r['input']}; output: the predicted logit "
        f"{r['predicted']}; layer bounds {r['layer_bounds']}. *Dense* = the pruned network through the dense kernels "
        f"(its dense twin); *sparse* = the same chain with CSR copies of every matrix below {r['threshold']:.0%} "
        "density (`Chain.with_sparse`: level products, step 1, magnitude chain, Fast-Lip, F1 finish through "
        "scipy.sparse). Same layer and derivative bounds for both. Whole runs: median of the runs; samples: the given "
        "row blocks for every layer step, extrapolated to all rows. GFLOP/s and the ratio to the GEMM rate use the "
        "plan's FLOP count of each kernel (sparse levels counted by their stored entries; steps sharing across "
        "rows by that variant's model, before the per-row masks, which drop most of F0's products: its GFLOP/s are "
        "nominal and can exceed the GEMM rate). Last column: largest "
        "difference between the two results relative to the largest bound (summation order differs; both certified).",
        "",
        "| method | measured | dense | sparse | speedup | dense GFLOP/s (× GEMM) | sparse useful GFLOP/s (× GEMM) "
        "| CSR conversion | max rel. diff |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for x in r["rows"]:
        if x["kind"] == "full":
            meas = f"whole run, median of {x['runs']}"
            d, s = x["median"]["dense"], x["median"]["sparse"]
            cell = lambda v: f"{v:.3f} s"  # noqa: E731
        else:
            meas = (f"{len(x['row_blocks'])} of {-(-x['rows'] // x['row_block'])} row blocks "
                    f"({x['fraction']:.2%} of rows), extrapolated")
            d, s = x["extrapolated"]["dense"], x["extrapolated"]["sparse"]
            cell = lambda v: f"{v:.1f} s ({v / 60:.1f} min)"  # noqa: E731
        lines.append(
            f"| {x['method']} | {meas} | {cell(d)} | {cell(s)} | {x['speedup']:.2f}× | "
            f"{x['gflops']['dense']:.1f} ({x['ratio_to_gemm']['dense']:.2f}) | "
            f"{x['gflops']['sparse']:.1f} ({x['ratio_to_gemm']['sparse']:.2f}) | {x['csr_conversion_s'] * 1e3:.0f} ms "
            f"| {x['max_rel_diff']:.1e} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
