#!/usr/bin/env python
"""Compare two checkouts of the package bit for bit and in time (used for the interface refactor, issue 13).

    # 1. save the bounds of every method with each checkout's code (PYTHONPATH selects the checkout)
    PYTHONPATH=OLD python benchmarks/bench_refactor.py save old.npz --cluster --cifar
    PYTHONPATH=NEW python benchmarks/bench_refactor.py save new.npz --cluster --cifar
    python benchmarks/bench_refactor.py compare old.npz new.npz
    # 2. time the CIFAR benchmark, old and new alternated, each run in its own process (one warm-up call first)
    python benchmarks/bench_refactor.py time OLD NEW --runs 3

``save`` runs fastlip, recurjac-b, recurjac-f0 and recurjac-f1 on five small random networks (ReLU, tanh, leaky ReLU
70 % pruned and stored as CSR, sigmoid; p = inf, 2, 1), dense and sparse kernels, in memory and through the engine
(threads; from the network and from a zarr model store; with ``--cluster`` also on a 2-worker LocalCluster on
127.0.0.1, held and streamed weights), and with ``--cifar`` a reduced CIFAR shape 3072-512-512-256-128-10.
``time`` runs the CIFAR network of ``cifar_setup.py`` (3072-2048-...-10, CIFAR-10 test image 0, l-inf radius with
5 % of layer 1 unstable, the predicted logit): RecurJac-B and Fast-Lip in memory, RecurJac-B through the engine
(synchronous scheduler), one BLAS thread; it prints wall and CPU seconds and the medians.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

METHODS = ("fastlip", "recurjac-b", "recurjac-f0", "recurjac-f1")
CASES = (  # widths, activation, eps, p, pruned fraction
    ((6, 8, 7, 5, 3), "relu", 0.05, math.inf, 0.0),
    ((10, 12, 9, 4), "tanh", 0.1, 2, 0.0),
    ((8, 16, 16, 16, 5), "relu", 0.02, 1, 0.0),
    ((12, 20, 18, 6), "leaky_relu", 0.1, math.inf, 0.7),
    ((7, 9, 6), "sigmoid", 0.3, math.inf, 0.0),
)


def _network(widths, act, seed, prune=0.0):
    from recurjac_scale.network import Network

    rng = np.random.default_rng(seed)
    ws = [rng.normal(0, np.sqrt(2 / widths[k]), (widths[k + 1], widths[k])) for k in range(len(widths) - 1)]
    if prune:
        ws = [w * (rng.random(w.shape) >= prune) for w in ws]
    bs = [rng.normal(0, 0.1, widths[k + 1]) for k in range(len(widths) - 1)]
    return Network(ws, bs, [act] * (len(ws) - 1))


def save(out: str, cluster: bool, cifar: bool) -> None:
    from threadpoolctl import threadpool_limits

    import recurjac_scale as rs
    from recurjac_scale import jacobian_bounds, plan_jacobian
    from recurjac_scale.network.store import save_network

    print("package:", rs.__file__, file=sys.stderr)
    tmp = tempfile.mkdtemp()
    cases = [(f"c{i}", _network(w, a, 100 + i, pr), e, p, pr) for i, (w, a, e, p, pr) in enumerate(CASES)]
    if cifar:
        cases.append(("cifar", _network((3072, 512, 512, 256, 128, 10), "relu", 7), 1e-3, math.inf, 0.0))
    res = {}
    with threadpool_limits(1):
        for name, net, eps, p, prune in cases:
            x0 = np.random.default_rng(5).random(net.n_inputs)
            path = os.path.join(tmp, name + ".zarr")
            save_network(net, path, sparse_threshold=(0.5 if prune else None), chunk_edge=4 if name != "cifar" else None)
            for m in METHODS:
                if name == "cifar" and m == "recurjac-f0":
                    continue
                for sp in ([None, 0.5] if name != "cifar" else [None]):
                    jb = jacobian_bounds(net, x0, eps, p, method=m, sparse_threshold=sp)
                    res[f"{name}/{m}/sp{sp}/mem/lower"], res[f"{name}/{m}/sp{sp}/mem/upper"] = jb.lower, jb.upper
                if name == "cifar" and m != "recurjac-b":
                    continue
                for sp in (["auto", 0.5] if name != "cifar" else ["auto"]):
                    for src in ("net", "store"):
                        rb, cb = (3, 5) if name != "cifar" else (4, 256)
                        r = plan_jacobian(net if src == "net" else path, x0, eps, p, method=m, sparse_threshold=sp,
                                          row_block=rb, col_block=cb).compute(scheduler="threads")
                        key = f"{name}/{m}/sp{sp}/{src}/threads"
                        res[key + "/lower"], res[key + "/upper"] = r.lower, r.upper
                print(name, m, file=sys.stderr, flush=True)
        if cluster:
            from dask.distributed import Client, LocalCluster

            with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                              dashboard_address=None) as lc, Client(lc) as client:
                for name, net, eps, p, prune in cases:
                    if name == "cifar":
                        continue
                    x0 = np.random.default_rng(5).random(net.n_inputs)
                    path = os.path.join(tmp, name + ".zarr")
                    for m in METHODS:
                        for stream in (False, True):
                            try:
                                pl = plan_jacobian(path, x0, eps, p, method=m, row_block=3, col_block=5,
                                                   stream_weights=stream)
                            except rs.RecurJacError:  # streaming needs a chain with at least one step
                                continue
                            r = pl.compute(client=client)
                            key = f"{name}/{m}/cluster/stream{stream}"
                            res[key + "/lower"], res[key + "/upper"] = r.lower, r.upper
    np.savez(out, **res)
    print(f"saved {len(res)} arrays to {out}", file=sys.stderr)


def compare(a_path: str, b_path: str) -> int:
    a, b = np.load(a_path), np.load(b_path)
    ka, kb = set(a.files), set(b.files)
    same = [k for k in sorted(ka & kb) if a[k].shape == b[k].shape and np.array_equal(a[k].view(np.uint64),
                                                                                       b[k].view(np.uint64))]
    print(f"{len(ka)} / {len(kb)} arrays; {len(same)} bitwise identical; only in the first: {sorted(ka - kb)}; "
          f"only in the second: {sorted(kb - ka)}; different: {sorted((ka & kb) - set(same))}")
    return 0 if len(same) == len(ka) == len(kb) else 1


def _time_one() -> None:
    """One timing process (the checkout on PYTHONPATH): prints a JSON line."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from threadpoolctl import threadpool_limits

    import cifar_setup as cs
    from recurjac_scale import jacobian_bounds, plan_jacobian
    from recurjac_scale.network.store import open_network

    path = cs.cifar_store()
    net = open_network(path).materialize()
    x0 = cs.cifar_images(1)[0][0]
    pred = int(np.argmax(net.forward(x0)))
    eps = cs.eps_for_unstable_fraction(net, x0, 0.05)
    out = {"eps": eps}
    with threadpool_limits(1):
        cases = {
            "recurjac-b": lambda: jacobian_bounds(net, x0, eps, math.inf, method="recurjac-b", outputs=pred),
            "fastlip": lambda: jacobian_bounds(net, x0, eps, math.inf, method="fastlip", outputs=pred),
            "engine-b": lambda: plan_jacobian(str(path), x0, eps, math.inf, method="recurjac-b",
                                              outputs=pred).compute(scheduler="synchronous"),
        }
        for name, f in cases.items():
            f()  # warm-up: numba compilation and caches
            w0, c0 = time.perf_counter(), time.process_time()
            r = f()
            out[name] = [time.perf_counter() - w0, time.process_time() - c0]
            out[name + "/width_sum"] = float(np.sum(r.upper - r.lower))
    print(json.dumps(out))


def time_checkouts(old: str, new: str, runs: int) -> None:
    res: dict = {"old": [], "new": []}
    for i in range(runs):
        order = (("old", old), ("new", new)) if i % 2 == 0 else (("new", new), ("old", old))
        for tag, repo in order:
            env = dict(os.environ, PYTHONPATH=os.path.abspath(repo))
            p = subprocess.run([sys.executable, os.path.abspath(__file__), "_time_one"], capture_output=True,
                               text=True, env=env, check=True)
            d = json.loads(p.stdout.strip().splitlines()[-1])
            res[tag].append(d)
            print(tag, json.dumps(d), flush=True)
    for case in ("recurjac-b", "fastlip", "engine-b"):
        for j, what in ((0, "wall"), (1, "cpu")):
            o = statistics.median(d[case][j] for d in res["old"])
            n = statistics.median(d[case][j] for d in res["new"])
            print(f"{case:11s} {what:4s}: old {o:.2f} s, new {n:.2f} s, new / old {n / o:.3f}")
        sums = {d[case + "/width_sum"] for d in res["old"] + res["new"]}
        print(f"{case:11s} same bounds in every run: {len(sums) == 1}")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print(__doc__)
        return 2
    if argv[0] == "save":
        save(argv[1], "--cluster" in argv, "--cifar" in argv)
    elif argv[0] == "compare":
        return compare(argv[1], argv[2])
    elif argv[0] == "time":
        runs = int(argv[argv.index("--runs") + 1]) if "--runs" in argv else 3
        time_checkouts(argv[1], argv[2], runs)
    elif argv[0] == "_time_one":
        _time_one()
    else:
        print(__doc__)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
