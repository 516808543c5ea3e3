"""The machine's measured peaks, for physical floors: a large matrix product (GFLOP/s, float32
and float64) and a large copy (GB/s, bytes read plus written), timed in the calling process
at its torch thread count (best of a few calls: the peak, not the typical)."""
from __future__ import annotations

import time

import torch


def gemm_gflops(dtype: torch.dtype = torch.float32, size: int = 2048, repeat: int = 3) -> float:
    """2 n^3 FLOPs of one (n x n) @ (n x n) product over its best time."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator, dtype=dtype)
    b = torch.randn(size, size, generator=generator, dtype=dtype)
    out = torch.empty(size, size, dtype=dtype)
    torch.mm(a, b, out=out)  # warm-up
    best = min(_seconds(lambda: torch.mm(a, b, out=out)) for _ in range(repeat))
    return 2.0 * size**3 / best / 1e9


def copy_gbytes(megabytes: int = 512, repeat: int = 3) -> float:
    """Bytes read plus bytes written by one copy of a ``megabytes`` float32 buffer, per second."""
    source = torch.ones(megabytes * 2**20 // 4)
    target = torch.empty_like(source)
    target.copy_(source)  # warm-up (first touch of the pages)
    best = min(_seconds(lambda: target.copy_(source)) for _ in range(repeat))
    return 2.0 * source.numel() * 4 / best / 1e9


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start
