// The shift kernel's shifted products F(s) through the 2-D discrete Fourier transform.
//
// F(s) = sum_p x[:, p] x[:, p + s]^T (x zero outside the image) is a cross-correlation of
// every channel pair at the kernel's few tap shifts s = (dh, dw). By the correlation theorem,
// with X(f) the DFT of every channel on an L_h x L_w grid large enough that no shift wraps
// around (L = extent + the largest |shift| per axis),
//   F(s) = 1/(L_h L_w) sum_f Re( conj(X(f)) X(f)^T e^{2 pi i (f_h dh / L_h + f_w dw / L_w)} ),
// summed over the images. x is real, so half the frequencies (f_h <= L_h / 2, weighted twice
// where their mirror is left out) hold the whole sum. With A = Re X(f) and B = Im X(f) as
// (images x Cin) matrices, conj(X)^T X summed over the images is
//   S(f) = (A^T A + B^T B) + i (G - G^T),  G = A^T B,
// so per frequency one (Cin x 2n)(2n x Cin) and one (Cin x n)(n x Cin) product over the n
// images: 3 Cin^2 multiply-adds per image and frequency, against Cin^2 per image, padded
// position and distinct shift for the direct products (13 shifts for a 3x3 kernel): an eighth
// on All-CNN's 16x16 and 32x32 maps, a fifth to a third with the transforms and the inverse. The transforms themselves are two
// small dense DFT matrices applied as GEMMs (real DFT down the rows, complex along them), laid
// out so that their result is already (frequency, [re | im] x image, channel); the inverse at
// the shifts is one GEMM per block of frequencies against tables of weighted cosines and sines.
#include "conv_covariance_spectral.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>

#include <c10/core/GradMode.h>

namespace unsc_fast {
namespace {

// Transformed images per group (the (frequencies, 2 n, Cin) spectrum is the largest buffer),
// and spectral products per block of frequencies (folded into F block by block, so that the
// (frequencies, Cin, Cin) products are never all alive at once).
constexpr int64_t kGroupBytes = int64_t(16) << 20;
constexpr int64_t kBlockBytes = int64_t(4) << 20;
constexpr int64_t kMinBlockFrequencies = 8;

struct SpectralGrid {
  int64_t channels, height, width, length_h, length_w, half_h;

  SpectralGrid(const std::array<int64_t, 4>& shape, const std::vector<TapShift>& shifts)
      : channels(shape[1]), height(shape[2]), width(shape[3]) {
    int64_t reach_h = 0, reach_w = 0;
    for (const auto& [dh, dw] : shifts) {
      reach_h = std::max<int64_t>(reach_h, std::abs(dh));
      reach_w = std::max<int64_t>(reach_w, std::abs(dw));
    }
    length_h = height + reach_h;  // a shift of at most reach_h never wraps onto the image
    length_w = width + reach_w;
    half_h = length_h / 2 + 1;
  }

  int64_t frequencies() const { return half_h * length_w; }

  int64_t images_per_group(int64_t batch, int64_t element_size) const {
    const int64_t per_image = std::max<int64_t>(1, 2 * frequencies() * channels * element_size);
    const int64_t fitting = std::max<int64_t>(1, kGroupBytes / per_image);
    const int64_t groups = (batch + fitting - 1) / fitting;
    return (batch + groups - 1) / groups;  // equal groups: no short last one
  }

  int64_t block_frequencies(int64_t element_size) const {
    const int64_t per_frequency = std::max<int64_t>(1, 2 * channels * channels * element_size);
    return std::min(frequencies(), std::max(kMinBlockFrequencies, kBlockBytes / per_frequency));
  }
};

// The DFT matrices and the inverse tables, in float64 then cast to the working dtype.
struct SpectralTables {
  at::Tensor rows;     // (2 Hf, H): rows (f_h, re | im): cos, -sin of 2 pi f_h h / L_h
  at::Tensor columns;  // (2 L_w, 2 W): rows (f_w, re | im), columns (re | im, w): e^{-i phi} on a complex row
  at::Tensor cosines;  // (shifts, frequencies): weight(f_h) cos(theta_f(s)) / (L_h L_w)
  at::Tensor sines;    // (shifts, frequencies): -weight(f_h) sin(theta_f(s)) / (L_h L_w)

  SpectralTables(const SpectralGrid& g, const std::vector<TapShift>& shifts, at::ScalarType dtype) {
    const auto f64 = at::TensorOptions().dtype(at::kDouble);
    const double two_pi = 2.0 * M_PI;
    rows = at::empty({2 * g.half_h, g.height}, f64);
    auto r = rows.accessor<double, 2>();
    for (int64_t fh = 0; fh < g.half_h; ++fh) {
      for (int64_t h = 0; h < g.height; ++h) {
        const double phi = two_pi * static_cast<double>((fh * h) % g.length_h) / static_cast<double>(g.length_h);
        r[2 * fh][h] = std::cos(phi);
        r[2 * fh + 1][h] = -std::sin(phi);
      }
    }
    // (Tr + i Ti) e^{-i phi} = (cos Tr + sin Ti) + i (cos Ti - sin Tr)
    columns = at::zeros({2 * g.length_w, 2 * g.width}, f64);
    auto c = columns.accessor<double, 2>();
    for (int64_t fw = 0; fw < g.length_w; ++fw) {
      for (int64_t w = 0; w < g.width; ++w) {
        const double phi = two_pi * static_cast<double>((fw * w) % g.length_w) / static_cast<double>(g.length_w);
        const double cos_phi = std::cos(phi), sin_phi = std::sin(phi);
        c[2 * fw][w] = cos_phi;
        c[2 * fw][g.width + w] = sin_phi;
        c[2 * fw + 1][w] = -sin_phi;
        c[2 * fw + 1][g.width + w] = cos_phi;
      }
    }
    const int64_t count = static_cast<int64_t>(shifts.size());
    cosines = at::empty({count, g.frequencies()}, f64);
    sines = at::empty({count, g.frequencies()}, f64);
    auto cs = cosines.accessor<double, 2>();
    auto sn = sines.accessor<double, 2>();
    const double scale = 1.0 / static_cast<double>(g.length_h * g.length_w);
    for (int64_t s = 0; s < count; ++s) {
      const auto [dh, dw] = shifts[s];
      for (int64_t fh = 0; fh < g.half_h; ++fh) {
        // f_h and L_h - f_h give conjugate terms: the half spectrum counts the others twice
        const bool unpaired = fh == 0 || 2 * fh == g.length_h;
        const double weight = (unpaired ? 1.0 : 2.0) * scale;
        for (int64_t fw = 0; fw < g.length_w; ++fw) {
          const int64_t turns_h = ((fh * dh) % g.length_h + g.length_h) % g.length_h;
          const int64_t turns_w = ((fw * dw) % g.length_w + g.length_w) % g.length_w;
          const double theta = two_pi * (static_cast<double>(turns_h) / static_cast<double>(g.length_h) +
                                         static_cast<double>(turns_w) / static_cast<double>(g.length_w));
          cs[s][fh * g.length_w + fw] = weight * std::cos(theta);
          sn[s][fh * g.length_w + fw] = -weight * std::sin(theta);
        }
      }
    }
    rows = rows.to(dtype);
    columns = columns.to(dtype);
    cosines = cosines.to(dtype);
    sines = sines.to(dtype);
  }
};

}  // namespace

bool spectral_products_apply(std::array<int64_t, 2> kernel_size, std::array<int64_t, 2> padding,
                             std::array<int64_t, 2> dilation) {
  for (int axis = 0; axis < 2; ++axis) {
    if ((kernel_size[axis] - 1) * dilation[axis] > 2 * padding[axis]) return false;
  }
  return true;
}

double spectral_products_cost(const std::array<int64_t, 4>& x_shape, const std::vector<TapShift>& shifts) {
  const SpectralGrid g(x_shape, shifts);
  const double c = static_cast<double>(g.channels), frequencies = static_cast<double>(g.frequencies());
  const double transforms = c * static_cast<double>(2 * g.half_h * g.height * g.width +
                                                    g.half_h * 2 * g.length_w * 2 * g.width);
  const double products = 3.0 * frequencies * c * c;
  const int64_t batch = std::max<int64_t>(1, x_shape[0]);
  const int64_t groups = (batch + g.images_per_group(batch, 4) - 1) / g.images_per_group(batch, 4);
  const double inverse = 2.0 * static_cast<double>(shifts.size()) * frequencies * c * c *
                         static_cast<double>(groups) / static_cast<double>(batch);
  return transforms + products + inverse;
}

int64_t spectral_products_workspace_bytes(const std::array<int64_t, 4>& x_shape, const std::vector<TapShift>& shifts,
                                          int64_t element_size) {
  const SpectralGrid g(x_shape, shifts);
  const int64_t n = g.images_per_group(std::max<int64_t>(1, x_shape[0]), element_size);
  const int64_t c = g.channels, count = static_cast<int64_t>(shifts.size());
  const int64_t elements = n * c * g.height * g.width +         // the group, transposed
                           2 * g.half_h * g.width * n * c +      // after the row transform
                           2 * g.frequencies() * n * c +         // the spectrum
                           2 * g.block_frequencies(element_size) * c * c +  // a block's products
                           2 * count * c * c;                    // F and its antisymmetric part
  return elements * element_size;
}

at::Tensor spectral_shifted_products(const at::Tensor& x, const std::vector<TapShift>& shifts,
                                     at::ScalarType dtype) {
  c10::AutoGradMode no_grad(false);
  const std::array<int64_t, 4> shape{x.size(0), x.size(1), x.size(2), x.size(3)};
  const SpectralGrid g(shape, shifts);
  const SpectralTables tables(g, shifts, dtype);
  const auto options = x.options().dtype(dtype);
  const int64_t batch = shape[0], c = g.channels, count = static_cast<int64_t>(shifts.size());
  const int64_t frequencies = g.frequencies(), element_size = static_cast<int64_t>(c10::elementSize(dtype));
  at::Tensor F = at::zeros({count, c, c}, options);
  at::Tensor antisymmetric = at::zeros({count, c, c}, options);  // sum of sines x G; minus its transpose
  const int64_t block = g.block_frequencies(element_size);
  at::Tensor real_products = at::empty({block, c, c}, options);
  at::Tensor cross_products = at::empty({block, c, c}, options);
  const int64_t group = g.images_per_group(std::max<int64_t>(1, batch), element_size);
  for (int64_t b0 = 0; b0 < batch; b0 += group) {
    const int64_t n = std::min(group, batch - b0);
    // (H W, n Cin): the images of the group, one column per (image, channel)
    const at::Tensor columns = x.narrow(0, b0, n).to(dtype).reshape({n * c, g.height * g.width}).t().contiguous();
    // real DFT down the rows: (Hf, [re | im] x W, n Cin)
    const at::Tensor rows_done = at::mm(tables.rows, columns.view({g.height, g.width * n * c}))
                                     .view({g.half_h, 2 * g.width, n * c});
    // complex DFT along them: (Hf, L_w x [re | im], n Cin) = (frequencies, [re | im] x n, Cin)
    at::Tensor transformed = at::empty({g.half_h, 2 * g.length_w, n * c}, options);
    for (int64_t fh = 0; fh < g.half_h; ++fh) {
      at::Tensor out = transformed.select(0, fh);
      at::mm_out(out, tables.columns, rows_done.select(0, fh));
    }
    const at::Tensor spectrum = transformed.view({frequencies, 2 * n, c});
    for (int64_t f0 = 0; f0 < frequencies; f0 += block) {
      const int64_t fb = std::min(block, frequencies - f0);
      const at::Tensor part = spectrum.narrow(0, f0, fb);
      at::Tensor real = real_products.narrow(0, 0, fb);
      at::Tensor cross = cross_products.narrow(0, 0, fb);
      at::bmm_out(real, part.transpose(1, 2), part);                                  // A^T A + B^T B
      at::bmm_out(cross, part.narrow(1, 0, n).transpose(1, 2), part.narrow(1, n, n));  // G = A^T B
      F.view({count, c * c}).addmm_(tables.cosines.narrow(1, f0, fb), real.reshape({fb, c * c}));
      antisymmetric.view({count, c * c}).addmm_(tables.sines.narrow(1, f0, fb), cross.reshape({fb, c * c}));
    }
  }
  F.add_(antisymmetric).sub_(antisymmetric.transpose(1, 2));
  return F;
}

}  // namespace unsc_fast
