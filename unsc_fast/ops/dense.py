"""The dense energy basis: one symmetric eigendecomposition, whose top eigenvectors are the
basis and whose other eigenvectors are its orthogonal complement (no QR needed for it).

``method="auto"`` could try float32 ``eigh`` first on a float32 covariance (about 1.6x faster
than float64 on CPU); it does not (``AUTO_TRIES_FP32``: its eigenvectors' orthonormality,
~sqrt(d) eps32, breaks the projection's rounding-level guarantee). Its eigenvalues carry absolute errors of a few ``eps32 * ||C||`` (so
small eigenvalues come out negative on ill-conditioned covariances, pytorch#144384), which
only matters where the energy cut is close: the fp32 result is kept when the cut clears the
target by ``FP32_CUT_MARGIN`` error units on both sides (``fp32_cut``) and its eigenvectors
pass an orthogonality probe (``orthonormal``); otherwise float64 decides. ``method="eigh"``
is always float64 (``unsc_fast.ops.reference``, the yardstick).

The margin is measured, not proven. The unit is ``sqrt(d - j) * eps32 * ||C||_F`` for the tail
sum ``R_j`` (the ``d - j`` smallest eigenvalues): the shape of the Ky Fan bound
``|R_j(C + E) - R_j(C)| <= sqrt(d - j) * ||E||_F`` for a backward error E. On 45 covariances
(All-CNN's, the digits CNN's, the synthetic spectra of benchmarks/bench_energy_basis.py,
ill-conditioned ones; docs/extension.md) fp32's tail sums differed from fp64's by at most 1.8
units, although ``||E||_F`` itself reached 84 ``eps32 * ||C||_F``: the eigenvalues' errors do
not add up the worst way. 8 units on both sides of the cut is a 4x safety factor; on 600
further random covariances and thresholds it kept fp32 in 587 and its rank was fp64's in all.
"""
from __future__ import annotations

import math

import torch

from unsc_fast.ops import reference
from unsc_fast.ops.randomized import symmetrized

# The fp32 cut must clear the target by this many units of sqrt(d - j) * eps32 * ||C||_F on
# both sides (measured worst tail error: 1.8 units; module docstring).
FP32_CUT_MARGIN = 8.0
# fp32 eigenvectors must be orthonormal to this many units of sqrt(d) * eps32 (measured
# ||V^T V - I||_2 <= 1.2 sqrt(d) eps32 up to d = 1152), probed with a few random vectors.
ORTHOGONALITY_UNITS = 10.0
ORTHOGONALITY_PROBES = 2


# Off: fp32 eigenvectors are orthonormal only to ~sqrt(d) eps32 (1e-6 at d = 64-864), and
# the projection inherits that: ||dW U|| / ||dW|| came out at 1.9e-7 against the 4 * 2^-24
# rounding bound of the guarantee (tests/core/test_unlearn_data.py, a Llama o_proj), and the
# complement's ||U^T Q|| reached 2.5e-6. Restoring orthonormality with a float64 QR costs what
# it saved (d = 864, 1 thread: fp32 eigh 83-89 ms + QR 55-62 ms against fp64 eigh 129-140 ms),
# so ``auto`` stays float64; the fp32 path and its cut rule are kept, tested, for a cheaper
# re-orthonormalisation to build on.
AUTO_TRIES_FP32 = False


def tries_fp32(C: torch.Tensor, threshold: float) -> bool:
    """float32 ``eigh`` is tried on a float32 ``C`` below threshold 1 (at 1 the numerical-rank
    floor ``d * eps32 * max`` is the size of fp32's own errors) when ``fp32_first`` asks for
    it; ``unsc_fast.ops`` asks only under ``AUTO_TRIES_FP32``."""
    return C.dtype == torch.float32 and threshold < 1.0


def eigh_factors(C: torch.Tensor, threshold: float, fp32_first: bool, complement: bool = True):
    """``(U, Q)`` in C's dtype: U (d, k) the energy basis, Q (d, d - k) the remaining
    eigenvectors (None unless ``complement``); orthonormal columns, orthogonal to each other.

    ``fp32_first``: try float32 ``eigh`` where ``tries_fp32``; float64 otherwise or when its
    cut is not clear. The float64 basis is bitwise ``reference.energy_basis_eigh``'s (``lean_eigh``)."""
    if fp32_first and tries_fp32(C, threshold):
        found = fp32_factors(C, threshold, complement)
        if found is not None:
            return found
    ascending, vectors = lean_eigh(C)
    descending = ascending.flip(0).clamp_min(0.0)  # reference.symmetric_eigh's eigenvalues
    k = reference.energy_rank(descending, threshold, torch.finfo(C.dtype).eps)
    d = C.shape[0]
    basis = _columns_descending(vectors, range(d - 1, d - 1 - k, -1), C.dtype)
    rest = _columns_descending(vectors, range(d - 1 - k, -1, -1), C.dtype) if complement else None
    return basis, rest


def lean_eigh(C: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 ``eigh`` of ``(C + C^T) / 2`` (eigenvalues ascending, as LAPACK returns them),
    bitwise ``reference.symmetric_eigh``'s before its flip, in a third of its memory.

    Why: the reference holds the fp64 copy, two temporaries of the symmetrisation, the
    eigenvectors beside their input, LAPACK's ``2 d^2`` workspace and a flipped copy: about
    5 ``d x d`` doubles, which on a 4,608-wide slot (ResNet-18's last stage) was most of a
    build's peak (issue 22). Here the copy is symmetrised in place (``symmetrize_``: the same
    values), and LAPACK overwrites it with the eigenvectors: a symmetric matrix read through
    its transpose is already in LAPACK's column-major layout, so ``eigh(out=)`` needs no
    second buffer. The peak is the copy and the workspace, 3 ``d x d`` doubles."""
    A = reference.symmetrize_(C.to(torch.float64, copy=True))
    column_major = A.mT  # the same values (A is symmetric), LAPACK's layout
    eigenvalues = A.new_empty(A.shape[0])
    torch.linalg.eigh(column_major, out=(eigenvalues, column_major))
    return eigenvalues, column_major


def _columns_descending(vectors: torch.Tensor, columns: range, dtype: torch.dtype, block: int = 256) -> torch.Tensor:
    """``vectors[:, columns]`` as a contiguous ``dtype`` matrix, gathered a block of columns at
    a time (no full float64 copy beside the eigenvectors)."""
    order = torch.tensor(list(columns), dtype=torch.long, device=vectors.device)
    out = torch.empty((vectors.shape[0], order.numel()), dtype=dtype, device=vectors.device)
    for start in range(0, order.numel(), block):
        out[:, start : start + block] = vectors.index_select(1, order[start : start + block])
    return out


def fp32_factors(C: torch.Tensor, threshold: float, complement: bool = True):
    """``eigh_factors`` from float32 ``eigh``, or None where fp32 cannot be trusted with the cut."""
    try:
        eigenvalues, eigenvectors = torch.linalg.eigh(symmetrized(C))
    except RuntimeError:  # torch.linalg.LinAlgError (no convergence) is a RuntimeError
        return None
    k = fp32_cut(eigenvalues, C, threshold)
    if k is None or not orthonormal(eigenvectors):
        return None
    # eigh is ascending: the basis is the last k columns, in descending order as fp64's.
    # index_select copies them row-major in one pass (eigh's vectors are column-major, and a
    # flipped slice stays so: distributed broadcasts and the kernels need contiguous bases).
    descending = torch.arange(C.shape[0] - 1, -1, -1, device=C.device)
    basis = eigenvectors.index_select(1, descending[:k])
    return basis, eigenvectors.index_select(1, descending[k:]) if complement else None


def fp32_cut(ascending: torch.Tensor, C: torch.Tensor, threshold: float) -> int | None:
    """The rank ``reference.energy_rank`` would give, from float32 eigenvalues (ascending), or
    None when the cut is within ``FP32_CUT_MARGIN`` error units of the target.

    Tail sums are compared with the exact ``(1 - threshold) * trace(C)`` (the trace is read
    from the diagonal, not from the eigenvalues, so fp32 errors in the large ones do not move
    the target). Negative eigenvalues are kept: their errors are the same size as the others'.
    """
    d = ascending.numel()
    if not bool(torch.isfinite(ascending).all()):
        return None
    trace = float(C.diagonal().sum(dtype=torch.float64))
    norm = float(torch.linalg.vector_norm(C))  # a scale: fp32 is plenty, and no d x d copy
    if not trace > 0.0:
        return None
    tails = ascending.to(torch.float64).cumsum(0)  # tails[n - 1]: the n smallest eigenvalues
    allowed = (1.0 - threshold) * trace
    # Decreasing over the negative eigenvalues, then increasing: the tails within the allowed
    # energy are a prefix, and the kept count is what is left.
    outside = int((tails <= allowed).sum())
    k = d - outside
    if k == 0:
        return None
    unit = FP32_CUT_MARGIN * torch.finfo(torch.float32).eps * norm
    if outside and float(tails[outside - 1]) > allowed - unit * math.sqrt(outside):
        return None  # the kept basis holds the target, but not by a clear margin
    if float(tails[outside]) < allowed + unit * math.sqrt(outside + 1):
        return None  # one column fewer might hold it too
    return k


def orthonormal(V: torch.Tensor) -> bool:
    """``||V^T V p - p|| <= ORTHOGONALITY_UNITS * sqrt(d) * eps32 * ||p||`` for a few seeded
    random probes p (O(d^2): a full ``V^T V`` would cost a third of the eigh)."""
    d = V.shape[0]
    generator = torch.Generator(device=V.device).manual_seed(0)
    probes = torch.randn(d, ORTHOGONALITY_PROBES, generator=generator, dtype=V.dtype, device=V.device)
    error = torch.linalg.vector_norm(V.mT @ (V @ probes) - probes, dim=0)
    limit = ORTHOGONALITY_UNITS * math.sqrt(d) * torch.finfo(torch.float32).eps
    return bool((error <= limit * torch.linalg.vector_norm(probes, dim=0)).all())
