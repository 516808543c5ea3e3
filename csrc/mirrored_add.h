// Adding a computed upper triangle to C as an exactly symmetric increment: C[r, s] += v and
// C[s, r] += v for r <= s, the one value v read once (never a second rounding of the same
// sum), for C of any strides. Shared by the CPU covariance kernels.
#pragma once

#include <algorithm>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

namespace unsc_fast {

// Square tiles of the d x d index space: both C[r, s] and its mirror C[s, r] are written by
// the task of the tile pair holding r <= s, so tasks never share an element, and each task
// writes its mirror tile column-wise within a few kilobytes of cache (a whole-matrix
// column-wise pass missed the cache on every element once d reached a few thousand).
constexpr int64_t kMirrorTile = 64;

// value(r, s) for r <= s gives the increment of C[r, s] and C[s, r].
template <typename T, typename Value>
void add_mirrored(at::Tensor& C, int64_t d, const Value& value) {
  T* c = C.data_ptr<T>();
  const int64_t row_stride = C.stride(0), col_stride = C.stride(1);
  const int64_t tiles = (d + kMirrorTile - 1) / kMirrorTile;
  at::parallel_for(0, tiles * tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t tile_r = task / tiles, tile_s = task % tiles;
      if (tile_r > tile_s) continue;
      const int64_t r_end = std::min(d, (tile_r + 1) * kMirrorTile), s_end = std::min(d, (tile_s + 1) * kMirrorTile);
      for (int64_t r = tile_r * kMirrorTile; r < r_end; ++r) {
        for (int64_t s = std::max(r, tile_s * kMirrorTile); s < s_end; ++s) {
          const T v = value(r, s);
          c[r * row_stride + s * col_stride] += v;
          if (s != r) c[s * row_stride + r * col_stride] += v;
        }
      }
    }
  });
}

}  // namespace unsc_fast
