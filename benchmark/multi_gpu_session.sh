#!/usr/bin/env bash
# One device call for issue 14 (benchmark/multi_gpu_eplb.py): install the staged SGLang 0.5.23
# (.gpuenv/, see ../shared/gpu-sglang/README.md; carry it), then run the benchmark with $ARGS.
# NCCL's NVLink multicast stays off (the device README: it can take a shared host's GPUs down).
# Usage (device tool, carry [".gpuenv"], kind nvidia-h200-x2 for --tp 2):
#   ARGS="--tp 2 --costs hetero --ec-backend triton" bash benchmark/multi_gpu_session.sh
# Results ($OUT): bench.log, multi_gpu_eplb.{json,md,png}, server_logs.tgz, device.log.
set -u
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"; T0=$(date +%s)
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
RUNS=none OUT=/tmp/gpuenv_out bash .gpuenv/device.sh > "$OUT/device.log" 2>&1 || { tail -40 "$OUT/device.log"; exit 1; }
grep -E "sgl_kernel check|installed into|cache restored" "$OUT/device.log"
python3 -c 'import torch; print("GPUs:", torch.cuda.device_count())'
echo "install done +$(( $(date +%s) - T0 )) s"
export PYTHONPATH=/tmp/site:/tmp/plugsite:$PWD/python PYTHONUNBUFFERED=1
export SGLANG_UNIFIED_RADIX_TREE_CORE_BACKEND=python SGLANG_JIT_CACHE_DIR=/tmp/cache/sgl_jit \
       TRITON_CACHE_DIR=/tmp/cache/triton TVM_FFI_CACHE_DIR=/tmp/cache/tvm_ffi
timeout "${LIMIT:-500}" python3 benchmark/multi_gpu_eplb.py --out /tmp/mg ${ARGS:-} > "$OUT/bench.log" 2>&1
echo "bench rc=$? +$(( $(date +%s) - T0 )) s"
tail -n "${TAIL:-60}" "$OUT/bench.log" | cut -c1-300
cp /tmp/mg/multi_gpu_eplb.json /tmp/mg/multi_gpu_eplb.md /tmp/mg/multi_gpu_eplb.png "$OUT/" 2>/dev/null
tar -czf "$OUT/server_logs.tgz" -C /tmp/mg . 2>/dev/null
