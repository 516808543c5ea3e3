#!/usr/bin/env bash
# Create ./.venv with the pinned CPU environment and install unsc_fast into it (editable,
# building the C++ extension against that torch). Re-running skips what is already done.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
VENV=".venv"
stamp_source() { cat requirements-dev.txt setup.py pyproject.toml csrc/* 2>/dev/null | sha256sum | cut -d' ' -f1; }

if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating $VENV with $("$PYTHON" --version)"
    "$PYTHON" -m venv "$VENV"
fi
if [ "$(cat "$VENV/.unsc_fast_installed" 2>/dev/null)" != "$(stamp_source)" ]; then
    echo "[setup] installing the pinned requirements (CPU torch)"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    "$VENV/bin/python" -m pip install --quiet -r requirements-dev.txt
    echo "[setup] installing unsc_fast (editable, C++ extension built against that torch)"
    "$VENV/bin/python" -m pip install --quiet --no-build-isolation -e .
    stamp_source > "$VENV/.unsc_fast_installed"
fi
