#!/usr/bin/env bash
# One run on a GPU machine for the scaling benchmark (run on a 4-GPU box, or 2): decode throughput
# at 1, 2 and 4 workers, capacity, and block transfer against plain NCCL send/recv.
# Ray comes as wheels in .whl/ (no index there), installed as benchmarks/gpu_service.sh does.
#   bash benchmarks/gpu_scaling.sh [extra benchmarks.scaling arguments]
# A hard timeout bounds the benchmark; the JSON it wrote after each part, the progress
# lines (stderr) and, on a timeout, every thread's stack are kept in $OUT.
set -uo pipefail
OUT=${OUT:-out}
LIMIT_S=${LIMIT_S:-380}
mkdir -p "$OUT"
PY=${PY:-python3}
t0=$(date +%s)
. benchmarks/gpu_env.sh
echo "setup took $(( $(date +%s) - t0 )) s"
# SIGTERM at the limit makes the benchmark dump its threads' stacks (faulthandler); KILL 20 s later.
timeout -k 20 "$LIMIT_S" $PY -m benchmarks.scaling --json --out "$OUT/scaling.json" "$@" \
  >"$OUT/scaling.stdout" 2>"$OUT/scaling.err"
rc=$?
echo "scaling rc=$rc after $(( $(date +%s) - t0 )) s (124 = cut off at ${LIMIT_S} s)"
grep -E '^\[scaling' "$OUT/scaling.err" | tail -60
if [ "$rc" != 0 ]; then
  grep -vE "^\[scaling" "$OUT/scaling.err" | tail -120
fi
if [ -f "$OUT/scaling.json" ]; then
  $PY -m benchmarks.scaling --table-from "$OUT/scaling.json"
else
  echo "no scaling.json written"
fi
ray stop --force >/dev/null 2>&1 || $PY -m ray.scripts.scripts stop --force >/dev/null 2>&1 || true
echo "total $(( $(date +%s) - t0 )) s"
