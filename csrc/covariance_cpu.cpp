// CPU covariance kernels (see covariance_cpu.h).
//
// Why not F.unfold + addmm: the unfolded patch matrix of an All-CNN layer is B*L x 9*Cin
// floats (1.8 GB for 256 images of 96 channels), written once by unfold, copied again by
// the transpose+reshape, then read by one GEMM that computes both triangles of a symmetric
// result. Here the patches are gathered a few output rows at a time straight from x into a
// small (d, M) panel already in F.unfold's row order (no permutation needed), in C's dtype,
// and each panel feeds a symmetric rank-M update that computes only block rows on and
// above the diagonal. Every product is an ATen addmm_ on views (BLAS, no copies).
#include "covariance_cpu.h"
#include "conv_covariance_shift.h"
#include "conv_covariance_spectral.h"
#include "mirrored_add.h"
#include "parallel_accumulate.h"

#include <algorithm>
#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/core/GradMode.h>

namespace unsc_fast {
namespace {

// Bytes of the patch panel the conv kernel gathers at a time: large enough that each GEMM
// has a long reduction (BLAS efficiency), small enough to stay cache-resident.
constexpr int64_t kPanelBytes = int64_t(4) << 20;
// Dense x is cut into this many rows per job at least (shorter GEMMs lose BLAS efficiency).
constexpr int64_t kMinRowsPerJob = 512;

// Block rows of the d x d upper triangle: fewer, wider blocks run BLAS nearer its peak,
// more blocks skip more of the lower triangle ((nb + 1) / (2 nb) of the full FLOPs).
int64_t block_size_for(int64_t d) {
  if (d <= 256) return d;  // one block: the triangle saving does not pay for the split
  const int64_t blocks = std::min<int64_t>(8, d / 128);
  return (d + blocks - 1) / blocks;
}

// Output positions along one axis (F.unfold's and conv's formula).
int64_t output_size(int64_t extent, int64_t kernel, int64_t stride, int64_t padding, int64_t dilation) {
  return (extent + 2 * padding - dilation * (kernel - 1) - 1) / stride + 1;
}

// Multiply-adds of the panel kernel's symmetric update per patch: (nb + 1) / (2 nb) of d^2.
double panel_cost_per_patch(int64_t d) {
  const int64_t blocks = (d + block_size_for(d) - 1) / block_size_for(d);
  return static_cast<double>(d) * static_cast<double>(d) * static_cast<double>(blocks + 1) / (2.0 * blocks);
}

enum class ConvKernel { panel, shift, spectral };

// Of the kernels that apply (the shift kernel: stride 1, more than one tap; its spectral
// products: also "same"-like padding, and only when allowed: they round differently from the
// reference), the one with the fewest weighted multiply-adds per image
// (conv_covariance_shift_cost); the panel kernel on a tie.
ConvKernel choose_conv_kernel(const std::array<int64_t, 4>& x_shape, std::array<int64_t, 2> kernel_size,
                              std::array<int64_t, 2> stride, std::array<int64_t, 2> padding,
                              std::array<int64_t, 2> dilation, bool allow_spectral) {
  if (stride[0] != 1 || stride[1] != 1 || kernel_size[0] * kernel_size[1] == 1) return ConvKernel::panel;
  const int64_t d = x_shape[1] * kernel_size[0] * kernel_size[1];
  const int64_t out_h = output_size(x_shape[2], kernel_size[0], 1, padding[0], dilation[0]);
  const int64_t out_w = output_size(x_shape[3], kernel_size[1], 1, padding[1], dilation[1]);
  ConvKernel best = ConvKernel::panel;
  double lowest = panel_cost_per_patch(d) * static_cast<double>(out_h * out_w);
  const double shift = conv_covariance_shift_cost(x_shape, kernel_size, padding, dilation, ShiftedProducts::direct);
  if (shift <= lowest) best = ConvKernel::shift, lowest = shift;
  if (allow_spectral && spectral_products_apply(kernel_size, padding, dilation) &&
      conv_covariance_shift_cost(x_shape, kernel_size, padding, dilation, ShiftedProducts::spectral) < lowest) {
    best = ConvKernel::spectral;
  }
  return best;
}

ShiftedProducts products_of(ConvKernel kernel) {
  return kernel == ConvKernel::spectral ? ShiftedProducts::spectral : ShiftedProducts::direct;
}

// W[i0:i1, i0:d] (+)= block-row products of the panel F so that W's upper triangle
// (diagonal included) holds the increment F^T F. The panel is (k x d), "rows are samples"
// (dense x), or (d x k), "rows are features" (the conv panel, F^T stored). Each block row
// is one addmm_ on views, which ATen sends to BLAS with leading dimensions (no copies);
// beta 0 overwrites (whatever W held is ignored), 1 accumulates.
void symmetric_update_upper(at::Tensor& W, const at::Tensor& panel, bool rows_are_features,
                            double beta) {
  const int64_t d = W.size(0);
  const int64_t block = block_size_for(d);
  for (int64_t i0 = 0; i0 < d; i0 += block) {
    const int64_t rows = std::min(block, d - i0);
    const int64_t cols = d - i0;
    at::Tensor out = W.narrow(0, i0, rows).narrow(1, i0, cols);
    if (rows_are_features) {
      out.addmm_(panel.narrow(0, i0, rows), panel.narrow(0, i0, cols).t(), beta, 1.0);
    } else {
      out.addmm_(panel.narrow(1, i0, rows).t(), panel.narrow(1, i0, cols), beta, 1.0);
    }
  }
}

struct ConvGeometry {
  int64_t channels, height, width, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w,
      dilation_h, dilation_w, out_h, out_w;
};

// First and one-past-last output column whose input column j*dilation - pad + ow*stride
// lies inside [0, width): outside it the patch entry is zero padding.
std::pair<int64_t, int64_t> valid_columns(const ConvGeometry& g, int64_t j) {
  const int64_t shift = j * g.dilation_w - g.pad_w;  // input column of output column 0
  const int64_t first = shift >= 0 ? 0 : (-shift + g.stride_w - 1) / g.stride_w;
  const int64_t last_input = g.width - 1 - shift;  // ow * stride <= last_input
  const int64_t end = last_input < 0 ? 0 : std::min(g.out_w, last_input / g.stride_w + 1);
  return {std::min(first, end), end};
}

// panel (d x M, row-major, M = rows * out_w): row c*kh*kw + i*kw + j, column
// (output row q - q0) * out_w + ow, holds x[b, c, ih, iw] (or 0 in the padding), where
// q = b * out_h + oh runs over [q0, q0 + rows). Converted to the accumulator type here.
template <typename in_t, typename acc_t>
void gather_panel(acc_t* panel, const in_t* x, const int64_t* strides, const ConvGeometry& g,
                  int64_t q0, int64_t rows) {
  const int64_t kernel_area = g.kernel_h * g.kernel_w;
  const int64_t d = g.channels * kernel_area;
  const int64_t M = rows * g.out_w;
  at::parallel_for(0, d, 1, [&](int64_t begin, int64_t end) {
    for (int64_t feature = begin; feature < end; ++feature) {
      const int64_t c = feature / kernel_area;
      const int64_t i = (feature % kernel_area) / g.kernel_w;
      const int64_t j = feature % g.kernel_w;
      const auto [first, last] = valid_columns(g, j);
      const int64_t column_shift = j * g.dilation_w - g.pad_w;
      acc_t* out_row = panel + feature * M;
      for (int64_t q = q0; q < q0 + rows; ++q) {
        const int64_t b = q / g.out_h, oh = q % g.out_h;
        const int64_t ih = oh * g.stride_h + i * g.dilation_h - g.pad_h;
        acc_t* out = out_row + (q - q0) * g.out_w;
        if (ih < 0 || ih >= g.height) {
          std::fill(out, out + g.out_w, acc_t(0));
          continue;
        }
        const in_t* src = x + b * strides[0] + c * strides[1] + ih * strides[2];
        std::fill(out, out + first, acc_t(0));
        const int64_t step = g.stride_w * strides[3];
        const in_t* column = src + (first * g.stride_w + column_shift) * strides[3];
        for (int64_t ow = first; ow < last; ++ow, column += step) out[ow] = static_cast<acc_t>(*column);
        std::fill(out + last, out + g.out_w, acc_t(0));
      }
    }
  });
}

// Output rows (b, oh) per panel: at most about kPanelBytes of panel (at least one row), in
// equal panels spread evenly over the threads.
int64_t panel_rows(int64_t d, int64_t out_w, int64_t total_rows, int64_t element_size) {
  const int64_t per_row = std::max<int64_t>(1, d * out_w * element_size);
  return balanced_job_size(total_rows, kPanelBytes / per_row);
}

}  // namespace

int64_t conv_covariance_workspace_bytes(const std::array<int64_t, 4>& x_shape, std::array<int64_t, 2> kernel_size,
                                        std::array<int64_t, 2> stride, std::array<int64_t, 2> padding,
                                        std::array<int64_t, 2> dilation, int64_t element_size, bool allow_spectral) {
  const ConvKernel chosen = choose_conv_kernel(x_shape, kernel_size, stride, padding, dilation, allow_spectral);
  if (chosen != ConvKernel::panel) {
    return conv_covariance_shift_workspace_bytes(x_shape, kernel_size, padding, dilation, element_size,
                                                 products_of(chosen));
  }
  const int64_t d = x_shape[1] * kernel_size[0] * kernel_size[1];
  const int64_t out_h = output_size(x_shape[2], kernel_size[0], stride[0], padding[0], dilation[0]);
  const int64_t out_w = output_size(x_shape[3], kernel_size[1], stride[1], padding[1], dilation[1]);
  const int64_t total_rows = x_shape[0] * out_h;
  const int64_t rows = panel_rows(d, out_w, total_rows, element_size);
  const int64_t workers = accumulation_workers((total_rows + rows - 1) / rows);
  // Per worker thread: a d x d partial sum and one panel; plus nothing else (no copy of x).
  return workers * (d * d + d * rows * out_w) * element_size;
}

void covariance_cpu_(at::Tensor& C, const at::Tensor& x) {
  c10::AutoGradMode no_grad(false);  // statistics, never differentiated: no graph from x.to()
  TORCH_CHECK(C.device().is_cpu() && x.device().is_cpu(), "covariance_cpu_: CPU tensors only");
  TORCH_CHECK(C.scalar_type() == at::kFloat || C.scalar_type() == at::kDouble,
              "covariance_cpu_: C must be float32 or float64");
  TORCH_CHECK(x.dim() == 2 && C.dim() == 2 && C.size(0) == x.size(1) && C.size(1) == x.size(1),
              "covariance_cpu_: need x (N, d) and C (d, d)");
  const int64_t N = x.size(0), d = x.size(1);
  if (N == 0 || d == 0) return;
  at::Tensor rows = x.to(C.scalar_type());
  // BLAS takes either layout with a leading dimension; anything else is copied once.
  const bool row_major = rows.stride(1) == 1 && rows.stride(0) >= std::max<int64_t>(1, d);
  const bool column_major = rows.stride(0) == 1 && rows.stride(1) >= std::max<int64_t>(1, N);
  if (!row_major && !column_major) rows = rows.contiguous();
  const bool features_are_rows = !row_major && column_major;
  const at::Tensor& panel = rows;  // (N, d); its transpose is row-major when features_are_rows
  const int64_t jobs = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), N / kMinRowsPerJob));
  const int64_t rows_per_job = (N + jobs - 1) / jobs;
  at::Tensor W = accumulate_per_thread(d, jobs, C.options(), [&](at::Tensor& acc, int64_t job, int64_t) {
    const int64_t start = job * rows_per_job;
    const int64_t count = std::min(rows_per_job, N - start);
    if (count <= 0) return;
    at::Tensor part = panel.narrow(0, start, count);
    symmetric_update_upper(acc, features_are_rows ? part.t() : part, features_are_rows, 1.0);
  });
  AT_DISPATCH_FLOATING_TYPES(C.scalar_type(), "covariance_cpu_", [&] {
    const scalar_t* w = W.const_data_ptr<scalar_t>();
    add_mirrored<scalar_t>(C, d, [w, d](int64_t r, int64_t s) { return w[r * d + s]; });
  });
}

std::string conv_covariance_kernel(const std::array<int64_t, 4>& x_shape, std::array<int64_t, 2> kernel_size,
                                   std::array<int64_t, 2> stride, std::array<int64_t, 2> padding,
                                   std::array<int64_t, 2> dilation, bool allow_spectral) {
  switch (choose_conv_kernel(x_shape, kernel_size, stride, padding, dilation, allow_spectral)) {
    case ConvKernel::shift: return "shift";
    case ConvKernel::spectral: return "spectral";
    default: return "panel";
  }
}

void conv_covariance_cpu_(at::Tensor& C, const at::Tensor& x, std::array<int64_t, 2> kernel_size,
                          std::array<int64_t, 2> stride, std::array<int64_t, 2> padding,
                          std::array<int64_t, 2> dilation, const std::string& kernel) {
  TORCH_CHECK(kernel == "auto" || kernel == "fast" || kernel == "panel" || kernel == "shift" || kernel == "spectral",
              "conv_covariance_cpu_: kernel must be auto, fast, panel, shift or spectral, got ", kernel);
  c10::AutoGradMode no_grad(false);
  TORCH_CHECK(C.device().is_cpu() && x.device().is_cpu(), "conv_covariance_cpu_: CPU tensors only");
  TORCH_CHECK(C.scalar_type() == at::kFloat || C.scalar_type() == at::kDouble,
              "conv_covariance_cpu_: C must be float32 or float64");
  TORCH_CHECK(x.dim() == 4, "conv_covariance_cpu_: x must be (B, Cin, H, W)");
  for (int axis = 0; axis < 2; ++axis) {
    TORCH_CHECK(kernel_size[axis] >= 1 && stride[axis] >= 1 && dilation[axis] >= 1 && padding[axis] >= 0,
                "conv_covariance_cpu_: need kernel_size, stride, dilation >= 1 and padding >= 0");
  }
  ConvGeometry g{x.size(1), x.size(2), x.size(3), kernel_size[0], kernel_size[1], stride[0], stride[1],
                 padding[0], padding[1], dilation[0], dilation[1], 0, 0};
  g.out_h = output_size(g.height, g.kernel_h, g.stride_h, g.pad_h, g.dilation_h);
  g.out_w = output_size(g.width, g.kernel_w, g.stride_w, g.pad_w, g.dilation_w);
  TORCH_CHECK(g.out_h >= 1 && g.out_w >= 1,
              "conv_covariance_cpu_: the kernel does not fit the padded input (output size ", g.out_h,
              " x ", g.out_w, ")");
  const int64_t d = g.channels * g.kernel_h * g.kernel_w;
  TORCH_CHECK(C.dim() == 2 && C.size(0) == d && C.size(1) == d, "conv_covariance_cpu_: C must be (", d,
              ", ", d, ")");
  const int64_t total_rows = x.size(0) * g.out_h;
  if (total_rows == 0 || d == 0) return;
  const std::array<int64_t, 4> shape{x.size(0), x.size(1), x.size(2), x.size(3)};
  TORCH_CHECK((kernel != "shift" && kernel != "spectral") || (stride[0] == 1 && stride[1] == 1),
              "conv_covariance_cpu_: the shift kernel needs stride 1, got stride (", stride[0], ", ", stride[1], ")");
  const ConvKernel chosen = kernel == "auto"       ? choose_conv_kernel(shape, kernel_size, stride, padding, dilation, false)
                            : kernel == "fast"     ? choose_conv_kernel(shape, kernel_size, stride, padding, dilation, true)
                            : kernel == "shift"    ? ConvKernel::shift
                            : kernel == "spectral" ? ConvKernel::spectral
                                                   : ConvKernel::panel;
  if (chosen != ConvKernel::panel) {
    conv_covariance_shift_cpu_(C, x, kernel_size, padding, dilation, products_of(chosen));
    return;
  }
  const int64_t strides[4] = {x.stride(0), x.stride(1), x.stride(2), x.stride(3)};
  AT_DISPATCH_FLOATING_TYPES(C.scalar_type(), "conv_covariance_cpu_", [&] {
    using acc_t = scalar_t;
    const int64_t rows_per_panel = panel_rows(d, g.out_w, total_rows, sizeof(acc_t));
    const int64_t panels = (total_rows + rows_per_panel - 1) / rows_per_panel;
    const int64_t workers = accumulation_workers(panels);
    std::vector<at::Tensor> buffers(workers);
    for (auto& buffer : buffers) buffer = at::empty({d * rows_per_panel * g.out_w}, C.options());
    at::Tensor W;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "conv_covariance_gather", [&] {
      const scalar_t* source = x.const_data_ptr<scalar_t>();
      W = accumulate_per_thread(d, panels, C.options(), [&](at::Tensor& acc, int64_t index, int64_t worker) {
        const int64_t q0 = index * rows_per_panel;
        const int64_t rows = std::min(rows_per_panel, total_rows - q0);
        const int64_t M = rows * g.out_w;
        at::Tensor& buffer = buffers[worker];
        gather_panel<scalar_t, acc_t>(buffer.data_ptr<acc_t>(), source, strides, g, q0, rows);
        symmetric_update_upper(acc, buffer.narrow(0, 0, d * M).view({d, M}), true, 1.0);
      });
    });
    const acc_t* w = W.const_data_ptr<acc_t>();
    add_mirrored<acc_t>(C, d, [w, d](int64_t r, int64_t s) { return w[r * d + s]; });
  });
}

}  // namespace unsc_fast
