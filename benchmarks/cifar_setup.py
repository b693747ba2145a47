"""The CIFAR benchmark network and inputs (issue 5, "Benchmarks").

- Network: the paper's CIFAR shape 3072-2048-2048-1024-1024-512-512-256-256-128-10, ReLU, He-initialised
  (``N(0, 2 / fan_in)``) with a fixed seed, biases ``N(0, 0.01^2)``, input domain [0, 1]^3072 (HWC layout, as the
  ERAN CSV stores the pixels).  Stored in a zarr model store with :func:`recurjac_scale.network.store.save_network`.
- Inputs: real CIFAR-10 test images from ``data/eran/cifar10_test.csv`` of the shared folder (label + 3072 values
  0-255), scaled to [0, 1].  The shared folder is ``$RECURJAC_SHARED`` or a ``shared/`` folder beside a parent of
  this checkout (as in tests/conftest.py).
- Radii: :func:`eps_for_unstable_fraction` bisects the l-inf radius so that a target fraction of the FIRST layer's
  neurons is unstable (``l < 0 < u``).  The first layer's bounds over a box are exact (interval arithmetic on one
  affine map), so any layer-bound method gives the same count there.

Run ``python benchmarks/cifar_setup.py`` to build the store and print the radii.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import sys

import numpy as np

# The editable install resolves `recurjac_scale` as a namespace package when the current folder is not the
# checkout: put the checkout first so that scripts work from anywhere.
_REPO = Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

CIFAR_WIDTHS = (3072, 2048, 2048, 1024, 1024, 512, 512, 256, 256, 128, 10)
SEED = 20190127


def shared_dir() -> Path:
    """``$RECURJAC_SHARED`` or the first ``shared/`` folder beside a parent of this file."""
    env = os.environ.get("RECURJAC_SHARED")
    cands = [Path(env)] if env else []
    cands += [p / "shared" for p in Path(__file__).resolve().parents]
    for c in cands:
        if (c / "data").is_dir() or (c / "golden").is_dir():
            return c
    raise SystemExit("shared data folder not found: set RECURJAC_SHARED")


def work_dir() -> Path:
    """Where benchmark stores go: ``$RECURJAC_BENCH_DIR`` or ``<tmp>/recurjac_bench`` (never inside the repo)."""
    d = Path(os.environ.get("RECURJAC_BENCH_DIR") or Path(tempfile.gettempdir()) / "recurjac_bench")
    d.mkdir(parents=True, exist_ok=True)
    return d


def he_network(widths=CIFAR_WIDTHS, seed: int = SEED, prune_fraction: float = 0.0):
    """A ReLU MLP with He-initialised weights (and optionally magnitude-pruned to ``prune_fraction``).

    Returns
    -------
    recurjac_scale.Network
        float64 weights ``(n_{k+1}, n_k)``; input domain [0, 1]^n_0.
    """
    from recurjac_scale import InputSpec, Network
    from recurjac_scale.network.sparse import prune

    rng = np.random.default_rng(seed)
    weights, biases = [], []
    for n_in, n_out in zip(widths[:-1], widths[1:]):
        w = rng.standard_normal((n_out, n_in)) * np.sqrt(2.0 / n_in)
        if prune_fraction:
            # rescale so the pruned layer keeps the pre-activation variance (as fine-tuning would roughly do)
            w = prune(w, prune_fraction) / np.sqrt(1.0 - prune_fraction)
        weights.append(w)
        biases.append(rng.standard_normal(n_out) * 0.01)
    n0 = widths[0]
    shape = (32, 32, 3) if n0 == 3072 else (n0,)
    spec = InputSpec(shape=shape, layout="HWC" if n0 == 3072 else "flat", domain_lower=0.0, domain_upper=1.0)
    return Network(weights, biases, ["relu"] * (len(widths) - 2), input_spec=spec,
                   provenance={"source": "benchmarks/cifar_setup.py", "init": "He normal", "seed": seed,
                               "prune_fraction": prune_fraction})


def cifar_store(name: str = "cifar_he.zarr", prune_fraction: float = 0.0, overwrite: bool = False) -> Path:
    """Build (once) and return the zarr store of the benchmark network."""
    from recurjac_scale.network.store import save_network

    path = work_dir() / name
    if path.exists() and not overwrite:
        return path
    save_network(he_network(prune_fraction=prune_fraction), path, overwrite=True)
    return path


def cifar_images(n: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """The first ``n`` CIFAR-10 test images, scaled to [0, 1].

    Returns
    -------
    x : ndarray, shape (n, 3072), float64
    labels : ndarray, shape (n,), int
    """
    path = shared_dir() / "data" / "eran" / "cifar10_test.csv"
    rows = np.loadtxt(path, delimiter=",", max_rows=n, dtype=np.float64, ndmin=2)
    return rows[:, 1:] / 255.0, rows[:, 0].astype(int)


def first_layer_unstable_fraction(net, x0: np.ndarray, eps: float) -> float:
    """Fraction of first-layer neurons with ``l < 0 < u`` over the l-inf ball of radius ``eps`` clipped to the
    domain (exact interval bounds of one affine layer)."""
    w = np.asarray(net.weights[0])
    b = np.asarray(net.biases[0])
    lo = np.clip(x0 - eps, net.input_spec.domain_lower, net.input_spec.domain_upper)
    hi = np.clip(x0 + eps, net.input_spec.domain_lower, net.input_spec.domain_upper)
    c, r = 0.5 * (lo + hi), 0.5 * (hi - lo)
    z = w @ c + b
    rad = np.abs(w) @ r
    return float(np.mean((z - rad < 0) & (z + rad > 0)))


def eps_for_unstable_fraction(net, x0: np.ndarray, target: float, iters: int = 60) -> float:
    """The radius at which the first layer's unstable fraction reaches ``target`` (bisection on a log scale; the
    fraction is non-decreasing in eps).  For ``target = 1`` the smallest radius with every neuron unstable."""
    lo, hi = 1e-9, 1.0
    if first_layer_unstable_fraction(net, x0, hi) < target:
        return hi
    for _ in range(iters):
        mid = float(np.sqrt(lo * hi))
        if first_layer_unstable_fraction(net, x0, mid) >= target:
            hi = mid
        else:
            lo = mid
    return hi


def radii(net, x0: np.ndarray, targets=(0.05, 0.30, 1.0)) -> list[dict]:
    """For each target fraction: the radius and the fraction actually reached (checked with the library's IBP)."""
    from recurjac_scale import layer_bounds

    out = []
    for t in targets:
        eps = eps_for_unstable_fraction(net, x0, t)
        lb = layer_bounds(net, x0, eps, "inf", method="ibp")
        out.append({"target": t, "eps": eps, "unstable_first_layer": lb.unstable[0] / net.widths[1],
                    "unstable_per_layer": list(lb.unstable)})
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--image", type=int, default=0, help="index of the CIFAR-10 test image")
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    path = cifar_store(overwrite=args.overwrite)
    x, y = cifar_images(args.image + 1)
    from recurjac_scale.network.store import open_network

    net = open_network(path).materialize()
    print(json.dumps({"store": str(path), "label": int(y[args.image]),
                      "radii": radii(net, x[args.image])}, indent=1))


if __name__ == "__main__":
    main()
