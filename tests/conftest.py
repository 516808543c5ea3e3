"""Shared pytest setup.

Triton decides when a kernel is decorated whether to interpret it, so TRITON_INTERPRET
must be set before ``unsc_fast.kernels`` is first imported: on a machine without CUDA
the kernel tests run through Triton's CPU interpreter.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
