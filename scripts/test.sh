#!/usr/bin/env bash
# Set-up and the whole test suite (what CI runs): install + build, then pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
# -rs lists every skipped test with its reason: a test skipped on one CPU or environment
# and run on another shows up.
python -m pytest -q -rs python_tests "$@"
