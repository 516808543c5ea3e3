// Stride-1 conv covariance from shifted products of the padded input.
//
// With stride 1, the block of P^T P for the tap pair (a, b) (taps a = (i, j) in F.unfold's
// order) is  S(a, b) = sum over the windows o of x[o + a] x[o + b]^T : a Cin x Cin
// correlation of the input with itself at the shift b - a, summed over the positions of
// tap a's window. Laid out as X = (Cin, images * Hp * Wp) of the zero-padded input, "x at
// p + shift" is X read `offset = dh * Wp + dw` columns further on, so one GEMM over every
// position of the chunk, F(offset) = X[:, 0:T] X[:, offset:offset+T]^T, holds the sum over
// the whole padded batch, and is shared by every tap pair with that offset: 13 GEMMs for
// the 45 upper pairs of a 3x3 kernel (the panel kernel does 58 % of 81 blocks' work). Each
// pair then subtracts what F holds outside its window:
//   - the rows above and below the window (all columns),
//   - the columns left and right of it, within the window's rows,
// taken only where x is real data (padding contributes zero): for "same" padding that is
// one row or one column on each side, a few percent of F. Read past a row's end, p + offset
// lands in the next row (or image, or the zero guard after the chunk); F and the
// corrections read the same X at the same places, so such terms cancel exactly and the
// window's sum is what remains.
//
// The blocks are accumulated tap-major (row a * Cin + c), upper pairs only, and written to
// C in F.unfold's order (row c * taps + a) at the end, mirrored so the increment is exactly
// symmetric (a diagonal block's lower triangle is never read).
//
// Where the kernel's reads past a row's end land in zero padding ("same" padding), F is the
// plain 2-D correlation of the images at each shift, which conv_covariance_spectral.cpp
// computes for the whole batch through the DFT with a fifth to a third of the multiply-adds; the chunks
// then only subtract the corrections, and F is added once at the end.
#include "conv_covariance_shift.h"
#include "conv_covariance_spectral.h"
#include "mirrored_add.h"
#include "parallel_accumulate.h"

#include <algorithm>
#include <map>
#include <utility>
#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/core/GradMode.h>

namespace unsc_fast {
namespace {

// Bytes of padded input per chunk: the 13-odd GEMMs of a 3x3 kernel read it again and
// again, so it should stay in the last-level cache, and each GEMM's reduction (images *
// Hp * Wp) stays long enough for BLAS efficiency.
constexpr int64_t kChunkBytes = int64_t(4) << 20;

// Cost weight of the spectral products against the direct ones per multiply-add: their GEMMs
// reduce over the images of a call only (a few dozen) and the transforms are memory bound;
// measured 1.8x slower per multiply-add on All-CNN's 16x16 and 32x32 layers (43 images, one thread).
constexpr double kSpectralWeight = 2.0;

struct ShiftGeometry {
  int64_t channels, height, width, kernel_h, kernel_w, pad_h, pad_w, dilation_h, dilation_w;
  int64_t padded_h, padded_w, out_h, out_w;

  ShiftGeometry(const std::array<int64_t, 4>& shape, std::array<int64_t, 2> kernel,
                std::array<int64_t, 2> padding, std::array<int64_t, 2> dilation)
      : channels(shape[1]), height(shape[2]), width(shape[3]), kernel_h(kernel[0]), kernel_w(kernel[1]),
        pad_h(padding[0]), pad_w(padding[1]), dilation_h(dilation[0]), dilation_w(dilation[1]),
        padded_h(shape[2] + 2 * padding[0]), padded_w(shape[3] + 2 * padding[1]),
        out_h(padded_h - dilation[0] * (kernel[0] - 1)), out_w(padded_w - dilation[1] * (kernel[1] - 1)) {}

  int64_t taps() const { return kernel_h * kernel_w; }
  int64_t image() const { return padded_h * padded_w; }  // positions of one padded image
  int64_t tap_row(int64_t a) const { return (a / kernel_w) * dilation_h; }  // window origin
  int64_t tap_col(int64_t a) const { return (a % kernel_w) * dilation_w; }
  int64_t offset(int64_t a, int64_t b) const {  // >= 0 for a <= b (rows first)
    return (tap_row(b) - tap_row(a)) * padded_w + tap_col(b) - tap_col(a);
  }
  // The largest offset: the zero guard after a chunk, so that every shifted read stays inside.
  int64_t guard() const { return offset(0, taps() - 1); }
  bool real_row(int64_t r) const { return r >= pad_h && r < pad_h + height; }
  bool real_col(int64_t c) const { return c >= pad_w && c < pad_w + width; }
};

// Positions (row * Wp + col in one padded image) of real data in the rows outside the
// window of tap row r0, all columns: the rows part of what F holds beyond the window.
std::vector<int64_t> outside_rows(const ShiftGeometry& g, int64_t r0) {
  std::vector<int64_t> positions;
  for (int64_t r = 0; r < g.padded_h; ++r) {
    if (!g.real_row(r) || (r >= r0 && r < r0 + g.out_h)) continue;
    for (int64_t c = g.pad_w; c < g.pad_w + g.width; ++c) positions.push_back(r * g.padded_w + c);
  }
  return positions;
}

// Positions of real data inside the window's rows but left or right of its columns.
std::vector<int64_t> outside_columns(const ShiftGeometry& g, int64_t r0, int64_t c0) {
  std::vector<int64_t> positions;
  for (int64_t r = std::max(r0, g.pad_h); r < std::min(r0 + g.out_h, g.pad_h + g.height); ++r) {
    for (int64_t c = 0; c < g.padded_w; ++c) {
      if (g.real_col(c) && (c < c0 || c >= c0 + g.out_w)) positions.push_back(r * g.padded_w + c);
    }
  }
  return positions;
}

// Whether any of the positions, read `offset` columns on, holds real data in some image (a read
// past an image's end lands in the next one, or in the zero guard after the last): a
// correction whose partners are all padding is exactly zero, and skipped (most of them for
// "same" padding: the row below the window's has no partner further down).
bool partners_hold_data(const ShiftGeometry& g, const std::vector<int64_t>& positions, int64_t offset) {
  for (const int64_t p : positions) {
    const int64_t t = (p + offset) % g.image();
    if (g.real_row(t / g.padded_w) && g.real_col(t % g.padded_w)) return true;
  }
  return false;
}

// What one call computes, shared by every chunk: the upper tap pairs, their distinct
// offsets (one F each), the correction positions per tap row and per tap, and the
// distinct (tap row, offset) row corrections.
struct ShiftPlan {
  std::vector<std::pair<int64_t, int64_t>> pairs;
  std::vector<int64_t> offsets, pair_offset;
  std::vector<TapShift> shifts;                                        // per offset: (rows, columns)
  std::vector<std::vector<int64_t>> row_positions, column_positions;  // per kernel row, per tap
  std::vector<std::pair<int64_t, int64_t>> row_keys;                   // (kernel row, offset index)
  std::vector<int64_t> pair_row_key;                                   // -1: nothing (or only zeros) outside
  std::vector<int64_t> row_key_first;  // per row key: the first key of its kernel row (they are consecutive)
  std::vector<int64_t> row_key_count;  // per row key: how many keys its kernel row has
  std::vector<std::vector<int64_t>> column_pairs;  // per tap a: its pairs whose column correction is not zero

  explicit ShiftPlan(const ShiftGeometry& g) {
    std::map<int64_t, int64_t> offset_index;
    std::map<std::pair<int64_t, int64_t>, int64_t> row_key_index;
    for (int64_t i = 0; i < g.kernel_h; ++i) row_positions.push_back(outside_rows(g, i * g.dilation_h));
    for (int64_t a = 0; a < g.taps(); ++a) column_positions.push_back(outside_columns(g, g.tap_row(a), g.tap_col(a)));
    column_pairs.resize(g.taps());
    for (int64_t a = 0; a < g.taps(); ++a) {
      for (int64_t b = a; b < g.taps(); ++b) {
        const int64_t off = g.offset(a, b);
        auto found = offset_index.emplace(off, static_cast<int64_t>(offsets.size()));
        if (found.second) {
          offsets.push_back(off);
          shifts.emplace_back(g.tap_row(b) - g.tap_row(a), g.tap_col(b) - g.tap_col(a));
        }
        pairs.emplace_back(a, b);
        pair_offset.push_back(found.first->second);
        if (!column_positions[a].empty() && partners_hold_data(g, column_positions[a], off)) {
          column_pairs[a].push_back(static_cast<int64_t>(pairs.size()) - 1);
        }
        const int64_t row = a / g.kernel_w;
        if (row_positions[row].empty() || !partners_hold_data(g, row_positions[row], off)) {
          pair_row_key.push_back(-1);
          continue;
        }
        auto key = row_key_index.emplace(std::make_pair(row, found.first->second),
                                         static_cast<int64_t>(row_keys.size()));
        if (key.second) row_keys.emplace_back(row, found.first->second);
        pair_row_key.push_back(key.first->second);
      }
    }
    for (size_t k = 0; k < row_keys.size(); ++k) {
      const bool starts_row = k == 0 || row_keys[k - 1].first != row_keys[k].first;
      row_key_first.push_back(starts_row ? static_cast<int64_t>(k) : row_key_first.back());
    }
    for (size_t k = 0; k < row_keys.size(); ++k) {
      row_key_count.push_back(static_cast<int64_t>(
          std::count(row_key_first.begin(), row_key_first.end(), row_key_first[k])));
    }
  }

  // Correction panels stacked in one GEMM: a kernel row's offsets, or a tap's partners.
  int64_t widest_stack(const ShiftGeometry& g) const {
    return std::max<int64_t>(static_cast<int64_t>(offsets.size()), g.taps());
  }

  int64_t widest_correction() const {
    size_t widest = 0;
    for (const auto& p : row_positions) widest = std::max(widest, p.size());
    for (const auto& p : column_positions) widest = std::max(widest, p.size());
    return static_cast<int64_t>(widest);
  }
};

// Images per chunk: at most kChunkBytes of padded input (at least one image), in equal
// chunks spread evenly over the threads.
int64_t images_per_chunk(const ShiftGeometry& g, int64_t batch, int64_t element_size) {
  const int64_t per_image = std::max<int64_t>(1, g.channels * g.image() * element_size);
  return balanced_job_size(batch, kChunkBytes / per_image);
}

// One worker's buffers, reused chunk after chunk.
struct ShiftWorkspace {
  at::Tensor input;        // (Cin, images * Hp * Wp + guard), zero-padded
  at::Tensor shifted;      // (offsets, Cin, Cin): F per offset
  at::Tensor row_terms;    // per kernel row with corrections, (Cin, its keys * Cin), one after the other
  at::Tensor near;         // (Cin, images * widest correction): positions outside a window
  at::Tensor far;          // (stack * Cin, images * widest correction): their partners at several offsets
  at::Tensor column_terms; // (Cin, taps * Cin): one tap's column corrections

  ShiftWorkspace(const ShiftGeometry& g, const ShiftPlan& plan, int64_t images, const at::TensorOptions& options,
                 ShiftedProducts products) {
    const int64_t cin = g.channels;
    input = at::empty({cin, images * g.image() + g.guard()}, options);
    shifted = at::empty({products == ShiftedProducts::direct ? static_cast<int64_t>(plan.offsets.size()) : 0, cin, cin},
                        options);
    row_terms = at::empty({static_cast<int64_t>(plan.row_keys.size()) * cin * cin}, options);
    near = at::empty({cin * images * plan.widest_correction()}, options);
    far = at::empty({plan.widest_stack(g) * cin * images * plan.widest_correction()}, options);
    column_terms = at::empty({g.taps() * cin * cin}, options);
  }

  static int64_t bytes(const ShiftGeometry& g, const ShiftPlan& plan, int64_t images, int64_t element_size,
                       ShiftedProducts products) {
    const int64_t cin = g.channels;
    const int64_t offsets = products == ShiftedProducts::direct ? static_cast<int64_t>(plan.offsets.size()) : 0;
    const int64_t elements = cin * (images * g.image() + g.guard()) +
                             (offsets + static_cast<int64_t>(plan.row_keys.size()) + g.taps()) * cin * cin +
                             (1 + plan.widest_stack(g)) * cin * images * plan.widest_correction();
    return elements * element_size;
  }
};

// input[c, b * Hp * Wp + (h + pad_h) * Wp + w + pad_w] = x[b0 + b, c, h, w], zeros elsewhere.
template <typename in_t, typename acc_t>
void fill_padded(acc_t* input, int64_t length, const in_t* x, const int64_t* strides, const ShiftGeometry& g,
                 int64_t b0, int64_t images) {
  std::fill(input, input + g.channels * length, acc_t(0));
  for (int64_t c = 0; c < g.channels; ++c) {
    for (int64_t b = 0; b < images; ++b) {
      acc_t* image = input + c * length + b * g.image() + g.pad_h * g.padded_w + g.pad_w;
      const in_t* source = x + (b0 + b) * strides[0] + c * strides[1];
      for (int64_t h = 0; h < g.height; ++h) {
        acc_t* out = image + h * g.padded_w;
        const in_t* row = source + h * strides[2];
        if (strides[3] == 1) {  // the usual layout: a unit-stride loop the compiler vectorises
          for (int64_t w = 0; w < g.width; ++w) out[w] = static_cast<acc_t>(row[w]);
        } else {
          for (int64_t w = 0; w < g.width; ++w) out[w] = static_cast<acc_t>(row[w * strides[3]]);
        }
      }
    }
  }
}

// (Cin, images * n) view of `buffer` from element `start`: input at the n positions of every
// image, `shift` columns on.
template <typename acc_t>
at::Tensor gather(at::Tensor& buffer, int64_t start, const at::Tensor& input, const ShiftGeometry& g,
                  int64_t images, const std::vector<int64_t>& positions, int64_t shift) {
  const int64_t n = static_cast<int64_t>(positions.size()), length = input.size(1);
  acc_t* out = buffer.data_ptr<acc_t>() + start;
  const acc_t* in = input.const_data_ptr<acc_t>();
  for (int64_t c = 0; c < g.channels; ++c) {
    for (int64_t b = 0; b < images; ++b) {
      const acc_t* image = in + c * length + b * g.image() + shift;
      acc_t* row = out + (c * images + b) * n;
      for (int64_t m = 0; m < n; ++m) row[m] = image[positions[m]];
    }
  }
  return buffer.narrow(0, start, g.channels * images * n).view({g.channels, images * n});
}

// diagonal[a * Cin + c] += the sum of x_c^2 over tap a's window: exactly what the diagonal of
// P^T P holds, a sum of squares. F - R - K would leave rounding of the whole padded domain
// there instead (a small negative value where the window holds only zeros), and downstream
// checks rightly read a negative diagonal as a broken covariance. Row sums of squares are
// accumulated per output column (a loop the compiler vectorises), then added up.
template <typename acc_t>
void add_window_squares(acc_t* diagonal, const at::Tensor& input, const ShiftGeometry& g, int64_t images) {
  const int64_t length = input.size(1);
  const acc_t* in = input.const_data_ptr<acc_t>();
  std::vector<acc_t> columns(g.out_w);
  for (int64_t a = 0; a < g.taps(); ++a) {
    for (int64_t c = 0; c < g.channels; ++c) {
      std::fill(columns.begin(), columns.end(), acc_t(0));
      for (int64_t b = 0; b < images; ++b) {
        const acc_t* window = in + c * length + b * g.image() + g.tap_row(a) * g.padded_w + g.tap_col(a);
        for (int64_t oh = 0; oh < g.out_h; ++oh) {
          const acc_t* row = window + oh * g.padded_w;
          for (int64_t ow = 0; ow < g.out_w; ++ow) columns[ow] += row[ow] * row[ow];
        }
      }
      acc_t total = 0;
      for (const acc_t value : columns) total += value;
      diagonal[a * g.channels + c] += total;
    }
  }
}

// W (taps * Cin square, tap-major, plus a last row for the exact diagonal) += the upper
// tap-pair blocks of images [b0, b0 + images); without the shifted products F where they
// come from the spectral path (added once for the whole batch by the caller).
template <typename in_t, typename acc_t>
void accumulate_chunk(at::Tensor& W, ShiftWorkspace& work, const ShiftGeometry& g, const ShiftPlan& plan,
                      const in_t* x, const int64_t* strides, int64_t b0, int64_t images, ShiftedProducts products) {
  const int64_t cin = g.channels, span = images * g.image();
  const bool direct = products == ShiftedProducts::direct;
  at::Tensor& input = work.input;  // a short last chunk leaves zeros past its span
  fill_padded<in_t, acc_t>(input.data_ptr<acc_t>(), input.size(1), x, strides, g, b0, images);
  const at::Tensor here = input.narrow(1, 0, span);
  for (size_t o = 0; direct && o < plan.offsets.size(); ++o) {
    at::Tensor out = work.shifted.select(0, static_cast<int64_t>(o));
    at::mm_out(out, here, input.narrow(1, plan.offsets[o], span).t());
  }
  // Row corrections, one GEMM per kernel row: its outside positions against their partners at
  // every offset of that row's keys, stacked.
  for (size_t k0 = 0; k0 < plan.row_keys.size();) {
    const int64_t row = plan.row_keys[k0].first;
    size_t k1 = k0;
    while (k1 < plan.row_keys.size() && plan.row_keys[k1].first == row) ++k1;
    const auto& positions = plan.row_positions[row];
    const int64_t panel = cin * images * static_cast<int64_t>(positions.size()), keys = static_cast<int64_t>(k1 - k0);
    const at::Tensor near = gather<acc_t>(work.near, 0, input, g, images, positions, 0);
    for (size_t k = k0; k < k1; ++k) {
      gather<acc_t>(work.far, static_cast<int64_t>(k - k0) * panel, input, g, images, positions,
                    plan.offsets[plan.row_keys[k].second]);
    }
    at::Tensor out = work.row_terms.narrow(0, static_cast<int64_t>(k0) * cin * cin, keys * cin * cin)
                         .view({cin, keys * cin});
    at::mm_out(out, near, work.far.narrow(0, 0, keys * panel).view({keys * cin, panel / cin}).t());
    k0 = k1;
  }
  for (size_t p = 0; p < plan.pairs.size(); ++p) {
    const auto [a, b] = plan.pairs[p];
    at::Tensor block = W.narrow(0, a * cin, cin).narrow(1, b * cin, cin);
    if (direct) block.add_(work.shifted.select(0, plan.pair_offset[p]));
    const int64_t key = plan.pair_row_key[p];
    if (key < 0) continue;
    const int64_t first = plan.row_key_first[key], keys = plan.row_key_count[key];
    block.sub_(work.row_terms.narrow(0, first * cin * cin, keys * cin * cin)
                   .view({cin, keys * cin})
                   .narrow(1, (key - first) * cin, cin));
  }
  // Column corrections, one GEMM per tap a: its window's outside columns against the partners
  // of its pairs (a, b) that read data there, stacked.
  for (int64_t a = 0; a < g.taps(); ++a) {
    const auto& columns = plan.column_positions[a];
    const auto& stacked = plan.column_pairs[a];
    if (stacked.empty()) continue;
    const int64_t panel = cin * images * static_cast<int64_t>(columns.size());
    const int64_t partners = static_cast<int64_t>(stacked.size());
    const at::Tensor near = gather<acc_t>(work.near, 0, input, g, images, columns, 0);
    for (int64_t j = 0; j < partners; ++j) {
      gather<acc_t>(work.far, j * panel, input, g, images, columns, plan.offsets[plan.pair_offset[stacked[j]]]);
    }
    at::Tensor out = work.column_terms.narrow(0, 0, partners * cin * cin).view({cin, partners * cin});
    at::mm_out(out, near, work.far.narrow(0, 0, partners * panel).view({partners * cin, panel / cin}).t());
    for (int64_t j = 0; j < partners; ++j) {
      W.narrow(0, a * cin, cin).narrow(1, plan.pairs[stacked[j]].second * cin, cin).sub_(out.narrow(1, j * cin, cin));
    }
  }
  const int64_t d = cin * g.taps();
  add_window_squares<acc_t>(W.data_ptr<acc_t>() + d * d, input, g, images);
}

// The value of C[r, s] (r <= s, F.unfold's order r = c * taps + a) in the tap-major upper
// blocks of W (row a * Cin + c): block (a, b) when a <= b, else the transpose of (b, a); on
// the diagonal, the exact sums of squares in W's last row.
template <typename T>
struct TapMajorUpper {
  const T* W;
  int64_t d;
  std::vector<int64_t> tap, row;  // per index r = c * taps + a: a, and W's row a * Cin + c

  TapMajorUpper(const T* W, int64_t channels, int64_t taps) : W(W), d(channels * taps), tap(d), row(d) {
    for (int64_t r = 0; r < d; ++r) {
      tap[r] = r % taps;
      row[r] = tap[r] * channels + r / taps;
    }
  }
  T operator()(int64_t r, int64_t s) const {
    if (r == s) return W[d * d + row[r]];
    return tap[r] <= tap[s] ? W[row[r] * d + row[s]] : W[row[s] * d + row[r]];
  }
};

}  // namespace

double conv_covariance_shift_cost(const std::array<int64_t, 4>& x_shape, std::array<int64_t, 2> kernel_size,
                                  std::array<int64_t, 2> padding, std::array<int64_t, 2> dilation,
                                  ShiftedProducts products) {
  const ShiftGeometry g(x_shape, kernel_size, padding, dilation);
  const ShiftPlan plan(g);
  double corrections = 0;
  for (const auto& [row, offset] : plan.row_keys) corrections += static_cast<double>(plan.row_positions[row].size());
  for (int64_t a = 0; a < g.taps(); ++a) {
    corrections += static_cast<double>(plan.column_pairs[a].size() * plan.column_positions[a].size());
  }
  const double channels_squared = static_cast<double>(g.channels) * static_cast<double>(g.channels);
  const double shifted = products == ShiftedProducts::direct
                             ? static_cast<double>(plan.offsets.size()) * static_cast<double>(g.image()) *
                                   channels_squared
                             : kSpectralWeight * spectral_products_cost(x_shape, plan.shifts);
  return shifted + 2 * corrections * channels_squared;
}

int64_t conv_covariance_shift_workspace_bytes(const std::array<int64_t, 4>& x_shape,
                                              std::array<int64_t, 2> kernel_size,
                                              std::array<int64_t, 2> padding,
                                              std::array<int64_t, 2> dilation, int64_t element_size,
                                              ShiftedProducts products) {
  const ShiftGeometry g(x_shape, kernel_size, padding, dilation);
  const ShiftPlan plan(g);
  const int64_t images = images_per_chunk(g, x_shape[0], element_size);
  const int64_t workers = accumulation_workers((x_shape[0] + images - 1) / images);
  const int64_t d = g.channels * g.taps();
  const int64_t spectral = products == ShiftedProducts::spectral
                               ? spectral_products_workspace_bytes(x_shape, plan.shifts, element_size)
                               : 0;
  return spectral + workers * ((d + 1) * d * element_size + ShiftWorkspace::bytes(g, plan, images, element_size,
                                                                                  products));
}

void conv_covariance_shift_cpu_(at::Tensor& C, const at::Tensor& x, std::array<int64_t, 2> kernel_size,
                                std::array<int64_t, 2> padding, std::array<int64_t, 2> dilation,
                                ShiftedProducts products) {
  c10::AutoGradMode no_grad(false);
  const ShiftGeometry g({x.size(0), x.size(1), x.size(2), x.size(3)}, kernel_size, padding, dilation);
  const ShiftPlan plan(g);
  const int64_t batch = x.size(0), d = g.channels * g.taps();
  const int64_t strides[4] = {x.stride(0), x.stride(1), x.stride(2), x.stride(3)};
  TORCH_CHECK(products == ShiftedProducts::direct || spectral_products_apply(kernel_size, padding, dilation),
              "conv_covariance_cpu_: spectral products need (kernel - 1) * dilation <= 2 * padding on both axes");
  AT_DISPATCH_FLOATING_TYPES(C.scalar_type(), "conv_covariance_shift", [&] {
    using acc_t = scalar_t;
    // F for the whole batch first (its ATen ops use every thread), then the corrections per chunk
    const at::Tensor shifted = products == ShiftedProducts::spectral
                                   ? spectral_shifted_products(x, plan.shifts, C.scalar_type())
                                   : at::Tensor();
    const int64_t images = images_per_chunk(g, batch, sizeof(acc_t));
    const int64_t chunks = (batch + images - 1) / images;
    std::vector<ShiftWorkspace> workspaces;
    for (int64_t w = 0; w < accumulation_workers(chunks); ++w) {
      workspaces.emplace_back(g, plan, images, C.options(), products);
    }
    at::Tensor W;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "conv_covariance_shift_fill", [&] {
      const scalar_t* source = x.const_data_ptr<scalar_t>();
      W = accumulate_per_thread(d, chunks, C.options(), [&](at::Tensor& acc, int64_t chunk, int64_t worker) {
        const int64_t b0 = chunk * images;
        accumulate_chunk<scalar_t, acc_t>(acc, workspaces[worker], g, plan, source, strides, b0,
                                          std::min(images, batch - b0), products);
      }, /*extra_rows=*/1);
    });
    if (shifted.defined()) {
      const int64_t cin = g.channels;
      for (size_t p = 0; p < plan.pairs.size(); ++p) {
        const auto [a, b] = plan.pairs[p];
        W.narrow(0, a * cin, cin).narrow(1, b * cin, cin).add_(shifted.select(0, plan.pair_offset[p]));
      }
    }
    add_mirrored<acc_t>(C, d, TapMajorUpper<acc_t>(W.const_data_ptr<acc_t>(), g.channels, g.taps()));
  });
}

}  // namespace unsc_fast
