// CPU covariance kernels: C += X^T X and C += P^T P over conv patches, computing only the
// blocks on and above the diagonal (the result is symmetric) and never materialising the
// unfolded (B*L, Cin*kh*kw) patch matrix. See docs/extension.md, "CPU covariance".
#pragma once

#include <array>
#include <string>

#include <ATen/ATen.h>

namespace unsc_fast {

// C += x^T x in C's precision (float32 or float64); x: (N, d), any float dtype and strides.
void covariance_cpu_(at::Tensor& C, const at::Tensor& x);

// C += P^T P where the rows of P are the conv patches of x (B, Cin, H, W), in F.unfold's
// column order (c * kh * kw + i * kw + j); zero padding. Pairs are (height, width).
// kernel: "auto" (conv_covariance_kernel's choice among the exact-order kernels: panel or
// shift), "fast" (its choice with the spectral products allowed: fewer multiply-adds, rounding
// that differs from the reference's within a stated bound), "panel" (any geometry), "shift"
// (stride 1 only, direct shifted products) or "spectral" (the shift kernel with its products
// through the DFT; stride 1 and (kernel - 1) * dilation <= 2 * padding): the last three let
// tests hold each kernel to the reference on every geometry it takes.
void conv_covariance_cpu_(at::Tensor& C, const at::Tensor& x, std::array<int64_t, 2> kernel_size,
                          std::array<int64_t, 2> stride, std::array<int64_t, 2> padding,
                          std::array<int64_t, 2> dilation, const std::string& kernel = "auto");

// The kernel "auto" (allow_spectral false) or "fast" (true) runs for this geometry: of "panel",
// "shift" (a stride-1 conv with more than one tap) and, when allowed, "spectral" (also
// "same"-like padding), the one with the fewest weighted multiply-adds per image.
std::string conv_covariance_kernel(const std::array<int64_t, 4>& x_shape, std::array<int64_t, 2> kernel_size,
                                   std::array<int64_t, 2> stride, std::array<int64_t, 2> padding,
                                   std::array<int64_t, 2> dilation, bool allow_spectral = false);

// Bytes conv_covariance_cpu_ (kernel auto, or fast with allow_spectral) allocates besides C for
// x of x_shape (B, Cin, H, W) at the current torch thread count: what benchmarks report beside the unfold buffer
// (B * out_h * out_w * d elements) that it replaces. Per worker thread: a d x d partial sum
// plus one patch panel (strided or 1x1) or one chunk of padded input and its products (stride 1).
int64_t conv_covariance_workspace_bytes(const std::array<int64_t, 4>& x_shape, std::array<int64_t, 2> kernel_size,
                                        std::array<int64_t, 2> stride, std::array<int64_t, 2> padding,
                                        std::array<int64_t, 2> dilation, int64_t element_size,
                                        bool allow_spectral = false);

}  // namespace unsc_fast
