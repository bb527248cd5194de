#!/usr/bin/env bash
# The multi-turn benchmark on a GPU, in one call after scripts/gpu_all.sh has
# installed everything on the same (still warm) machine: a random-weight
# Llama-3-8B-shaped model with a BPE tokenizer trained on the carried ShareGPT
# sample, then `benchmark/multiturn.py --server --compare` (api_servers with
# the tier off and on, same GPU cache and seed), int4 KV. Writes
# multiturn.json, its plots and the servers' logs under $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
[ -d /tmp/site ] && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
MODEL=${MODEL:-/tmp/hc-llama3-8b-shape}
DATA=${DATA:-.whl/sharegpt_sample.json}

timeout 240 "$PY" tests/engine/tiny_model.py "$MODEL" --llama3-8b-shape --corpus "$DATA" || exit 1
# Pin the host pool at start-up: lazy chunk registration would land inside the timed runs.
HOSTCACHE_PIN=eager timeout 540 "$PY" benchmark/multiturn.py --server "$MODEL" --compare --data "$DATA" \
  --users "${USERS:-64}" --concurrency "${CONCURRENCY:-32}" --think-s "${THINK_S:-5}" \
  --max-turns 4 --max-reply-tokens "${REPLY_TOKENS:-128}" --quant-policy 4 --server-gpu-blocks "${GPU_BLOCKS:-256}" \
  --host-ratio 8 --max-batches 64 --log-dir "$OUT" --json "$OUT/multiturn.json" 2>&1 | tee "$OUT/multiturn.log"
