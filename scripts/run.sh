#!/usr/bin/env bash
# Set-up and the main job. Until the trainer lands, the main job is the skew-KL benchmark:
# fused kernel against the eager and torch.compile references, table on stdout, JSON in
# benchmarks/results/. Extra arguments go to the benchmark (e.g. --shapes 256x32000).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
python benchmarks/bench_skew_kl.py "$@"
