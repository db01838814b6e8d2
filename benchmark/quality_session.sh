#!/usr/bin/env bash
# Issue 11 in ONE device call (default 560 s wall clock, one H200): corpus + tokenizer once
# (process pool), a token-choice-trained Qwen3-MoE (~3.5 min), an expert-choice-trained one
# (~2.5 min; the TC model's routing-quality eval runs on the same GPU meanwhile), the EC
# model's eval, and one plot of both. Every stage is capped from the session's end time
# (train_moe_lm --stop-at, eval_routing_quality --max-seconds, `timeout` as the backstop),
# so results are written even when a stage runs slow. Checkpoints stay in $QUALITY_WORK
# (default /tmp/quality_work); $OUT gets at most 6 files:
#   tc_quality.{json,md}  ec_quality.{json,md}  quality.png  session.log
#
# GPU (repo root):  export PYTHONPATH=$PWD/python SGLANG_MOE_EC_DISABLE_CUDA_EXT=1
#                   bash benchmark/quality_session.sh
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
mkdir -p "$OUT" "$WORK"
rm -rf "$WORK/tc" "$WORK/ec" "$WORK/tc_eval" "$WORK/ec_eval"
LOG="$OUT/session.log"
: > "$LOG"
T0=$(date +%s)
if [ "$TINY" = 1 ]; then
  SESSION_S=${QUALITY_SESSION_S:-240}
  TC_S=40; EC_S=35; PREP_CAP=60; TC_EVAL_S=70; EC_EVAL_S=50
  COMMON="--tiny --device cpu --stop-reserve-s 3"
  DATA_ARGS=""
  EVAL_COMMON="--tiny --device cpu --eval-seqs 4 --inv-trials 2 --inv-prompts 1 --cal-iters 100"
  TC_EVAL_ARGS="--compositions 256:2x128,mixed256:2x128,32:4x8"
  EC_EVAL_ARGS="--compositions 256:2x128,32:4x8 --modes tc,ec1.25,thr --timing-tokens="
else
  SESSION_S=${QUALITY_SESSION_S:-560}
  TC_S=${QUALITY_TC_S:-215}; EC_S=${QUALITY_EC_S:-160}; PREP_CAP=150; TC_EVAL_S=170; EC_EVAL_S=75
  COMMON=""
  DATA_ARGS="--max-code-mb 30 --max-prose-mb 20"
  EVAL_COMMON=""
  SGL=""; [ -d .sgl_yardstick ] && SGL="--sglang-dir .sgl_yardstick"
  TC_EVAL_ARGS="--timing-compile $SGL"
  EC_EVAL_ARGS="--modes tc,ec1.0,ec1.25,ec2.0,thr --timing-tokens="
fi
END=$((T0 + SESSION_S))
left() { echo $(( END - $(date +%s) )); }
min() { if [ "$1" -lt "$2" ]; then echo "$1"; else echo "$2"; fi; }
say() { echo "[session +$(( $(date +%s) - T0 ))s] $*" | tee -a "$LOG"; }

say "start; session cap ${SESSION_S}s; tiny=$TINY; work $WORK"
{ nvidia-smi -L 2>/dev/null; $PY -c "import torch, transformers, tokenizers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'tokenizers', tokenizers.__version__, 'cuda', torch.cuda.is_available())"; } 2>&1 | tee -a "$LOG"

# 1. corpus + tokenizer + token streams, once (cached for both trainings and the evals)
cap=$(min $PREP_CAP $(( $(left) - 200 )))
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
budget=$(min $EC_S $(( $(left) - EC_EVAL_S - 35 )))
ecap=$(min $TC_EVAL_S $(( $(left) - EC_EVAL_S - 50 )))
say "eval TC in the background (cap ${ecap}s)"
timeout $(( ecap + 60 )) $PY benchmark/eval_routing_quality.py --ckpt "$WORK/tc" \
  --out "$WORK/tc_eval" --max-seconds "$ecap" $EVAL_COMMON $TC_EVAL_ARGS \
  > "$WORK/tc_eval.log" 2>&1 &
TC_EVAL_PID=$!
say "train EC (cf 1.25, ${budget}s)"
timeout $(( budget + 90 )) $PY benchmark/train_moe_lm.py --out "$WORK/ec" --routing ec \
  --ec-capacity-factor 1.25 --data-cache "$WORK/data" \
  --stop-at $(( $(date +%s) + budget )) --max-minutes 1000 $COMMON $DATA_ARGS >> "$LOG" 2>&1
say "train EC rc=$?"
wait $TC_EVAL_PID
say "eval TC rc=$?"
cat "$WORK/tc_eval.log" >> "$LOG"

# 4. EC model's eval with what is left
ecap=$(min $EC_EVAL_S $(( $(left) - 35 )))
say "eval EC (cap ${ecap}s)"
timeout $(( ecap + 25 )) $PY benchmark/eval_routing_quality.py --ckpt "$WORK/ec" \
  --out "$WORK/ec_eval" --max-seconds "$ecap" $EVAL_COMMON $EC_EVAL_ARGS >> "$LOG" 2>&1
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
