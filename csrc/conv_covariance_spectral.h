// The shift kernel's shifted products through the 2-D discrete Fourier transform: the same
// F(s) for every tap shift s with a fifth to a third of the multiply-adds on All-CNN's layers.
// See conv_covariance_spectral.cpp and docs/extension.md, "Stride 1: shifted products".
#pragma once

#include <array>
#include <utility>
#include <vector>

#include <ATen/ATen.h>

namespace unsc_fast {

// A tap shift (rows, columns) between two taps of a conv kernel.
using TapShift = std::pair<int64_t, int64_t>;

// Whether the shift kernel's F equals the zero-extended 2-D correlation that
// spectral_shifted_products computes: its reads past a row's (or image's) end must land in
// zero padding, i.e. the kernel's span (k - 1) * dilation is at most twice the padding on
// both axes (true for "same" padding).
bool spectral_products_apply(std::array<int64_t, 2> kernel_size, std::array<int64_t, 2> padding,
                             std::array<int64_t, 2> dilation);

// Multiply-adds of spectral_shifted_products per image of x (B, Cin, H, W) for these shifts
// (transforms, products and the inverse at the shifts, which runs once per image group).
double spectral_products_cost(const std::array<int64_t, 4>& x_shape, const std::vector<TapShift>& shifts);

// F[s] = sum over the images b and positions p of x[b, :, p] x[b, :, p + shifts[s]]^T, with x
// zero outside its H x W image: (shifts, Cin, Cin) in `dtype` (float32/float64), for x of any
// float dtype and strides. Within a stated bound of the direct sums, not bitwise equal to them
// (tests/ops/test_covariance_ext.py).
at::Tensor spectral_shifted_products(const at::Tensor& x, const std::vector<TapShift>& shifts,
                                     at::ScalarType dtype);

// Bytes spectral_shifted_products allocates for x of x_shape at element_size.
int64_t spectral_products_workspace_bytes(const std::array<int64_t, 4>& x_shape, const std::vector<TapShift>& shifts,
                                          int64_t element_size);

}  // namespace unsc_fast
