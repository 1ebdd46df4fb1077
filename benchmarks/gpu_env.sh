# Sourced by the GPU machine scripts: Ray and friends from the wheels carried in .whl/ (no
# package index there) into /tmp/site, the checkout importable as kvservice, NVLS and
# multicast off for NCCL. Needs OUT and PY set.
export PYTHONUNBUFFERED=1 RAY_AUTH_MODE=disabled
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
if [ -d .whl ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
    >"$OUT/pip.log" 2>&1 || tail -5 "$OUT/pip.log"
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
[ -e kvservice/kernels ] || ln -s ../kernels kvservice/kernels
[ -e kvservice/workers ] || ln -s ../workers kvservice/workers
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
