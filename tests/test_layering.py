"""The package's two layers and their direction (docs/architecture.md): the core never
imports the evaluation harness (nor scikit-learn / matplotlib, which only the harness needs),
and the Triton kernels import nothing from the core. Each check runs in a fresh interpreter,
so modules that other tests imported cannot hide a violation."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, TRITON_INTERPRET="1")
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)


def test_core_imports_no_harness_and_no_eval_dependencies():
    done = _run(
        "import sys, unsc_fast\n"
        "from unsc_fast import NullSpaceProjector, NullSpaceOptimizer, ops\n"
        "import unsc_fast.unlearn, unsc_fast.distributed, unsc_fast.training, unsc_fast.calibration\n"
        "bad = sorted(m for m in sys.modules if m.startswith(('unsc_fast.evaluation', 'sklearn', 'matplotlib', 'scipy')))\n"
        "print(bad)\n"
        "assert not bad, bad\n"
    )
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("module", ["covariance", "conv_covariance", "projection"])
def test_kernels_import_nothing_from_the_core(module):
    """Imported as a top-level package straight from the source tree (not as
    ``unsc_fast.kernels``, whose parent package is the core), a kernel file must load with
    no ``unsc_fast`` module in sight."""
    pytest.importorskip("triton")
    done = _run(
        "import sys\n"
        f"import kernels.{module}\n"
        "core = sorted(m for m in sys.modules if m.startswith('unsc_fast'))\n"
        "assert not core, core\n"
    )
    assert done.returncode == 0, done.stdout + done.stderr
