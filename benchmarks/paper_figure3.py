#!/usr/bin/env python
"""Figure 3 of Zhang et al. (2019) in shape: certified local Lipschitz constants (l-inf, the predicted logit)
against the radius eps for Fast-Lip, RecurJac-B, RecurJac-F0, RecurJac-F1, with the global constant and the naive
product of norms, on ReLU, leaky-ReLU (alpha 0.3) and tanh networks (64-50-50-50-10, trained on sklearn digits,
30 epochs, seed 0), one held-out digit.

Writes ``benchmarks/results/raw/figure3_lipschitz.json``, ``benchmarks/results/figure3_<activation>.png`` and
``benchmarks/results/applications_figure3.md``.

    python benchmarks/paper_figure3.py [--points 12]
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from recurjac_scale.activations import get_activation  # noqa: E402
from recurjac_scale.applications import lipschitz_sweep, log_eps_grid  # noqa: E402
from recurjac_scale.network.train import load_dataset, train_mlp  # noqa: E402

METHODS = ("fastlip", "recurjac-b", "recurjac-f0", "recurjac-f1")
NETS = {"relu": ("relu", {}), "leaky_relu": ("leaky_relu", {"alpha": 0.3}), "tanh": ("tanh", {})}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--points", type=int, default=12)
    args = ap.parse_args(argv)
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)
    data = load_dataset("digits", seed=0)
    eps = log_eps_grid(1e-4, 1.0, args.points)
    out = {"date": datetime.now(timezone.utc).isoformat(timespec="minutes"), "eps": eps, "nets": {}}
    x = data.x_test[0]
    for name, (act, params) in NETS.items():
        net, rep = train_mlp((64, 50, 50, 50, 10), get_activation(act, **params), data=data, epochs=30, seed=0)
        K = int(np.argmax(net.forward(x)))
        s = lipschitz_sweep(net, x, eps, METHODS, "inf", outputs=K)
        out["nets"][name] = {"test_accuracy": rep["test_accuracy"], "output": K, **s.to_dict()}
        try:
            from recurjac_scale.applications.plots import plot_lipschitz

            plot_lipschitz(eps, s.values, s.naive, str(HERE / "results" / f"figure3_{name}.png"),
                           title=f"{name} 64-50-50-50-10, logit {K}, l-inf")
        except ImportError:
            pass
        print(name, {m: (v[0], v[-1]) for m, v in s.values.items()}, s.naive, flush=True)
    raw = HERE / "results" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    (raw / "figure3_lipschitz.json").write_text(json.dumps(out, indent=1) + "\n")
    lines = [
        "### Local Lipschitz constant vs eps (Figure 3)",
        "",
        f"Measured {out['date']}. 64-50-50-50-10 networks trained on sklearn digits (30 epochs, seed 0), one held-out "
        f"digit, its predicted logit, l-inf balls, {args.points} radii from 1e-4 to 1, CROWN layer bounds "
        "(`benchmarks/paper_figure3.py`; raw `results/raw/figure3_lipschitz.json`; plots `results/figure3_*.png`).",
        "",
        "| network | eps | Fast-Lip | RecurJac-B | RecurJac-F0 | RecurJac-F1 | naive |",
        "|---|---|---|---|---|---|---|",
    ]
    claims = []
    for name, d in out["nets"].items():
        L = d["lipschitz"]
        for i in (0, len(eps) // 2, len(eps) - 1):
            lines.append(f"| {name} | {eps[i]:.3g} | " + " | ".join(f"{float(L[m][i]):.4g}" for m in METHODS)
                         + f" | {float(d['naive']):.4g} |")
        best_rj = [min(float(L[m][i]) for m in METHODS[1:]) for i in range(len(eps))]
        le = sum(b <= float(L["fastlip"][i]) * (1 + 1e-12) for i, b in enumerate(best_rj))
        ratio = [float(L["fastlip"][i]) / max(b, 1e-300) for i, b in enumerate(best_rj)]
        below_naive = all(float(v) <= float(d["naive"]) for m in METHODS for v in L[m])
        claims.append(f"{name}: the best RecurJac constant <= Fast-Lip at {le} / {len(eps)} radii (Fast-Lip / "
                      f"RecurJac up to {max(ratio):.2f}x); every constant below the naive one: {below_naive}; at the "
                      f"largest radius RecurJac-B is {float(L['recurjac-b'][-1]) / float(d['naive']):.3g} of the naive "
                      "constant.")
    lines += ["", "Paper's claims: RecurJac gives smaller (better) constants than Fast-Lip, most at small radii; at "
              "large radii the local constant levels off at a worst-case value still far below the naive product "
              "of norms. Here:", ""] + [f"- {c}" for c in claims] + [""]
    (HERE / "results" / "applications_figure3.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
