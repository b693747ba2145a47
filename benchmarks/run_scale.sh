#!/usr/bin/env bash
# Runs the scale benchmarks one after the other (never two heavy ones at once), then writes the report.
# Usage: bash benchmarks/run_scale.sh [CUTOFF_EPOCH_SECONDS]   (no new job starts after the cutoff)
set -u
cd "$(dirname "$0")/.."
CUTOFF=${1:-9999999999}
LOG=${RECURJAC_BENCH_DIR:-${TMPDIR:-/tmp}/recurjac_bench}/logs
mkdir -p "$LOG"
run() {  # run NAME TIMEOUT_S ARGS...
  local name=$1 tmo=$2; shift 2
  if [ "$(date +%s)" -ge "$CUTOFF" ]; then echo "skip $name (cutoff)"; return; fi
  echo "$(date -u +%H:%M:%S) start $name: $*"
  timeout --signal=TERM --kill-after=30 "$tmo" python benchmarks/bench_scale.py "$@" > "$LOG/$name.log" 2>&1
  echo "$(date -u +%H:%M:%S) end $name rc=$?"
}
run gemm 600 gemm
run full-fastlip-r0 900 full --method fastlip --radius 0 --repeats 3
run full-b-r0 900 full --method recurjac-b --radius 0 --repeats 3
run full-f0-r0 1800 full --method recurjac-f0 --radius 0 --repeats 1
run full-f0-r0-threads 1800 full --method recurjac-f0 --radius 0 --scheduler threads --threads 2 --repeats 1
run full-f1-r0 1800 full --method recurjac-f1 --radius 0 --repeats 1
run full-f1-r0-threads 1800 full --method recurjac-f1 --radius 0 --scheduler threads --threads 2 --repeats 1
run workers-f0 1200 workers --method recurjac-f0 --radius 0 --row-block 128 --col-block 128 --blocks 576 --repeats 2
run sample-f0-r0 1800 sample --method recurjac-f0 --radius 0 --row-blocks 1
run sample-f1-r0 1800 sample --method recurjac-f1 --radius 0 --row-blocks 1
run sample-f0-r1 1800 sample --method recurjac-f0 --radius 1 --row-blocks 1
run sample-f1-r1 1800 sample --method recurjac-f1 --radius 1 --row-blocks 1
run sample-f0-r2 1800 sample --method recurjac-f0 --radius 2 --row-blocks 1
run sample-f1-r2 1800 sample --method recurjac-f1 --radius 2 --row-blocks 1
run full-fastlip-r1 600 full --method fastlip --radius 1 --repeats 2
run full-b-r1 600 full --method recurjac-b --radius 1 --repeats 2
run full-fastlip-r2 600 full --method fastlip --radius 2 --repeats 2
run full-b-r2 600 full --method recurjac-b --radius 2 --repeats 2
run full-fastlip-r0-fastlin 900 full --method fastlip --radius 0 --repeats 3 --layer-bounds fastlin
run full-b-r0-fastlin 900 full --method recurjac-b --radius 0 --repeats 3 --layer-bounds fastlin
run sparse 600 sparse
echo "$(date -u +%H:%M:%S) start gemm-share"; timeout 900 python benchmarks/bench_gemm_share.py --method recurjac-f0 --method recurjac-f1 --method recurjac-b > "$LOG/gemm-share.log" 2>&1
run workers-f0-whole 1500 workers --method recurjac-f0 --radius 0 --blocks 100000 --repeats 3
run workers-f0-whole-dask-malloc 1500 workers --method recurjac-f0 --radius 0 --blocks 100000 --repeats 2 --dask-malloc
# Out-of-core and the pruned twin have their own scripts (results/scale_ooc.md, results/sparse_kernels.md):
#   python benchmarks/bench_scale.py ooc --width 8192 --worker-memory 1GiB
#   python benchmarks/bench_sparse_kernels.py --row-blocks 2
python benchmarks/bench_scale.py report
python benchmarks/assemble_results.py
