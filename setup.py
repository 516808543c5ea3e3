"""Build script: the Python package, the Triton kernels as ``unsc_fast.kernels``, and
(where a compiler is available) the C++/CUDA extension ``unsc_fast._C``.

The package works without the extension: ``unsc_fast.ops`` then uses the PyTorch
reference path and says so once.
"""
from setuptools import setup

PACKAGES = [
    "unsc_fast", "unsc_fast.ops", "unsc_fast.adapters", "unsc_fast.tracking", "unsc_fast.statistics", "unsc_fast.solve",
    "unsc_fast.projection", "unsc_fast.distributed", "unsc_fast.projector", "unsc_fast.kernels", "unsc_fast.evaluation",
    "unsc_fast.evaluation.methods", "unsc_fast.evaluation.facts", "unsc_fast.objectives",
    "unsc_fast.unlearning",
]
PACKAGE_DIR = {"unsc_fast": "unsc_fast", "unsc_fast.kernels": "kernels"}


def _cuda_compiler_found(cuda_home) -> bool:
    import os
    import shutil

    nvcc = os.path.join(cuda_home, "bin", "nvcc") if cuda_home else None
    return bool(nvcc and os.path.exists(nvcc)) or shutil.which("nvcc") is not None


def extension_modules():
    """The compiled extension ``unsc_fast._C`` from ``csrc/``, or nothing where it cannot be
    built: the package then runs on its PyTorch reference path.

    - C++ (``energy_basis.cpp``, ``covariance_cpu.cpp``, ``conv_covariance_shift.cpp``,
      ``conv_covariance_spectral.cpp``, ``bindings.cpp``) on every machine with a C++ compiler;
    - plus ``symmetrize_cuda.cu`` when torch has CUDA and nvcc is found (``CUDA_HOME``);
    - ``UNSC_FAST_BUILD_EXT=0`` skips the extension; a failed compile is a warning, not an
      error, unless ``UNSC_FAST_REQUIRE_EXT=1`` (CI sets it so a broken build is loud).
    """
    import os
    import shutil
    import sysconfig
    import warnings

    if os.environ.get("UNSC_FAST_BUILD_EXT", "1") == "0":
        return [], {}
    required = os.environ.get("UNSC_FAST_REQUIRE_EXT", "0") == "1"
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except Exception as error:  # no torch at build time: pure-Python install
        if required:
            raise
        warnings.warn(f"unsc_fast: building without the C++ extension ({error})")
        return [], {}
    compiler = os.environ.get("CXX") or sysconfig.get_config_var("CXX") or "c++"
    if shutil.which(compiler.split()[0]) is None:
        if required:
            raise RuntimeError(f"unsc_fast: no C++ compiler ({compiler!r}) to build the extension")
        warnings.warn(f"unsc_fast: no C++ compiler ({compiler!r}); building without the extension")
        return [], {}

    sources = [
        "csrc/energy_basis.cpp", "csrc/covariance_cpu.cpp", "csrc/conv_covariance_shift.cpp",
        "csrc/conv_covariance_spectral.cpp", "csrc/bindings.cpp",
    ]
    cxx_flags = ["-O3", "-std=c++17"]
    with_cuda = (
        torch.version.cuda is not None
        and os.environ.get("UNSC_FAST_BUILD_CUDA", "1") != "0"
        and _cuda_compiler_found(CUDA_HOME)
    )
    if with_cuda:
        extension = CUDAExtension(
            "unsc_fast._C",
            sources + ["csrc/symmetrize_cuda.cu"],
            define_macros=[("UNSC_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++17"]},
        )
    else:
        extension = CppExtension("unsc_fast._C", sources, extra_compile_args={"cxx": cxx_flags})

    class OptionalBuildExtension(BuildExtension):
        """Builds with ninja; a compile failure leaves the package on its reference path."""

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as error:
                if required:
                    raise
                warnings.warn(
                    f"unsc_fast: the C++ extension failed to build ({error}); "
                    "the package will use its PyTorch reference path"
                )

    return [extension], {"build_ext": OptionalBuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extension_modules()

setup(
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
