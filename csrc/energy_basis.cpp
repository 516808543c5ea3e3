// Adaptive randomized range finder + Rayleigh-Ritz for the energy-threshold basis
// (Halko, Martinsson, Tropp 2011: Alg. 4.2 made blockwise, subspace iteration of Alg. 4.4,
// Rayleigh-Ritz of Alg. 5.3). Every step mirrors unsc_fast/ops/randomized.py: the same ATen
// operations in the same order, so on CPU both give bitwise identical bases for the same
// sketch. Change one, change the other.
#include "energy_basis.h"

#include <algorithm>
#include <limits>
#include <stdexcept>
#include <tuple>

#ifdef UNSC_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "symmetrize.h"
#endif

namespace unsc_fast {
namespace {

double machine_epsilon(at::ScalarType dtype) {
  return dtype == at::kDouble ? std::numeric_limits<double>::epsilon()
                              : static_cast<double>(std::numeric_limits<float>::epsilon());
}

// Exact symmetry, checked tile by tile: comparing C with C^T whole would copy C^T.
bool is_symmetric(const at::Tensor& C) {
  constexpr int64_t kTile = 1024;
  const int64_t d = C.size(0);
  for (int64_t i = 0; i < d; i += kTile) {
    const int64_t rows = std::min(kTile, d - i);
    for (int64_t j = i; j < d; j += kTile) {
      const int64_t cols = std::min(kTile, d - j);
      if (!at::equal(C.narrow(0, i, rows).narrow(1, j, cols),
                     C.narrow(0, j, cols).narrow(1, i, rows).mT())) {
        return false;
      }
    }
  }
  return true;
}

// (C + C^T) / 2. On CUDA one tiled pass of our kernel, bitwise equal to the ATen ops.
at::Tensor symmetrize(const at::Tensor& C) {
#ifdef UNSC_WITH_CUDA
  if (C.is_cuda()) {
    const c10::cuda::CUDAGuard guard(C.device());
    const at::Tensor source = C.contiguous();
    at::Tensor result = at::empty_like(source);
    const auto stream = c10::cuda::getCurrentCUDAStream(C.device().index()).stream();
    if (C.scalar_type() == at::kDouble) {
      launch_symmetrize_double(source.data_ptr<double>(), result.data_ptr<double>(), C.size(0),
                               stream);
    } else {
      launch_symmetrize_float(source.data_ptr<float>(), result.data_ptr<float>(), C.size(0),
                              stream);
    }
    return result;
  }
#endif
  // An exactly symmetric C is its own (C + C^T) / 2, bitwise: no d x d copies (the projector
  // hands over symmetrised sums; a 25,088-wide layer's matrix is 2.5 GB). Same rule as
  // randomized.symmetrized in the reference.
  if (is_symmetric(C)) {
    return C;
  }
  return (C + C.mT()) / 2;
}

at::Tensor householder_orthonormalize(const at::Tensor& Y) {
  return std::get<0>(at::linalg_qr(Y, "reduced"));
}

// One CholeskyQR pass, Y R^{-1} with R^T R = Y^T Y + shift I; nullopt when Cholesky fails.
std::optional<at::Tensor> cholesky_pass(const at::Tensor& Y, double shift) {
  at::Tensor gram = at::matmul(Y.mT(), Y);
  if (shift > 0.0) {
    gram.diagonal().add_(shift);
  }
  auto [factor, info] = at::linalg_cholesky_ex(gram);
  if (info.item<int64_t>() != 0) {
    return std::nullopt;
  }
  return at::linalg_solve_triangular(factor.mT(), Y, /*upper=*/true, /*left=*/false);
}

// Shifted CholeskyQR3 (Fukaya et al. 2020), Householder when a factorisation fails.
at::Tensor cholesky_orthonormalize(const at::Tensor& Y) {
  const int64_t rows = Y.size(0);
  const int64_t cols = Y.size(1);
  const double eps = machine_epsilon(Y.scalar_type());
  const double norm_squared = Y.square().sum(at::kDouble).item<double>();
  const double shift =
      11.0 * static_cast<double>(rows * cols + cols * (cols + 1)) * eps * norm_squared;
  std::optional<at::Tensor> Q;
  if (shift > 0.0) {
    Q = cholesky_pass(Y, shift);
  }
  if (Q) {
    Q = cholesky_pass(*Q, 0.0);
  }
  if (Q) {
    Q = cholesky_pass(*Q, 0.0);
  }
  if (!Q) {
    return householder_orthonormalize(Y);
  }
  return *Q;
}

at::Tensor orthonormalize(const at::Tensor& Y, bool cholesky) {
  return cholesky ? cholesky_orthonormalize(Y) : householder_orthonormalize(Y);
}

// Y - Q (Q^T Y): remove the span of the basis found so far.
at::Tensor deflate(const at::Tensor& Y, const at::Tensor& Q) {
  if (Q.size(1) == 0) {
    return Y;
  }
  return Y - at::matmul(Q, at::matmul(Q.mT(), Y));
}

int64_t next_block(int64_t filled, int64_t block_size, int64_t width) {
  return std::min(std::max(block_size, filled / 2), width - filled);
}

// randomized.sketch_cannot_reach: after a block, the missing energy needs at least
// (target - captured) / level more columns (level: the block's smallest Rayleigh quotient); when
// that overruns the sketch, stop and let the dense fallback run.
bool sketch_cannot_reach(double captured, double target, double level, int64_t filled,
                         int64_t width, int64_t oversampling) {
  if (!(level > 0.0)) {
    return false;
  }
  return static_cast<double>(filled) + (target - captured) / level +
             static_cast<double>(oversampling) >
         static_cast<double>(width);
}

int64_t energy_count(const at::Tensor& cumulative, double target) {
  return at::searchsorted(cumulative, at::Scalar(target)).item<int64_t>() + 1;
}

// randomized.ritz_cut: the rank rule of reference.energy_rank on Ritz values, or nullopt
// while the sketch cannot decide it yet. The total is trace(C), known exactly.
std::optional<int64_t> ritz_cut(const at::Tensor& theta, double trace, double threshold,
                                double eps, int64_t d, int64_t filled, int64_t oversampling,
                                bool complete) {
  const double largest = theta.select(0, 0).item<double>();
  if (!(largest > 0.0)) {
    return 0;
  }
  const int64_t numerical_rank =
      at::gt(theta, static_cast<double>(d) * eps * largest).sum().item<int64_t>();
  const at::Tensor cumulative = theta.cumsum(0);
  const double captured = cumulative.select(0, -1).item<double>();
  int64_t k = 0;
  if (complete) {
    k = energy_count(cumulative, threshold * captured);
  } else {
    const double target = threshold * trace;
    if (captured < target) {
      return std::nullopt;
    }
    k = energy_count(cumulative, target);
    if (k + oversampling > filled) {
      return std::nullopt;
    }
  }
  return threshold >= 1.0 ? std::min(k, numerical_rank) : std::min(k, theta.numel());
}

bool use_cholesky(const std::string& method, const at::Tensor& C) {
  if (method == "auto") {
    return C.is_cuda();
  }
  if (method == "cholesky") {
    return true;
  }
  if (method == "householder") {
    return false;
  }
  throw std::invalid_argument("orthonormalization must be 'auto', 'householder' or 'cholesky', got '" +
                              method + "'");
}

void check_inputs(const at::Tensor& C, const at::Tensor& sketch) {
  TORCH_CHECK(C.dim() == 2 && C.size(0) == C.size(1),
              "energy_basis: C must be a square matrix, got ", C.sizes());
  TORCH_CHECK(C.scalar_type() == at::kFloat || C.scalar_type() == at::kDouble,
              "energy_basis: C must be float32 or float64, got ", C.scalar_type());
  TORCH_CHECK(sketch.dim() == 2 && sketch.size(0) == C.size(0),
              "energy_basis: sketch must be (d, width) for d = ", C.size(0), ", got ",
              sketch.sizes());
  TORCH_CHECK(sketch.scalar_type() == C.scalar_type() && sketch.device() == C.device(),
              "energy_basis: sketch must match C's dtype and device");
}

}  // namespace

std::optional<at::Tensor> energy_basis_randomized(const at::Tensor& C, double threshold,
                                                  const at::Tensor& sketch,
                                                  const RandomizedOptions& options) {
  check_inputs(C, sketch);
  TORCH_CHECK(threshold > 0.0 && threshold <= 1.0,
              "energy_basis: threshold must be in (0, 1], got ", threshold);
  const bool cholesky = use_cholesky(options.orthonormalization, C);
  const int64_t d = C.size(0);
  const int64_t width = sketch.size(1);
  const double eps = machine_epsilon(C.scalar_type());
  const at::Tensor A = symmetrize(C);
  const double trace = A.diagonal().sum(at::kDouble).item<double>();
  if (!(trace > 0.0)) {
    return std::nullopt;
  }
  const double target = threshold * trace;
  const double exhausted_below = static_cast<double>(d) * eps * trace;
  at::Tensor Q = at::empty({d, 0}, A.options());
  at::Tensor AQ = at::empty({d, 0}, A.options());
  double captured = 0.0;
  double largest_quotient = 0.0;
  int64_t filled = 0;
  while (filled < width) {
    const int64_t block = next_block(filled, options.block_size, width);
    at::Tensor Y = at::matmul(A, sketch.slice(1, filled, filled + block));
    for (int64_t i = 0; i < options.power_iterations; ++i) {
      Y = at::matmul(A, orthonormalize(deflate(Y, Q), cholesky));
    }
    Y = orthonormalize(deflate(Y, Q), cholesky);
    Y = orthonormalize(deflate(Y, Q), cholesky);
    const at::Tensor AY = at::matmul(A, Y);
    const at::Tensor quotients = at::sum(Y * AY, {0}, false, at::kDouble);
    captured += quotients.sum().item<double>();
    largest_quotient = std::max(largest_quotient, quotients.max().item<double>());
    const double smallest = quotients.min().item<double>();
    const bool passed_floor = smallest < static_cast<double>(d) * eps * largest_quotient;
    Q = at::cat({Q, Y}, 1);
    AQ = at::cat({AQ, AY}, 1);
    filled += block;
    const bool exhausted = trace - captured <= exhausted_below;
    if (captured < target && !(exhausted || passed_floor || filled >= d)) {
      if (width < d && sketch_cannot_reach(captured, target, smallest, filled, width,
                                           options.oversampling)) {
        return std::nullopt;
      }
      continue;
    }
    at::Tensor H = at::matmul(Q.mT(), AQ).to(at::kDouble);
    H = (H + H.mT()) / 2;
    auto [theta, V] = at::linalg_eigh(H, "L");
    theta = theta.flip({0}).clamp_min(0.0);
    V = V.flip({1});
    const auto k = ritz_cut(theta, trace, threshold, eps, d, filled, options.oversampling,
                            exhausted || filled >= d);
    if (!k) {
      continue;
    }
    return at::matmul(Q, V.slice(1, 0, *k).to(C.scalar_type())).contiguous();
  }
  return std::nullopt;
}

std::vector<std::optional<at::Tensor>> energy_bases_randomized(
    const std::vector<at::Tensor>& covariances, double threshold,
    const std::vector<at::Tensor>& sketches, const RandomizedOptions& options) {
  TORCH_CHECK(covariances.size() == sketches.size(), "energy_bases: ", covariances.size(),
              " covariances but ", sketches.size(), " sketches");
  std::vector<std::optional<at::Tensor>> bases;
  bases.reserve(covariances.size());
  for (size_t i = 0; i < covariances.size(); ++i) {
    bases.push_back(energy_basis_randomized(covariances[i], threshold, sketches[i], options));
  }
  return bases;
}

}  // namespace unsc_fast
