// Stride-1 conv covariance from shifted products of the padded input: C += P^T P without
// patches, with one GEMM per distinct tap shift instead of one per tap pair. See
// conv_covariance_shift.cpp and docs/extension.md, "Stride 1: shifted products".
#pragma once

#include <array>

#include <ATen/ATen.h>

namespace unsc_fast {

// Whether conv_covariance_shift_cpu_ handles this geometry: stride 1 and more than one tap
// (a 1x1 conv is a dense covariance, which the panel kernel's symmetric update does better).
bool conv_covariance_shift_applies(std::array<int64_t, 2> kernel_size, std::array<int64_t, 2> stride);

// C += P^T P over the stride-1 conv patches of x (B, Cin, H, W), F.unfold's column order,
// zero padding; C float32/float64 (any strides), x any float dtype and strides. The caller
// (conv_covariance_cpu_) has checked the geometry.
void conv_covariance_shift_cpu_(at::Tensor& C, const at::Tensor& x, std::array<int64_t, 2> kernel_size,
                                std::array<int64_t, 2> padding, std::array<int64_t, 2> dilation);

// Bytes conv_covariance_shift_cpu_ allocates besides C at the current thread count.
int64_t conv_covariance_shift_workspace_bytes(const std::array<int64_t, 4>& x_shape,
                                              std::array<int64_t, 2> kernel_size,
                                              std::array<int64_t, 2> padding,
                                              std::array<int64_t, 2> dilation, int64_t element_size);

}  // namespace unsc_fast
