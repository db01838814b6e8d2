#!/usr/bin/env bash
# One device call that checks every GPU feature: build the CUDA extension, run the GPU tests,
# run the routing and Omni benchmarks in quick mode. Logs go to $OUT (default ./gpu_out).
# Usage on the GPU machine (repo root, no sglang needed): bash benchmark/gpu_session.sh
# For SGLang's topk_softmax as the routing yardstick, first run
# `python benchmark/sglang_yardstick.py --stage` where SGLang is installed and carry the
# git-ignored .sgl_yardstick/ along (device tool: carry [".sgl_yardstick"]).
# Typically 6-8 minutes; the stage limits below add up to more than one device call (600 s):
# if a stage runs long, split the script into two calls (EC+EPLB stages, then Omni stages).
set -u
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD/python:$PWD/test
nvidia-smi -L; python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
stage() { local name=$1 limit=$2; shift 2; local t0=$(date +%s)
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; local rc=$?
  echo "== $name: rc=$rc in $(( $(date +%s) - t0 )) s"; tail -n "${TAIL:-6}" "$OUT/$name.log"; }
stage build 150 python3 sgl-kernel/build.py
stage tests_ec_eplb 200 python3 -m pytest -q -n 12 -p no:cacheprovider test/test_expert_choice_gpu.py test/test_eplb_gpu.py
# timing tests (marker gpu_timing) are skipped under -n: run them alone on the GPU
stage tests_timing 60 python3 -m pytest -q -p no:cacheprovider -m gpu_timing test/test_eplb_gpu.py
stage tests_omni 200 python3 -m pytest -q -n 16 -p no:cacheprovider test/test_omni_gpu.py
# benchmark artefacts stay in /tmp (the device tool brings back at most 8 files); tables are in the logs
TAIL=40 stage bench_routing 150 python3 benchmark/bench_routing.py --quick --no-profile --out /tmp/bench_routing
cp /tmp/bench_routing/bench_routing.md "$OUT/" 2>/dev/null
TAIL=40 stage bench_omni 220 python3 benchmark/bench_omni.py --quick --out /tmp/bench_omni
ls "$OUT"
