#!/usr/bin/env bash
# The test command: set up, then the C++ sanitizer tests, then pytest
# (tests/gpu skips itself without a usable GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/sanitize.sh
python3 -m pytest -q tests "$@"
