"""Shared pytest setup.

Triton decides when a kernel is decorated whether to interpret it, so TRITON_INTERPRET
must be set before ``unsc_fast.kernels`` is first imported: on a machine without CUDA
the kernel tests run through Triton's CPU interpreter.
"""
import importlib.util
import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def load_example():
    """``load_example(name)``: ``examples/<name>.py`` imported as a module, as a user runs it."""
    def load(name: str):
        path = Path(__file__).resolve().parents[1] / "examples" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load
