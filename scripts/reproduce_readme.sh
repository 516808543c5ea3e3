#!/usr/bin/env bash
# Regenerate every figure of README.md and docs/compare.md with the exact commands that made
# them, in the locked environment (scripts/setup.sh, requirements-lock.txt), one torch thread.
# PART picks what runs (each part fits one core, so two parts can run side by side):
#   PART=main (default)
#     1. README "The demo's output":             unsc-fast demo
#     2. README "Comparing methods", digits table,
#        docs/compare.md's report and plots:      unsc-fast compare   (default run)
#     3. docs/compare.md "A second run":          unsc-fast compare --checkpoint ... (milder baselines)
#   PART=mnist1d
#     4. README "Comparing methods", MNIST-1D:    unsc-fast compare --dataset mnist1d
#   PART=privacy
#     5. README / docs/compare.md, the per-example attack: random-sample forgetting with
#        U-LiRA (8 shadow models) on the digits and on MNIST-1D
#   PART=ablations
#     6. README "Comparing methods", the runs behind its explanations (MNIST-1D): NatMU without
#        its Linear re-initialisation; the official UNSC preset at batch 32 instead of 512
# Usage: [PART=main|mnist1d|privacy|ablations] bash scripts/reproduce_readme.sh [OUTPUT_DIR]
#        (default OUTPUT_DIR: reproduce_output)
# Nothing in README.md or docs/ is touched; the end of each part says which file goes where.
# Expect ~4 min for main, ~2 min for mnist1d and for ablations, ~10 min for privacy on one idle core. Times differ
# run to run; every other figure repeats exactly on the same environment and CPU.
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
PART="${PART:-main}"
compare() { .venv/bin/unsc-fast compare --threads 1 --quiet "$@"; }
case "$PART" in
main) ;;
mnist1d)
    echo "[reproduce] 4 unsc-fast compare --dataset mnist1d --output $OUT/compare_mnist1d"
    rm -rf "$OUT/compare_mnist1d"
    compare --dataset mnist1d --output "$OUT/compare_mnist1d" > "$OUT/compare_mnist1d.log"
    echo "[reproduce] $OUT/compare_mnist1d/comparison.md -> README.md, 'Comparing methods' (MNIST-1D table)"
    echo "[reproduce] $OUT/compare_mnist1d/{tradeoff,representation}.png -> docs/images/compare_mnist1d_{tradeoff,representation}.png"
    exit 0 ;;
privacy)
    for dataset in digits mnist1d; do
        echo "[reproduce] 5 unsc-fast compare --dataset $dataset --scenario random-sample --ulira-shadows 8"
        rm -rf "$OUT/privacy_$dataset"
        compare --dataset "$dataset" --scenario random-sample --ulira-shadows 8 \
            --output "$OUT/privacy_$dataset" > "$OUT/privacy_$dataset.log"
    done
    echo "[reproduce] $OUT/privacy_{digits,mnist1d}/comparison.md -> README.md and docs/compare.md, the per-example attack"
    exit 0 ;;
ablations)
    echo "[reproduce] 6 MNIST-1D ablations: natmu.init_linear=False, unsc_official.batch_size=32"
    rm -rf "$OUT/ablation_natmu_no_reset" "$OUT/ablation_official_batch32"
    compare --dataset mnist1d --methods natmu --set natmu.init_linear=False \
        --output "$OUT/ablation_natmu_no_reset" > "$OUT/ablation_natmu_no_reset.log"
    compare --dataset mnist1d --methods unsc_official --set unsc_official.batch_size=32 \
        --output "$OUT/ablation_official_batch32" > "$OUT/ablation_official_batch32.log"
    echo "[reproduce] $OUT/ablation_*/comparison.md -> README.md, 'Comparing methods' (what the tables say)"
    exit 0 ;;
*) echo "PART must be main, mnist1d, privacy or ablations (got '$PART')" >&2; exit 2 ;;
esac
rm -rf "$OUT/compare"

echo "[reproduce] 1 unsc-fast demo --threads 1"
.venv/bin/unsc-fast demo --threads 1 --quiet | tee "$OUT/demo.txt"

echo "[reproduce] 2 unsc-fast compare --output $OUT/compare (all methods, seeds 0 1 2, one thread)"
compare --output "$OUT/compare" > "$OUT/compare.log"

echo "[reproduce] 3 docs/compare.md 'A second run': milder baselines from the same original"
rm -rf "$OUT/compare_tuned"
compare --checkpoint "$OUT/compare/original.pt" --methods gradient_ascent,l1_sparse \
    --set gradient_ascent.lr=1e-3 --set gradient_ascent.epochs=1 --set l1_sparse.alpha=5e-4 \
    --output "$OUT/compare_tuned" > "$OUT/compare_tuned.log"
echo "[reproduce] 4 README 'Language models', docs/compare.md and docs/language_models.md: the facts benchmark (3 seeds, every method)"
compare --dataset facts --workers 2 --output "$OUT/facts" > "$OUT/facts.log"
.venv/bin/python -m pip freeze --all --exclude unsc_fast --exclude unsc-fast > "$OUT/environment.txt" 2>/dev/null
.venv/bin/python -c "import platform, torch; print(platform.platform(), 'torch', torch.__version__, 'kernels', torch.backends.cpu.get_cpu_capability(), '(figures ran on 1 thread)')" >> "$OUT/environment.txt"

cat <<DONE

[reproduce] outputs under $OUT:
  $OUT/demo.txt                  -> README.md, section "The demo's output" (the text block)
  $OUT/compare/comparison.md     -> README.md, "Comparing methods" (first table) and
                                    docs/compare.md (the report after "unsc-fast compare --output ...")
  $OUT/compare/classwise.png     -> docs/images/compare_classwise.png
  $OUT/compare/tradeoff.png      -> docs/images/compare_tradeoff.png
  $OUT/compare/representation.png -> docs/images/compare_representation.png
  $OUT/compare_tuned/comparison.md -> docs/compare.md, "A second run" (its first table)
  $OUT/facts/facts.md            -> README.md "Language models" (its columns), docs/compare.md
                                    "Results (3 seeds)", docs/language_models.md "Measured on the facts benchmark"
  (MNIST-1D and the per-example attack: PART=mnist1d and PART=privacy, see the top of this script)
  $OUT/compare/comparison.json   every raw figure, with the environment it ran in
  $OUT/environment.txt           exact packages, platform and thread count of this run
To install the plots: cp $OUT/compare/classwise.png docs/images/compare_classwise.png &&
                      cp $OUT/compare/tradeoff.png docs/images/compare_tradeoff.png &&
                      cp $OUT/compare/representation.png docs/images/compare_representation.png
DONE
