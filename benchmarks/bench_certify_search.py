#!/usr/bin/env python
"""The default certify search against ``search="paper"`` (the authors' n = 15 x 15-step search).

On the first ``--images`` correctly classified images of ERAN's MNIST test CSV x the runner-up / random /
least-likely targets (the 30 items of the Table 1 speed comparison), the auto_LiRPA MNIST MLP, RecurJac-B with
CROWN layer bounds, l-inf: certified radius, local-constant evaluations, CPU and wall time per item of

- ``default``: ``search="grid"`` (the grid, then the replay of the authors' driver; never below ``paper``),
- ``grid phase``: the grid phase alone (the default before the replay was added), for reference,
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
from recurjac_scale.applications import SEARCHES, certify  # noqa: E402

MODES = {"default": "grid", "grid phase": "grid-phase", "paper": "paper"}


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
    # the grid phase alone, for reference (not a public search)
    SEARCHES["grid-phase"] = importlib.import_module("recurjac_scale.applications.search")._grid_search
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
    d = m["default"]
    ratio_ev = statistics.fmean(pap["evaluations"]) / statistics.fmean(d["evaluations"])
    cpu_ratio = _total(pap, "cpu_s") / _total(d, "cpu_s")
    lines += [
        "",
        f"The default evaluates the local constant {ratio_ev:.1f}x less often than `--search paper` and certifies a "
        "radius at least as large on every item, by construction (the argument is in the docstring of "
        "`recurjac_scale/applications/search.py`): after the grid it replays the authors' bracket-and-bisect "
        "driver, deciding a probe by its own stand-in certificate when that certifies the probe, by a lower-bound "
        "proof that the authors' sum fails, or else by their exact decision, and it stops at the first probe where "
        "it provably succeeds and theirs fails. The grid phase alone (the previous default) is faster but falls "
        "below the paper's radius on some items. "
        f"In CPU time the default is {cpu_ratio:.2f}x faster, more than the evaluation ratio, because its "
        "evaluations reuse work where the constant provably stays the same bytes (`search.py`, \"Reuse\"; tests "
        "compare the bytes with the plain computation): the Jacobian and Algorithm 2 part of an earlier radius "
        "whose derivative bounds are identical (nearby points of nearby probes share them; about 40 % of the "
        "evaluations), and the hidden-layer bounds of a radius already evaluated for another target of the same "
        "input (a few percent of the evaluations here). Every search, `--search paper` included, computes the "
        "hidden layers' bounds only (the output layer's are not used). Most of the replay's evaluations are the proofs of the authors' failure at probes "
        "within a few percent of their threshold, which need most of the probe's 15 points, and the proof at the "
        "probe where the two differ (about 12 evaluations each); each needs the authors' exact constant (its "
        "layer bounds at least), since the only sound lower bound of an unevaluated constant is the gradient "
        "norm at x0.",
    ]
    if cpu_ratio < 10:
        lines[-1] += (f" **The issue's 10x target is not met** ({cpu_ratio:.2f}x CPU): the grid phase alone would "
                      "be faster, but without the guarantee.")
    lines += [
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
