"""Plots of batch results (matplotlib, an optional extra imported lazily): radii histograms per method,
Lipschitz constants against eps (Figure 3 style), ``R*`` against depth or per input (Figure 2 style)."""

from __future__ import annotations

import math

__all__ = ["plot_radii", "plot_lipschitz", "plot_r_star", "plot_r_star_vs_depth"]


def _plt():
    from ..errors import require

    mpl = require("matplotlib", "plot")
    mpl.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _num(v):
    return math.inf if v == "inf" else float(v)


def plot_radii(records, path: str) -> None:
    """Histogram of certified radii (and margin-bound radii) per (method, target kind)."""
    plt = _plt()
    groups: dict = {}
    for r in records:
        if r.get("failed") or r.get("misclassified"):
            continue
        groups.setdefault(f"{r['method']} ({r.get('target_kind')})", []).append(r["radius"])
        if r.get("margin_bound_radius") is not None:
            groups.setdefault(f"{r['layer_bounds']} margin ({r.get('target_kind')})", []).append(r["margin_bound_radius"])
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, vals in groups.items():
        ax.hist(vals, bins=20, alpha=0.5, label=name)
    ax.set_xlabel("certified radius")
    ax.set_ylabel("count")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_lipschitz(eps, series: dict, naive: float | None, path: str, title: str = "") -> None:
    """Local Lipschitz constant against eps on log axes, one line per method, the naive constant dotted."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 4))
    for name, vals in series.items():
        ax.loglog(eps, [_num(v) for v in vals], marker="o", ms=3, label=name)
    if naive is not None and math.isfinite(_num(naive)):
        ax.axhline(_num(naive), ls=":", color="k", label="naive")
    ax.set_xlabel("eps")
    ax.set_ylabel("local Lipschitz constant")
    if title:
        ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_r_star(records, path: str) -> None:
    """``R*`` per input (finite values; inf drawn at the top edge)."""
    plt = _plt()
    vals = [(r["index"], _num(r["r_star"])) for r in records if not r.get("failed")]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    fin = [v for _, v in vals if math.isfinite(v)]
    top = max(fin) * 1.2 if fin else 1.0
    ax.bar([str(i) for i, _ in vals], [v if math.isfinite(v) else top for _, v in vals])
    ax.set_xlabel("input index")
    ax.set_ylabel("R*")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_r_star_vs_depth(depths, series: dict, path: str, title: str = "") -> None:
    """``R*`` against depth, one line per norm / method (log y axis)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 4))
    for name, vals in series.items():
        ax.semilogy(depths, vals, marker="o", label=name)
    ax.set_xlabel("number of layers")
    ax.set_ylabel("R*")
    if title:
        ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
