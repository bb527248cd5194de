#!/usr/bin/env bash
# Everything a lent GPU machine should do, in one call (bare machine, no network):
# install carried wheels (.whl/, made beforehand by scripts/prepare_gpu_wheels.sh;
# README "GPU runs"), build with CUDA, check that LMDeploy and the patch import,
# build the tiny test model, run the GPU and CPU tests (LMDeploy engine and API
# server included), run the micro benchmark, and write a report under $OUT
# (default results/gpu). Each step runs even if an earlier one failed; the
# exit code is the first failure's. Every step has a time limit, so the whole
# run ends inside GPU_ALL_BUDGET_S (default 560 s; the device tool allows 600).
#
# $OUT gets 8 files at most (the device tool brings back 8): machine.log,
# setup.log (wheels, import checks, tiny model), build.log, build_info.json,
# pytest.log, micro.log, micro.json, report.md.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
BUDGET=${GPU_ALL_BUDGET_S:-560}
export HOSTCACHE_TINY_MODEL=${HOSTCACHE_TINY_MODEL:-/tmp/hc-tiny}
status=0
: > "$OUT/setup.log"
left() { echo $((BUDGET - SECONDS)); }
step() {  # step NAME LIMIT_S CMD...: run under a time limit, append to $OUT/NAME.log, remember the first failure
  local name=$1 limit=$2; shift 2
  [ "$limit" -gt "$(left)" ] && limit=$(left)
  if [ "$limit" -lt 5 ]; then
    echo "== $name: skipped, out of time" | tee -a "$OUT/$name.log"
    [ $status -eq 0 ] && status=124
    return 0
  fi
  local t0=$SECONDS from
  echo "== $name (limit ${limit} s): $*" | tee -a "$OUT/$name.log"
  from=$(($(wc -l < "$OUT/$name.log") + 1))
  timeout -k 10 "$limit" "$@" >> "$OUT/$name.log" 2>&1
  local rc=$?
  tail -n "+$from" "$OUT/$name.log" | tail -n 25   # this step's output only
  echo "== $name: rc=$rc in $((SECONDS - t0)) s" | tee -a "$OUT/$name.log"
  [ $rc -ne 0 ] && [ $status -eq 0 ] && status=$rc
  return 0
}

{ nvidia-smi; nvcc --version; "$PY" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"; } \
  > "$OUT/machine.log" 2>&1
if ! "$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))'; then
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
# sm_90 only: the H100/H200 this runs on, and half the compile time.
: > "$OUT/build.log"
step build 300 "$PY" -m pip install --no-build-isolation --no-deps --no-index -v . \
  -C cmake.define.CMAKE_CUDA_ARCHITECTURES=90 -C build-dir=/tmp/hostcache-build
"$PY" -c "import json, lmdeploy_hostcache as h; print(json.dumps(h.build_info()))" > "$OUT/build_info.json" 2>&1
cat "$OUT/build_info.json"
# LMDeploy, its API-server stack and the patch import in a fresh interpreter; the CLI knows --host-cache.
step setup 90 "$PY" -c "
import lmdeploy, lmdeploy_patch, lmdeploy.pytorch.engine.engine, lmdeploy.serve.openai.api_server, openai, xgrammar
from lmdeploy import PytorchEngineConfig
print('lmdeploy', lmdeploy.__version__, 'from', lmdeploy.__file__)
print('patch', lmdeploy_patch.status())
print('host_cache_ratio field:', PytorchEngineConfig(host_cache_ratio=2.0).host_cache_ratio)"
step setup 60 bash -c "'$PY' -m lmdeploy serve api_server --help | grep -E -- '--host-cache|--num-gpu-blocks'"
step setup 120 "$PY" tests/engine/tiny_model.py "$HOSTCACHE_TINY_MODEL"
# GPU tests and the engine tests (GPU mode: no shim; a missing GPU fails them)
# first, they matter most here; then the CPU suite. Keep 45 s for the benchmark
# and report. Not yet timed on a GPU: the engine step's 300 s is a guess.
export HOSTCACHE_EXPECT_GPU=1
per_test=()
"$PY" -c "import pytest_timeout" 2>/dev/null && per_test=(--timeout=280)
: > "$OUT/pytest.log"
step pytest 300 "$PY" -m pytest -q -rfEs --durations=30 ${per_test[@]+"${per_test[@]}"} -p no:cacheprovider \
  tests/gpu tests/engine
step pytest $(( $(left) - 45 )) "$PY" -m pytest -q -rfEs --durations=10 -p no:cacheprovider \
  tests --ignore=tests/gpu --ignore=tests/engine
: > "$OUT/micro.log"
step micro 120 "$PY" benchmark/micro.py --json "$OUT/micro.json"
{
  echo "# GPU run $(date -u +%F)"
  echo; echo '```'; head -n 12 "$OUT/machine.log"; echo '```'
  echo; echo "build: $(cat "$OUT/build_info.json")"
  echo; echo "## setup"; echo '```'; grep -E '^(== |lmdeploy |patch |host_cache|/tmp/)|--host-cache ' "$OUT/setup.log" | head -n 30; echo '```'
  echo; echo "## pytest"; echo '```'; grep -E '^(FAILED|ERROR|SKIPPED)' "$OUT/pytest.log" | head -n 30
  sed -n '/= run notes =/,/= slowest/p' "$OUT/pytest.log" | head -n 40
  grep -E '^== pytest: rc|^[0-9]+ (passed|failed|skipped|error)|^=+ .*(passed|failed|error).* =+$' "$OUT/pytest.log"; echo '```'
  echo; echo "## micro"; echo '```'; cat "$OUT/micro.log"; echo '```'
  echo; echo "total: $SECONDS s, exit $status"
} > "$OUT/report.md"
exit $status
