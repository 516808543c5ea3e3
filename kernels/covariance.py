"""Streaming covariance ``C += x^T x`` as a Triton kernel that exploits symmetry.

``x^T x`` is symmetric, so the kernel computes only the (i, j) blocks with ``i <= j`` and
writes each one twice (the block and its mirror): about half of the multiply-adds of
``torch.addmm``. Inputs may be fp32, bf16 or fp16 with any strides; products are summed
in fp32 (a bf16 or fp16 product is exact in fp32, so low-precision activations lose
nothing before the sum). All addressing is int64, so N in the millions (and tensors of
more than 2**31 elements) are safe.

When there are few output blocks (small d) and many rows, the rows are split across
programs: each split writes its own (d, d) partial into a workspace that is then summed
in a fixed order, so the result is deterministic (no atomics).

The tile numbering, the symmetric write and the row splitting live in ``_common``, shared
with ``conv_covariance``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    check_input_precision,
    dot_precision,
    kernel_configs,
    launch_symmetric,
    needs_upcast,
    tile_count,
    upper_tile_coordinates,
    write_symmetric_tile,
)

# (BLOCK_D, BLOCK_N, num_warps, num_stages)
_CUDA_CONFIGS = [
    (128, 32, 8, 3),
    (128, 64, 8, 3),
    (128, 32, 4, 4),
    (64, 64, 4, 4),
    (64, 32, 4, 4),
    (64, 128, 4, 3),
    (32, 128, 4, 3),
]


@triton.autotune(
    configs=kernel_configs(_CUDA_CONFIGS),
    key=["d", "rows_bucket", "ACCUMULATE", "INPUT_PRECISION"],
    restore_value=["out_ptr"],
)
@triton.jit
def covariance_kernel(
    x_ptr,
    out_ptr,
    N,
    d,
    rows_per_split,
    rows_bucket,  # autotuning key only
    stride_xn,
    stride_xd,
    stride_split,
    stride_row,
    stride_col,
    ACCUMULATE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One program: one upper-triangle block (i, j) of the output over one row split."""
    i, j = upper_tile_coordinates(tl.program_id(0))
    split = tl.program_id(1)
    rows = i * BLOCK_D + tl.arange(0, BLOCK_D)  # feature indices of the block's rows
    cols = j * BLOCK_D + tl.arange(0, BLOCK_D)
    rows_ok = rows < d
    cols_ok = cols < d
    rows_offset = rows.to(tl.int64) * stride_xd
    cols_offset = cols.to(tl.int64) * stride_xd

    first = split.to(tl.int64) * rows_per_split
    last = tl.minimum(first + rows_per_split, N)
    acc = tl.zeros((BLOCK_D, BLOCK_D), dtype=tl.float32)
    for step in range(0, tl.cdiv(last - first, BLOCK_N)):
        n = first + step * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < last
        n_offset = n * stride_xn
        # a is loaded already transposed, (BLOCK_D, BLOCK_N): x[n, rows]^T
        a = tl.load(
            x_ptr + rows_offset[:, None] + n_offset[None, :],
            mask=rows_ok[:, None] & n_ok[None, :],
            other=0.0,
        )
        b = tl.load(
            x_ptr + n_offset[:, None] + cols_offset[None, :],
            mask=n_ok[:, None] & cols_ok[None, :],
            other=0.0,
        )
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)

    out_ptr += split.to(tl.int64) * stride_split
    write_symmetric_tile(out_ptr, stride_row, stride_col, acc, rows, cols, d, i == j, ACCUMULATE)


def covariance_(
    C: torch.Tensor, x: torch.Tensor, *, input_precision: str = "ieee", splits: int | None = None
) -> torch.Tensor:
    """``C += x^T x`` for x (N, d) fp32/bf16/fp16 (any strides) into fp32 C (any strides).

    ``input_precision="ieee"`` (default) keeps fp32 inputs exact in fp32; ``"tf32"`` lets
    fp32 inputs use TF32 tensor cores on a GPU (about 1e-3 relative error). ``splits``
    forces the number of row splits (tests use it; None picks one).
    """
    check_input_precision(input_precision)
    if C.dtype != torch.float32:
        raise TypeError(f"covariance_ (triton): C must be float32, got {C.dtype}")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"covariance_ (triton): x must be fp32/bf16/fp16, got {x.dtype}")
    N, d = x.shape
    if N == 0 or d == 0:
        return C

    def launch(out, stride_split, stride_row, stride_col, rows_per_split, splits, accumulate):
        grid = lambda meta: (tile_count(d, meta["BLOCK_D"]), splits)  # noqa: E731
        covariance_kernel[grid](
            x, out, N, d, rows_per_split, triton.next_power_of_2(rows_per_split),
            x.stride(0), x.stride(1), stride_split, stride_row, stride_col,
            ACCUMULATE=accumulate, INPUT_PRECISION=dot_precision(input_precision, x.dtype),
            UPCAST=needs_upcast(x.dtype),
        )

    return launch_symmetric(C, N, d, splits, launch)
