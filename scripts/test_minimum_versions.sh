#!/usr/bin/env bash
# The declared floors, tested: a fresh venv with the oldest torch and transformers that
# pyproject.toml allows (read from it, so the floors are written once), the CPU build, then a
# short training, resume and FSDP selection of the suite. Slow (a second torch download and
# build): run by hand after changing a floor, not by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
# A copy of the tree (tracked and untracked files, no build outputs): the in-place build against
# the old torch must not replace this checkout's own extension.
mkdir "$scratch/src"
git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t "$scratch/src"
cd "$scratch/src"
python3 -m venv "$scratch/venv"
source "$scratch/venv/bin/activate"
python - >"$scratch/floors.txt" <<'PY'
import re, tomllib
with open("pyproject.toml", "rb") as f:
    project = tomllib.load(f)["project"]
for requirement in project["dependencies"] + project["optional-dependencies"]["train"]:
    name, floor = re.match(r"([A-Za-z0-9._-]+)\s*(?:>=\s*([^,\s]+))?", requirement).groups()
    if name in ("torch", "transformers"):
        print(f"{name}=={floor}")
PY
echo "floors: $(tr '\n' ' ' <"$scratch/floors.txt")"
python -m pip install --quiet --disable-pip-version-check -c "$scratch/floors.txt" -r "$scratch/floors.txt"
PIP_CONSTRAINT="$scratch/floors.txt" DISTILLM_CPU_ONLY=1 bash scripts/install.sh
python -m pytest -q -rs python_tests/recipe/test_trainer.py python_tests/recipe/test_fsdp.py \
    -k "every_loss_type_trains or sigkill or two_processes or two_fsdp_ranks" "$@"
