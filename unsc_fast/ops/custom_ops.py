"""The in-place ops as PyTorch custom operators (``torch.ops.unsc_fast.*``).

``unsc_fast.ops`` validates the arguments and resolves the backend in Python, then calls
one of these operators with the *resolved* backend name (``"torch"``, ``"triton"``, or
``"ext"`` for the covariance ops' C++ CPU kernels) as
a string argument; each operator's implementation runs exactly that one implementation.
Being real operators (``torch.library.custom_op`` with a declared ``mutates_args`` and a
``register_fake``), they pass ``torch.library.opcheck`` and ``torch.compile`` traces them
as single graph nodes, with no graph break (see docs/kernels.md, "Custom ops").

Schemas::

    unsc_fast::covariance_(Tensor(a0!) C, Tensor x, str backend) -> ()
    unsc_fast::conv_covariance_(Tensor(a0!) C, Tensor x, SymInt[] kernel_size, SymInt[] stride,
                                SymInt[] padding, SymInt[] dilation, str backend) -> ()
    unsc_fast::project_(Tensor(a0!) G, Tensor U, str backend) -> ()
    unsc_fast::restrict_(Tensor(a0!) G, Tensor Q, str backend) -> ()

They return nothing (a custom op may not return an alias of an input); the Python
functions in ``unsc_fast.ops`` return the mutated tensor. Any strides are accepted: the
torch implementations write back with ``copy_`` and the Triton kernels address every
tensor through its own strides, so a transposed or sliced ``G`` is updated in place.

No autograd formula is registered, on purpose: these ops accumulate statistics and edit
gradients, they are never differentiated through. ``custom_op`` then installs an
autograd kernel that runs the op below autograd, so inputs that require grad are
accepted, the mutated tensor gets no ``grad_fn``, and backpropagating through an output
(there is none) cannot happen.
"""
from __future__ import annotations

from typing import Sequence

import torch

from unsc_fast.ops import reference
from unsc_fast.ops.dispatch import conv_kernel_rule, load_extension

NAMESPACE = "unsc_fast"
IMPLEMENTATIONS = ("torch", "triton", "ext")
# The ops that have a C++ ("ext") implementation; the others refuse that name.
EXT_OPS = ("covariance_", "conv_covariance_")


def _check_backend(op: str, backend: str) -> None:
    if backend not in IMPLEMENTATIONS or (backend == "ext" and op not in EXT_OPS):
        raise ValueError(
            f"torch.ops.{NAMESPACE}.{op}: backend must be a resolved name, one of {IMPLEMENTATIONS}, "
            f"got {backend!r} (call unsc_fast.ops.{op}, which resolves 'auto')"
        )


@torch.library.custom_op(f"{NAMESPACE}::covariance_", mutates_args=("C",))
def covariance_(C: torch.Tensor, x: torch.Tensor, backend: str) -> None:
    """``C += x^T x`` with the resolved ``backend`` ("torch", "triton" or "ext")."""
    _check_backend("covariance_", backend)
    if backend == "ext":
        load_extension().covariance_(C, x)
    elif backend == "triton":
        from unsc_fast.kernels import covariance

        covariance.covariance_(C, x)
    else:
        reference.covariance_(C, x)


@covariance_.register_fake
def _covariance_fake(C: torch.Tensor, x: torch.Tensor, backend: str) -> None:
    return None


@torch.library.custom_op(f"{NAMESPACE}::conv_covariance_", mutates_args=("C",))
def conv_covariance_(
    C: torch.Tensor,
    x: torch.Tensor,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    backend: str,
) -> None:
    """``C += P^T P`` over the conv patches of ``x`` with the resolved ``backend``."""
    _check_backend("conv_covariance_", backend)
    kernel_size, stride, padding, dilation = (
        tuple(int(v) for v in pair) for pair in (kernel_size, stride, padding, dilation)
    )
    if backend == "ext":
        load_extension().conv_covariance_(C, x, kernel_size, stride, padding, dilation, conv_kernel_rule())
    elif backend == "triton":
        from unsc_fast.kernels import conv_covariance

        conv_covariance.conv_covariance_(C, x, kernel_size, stride, padding, dilation)
    else:
        reference.conv_covariance_(C, x, kernel_size, stride, padding, dilation)


@conv_covariance_.register_fake
def _conv_covariance_fake(C, x, kernel_size, stride, padding, dilation, backend) -> None:
    return None


@torch.library.custom_op(f"{NAMESPACE}::project_", mutates_args=("G",))
def project_(G: torch.Tensor, U: torch.Tensor, backend: str) -> None:
    """``G <- G - (G U) U^T`` in place with the resolved ``backend``."""
    _check_backend("project_", backend)
    if backend == "triton":
        from unsc_fast.kernels import projection

        projection.project_(G, U)
    else:
        reference.project_(G, U)


@project_.register_fake
def _project_fake(G: torch.Tensor, U: torch.Tensor, backend: str) -> None:
    return None


@torch.library.custom_op(f"{NAMESPACE}::restrict_", mutates_args=("G",))
def restrict_(G: torch.Tensor, Q: torch.Tensor, backend: str) -> None:
    """``G <- (G Q) Q^T`` in place with the resolved ``backend``."""
    _check_backend("restrict_", backend)
    if backend == "triton":
        from unsc_fast.kernels import projection

        projection.restrict_(G, Q)
    else:
        reference.restrict_(G, Q)


@restrict_.register_fake
def _restrict_fake(G: torch.Tensor, Q: torch.Tensor, backend: str) -> None:
    return None
