#!/usr/bin/env python
"""One core against two LocalCluster workers on a certify batch (issue 14's "2 workers at least 1.7x faster").

The batch: the auto_LiRPA MNIST MLP (784-128-64-10), the first ``--images`` correctly classified images of ERAN's
MNIST test set, targets runner-up / random / least-likely, RecurJac-B, CROWN layer bounds, default search.  Each
measurement runs in its own process after an untimed warm-up (numba cache load, model load), modes alternated:

- ``sync``: the synchronous scheduler in one process (one core; BLAS on one thread, as the batch sets it);
- ``product``: a 2-worker LocalCluster with the environment and configuration a batch command gives the cluster it
  starts itself (``BATCH_WORKER_ENV``, ``BATCH_WORKER_CONFIG``), warmed by two items;
- ``default``: the same cluster with dask's own worker settings.

    python benchmarks/bench_certify_workers.py --shared ../shared [--images 10] [--runs 2] [--modes sync,product]

Prints one JSON line per run and the medians; wall time, and CPU time of the process or of the workers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def _measure(shared: Path, mode: str, n_img: int) -> dict:
    import dask
    import psutil

    from bench_certify import TARGETS, load_mnist
    from recurjac_scale.applications.batch import BATCH_WORKER_CONFIG, BATCH_WORKER_ENV, BatchJob, run_batch
    from recurjac_scale.cluster import local_client
    from recurjac_scale.network.store import save_network

    net = load_mnist(shared)
    rows = np.loadtxt(shared / "data" / "eran" / "mnist_test.csv", delimiter=",", max_rows=2 * n_img + 5, ndmin=2)
    X, y = rows[:, 1:] / 255.0, rows[:, 0].astype(int)
    correct = np.flatnonzero(net.forward(X).argmax(1) == y)[:n_img]
    model = str(save_network(net, Path(tempfile.mkdtemp(prefix="rj_bench_")) / "m.zarr"))
    opts = dict(p=float("inf"), layer_bounds="crown", search="grid", seed=0, method="recurjac-b", margin_bound=True)

    def job(idx):
        return BatchJob("certify", model, X[idx], y[idx], tuple(int(i) for i in idx), TARGETS, dict(opts))

    if mode == "sync":
        run_batch(job(correct[:1]), None, scheduler="synchronous")
        t0, c0 = time.perf_counter(), time.process_time()
        res = run_batch(job(correct), None, scheduler="synchronous")
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    else:
        product = mode == "product"
        cfg = dask.config.set(BATCH_WORKER_CONFIG) if product else contextlib.nullcontext()
        with cfg, local_client(2, memory_limit="4GiB", env=BATCH_WORKER_ENV if product else None) as client:
            run_batch(job(correct[-2:]), None, client=client)
            before = client.run(lambda: sum(psutil.Process().cpu_times()[:2]))
            t0 = time.perf_counter()
            res = run_batch(job(correct), None, client=client)
            wall = time.perf_counter() - t0
            after = client.run(lambda: sum(psutil.Process().cpu_times()[:2]))
        cpu = sum(after[k] - before.get(k, 0.0) for k in after)
    return {"mode": mode, "items": len(res.records), "wall_s": wall, "cpu_s": cpu,
            "radii": [r["radius"] for r in res.records]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", type=Path, required=True)
    ap.add_argument("--images", type=int, default=10)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--modes", default="sync,product,default", help="comma-separated subset of sync,product,default")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(_measure(args.shared, args.one, args.images)))
        return 0
    out = {}
    for _ in range(args.runs):
        for mode in args.modes.split(","):
            r = subprocess.run([sys.executable, __file__, "--shared", str(args.shared), "--images", str(args.images),
                                "--one", mode], capture_output=True, text=True, check=True)
            rec = json.loads(r.stdout.strip().splitlines()[-1])
            print(json.dumps({k: v for k, v in rec.items() if k != "radii"}), flush=True)
            out.setdefault(mode, []).append(rec)
    radii = {m: v[0]["radii"] for m, v in out.items()}
    med = {m: statistics.median(r["wall_s"] for r in v) for m, v in out.items()}
    cpu = {m: statistics.median(r["cpu_s"] for r in v) for m, v in out.items()}
    print(json.dumps({"median_wall_s": med, "median_cpu_s": cpu,
                      **{f"speedup_{m}": med["sync"] / med[m] for m in med if m != "sync" and "sync" in med},
                      "same_radii": all(r == radii[next(iter(radii))] for r in radii.values())}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
