#!/usr/bin/env bash
# One run on a 2-GPU machine (or more) for block transfers: the transfer's parts between two
# plain processes and between two Ray actors (benchmarks/transfer_parts.py), then the
# service's transfer phase (benchmarks/scaling.py --phases transfer). Ray comes as wheels in
# .whl/ (benchmarks/gpu_env.sh). A hard timeout bounds each part; $OUT keeps the JSON.
#   [MODES="processes ray"] bash benchmarks/gpu_transfer.sh   (MODES="": the service phase only)
set -uo pipefail
OUT=${OUT:-out}
LIMIT_S=${LIMIT_S:-150}
mkdir -p "$OUT"
PY=${PY:-python3}
t0=$(date +%s)
. benchmarks/gpu_env.sh
# The CUDA tests of the copy kernel and the worker first: a broken copy fails here, not later.
timeout 120 $PY -m pytest -q -p no:cacheprovider tests/kernels/test_kernel_write_copy.py \
  tests/unit/workers/test_worker_cuda.py 2>&1 | tail -3
# Peer copy between two GPU actors through CUDA IPC, checked block by block.
timeout 240 $PY -m pytest -q -p no:cacheprovider -m integration -k cuda_ipc \
  tests/integration/test_transfer.py 2>&1 | tail -3
ray stop --force >/dev/null 2>&1 || true
for mode in ${MODES-processes ray}; do
  flag=$([ "$mode" = ray ] && echo --ray || true)
  timeout -k 10 "$LIMIT_S" $PY -m benchmarks.transfer_parts --iters 6 --json $flag \
    >"$OUT/transfer-parts-$mode.stdout" 2>"$OUT/transfer-parts-$mode.err"
  echo "transfer_parts ($mode) rc=$? after $(( $(date +%s) - t0 )) s"
  sed -n '/^{/,/^}/!p' "$OUT/transfer-parts-$mode.stdout"
  sed -n '/^{/,/^}/p' "$OUT/transfer-parts-$mode.stdout" >"$OUT/transfer-parts-$mode.json"
  grep -iE "error|Traceback" "$OUT/transfer-parts-$mode.err" | head -5
  ray stop --force >/dev/null 2>&1 || true
done
timeout -k 20 "$LIMIT_S" $PY -m benchmarks.scaling --workers 2 --phases transfer --json \
  --out "$OUT/scaling-transfer.json" >"$OUT/scaling.stdout" 2>"$OUT/scaling.err"
echo "scaling transfer rc=$? after $(( $(date +%s) - t0 )) s"
grep -E '^\[scaling' "$OUT/scaling.err" | tail -30
ray stop --force >/dev/null 2>&1 || true
echo "total $(( $(date +%s) - t0 )) s"
