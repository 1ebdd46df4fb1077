#!/usr/bin/env bash
# One GPU lease for the kernels: the kernel tests on CUDA, then the attention and swap
# benchmarks. Writes logs and JSON under $OUT (default ./out) and prints tables last.
#   bash benchmarks/gpu_kernels.sh [--quick]   (extra arguments go to benchmarks.attention)
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PY:-python3}

# Import kvservice.kernels from the working tree without installing: a throwaway package
# folder whose kernels/ and workers/ point at the top-level folders, as pyproject maps them.
SHIM=$(mktemp -d)
cp -r kvservice "$SHIM/"
ln -s "$PWD/kernels" "$SHIM/kvservice/kernels"
ln -s "$PWD/workers" "$SHIM/kvservice/workers"
export PYTHONPATH="$SHIM:$PWD${PYTHONPATH:+:$PYTHONPATH}"

nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,power.draw \
  --format=csv | tee "$OUT/gpu.txt"
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"

if [ -z "${SKIP_TESTS:-}" ]; then
  timeout 300 $PY -m pytest tests/kernels -q -x --durations=10 -p no:cacheprovider \
    >"$OUT/tests.log" 2>&1
  echo "kernel tests rc=$?"; tail -15 "$OUT/tests.log"
fi
$PY -m benchmarks.attention --out "$OUT/attention.json" "$@" >"$OUT/attention.txt" \
  2>"$OUT/attention.err"
echo "attention rc=$?"; tail -5 "$OUT/attention.err"
if [ -z "${SKIP_SWAP:-}" ]; then
  $PY -m benchmarks.swap --out "$OUT/swap.json" >"$OUT/swap.txt" 2>"$OUT/swap.err"
  echo "swap rc=$?"; tail -5 "$OUT/swap.err"
  cat "$OUT/swap.txt"
fi
cat "$OUT/attention.txt"
