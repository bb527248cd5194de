#!/usr/bin/env bash
# Everything a lent GPU machine should do, in one call (bare machine, no network):
# install carried wheels (.whl/, see README "GPU runs"), build with CUDA, run the
# GPU and CPU tests, run the benchmarks, and write a report under $OUT
# (default results/gpu). Each step runs even if an earlier one failed; the
# exit code is the first failure's.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
status=0
step() {  # step NAME CMD...: run, log to $OUT/NAME.log, remember the first failure
  local name=$1; shift
  echo "== $name: $*"
  local t0=$SECONDS
  "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "== $name: rc=$rc in $((SECONDS - t0)) s"
  tail -n 25 "$OUT/$name.log"
  [ $rc -ne 0 ] && [ $status -eq 0 ] && status=$rc
  return 0
}

{ nvidia-smi; nvcc --version; "$PY" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"; } \
  > "$OUT/machine.log" 2>&1
if compgen -G ".whl/*.whl" > /dev/null; then
  step wheels "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# sm_90 only: the H100/H200 this runs on, and half the compile time.
step build "$PY" -m pip install --no-build-isolation --no-deps --no-index -v . \
  -C cmake.define.CMAKE_CUDA_ARCHITECTURES=90 -C build-dir=/tmp/hostcache-build
"$PY" -c "import json, lmdeploy_hostcache as h; print(json.dumps(h.build_info()))" > "$OUT/build_info.json" 2>&1
cat "$OUT/build_info.json"
step pytest "$PY" -m pytest -q -rs tests/gpu tests
step micro "$PY" benchmark/micro.py --json "$OUT/micro.json"
{
  echo "# GPU run $(date -u +%F)"
  echo; echo '```'; head -n 12 "$OUT/machine.log"; echo '```'
  echo; echo "build: $(cat "$OUT/build_info.json")"
  echo; echo "## pytest"; echo '```'; tail -n 15 "$OUT/pytest.log"; echo '```'
  echo; echo "## micro"; echo '```'; cat "$OUT/micro.log"; echo '```'
} > "$OUT/report.md"
exit $status
