#!/usr/bin/env bash
# One run on a GPU machine for the kernels: the kernel tests on CUDA, then the attention and swap
# benchmarks. Writes logs and JSON under $OUT (default ./out) and prints tables last.
#   bash benchmarks/gpu_kernels.sh [--quick]   (extra arguments go to benchmarks.attention)
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PY:-python3}

# Import kvservice.kernels from this throwaway copy of the tree without installing (no
# package index there): link the top-level folders where pyproject maps them.
[ -e kvservice/kernels ] || ln -s ../kernels kvservice/kernels
[ -e kvservice/workers ] || ln -s ../workers kvservice/workers
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,power.draw \
  --format=csv | tee "$OUT/gpu.txt"
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"

if [ -z "${SKIP_TESTS:-}" ]; then
  timeout 300 $PY -m pytest tests/kernels -q --durations=10 -p no:cacheprovider \
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
