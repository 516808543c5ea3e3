"""Triton streaming covariance ``C += x^T x`` against the PyTorch reference.

On CPU the kernel runs in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET).
Small-integer inputs make every product and partial sum exact in fp32, so there the
kernel must equal the reference bit for bit whatever its summation order. Random inputs
are held to the classical bound for a sum of n products in fp32 (Higham, Accuracy and
Stability, eq. 3.5): |fl(s) - s| <= gamma_n * sum |a_i b_i|, gamma_n = n u / (1 - n u),
u = 2^-24, valid for any summation order or tree.
"""

import pytest
import torch

from unsc_fast import ops
from unsc_fast.ops.dispatch import triton_available, triton_interpreting

from kernel_helpers import DEVICE, LARGE_ELEMENTS, available_memory_bytes, gamma, small_integers

pytestmark = pytest.mark.skipif(
    not triton_available() or (DEVICE == "cpu" and not triton_interpreting()),
    reason="needs triton, and CUDA or TRITON_INTERPRET=1",
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ODD_SHAPES = [(1, 5), (37, 23), (129, 67), (16, 16), (5, 1), (1, 1), (200, 40)]


def covariance_bound(C0: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Elementwise bound on |C_fp32 - C_exact| for C0 + x^T x summed in fp32."""
    x64 = x.double().abs()
    return gamma(x.shape[0] + 1) * (x64.mT @ x64 + C0.double().abs())


def exact(C0: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return C0.double() + x.double().mT @ x.double()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ODD_SHAPES)
def test_bitwise_on_small_integers(shape, dtype):
    x = small_integers(shape, dtype)
    C = small_integers((shape[1], shape[1]), torch.float32, seed=1)
    expected = ops.covariance_(C.clone(), x, backend="torch")
    ops.covariance_(C, x, backend="triton")
    assert torch.equal(C, expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(37, 23), (129, 67), (300, 33)])
def test_random_within_fp32_bound(shape, dtype):
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(shape, generator=generator).to(dtype).to(DEVICE)
    C0 = torch.randn(shape[1], shape[1], generator=generator).to(DEVICE)
    C = ops.covariance_(C0.clone(), x, backend="triton")
    reference = ops.covariance_(C0.clone(), x, backend="torch")
    bound = covariance_bound(C0, x)
    assert ((C.double() - exact(C0, x)).abs() <= bound).all()
    assert ((reference.double() - exact(C0, x)).abs() <= bound).all()  # the bound is not loose for torch


def test_tall_odd_shape():
    """(4097, 129): N and d both one past a block multiple; several blocks and mirrors."""
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(4097, 129, generator=generator).to(DEVICE)
    C = ops.covariance_(torch.zeros(129, 129, device=DEVICE), x, backend="triton")
    zero = torch.zeros_like(C)
    assert ((C.double() - exact(zero, x)).abs() <= covariance_bound(zero, x)).all()
    assert torch.equal(C, C.mT)


def test_increment_is_exactly_symmetric():
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(70, 50, generator=generator).to(DEVICE)
    C = ops.covariance_(torch.zeros(50, 50, device=DEVICE), x, backend="triton")
    assert torch.equal(C, C.mT)


def strided_views(x):
    """Views of the same values with other strides: transposed storage, sliced, stepped."""
    n, d = x.shape
    transposed = x.mT.contiguous().mT
    wide = torch.zeros(n, 2 * d + 3, dtype=x.dtype, device=x.device)
    wide[:, 1 : 2 * d + 1 : 2] = x
    tall = torch.zeros(3 * n, d, dtype=x.dtype, device=x.device)
    tall[::3] = x
    return {
        "transposed": transposed,
        "column_step": wide[:, 1 : 2 * d + 1 : 2],
        "row_step": tall[::3],
    }


@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous_inputs_match_contiguous(dtype):
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(45, 21, generator=generator).to(dtype).to(DEVICE)
    expected = ops.covariance_(torch.zeros(21, 21, device=DEVICE), x, backend="triton")
    for name, view in strided_views(x).items():
        assert not view.is_contiguous(), name
        C = ops.covariance_(torch.zeros(21, 21, device=DEVICE), view, backend="triton")
        assert torch.equal(C, expected), name


def test_non_contiguous_accumulator():
    x = small_integers((33, 19), torch.float32)
    storage = small_integers((19, 19), torch.float32, seed=6)
    C = storage.mT  # a transposed view: written through its strides
    expected = ops.covariance_(C.contiguous(), x, backend="torch")
    ops.covariance_(C, x, backend="triton")
    assert torch.equal(C, expected)
    assert torch.equal(storage, expected.mT)


@pytest.mark.parametrize("shape", [(0, 7), (5, 0), (0, 0)])
def test_zero_size(shape):
    x = torch.zeros(shape, device=DEVICE)
    C = small_integers((shape[1], shape[1]), torch.float32)
    before = C.clone()
    ops.covariance_(C, x, backend="triton")
    assert torch.equal(C, before)


@pytest.mark.parametrize("splits", [2, 3, 7])
def test_row_splits(splits):
    """Rows split into partials summed afterwards: still exact, still symmetric."""
    from unsc_fast.kernels import covariance

    x = small_integers((301, 40), torch.bfloat16)
    C = small_integers((40, 40), torch.float32, seed=7)
    expected = ops.covariance_(C.clone(), x, backend="torch")
    covariance.covariance_(C, x, splits=splits)
    assert torch.equal(C, expected)


def test_deterministic():
    generator = torch.Generator().manual_seed(8)
    x = torch.randn(150, 40, generator=generator).to(DEVICE)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        first = ops.covariance_(torch.zeros(40, 40, device=DEVICE), x, backend="triton")
        second = ops.covariance_(torch.zeros(40, 40, device=DEVICE), x, backend="triton")
    finally:
        torch.use_deterministic_algorithms(previous)
    assert torch.equal(first, second)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_rows_accumulate_in_fp32(dtype):
    """Many rows of randn+3 in fp16/bf16 (200k on a GPU; 60k in the interpreter, already
    ~10x past fp16's range): the fp32 accumulator keeps 1e-5 relative error (an fp16
    accumulator would overflow, a bf16 one would be off by ~1e-1)."""
    rows = 200_000 if DEVICE == "cuda" else 60_000
    generator = torch.Generator().manual_seed(9)
    x = (torch.randn(rows, 8, generator=generator) + 3).to(dtype).to(DEVICE)
    C = ops.covariance_(torch.zeros(8, 8, device=DEVICE), x, backend="triton")
    expected = x.double().mT @ x.double()
    assert torch.isfinite(C).all()
    assert ((C.double() - expected).abs().max() / expected.abs().max()) <= 1e-5


def test_tf32_option():
    """input_precision='tf32' (a GPU option for fp32 inputs) stays within 1e-2 relative."""
    from unsc_fast.kernels import covariance

    generator = torch.Generator().manual_seed(10)
    x = torch.randn(100, 48, generator=generator).to(DEVICE)
    C = covariance.covariance_(torch.zeros(48, 48, device=DEVICE), x, input_precision="tf32")
    expected = x.double().mT @ x.double()
    assert ((C.double() - expected).abs().max() / expected.abs().max()) <= 1e-2
    with pytest.raises(ValueError, match="input_precision"):
        covariance.covariance_(torch.zeros(48, 48, device=DEVICE), x, input_precision="fast")


def test_fp64_goes_to_reference():
    x = torch.randn(20, 6, dtype=torch.float64, device=DEVICE)
    C = ops.covariance_(torch.zeros(6, 6, dtype=torch.float64, device=DEVICE), x, backend="triton")
    assert torch.equal(C, x.mT @ x)


@pytest.mark.skipif(available_memory_bytes() < 3 * LARGE_ELEMENTS, reason="needs ~4.3 GB for a >2**31-element buffer")
def test_offsets_beyond_int32():
    """Rows more than 2**31 elements apart (a >4 GB bf16 buffer; CPU touches only the
    rows used): every offset must be formed in int64, or the kernel reads wild memory."""
    stride = 2**30 + 7
    buffer = torch.empty(LARGE_ELEMENTS, dtype=torch.bfloat16, device=DEVICE)
    x = buffer.as_strided((3, 20), (stride, 1))
    x.copy_(small_integers((3, 20), torch.bfloat16))
    C = ops.covariance_(torch.zeros(20, 20, device=DEVICE), x, backend="triton")
    values = x.float()
    assert torch.equal(C, values.mT @ values)
