#!/usr/bin/env python
"""The default certify search against ``search="paper"`` on the full Table 1 set, radii only.

Every correctly classified image of the first ``--images`` rows of ERAN's MNIST test CSV (99 of the 100) x the
runner-up / random / least-likely targets, auto_LiRPA MNIST MLP, RecurJac-B, CROWN layer bounds, l-inf: the
certified radius of each search in ``--searches`` (default ``grid,paper``).  The default search (``grid``) is at
or above the paper's radius on these inputs by measurement, not by construction (``search="replay"`` is the one
with the guarantee); this script is that measurement.  One record per (image, target, search) is appended to
``benchmarks/results/raw/certify_search_full.jsonl`` as it is computed; a rerun skips the records already there
(so an interrupted run resumes).  Times are per item and informative only (the speed comparison is
``bench_certify_search.py``, which interleaves the searches).

    python benchmarks/check_certify_search_full.py --shared ../shared [--images 100] [--searches grid,paper]
    python benchmarks/check_certify_search_full.py --report
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from bench_certify import TARGETS, load_mnist  # noqa: E402
from recurjac_scale.applications import certify  # noqa: E402

RAW = HERE / "results" / "raw" / "certify_search_full.jsonl"


def _records() -> list[dict]:
    if not RAW.exists():
        return []
    return [json.loads(line) for line in RAW.read_text().splitlines() if line.strip()]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", type=Path, default=None, help="folder with nets/ and data/eran/ (required unless --report)")
    ap.add_argument("--images", type=int, default=100, help="rows of the CSV to use (default 100)")
    ap.add_argument("--searches", default="grid,paper", help="comma-separated searches (default grid,paper)")
    ap.add_argument("--report", action="store_true", help="summarise the saved records only")
    args = ap.parse_args(argv)
    if not args.report:
        if args.shared is None:
            ap.error("--shared is required")
        from threadpoolctl import threadpool_limits

        threadpool_limits(1)
        net = load_mnist(args.shared)
        rows = np.loadtxt(args.shared / "data" / "eran" / "mnist_test.csv", delimiter=",", max_rows=args.images,
                          ndmin=2)
        X, y = rows[:, 1:] / 255.0, rows[:, 0].astype(int)
        correct = np.flatnonzero(net.forward(X).argmax(axis=1) == y)
        done = {(r["index"], r["target"], r["search"]) for r in _records()}
        RAW.parent.mkdir(parents=True, exist_ok=True)
        with RAW.open("a") as out:
            for i in correct:
                for t in TARGETS:
                    for s in args.searches.split(","):
                        if (int(i), t, s) in done:
                            continue
                        c0 = time.process_time()
                        r = certify(net, X[i], int(y[i]), t, "inf", method="recurjac-b", layer_bounds="crown",
                                    search=s, margin_bound=False, seed=0, index=int(i))
                        out.write(json.dumps({"index": int(i), "target": t, "search": s, "radius": r.radius,
                                              "evaluations": r.evaluations,
                                              "cpu_s": round(time.process_time() - c0, 4)}) + "\n")
                        out.flush()
    print(report(_records()))
    return 0


def report(records: list[dict]) -> str:
    by: dict = {}
    for r in records:
        by.setdefault(r["search"], {})[(r["index"], r["target"])] = r
    paper = by.get("paper", {})
    lines = []
    for s, recs in by.items():
        if s == "paper":
            continue
        keys = sorted(k for k in recs if k in paper and paper[k]["radius"] > 0)
        if not keys:
            continue
        rel = np.array([recs[k]["radius"] / paper[k]["radius"] for k in keys])
        below = [k for k, v in zip(keys, rel) if v < 1.0]
        ev = np.mean([recs[k]["evaluations"] for k in keys])
        lines.append(f"{s}: {len(keys)} items with a paper radius, radius >= paper on {len(keys) - len(below)}, "
                     f"radius / paper min {rel.min():.4f} mean {rel.mean():.4f}, evaluations mean {ev:.1f}"
                     + (f"; below on {below}" if below else ""))
    return "\n".join(lines) if lines else "no pairs of records yet"


if __name__ == "__main__":
    sys.exit(main())
