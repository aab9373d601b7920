#!/usr/bin/env bash
# The GPU measurements of bench/RESULTS.md, in two parts that each fit a 10-minute call.
#   OUT=/tmp/gpu bash bench/gpu_session.sh speed     # step speed (GPT-2, 1B) and throughput
#   OUT=/tmp/gpu bash bench/gpu_session.sh scaling   # the four-size comparison
# Every section runs even if an earlier one failed; logs and JSON go to $OUT.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
log() { echo "== $(date +%T) $*"; }
exec > >(tee "$OUT/${1:-usage}.log") 2>&1

if [ "${1:-}" = speed ]; then
  { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    $PY -c "import torch, platform; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'python', platform.python_version())"
  } 2>&1
  # synthetic GPT-2 shards on the CPU while the GPU times optimizer steps
  $PY bench/synthetic_shards.py /tmp/synthetic --train-tokens 16000000 > /tmp/shards.log 2>&1
  cat /tmp/shards.log
  for optimizer in normuon adamw; do
    log "train_gpt.py --preset gpt2, $optimizer"
    timeout 110 $PY train_gpt.py --preset gpt2 --data-dir /tmp/synthetic --max-steps 25 \
        --val-every 1000 --val-tokens 524288 --optimizer "$optimizer" \
        --out-dir "/tmp/throughput_$optimizer" 2>&1 | tr '\r' '\n' | grep -E "step|done|Error|error" \
        | grep -v -E "it/s|s/it" | tail -8
    cp "/tmp/throughput_$optimizer/log.jsonl" "$OUT/throughput_$optimizer.jsonl"
  done
  log "optimizer step, GPT-2 124M matrices"
  timeout 130 $PY bench/optimizer_step.py --shapes gpt2 --device cuda --rounds 10 --warmup 3 \
      --json "$OUT/step_gpt2.json" 2>&1
  log "optimizer step, width 2048 x 24 layers (eager)"
  timeout 60 $PY bench/optimizer_step.py --shapes 1b --device cuda --rounds 5 --warmup 2 \
      --no-compile --json "$OUT/step_1b.json" 2>&1
  log done
elif [ "${1:-}" = scaling ]; then
  log "scaling: four sizes"
  # bounded so that the results are packed before the call's limit; finished runs are kept in
  # the tarball, and a later call can resume from them (unpack into /tmp first)
  [ -f "${SCALING_RESUME:-}" ] && tar xzf "$SCALING_RESUME" -C /tmp
  timeout "${SCALING_LIMIT:-520}" $PY bench/scaling.py --device cuda --jobs 4 \
      --out-dir /tmp/scaling 2>&1 | grep -v -E "runs trained"
  tar czf "$OUT/scaling.tgz" -C /tmp scaling
  log done
else
  echo "usage: bench/gpu_session.sh speed|scaling" >&2
  exit 2
fi
