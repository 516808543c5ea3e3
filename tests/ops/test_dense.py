"""``ops.dense``: auto's dense path. fp32 eigh keeps fp64's rank wherever its energy cut is
clear and gives way to fp64 where it is not; its other eigenvectors are the complement of the
basis (what ``ops.complement_basis`` builds by QR), orthonormal at rounding level."""
from __future__ import annotations

import pytest
import torch

from unsc_fast import ops
from unsc_fast.ops import dense, reference

from spectra import spectrum, uncentred_features, with_spectrum

MATRICES = {
    "uncentred": lambda: uncentred_features(300, 400),
    "power": lambda: with_spectrum(spectrum("power", 300), torch.float32),
    "exp": lambda: with_spectrum(spectrum("exp", 300), torch.float32),
    "ill-conditioned": lambda: with_spectrum(torch.logspace(-9, 0, 300), torch.float32),
}


def subspace_gap(U: torch.Tensor, Q: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(U.double().mT @ Q.double(), ord=2)) if U.numel() and Q.numel() else 0.0


def orthonormality_error(Q: torch.Tensor) -> float:
    Q = Q.double()
    return float((Q.mT @ Q - torch.eye(Q.shape[1], dtype=torch.float64)).abs().max())


@pytest.mark.parametrize("name", list(MATRICES))
@pytest.mark.parametrize("threshold", [0.5, 0.9, 0.97, 0.99])
def test_fp32_rank_equals_fp64(name, threshold):
    C = MATRICES[name]()
    found = dense.fp32_factors(C, threshold)
    assert found is not None, "fp32 gave way on a clear cut"  # the test must exercise fp32
    assert found[0].shape[1] == reference.energy_basis_eigh(C, threshold).shape[1]


@pytest.mark.parametrize("name", list(MATRICES))
@pytest.mark.parametrize("fp32_first", [True, False])
def test_complement_from_eigh_is_the_complement_qr_gives(name, fp32_first):
    C = MATRICES[name]()
    U, Q = dense.eigh_factors(C, 0.97, fp32_first=fp32_first)
    d, k = U.shape
    assert Q.shape == (d, d - k) and Q.dtype == U.dtype == C.dtype
    assert U.is_contiguous() and Q.is_contiguous()
    assert orthonormality_error(Q) <= 1e-5 and orthonormality_error(U) <= 1e-5
    assert subspace_gap(U, Q) <= 1e-5
    by_qr = ops.complement_basis(U)
    torch.testing.assert_close((Q.double() @ Q.double().mT), by_qr.double() @ by_qr.double().mT, atol=1e-5, rtol=0)


def test_fp32_gives_way_on_a_cut_at_the_threshold():
    """The top 10 eigenvalues hold exactly the threshold: fp32's errors could put the cut on
    either side, so fp64 decides (and auto's result is the reference's, bitwise)."""
    eigenvalues = torch.cat([torch.linspace(2.0, 1.0, 10, dtype=torch.float64), torch.full((290,), 1e-3)])
    C = with_spectrum(eigenvalues, torch.float32)
    exact = reference.symmetric_eigh(C)[0]
    threshold = float(exact[:10].sum() / exact.sum())
    assert dense.fp32_factors(C, threshold) is None
    assert torch.equal(ops.energy_basis(C, threshold), reference.energy_basis_eigh(C, threshold))
    # Away from the tie the same matrix stays on fp32.
    assert dense.fp32_factors(C, threshold - 0.01) is not None


@pytest.mark.parametrize("dtype, threshold", [(torch.float64, 0.99), (torch.float32, 1.0)])
def test_float64_input_and_threshold_one_stay_on_float64(dtype, threshold):
    C = with_spectrum(spectrum("exp", 200), dtype)
    assert not dense.tries_fp32(C, threshold)
    U, _ = dense.eigh_factors(C, threshold, fp32_first=True)
    assert torch.equal(U, reference.energy_basis_eigh(C, threshold))


def test_method_eigh_stays_float64():
    C = uncentred_features(300, 400)
    assert torch.equal(ops.energy_basis(C, 0.99, method="eigh"), reference.energy_basis_eigh(C, 0.99))


def test_non_orthonormal_fp32_vectors_give_way(monkeypatch):
    """A solver returning vectors that are not orthonormal (the other symptom of
    pytorch#144384) must not reach the projector: the probe sends it to fp64."""
    eigh = torch.linalg.eigh

    def skewed(A, **kwargs):
        eigenvalues, eigenvectors = eigh(A, **kwargs)
        if A.dtype == torch.float32:
            eigenvectors = eigenvectors.clone()
            eigenvectors[:, 1] += 1e-3 * eigenvectors[:, 0]
        return eigenvalues, eigenvectors

    C = uncentred_features(300, 400)
    assert dense.fp32_factors(C, 0.9) is not None
    monkeypatch.setattr(torch.linalg, "eigh", skewed)
    assert dense.fp32_factors(C, 0.9) is None
    U, Q = dense.eigh_factors(C, 0.9, fp32_first=True)
    assert orthonormality_error(torch.cat([U, Q], 1)) <= 1e-5


def test_energy_bases_with_complements_pairs_each_basis():
    wide = with_spectrum(torch.exp(-torch.arange(600.0) / 15), torch.float32)  # sketched: no complement
    covariances = [uncentred_features(300, 400), wide, torch.zeros(8, 8)]
    generator = torch.Generator().manual_seed(0)
    paired = ops.energy_bases_with_complements(covariances, 0.99, generator)
    bases = ops.energy_bases(covariances, 0.99, torch.Generator().manual_seed(0))
    assert all(torch.equal(U, V) for (U, _), V in zip(paired, bases))
    (_, Q0), (_, Q1), (U2, Q2) = paired
    assert Q0 is not None and Q0.shape[1] == 300 - bases[0].shape[1]
    assert Q1 is None and Q2 is None and U2.shape == (8, 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("d", [1, 7, 129, 300])
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "strided"])
def test_float64_factors_are_the_references_bitwise(dtype, d, layout):
    """The lean float64 path (in-place symmetrisation and ``eigh``, no flipped copy) gives the
    reference's basis and the reference's other eigenvectors bit for bit, on inputs that are not
    exactly symmetric (``X^T X`` from BLAS), odd sizes and non-contiguous layouts, and leaves
    its input untouched."""
    generator = torch.Generator().manual_seed(d)
    X = torch.randn(d + 3, d, generator=generator, dtype=dtype) * torch.linspace(0.01, 2.0, d, dtype=dtype)
    C = {"contiguous": lambda M: M, "transposed": lambda M: M.mT,
         "strided": lambda M: torch.empty(d, 2 * d, dtype=dtype)[:, ::2].copy_(M)}[layout](X.mT @ X)
    before = C.clone()
    eigenvalues, eigenvectors = reference.symmetric_eigh(C)
    for threshold in (0.5, 0.97, 0.999, 1.0):
        U, Q = dense.eigh_factors(C, threshold, fp32_first=False)
        k = reference.energy_rank(eigenvalues, threshold, torch.finfo(dtype).eps)
        assert torch.equal(U, reference.energy_basis_eigh(C, threshold))
        assert torch.equal(Q, eigenvectors[:, k:].to(dtype))
        assert U.is_contiguous() and Q.is_contiguous()
    assert torch.equal(C, before)


def test_lean_eigh_overwrites_its_own_copy():
    """The memory claim of ``lean_eigh`` (3 instead of ~5 ``d x d`` doubles, issue 22) rests on
    ``torch.linalg.eigh(out=)`` writing the eigenvectors into the symmetrised copy itself; if a
    torch release stopped honouring an aliased, column-major ``out``, this says so."""
    C = uncentred_features(200, 64)
    seen = {}
    real = torch.linalg.eigh

    def spy(A, *args, out=None, **kwargs):
        seen["input"], seen["out"] = A.data_ptr(), out[1].data_ptr()
        return real(A, *args, out=out, **kwargs)

    torch.linalg.eigh = spy
    try:
        _, vectors = dense.lean_eigh(C)
    finally:
        torch.linalg.eigh = real
    assert seen["input"] == seen["out"] == vectors.data_ptr()
    assert vectors.stride() == (1, C.shape[0])  # column-major: LAPACK's layout, no internal copy
    torch.testing.assert_close(vectors.mT @ vectors, torch.eye(C.shape[0], dtype=torch.float64), atol=1e-12, rtol=0)
