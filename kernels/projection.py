"""Fused null-space projection: ``G <- G - (G U) U^T`` (``project_``) and its complement
form ``G <- (G Q) Q^T`` (``restrict_``), in place, as one Triton kernel.

The plain-PyTorch way reads G for ``G U``, writes the (out, d) product ``(G U) U^T``,
reads both back for the subtraction and writes G: five passes over an (out, d) matrix.
Here one program owns a block of rows of G: it forms the coefficients ``T = G U`` for its
rows (a small (rows, k) block), then streams over the columns once more and writes
``G - T U^T`` back through G's own strides. The second read of the row block is served
from L2 on a GPU, so HBM sees about one read and one write of G.

The coefficients stay in registers when k fits one block (the usual case, k <= 128);
for larger k they go through a small fp32 scratch of shape (out, k), written and read
back by the same program. G may be fp32/bf16/fp16 with any (non-overlapping) strides;
all arithmetic is fp32, U is fp32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import autotune_configs, check_input_precision, triton_interpreting
# Largest k whose coefficients stay in registers (one k block).
REGISTER_K = 128
SCRATCH_BLOCK_K = 64


# (BLOCK_M, BLOCK_D, num_warps, num_stages)
_CUDA_CONFIGS = [
    (16, 128, 4, 3),
    (32, 64, 4, 3),
    (32, 128, 4, 3),
    (32, 128, 8, 3),
    (64, 64, 4, 3),
    (64, 128, 8, 3),
]


@triton.jit
def row_block_coefficients(
    g_rows, rows_ok, u_ptr, d, k, k0, stride_gd, stride_ud, stride_uk,
    INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """T[:, k0:k0+BLOCK_K] = G[rows] @ U[:, k0:k0+BLOCK_K], summed over d in fp32."""
    basis = k0 + tl.arange(0, BLOCK_K)
    basis_ok = basis < k
    basis_offset = basis.to(tl.int64) * stride_uk
    t = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for d0 in range(0, d, BLOCK_D):
        features = d0 + tl.arange(0, BLOCK_D)
        features_ok = features < d
        g = tl.load(
            g_rows + features.to(tl.int64)[None, :] * stride_gd,
            mask=rows_ok[:, None] & features_ok[None, :],
            other=0.0,
        ).to(tl.float32)
        u = tl.load(
            u_ptr + features.to(tl.int64)[:, None] * stride_ud + basis_offset[None, :],
            mask=features_ok[:, None] & basis_ok[None, :],
            other=0.0,
        )
        t = tl.dot(g, u, t, input_precision=INPUT_PRECISION)
    return t


@triton.jit
def bfloat16_nearest_even(x):
    """fp32 -> bf16 rounded to nearest even, in integer arithmetic. Only used under
    TRITON_INTERPRET, whose own fp32 -> bf16 cast truncates (a GPU rounds to nearest even,
    as torch does); NaN stays NaN."""
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
    is_nan = (bits & 0x7FFFFFFF) > 0x7F800000
    rounded = tl.where(is_nan, (bits >> 16) | 0x40, rounded)
    return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def write_rows(
    g_rows, rows_ok, features, features_ok, stride_gd, update,
    SUBTRACT: tl.constexpr, SOFTWARE_BF16: tl.constexpr,
):
    """G[rows, features] <- G - update (``project_``) or update (``restrict_``), in G's dtype."""
    block = g_rows + features.to(tl.int64)[None, :] * stride_gd
    mask = rows_ok[:, None] & features_ok[None, :]
    if SUBTRACT:
        update = tl.load(block, mask=mask, other=0.0).to(tl.float32) - update
    if SOFTWARE_BF16:
        update = bfloat16_nearest_even(update)
    tl.store(block, update.to(block.dtype.element_ty), mask=mask)


@triton.autotune(
    configs=autotune_configs({"BLOCK_M": 32, "BLOCK_D": 64}, ("BLOCK_M", "BLOCK_D"), _CUDA_CONFIGS),
    key=["d", "k", "rows_bucket", "SUBTRACT", "BLOCK_K", "INPUT_PRECISION"],
    restore_value=["g_ptr"],
)
@triton.jit
def projection_kernel(
    g_ptr,
    u_ptr,
    scratch_ptr,
    M,
    d,
    k,
    rows_bucket,  # autotuning key only
    stride_gm,
    stride_gd,
    stride_ud,
    stride_uk,
    stride_sm,
    stride_sk,
    SUBTRACT: tl.constexpr,
    ONE_K_BLOCK: tl.constexpr,
    SOFTWARE_BF16: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One program: rows [pid*BLOCK_M, (pid+1)*BLOCK_M) of G, all of d, all of k."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_ok = rows < M
    g_rows = g_ptr + rows[:, None] * stride_gm
    if ONE_K_BLOCK:
        t = row_block_coefficients(
            g_rows, rows_ok, u_ptr, d, k, 0, stride_gd, stride_ud, stride_uk,
            INPUT_PRECISION, BLOCK_M, BLOCK_D, BLOCK_K,
        )
        basis = tl.arange(0, BLOCK_K)
        basis_offset = basis.to(tl.int64) * stride_uk
        for d0 in range(0, d, BLOCK_D):
            features = d0 + tl.arange(0, BLOCK_D)
            features_ok = features < d
            u = tl.load(
                u_ptr + features.to(tl.int64)[:, None] * stride_ud + basis_offset[None, :],
                mask=features_ok[:, None] & (basis < k)[None, :],
                other=0.0,
            )
            update = tl.dot(t, tl.trans(u), input_precision=INPUT_PRECISION)
            write_rows(g_rows, rows_ok, features, features_ok, stride_gd, update, SUBTRACT, SOFTWARE_BF16)
    else:
        scratch_rows = scratch_ptr + rows[:, None] * stride_sm
        for k0 in range(0, k, BLOCK_K):
            t = row_block_coefficients(
                g_rows, rows_ok, u_ptr, d, k, k0, stride_gd, stride_ud, stride_uk,
                INPUT_PRECISION, BLOCK_M, BLOCK_D, BLOCK_K,
            )
            basis = k0 + tl.arange(0, BLOCK_K)
            tl.store(
                scratch_rows + basis.to(tl.int64)[None, :] * stride_sk,
                t,
                mask=rows_ok[:, None] & (basis < k)[None, :],
            )
        # The scratch rows written above are read back by other threads of this program.
        tl.debug_barrier()
        for d0 in range(0, d, BLOCK_D):
            features = d0 + tl.arange(0, BLOCK_D)
            features_ok = features < d
            update = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
            for k0 in range(0, k, BLOCK_K):
                basis = k0 + tl.arange(0, BLOCK_K)
                basis_ok = basis < k
                t = tl.load(
                    scratch_rows + basis.to(tl.int64)[None, :] * stride_sk,
                    mask=rows_ok[:, None] & basis_ok[None, :],
                    other=0.0,
                )
                u = tl.load(
                    u_ptr + features.to(tl.int64)[:, None] * stride_ud + basis.to(tl.int64)[None, :] * stride_uk,
                    mask=features_ok[:, None] & basis_ok[None, :],
                    other=0.0,
                )
                update = tl.dot(t, tl.trans(u), update, input_precision=INPUT_PRECISION)
            write_rows(g_rows, rows_ok, features, features_ok, stride_gd, update, SUBTRACT, SOFTWARE_BF16)


def overlaps_itself(G: torch.Tensor) -> bool:
    """True when two elements of the 2-D G share memory (e.g. an expanded view)."""
    dims = sorted((stride, size) for stride, size in zip(G.stride(), G.shape) if size > 1)
    if not dims:
        return False
    if dims[0][0] == 0:
        return True
    return len(dims) == 2 and dims[1][0] < dims[0][0] * dims[0][1]


def _project(G: torch.Tensor, U: torch.Tensor, subtract: bool, input_precision: str, block_k: int | None):
    name = "project_" if subtract else "restrict_"
    check_input_precision(input_precision)
    if G.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"{name} (triton): G must be fp32/bf16/fp16, got {G.dtype}")
    if U.dtype != torch.float32:
        raise TypeError(f"{name} (triton): the basis must be float32, got {U.dtype}")
    if overlaps_itself(G):
        raise RuntimeError(f"{name}: G has overlapping memory (an expanded view?); it cannot be updated in place")
    M, d = G.shape
    k = U.shape[1]
    if G.numel() == 0:
        return G
    if k == 0:
        return G if subtract else G.zero_()
    if block_k is None:
        block_k = max(16, triton.next_power_of_2(k)) if k <= REGISTER_K else SCRATCH_BLOCK_K
    one_block = k <= block_k
    if one_block:
        scratch = G.new_empty((1, 1), dtype=torch.float32)
    else:
        scratch = torch.empty((M, k), dtype=torch.float32, device=G.device)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]),)  # noqa: E731
    projection_kernel[grid](
        G, U, scratch, M, d, k, triton.next_power_of_2(M),
        G.stride(0), G.stride(1), U.stride(0), U.stride(1), scratch.stride(0), scratch.stride(1),
        SUBTRACT=subtract, ONE_K_BLOCK=one_block,
        SOFTWARE_BF16=triton_interpreting() and G.dtype == torch.bfloat16, INPUT_PRECISION=input_precision, BLOCK_K=block_k,
    )
    return G


def project_(G: torch.Tensor, U: torch.Tensor, *, input_precision: str = "ieee", block_k: int | None = None):
    """``G <- G - (G U) U^T`` in place. G (out, d) fp32/bf16/fp16 any strides; U (d, k) fp32.

    ``input_precision="tf32"`` lets the fp32 products use TF32 tensor cores on a GPU;
    ``block_k`` forces the k block (tests use it to reach the scratch path).
    """
    return _project(G, U, True, input_precision, block_k)


def restrict_(G: torch.Tensor, Q: torch.Tensor, *, input_precision: str = "ieee", block_k: int | None = None):
    """``G <- (G Q) Q^T`` in place: the same kernel without the subtraction."""
    return _project(G, Q, False, input_precision, block_k)
