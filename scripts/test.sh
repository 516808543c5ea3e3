#!/usr/bin/env bash
# Quick start 2: set up ./.venv if needed, then run the whole test suite (CPU; the Triton
# kernels run in Triton's interpreter). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
