"""The CUDA sources compile with nvcc even where torch has no CUDA (a syntax and type check:
the launchers take plain pointers, so no CUDA build of torch is needed)."""
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NVCC = shutil.which("nvcc")


@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed")
@pytest.mark.parametrize("source", sorted(p.name for p in (ROOT / "csrc").glob("*.cu")))
def test_cuda_source_compiles(source, tmp_path):
    command = [NVCC, "-std=c++17", "-c", str(ROOT / "csrc" / source), "-o", str(tmp_path / "out.o"),
               f"-I{ROOT / 'csrc'}", f"-I{sysconfig.get_paths()['include']}"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert (tmp_path / "out.o").stat().st_size > 0
