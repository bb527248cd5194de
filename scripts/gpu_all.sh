#!/usr/bin/env bash
# Everything a lent GPU machine should do, in one call (bare machine, no network):
# install carried wheels (.whl/, made beforehand by scripts/prepare_gpu_wheels.sh;
# README "GPU runs"), build with CUDA (mandatory), check that a GPU is usable and
# that host memory can be pinned, run the GPU tests and the engine tests (GPU mode),
# then the micro benchmark and, with the time left, trimmed multi-turn and
# long-context server comparisons on a Llama-3-8B-shaped model, and write a report
# under $OUT (default results/gpu). Every step has a time limit and its own log,
# written as it runs; the whole run ends inside GPU_ALL_BUDGET_S (default 560 s;
# the device tool allows 600). The exit code is the first failing step's, or 124
# when a step was cut for time: a run that failed cannot look green.
#
# $OUT gets 8 files at most (the device tool brings back 8): machine.log,
# setup.log (wheels, import checks, pinning probe, tiny model), build.log,
# build_info.json, pytest.log, micro.log, micro.json, report.md (failures first).
#
# GPU_ALL_DRY_RUN=1: the script's own logic without a GPU (CI runs it,
# tests/test_gpu_all_script.py): no wheels, no CUDA requirement, no GPU checks,
# the tests in GPU_ALL_DRY_RUN_TESTS (default: two quick files), micro --quick,
# a tiny model built in the background and a short replay in place of the comparisons.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
BUDGET=${GPU_ALL_BUDGET_S:-560}
DRY=${GPU_ALL_DRY_RUN:-0}
export HOSTCACHE_TINY_MODEL=${HOSTCACHE_TINY_MODEL:-/tmp/hc-tiny}
status=0
problems=()   # one line per failed or cut step, for the report's first section
for f in machine setup build pytest micro; do : > "$OUT/$f.log"; done
left() { echo $((BUDGET - SECONDS)); }
step() {  # step NAME LIMIT_S CMD...: run under a time limit, tee to $OUT/NAME.log as it runs
  local name=$1 limit=$2; shift 2
  [ "$limit" -gt "$(left)" ] && limit=$(left)
  if [ "$limit" -lt 5 ]; then
    echo "== $name: not run, out of time: $*" | tee -a "$OUT/$name.log"
    problems+=("$name: not run (out of time): $*")
    [ $status -eq 0 ] && status=124
    return 0
  fi
  local t0=$SECONDS
  echo "== $name (limit ${limit} s): $*" | tee -a "$OUT/$name.log"
  timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$OUT/$name.log" | tail -n 25
  local rc=${PIPESTATUS[0]}
  echo "== $name: rc=$rc in $((SECONDS - t0)) s" | tee -a "$OUT/$name.log"
  if [ "$rc" -ne 0 ]; then
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then problems+=("$name: cut at its ${limit} s limit: $*")
    else problems+=("$name: failed (rc=$rc): $*"); fi
    [ $status -eq 0 ] && status=$rc
  fi
  return 0
}

{
  date -u; uname -a; echo "cpus: $(nproc)"; head -n 5 /proc/meminfo
  if [ "$DRY" != 1 ]; then
    nvidia-smi --query-gpu=name,driver_version,compute_mode,pcie.link.gen.current,pcie.link.gen.max,pcie.link.width.current,memory.total --format=csv
    nvidia-smi; nvcc --version
  fi
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name())"
} >> "$OUT/machine.log" 2>&1

if [ "$DRY" = 1 ]; then
  echo "== dry run: no wheels installed" | tee -a "$OUT/setup.log"
elif ! "$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))'; then
  echo "== .whl/ holds cp312 wheels; $("$PY" -V 2>&1) cannot install them: not installed" | tee -a "$OUT/setup.log"
elif compgen -G ".whl/*.whl" > /dev/null; then
  step setup 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  # LMDeploy and its light dependencies from /tmp/site; our package goes into the
  # interpreter's own site-packages (next step), whose .pth activates the patch.
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  export PATH=/tmp/site/bin:$PATH
else
  echo "== no .whl/: LMDeploy tests will skip unless LMDeploy is already installed" | tee -a "$OUT/setup.log"
fi

if [ "$DRY" = 1 ]; then
  step build 30 "$PY" -c "import lmdeploy_hostcache"  # installed by scripts/setup.sh
else
  # sm_90 only: the H100/H200 this runs on, and half the compile time. CUDA is mandatory.
  step build 300 "$PY" -m pip install --no-build-isolation --no-deps --no-index -v . \
    -C cmake.define.CMAKE_CUDA_ARCHITECTURES=90 -C cmake.define.HOSTCACHE_REQUIRE_CUDA=ON \
    -C build-dir=/tmp/hostcache-build
fi
"$PY" -c "import json, lmdeploy_hostcache as h; print(json.dumps(h.build_info()))" > "$OUT/build_info.json" 2>&1
cat "$OUT/build_info.json"
if [ "$DRY" != 1 ]; then
  export HOSTCACHE_EXPECT_GPU=1  # GPU tests and engine tests fail, not skip, without a usable GPU
  step setup 30 "$PY" -c "
import json, sys
info = json.load(open('$OUT/build_info.json'))
print(info)
sys.exit(0 if info.get('build') == 'cuda' and info.get('gpu_usable') else 'not a CUDA build with a usable GPU')"
  # Can host memory be pinned here (some sandboxes refuse cudaHostRegister)? The
  # whole tier rests on it: register a 64 MiB pool eagerly, and try a pinned allocation.
  step setup 60 "$PY" -c "
import torch
from lmdeploy_hostcache import HostCacheConfig, SlotStore
pool = torch.zeros(4, 64, 65536, dtype=torch.uint8, device='cuda')
store = SlotStore.from_tensors(HostCacheConfig(capacity_bytes=64 << 20, pin='eager', reserve_bytes=0), [pool], block_dim=1)
s = store.stats()
print('pinning probe: cudaHostRegister of the arena:', 'REFUSED: ' + s['register_error'] if s['register_error'] else 'ok')
print('pinning probe: the pool pins by', s['pin_method'], '| pinned', s['pinned'], s['pin_error'], '| engine', s['copy_engine'])
try:
    torch.empty(64 << 20, dtype=torch.uint8, pin_memory=True); print('pinning probe: pinned allocation (cudaHostAlloc): ok')
except Exception as e:
    print('pinning probe: pinned allocation REFUSED:', e)"
fi
# LMDeploy, its API-server stack and the patch import in a fresh interpreter; the CLI knows --host-cache.
step setup 90 "$PY" -c "
import lmdeploy, lmdeploy_patch, lmdeploy.pytorch.engine.engine, lmdeploy.serve.openai.api_server, openai, xgrammar
from lmdeploy import PytorchEngineConfig
print('lmdeploy', lmdeploy.__version__, 'from', lmdeploy.__file__)
print('patch', lmdeploy_patch.status())
print('host_cache_ratio field:', PytorchEngineConfig(host_cache_ratio=2.0).host_cache_ratio)"
step setup 60 bash -c "'$PY' -m lmdeploy serve api_server --help | grep -E -- '--host-cache|--num-gpu-blocks'"
step setup 120 "$PY" tests/engine/tiny_model.py "$HOSTCACHE_TINY_MODEL"

# The 8B-shaped model for the end-to-end comparison is drawn (on the GPU) and
# written in the background while the tests run: it takes about a minute
# that the budget cannot spare. Its log joins micro.log when it is waited for.
BIG=/tmp/hc-llama3-8b-shape
BIG_LOG=$BIG.build.log
if [ "$DRY" = 1 ]; then
  BIG=$HOSTCACHE_TINY_MODEL-bg
  big_cmd=("$PY" tests/engine/tiny_model.py "$BIG")
else
  big_cmd=("$PY" tests/engine/tiny_model.py "$BIG" --llama3-8b-shape --corpus .whl/sharegpt_sample.json)
fi
( timeout -k 10 300 "${big_cmd[@]}" > "$BIG_LOG" 2>&1; echo "model build rc=$?" >> "$BIG_LOG" ) &
big_pid=$!
# A run cut short must not leave the build behind (timeout passes the TERM on).
trap 'pkill -TERM -P $big_pid 2>/dev/null; kill $big_pid 2>/dev/null' EXIT

per_test=()
"$PY" -c "import pytest_timeout" 2>/dev/null && per_test=(--timeout=200)
if [ "$DRY" = 1 ]; then
  read -r -a dry_tests <<< "${GPU_ALL_DRY_RUN_TESTS:-tests/test_build_info.py tests/test_layers.py}"
  step pytest 120 "$PY" -m pytest -q -rfEs -p no:cacheprovider "${dry_tests[@]}"
else
  # What only a GPU can check: the GPU tests, the engine tests in GPU mode and
  # the two CPU files that read the build's device facts. The rest of the suite
  # is CPU-only and runs in CI (.ci/run), so it has no place in this budget.
  # Not yet timed on a GPU: the 280 s is a guess.
  step pytest 280 "$PY" -m pytest -q -rfEs --durations=30 ${per_test[@]+"${per_test[@]}"} -p no:cacheprovider \
    tests/gpu tests/engine tests/test_build_info.py tests/test_errors.py
fi
# The background build must be done (and have worked) before micro, whose
# copy bandwidth it would share, and before the comparison that needs it.
step micro 120 bash -c "while kill -0 $big_pid 2>/dev/null; do sleep 1; done; cat '$BIG_LOG'; grep -q '^model build rc=0$' '$BIG_LOG'"
if [ "$DRY" = 1 ]; then
  step micro 60 "$PY" benchmark/micro.py --quick --json "$OUT/micro.json"
else
  step micro 90 "$PY" benchmark/micro.py --json "$OUT/micro.json"
fi
# Last, with whatever time is left (reported as not run when too little), the
# trimmed end-to-end comparisons, tier off vs on, int4 KV: multi-turn chat, then
# long context (16K-token documents, a GPU cache that holds about one and a
# half). Their tables go to micro.log (8 files come back); JSON, plots and
# server logs stay on the machine. Pinned eagerly: lazy registration would land
# inside the timed runs.
BENCH=/tmp/hc-bench
if [ "$DRY" = 1 ]; then
  step micro 60 "$PY" benchmark/multiturn.py --replay --quiet --users 8 --concurrency 4 --max-turns 2 \
    --json "$BENCH/replay.json"
else
  step micro $(( $(left) * 3 / 5 )) env HOSTCACHE_PIN=eager "$PY" benchmark/multiturn.py --server "$BIG" --compare \
    --quiet --data .whl/sharegpt_sample.json --users 24 --concurrency 12 --think-s 1 --max-turns 3 \
    --max-reply-tokens 32 --quant-policy 4 --server-gpu-blocks 256 --host-ratio 8 --log-dir "$BENCH" \
    --json "$BENCH/multiturn.json"
  step micro $(( $(left) - 15 )) env HOSTCACHE_PIN=eager "$PY" benchmark/multiturn.py --server "$BIG" --compare \
    --quiet --scenario long-context --data .whl/sharegpt_sample.json --docs 3 --doc-tokens 16384 --users 6 \
    --concurrency 6 --think-s 1 --max-turns 2 --max-reply-tokens 16 --quant-policy 4 --server-gpu-blocks 384 \
    --host-ratio 8 --log-dir "$BENCH" --json "$BENCH/long-context.json"
fi

{
  echo "# GPU run $(date -u +%F)$( [ "$DRY" = 1 ] && echo ' (dry run, no GPU)')"
  echo
  if [ ${#problems[@]} -eq 0 ] && ! grep -qE '^(FAILED|ERROR) ' "$OUT/pytest.log"; then
    echo "## failures: none"
  else
    echo "## failures"
    for p in "${problems[@]+"${problems[@]}"}"; do echo "- $p"; done
    grep -E '^(FAILED|ERROR) ' "$OUT/pytest.log" | head -n 40 | sed 's/^/- /'
  fi
  echo; echo "exit $status after $SECONDS s"
  echo; echo "## figures"; echo '```'; cat "$OUT/micro.log"; echo '```'
  echo; echo "## pytest"; echo '```'
  grep -E '^== pytest|^SKIPPED|^[0-9]+ (passed|failed|skipped|error)|^=+ .*(passed|failed|error).* =+$' "$OUT/pytest.log"
  sed -n '/= run notes =/,/= slowest/p' "$OUT/pytest.log" | head -n 40
  echo '```'
  echo; echo "## machine"; echo '```'; head -n 20 "$OUT/machine.log"; echo '```'
  echo; echo "build: $(cat "$OUT/build_info.json")"
  echo; echo "## setup"; echo '```'; grep -E '^(== |lmdeploy |patch |host_cache|pinning probe|/tmp/)|--host-cache ' "$OUT/setup.log" | head -n 30; echo '```'
} > "$OUT/report.md"
exit $status
