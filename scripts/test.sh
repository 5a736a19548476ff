#!/usr/bin/env bash
# Set-up and the whole test suite (what CI runs): install + build, then pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
python -m pytest -q python_tests "$@"
