"""Backend resolution: the one place that decides which implementation runs an op.

``backend="auto"`` reads ``UNSC_FAST_BACKEND``; if that is unset (or names a backend the
op does not have) it picks the fastest available one for the tensors' device. Every
caller downstream receives a concrete backend name.
"""
from __future__ import annotations

import functools
import os
import warnings

import torch

BACKENDS = ("torch", "triton", "ext")
ENV_VAR = "UNSC_FAST_BACKEND"
CONV_KERNEL_ENV_VAR = "UNSC_FAST_CONV_KERNEL"
CONV_KERNELS = {"exact": "auto", "fast": "fast"}  # setting -> the C++ op's kernel argument


def conv_kernel_rule() -> str:
    """The C++ conv-covariance kernel rule: ``"auto"`` (the default, setting ``exact``) chooses
    between the panel and shift kernels, which round like the reference (bitwise equal on
    exact inputs, DESIGN section 4); ``UNSC_FAST_CONV_KERNEL=fast`` also allows the spectral
    products (fewer multiply-adds on "same"-padded stride-1 convs, within a stated bound of
    the exact covariance, not bitwise). Read at each call."""
    setting = os.environ.get(CONV_KERNEL_ENV_VAR, "exact").strip().lower() or "exact"
    if setting not in CONV_KERNELS:
        raise ValueError(f"{CONV_KERNEL_ENV_VAR}={setting!r} is not one of {', '.join(map(repr, CONV_KERNELS))}")
    return CONV_KERNELS[setting]


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """True when Triton imports (it may still need a GPU or TRITON_INTERPRET=1 to run)."""
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - depends on the environment
        return False
    return True


def triton_interpreting() -> bool:
    """True when Triton runs kernels on CPU tensors through its interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def load_extension():
    """The compiled ``unsc_fast._C`` module, or None (with one warning) when it is not built.

    Cached: a failed import is not retried on every op call.
    """
    try:
        from unsc_fast import _C  # type: ignore[attr-defined]
    except Exception as error:  # ImportError, or a stale/broken build
        warnings.warn(
            f"unsc_fast C++ extension is not available ({error}); "
            "using the PyTorch reference path.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    return _C


def extension_available() -> bool:
    return load_extension() is not None


def check_devices(op: str, *tensors: torch.Tensor) -> torch.device:
    """All tensors on one real device; returns it. Meta and mixed devices get a clear error."""
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        listed = ", ".join(sorted(str(d) for d in devices))
        raise ValueError(f"{op}: all tensors must be on one device, got {listed}")
    device = devices.pop()
    if device.type == "meta":
        raise NotImplementedError(f"{op}: meta tensors have no data to compute with")
    return device


def resolve(op: str, backend: str, device: torch.device, available: tuple[str, ...]) -> str:
    """Turn ``backend`` ('auto' or a name) into a concrete backend for ``op`` on ``device``.

    ``available`` lists the backends the op implements, fastest first for CUDA.
    """
    if backend not in ("auto",) + BACKENDS:
        raise ValueError(f"{op}: backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    explicit = backend != "auto"
    if not explicit:
        requested = os.environ.get(ENV_VAR, "").strip().lower()
        if requested and requested != "auto":
            if requested not in BACKENDS:
                raise ValueError(
                    f"{ENV_VAR}={requested!r} is not one of 'auto', {', '.join(BACKENDS)}"
                )
            if requested in available:
                backend = requested
    if backend == "auto":
        return _fastest(available, device)
    if backend not in available:
        raise ValueError(f"{op}: backend {backend!r} is not implemented; it has {available}")
    if backend == "triton":
        if not triton_available():
            raise RuntimeError(f"{op}: backend 'triton' requested but triton is not installed")
        if device.type != "cuda" and not triton_interpreting():
            raise RuntimeError(
                f"{op}: backend 'triton' needs CUDA tensors, or TRITON_INTERPRET=1 to run "
                f"the kernels on {device.type} tensors through Triton's interpreter"
            )
    if backend == "ext" and not extension_available():
        raise RuntimeError(f"{op}: backend 'ext' requested but the C++ extension is not built")
    return backend


def _fastest(available: tuple[str, ...], device: torch.device) -> str:
    for candidate in available:
        if candidate == "triton" and device.type == "cuda" and triton_available():
            return "triton"
        if candidate == "ext" and extension_available():
            return "ext"
    return "torch"
