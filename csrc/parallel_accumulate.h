// One d x d partial sum per torch thread, summed at the end: the threading scheme of the CPU
// covariance kernels (covariance_cpu.cpp, conv_covariance_shift.cpp).
#pragma once

#include <algorithm>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

namespace unsc_fast {

// Worker threads accumulate_per_thread will use for this many jobs.
inline int64_t accumulation_workers(int64_t jobs) {
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), jobs));
}

// Runs job(W, index) for index in [0, jobs), spread round-robin over the threads, each
// thread summing into its own zeroed d x d accumulator (and passing its worker number, so
// that jobs can reuse per-worker buffers); returns their sum. Each thread runs its GEMMs
// single-threaded (BLAS inside a parallel region), so a 2-core machine runs two
// independent jobs at once instead of splitting every small GEMM in two. The accumulators
// are (d + extra_rows) x d: room for a kernel's side sums (the shift kernel's exact diagonal).
template <typename Job>
at::Tensor accumulate_per_thread(int64_t d, int64_t jobs, const at::TensorOptions& options, const Job& job,
                                 int64_t extra_rows = 0) {
  const int64_t workers = accumulation_workers(jobs);
  std::vector<at::Tensor> partial(workers);
  for (auto& W : partial) W = at::zeros({d + extra_rows, d}, options);
  // Grain 0: even a single worker runs inside a parallel region, so the many small ATen
  // ops of a job run serially instead of each opening (and, on a busy machine, waiting
  // for) a thread team of its own.
  at::parallel_for(0, workers, 0, [&](int64_t begin, int64_t end) {
    for (int64_t worker = begin; worker < end; ++worker) {
      for (int64_t index = worker; index < jobs; index += workers) job(partial[worker], index, worker);
    }
  });
  for (int64_t worker = 1; worker < workers; ++worker) partial[0].add_(partial[worker]);
  return partial[0];
}

// Items per job when `items` are cut into jobs of at most `fitting` items (at least one):
// a multiple of the thread count of equal jobs, so that no thread idles while another works
// through a last job alone (5 panels on 2 threads took the time of 3).
inline int64_t balanced_job_size(int64_t items, int64_t fitting) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  fitting = std::max<int64_t>(1, fitting);
  const int64_t rounds = (items + fitting * threads - 1) / (fitting * threads);
  const int64_t jobs = std::max<int64_t>(1, rounds * threads);
  return std::max<int64_t>(1, (items + jobs - 1) / jobs);
}

}  // namespace unsc_fast
