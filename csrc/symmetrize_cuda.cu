// (C + C^T) / 2 in one pass: each block stages a tile of C and the mirrored tile of C^T in
// shared memory so that both the reads and the writes are coalesced. The result is bitwise
// the ATen expression (C + C.mT()) / 2: one rounded add, then an exact halving.
#include "symmetrize.h"

#include <stdexcept>
#include <string>

namespace unsc_fast {
namespace {

constexpr int kTile = 32;
constexpr int kRows = 8;  // threads per tile column: each thread handles kTile / kRows rows

template <typename T>
__global__ void symmetrize_kernel(const T* __restrict__ in, T* __restrict__ out, int64_t d) {
  __shared__ T mirrored[kTile][kTile + 1];  // +1: no shared-memory bank conflicts
  const int64_t tile_row = static_cast<int64_t>(blockIdx.y) * kTile;
  const int64_t tile_col = static_cast<int64_t>(blockIdx.x) * kTile;
  // Load the tile of C at (tile_col, tile_row): its transpose lands on (tile_row, tile_col).
  for (int r = threadIdx.y; r < kTile; r += kRows) {
    const int64_t row = tile_col + r;
    const int64_t col = tile_row + threadIdx.x;
    if (row < d && col < d) {
      mirrored[threadIdx.x][r] = in[row * d + col];
    }
  }
  __syncthreads();
  for (int r = threadIdx.y; r < kTile; r += kRows) {
    const int64_t row = tile_row + r;
    const int64_t col = tile_col + threadIdx.x;
    if (row < d && col < d) {
      const T sum = in[row * d + col] + mirrored[r][threadIdx.x];
      out[row * d + col] = sum / static_cast<T>(2);
    }
  }
}

template <typename T>
void launch(const T* in, T* out, int64_t d, cudaStream_t stream) {
  if (d == 0) {
    return;
  }
  const int64_t tiles = (d + kTile - 1) / kTile;
  if (tiles > 65535) {
    throw std::invalid_argument("symmetrize: matrix too large for a 2-D grid");
  }
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(tiles));
  const dim3 threads(kTile, kRows);
  symmetrize_kernel<T><<<grid, threads, 0, stream>>>(in, out, d);
  const cudaError_t status = cudaGetLastError();
  if (status != cudaSuccess) {
    throw std::runtime_error(std::string("symmetrize kernel launch failed: ") +
                             cudaGetErrorString(status));
  }
}

}  // namespace

void launch_symmetrize_float(const float* in, float* out, int64_t d, cudaStream_t stream) {
  launch(in, out, d, stream);
}

void launch_symmetrize_double(const double* in, double* out, int64_t d, cudaStream_t stream) {
  launch(in, out, d, stream);
}

}  // namespace unsc_fast
