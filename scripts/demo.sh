#!/usr/bin/env bash
# Quick start 1: set up ./.venv if needed, then forget one digit class with UNSC.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/unsc-fast demo "$@"
