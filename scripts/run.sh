#!/usr/bin/env bash
# Set-up and the main job: distills the built-in teacher (SmolLM2-135M-Instruct) into a
# 12-layer student on the built-in WordNet definitions, evaluating before and after, and
# prints the results table. Extra arguments go to `distillm train`: config overrides such as
# train.max_steps=20, or --overwrite to replace the run of an earlier call.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
distillm train "$@"
