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

The jit helpers ``upper_tile_coordinates`` and ``write_symmetric_tile`` and the host
helpers ``plan_row_splits`` / ``tile_count`` are shared with ``conv_covariance``.
"""
from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from unsc_fast.ops.dispatch import triton_interpreting

INPUT_PRECISIONS = ("ieee", "tf32", "tf32x3")

# Above this, splitting the rows costs more workspace memory than it is worth.
WORKSPACE_LIMIT_BYTES = 64 * 2**20
# Fewer rows than this per split is not worth a separate (d, d) partial.
MIN_ROWS_PER_SPLIT = 1024


@triton.jit
def upper_tile_coordinates(tile):
    """Block (i, j) with i <= j of the ``tile``-th upper-triangle block, numbered column
    by column: tile = j (j + 1) / 2 + i. The float square root is corrected by one step
    either way, so the result is exact for any tile count the grid can hold."""
    j = ((tl.sqrt(8.0 * tile.to(tl.float32) + 1.0) - 1.0) * 0.5).to(tl.int32)
    j = tl.where((j + 1) * (j + 2) // 2 <= tile, j + 1, j)
    j = tl.where(j * (j + 1) // 2 > tile, j - 1, j)
    i = tile - j * (j + 1) // 2
    return i, j


@triton.jit
def write_symmetric_tile(
    out_ptr, stride_row, stride_col, acc, rows, cols, d, on_diagonal, ACCUMULATE: tl.constexpr
):
    """Write (or add, when ``ACCUMULATE``) the block ``acc`` at (rows, cols) and its
    transpose at (cols, rows). On a diagonal block the lower half is taken from the upper
    half, so the increment is exactly symmetric whatever order ``tl.dot`` summed in."""
    rows64 = rows.to(tl.int64)
    cols64 = cols.to(tl.int64)
    mask = (rows[:, None] < d) & (cols[None, :] < d)
    if on_diagonal:
        acc = tl.where(rows[:, None] <= cols[None, :], acc, tl.trans(acc))
    block = out_ptr + rows64[:, None] * stride_row + cols64[None, :] * stride_col
    if ACCUMULATE:
        acc_block = acc + tl.load(block, mask=mask, other=0.0)
    else:
        acc_block = acc
    tl.store(block, acc_block, mask=mask)
    if not on_diagonal:
        mirror = out_ptr + cols64[:, None] * stride_row + rows64[None, :] * stride_col
        acc_t = tl.trans(acc)
        if ACCUMULATE:
            acc_t = acc_t + tl.load(mirror, mask=tl.trans(mask), other=0.0)
        tl.store(mirror, acc_t, mask=tl.trans(mask))


def kernel_configs(cuda_configs):
    """The autotuning space on a GPU; one small fixed config under TRITON_INTERPRET
    (tl.dot in the interpreter needs block dims >= 16, and tests must stay fast)."""
    if triton_interpreting():
        return [triton.Config({"BLOCK_D": 32, "BLOCK_N": 128}, num_warps=4, num_stages=1)]
    return [
        triton.Config({"BLOCK_D": bd, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bd, bn, w, s in cuda_configs
    ]


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


def tile_count(d: int, block_d: int) -> int:
    """Number of upper-triangle blocks (diagonal included) of a d x d matrix."""
    blocks = triton.cdiv(d, block_d)
    return blocks * (blocks + 1) // 2


@functools.lru_cache(maxsize=None)
def _multiprocessor_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def plan_row_splits(rows: int, d: int, device: torch.device, splits: int | None = None):
    """(splits, rows_per_split): how many row chunks run in parallel, each into its own
    partial. On a GPU, enough to fill about two waves of the SMs when the output has few
    blocks, capped by the workspace size; one split on CPU (interpreter) unless asked."""
    if splits is None:
        splits = 1
        if device.type == "cuda":
            programs = tile_count(d, 64)
            wanted = math.ceil(2 * _multiprocessor_count(device.index or 0) / programs)
            by_memory = WORKSPACE_LIMIT_BYTES // max(1, 4 * d * d)
            by_rows = rows // MIN_ROWS_PER_SPLIT
            splits = max(1, min(wanted, by_memory, by_rows))
    splits = max(1, min(int(splits), max(rows, 1)))
    rows_per_split = max(1, math.ceil(rows / splits))
    splits = max(1, math.ceil(rows / rows_per_split))
    return splits, rows_per_split


def launch_symmetric(C: torch.Tensor, rows: int, d: int, splits: int | None, launch) -> torch.Tensor:
    """Run ``launch(out, stride_split, stride_row, stride_col, rows_per_split, splits, accumulate)``
    either straight into C (one split) or into per-split partials summed into C afterwards."""
    splits, rows_per_split = plan_row_splits(rows, d, C.device, splits)
    if splits == 1:
        launch(C, 0, C.stride(0), C.stride(1), rows_per_split, 1, True)
        return C
    partials = torch.empty((splits, d, d), dtype=torch.float32, device=C.device)
    launch(partials, partials.stride(0), partials.stride(1), partials.stride(2), rows_per_split, splits, False)
    return C.add_(partials.sum(0))


def check_input_precision(input_precision: str) -> str:
    if input_precision not in INPUT_PRECISIONS:
        raise ValueError(f"input_precision must be one of {INPUT_PRECISIONS}, got {input_precision!r}")
    return input_precision


def dot_precision(input_precision: str, dtype: torch.dtype) -> str:
    """TF32 only concerns fp32 blocks; bf16/fp16 blocks always multiply exactly."""
    return input_precision if dtype == torch.float32 else "ieee"


def needs_upcast(dtype: torch.dtype) -> bool:
    """Triton's interpreter multiplies bf16 blocks as their raw uint16 bits, so there the
    blocks go to fp32 first. That is exact: a bf16 (or fp16) product fits in fp32."""
    return triton_interpreting() and dtype != torch.float32


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
