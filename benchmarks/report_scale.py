"""Write benchmarks/results/scale.md from the JSON files of bench_scale.py (no measurement here)."""

from __future__ import annotations

from pathlib import Path

PAPER = {"fastlip": "2.4 s (Fast-Lin)", "recurjac-b": "10.5 s", "recurjac-f0": "1 h", "recurjac-f1": "5 h"}
REFERENCE_HERE = {"fastlip": "2.4 s", "recurjac-b": "9.6 s", "recurjac-f0": "≈ 3 h (eps 1e-5), 1.5 h (eps 1e-3)",
                  "recurjac-f1": "≈ 27 min (eps 1e-5), 10.5 min (eps 1e-3)"}
NAMES = {"fastlip": "Fast-Lip", "recurjac-b": "RecurJac-B", "recurjac-f0": "RecurJac-F0", "recurjac-f1": "RecurJac-F1"}


def _s(s) -> str:
    if s is None:
        return "–"
    s = float(s)
    if s < 60:
        return f"{s:.2f} s"
    if s < 3600:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.2f} h"


def _g(x, nd=2) -> str:
    return "–" if x is None else f"{x:.{nd}f}"


def _load(d: dict) -> str:
    return ", ".join(f"{v:.2f}" for v in d)


def _summary(res: dict) -> list[str]:
    """Headline figures, each taken from a result file (nothing typed in by hand)."""
    out = ["### Summary", ""]
    for k in sorted(res):
        v = res[k]
        if k.startswith("full-") and v["method"] in ("recurjac-f0", "recurjac-f1"):
            r = v["runs"][0]
            sched = "1 core" if v["scheduler"] == "synchronous" else f"{v['scheduler']} ×{v['threads']} (both cores)"
            twin = " on the 90%-pruned twin (dense path)" if v.get("network") == "pruned90" else ""
            out.append(f"- **{NAMES[v['method']]}{twin}, complete run, radius {v['radius_target']:.0%}: {_s(r['total_seconds'])}** "
                       f"({sched}; layer bounds {_s(r['layer_bounds_seconds'])} + blocks {_s(r['run_seconds'])}; "
                       f"load average {_load(v['loadavg_before'][:1])} → {_load(v['loadavg_after'][:1])}). Reference "
                       f"implementation here: {REFERENCE_HERE[v['method']]}; paper: {PAPER[v['method']]} (1 core).")
    for k in sorted(res):
        v = res[k]
        if k.startswith("sample-") and v["radius_target"] == 0.05:
            twin = " (90%-pruned twin)" if v.get("network") == "pruned90" else ""
            out.append(f"- {NAMES[v['method']]}{twin}, radius 5%, from a {v['fraction']:.1%} sample of its rows: "
                       f"{_s(v['extrapolated_one_core_seconds'])} on one core (extrapolated).")
    for k, v in res.items():
        if k.startswith("workers-") and v.get("speedup"):
            out.append(f"- 1 → 2 LocalCluster workers on {_workers_job(v)}: {v['speedup']:.2f}× (target 1.6×; the "
                       "client and scheduler share the 2 cores with the workers).")
    for k, v in _ooc_results(res):
        out.append(f"- Out-of-core ({'-'.join(map(str, v['widths']))}, weights {v['weights_bytes'] / 2**30:.2f} GiB, "
                   f"2 workers limited to {v['worker_memory']} each): {v['status'][:160]}"
                   + (f" in {_s(v['seconds'])}" if v.get("seconds") and v["status"] == "completed" else "") + ".")
    if "sparse" in res:
        rows = [r for r in res["sparse"]["rows"] if abs(r["pruned"] - 0.9) < 1e-9]
        if rows:
            lo = min(r["speedup_csr_vs_dense"] for r in rows)
            hi = max(r["speedup_csr_vs_dense"] for r in rows)
            out.append(f"- 90%-pruned layers: one recursion-step GEMM with scipy CSR is {lo:.2f}–{hi:.2f}× the speed of "
                       "dense BLAS on the same matrix (GEMM level only; whole runs through the sparse kernels: "
                       "`results/sparse_kernels.md`).")
    out.append("")
    return out


def _ooc_results(res: dict) -> list:
    """The out-of-core results (``ooc*.json``), oldest first."""
    items = [(k, v) for k, v in res.items() if k.startswith("ooc") and v.get("kind") == "ooc"]
    return sorted(items, key=lambda kv: kv[1].get("machine", {}).get("date_utc", ""))


def _workers_job(v: dict) -> str:
    """What a workers run measured: the whole job (every run complete) or the first blocks of its graph."""
    whole = all(r.get("complete") for rs in v["runs"].values() for r in rs)
    what = "the whole F0 job" if whole else f"the first {v['blocks']} blocks of the F0 graph"
    alloc = "dask's allocator settings" if v.get("malloc_env", True) is None else "`MALLOC_ENV`"
    return f"{what}, blocks {v['row_block']} × {v['col_block']}, workers with {alloc}"


def ooc_lines(res: dict, heading: str = "##") -> list[str]:
    """The out-of-core section, every figure from the ``ooc*.json`` files of ``bench_scale.py ooc``."""
    items = _ooc_results(res)
    if not items:
        return []
    L = [f"{heading} Out-of-core: RecurJac-B with workers limited below the network's size", ""]
    L.append("What runs: `python benchmarks/bench_scale.py ooc --width W --worker-memory M`: a ReLU network "
             "W-W-W-W-10 with He-normal weights (seed 3) in a zarr model store, RecurJac-B for one output row "
             "(logit 0), l-inf radius 1e-3 around a seeded uniform input, on a LocalCluster of 2 worker processes "
             "x 1 thread (127.0.0.1) each limited to M. The plan is made with the client: budget = M x the nanny's "
             "terminate fraction (a worker above it is restarted), worker baseline = the larger of the documented "
             "constant and the warmed workers' RSS. Weights are streamed from the store by every task (each level "
             "reads its compacted live block tile by tile). The layer bounds are computed in the client, with the "
             "whole network in the client's memory (the client is not a worker). Peak worker RSS: every worker "
             "process sampled by psutil from the client; 'restarted' compares worker pids before and after.")
    L.append("")
    L.append("| date (UTC) | network | weights | worker limit | plan budget | plan estimate per worker (baseline) | "
             "blocks | tasks | status | run time | planning (client) | peak worker RSS | restarted | "
             "load (before → after) | Lipschitz bound |")
    L.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for _k, v in items:
        m = v.get("machine", {})
        pd = v.get("plan_dict") or {}
        w = v.get("workers") or {}
        mib = 2**20
        est = (f"{pd['peak_worker_bytes'] / mib:.0f} MiB ({pd.get('worker_baseline_bytes', 0) / mib:.0f} MiB, "
               f"{pd.get('baseline_source', '?')})" if pd else "–")
        budget = f"{pd['memory_budget'] / mib:.0f} MiB" if pd.get("memory_budget") else "–"
        blocks = f"{pd['row_block']} × {pd['col_block']}" if pd else "–"
        load = (f"{_load(v['loadavg_before'][:1])} → {_load(v['loadavg_after'][:1])}"
                if v.get("loadavg_before") and v.get("loadavg_after") else _load(m.get("loadavg", [])[:1]))
        secs = _s(v["seconds"]) if v.get("seconds") is not None else "–"
        peak = f"{w['peak_rss_mib']:.0f} MiB" if w.get("peak_rss_mib") else "–"
        restarted = {True: "yes", False: "no"}.get(w.get("restarted"), "–")
        lip = f"{v['lipschitz']:.4g}" if isinstance(v.get("lipschitz"), (int, float)) else "–"
        L.append(f"| {m.get('date_utc', '–')} | {'-'.join(map(str, v['widths']))} | "
                 f"{v['weights_bytes'] / 2**30:.2f} GiB | {v['worker_memory']} | {budget} | {est} | {blocks} | "
                 f"{pd.get('n_tasks', '–')} | {v['status'][:300]} | {secs} | {_s(v.get('plan_seconds'))} | {peak} | "
                 f"{restarted} | {load} | {lip} |")
    L.append("")
    for _k, v in items:
        if v.get("plan"):
            L.append(f"Plan of the {v['worker_memory']} run ({v.get('machine', {}).get('date_utc', '')}):")
            L.append("")
            L.append("```")
            L.extend(v["plan"].splitlines())
            L.append("```")
            L.append("")
        per = (v.get("workers") or {}).get("peak_rss_mib_per_worker")
        if per:
            L.append(f"Peak RSS per worker process ({v['worker_memory']} run): "
                     + ", ".join(f"pid {p}: {x:.0f} MiB" for p, x in per.items())
                     + (f"; after warm-up, before the job: "
                        + ", ".join(f"{x:.0f} MiB" for x in v['worker_rss_after_warmup_mib'].values())
                        if v.get("worker_rss_after_warmup_mib") else "") + ".")
            L.append("")
    return L


def write_ooc_section(res: dict, out: Path) -> None:
    """``benchmarks/results/scale_ooc.md``: the out-of-core section alone (assembled after ``scale.md``)."""
    L = ooc_lines(res, heading="##")
    if not L:
        raise SystemExit("no ooc*.json result files")
    L[2:2] = ["Earlier out-of-core figures (2026-11-25: 1.4 GiB workers; the plan then counted neither the worker "
              "baseline nor the copies of the live blocks) are superseded by these. Each run names the code it ran "
              "with (`code` in its JSON: the SHA-256 of the package sources).", ""]
    L.append("Stores and raw JSON results go to `$RECURJAC_BENCH_DIR` (default `<tmp>/recurjac_bench`); this file "
             "is written by `python benchmarks/bench_scale.py report-ooc` (and the same section by `report`).")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(L) + "\n")
    print(f"wrote {out}")


def write_report(res: dict, out: Path) -> None:
    L: list[str] = []
    gemm = res.get("gemm")
    L.append("## Scale: CIFAR shape, engine, cluster, sparsity (issue 5)")
    L.append("")
    if gemm:
        m = gemm["machine"]
        L.append(f"Machine: {m['cpu']}, {m['nproc']} vCPU, {m['mem_total_gib']} GiB; Python {m['python']}, numpy "
                 f"{m['numpy']}, scipy {m['scipy']}, numba {m['numba']}, dask {m['dask']}; "
                 + ("`OPENBLAS_CORETYPE` / `OPENBLAS_L2_SIZE` not set in this environment"
                 if not m["OPENBLAS_CORETYPE"] else f"`OPENBLAS_CORETYPE={m['OPENBLAS_CORETYPE']}` (left as set)")
                 + f". Date {m['date_utc']}; load average at that time {_load(m['loadavg'])}.  Every figure "
                 "below has the load average of its run beside it: benchmarks run one at a time, and a load of "
                 "1-2 on these 2 cores comes from the benchmark's own processes (client, scheduler, workers); "
                 "the machine is a shared virtual one, so compare ratios measured in the same run, not seconds.")
        g = gemm["gemm"]
        L.append(f"float64 GEMM rate, n = {g['n']}, 1 BLAS thread (threadpoolctl), median of {g['repeats']}: "
                 f"**{g['gflops']:.1f} GFLOP/s** (each benchmark re-measures it in its own process; its ratios use "
                 "its own value).")
        L.append("")
        L.append("Numba compile time (fresh `NUMBA_CACHE_DIR`, tiny network, first call minus second call through "
                 "the engine; excluded from every timing below, which run after a warm-up call):")
        L.append("")
        L.append("| method | first call | second call | compile |")
        L.append("|---|---|---|---|")
        for k, v in gemm["numba_compile"].items():
            if "error" in v:
                L.append(f"| {NAMES.get(k, k)} | error: {v['error']} | | |")
            else:
                L.append(f"| {NAMES.get(k, k)} | {_s(v['first_call_s'])} | {_s(v['second_call_s'])} | "
                         f"{_s(v['compile_s'])} |")
        L.append("")
    L.extend(_summary(res))
    L.append("Network: 3072-2048-2048-1024-1024-512-512-256-256-128-10, ReLU, He-normal weights (seed 20190127), "
             "biases N(0, 0.01²), stored in a zarr model store (`save_network`); input: CIFAR-10 test image 0 "
             "(`data/eran/cifar10_test.csv`, pixels / 255, domain [0, 1]); output row: the logit of the predicted "
             "class (one row, as the reference's Lipschitz task); l-inf radii chosen by bisection so that about 5%, "
             "30% and 100% of the first layer's neurons are unstable (first-layer bounds of a box are exact).")
    L.append("")

    # radii
    radii = {}
    for k, v in res.items():
        if "eps" in v and "radius_target" in v and v.get("network") != "pruned90":
            radii[v["radius_target"]] = (v["eps"], v["unstable_first_layer"], v.get("unstable"), v.get("dead"),
                                         v.get("layer_bound_method"))
    if radii:
        L.append("| target unstable (layer 1) | eps (l-inf) | actual layer-1 fraction | unstable per layer | dead per layer | layer bounds |")
        L.append("|---|---|---|---|---|---|")
        for t in sorted(radii):
            eps, fr, un, dead, lbm = radii[t]
            L.append(f"| {t:.0%} | {eps:.3g} | {fr:.2%} | {un} | {dead} | {lbm} |")
        L.append("")

    # full runs
    fulls = [v for k, v in sorted(res.items()) if k.startswith("full-")]
    if fulls:
        L.append("### Complete engine runs")
        L.append("")
        L.append("`synchronous` scheduler (one core, as the paper's timings) unless the row says `threads ×2` (the "
                 "engine's threads scheduler, 2 threads = both cores); one BLAS thread per task; time = plan (layer "
                 "bounds in the client) + run; median of the repeats. FLOPs: the GEMM FLOPs actually issued by the "
                 "method (counted by wrapping its GEMM helpers `panel_matmul` / `tile_matmul`; elementwise numba "
                 "passes not counted); the plan's a-priori estimate (before the per-row masks) beside it. GFLOP/s = counted "
                 "FLOPs / summed task time.")
        L.append("")
        L.append("| method | radius | total (median) | layer bounds | run | tasks | GFLOP counted (plan) | GFLOP/s | "
                 "ratio to GEMM | peak RSS | load (before → after) | paper (1 core) | reference here |")
        L.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for v in fulls:
            tot = sorted(r["total_seconds"] for r in v["runs"])[len(v["runs"]) // 2]
            b = v["best"]
            peak = max(r["memory"]["peak_rss_mib"] for r in v["runs"])
            gf = v.get("gflops_task_time")
            sched = "" if v["scheduler"] == "synchronous" else f", {v['scheduler']} ×{v['threads']}"
            twin = ", **90%-pruned twin**" if v.get("network") == "pruned90" else ""
            L.append(f"| {NAMES[v['method']]}{sched}{twin} ({v['layer_bound_method']} bounds) | "
                     f"{v['radius_target']:.0%} (eps {v['eps']:.3g}) | {_s(tot)} | "
                     f"{_s(b['layer_bounds_seconds'])} | {_s(v['run_seconds_median'])} | {v['n_tasks']} | "
                     f"{v['flops'] / 1e9:.2f} ({v.get('flops_plan', v['flops']) / 1e9:.2f}) | {_g(gf)} | {_g(gf / v['gemm']['gflops'] if gf else None)} | "
                     f"{peak:.0f} MiB | {_load(v['loadavg_before'][:1])} → {_load(v['loadavg_after'][:1])} | "
                     f"{PAPER[v['method']]} | {REFERENCE_HERE[v['method']]} |")
        L.append("")
        L.append("Per layer step (task time summed over the step's tasks, median run):")
        L.append("")
        for v in fulls:
            if v["scheduler"] != "synchronous":
                L.append(f"- {NAMES[v['method']]}, {v['scheduler']} ×{v['threads']}, radius {v['radius_target']:.0%}: "
                         "task time per step (FLOPs per step not attributable with concurrent tasks): " + "; ".join(
                             f"step {p['step']}: {_s(p['task_seconds'])}" for p in v["per_step"]))
                continue
            L.append(f"- {NAMES[v['method']]} ({v['layer_bound_method']} bounds), radius {v['radius_target']:.0%}: " + "; ".join(
                f"step {p['step']} ({p['width']} cols): {_s(p['task_seconds'])}, {p['flops'] / 1e9:.2f} GFLOP, "
                f"{_g(p['gflops'])} GF/s ({_g(p['ratio_to_gemm'])}×)" for p in v["per_step"]))
        L.append("")

    samples = [v for k, v in sorted(res.items()) if k.startswith("sample-")]
    if samples:
        L.append("### RecurJac-F0 / F1: measured fraction, extrapolated")
        L.append("")
        L.append("The issue asks for a measured fraction wherever a full F0/F1 run would exceed ~20 minutes. With "
                 "the kernels before row sharing it would have (F0 at 5% extrapolated to 2.4 h "
                 "at 13:10 UTC); with row sharing the complete runs above take "
                 "minutes, so the sample is kept as a check of the extrapolation (compare the 5% rows with the "
                 "complete runs) and for the radii without a complete run. Method: the plan's tasks for a random row "
                 "block (every column block of every layer step, in the engine's block functions, one process, one "
                 "BLAS thread) were timed and scaled by rows (rows are independent: the work separates exactly by "
                 "rows; the per-row cost differs between rows through their masks, hence a random block). FLOPs: GEMM FLOPs counted in the sampled tasks (as above), scaled by rows; the plan's a-priori "
                 "estimate beside it.")
        L.append("")
        L.append("| method | radius | rows sampled | sampled time | extrapolated, 1 core | GFLOP all rows, counted (plan) | GFLOP/s | "
                 "ratio to GEMM | peak RSS | load (before → after) | paper (1 core) | reference here |")
        L.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for v in samples:
            twin = ", **90%-pruned twin**" if v.get("network") == "pruned90" else ""
            L.append(f"| {NAMES[v['method']]}{twin} | {v['radius_target']:.0%} (eps {v['eps']:.3g}) | {v['rows_sampled']} of "
                     f"{v['n_rows']} ({v['fraction']:.2%}) | {_s(v['task_seconds_sampled'])} | "
                     f"**{_s(v['extrapolated_one_core_seconds'])}** | {v['flops'] / 1e9:.0f} ({v.get('flops_plan', v['flops']) / 1e9:.0f}) | {_g(v['gflops'])} | "
                     f"{_g(v['gflops'] / v['gemm']['gflops'])} | {v['memory']['peak_rss_mib']:.0f} MiB | "
                     f"{_load(v['loadavg_before'][:1])} → {_load(v['loadavg_after'][:1])} | {PAPER[v['method']]} | "
                     f"{REFERENCE_HERE[v['method']]} |")
        L.append("")
        L.append("Per layer step of the sample (blocks of "
                 + ", ".join(f"{NAMES[v['method']]} r{v['radius_target']:.0%}: {v['row_block']} rows × {v['col_block']} cols" for v in samples)
                 + "):")
        L.append("")
        for v in samples:
            L.append(f"- {NAMES[v['method']]}, radius {v['radius_target']:.0%}: " + "; ".join(
                f"step {p['step']}: {_s(p['sampled_seconds'])} → {_s(p['extrapolated_seconds'])}, "
                f"{_g(p['gflops'])} GF/s ({_g(p['ratio_to_gemm'])}×)" for p in v["per_step"]))
        L.append("")
        L.append("#### Estimated wall time on more workers (from the measured task times and the task graph)")
        L.append("")
        L.append("Work W = measured seconds per row × rows, per step; critical path CP = one row block through every "
                 "step (a task of step t waits for all column blocks of step t−1 of its rows), taking the slowest "
                 "sampled task of each step; plus 5 ms of scheduler time per task. A greedy schedule on P "
                 "single-threaded workers takes between max(W/P, CP) and W/P + CP (Graham's bound). Not measured: "
                 "network transfer of the per-row state and the weights (each worker reads the weights once from "
                 "the store).")
        L.append("")
        L.append("| method | radius | tasks | W (1 core) | CP | 2 workers | 8 workers | 64 workers | 512 workers |")
        L.append("|---|---|---|---|---|---|---|---|---|")
        for v in samples:
            e = v["estimate"]
            ntasks = sum(p["tasks"] for p in v["per_step"])
            cells = []
            for P in ("2", "8", "64", "512"):
                w = e["workers"][P]
                cells.append(f"{_s(w['lower_s'])} – {_s(w['upper_s'])}")
            L.append(f"| {NAMES[v['method']]} | {v['radius_target']:.0%} | {ntasks} | {_s(e['work_s'])} | "
                     f"{_s(e['critical_path_s'])} | " + " | ".join(cells) + " |")
        L.append("")

    f0 = res.get("full-recurjac-f0-r0") or {}
    issued = (f"F0 issues {f0['flops'] / 1e12:.1f} TFLOP where the plan's estimate before the per-row masks is "
              f"{f0['flops_plan'] / 1e12:.1f} TFLOP") if f0.get("flops") and f0.get("flops_plan") else (
              "F0 issues far fewer FLOPs than the plan's estimate before the per-row masks")
    L.append("Reading the GFLOP/s: the counted FLOPs are the GEMMs actually issued. At the 30% and 100% radii "
             "almost every entry of the first state has an unknown sign, so nearly every neuron falls into Term I "
             "(Eq. 14-15) and the recursion stops after one level. At the 5% radius the same happens deep in the "
             f"chain: the shared variant multiplies each row only on its non-zero per-row factors, so {issued}, "
             "and steps 2-8 of F0 / F1 spend most of their "
             "time in the elementwise numba passes (not counted): they are not GEMM-bound. Step 1 (three tiled "
             "products, over the live neurons of layer 1 and, for the radius, its unstable ones) and RecurJac-B's "
             "last steps are; `results/gemm_share.md` measures, per step, the share of time inside GEMM calls and "
             "the rate inside them. The last step has one column (the selected logit).")
    L.append("")
    L.append("`threads ×2` vs 1 core: compare the complete runs above (same job, one process; the loads are "
             "recorded beside them). The estimates for more workers assume workers as fast as the sampled process; "
             "a sampled row block computes every step's shared factors itself (a full run computes them once per "
             "worker process), so they are slight upper figures.")
    L.append("")
    w = {k: v for k, v in res.items() if k.startswith("workers-")}
    for k, v in w.items():
        L.append(f"### 1 → 2 workers ({NAMES.get(v['method'], v['method'])}, {_workers_job(v)})")
        L.append("")
        L.append("LocalCluster from `recurjac_scale.cluster.local_client` (127.0.0.1, 1 thread per worker, one BLAS "
                 "thread), workers warmed up (imports, numba cache) before timing; wall time of `plan.compute(client=..., "
                 "max_blocks=...)` including graph submission and the checkpoint writes.")
        L.append("")
        L.append("| workers | runs (s) | load at start |")
        L.append("|---|---|---|")
        for n, rs in v["runs"].items():
            secs = ", ".join("%.1f" % r["seconds"] for r in rs)
            loads = "; ".join(_load(r["loadavg"][:1]) for r in rs)
            L.append(f"| {n} | {secs} | {loads} |")
        L.append("")
        L.append(f"Speedup 1 → 2 workers (medians): **{_g(v['speedup'])}×** (target ≥ 1.6×).")
        L.append("")

    L.extend(ooc_lines(res, heading="###"))

    if "sparse" in res:
        v = res["sparse"]
        L.append("### Pruned-sparse weights: 90%-pruned CIFAR layers vs their dense twins")
        L.append("")
        L.append("What was measured: the GEMM of one recursion step, `W(i) @ V'` with `W(i)` a CIFAR layer "
                 "magnitude-pruned to 10% (and 30%) density and `V'` dense with c columns, scipy.sparse CSR/CSC "
                 "(`recurjac_scale.network.sparse`) vs dense BLAS on the same pruned matrix, one thread, median of "
                 "5; 'masked' = the structural-sparsity form `W[:, S] @ V'[S]` with half the neurons in S. Whole runs "
                 "of the 90%-pruned twin through the sparse kernels against its dense twin: "
                 "`results/sparse_kernels.md`.")
        L.append("")
        L.append("| W shape | density | c | dense BLAS | CSR | CSC | CSR speedup | CSR useful GF/s | dense GF/s | masked dense | masked CSR | masked speedup |")
        L.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in v["rows"]:
            L.append(f"| {r['shape'][0]}×{r['shape'][1]} | {r['density']:.0%} | {r['c']} | {r['dense_s'] * 1e3:.2f} ms | "
                     f"{r['csr_s'] * 1e3:.2f} ms | {r['csc_s'] * 1e3:.2f} ms | {r['speedup_csr_vs_dense']:.2f}× | "
                     f"{r['csr_useful_gflops']:.2f} | {r['dense_gflops']:.1f} | {r['masked_dense_s'] * 1e3:.2f} ms | "
                     f"{r['masked_sparse_s'] * 1e3:.2f} ms | {r['speedup_masked']:.2f}× |")
        L.append("")
        sb = v["store_bytes"]
        L.append(f"Store size on disk (zstd): dense He network {sb['dense_he'] / 2**20:.0f} MiB; 90%-pruned as dense "
                 f"zarr {sb['pruned90_dense_zarr'] / 2**20:.0f} MiB; 90%-pruned as CSR groups "
                 f"{sb['pruned90_csr_zarr'] / 2**20:.0f} MiB.")
        L.append("")

    L.append("### Provenance of each result")
    L.append("")
    L.append("The package changed while these ran (the Jacobian kernels gained row sharing between runs): "
             "each result names the SHA-256 (12 hex) of the package's sources it ran with.")
    L.append("")
    L.append("| result | date (UTC) | code | load average (1, 5, 15 min) |")
    L.append("|---|---|---|---|")
    for k, v in sorted(res.items()):
        m = v.get("machine", {})
        L.append(f"| {k} | {m.get('date_utc', '–')} | {m.get('code_sha256', 'not recorded')} | "
                 f"{_load(m.get('loadavg', []))} |")
    L.append("")
    cmds = sorted({v["command"] for v in res.values() if "command" in v})
    L.append("### Commands")
    L.append("")
    L.append("```")
    L.append("python benchmarks/cifar_setup.py            # builds the store, prints the radii")
    L.extend(cmds)
    L.append("python benchmarks/bench_scale.py report")
    L.append("```")
    L.append("")
    L.append("Stores and raw JSON results go to `$RECURJAC_BENCH_DIR` (default `<tmp>/recurjac_bench`).")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(L) + "\n")
    print(f"wrote {out}")
