#!/usr/bin/env python
"""Figure 2 of Zhang et al. (2019) in shape: the certified landscape radius R* (no stationary point of the
predicted logit within it) against depth, for leaky-ReLU (alpha = 0.3) networks of width 20 and 2..10 layers
trained on scikit-learn's 8x8 digits (``recurjac_scale.network.train``, 30 epochs of Adam, seed 0), l2 and l-inf,
RecurJac-B with CROWN layer bounds, over the first ``--inputs`` held-out digits.

Writes ``benchmarks/results/raw/figure2_landscape.json``, ``benchmarks/results/figure2_landscape.png`` and
``benchmarks/results/applications_figure2.md``.  Needs scikit-learn (the ``train`` extra) and matplotlib.

    python benchmarks/paper_figure2.py [--inputs 10] [--epochs 30]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from recurjac_scale.activations import get_activation  # noqa: E402
from recurjac_scale.applications import landscape_radius  # noqa: E402
from recurjac_scale.network.train import load_dataset, train_mlp  # noqa: E402

DEPTHS = tuple(range(2, 11))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--inputs", type=int, default=10)
    ap.add_argument("--epochs", type=int, default=30)
    args = ap.parse_args(argv)
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)
    data = load_dataset("digits", seed=0)
    act = get_activation("leaky_relu", alpha=0.3)
    out = {"date": datetime.now(timezone.utc).isoformat(timespec="minutes"), "depths": list(DEPTHS), "rows": []}
    for depth in DEPTHS:
        widths = (64, *([20] * (depth - 1)), 10)
        net, rep = train_mlp(widths, act, data=data, epochs=args.epochs, seed=0)
        row = {"depth": depth, "test_accuracy": rep["test_accuracy"]}
        t0 = time.perf_counter()
        for p in (2, "inf"):
            vals = [landscape_radius(net, x, None, p).r_star for x in data.x_test[: args.inputs]]
            row[f"r_star_{p}"] = vals
        row["time_s"] = time.perf_counter() - t0
        out["rows"].append(row)
        print(depth, rep["test_accuracy"], statistics.median(row["r_star_2"]), statistics.median(row["r_star_inf"]),
              flush=True)
    raw = HERE / "results" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    enc = {**out, "rows": [{k: ([x if math.isfinite(x) else "inf" for x in v] if k.startswith("r_star") else v)
                            for k, v in r.items()} for r in out["rows"]]}
    (raw / "figure2_landscape.json").write_text(json.dumps(enc, indent=1) + "\n")
    med = {p: [statistics.median(r[f"r_star_{p}"]) for r in out["rows"]] for p in (2, "inf")}
    try:
        from recurjac_scale.applications.plots import plot_r_star_vs_depth

        plot_r_star_vs_depth(list(DEPTHS), {"l2 (median)": med[2], "l-inf (median)": med["inf"]},
                             str(HERE / "results" / "figure2_landscape.png"),
                             title="R*: leaky-ReLU (0.3), width 20, digits")
    except ImportError:
        pass
    lines = [
        "### Landscape radius R* vs depth (Figure 2)",
        "",
        f"Measured {out['date']}. Leaky-ReLU (alpha 0.3) MLPs of width 20 and 2-10 layers trained on sklearn digits "
        f"({args.epochs} epochs, seed 0); R* of the predicted logit, median over the first {args.inputs} held-out "
        "digits, RecurJac-B with CROWN layer bounds (`benchmarks/paper_figure2.py`, raw values in "
        "`results/raw/figure2_landscape.json`, plot `results/figure2_landscape.png`).",
        "",
        "| layers | test accuracy | R* l2 (median) | R* l-inf (median) | time (s) |",
        "|---|---|---|---|---|",
    ]
    for r, a, b in zip(out["rows"], med[2], med["inf"]):
        lines.append(f"| {r['depth']} | {r['test_accuracy']:.3f} | {a:.4g} | {b:.4g} | {r['time_s']:.1f} |")
    dec2 = sum(b < a for a, b in zip(med[2], med[2][1:]))
    deci = sum(b < a for a, b in zip(med["inf"], med["inf"][1:]))
    lines += [
        "",
        f"Paper's claim: R* shrinks as the network gets deeper (the landscape gets more complex), for both norms. "
        f"Here the median R* decreases in {dec2} of {len(DEPTHS) - 1} depth steps for l2 and {deci} of "
        f"{len(DEPTHS) - 1} for l-inf; from 2 to 10 layers it goes from {med[2][0]:.3g} to {med[2][-1]:.3g} (l2) and "
        f"from {med['inf'][0]:.3g} to {med['inf'][-1]:.3g} (l-inf). The l2 radius is larger than the l-inf one "
        "throughout, as it must be (the l-inf ball contains the l2 ball of the same radius).",
        "",
    ]
    (HERE / "results" / "applications_figure2.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
