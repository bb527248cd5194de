#!/usr/bin/env bash
# The test command: set up, then the C++ sanitizer tests, then pytest
# (tests/gpu skips itself without a usable GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/sanitize.sh
# CI and this machine can make private network namespaces, and setup.sh installed Mooncake: the
# API-server and store tests must not skip.
HOSTCACHE_REQUIRE_NETNS=${HOSTCACHE_REQUIRE_NETNS:-1} HOSTCACHE_REQUIRE_STORE=${HOSTCACHE_REQUIRE_STORE:-1} \
  python3 -m pytest -q tests "$@"
