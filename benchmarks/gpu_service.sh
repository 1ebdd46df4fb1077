#!/usr/bin/env bash
# One run on a GPU machine for the service layers: worker CUDA tests and benchmark under Ray, the
# end-to-end generation benchmark, and the long-context benchmark when present.
# Ray and the gRPC health/reflection packages come as wheels in .whl/ (no index there).
#   bash benchmarks/gpu_service.sh [step ...]   steps: tests graphs worker e2e longctx
#   (default all)
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
PY=${PY:-python3}
. benchmarks/gpu_env.sh
steps=${*:-tests graphs worker e2e longctx}
for step in $steps; do
  t0=$(date +%s)
  case $step in
    tests) timeout 240 $PY -m pytest -q -p no:cacheprovider -x tests/unit/workers/test_worker_cuda.py \
             >"$OUT/tests.log" 2>&1
           echo "tests rc=$?"; tail -3 "$OUT/tests.log" ;;
    graphs) timeout 240 $PY -m pytest -q -p no:cacheprovider tests/unit/test_decode_graphs_cuda.py \
             tests/unit/test_decode_graphs.py tests/unit/test_hf_generate.py >"$OUT/graphs.log" 2>&1
           echo "graphs rc=$?"; tail -15 "$OUT/graphs.log" ;;
    worker) timeout 240 $PY -m benchmarks.worker --zero-copy-tensors \
             --out "$OUT/worker.json" >"$OUT/worker.txt" 2>"$OUT/worker.err"
           echo "worker rc=$?"; tail -3 "$OUT/worker.err"; cat "$OUT/worker.txt" ;;
    e2e)   timeout 420 $PY -m benchmarks.e2e --out "$OUT/e2e.json" >"$OUT/e2e.txt" \
             2>"$OUT/e2e.err"
           echo "e2e rc=$?"; tail -5 "$OUT/e2e.err"; cat "$OUT/e2e.txt" ;;
    longctx) [ -f benchmarks/longctx.py ] || continue
           timeout 300 $PY -m benchmarks.longctx --out "$OUT/longctx.json" \
             >"$OUT/longctx.txt" 2>"$OUT/longctx.err"
           echo "longctx rc=$?"; tail -5 "$OUT/longctx.err"; cat "$OUT/longctx.txt" ;;
  esac
  echo "step $step took $(( $(date +%s) - t0 )) s"
done
