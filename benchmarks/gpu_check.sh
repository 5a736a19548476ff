#!/usr/bin/env bash
# The checks for a lent GPU machine (no network; torch preinstalled there), in steps that each
# fit one short device call, most important first:
#
#   bash benchmarks/gpu_check.sh build     # build from source for sm_90 (reused by later steps)
#   bash benchmarks/gpu_check.sh tests     # the test suite, CUDA included
#   bash benchmarks/gpu_check.sh target    # the target rows alone, bf16: fused-linear 8192 tokens x
#                                          # 4096 hidden x 128256 first, then skew_kl fwd+bwd 8192x128256
#                                          # (dense, eager, and skew_kl_topk at K = 32)
#   bash benchmarks/gpu_check.sh rest      # replay buffer and the remaining benchmark shapes
#   bash benchmarks/gpu_check.sh margin    # the gradient's error margin on the real MUFU
#   bash benchmarks/gpu_check.sh all       # all five, in that order
#
# Results land in $OUT (default /tmp/distillm_gpu_check). Bandwidth is reported as a fraction
# of the copy bandwidth measured on the same device, not of a datasheet figure.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/distillm_gpu_check}
mkdir -p "$OUT"
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}

build() {
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
  python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/gpu.txt"
  TORCH_CUDA_ARCH_LIST="9.0" MAX_JOBS=$(nproc) python -m pip install --no-build-isolation --no-deps -e . \
    > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
  python -c "import distillm_ext; print(distillm_ext.build_info())" | tee -a "$OUT/gpu.txt"
}

tests() {
  local ignore=()
  if ! python -c "import transformers, datasets, rouge_score, matplotlib" 2>/dev/null; then
    echo "trainer dependencies missing on this machine (no network): skipping python_tests/recipe"
    ignore+=(--ignore python_tests/recipe)
  fi
  # The CPU copies, the packaging (it installs from a registry) and the libtorch CMake build
  # have nothing to do with the GPU, and take minutes of the lease.
  ignore+=(--ignore python_tests/ops/test_cpu_capabilities.py --ignore python_tests/ops/test_packaging.py
           --ignore python_tests/ops/test_cpp_build.py)
  # A failing test must not cost the benchmark steps: report and go on.
  python -m pytest -q python_tests -m "not slow" "${ignore[@]}" 2>&1 | tee "$OUT/tests.txt" | tail -15 \
    || echo "TESTS FAILED (see $OUT/tests.txt)"
}

margin() {
  # How much of the float64 bound the real MUFU errors use, beside the emulation's worst case
  # (benchmarks/RESULTS.md).
  for direction in --reverse --no-reverse; do
    python benchmarks/gradient_error_margin.py --device cuda "$direction" 2>&1 | tee -a "$OUT/error_margin.txt" \
      || echo "ERROR MARGIN FAILED"
  done
}

target() {
  python benchmarks/bench_fused_linear.py --devices cuda --dtypes bfloat16 --skip-step \
    --impls fused_linear logits+skew_kl logits+eager --warmup 2 --reps 5 --out "$OUT/bench_fused_linear.json" \
    2>&1 | grep -v -i warn | tee "$OUT/bench_fused_linear.txt" || echo "FUSED-LINEAR BENCHMARK FAILED"
  python benchmarks/bench_skew_kl.py --devices cuda --shapes 8192x128256 --dtypes bfloat16 --impls fused eager topk \
    --warmup 3 --reps 10 --out "$OUT/bench_target.json" 2>&1 | grep -v -i warn | tee "$OUT/bench_target.txt"
}

rest() {
  python benchmarks/bench_replay.py --reps 300 --rounds 3 --json "$OUT/bench_replay.json" 2>&1 \
    | tee "$OUT/bench_replay.txt" || echo "REPLAY BENCHMARK FAILED"
  python benchmarks/bench_skew_kl.py --devices cuda --shapes 2048x32000 4096x50257 --warmup 3 --reps 10 \
    --out "$OUT/bench_skew_kl.json" 2>&1 | grep -v -i warn | tee "$OUT/bench.txt"
}

case "${1:-all}" in
  build) build ;;
  tests) tests ;;
  margin) margin ;;
  target) target ;;
  rest) rest ;;
  all) build; tests; target; rest; margin ;;
  *) echo "usage: $0 [build|tests|target|rest|margin|all]" >&2; exit 2 ;;
esac
