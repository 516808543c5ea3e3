// Stride-1 conv covariance from shifted products of the padded input: C += P^T P without
// patches, with one GEMM per distinct tap shift instead of one per tap pair. See
// conv_covariance_shift.cpp and docs/extension.md, "Stride 1: shifted products".
#pragma once

#include <array>

#include <ATen/ATen.h>

namespace unsc_fast {

// Where the shifted products F come from: one GEMM per distinct offset ("direct"), or the
// 2-D DFT (conv_covariance_spectral.h; only where spectral_products_apply).
enum class ShiftedProducts { direct, spectral };

// Multiply-adds per image of conv_covariance_shift_cpu_ for a stride-1 conv with more than
// one tap (its corrections counted twice: their reductions are short, so BLAS runs them at
// a fraction of its rate; the spectral products weighted by kSpectralWeight, their GEMMs are
// small), for the caller to weigh against the panel kernel: on small maps (ResNet's 4x4
// stage) the padded positions and the corrections outweigh the saving.
double conv_covariance_shift_cost(const std::array<int64_t, 4>& x_shape, std::array<int64_t, 2> kernel_size,
                                  std::array<int64_t, 2> padding, std::array<int64_t, 2> dilation,
                                  ShiftedProducts products = ShiftedProducts::direct);

// C += P^T P over the stride-1 conv patches of x (B, Cin, H, W), F.unfold's column order,
// zero padding; C float32/float64 (any strides), x any float dtype and strides. The caller
// (conv_covariance_cpu_) has checked the geometry and chosen this kernel (and, for
// spectral products, that spectral_products_apply).
void conv_covariance_shift_cpu_(at::Tensor& C, const at::Tensor& x, std::array<int64_t, 2> kernel_size,
                                std::array<int64_t, 2> padding, std::array<int64_t, 2> dilation,
                                ShiftedProducts products = ShiftedProducts::direct);

// Bytes conv_covariance_shift_cpu_ allocates besides C at the current thread count.
int64_t conv_covariance_shift_workspace_bytes(const std::array<int64_t, 4>& x_shape,
                                              std::array<int64_t, 2> kernel_size,
                                              std::array<int64_t, 2> padding,
                                              std::array<int64_t, 2> dilation, int64_t element_size,
                                              ShiftedProducts products = ShiftedProducts::direct);

}  // namespace unsc_fast
