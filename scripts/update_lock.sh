#!/usr/bin/env bash
# Rewrite requirements-lock.txt from ./.venv: the exact version of every package installed
# there (pip, setuptools and wheel included), minus unsc_fast itself. After changing
# requirements-dev.txt: .venv/bin/python -m pip install -r requirements-dev.txt, run this,
# then the tests; the demo's expected table (tests/evaluation/expected/) is only checked
# where the installed versions equal this lock, so regenerate it too if they moved.
set -euo pipefail
cd "$(dirname "$0")/.."
{
    echo "# Exact versions of the evaluation environment (CPU), installed by scripts/setup.sh."
    echo "# Written by scripts/update_lock.sh from .venv (pip freeze --all, without unsc_fast);"
    echo "# requirements-dev.txt holds the ranges it was resolved from. torch is the CPU build"
    echo "# (+cpu): where no local wheel is on hand, add"
    echo "#   --extra-index-url https://download.pytorch.org/whl/cpu"
    .venv/bin/python -m pip freeze --all --exclude unsc_fast --exclude unsc-fast
} > requirements-lock.txt
echo "[update_lock] wrote requirements-lock.txt ($(grep -vc '^#' requirements-lock.txt) packages)"
