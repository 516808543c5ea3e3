"""A forget pass kept as a factor: ``C = F^T F`` with ``F`` (r, d), where its rows are few.

Why: a deletion request's forget pass is usually small (a class of a few images, a handful of
samples), yet stored like the total as one ``d x d`` matrix per slot: 390 MB of float32 on a
CIFAR ResNet-18, where label 0's two images are 32 rows of a 4,608-wide slot (issue 22). A
sum of ``r`` rows has rank at most ``r``, so it is held exactly by an ``r x d`` factor. The
factor is recovered from the committed ``d x d`` sum by pivoted Cholesky (left-looking: each
step reads one row of the sum and the factor so far, ``O(d r^2)`` in all, no ``d x d``
temporary), in float64, and kept only when its residual is at rounding level; otherwise the
dense sum stays.

Accuracy: the stored sum is a float32 (or float64) accumulation of the products, so it is a
rank-``r`` matrix plus rounding; the factor keeps the rank-``r`` part and drops only a residual
at the rounding level of the sum's dtype (``noise_floor``): a small but real direction (a
sample of little energy) is kept. A sum with more rank than its row count is left dense.
Dropping part of a forget pass could only make the kept sum larger, never free a direction the
remaining data uses.
"""
from __future__ import annotations

import torch

# A forget sum of r rows is factored when r * FACTOR_WIDTH_RATIO <= d: the float64 factor is
# then at most half the size of a float32 d x d matrix, and the O(d r^2) factorisation cheap.
FACTOR_WIDTH_RATIO = 4
# The rounding level of a sum of r products, in units of (r + 1) * eps(dtype) * each column's own
# diagonal entry: residuals at or below it are noise (the steps stop), residuals above it after
# r steps mean the sum had more rank than its row count (the factor is refused: it stays dense).
NOISE_UNITS = 16
# Rows of the dense sum rebuilt per block when a factor is added to or subtracted from a matrix.
BLOCK_ROWS = 512


class FactoredSum:
    """A stored covariance sum held as its float64 factor ``F`` (r, d): the sum is ``F^T F``,
    materialised in ``dtype`` (the store's) only where a reader needs the matrix."""

    __slots__ = ("factor", "dtype")

    def __init__(self, factor: torch.Tensor, dtype: torch.dtype) -> None:
        self.factor, self.dtype = factor, dtype

    @property
    def shape(self) -> tuple[int, int]:
        d = self.factor.shape[1]
        return (d, d)

    @property
    def device(self) -> torch.device:
        return self.factor.device

    @property
    def nbytes(self) -> int:
        return self.factor.numel() * self.factor.element_size()

    def diagonal(self) -> torch.Tensor:
        """The sum's diagonal, float64, without forming the matrix."""
        return self.factor.square().sum(0)

    def dense(self) -> torch.Tensor:
        """``F^T F`` as a new ``dtype`` matrix."""
        return self.add_to_(torch.zeros(self.shape, dtype=self.dtype, device=self.device))

    def add_to_(self, matrix: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
        """``matrix += alpha F^T F`` in place, a block of rows at a time (no ``d x d`` temporary)."""
        factor = self.factor.to(matrix.device)
        for start in range(0, self.shape[0], BLOCK_ROWS):
            block = matrix[start : start + BLOCK_ROWS]
            block.add_((factor[:, start : start + BLOCK_ROWS].mT @ factor).to(matrix.dtype), alpha=alpha)
        return matrix


def worth_factoring(delta: torch.Tensor, rows: int) -> bool:
    """Whether a dense ``(d, d)`` sum of ``rows`` rows is kept smaller as a factor."""
    return delta.dim() == 2 and delta.is_floating_point() and 0 < rows and rows * FACTOR_WIDTH_RATIO <= delta.shape[0]


def factored_if_worth(summed: torch.Tensor, rows: int) -> torch.Tensor | FactoredSum:
    """``summed`` (a ``d x d`` sum of ``rows`` rows) as a ``FactoredSum`` where that is smaller
    and the factor holds it to rounding, else ``summed`` itself."""
    if not worth_factoring(summed, rows):
        return summed
    found = psd_factor(summed, rows)
    return summed if found is None else FactoredSum(found, summed.dtype)


def psd_factor(C: torch.Tensor, rank: int) -> torch.Tensor | None:
    """``F`` (k, d) float64 with ``F^T F = C`` to rounding, k <= ``rank``, by pivoted Cholesky;
    None when ``rank`` steps leave any column's residual above its ``noise_floor`` (``C`` has
    more rank than that). ``C`` is read, never written."""
    d = C.shape[0]
    residual = C.diagonal().to(torch.float64).clone()
    floor = noise_floor(C, rank)
    factor = torch.zeros((min(rank, d), d), dtype=torch.float64, device=C.device)
    taken = 0
    for step in range(factor.shape[0]):
        if not bool((residual > floor).any()):
            break  # what is left is rounding
        pivot = int(residual.argmax())
        largest = float(residual[pivot])
        column = C[pivot].to(torch.float64) - factor[:step, pivot] @ factor[:step]
        factor[step] = column / largest**0.5
        residual -= factor[step].square()
        residual[pivot] = 0.0
        taken = step + 1
    if bool((residual > floor).any()):
        return None
    return factor[:taken].clone()


def noise_floor(C: torch.Tensor, rank: int) -> torch.Tensor:
    """Per column, what rounding leaves of a sum of ``rank`` products in ``C``'s dtype (the
    accumulation bound ``~rank eps`` of the column's own energy, ``NOISE_UNITS`` times): a
    residual below it is not a direction of the rows."""
    return NOISE_UNITS * (rank + 1) * torch.finfo(C.dtype).eps * C.diagonal().to(torch.float64).abs()
