#!/usr/bin/env bash
# The main job on a default that needs no GPU: set up, then the quick micro
# benchmark, printing a table and writing results/micro.json.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
mkdir -p results
python3 benchmark/micro.py --quick --json results/micro.json "$@"
