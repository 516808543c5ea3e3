// Adaptive randomized eigenbasis at an energy threshold (see unsc_fast/ops/randomized.py, the
// reference this code follows operation by operation).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <vector>

namespace unsc_fast {

struct RandomizedOptions {
  int64_t power_iterations = 2;
  int64_t oversampling = 10;
  int64_t block_size = 32;
  // "householder", "cholesky", or "auto" (Householder on CPU, CholeskyQR on CUDA).
  std::string orthonormalization = "auto";
};

// (d, k) orthonormal basis in C's dtype, or nullopt when the sketch ran out before the
// threshold was reached (the caller then uses the dense eigensolver).
std::optional<at::Tensor> energy_basis_randomized(const at::Tensor& C, double threshold,
                                                  const at::Tensor& sketch,
                                                  const RandomizedOptions& options);

// The same for many layers in one call.
std::vector<std::optional<at::Tensor>> energy_bases_randomized(
    const std::vector<at::Tensor>& covariances, double threshold,
    const std::vector<at::Tensor>& sketches, const RandomizedOptions& options);


}  // namespace unsc_fast
