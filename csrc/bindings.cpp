// The door of the extension unsc_fast._C: Python bindings (pybind11) for csrc/.
#include <torch/extension.h>

#include "covariance_cpu.h"
#include "energy_basis.h"

namespace {

unsc_fast::RandomizedOptions make_options(int64_t power_iterations, int64_t oversampling,
                                          int64_t block_size, std::string orthonormalization) {
  TORCH_CHECK(power_iterations >= 0, "power_iterations must be >= 0, got ", power_iterations);
  TORCH_CHECK(oversampling >= 0, "oversampling must be >= 0, got ", oversampling);
  TORCH_CHECK(block_size >= 1, "block_size must be >= 1, got ", block_size);
  return {power_iterations, oversampling, block_size, std::move(orthonormalization)};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "unsc_fast C++/CUDA extension: randomized energy basis, CPU covariance kernels";
  module.def(
      "energy_basis",
      [](const at::Tensor& C, double threshold, const at::Tensor& sketch,
         int64_t power_iterations, int64_t oversampling, int64_t block_size,
         std::string orthonormalization) {
        return unsc_fast::energy_basis_randomized(
            C, threshold, sketch,
            make_options(power_iterations, oversampling, block_size,
                         std::move(orthonormalization)));
      },
      "Randomized (d, k) energy basis of one PSD matrix, or None when the sketch ran out.",
      pybind11::arg("C"), pybind11::arg("threshold"), pybind11::arg("sketch"),
      pybind11::arg("power_iterations") = 2, pybind11::arg("oversampling") = 10,
      pybind11::arg("block_size") = 32, pybind11::arg("orthonormalization") = "auto",
      pybind11::call_guard<pybind11::gil_scoped_release>());
  module.def(
      "energy_bases",
      [](const std::vector<at::Tensor>& covariances, double threshold,
         const std::vector<at::Tensor>& sketches, int64_t power_iterations,
         int64_t oversampling, int64_t block_size, std::string orthonormalization) {
        return unsc_fast::energy_bases_randomized(
            covariances, threshold, sketches,
            make_options(power_iterations, oversampling, block_size,
                         std::move(orthonormalization)));
      },
      "energy_basis for many layers in one call (list in, list of tensors or None out).",
      pybind11::arg("covariances"), pybind11::arg("threshold"), pybind11::arg("sketches"),
      pybind11::arg("power_iterations") = 2, pybind11::arg("oversampling") = 10,
      pybind11::arg("block_size") = 32, pybind11::arg("orthonormalization") = "auto",
      pybind11::call_guard<pybind11::gil_scoped_release>());
  module.def(
      "covariance_",
      [](at::Tensor C, const at::Tensor& x) { unsc_fast::covariance_cpu_(C, x); },
      "C += x^T x on CPU, upper-triangle blocks only, mirrored (C: fp32/fp64, x: (N, d)).",
      pybind11::arg("C"), pybind11::arg("x"), pybind11::call_guard<pybind11::gil_scoped_release>());
  module.def(
      "conv_covariance_",
      [](at::Tensor C, const at::Tensor& x, std::array<int64_t, 2> kernel_size,
         std::array<int64_t, 2> stride, std::array<int64_t, 2> padding,
         std::array<int64_t, 2> dilation, const std::string& kernel) {
        unsc_fast::conv_covariance_cpu_(C, x, kernel_size, stride, padding, dilation, kernel);
      },
      "C += P^T P over the conv patches of x (B, Cin, H, W) on CPU, without an unfold buffer; "
      "kernel: auto (panel or shift, the reference's rounding), fast (spectral allowed), panel, "
      "shift (stride 1) or spectral (stride 1, same-like padding).",
      pybind11::arg("C"), pybind11::arg("x"), pybind11::arg("kernel_size"), pybind11::arg("stride"),
      pybind11::arg("padding"), pybind11::arg("dilation"), pybind11::arg("kernel") = "auto",
      pybind11::call_guard<pybind11::gil_scoped_release>());
  module.def("conv_covariance_kernel", &unsc_fast::conv_covariance_kernel,
             "The CPU kernel conv_covariance_ runs for this geometry under kernel auto (or fast, "
             "allow_spectral=True): panel, shift or spectral.",
             pybind11::arg("x_shape"), pybind11::arg("kernel_size"), pybind11::arg("stride"),
             pybind11::arg("padding"), pybind11::arg("dilation"), pybind11::arg("allow_spectral") = false);
  module.def("conv_covariance_workspace_bytes", &unsc_fast::conv_covariance_workspace_bytes,
             "Bytes conv_covariance_ allocates besides C for x of x_shape (per-thread workspaces).",
             pybind11::arg("x_shape"), pybind11::arg("kernel_size"), pybind11::arg("stride"),
             pybind11::arg("padding"), pybind11::arg("dilation"), pybind11::arg("element_size"),
             pybind11::arg("allow_spectral") = false);
}
