#!/usr/bin/env bash
# Issue 11 in ONE device call (default 560 s wall clock, one H200): corpus + tokenizer once
# (process pool; SGLang installs meanwhile when .gpuenv/ is there), a token-choice-trained
# Qwen3-MoE, an expert-choice-trained one (the TC model's routing-quality eval runs on the same
# GPU meanwhile), the EC model's eval, and one plot of both. Every stage is capped from the
# session's end time (train_moe_lm --stop-at, eval_routing_quality --max-seconds, `timeout` as
# the backstop), so results are written even when a stage runs slow. Stage budgets (and the
# corpus size) scale with QUALITY_SESSION_S (560 s full, 240 s tiny = 1x); a shorter session
# (e.g. 420 s) still trains and evaluates both models, the EC model's eval then on tc, ec1.25
# and thr, with the 32-token composition over the first 64 tokens. Checkpoints stay in
# $QUALITY_WORK (default /tmp/quality_work); $OUT gets at most 6 files:
#   tc_quality.{json,md}  ec_quality.{json,md}  quality.png  session.log
#
# Routing path of the evals (--router-path auto; the "Routing path" line of each table says
# which ran): SGLang's own TopK with the plugin wherever `import sglang` works, else our dispatch
# function. The GPU machine has no sglang: a staged .gpuenv/ (../shared/gpu-sglang/README.md;
# carry it along) is installed in the background while the data is prepared (RUNS=none
# .gpuenv/device.sh, log in $QUALITY_WORK/device.log), and the evals then run with
# PYTHONPATH=/tmp/site:/tmp/plugsite:$PWD/python (the trainings never import sglang).
# QUALITY_SGLANG=0 skips the install; QUALITY_ROUTER_PATH=dispatch|sglang overrides auto.
#
# Batch invariance under SGLang's batch-invariant ops (issue 11, goal 2): when the SGLang
# install succeeded (use_sglang), both GPU evals also get --batch-invariant-ops: after the
# normal batch-invariance check they repeat it for tc, thr and ec1.25 inside SGLang's
# set_batch_invariant_mode(True) (eager experts, one sdpa backend; rows "invariance_bi", table
# "Batch invariance with SGLang's batch-invariant ops"). Not in QUALITY_TINY mode (CPU: the
# Triton kernels need CUDA); QUALITY_BI_OPS=0 leaves it out. No stage budget changes for it:
# the pass runs inside each eval's own --max-seconds cap (after the normal invariance check,
# before the routing timings and the decode composition, which the cap drops first), so the
# session's end time holds; a mode reached after the cap is listed as invariance_bi/<mode>.
#
# GPU (repo root, device tool with carry [".gpuenv"]):
#   export PYTHONPATH=$PWD/python SGLANG_MOE_EC_DISABLE_CUDA_EXT=1
#   bash benchmark/quality_session.sh
#   (SGLang's topk_softmax is timed too when sgl_kernel/sglang imports, or when the staged
#    .sgl_yardstick/ of benchmark/sglang_yardstick.py is carried along)
# CPU smoke:        QUALITY_TINY=1 OUT=/tmp/qs bash benchmark/quality_session.sh
set -u
export PYTHONPATH=${PYTHONPATH:-$PWD/python}
# the Triton EC kernel unless told otherwise (the CUDA extension's JIT build would cost each
# of the four Python processes its build/load time)
export SGLANG_MOE_EC_DISABLE_CUDA_EXT=${SGLANG_MOE_EC_DISABLE_CUDA_EXT:-1}
OUT=${OUT:-quality_out}
WORK=${QUALITY_WORK:-/tmp/quality_work}
PY=${PYTHON:-python3}
TINY=${QUALITY_TINY:-0}
ROUTER="--router-path ${QUALITY_ROUTER_PATH:-auto}"
mkdir -p "$OUT" "$WORK"
rm -rf "$WORK/tc" "$WORK/ec" "$WORK/tc_eval" "$WORK/ec_eval"
LOG="$OUT/session.log"
: > "$LOG"
T0=$(date +%s)
# stage budgets at the base session length (BASE_S); sc() scales them to SESSION_S
if [ "$TINY" = 1 ]; then
  BASE_S=240
  SESSION_S=${QUALITY_SESSION_S:-$BASE_S}
  sc() { echo $(( $1 * SESSION_S / BASE_S )); }
  TC_S=$(sc 40); EC_S=$(sc 35); PREP_CAP=$(sc 60); TC_EVAL_S=$(sc 70); EC_EVAL_S=$(sc 50)
  PREP_RESERVE=$(sc 200)
  COMMON="--tiny --device cpu --stop-reserve-s 3"
  DATA_ARGS=""
  EVAL_COMMON="--tiny --device cpu --eval-seqs 4 --inv-trials 2 --inv-prompts 1 --cal-iters 100"
  TC_EVAL_ARGS="--compositions 256:2x128,mixed256:2x128,32:4x8"
  EC_EVAL_ARGS="--compositions 256:2x128,32:4x8 --modes tc,ec1.25,thr --timing-tokens="
else
  BASE_S=560
  SESSION_S=${QUALITY_SESSION_S:-$BASE_S}
  sc() { echo $(( $1 * SESSION_S / BASE_S )); }
  TC_S=${QUALITY_TC_S:-$(sc 170)}; EC_S=${QUALITY_EC_S:-$(sc 205)}; PREP_CAP=$(sc 150)
  TC_EVAL_S=$(sc 170); EC_EVAL_S=$(sc 75); PREP_RESERVE=$(sc 200)
  COMMON=""
  # corpus size scales with the session too (prep time grows with it)
  DATA_ARGS="--max-code-mb $(( 30 * SESSION_S / BASE_S )) --max-prose-mb $(( 20 * SESSION_S / BASE_S ))"
  EVAL_COMMON=""
  SGL=""; [ -d .sgl_yardstick ] && SGL="--sglang-dir .sgl_yardstick"
  TC_EVAL_ARGS="--timing-compile $SGL"
  if [ "$SESSION_S" -ge "$BASE_S" ]; then
    EC_EVAL_ARGS="--modes tc,ec1.0,ec1.25,ec2.0,thr --timing-tokens="
  else  # shorter session: the modes that matter most, still with the 32-token composition
    # (decode over the first 64 tokens; ~60 s on an H200 with SGLang's import)
    EC_EVAL_S=$(( EC_EVAL_S > 60 ? EC_EVAL_S : 60 ))
    EC_EVAL_ARGS="--modes tc,ec1.25,thr --compositions 256:8x32,4096:8x512,32:32x1/64 --inv-prompts 2 --timing-tokens="
  fi
fi
END=$((T0 + SESSION_S))
left() { echo $(( END - $(date +%s) )); }
min() { if [ "$1" -lt "$2" ]; then echo "$1"; else echo "$2"; fi; }
say() { echo "[session +$(( $(date +%s) - T0 ))s] $*" | tee -a "$LOG"; }

TRAIN_PYTHONPATH=$PYTHONPATH  # the trainings never import sglang
say "start; session cap ${SESSION_S}s; tiny=$TINY; work $WORK; budgets: prep ${PREP_CAP}s, TC ${TC_S}s, EC ${EC_S}s, TC eval ${TC_EVAL_S}s, EC eval ${EC_EVAL_S}s"
{ nvidia-smi -L 2>/dev/null; $PY -c "import torch, transformers, tokenizers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'tokenizers', tokenizers.__version__, 'cuda', torch.cuda.is_available())"; } 2>&1 | tee -a "$LOG"

# 0. SGLang for the evals (GPU machine: the staged .gpuenv/), installed while the data is
#    prepared; only the evals run with it on their path (joined before the TC eval)
SGL_PID=""
if [ -d .gpuenv ] && [ "$TINY" != 1 ] && [ "${QUALITY_SGLANG:-1}" != 0 ]; then
  say "install SGLang in the background (.gpuenv/device.sh RUNS=none; log $WORK/device.log)"
  ( RUNS=none OUT=/tmp/gpuenv_out timeout 240 bash .gpuenv/device.sh > "$WORK/device.log" 2>&1 ) &
  SGL_PID=$!
fi
BI=""  # --batch-invariant-ops, set by use_sglang when SGLang installed
use_sglang() {  # after the install: the evals' environment (as gpu_serving_session.sh)
  [ -n "$SGL_PID" ] || return 0
  wait "$SGL_PID"; local rc=$?; SGL_PID=""
  grep -E "sgl_kernel check|installed into|cache restored" "$WORK/device.log" >> "$LOG"
  if [ $rc -eq 0 ]; then
    export PYTHONPATH=/tmp/site:/tmp/plugsite:$PWD/python
    export SGLANG_UNIFIED_RADIX_TREE_CORE_BACKEND=python
    export SGLANG_JIT_CACHE_DIR=/tmp/cache/sgl_jit TVM_FFI_CACHE_DIR=/tmp/cache/tvm_ffi
    [ "${QUALITY_BI_OPS:-1}" != 0 ] && BI="--batch-invariant-ops"
    say "SGLang installed: evals route through SGLang's TopK ($ROUTER)${BI:+; $BI}"
  else
    say "SGLang install FAILED rc=$rc (tail below): evals use the dispatch path"
    tail -n 15 "$WORK/device.log" | cut -c1-300 >> "$LOG"
  fi
}

# 1. corpus + tokenizer + token streams, once (cached for both trainings and the evals)
cap=$(min $PREP_CAP $(( $(left) - PREP_RESERVE )))
say "prepare data (cap ${cap}s)"
timeout "$cap" $PY benchmark/train_moe_lm.py --out "$WORK/prep" --prepare-only \
  --data-cache "$WORK/data" $COMMON $DATA_ARGS >> "$LOG" 2>&1
say "prepare data rc=$?"

# 2. token-choice model; keeps enough time for the EC model and both evals afterwards
budget=$(min $TC_S $(( $(left) - EC_S - EC_EVAL_S - 40 )))
say "train TC (${budget}s)"
timeout $(( budget + 90 )) $PY benchmark/train_moe_lm.py --out "$WORK/tc" --routing tc \
  --data-cache "$WORK/data" --stop-at $(( $(date +%s) + budget )) --max-minutes 1000 \
  $COMMON $DATA_ARGS >> "$LOG" 2>&1
say "train TC rc=$?"

# 3. TC eval in the background (same GPU) while the EC model trains; the EC eval still fits
use_sglang
budget=$(min $EC_S $(( $(left) - EC_EVAL_S - 35 )))
ecap=$(min $TC_EVAL_S $(( $(left) - EC_EVAL_S - 50 )))
say "eval TC in the background (cap ${ecap}s)"
timeout $(( ecap + 60 )) $PY benchmark/eval_routing_quality.py --ckpt "$WORK/tc" \
  --out "$WORK/tc_eval" --max-seconds "$ecap" $ROUTER $BI $EVAL_COMMON $TC_EVAL_ARGS \
  > "$WORK/tc_eval.log" 2>&1 &
TC_EVAL_PID=$!
# the EC model gets the TC model's step count as its horizon and stop (same tokens, same
# cosine schedule: item 5 compares the two at equal training); the time budget still caps it,
# and each model's "stopped: ... after N steps" line says what it got. Its budget is larger
# (205 s vs 170 s at 560 s): an EC step took ~155 ms on the H200 with the TC eval beside it,
# a TC step ~134 ms alone (docs/expert_choice.md, late night)
TC_STEPS=$(grep -o "stopped: [a-z_]* after [0-9]* steps" "$LOG" | tail -1 | sed 's/.* after \([0-9]*\) steps/\1/')
EC_STEPS=""; [ -n "$TC_STEPS" ] && EC_STEPS="--max-steps $TC_STEPS"
say "train EC (cf 1.25, ${budget}s${TC_STEPS:+, at most $TC_STEPS steps like TC})"
PYTHONPATH=$TRAIN_PYTHONPATH timeout $(( budget + 90 )) $PY benchmark/train_moe_lm.py --out "$WORK/ec" --routing ec \
  --ec-capacity-factor 1.25 --data-cache "$WORK/data" $EC_STEPS \
  --stop-at $(( $(date +%s) + budget )) --max-minutes 1000 $COMMON $DATA_ARGS >> "$LOG" 2>&1
say "train EC rc=$?"
wait $TC_EVAL_PID
say "eval TC rc=$?"
cat "$WORK/tc_eval.log" >> "$LOG"

# 4. EC model's eval with what is left
ecap=$(min $EC_EVAL_S $(( $(left) - 35 )))
say "eval EC (cap ${ecap}s)"
timeout $(( ecap + 25 )) $PY benchmark/eval_routing_quality.py --ckpt "$WORK/ec" \
  --out "$WORK/ec_eval" --max-seconds "$ecap" $ROUTER $BI $EVAL_COMMON $EC_EVAL_ARGS >> "$LOG" 2>&1
say "eval EC rc=$?"

# 5. results: tables, JSON, one plot of both models
for m in tc ec; do
  cp "$WORK/${m}_eval/routing_quality.json" "$OUT/${m}_quality.json" 2>/dev/null
  cp "$WORK/${m}_eval/routing_quality.md" "$OUT/${m}_quality.md" 2>/dev/null
done
timeout 30 $PY - "$OUT" >> "$LOG" 2>&1 <<'EOF'
import json, sys
from pathlib import Path
sys.path.insert(0, "benchmark")
import eval_routing_quality as erq
out = Path(sys.argv[1])
res = [(r["label"], r) for r in (json.loads((out / f"{m}_quality.json").read_text())
                                 for m in ("tc", "ec") if (out / f"{m}_quality.json").is_file())
       if r["rows"]]
if res:
    erq.plot(res, out / "quality.png")
    print("[session] plot", out / "quality.png")
EOF
say "done; files: $(ls "$OUT" | tr '\n' ' ')"
tail -n 120 "$OUT/tc_quality.md" "$OUT/ec_quality.md" 2>/dev/null | cut -c1-220
