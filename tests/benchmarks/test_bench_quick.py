"""Smoke tests of the end-to-end benchmarks' quick paths: each runs as users run it
(``python -m benchmarks.<name> --quick``, from the repository root, in a fresh interpreter)
and prints its table. They check that the scripts still run against the current API, not
their figures."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_benchmark(module: str, *args: str) -> str:
    done = subprocess.run([sys.executable, "-m", f"benchmarks.{module}", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_projector_build_quick_runs_three_pipelines(tmp_path):
    out = run_benchmark("bench_projector_build", "--quick", "--threads", "1", "--json", str(tmp_path / "r.json"))
    for pipeline in ("(a) official", "(b) plain PyTorch", "(c) unsc_fast", "ratio plain / ours", "ratio official / ours"):
        assert pipeline in out
    result = json.loads((tmp_path / "r.json").read_text())
    assert all(len(result["times_s"][name]) == 1 for name in ("official", "plain", "ours"))
    assert all(row["rank_plain"] > 0 and row["energy_ours"] >= 0.99 - 1e-4 for row in result["layers"])


OPTIMIZER_RUNS = {  # options: what the header and the profile must show
    "adamw_auto": ((), ["(change only: project_gradients='auto')", "NullSpaceOptimizer(AdamW)",
                        "inner AdamW step", "change projection"]),
    "sgd_auto": (("--inner", "sgd"), ["(gradient only: project_gradients='auto')", "NullSpaceOptimizer(SGD)",
                                      "gradient projection", "inner SGD step"]),
    "adamw_no_project_gradients": (("--no-project-gradients",), ["(change only: project_gradients=False)"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("run", sorted(OPTIMIZER_RUNS))
def test_optimizer_quick_runs_with_profile(run):
    options, expected = OPTIMIZER_RUNS[run]
    out = run_benchmark("bench_optimizer", "--quick", "--batch", "2", "--observe", "4", "--repeat", "1",
                        "--warmup", "0", "--threads", "1", "--profile", *options)
    assert "overhead" in out
    assert all(text in out for text in expected), [text for text in expected if text not in out]


def test_lm_variants_quick_prints_one_row_per_variant():
    out = run_benchmark("lm_variants", "--quick", "--output", "", '{"retain_weight": 100, "max_steps": 2}',
                        '{"objective": "npo", "max_steps": 2}')
    rows = [json.loads(line) for line in out.strip().splitlines()]
    assert [row["objective"] for row in rows] == ["GradDiff(forget=NPO(beta=0.1), retain_weight=100)", "NPO(beta=0.1)"]
    assert all(row["steps"] == 2 and {"forget", "validation", "retain", "unseen"} <= row.keys() for row in rows)
