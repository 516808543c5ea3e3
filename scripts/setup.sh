#!/usr/bin/env bash
# Create ./.venv with the locked CPU environment (requirements-lock.txt: the exact version of
# every package, so the README's figures reproduce) and install unsc_fast into it with its
# "eval" extra (editable, building the C++ extension against that torch; UNSC_FAST_BUILD_EXT=0
# skips the extension). Re-running skips what is already done.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
VENV=".venv"
stamp_source() { cat requirements-lock.txt setup.py pyproject.toml csrc/* 2>/dev/null | sha256sum | cut -d' ' -f1; }

if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating $VENV with $("$PYTHON" --version)"
    "$PYTHON" -m venv "$VENV"
fi
if [ "$(cat "$VENV/.unsc_fast_installed" 2>/dev/null)" != "$(stamp_source)" ]; then
    echo "[setup] installing the locked requirements (requirements-lock.txt, CPU torch)"
    "$VENV/bin/python" -m pip install --quiet -r requirements-lock.txt
    echo "[setup] installing unsc_fast[eval] (editable, C++ extension built against that torch)"
    "$VENV/bin/python" -m pip install --quiet --no-build-isolation -e ".[eval]"
    stamp_source > "$VENV/.unsc_fast_installed"
fi
