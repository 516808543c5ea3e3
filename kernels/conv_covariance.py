"""Conv covariance with implicit im2col: ``C += P^T P`` over every conv patch of ``x``.

``P`` is what ``F.unfold`` would build: one row per output position (b, oh, ow), one
column per (channel, kh, kw), in ``conv.weight.flatten(1)``'s order. Materialising it
costs ``kh * kw`` times the input in memory and bandwidth; here each block of ``P`` is
gathered straight from ``x`` when it is needed, with out-of-image taps masked to zero
(zero padding; the projector pre-pads ``x`` for other padding modes). The block
structure, symmetry and row splitting are those of ``covariance``.
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
    (64, 64, 4, 3),
    (64, 32, 4, 4),
    (32, 128, 4, 3),
]


@triton.jit
def patch_rows(n, out_width, positions, stride_b, conv_stride_h, conv_stride_w, padding_h, padding_w):
    """Where the patches of rows n start: the image offset and the top-left tap (h, w)."""
    image = n // positions
    position = n - image * positions
    oh = position // out_width
    ow = position - oh * out_width
    return image * stride_b, oh * conv_stride_h - padding_h, ow * conv_stride_w - padding_w


@triton.jit
def patch_block(
    x_ptr, image_offset, top, left, n_ok, features, features_ok, height, width,
    stride_c, stride_h, stride_w, dilation_h, dilation_w,
    KERNEL_H: tl.constexpr, KERNEL_W: tl.constexpr,
):
    """The block P[n, features] of the unfolded input, gathered from x (zeros outside)."""
    channel = features // (KERNEL_H * KERNEL_W)
    tap = features - channel * (KERNEL_H * KERNEL_W)
    kh = tap // KERNEL_W
    kw = tap - kh * KERNEL_W
    h = top[:, None] + kh[None, :] * dilation_h
    w = left[:, None] + kw[None, :] * dilation_w
    mask = n_ok[:, None] & features_ok[None, :] & (h >= 0) & (h < height) & (w >= 0) & (w < width)
    offset = image_offset[:, None] + (channel.to(tl.int64) * stride_c)[None, :] + h * stride_h + w * stride_w
    return tl.load(x_ptr + offset, mask=mask, other=0.0)


@triton.autotune(
    configs=kernel_configs(_CUDA_CONFIGS),
    key=["d", "rows_bucket", "ACCUMULATE", "INPUT_PRECISION", "KERNEL_H", "KERNEL_W"],
    restore_value=["out_ptr"],
)
@triton.jit
def conv_covariance_kernel(
    x_ptr,
    out_ptr,
    N,
    d,
    rows_per_split,
    rows_bucket,  # autotuning key only
    out_width,
    positions,
    height,
    width,
    stride_b,
    stride_c,
    stride_h,
    stride_w,
    conv_stride_h,
    conv_stride_w,
    padding_h,
    padding_w,
    dilation_h,
    dilation_w,
    stride_split,
    stride_row,
    stride_col,
    KERNEL_H: tl.constexpr,
    KERNEL_W: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One program: one upper-triangle block (i, j) of C over one split of the patches."""
    i, j = upper_tile_coordinates(tl.program_id(0))
    split = tl.program_id(1)
    rows = i * BLOCK_D + tl.arange(0, BLOCK_D)
    cols = j * BLOCK_D + tl.arange(0, BLOCK_D)
    rows_ok = rows < d
    cols_ok = cols < d

    first = split.to(tl.int64) * rows_per_split
    last = tl.minimum(first + rows_per_split, N)
    acc = tl.zeros((BLOCK_D, BLOCK_D), dtype=tl.float32)
    for step in range(0, tl.cdiv(last - first, BLOCK_N)):
        n = first + step * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < last
        image_offset, top, left = patch_rows(
            n, out_width, positions, stride_b, conv_stride_h, conv_stride_w, padding_h, padding_w
        )
        a = patch_block(
            x_ptr, image_offset, top, left, n_ok, rows, rows_ok, height, width,
            stride_c, stride_h, stride_w, dilation_h, dilation_w, KERNEL_H, KERNEL_W,
        )
        b = patch_block(
            x_ptr, image_offset, top, left, n_ok, cols, cols_ok, height, width,
            stride_c, stride_h, stride_w, dilation_h, dilation_w, KERNEL_H, KERNEL_W,
        )
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(tl.trans(a), b, acc, input_precision=INPUT_PRECISION)

    out_ptr += split.to(tl.int64) * stride_split
    write_symmetric_tile(out_ptr, stride_row, stride_col, acc, rows, cols, d, i == j, ACCUMULATE)


def output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    """Conv output length along one axis (the formula of ``F.unfold`` and ``nn.Conv2d``)."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def conv_covariance_(
    C: torch.Tensor,
    x: torch.Tensor,
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    *,
    input_precision: str = "ieee",
    splits: int | None = None,
) -> torch.Tensor:
    """``C += P^T P`` with P = the unfolded patches of x (B, Cin, H, W), never built.

    x: fp32/bf16/fp16, any strides; C: fp32 (Cin*kh*kw, Cin*kh*kw), any strides.
    Arguments are pairs (validated by ``unsc_fast.ops``).
    """
    check_input_precision(input_precision)
    if C.dtype != torch.float32:
        raise TypeError(f"conv_covariance_ (triton): C must be float32, got {C.dtype}")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"conv_covariance_ (triton): x must be fp32/bf16/fp16, got {x.dtype}")
    batch, channels, height, width = x.shape
    (kernel_h, kernel_w), (stride_h, stride_w) = kernel_size, stride
    (padding_h, padding_w), (dilation_h, dilation_w) = padding, dilation
    out_height = output_size(height, kernel_h, stride_h, padding_h, dilation_h)
    out_width = output_size(width, kernel_w, stride_w, padding_w, dilation_w)
    if out_height < 1 or out_width < 1:
        raise ValueError(
            f"conv_covariance_: input {height}x{width} with padding {padding} is smaller than the "
            f"dilated kernel {kernel_size} (dilation {dilation}); there are no patches"
        )
    d = channels * kernel_h * kernel_w
    positions = out_height * out_width
    N = batch * positions
    if N == 0 or d == 0:
        return C

    def launch(out, stride_split, stride_row, stride_col, rows_per_split, splits, accumulate):
        grid = lambda meta: (tile_count(d, meta["BLOCK_D"]), splits)  # noqa: E731
        conv_covariance_kernel[grid](
            x, out, N, d, rows_per_split, triton.next_power_of_2(rows_per_split),
            out_width, positions, height, width, *x.stride(),
            stride_h, stride_w, padding_h, padding_w, dilation_h, dilation_w,
            stride_split, stride_row, stride_col,
            KERNEL_H=kernel_h, KERNEL_W=kernel_w,
            ACCUMULATE=accumulate, INPUT_PRECISION=dot_precision(input_precision, x.dtype),
            UPCAST=needs_upcast(x.dtype),
        )

    return launch_symmetric(C, N, d, splits, launch)
