"""Plain-PyTorch versions of every op: the CPU path and the yardstick for the kernels.

Written for clarity, not speed. Each function assumes its arguments were validated by
``unsc_fast.ops`` (shapes, dtypes, devices).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def covariance_(C: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``C += x^T x`` with the product formed in ``C``'s precision (never in fp16/bf16)."""
    rows = x.to(C.dtype)
    return C.addmm_(rows.mT, rows)


def unfold_rows(x, kernel_size, stride, padding, dilation, dtype) -> torch.Tensor:
    """Every kernel-sized patch of ``x`` as one row, in ``F.unfold``'s column order."""
    cols = F.unfold(x.to(dtype), kernel_size, dilation=dilation, padding=padding, stride=stride)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def conv_covariance_(C, x, kernel_size, stride, padding, dilation) -> torch.Tensor:
    """``C += P^T P`` where the rows of ``P`` are the conv patches of ``x`` (explicit im2col)."""
    return covariance_(C, unfold_rows(x, kernel_size, stride, padding, dilation, C.dtype))


def project_(G: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
    """``G <- G - (G U) U^T``: remove from every row of G its component in span(U).

    When G already has U's dtype the subtraction is fused into the second product
    (``addmm_`` with ``alpha=-1``, in place): no (out, d) temporaries, one pass less over G."""
    if G.dtype == U.dtype:
        return G.addmm_(G @ U, U.mT, alpha=-1)
    work = G.to(U.dtype)
    return G.copy_(work - (work @ U) @ U.mT)


def restrict_(G: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """``G <- (G Q) Q^T``: keep only the component of every row of G in span(Q).

    A contiguous G of Q's dtype takes the second product straight into its own storage."""
    work = G.to(Q.dtype)
    if work is G and G.is_contiguous():
        return torch.mm(G @ Q, Q.mT, out=G)
    return G.copy_((work @ Q) @ Q.mT)


def energy_rank(eigenvalues: torch.Tensor, threshold: float, eps: float) -> int:
    """Smallest k with ``sum(top-k eigenvalues) >= threshold * sum(all eigenvalues)``.

    ``eigenvalues`` are sorted in descending order and >= 0; their sum is ``trace(C)``, the
    total of the UNSC/GPM code (the sum of squared singular values). ``threshold=1`` keeps
    the numerical rank (eigenvalues above ``d * eps * max``, the rule of
    ``numpy.linalg.matrix_rank``) rather than every noise direction. Below 1 no floor
    applies: in fp32 that floor sits above real eigenvalues holding several percent of a
    wide layer's energy (5 % for an All-CNN conv with d = 1728). Scale invariant.
    """
    d = eigenvalues.numel()
    if d == 0:
        return 0
    largest = float(eigenvalues[0])
    if not largest > 0.0:
        return 0
    numerical_rank = int((eigenvalues > d * eps * largest).sum())
    cumulative = eigenvalues.cumsum(0)
    target = threshold * float(cumulative[-1])
    k = int(torch.searchsorted(cumulative, torch.tensor([target], dtype=cumulative.dtype))) + 1
    return min(k, numerical_rank) if threshold >= 1.0 else min(k, d)


def symmetrize_(C: torch.Tensor, block: int = 256) -> torch.Tensor:
    """``C <- (C + C^T) / 2`` in place, one tile pair at a time: the same values as the
    out-of-place expression (IEEE addition commutes), with one tile of extra memory instead
    of two ``d x d`` temporaries."""
    d = C.shape[0]
    for i in range(0, d, block):
        rows = slice(i, min(i + block, d))
        diagonal = C[rows, rows]
        diagonal.copy_((diagonal + diagonal.mT) / 2)
        for j in range(i + block, d, block):
            cols = slice(j, min(j + block, d))
            average = (C[rows, cols] + C[cols, rows].mT) / 2
            C[rows, cols] = average
            C[cols, rows] = average.mT
    return C


def symmetric_eigh(C: torch.Tensor):
    """Eigenpairs of the symmetrised matrix in float64, eigenvalues descending and >= 0.

    float64 because fp32 ``eigh`` returns negative eigenvalues and non-orthogonal vectors
    on ill-conditioned covariances (pytorch#144384).
    """
    A = C.to(torch.float64)
    A = (A + A.mT) / 2
    eigenvalues, eigenvectors = torch.linalg.eigh(A)
    return eigenvalues.flip(0).clamp_min(0.0), eigenvectors.flip(1)


def energy_basis_eigh(C: torch.Tensor, threshold: float) -> torch.Tensor:
    """Orthonormal basis (d, k) of the top eigenvectors holding ``threshold`` of the energy."""
    eigenvalues, eigenvectors = symmetric_eigh(C)
    k = energy_rank(eigenvalues, threshold, torch.finfo(C.dtype).eps)
    return eigenvectors[:, :k].to(C.dtype).contiguous()
