#!/usr/bin/env python
"""The default certify search against ``search="paper"`` (the authors' n = 15 x 15-step search).

On the first ``--images`` correctly classified images of ERAN's MNIST test CSV x the runner-up / random /
least-likely targets (the 30 items of the Table 1 speed comparison), the auto_LiRPA MNIST MLP, RecurJac-B with
CROWN layer bounds, l-inf: certified radius, local-constant evaluations, CPU and wall time per item of

- ``default``: ``search="grid"`` (the grid of radii alone; at or above ``paper`` on these inputs, measured),
- ``replay``: ``search="replay"`` (the grid, then the replay of the authors' driver; never below ``paper`` by
  construction),
- ``paper``: ``search="paper"``.

The three are run one after the other on each item (interleaved, so load changes hit them alike), ``--passes``
times; radii and evaluation counts must be identical across passes, times are the median over passes.  One
warm-up call (numba compile / cache load) is made first and not timed.  Writes
``benchmarks/results/raw/certify_search.json`` and the section ``benchmarks/results/applications_search.md``
(then copy the new figures into the matching section of ``benchmarks/RESULTS.md``).

    python benchmarks/bench_certify_search.py --shared ../shared [--images 10] [--passes 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from bench_certify import TARGETS, load_mnist  # noqa: E402
from recurjac_scale.applications import certify  # noqa: E402

MODES = {"default": "grid", "replay": "replay", "paper": "paper"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", type=Path, default=None, help="folder with nets/ and data/eran/ (required unless --report)")
    ap.add_argument("--images", type=int, default=10)
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--print-only", action="store_true", help="print the section, write nothing")
    ap.add_argument("--report", action="store_true", help="rewrite the section from the saved raw results only")
    args = ap.parse_args(argv)
    raw = HERE / "results" / "raw" / "certify_search.json"
    if args.report:
        o = json.loads(raw.read_text())
        (HERE / "results" / "applications_search.md").write_text(report(o))
        print(report(o))
        return 0
    if args.shared is None:
        ap.error("--shared is required")
    from threadpoolctl import threadpool_limits

    import importlib

    threadpool_limits(1)
    net = load_mnist(args.shared)
    rows = np.loadtxt(args.shared / "data" / "eran" / "mnist_test.csv", delimiter=",", max_rows=100, ndmin=2)
    X, y = rows[:, 1:] / 255.0, rows[:, 0].astype(int)
    correct = np.flatnonzero(net.forward(X).argmax(axis=1) == y)[: args.images]
    items = [(int(i), t) for i in correct for t in TARGETS]
    certify(net, X[correct[0]], int(y[correct[0]]), "runnerup", "inf", margin_bound=False)  # warm-up, not timed
    out = {"date": datetime.now(timezone.utc).isoformat(timespec="minutes"),
           "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
           "load_average_start": os.getloadavg(), "passes": args.passes,
           "items": [{"index": i, "target": t} for i, t in items],
           "modes": {m: {"radius": [], "evaluations": [], "cpu_s": [], "wall_s": []} for m in MODES}}
    search_mod = importlib.import_module("recurjac_scale.applications.search")
    caches = {m: search_mod._BoundsCache(search_mod.LAYER_BOUNDS_CACHE.max_bytes) for m in MODES}
    for _ in range(args.passes):
        per = {m: {"radius": [], "evaluations": [], "cpu_s": [], "wall_s": []} for m in MODES}
        for k, (i, t) in enumerate(items):
            for m, search in MODES.items():
                # each search keeps its own layer-bounds cache, emptied at each new input: the reuse measured is
                # across the targets of one input, as in one pass of a batch over inputs x targets
                if k == 0 or items[k - 1][0] != i:
                    caches[m].clear()
                search_mod.LAYER_BOUNDS_CACHE = caches[m]
                t0, c0 = time.perf_counter(), time.process_time()
                r = certify(net, X[i], int(y[i]), t, "inf", method="recurjac-b", layer_bounds="crown", search=search,
                            margin_bound=False, seed=0, index=i)
                per[m]["cpu_s"].append(time.process_time() - c0)
                per[m]["wall_s"].append(time.perf_counter() - t0)
                per[m]["radius"].append(r.radius)
                per[m]["evaluations"].append(r.evaluations)
        for m in MODES:
            o = out["modes"][m]
            for k in ("radius", "evaluations"):
                if o[k] and o[k] != per[m][k]:
                    raise SystemExit(f"{m}: {k} differ between passes")
                o[k] = per[m][k]
            o["cpu_s"].append(per[m]["cpu_s"])
            o["wall_s"].append(per[m]["wall_s"])
    out["load_average_end"] = os.getloadavg()
    if args.print_only:
        print(report(out))
        return 0
    raw.parent.mkdir(parents=True, exist_ok=True)
    raw.write_text(json.dumps(out, indent=1) + "\n")
    (HERE / "results" / "applications_search.md").write_text(report(out))
    print(report(out))
    return 0


def _total(o: dict, key: str) -> float:
    """Median over passes of the total time over items."""
    return statistics.median(sum(p) for p in o[key])


def report(o: dict) -> str:
    n = len(o["items"])
    m = o["modes"]
    pap = m["paper"]
    lines = [
        "### Default certify search against `--search paper`",
        "",
        f"Measured {o['date']} on {o['machine']} ({o['cpus']} cores), load average {o['load_average_start'][0]:.1f} "
        f"at the start and {o['load_average_end'][0]:.1f} at the end (shared machine: compare the CPU-time ratios). "
        f"{n} items: the first {n // len(TARGETS)} correctly classified MNIST test images x runner-up / random / "
        "least-likely targets, auto_LiRPA MNIST MLP, RecurJac-B, CROWN layer bounds, l-inf "
        f"(`benchmarks/bench_certify_search.py`, raw values in `results/raw/certify_search.json`). Each item runs "
        f"the three searches in turn, {o['passes']} passes; times are the median over passes of the total over "
        "items, after one untimed warm-up call.",
        "",
        "| search | evaluations (mean, min-max) | CPU s (total) | wall s (total) | paper / this, CPU | paper / this, "
        "wall | radius >= paper | radius / paper (min, mean) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, d in m.items():
        ev = d["evaluations"]
        rel = [a / b for a, b in zip(d["radius"], pap["radius"]) if b > 0]
        ge = sum(a >= b for a, b in zip(d["radius"], pap["radius"]))
        cpu, wall = _total(d, "cpu_s"), _total(d, "wall_s")
        lines.append(
            f"| {name} | {statistics.fmean(ev):.1f} ({min(ev)}-{max(ev)}) | {cpu:.1f} | {wall:.1f} | "
            f"{_total(pap, 'cpu_s') / cpu:.2f}x | {_total(pap, 'wall_s') / wall:.2f}x | {ge} / {n} | "
            f"{min(rel):.4f}, {statistics.fmean(rel):.4f} |")
    d, rp = m["default"], m["replay"]
    ratio_ev = statistics.fmean(pap["evaluations"]) / statistics.fmean(d["evaluations"])
    cpu_ratio = _total(pap, "cpu_s") / _total(d, "cpu_s")
    rp_ratio = _total(pap, "cpu_s") / _total(rp, "cpu_s")
    full = ""
    fpath = HERE / "results" / "raw" / "certify_search_full.jsonl"
    if fpath.exists():
        from check_certify_search_full import report as full_report

        recs = [json.loads(line) for line in fpath.read_text().splitlines() if line.strip()]
        full = (" On the full Table 1 set (every correctly classified image of the 100 x the three targets; "
                "`benchmarks/check_certify_search_full.py`, raw values in `results/raw/certify_search_full.jsonl`): "
                + full_report(recs).replace("grid:", "default (`grid`):") + ".")
    lines += [
        "",
        f"The default (`search=\"grid\"`: the constants on one grid of radii, reused for every candidate radius) "
        f"evaluates the local constant {ratio_ev:.1f}x less often than `--search paper` and is {cpu_ratio:.2f}x faster "
        "in CPU time. Its radius is a certificate (the stand-in argument in the docstring of "
        "`recurjac_scale/applications/search.py`), and it is at or above the paper's radius on every item above, "
        "but by measurement, not by construction: both searches bound the integral by a step function from the "
        "right, the paper with 15 equal steps, the grid with about 20 steps placed where the constant rises, and "
        "the computed constants need not be monotone." + full + " `search=\"replay\"` (the grid with 20 radii, "
        "then the authors' bracket-and-bisect driver replayed, each probe decided by the stand-in certificate, by a "
        "lower-bound proof that the authors' probe fails, or by their exact decision) is never below the paper "
        f"search, for every input, by construction; it is {rp_ratio:.2f}x faster than paper in CPU time. Most of "
        "its extra evaluations are those proofs, at probes within a few percent of the authors' threshold, which "
        "need most of the probe's 15 exact constants (the only sound lower bound of an unevaluated constant is the "
        "gradient norm at x0). All three searches compute the hidden layers' bounds only; grid and replay also "
        "reuse the Jacobian part of a radius whose derivative bounds equal an earlier radius's, and hidden-layer "
        "bounds across the targets of one input (same bytes; `search.py`, \"Reuse\").",
    ]
    if cpu_ratio < 10:
        lines[-1] += f" **The issue's 10x target is not met** ({cpu_ratio:.2f}x CPU)."
    lines += [
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
