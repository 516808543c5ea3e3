"""What the Triton kernels share: interpreter detection, autotuning spaces, precision rules,
the upper-triangle tile numbering and symmetric write of the covariance kernels, and their
row splitting. Self-contained: nothing here (or in any kernel file) imports the core package,
so the kernels can be read, tested and reused on their own.
"""
from __future__ import annotations

import functools
import math
import os

import torch
import triton
import triton.language as tl

INPUT_PRECISIONS = ("ieee", "tf32", "tf32x3")

# Above this, splitting the rows costs more workspace memory than it is worth.
WORKSPACE_LIMIT_BYTES = 64 * 2**20
# Fewer rows than this per split is not worth a separate (d, d) partial.
MIN_ROWS_PER_SPLIT = 1024


def triton_interpreting() -> bool:
    """True when Triton runs kernels on CPU tensors through its interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def autotune_configs(interpreted: dict, names: tuple[str, ...], cuda_table) -> list:
    """The autotuning space on a GPU (rows of ``cuda_table``: the block sizes named in
    ``names``, then num_warps and num_stages); one small fixed config under TRITON_INTERPRET
    (tl.dot in the interpreter needs block dims >= 16, and tests must stay fast)."""
    if triton_interpreting():
        return [triton.Config(interpreted, num_warps=4, num_stages=1)]
    return [
        triton.Config(dict(zip(names, row[: len(names)])), num_warps=row[-2], num_stages=row[-1])
        for row in cuda_table
    ]


def kernel_configs(cuda_configs):
    """Autotuning space of the covariance kernels: rows (BLOCK_D, BLOCK_N, warps, stages)."""
    return autotune_configs({"BLOCK_D": 32, "BLOCK_N": 128}, ("BLOCK_D", "BLOCK_N"), cuda_configs)


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
