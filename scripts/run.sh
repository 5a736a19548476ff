#!/usr/bin/env bash
# Set-up and the main job: distills the built-in teacher (SmolLM2-135M-Instruct) into a
# 12-layer student on the built-in WordNet definitions, evaluating before and after, and
# prints the results table. Extra arguments are config overrides, e.g. train.max_steps=20.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
distillm train "$@"
