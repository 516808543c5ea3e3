"""The one door to every low-level op.

Each public function validates its arguments once, resolves ``backend`` once (see
``unsc_fast.ops.dispatch``) and calls exactly one implementation:

- ``"torch"``: ``unsc_fast.ops.reference`` (runs everywhere, the yardstick),
- ``"triton"``: ``unsc_fast.kernels.<op>`` (CUDA tensors, or CPU with ``TRITON_INTERPRET=1``),
- ``"ext"``: the C++/CUDA extension ``unsc_fast._C``.

The in-place ops (``covariance_``, ``conv_covariance_``, ``project_``, ``restrict_``) run
through PyTorch custom operators (``torch.ops.unsc_fast.*``, registered in
``unsc_fast.ops.custom_ops``) that receive the resolved backend as a string: they pass
``torch.custom_ops.opcheck`` and trace under ``torch.compile(fullgraph=True)`` without a graph
break. ``energy_basis`` stays a plain function (data-dependent output shape, a
``torch.Generator`` argument; see docs/kernels.md).

The projector, the optimizer wrapper and the methods only ever call this module.
"""
from __future__ import annotations

import math
import os
from typing import Sequence

import torch

from unsc_fast.ops import custom_ops, dense, randomized
from unsc_fast.ops.dispatch import ENV_VAR, check_devices, load_extension, resolve

__all__ = [
    "covariance_",
    "conv_covariance_",
    "project_",
    "restrict_",
    "energy_basis",
    "energy_bases",
    "energy_bases_with_complements",
    "complement_basis",
]

ACCUMULATOR_DTYPES = (torch.float32, torch.float64)
ACTIVATION_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _pair(value, name: str) -> tuple[int, int]:
    if isinstance(value, int):
        value = (value, value)
    value = tuple(int(v) for v in value)
    if len(value) != 2:
        raise ValueError(f"{name} must be an int or a pair of ints, got {value}")
    return value


def _check_accumulator(op: str, C: torch.Tensor, d: int) -> None:
    if C.dtype not in ACCUMULATOR_DTYPES:
        raise TypeError(f"{op}: C must be float32 or float64, got {C.dtype}")
    if C.shape != (d, d):
        raise ValueError(f"{op}: C must have shape ({d}, {d}) for inputs of width {d}, got {tuple(C.shape)}")


def _check_activation(op: str, x: torch.Tensor, dim: int) -> None:
    if x.dtype not in ACTIVATION_DTYPES:
        raise TypeError(f"{op}: x must be a floating tensor (fp16/bf16/fp32/fp64), got {x.dtype}")
    if x.dim() != dim:
        raise ValueError(f"{op}: x must be {dim}-D, got shape {tuple(x.shape)}")


def _check_not_differentiated(op: str, name: str, tensor: torch.Tensor) -> None:
    """The in-place ops have no autograd formula (they accumulate statistics and edit
    gradients; nothing differentiates through them). Updating a tensor that autograd
    tracks would silently give wrong gradients, so it is refused."""
    if tensor.requires_grad and torch.is_grad_enabled():
        raise RuntimeError(
            f"{op}: {name} requires grad and would be modified in place, but {op} has no autograd "
            f"formula (it is not differentiable): pass {name}.detach() or call it under torch.no_grad()"
        )


# Below this width the extension's symmetric update is a single block (no FLOPs saved) and
# plain addmm is as fast or faster on CPU; measured in benchmarks/RESULTS.md ("CPU covariance
# kernels"), as is the thread rule of ``_dense_ext_faster``.
EXT_MIN_COVARIANCE_DIM = 512


def _dense_ext_faster(d: int) -> bool:
    """Where the extension's dense update beat addmm on this project's 2-core CPU: from
    ``EXT_MIN_COVARIANCE_DIM`` columns on, single-threaded (1.3-1.7x). With 2 threads MKL's
    own threading of one addmm won (0.3-1.0x), so ``auto`` keeps addmm there."""
    return d >= EXT_MIN_COVARIANCE_DIM and torch.get_num_threads() == 1


def _fp32_kernel(chosen: str, accumulator: torch.Tensor, data: torch.Tensor) -> str:
    """The Triton kernels are fp32-only: an fp64 accumulator/basis or fp64 data takes the
    reference instead (one rule for every op)."""
    if chosen == "triton" and (accumulator.dtype != torch.float32 or data.dtype == torch.float64):
        return "torch"
    return chosen


def _covariance_backends(device: torch.device) -> tuple[str, ...]:
    """The covariance ops' implementations on ``device``: the extension's kernels are CPU-only."""
    return ("triton", "ext", "torch") if device.type == "cpu" else ("triton", "torch")


def _keep_ext(backend: str, chosen: str, faster: bool) -> str:
    """``auto`` takes the extension only where it was measured faster than the reference;
    an explicit request (argument or ``UNSC_FAST_BACKEND=ext``) is always honoured."""
    requested = os.environ.get(ENV_VAR, "").strip().lower()
    if chosen == "ext" and backend == "auto" and requested != "ext" and not faster:
        return "torch"
    return chosen


def covariance_(C: torch.Tensor, x: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """``C += x^T x`` in place, accumulated in ``C``'s precision (fp32 or fp64).

    ``x``: (N, d) in fp16/bf16/fp32/fp64, any strides. Returns ``C``. On CPU, ``auto``
    takes the extension's symmetric update where it was measured faster (``_dense_ext_faster``).
    """
    _check_activation("covariance_", x, 2)
    _check_accumulator("covariance_", C, x.shape[1])
    device = check_devices("covariance_", C, x)
    _check_not_differentiated("covariance_", "C", C)
    chosen = resolve("covariance_", backend, device, _covariance_backends(device))
    chosen = _fp32_kernel(_keep_ext(backend, chosen, _dense_ext_faster(x.shape[1])), C, x)
    custom_ops.covariance_(C, x, chosen)
    return C


def conv_covariance_(
    C: torch.Tensor,
    x: torch.Tensor,
    kernel_size,
    stride=1,
    padding=0,
    dilation=1,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """``C += P^T P`` over every conv patch of ``x`` (B, Cin, H, W): ``F.unfold`` + ``covariance_``.

    Zero padding only; ``C`` is (Cin*kh*kw, Cin*kh*kw) in ``F.unfold``'s column order,
    which is the order of ``conv.weight.flatten(1)``. Neither the Triton backend nor the
    C++ one (``"ext"``, CPU) builds the unfolded tensor.
    """
    kernel_size = _pair(kernel_size, "kernel_size")
    stride = _pair(stride, "stride")
    padding = _pair(padding, "padding")
    dilation = _pair(dilation, "dilation")
    if min(kernel_size) < 1 or min(stride) < 1 or min(dilation) < 1 or min(padding) < 0:
        raise ValueError(
            f"conv_covariance_: need kernel_size, stride, dilation >= 1 and padding >= 0, got "
            f"kernel_size={kernel_size}, stride={stride}, padding={padding}, dilation={dilation}"
        )
    _check_activation("conv_covariance_", x, 4)
    _check_accumulator("conv_covariance_", C, x.shape[1] * kernel_size[0] * kernel_size[1])
    device = check_devices("conv_covariance_", C, x)
    _check_not_differentiated("conv_covariance_", "C", C)
    chosen = _fp32_kernel(resolve("conv_covariance_", backend, device, _covariance_backends(device)), C, x)
    custom_ops.conv_covariance_(C, x, kernel_size, stride, padding, dilation, chosen)
    return C


def _check_projection(op: str, G: torch.Tensor, U: torch.Tensor) -> torch.device:
    if G.dim() != 2 or U.dim() != 2:
        raise ValueError(f"{op}: G must be (out, d) and U (d, k), got {tuple(G.shape)} and {tuple(U.shape)}")
    if G.shape[1] != U.shape[0]:
        raise ValueError(f"{op}: G is {tuple(G.shape)} but U is {tuple(U.shape)}; their d must match")
    if not G.is_floating_point() or G.dtype not in ACTIVATION_DTYPES:
        raise TypeError(f"{op}: G must be fp16/bf16/fp32/fp64, got {G.dtype}")
    if U.dtype not in ACCUMULATOR_DTYPES:
        raise TypeError(f"{op}: U must be float32 or float64, got {U.dtype}")
    device = check_devices(op, G, U)
    _check_not_differentiated(op, "G", G)
    return device


def project_(G: torch.Tensor, U: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """``G <- G - (G U) U^T`` in place: remove span(U) (orthonormal columns) from every row.

    ``G``: (out, d) any strides and float dtype; ``U``: (d, k) fp32/fp64. Returns ``G``.
    """
    device = _check_projection("project_", G, U)
    if U.shape[1] == 0 or G.numel() == 0:
        return G
    chosen = _fp32_kernel(resolve("project_", backend, device, ("triton", "torch")), U, G)
    custom_ops.project_(G, U, chosen)
    return G


def restrict_(G: torch.Tensor, Q: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """``G <- (G Q) Q^T`` in place: keep only span(Q) (orthonormal columns) of every row.

    With Q the orthogonal complement of U this equals ``project_(G, U)``, at a cost
    proportional to ``d - k`` instead of ``k``: the projector picks the cheaper one.
    """
    device = _check_projection("restrict_", G, Q)
    if G.numel() == 0:
        return G
    if Q.shape[1] == 0:
        return G.zero_()
    chosen = _fp32_kernel(resolve("restrict_", backend, device, ("triton", "torch")), Q, G)
    custom_ops.restrict_(G, Q, chosen)
    return G


def _check_covariance_matrix(C: torch.Tensor, name: str = "C") -> None:
    if not isinstance(C, torch.Tensor):
        raise TypeError(f"energy_basis: {name} must be a tensor, got {type(C).__name__}")
    if C.dim() != 2 or C.shape[0] != C.shape[1]:
        raise ValueError(f"energy_basis: {name} must be a square matrix, got shape {tuple(C.shape)}")
    if C.dtype not in ACCUMULATOR_DTYPES:
        raise TypeError(
            f"energy_basis: {name} must be float32 or float64, got {C.dtype} "
            f"(eigensolvers have no half-precision kernels: pass {name}.float())"
        )
    if C.device.type == "meta":
        raise NotImplementedError(f"energy_basis: {name} is a meta tensor")
    # Row blocks: a full boolean mask would cost a quarter of C again on a wide layer.
    if not all(bool(torch.isfinite(C[i : i + 1024]).all()) for i in range(0, C.shape[0], 1024)):
        raise ValueError(f"energy_basis: {name} has NaN or Inf entries")


def check_threshold(threshold: float, name: str = "threshold") -> float:
    """Energy thresholds live in (0, 1]."""
    try:
        value = float(threshold)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number in (0, 1], got {threshold!r}") from None
    if not (0.0 < value <= 1.0) or math.isnan(value):
        raise ValueError(f"{name} must be in (0, 1], got {threshold!r}")
    return value


EIGENSOLVERS = ("auto", "eigh", "randomized")


def _check_method(method: str) -> None:
    if method not in EIGENSOLVERS:
        raise ValueError(f"energy_basis: method must be one of {EIGENSOLVERS}, got {method!r}")


def _auto_fp32(method: str, C: torch.Tensor, threshold: float) -> bool:
    """Whether auto's dense path would be fp32 eigh here (off: ``dense.AUTO_TRIES_FP32``)."""
    return method == "auto" and dense.AUTO_TRIES_FP32 and dense.tries_fp32(C, threshold)


def _sketch_width(method: str, C: torch.Tensor, threshold: float) -> int | None:
    """The sketch's width, or None for the dense solver. ``randomized``: unbudgeted. ``auto``:
    dense below ``randomized.MIN_RANDOMIZED_DIM`` (it is as fast there) and where the pilot
    shows the rank overrunning the budget (``sketch_cannot_fit``), else a sketch budgeted
    where it crosses over with the dense path that would run instead (docs/extension.md),
    the dense solver taking over if it still overruns."""
    d = C.shape[0]
    if method == "randomized":
        return randomized.sketch_width(d, None)
    if method != "auto" or d < randomized.MIN_RANDOMIZED_DIM:
        return None
    fraction = randomized.MAX_RANK_FRACTION_FP32 if _auto_fp32(method, C, threshold) else randomized.MAX_RANK_FRACTION
    width = randomized.sketch_width(d, fraction)
    return None if randomized.sketch_cannot_fit(C, threshold, width) else width


def energy_basis(
    C: torch.Tensor,
    threshold: float,
    generator: torch.Generator | None = None,
    *,
    backend: str = "auto",
    method: str = "auto",
) -> torch.Tensor:
    """Orthonormal (d, k) basis of the smallest k top eigenvectors of the PSD matrix ``C``
    whose eigenvalues sum to at least ``threshold * trace(C)`` (UNSC, section 3.2).

    ``method``: ``"eigh"`` (dense float64, exact), ``"randomized"`` (adaptive sketch, see
    ``unsc_fast.ops.randomized``) or ``"auto"``: dense for small d and where a pilot predicts
    a rank past the sketch's budget, else randomized with a dense fallback; auto's dense path
    is float32 ``eigh`` where its energy cut is clear, else float64 (``unsc_fast.ops.dense``).
    ``backend`` picks who runs the randomized algorithm: ``"ext"`` (C++ ``unsc_fast._C``) or
    ``"torch"`` (bitwise the same on CPU). ``generator`` seeds the Gaussian sketch. A zero
    matrix gives (d, 0); the matrix is symmetrised and checked for NaN/Inf first.
    """
    return energy_bases([C], threshold, generator, backend=backend, method=method)[0]


def energy_bases(
    covariances: Sequence[torch.Tensor],
    threshold: float,
    generator: torch.Generator | None = None,
    *,
    backend: str = "auto",
    method: str = "auto",
) -> list[torch.Tensor]:
    """``energy_basis`` for many layers in one call.

    Sketches are drawn from ``generator`` in list order, so the result equals calling
    ``energy_basis`` on each matrix in turn; the extension runs every randomized layer in
    one C++ call (no Python between layers).
    """
    solved = _solve(covariances, threshold, generator, backend, method, complements=False)
    return [basis for basis, _ in solved]


def energy_bases_with_complements(
    covariances: Sequence[torch.Tensor],
    threshold: float,
    generator: torch.Generator | None = None,
    *,
    backend: str = "auto",
    method: str = "auto",
) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """``energy_bases``, each basis U paired with the orthonormal basis Q (d, d - k) of its
    orthogonal complement where the dense solver ran (its other eigenvectors: free, where a
    QR would cost O(d^3)), or None where the sketch ran (``complement_basis`` then builds it).
    The bases are those ``energy_bases`` returns (the projector's ``build`` uses this)."""
    return _solve(covariances, threshold, generator, backend, method, complements=True)


def _solve(covariances, threshold, generator, backend: str, method: str, complements: bool) -> list:
    threshold = check_threshold(threshold)
    _check_method(method)
    covariances = list(covariances)
    runners = {}
    for index, C in enumerate(covariances):
        name = "C" if len(covariances) == 1 else f"covariances[{index}]"
        _check_covariance_matrix(C, name)
        device = check_devices("energy_basis", C)
        if device not in runners:
            runners[device] = resolve("energy_basis", backend, device, ("ext", "torch"))
    solved: list[tuple | None] = [None] * len(covariances)
    jobs = {"ext": [], "torch": []}
    for index, C in enumerate(covariances):
        if not any(bool(C[i : i + 1024].any()) for i in range(0, C.shape[0], 1024)):  # row blocks: no d x d mask
            solved[index] = (C.new_zeros((C.shape[0], 0)), None)
        elif (width := _sketch_width(method, C, threshold)) is not None:
            jobs[runners[C.device]].append((index, C, randomized.draw_sketch(C, width, generator)))
    if jobs["ext"]:
        indices, matrices, sketches = zip(*jobs["ext"])
        found = load_extension().energy_bases(
            list(matrices), threshold, list(sketches), randomized.POWER_ITERATIONS,
            randomized.OVERSAMPLING, randomized.BLOCK_SIZE, "auto",
        )
        for index, basis in zip(indices, found):
            solved[index] = None if basis is None else (basis, None)
    for index, C, sketch in jobs["torch"]:
        basis = randomized.energy_basis_randomized(
            C, threshold, sketch, orthonormalization=randomized.default_orthonormalization(C.device)
        )
        solved[index] = None if basis is None else (basis, None)
    # Dense path: method "eigh", small d, a predicted overrun, or a sketch that ran out.
    return [
        found if found is not None else dense.eigh_factors(C, threshold, _auto_fp32(method, C, threshold), complements)
        for C, found in zip(covariances, solved)
    ]


def complement_basis(U: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis (d, d - k) of the orthogonal complement of span(U) (U orthonormal)."""
    d, k = U.shape
    if k == 0:
        return torch.eye(d, dtype=U.dtype, device=U.device)
    Q, _ = torch.linalg.qr(U.to(torch.float64), mode="complete")
    return Q[:, k:].to(U.dtype).contiguous()
