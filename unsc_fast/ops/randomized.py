"""Adaptive randomized eigenbasis at an energy threshold: the PyTorch reference.

The basis UNSC keeps for a layer is the smallest k top eigenvectors of the PSD covariance C
whose eigenvalues hold ``threshold * trace(C)``. A dense ``eigh`` costs O(d^3) whatever k is;
here the cost is O(d^2 m) for a sketch of m ~ k + oversampling columns.

Algorithm (Halko, Martinsson, Tropp 2011, "Finding structure with randomness", Alg. 4.2
made blockwise, with the subspace iteration of their Alg. 4.4 and Rayleigh-Ritz of Alg. 5.3):

1. The total energy is known exactly, ``trace(C)``, so the sketch can grow block by block
   until the energy it captures, ``trace(Q^T C Q)``, reaches the target. Each block is a
   Gaussian slice of the sketch, multiplied by C, refined by a few power (subspace)
   iterations, and orthogonalised against the basis so far (twice: "twice is enough").
2. Rayleigh-Ritz: the eigenpairs of ``Q^T C Q`` give Ritz values (never above the true
   eigenvalues) and Ritz vectors ``Q V``. The top-k Ritz vectors capture exactly the sum of
   the top-k Ritz values, so the cut below never claims energy the basis does not hold.
3. The cut follows ``reference.energy_rank``: k is the smallest count whose Ritz values
   reach ``threshold * trace(C)`` (at ``threshold=1``: the numerical rank). The cut must lie
   ``oversampling`` columns inside the sketch (the last columns' Ritz values are the least
   accurate), unless the sketch already holds all of C's energy.

If the sketch runs out (its width is the budget) before that happens, or a block shows that
it will (``sketch_cannot_reach``), the function returns None and the caller falls back to
the dense eigensolver.

The C++ extension (``csrc/energy_basis.cpp``) runs the same ATen operations in the same
order, so on CPU the two are bitwise identical for the same sketch. Keep them in step.
"""
from __future__ import annotations

import math

import torch

POWER_ITERATIONS = 2
OVERSAMPLING = 10
BLOCK_SIZE = 32
# Auto mode: above this fraction of d the sketch stops and eigh takes over, where the sketch
# stops beating the dense path auto would run instead (benchmarks/bench_energy_basis.py
# --crossover; docs/extension.md). Against fp64 eigh (float64 input, threshold 1) the sketch
# wins up to k/d ~0.40-0.45 at d = 1152 and 2304 on CPU; against auto's fp32 eigh with its cut
# check (float32 input below threshold 1, unsc_fast.ops.dense) up to ~0.25 at d = 864 and 1152.
MAX_RANK_FRACTION = 0.4
MAX_RANK_FRACTION_FP32 = 0.25
# Auto mode: below this width a dense eigh is as fast as anything (measured, same script).
MIN_RANDOMIZED_DIM = 512
# Auto mode: eigenvalues estimated before the sketch to predict an overrun (sketch_cannot_fit).
PILOT_COLUMNS = 16


def default_orthonormalization(device: torch.device) -> str:
    """Householder QR on CPU (LAPACK geqrf is fast there); CholeskyQR on GPU, where one
    Gram matmul plus a small Cholesky beats the latency-bound Householder panels."""
    return "cholesky" if device.type == "cuda" else "householder"


def sketch_width(d: int, max_rank_fraction: float | None, block_size: int = BLOCK_SIZE,
                 oversampling: int = OVERSAMPLING) -> int:
    """Columns of Gaussian sketch to draw: the whole budget, drawn once (``None``: up to d)."""
    if max_rank_fraction is None:
        return d
    wanted = max(math.ceil(max_rank_fraction * d), block_size + oversampling)
    return min(d, wanted)


def draw_sketch(C: torch.Tensor, width: int, generator: torch.Generator | None) -> torch.Tensor:
    """The Gaussian test matrix, drawn in one place for both backends (bitwise equality)."""
    return torch.randn(C.shape[0], width, generator=generator, dtype=C.dtype, device=C.device)


def sketch_cannot_fit(C: torch.Tensor, threshold: float, width: int, oversampling: int = OVERSAMPLING,
                      pilot: int = PILOT_COLUMNS) -> bool:
    """Whether the energy rank surely overruns a sketch of ``width`` columns, judged before any
    of it is drawn (auto mode then runs the dense solver at once; Python only, no C++ twin).

    Cauchy-Schwarz: the top k eigenvalues sum to at most ``S_m + sqrt(k - m) * sqrt(F - Q_m)``,
    with ``S_m`` and ``Q_m`` the sum and the sum of squares of the top m, and
    ``F = ||C||_F^2`` their sum of squares over all; reaching ``threshold * trace(C)`` thus needs
    ``k >= m + (threshold * trace - S_m)^2 / (F - Q_m)``. The plain bound (m = 0,
    ``trace^2 / F``, the effective rank) is useless on uncentred inputs, whose mean direction
    holds most of the energy; removing the top ``pilot`` eigenvalues first makes it bite. They
    come from a deterministic pilot (the columns of C at its largest diagonal entries, one
    subspace iteration, Rayleigh-Ritz: two (d, pilot) products, no random numbers drawn). Ritz
    values are slightly below the eigenvalues, so the bound is an estimate: a wrong "cannot
    fit" costs time only (the dense solver is exact). Thresholds below 1 only (at 1 the rank
    is the numerical rank, which the energy does not bound).
    """
    d = C.shape[0]
    pilot = min(pilot, d)
    if not threshold < 1.0 or width >= d or pilot == 0:
        return False
    trace = float(C.diagonal().sum(dtype=torch.float64))
    frobenius = float(torch.linalg.vector_norm(C)) ** 2  # in C's dtype: a dtype= cast would copy C
    columns = C.diagonal().topk(pilot).indices
    Q = householder_orthonormalize(C[:, columns])
    Q = householder_orthonormalize(C @ Q)
    H = (Q.mT @ (C @ Q)).to(torch.float64)
    ritz = torch.linalg.eigvalsh((H + H.mT) / 2).clamp_min(0.0)
    missing = threshold * trace - float(ritz.sum())
    spread = frobenius - float(ritz.square().sum())
    if not (trace > 0.0 and missing > 0.0 and spread > 0.0):
        return False
    return pilot + missing * missing / spread + oversampling > width


def next_block(filled: int, block_size: int, width: int) -> int:
    """Width of the next sketch block: grows with the basis (about x1.5 a round) so a large
    rank takes O(log k) rounds, yet never runs past the sketch."""
    return min(max(block_size, filled // 2), width - filled)


def symmetrized(C: torch.Tensor) -> torch.Tensor:
    """``(C + C^T) / 2``, or ``C`` itself when it is exactly symmetric (bitwise the same value,
    without two ``d x d`` temporaries). The C++ extension follows the same rule."""
    if is_symmetric(C):
        return C
    return (C + C.mT) / 2


def is_symmetric(C: torch.Tensor, tile: int = 1024) -> bool:
    """Exact symmetry, checked tile by tile (comparing C with C^T whole would copy C^T)."""
    d = C.shape[0]
    return all(
        torch.equal(C[i : i + tile, j : j + tile], C[j : j + tile, i : i + tile].mT)
        for i in range(0, d, tile)
        for j in range(i, d, tile)
    )


def householder_orthonormalize(Y: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(Y).Q


def _cholesky_pass(Y: torch.Tensor, shift: float) -> torch.Tensor | None:
    gram = Y.mT @ Y
    if shift > 0.0:
        gram.diagonal().add_(shift)
    factor, info = torch.linalg.cholesky_ex(gram)
    if int(info) != 0:
        return None
    return torch.linalg.solve_triangular(factor.mT, Y, upper=True, left=False)


def cholesky_orthonormalize(Y: torch.Tensor) -> torch.Tensor:
    """Shifted CholeskyQR3 (Fukaya, Kannan, Nakatsukasa et al. 2020): one shifted pass makes
    any full-rank Y well conditioned, two plain passes (CholeskyQR2) make it orthonormal to
    working precision. Falls back to Householder QR when a Cholesky factorisation fails
    (a zero or numerically rank-deficient block)."""
    rows, cols = Y.shape
    eps = torch.finfo(Y.dtype).eps
    norm_squared = float(Y.square().sum(dtype=torch.float64))
    shift = 11.0 * (rows * cols + cols * (cols + 1)) * eps * norm_squared
    Q = _cholesky_pass(Y, shift) if shift > 0.0 else None
    if Q is not None:
        Q = _cholesky_pass(Q, 0.0)
    if Q is not None:
        Q = _cholesky_pass(Q, 0.0)
    if Q is None:
        return householder_orthonormalize(Y)
    return Q


def orthonormalize(Y: torch.Tensor, method: str) -> torch.Tensor:
    if method == "cholesky":
        return cholesky_orthonormalize(Y)
    return householder_orthonormalize(Y)


def deflate(Y: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """``Y - Q (Q^T Y)``: remove the span of the basis found so far."""
    if Q.shape[1] == 0:
        return Y
    return Y - Q @ (Q.mT @ Y)


def energy_count(cumulative: torch.Tensor, target: float) -> int:
    """Smallest k whose cumulative energy reaches ``target`` (``cumulative`` ascending)."""
    return int(torch.searchsorted(cumulative, target)) + 1


def sketch_cannot_reach(captured: float, target: float, level: float, filled: int, width: int,
                        oversampling: int) -> bool:
    """Whether the rest of the target clearly cannot fit in the sketch, judged after a block.

    Power iterations put each block on the next eigenvectors, so the eigenvalues still
    outside the sketch are about ``level`` (the block's smallest Rayleigh quotient) or below:
    the missing energy needs at least ``(target - captured) / level`` more columns. When that
    overruns the sketch, stopping now saves the rest of the sketch: the dense fallback runs
    anyway. Only a budgeted sketch (``width < d``) stops early, and a wrong guess costs time only: the
    fallback is exact.
    """
    if not level > 0.0:
        return False
    return filled + (target - captured) / level + oversampling > width


def ritz_cut(theta, trace, threshold, eps, d, filled, oversampling, complete):
    """The rank rule of ``reference.energy_rank`` applied to descending Ritz values, or None
    when the sketch cannot decide it yet.

    The total is ``trace(C)``, known exactly, so the cut needs no estimate of what lies
    outside the sketch: Ritz values never exceed the true eigenvalues, so the top-k Ritz
    vectors hold at least ``threshold * trace`` once their Ritz values do, and k is at
    least the minimal one (equal to it once the sketch has converged on the top-k
    subspace). The cut must lie ``oversampling`` columns inside the sketch (the last
    columns' Ritz values are the least accurate), unless the sketch holds all of C's
    energy (``complete``). ``threshold=1`` keeps the numerical rank, as the reference.
    """
    largest = float(theta[0])
    if not largest > 0.0:
        return 0
    numerical_rank = int((theta > d * eps * largest).sum())
    cumulative = theta.cumsum(0)
    if complete:
        k = energy_count(cumulative, threshold * float(cumulative[-1]))
    else:
        target = threshold * trace
        if float(cumulative[-1]) < target:
            return None
        k = energy_count(cumulative, target)
        if k + oversampling > filled:
            return None
    return min(k, numerical_rank) if threshold >= 1.0 else min(k, theta.numel())


def energy_basis_randomized(
    C: torch.Tensor,
    threshold: float,
    sketch: torch.Tensor,
    power_iterations: int = POWER_ITERATIONS,
    oversampling: int = OVERSAMPLING,
    block_size: int = BLOCK_SIZE,
    orthonormalization: str = "householder",
) -> torch.Tensor | None:
    """(d, k) orthonormal basis in C's dtype, or None when ``sketch`` ran out first.

    ``C``: symmetric PSD (d, d) float32/float64, already checked finite; ``sketch``: (d, w)
    Gaussian in C's dtype, consumed left to right. ``threshold`` in (0, 1].
    """
    d = C.shape[0]
    width = sketch.shape[1]
    eps = torch.finfo(C.dtype).eps
    A = symmetrized(C)
    trace = float(A.diagonal().sum(dtype=torch.float64))
    if not trace > 0.0:
        return None  # zero is caught earlier; an indefinite input goes to the dense path
    target = threshold * trace
    exhausted_below = d * eps * trace  # uncaptured energy at roundoff level: nothing left
    Q = A.new_empty((d, 0))
    AQ = A.new_empty((d, 0))
    captured = 0.0
    largest_quotient = 0.0
    filled = 0
    while filled < width:
        block = next_block(filled, block_size, width)
        Y = A @ sketch[:, filled:filled + block]
        for _ in range(power_iterations):
            Y = A @ orthonormalize(deflate(Y, Q), orthonormalization)
        Y = orthonormalize(deflate(Y, Q), orthonormalization)
        Y = orthonormalize(deflate(Y, Q), orthonormalization)
        AY = A @ Y
        # Rayleigh quotients of the new columns: their sum is the energy they add; the
        # smallest Ritz value is at most the smallest of them (Courant-Fischer), so one under
        # the noise floor tells that the sketch has passed it (see ``ritz_cut``).
        quotients = (Y * AY).sum(0, dtype=torch.float64)
        captured += float(quotients.sum())
        largest_quotient = max(largest_quotient, float(quotients.max()))
        smallest = float(quotients.min())
        passed_floor = smallest < d * eps * largest_quotient
        Q = torch.cat([Q, Y], 1)
        AQ = torch.cat([AQ, AY], 1)
        filled += block
        exhausted = trace - captured <= exhausted_below
        if captured < target and not (exhausted or passed_floor or filled >= d):
            if width < d and sketch_cannot_reach(captured, target, smallest, filled, width,
                                                 oversampling):
                return None
            continue
        # Rayleigh-Ritz in float64: the small m x m problem is cheap, and fp32 eigh on it
        # would give negative Ritz values on ill-conditioned spectra (pytorch#144384).
        H = (Q.mT @ AQ).to(torch.float64)
        H = (H + H.mT) / 2
        theta, V = torch.linalg.eigh(H)
        theta = theta.flip(0).clamp_min(0.0)
        V = V.flip(1)
        k = ritz_cut(theta, trace, threshold, eps, d, filled, oversampling, exhausted or filled >= d)
        if k is None:
            continue
        return (Q @ V[:, :k].to(C.dtype)).contiguous()
    return None
