#!/usr/bin/env bash
# The main job on a default that needs no GPU: set up, then replay real
# ShareGPT conversations through LMDeploy's real scheduler with the host tier
# off and on, print the table, write results/multiturn.json and its plots.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
mkdir -p results
python3 benchmark/multiturn.py --replay --json results/multiturn.json "$@"
