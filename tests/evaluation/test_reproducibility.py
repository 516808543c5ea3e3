"""The evaluation environment is pinned, and on it the demo's figures repeat exactly
(RELIABILITY 69, issue 10.8).

``requirements-lock.txt`` holds the exact version of every package of the venv that
``scripts/setup.sh`` builds. The demo's table on a short schedule is compared with a stored
one (time column excluded) only where the installed versions equal the lock: elsewhere a
difference says nothing about the code, so the test skips and says which versions differ. On a
CPU whose vector kernels differ from the stored table's (AVX-512 against AVX2), the demo runs in
a fresh process with the stored table's kernels pinned, as ``scripts/reproduce_readme.sh`` does.
After a deliberate change of the methods, rewrite the stored table with
``UNSC_FAST_WRITE_EXPECTED=1 .venv/bin/python -m pytest tests/evaluation/test_reproducibility.py``.
"""
import os
import re
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
import torch

from unsc_fast.evaluation.demo import format_table, run_demo

ROOT = Path(__file__).resolve().parents[2]
LOCK = ROOT / "requirements-lock.txt"
EXPECTED = Path(__file__).parent / "expected" / "demo_short.md"
SHORT = dict(forget_class=3, seed=0, threshold=0.99, train_epochs=4, unlearn_epochs=2, lr=0.01)
THREADS = 1  # the demo's default; other thread counts sum in other orders


def locked_versions() -> dict[str, str]:
    """{normalised name: version} of every ``name==version`` line of the lock file."""
    versions = {}
    for line in LOCK.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            versions[_normalise(name)] = version.strip()
    return versions


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def version_differences() -> list[str]:
    """'name: installed X, locked Y' for every locked package whose installed version differs."""
    differences = []
    for name, locked in locked_versions().items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            installed = "missing"
        if installed != locked:
            differences.append(f"{name}: installed {installed}, locked {locked}")
    return differences


def table_without_time(table: str) -> str:
    """The markdown table minus its last column (wall time, which no environment repeats)."""
    return "\n".join("|".join(line.split("|")[:-2]) + "|" for line in table.splitlines())


# The environment variables that select a CPU's vector kernels in torch, oneDNN and MKL (as
# scripts/reproduce_readme.sh pins them): a machine with AVX-512 can run the AVX2 ones.
PINNED_KERNELS = {"AVX2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}}
MARK = "----- table -----"


def short_table_with_kernels(capability: str) -> tuple[str, str] | None:
    """(capability seen, table) of the short demo run in a fresh process with ``capability``'s
    kernels pinned; None where there is no pin for it."""
    pins = PINNED_KERNELS.get(capability)
    if pins is None:
        return None
    code = (f"import sys, torch; torch.set_num_threads({THREADS}); "
            "from unsc_fast.evaluation.demo import format_table, run_demo; "
            f"table = format_table(run_demo(**{SHORT!r})); "
            f"print({MARK!r}); print(torch.backends.cpu.get_cpu_capability()); print(table)")
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, **pins}, cwd=ROOT, capture_output=True,
                          text=True, check=True, timeout=600)
    seen, _, table = done.stdout.split(MARK + "\n", 1)[1].partition("\n")
    return seen, table


def _expected() -> tuple[dict[str, str], str]:
    """(header fields, table) of the stored file: '# key: value' lines, then the table."""
    fields, table = {}, []
    for line in EXPECTED.read_text().splitlines():
        if line.startswith("# "):
            key, _, value = line[2:].partition(": ")
            fields[key] = value
        elif line.strip():
            table.append(line)
    return fields, "\n".join(table)


def test_the_lock_pins_every_package_exactly():
    lines = [line for line in LOCK.read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert lines and all(re.fullmatch(r"[A-Za-z0-9_.\-]+==[A-Za-z0-9_.+!\-]+", line) for line in lines), lines
    locked = locked_versions()
    assert locked["torch"].endswith("+cpu")  # the CPU build: never a multi-GB CUDA download
    assert "unsc-fast" not in locked and not any("/" in line for line in lines)  # no paths, no editable project
    for needed in ("numpy", "scikit-learn", "matplotlib", "pillow", "triton", "pytest"):
        assert needed in locked, needed


def test_the_core_needs_torch_numpy_and_tqdm_only_and_eval_is_an_extra():
    """scikit-learn and matplotlib belong to the harness (the eval extra); the core needs torch,
    numpy and tqdm (progress bars on long observation and training passes)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert sorted(re.split(r"[<>=!~ ]", dep)[0] for dep in project["dependencies"]) == ["numpy", "torch", "tqdm"]
    extra = {re.split(r"[<>=!~ ]", dep)[0] for dep in project["optional-dependencies"]["eval"]}
    assert {"scikit-learn", "matplotlib"} <= extra
    assert '-e ".[eval]"' in (ROOT / "scripts" / "setup.sh").read_text()
    assert "requirements-lock.txt" in (ROOT / "scripts" / "setup.sh").read_text()


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow  # a short demo: a few seconds
def test_the_short_demo_repeats_the_stored_table_on_the_locked_environment(one_thread):
    differences = version_differences()
    if differences:
        pytest.skip("installed versions differ from requirements-lock.txt, where the stored table does not "
                    "apply (run scripts/setup.sh for the locked venv): " + "; ".join(differences[:6]))
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    capability = torch.backends.cpu.get_cpu_capability()
    table = table_without_time(format_table(run_demo(**SHORT)))
    if os.environ.get("UNSC_FAST_WRITE_EXPECTED") == "1":
        EXPECTED.write_text(f"# settings: {SHORT}\n# python: {python}\n# threads: {THREADS}\n"
                            f"# cpu capability: {capability}\n\n{table}\n")
        pytest.skip(f"wrote {EXPECTED.name}")
    fields, expected = _expected()
    if fields.get("python") != python:
        pytest.skip(f"the stored table was made with Python {fields.get('python')}, this is {python}")
    assert fields["settings"] == str(SHORT)
    if fields.get("cpu capability") != capability:  # torch's AVX2 and AVX512 kernels round differently
        pinned = short_table_with_kernels(fields.get("cpu capability", ""))  # run with the stored table's
        if pinned is None or pinned[0] != fields.get("cpu capability"):
            pytest.skip(f"the stored table was made with torch's {fields.get('cpu capability')} kernels, these are "
                        f"{capability} and cannot be pinned to them here")
        table = table_without_time(pinned[1].strip())
    assert table == expected
