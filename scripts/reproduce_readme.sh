#!/usr/bin/env bash
# Regenerate every figure of README.md and docs/compare.md with the exact commands that made
# them, in the locked environment (scripts/setup.sh, requirements-lock.txt), one torch thread:
#   1. README "The demo's output":             unsc-fast demo
#   2. README "Comparing methods" table,
#      docs/compare.md's report and plots:      unsc-fast compare   (default run)
#   3. docs/compare.md "A second run":          unsc-fast compare --checkpoint ... (milder baselines)
#   4. README "Comparing methods", MNIST-1D:    unsc-fast compare --dataset mnist1d
#      (MNIST1D_ONLY=1 runs this step alone, e.g. in parallel with steps 1-3 on another core)
# Usage: bash scripts/reproduce_readme.sh [OUTPUT_DIR]   (default: reproduce_output)
# Nothing in README.md or docs/ is touched; the end of the run says which file goes where.
# Expect ~3-4 min on 2 idle CPU cores. Times differ run to run; every other figure repeats exactly
# on the same environment and CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-reproduce_output}"

# The CPU's vector kernels are part of the environment: torch's AVX-512 and AVX2 kernels
# round differently, and methods that fine-tune without projection (random labels, l1-sparse,
# SalUn, NatMU, ...) amplify that into different tables. Pin the AVX2 kernels, which every
# x86-64 machine of the last decade has, so the figures repeat across machines.
export ATEN_CPU_CAPABILITY="${ATEN_CPU_CAPABILITY:-avx2}"
export ONEDNN_MAX_CPU_ISA="${ONEDNN_MAX_CPU_ISA:-AVX2}"
export MKL_ENABLE_INSTRUCTIONS="${MKL_ENABLE_INSTRUCTIONS:-AVX2}"

bash scripts/setup.sh
if ! diff -q <(.venv/bin/python -m pip freeze --all --exclude unsc_fast --exclude unsc-fast 2>/dev/null) \
        <(grep -v '^#' requirements-lock.txt) > /dev/null; then
    echo "[reproduce] WARNING: .venv differs from requirements-lock.txt; figures may differ" >&2
fi
mkdir -p "$OUT"
if [ "${MNIST1D_ONLY:-0}" = "1" ]; then
    echo "[reproduce] 4/4 unsc-fast compare --dataset mnist1d --output $OUT/compare_mnist1d"
    rm -rf "$OUT/compare_mnist1d"
    .venv/bin/unsc-fast compare --dataset mnist1d --threads 1 --output "$OUT/compare_mnist1d" --quiet > "$OUT/compare_mnist1d.log"
    echo "[reproduce] $OUT/compare_mnist1d/comparison.md -> README.md, 'Comparing methods' (MNIST-1D table)"
    exit 0
fi
rm -rf "$OUT/compare"

echo "[reproduce] 1/3 unsc-fast demo --threads 1"
.venv/bin/unsc-fast demo --threads 1 --quiet | tee "$OUT/demo.txt"

echo "[reproduce] 2/3 unsc-fast compare --output $OUT/compare (all methods, seeds 0 1 2, one thread)"
.venv/bin/unsc-fast compare --threads 1 --output "$OUT/compare" --quiet > "$OUT/compare.log"

echo "[reproduce] 3/3 docs/compare.md 'A second run': milder baselines from the same original"
rm -rf "$OUT/compare_tuned"
.venv/bin/unsc-fast compare --threads 1 --checkpoint "$OUT/compare/original.pt" --methods gradient_ascent,l1_sparse \
    --set gradient_ascent.lr=1e-3 --set gradient_ascent.epochs=1 --set l1_sparse.alpha=5e-4 \
    --output "$OUT/compare_tuned" --quiet > "$OUT/compare_tuned.log"
.venv/bin/python -m pip freeze --all --exclude unsc_fast --exclude unsc-fast > "$OUT/environment.txt" 2>/dev/null
.venv/bin/python -c "import platform, torch; print(platform.platform(), 'torch', torch.__version__, 'kernels', torch.backends.cpu.get_cpu_capability(), 'threads', torch.get_num_threads())" >> "$OUT/environment.txt"

cat <<DONE

[reproduce] outputs under $OUT:
  $OUT/demo.txt                  -> README.md, section "The demo's output" (the text block)
  $OUT/compare/comparison.md     -> README.md, "Comparing methods" (first table) and
                                    docs/compare.md (the report after "unsc-fast compare --output ...")
  $OUT/compare/classwise.png     -> docs/images/compare_classwise.png
  $OUT/compare/tradeoff.png      -> docs/images/compare_tradeoff.png
  $OUT/compare_tuned/comparison.md -> docs/compare.md, "A second run" (its first table)
  (MNIST-1D: MNIST1D_ONLY=1 bash scripts/reproduce_readme.sh $OUT -> $OUT/compare_mnist1d/comparison.md)
  $OUT/compare/comparison.json   every raw figure, with the environment it ran in
  $OUT/environment.txt           exact packages, platform and thread count of this run
To install the plots: cp $OUT/compare/classwise.png docs/images/compare_classwise.png &&
                      cp $OUT/compare/tradeoff.png docs/images/compare_tradeoff.png
DONE
