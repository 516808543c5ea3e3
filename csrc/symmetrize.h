// CUDA launchers of csrc/symmetrize_cuda.cu. Plain pointers and a stream, no torch headers,
// so nvcc can compile the kernels on a machine whose torch has no CUDA (CI syntax check).
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace unsc_fast {

// out = (in + in^T) / 2 for a contiguous row-major (d, d) matrix; out must not alias in.
void launch_symmetrize_float(const float* in, float* out, int64_t d, cudaStream_t stream);
void launch_symmetrize_double(const double* in, double* out, int64_t d, cudaStream_t stream);

}  // namespace unsc_fast
