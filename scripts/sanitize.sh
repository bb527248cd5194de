#!/usr/bin/env bash
# Builds the C++ core tests under ASan+UBSan and under TSan (CPU build) and
# runs them through CTest. Fails on the first failing build or test.
set -euo pipefail
cd "$(dirname "$0")/.."
for san in address,undefined thread; do
  dir=build/sanitize-${san/,/-}
  cmake -S . -B "$dir" -G Ninja -DCMAKE_BUILD_TYPE=Debug -DHOSTCACHE_CUDA=OFF -DHOSTCACHE_PYTHON=OFF \
    -DHOSTCACHE_TESTS=ON -DHOSTCACHE_SANITIZE="$san" > "$dir.configure.log" 2>&1 || { cat "$dir.configure.log"; exit 1; }
  cmake --build "$dir" -j "$(nproc)"
  UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 ASAN_OPTIONS=detect_leaks=1 TSAN_OPTIONS=halt_on_error=1 \
    ctest --test-dir "$dir" --output-on-failure
done
