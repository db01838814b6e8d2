#!/usr/bin/env bash
# One device call on the GPU machine (no sglang installed there): install the staged SGLang
# 0.5.23 (.gpuenv/, see ../shared/gpu-sglang/README.md), build the EC CUDA kernel, then run
# the stages named in STAGES (default: "server"):
#   server  the GPU server suite (test/test_gpu_server.py, real launch_server processes; a server
#           not healthy within GPU_SERVER_START_S (default here 200 s) fails its tests)
#   units   the kernel/hook GPU tests (EC, EPLB profiler, Omni), 12 xdist workers
#   timing  the `gpu_timing` GPU tests, which skip under xdist (the GPU to themselves), serially
#   bench   benchmark/bench_serving.py with BENCH_ARGS
#   onebatch  benchmark/bench_one_batch_ec.py (SGLang's bench_one_batch, TC vs EC) with
#           ONEBATCH_ARGS, within ONEBATCH_LIMIT seconds (default 270)
#   onebatch_doge  benchmark/bench_one_batch_doge.py (bench_one_batch, Omni backends on Doge) with
#           ONEBATCH_DOGE_ARGS, within ONEBATCH_DOGE_LIMIT seconds (default 540)
#   kernels bench_routing.py (ROUTING_ARGS; ROUTING_PROFILE=1 adds its per-kernel profile) and
#           bench_omni.py (OMNI_ARGS), KERNELS_LIMIT seconds each
#   ectests     the expert-choice GPU tests of the default kernels
#   ecprobe     probe_ec_small_t.py per E in ECPROBE_E (default "64 128 256 384"): in-graph time
#           at T = 4096..65536 and the per-kernel profile at T = 32768 (ecprobe.txt); ECPROBE_CS
#           (e.g. "rule 0 2") repeats it per select cluster setting (rule = the variable unset)
#   ecgrid      bench_routing.py's full EC grid (T 32..65536, E 64..384, k 8; the goals' grid):
#           ecgrid.log, bench_routing.json / .png
#   script      bash $SCRIPT in this environment (one-off probes)
# Usage (device tool, carry [".gpuenv"]): STAGES="server units" bash benchmark/gpu_serving_session.sh
# Logs and results go to $OUT (at most 8 files come back: server logs are tarred).
# SAVE_CACHE=1 also returns cache_ec_build.tgz / cache_triton.tgz (< 16 MB each; SAVE_CACHE_DIRS
# picks the folders): copied into .gpuenv/cache/, device.sh restores them in later calls (the
# EC kernel build, ~25-30 s a call, and Triton compiles are then skipped).
set -u
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
T0=$(date +%s)
RUNS=none OUT=/tmp/gpuenv_out bash .gpuenv/device.sh > "$OUT/device.log" 2>&1 || { tail -40 "$OUT/device.log"; exit 1; }
grep -E "sgl_kernel check|installed into|cache restored" "$OUT/device.log"
export PYTHONPATH=/tmp/site:/tmp/plugsite:$PWD/python:$PWD/test
export SGLANG_UNIFIED_RADIX_TREE_CORE_BACKEND=python
export SGLANG_JIT_CACHE_DIR=/tmp/cache/sgl_jit TRITON_CACHE_DIR=/tmp/cache/triton \
       TVM_FFI_CACHE_DIR=/tmp/cache/tvm_ffi SGLANG_MOE_ROUTING_BUILD_DIR=/tmp/cache/ec_build
stage() { local name=$1 limit=$2; shift 2; local t0=$(date +%s)
  PYTHONUNBUFFERED=1 timeout -s INT -k 30 "$limit" "$@" > "$OUT/$name.log" 2>&1; local rc=$?
  echo "== $name: rc=$rc in $(( $(date +%s) - t0 )) s (session +$(( $(date +%s) - T0 )) s)"
  tail -n "${TAIL:-25}" "$OUT/$name.log" | cut -c1-400; }
[ -n "${SKIP_BUILD:-}" ] || stage build 150 python3 sgl-kernel/build.py
for s in ${STAGES:-server}; do
  case $s in
    server) GPU_SERVER_START_S=${GPU_SERVER_START_S:-200} GPU_SERVER_LOG_DIR=/tmp/server_logs stage server ${SERVER_LIMIT:-420} \
              python3 -m pytest -q -p no:cacheprovider -m server -rA test/test_gpu_server.py
            tar -czf "$OUT/server_logs.tgz" -C /tmp server_logs 2>/dev/null ;;
    units) stage units ${UNITS_LIMIT:-240} python3 -m pytest -q -n 12 -p no:cacheprovider -rfE --durations=25 \
              test/test_expert_choice_gpu.py test/test_expert_choice_gpu_stream.py \
              test/test_eplb_gpu.py test/test_omni_gpu.py test/test_omni_lane.py \
              test/test_omni_packed.py test/test_threshold_routing.py test/test_batch_invariance_gpu.py ;;
    timing) stage timing ${TIMING_LIMIT:-120} python3 -m pytest -q -p no:cacheprovider -rA -m gpu_timing \
              test/test_eplb_gpu.py ;;
    bench) TAIL=60 stage bench ${BENCH_LIMIT:-540} python3 benchmark/bench_serving.py --out /tmp/bench_serving ${BENCH_ARGS:-}
           cp /tmp/bench_serving/bench_serving.{md,json,png} "$OUT/" 2>/dev/null
           tar -czf "$OUT/bench_logs.tgz" -C /tmp/bench_serving . 2>/dev/null ;;
    onebatch) ol=${ONEBATCH_LIMIT:-270}
           TAIL=40 stage onebatch "$ol" python3 benchmark/bench_one_batch_ec.py --out /tmp/onebatch \
              --max-seconds $(( ol - 10 )) ${ONEBATCH_ARGS:-}
           cp /tmp/onebatch/bench_one_batch_ec.{md,json,png} "$OUT/" 2>/dev/null
           tar -czf "$OUT/onebatch_logs.tgz" -C /tmp/onebatch --exclude=cpu_shim . 2>/dev/null ;;
    onebatch_doge) dl=${ONEBATCH_DOGE_LIMIT:-540}
           TAIL=40 stage onebatch_doge "$dl" python3 benchmark/bench_one_batch_doge.py \
              --out /tmp/onebatch_doge --max-seconds $(( dl - 10 )) ${ONEBATCH_DOGE_ARGS:-}
           cp /tmp/onebatch_doge/bench_one_batch_doge.{md,json,png} "$OUT/" 2>/dev/null
           tar -czf "$OUT/onebatch_doge_logs.tgz" -C /tmp/onebatch_doge --exclude=cpu_shim . 2>/dev/null ;;
    kernels) TAIL=45 stage bench_routing ${KERNELS_LIMIT:-200} python3 benchmark/bench_routing.py $([ -n "${ROUTING_PROFILE:-}" ] || echo --no-profile) \
              --out /tmp/kbench/routing ${ROUTING_ARGS:-}
           TAIL=45 stage bench_omni ${KERNELS_LIMIT:-200} python3 benchmark/bench_omni.py --out /tmp/kbench/omni ${OMNI_ARGS:-}
           tar -czf "$OUT/kernels.tgz" -C /tmp kbench 2>/dev/null ;;
    ectests) stage ectests ${ECTESTS_LIMIT:-300} python3 -m pytest -q -n 12 -p no:cacheprovider -rfE \
              test/test_expert_choice_gpu.py test/test_expert_choice_gpu_stream.py \
              test/test_expert_choice_gpu_fused_sorted.py test/test_threshold_routing.py \
              test/test_batch_invariance_gpu.py test/test_expert_choice_gpu_cluster_select.py ;;
    ecprobe) for cs in ${ECPROBE_CS:-rule}; do for e in ${ECPROBE_E:-64 128 256 384}; do
              if [ "$cs" = rule ]; then unset SGLANG_MOE_EC_SELECT_CLUSTER; else export SGLANG_MOE_EC_SELECT_CLUSTER=$cs; fi
              timeout 60 python3 benchmark/probe_ec_small_t.py \
              --e $e --graph-t 4096,8192,32768,65536 --profile 32768x$e; done; done > "$OUT/ecprobe.txt" 2>&1
           unset SGLANG_MOE_EC_SELECT_CLUSTER
           grep -E "^SGLANG|^E=|three_launch True none|ec::" "$OUT/ecprobe.txt" | cut -c1-110 ;;
    ecgrid) TAIL=12 stage ecgrid ${ECGRID_LIMIT:-200} python3 benchmark/bench_routing.py --no-profile \
              --t-values 32,128,1024,8192,32768,65536 --e-values 64,128,256,384 --k-values 8 \
              --max-seconds $(( ${ECGRID_LIMIT:-200} - 30 )) --out /tmp/ecgrid
           cp /tmp/ecgrid/bench_routing.json /tmp/ecgrid/bench_routing.png "$OUT/" 2>/dev/null ;;
    script) stage script ${SCRIPT_LIMIT:-300} bash "$SCRIPT" ;;  # any $SCRIPT in this environment
  esac
done
if [ -n "${SAVE_CACHE:-}" ]; then  # warm caches for later calls: put them into .gpuenv/cache/
  for c in ${SAVE_CACHE_DIRS:-ec_build triton}; do
    [ -d /tmp/cache/$c ] || continue
    tar -czf "$OUT/cache_$c.tgz" -C /tmp/cache $c; m=$(du -m "$OUT/cache_$c.tgz" | cut -f1)
    echo "cache_$c.tgz: $m MB"; [ "$m" -lt 16 ] || rm -f "$OUT/cache_$c.tgz"
  done
fi
echo "session done in $(( $(date +%s) - T0 )) s"
