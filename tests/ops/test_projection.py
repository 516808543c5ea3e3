"""Triton fused projection ``G -= (G U) U^T`` and ``G <- (G Q) Q^T`` against the reference.

Small-integer G and U keep every step exact in fp32, so there the kernel equals the
reference bit for bit (also after rounding to bf16/fp16: both round the same fp32 value).
Random inputs are held to a stated fp32 bound, valid for any summation order:
with T = G U summed over d terms and S = T U^T over k terms,
|out - exact| <= 1.01 (gamma_d + gamma_k) (|G| |U|) |U|^T + u |exact|  (plus the rounding
to bf16/fp16, u_out (|exact| + bound)), gamma_n = n u / (1 - n u), u = 2^-24.
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
# (out, d, k)
ODD_SHAPES = [(1, 5, 2), (37, 23, 5), (129, 67, 20), (16, 16, 16), (5, 40, 37), (8, 1, 1), (1, 1, 1)]
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
OPS = {"project_": ops.project_, "restrict_": ops.restrict_}


def orthonormal(d, k, seed=0):
    generator = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(d, k, generator=generator, dtype=torch.float64))
    return Q.float().to(DEVICE)


def exact_and_bound(G, U, op):
    """The fp64 result of op on the same inputs, and the elementwise fp32 error bound."""
    G64, U64 = G.double(), U.double()
    product = (G64 @ U64) @ U64.mT
    exact = G64 - product if op == "project_" else product
    d, k = U.shape
    bound = 1.01 * (gamma(d) + gamma(k)) * ((G64.abs() @ U64.abs()) @ U64.abs().mT)
    if op == "project_":
        bound += UNIT_ROUNDOFF[torch.float32] * exact.abs()
    if G.dtype != torch.float32:
        bound += UNIT_ROUNDOFF[G.dtype] * (exact.abs() + bound)
    return exact, bound


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ODD_SHAPES)
def test_bitwise_on_small_integers(shape, dtype, op):
    out, d, k = shape
    G = small_integers((out, d), dtype)
    U = small_integers((d, k), torch.float32, low=-1, high=2, seed=1)
    expected = OPS[op](G.clone(), U, backend="torch")
    OPS[op](G, U, backend="triton")
    assert torch.equal(G, expected)


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("dtype", DTYPES)
def test_scratch_path_for_large_k(dtype, op):
    """k spanning several k blocks goes through the (out, k) scratch: same bits."""
    from unsc_fast.kernels import projection

    G = small_integers((21, 45), dtype)
    U = small_integers((45, 37), torch.float32, low=-1, high=2, seed=1)
    expected = OPS[op](G.clone(), U, backend="torch")
    getattr(projection, op)(G, U, block_k=16)
    assert torch.equal(G, expected)


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,block_k", [((37, 23, 5), None), ((129, 67, 20), None), ((33, 70, 40), 16)])
def test_random_within_fp32_bound(shape, block_k, dtype, op):
    from unsc_fast.kernels import projection

    out, d, k = shape
    generator = torch.Generator().manual_seed(2)
    G = torch.randn(out, d, generator=generator).to(dtype).to(DEVICE)
    U = orthonormal(d, k)
    exact, bound = exact_and_bound(G, U, op)
    result = getattr(projection, op)(G.clone(), U, block_k=block_k)
    assert ((result.double() - exact).abs() <= bound).all()
    reference = OPS[op](G.clone(), U, backend="torch")
    assert ((reference.double() - exact).abs() <= bound).all()  # the bound holds for torch too


def test_tall_odd_shape():
    """(4097, 129) with k = 10: one past block multiples in both dims."""
    generator = torch.Generator().manual_seed(3)
    G = torch.randn(4097, 129, generator=generator).to(DEVICE)
    U = orthonormal(129, 10)
    exact, bound = exact_and_bound(G, U, "project_")
    ops.project_(G, U, backend="triton")
    assert ((G.double() - exact).abs() <= bound).all()


def test_result_is_in_the_null_space():
    generator = torch.Generator().manual_seed(4)
    G = torch.randn(50, 40, generator=generator).to(DEVICE)
    U = orthonormal(40, 12)
    ops.project_(G, U, backend="triton")
    assert (G @ U).abs().max() <= 1e-5 * G.abs().max()


def test_restrict_to_complement_equals_project():
    generator = torch.Generator().manual_seed(5)
    G = torch.randn(30, 24, generator=generator).to(DEVICE)
    U = orthonormal(24, 17)
    Q = ops.complement_basis(U)
    projected = ops.project_(G.clone(), U, backend="triton")
    restricted = ops.restrict_(G.clone(), Q, backend="triton")
    assert torch.allclose(projected, restricted, rtol=1e-5, atol=1e-5)


def strided_views(G):
    """Writable views with the values of G and other strides, and the storage they live in."""
    out, d = G.shape
    transposed = torch.empty(d, out, dtype=G.dtype, device=G.device)
    wide = torch.full((out, 2 * d + 1), 7.0, dtype=G.dtype, device=G.device)
    tall = torch.full((2 * out, d), 7.0, dtype=G.dtype, device=G.device)
    views = {"transposed": (transposed, transposed.mT), "column_step": (wide, wide[:, 1::2]), "row_step": (tall, tall[::2])}
    for _, view in views.values():
        view.copy_(G)
    return views


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous_G_is_written_through_its_strides(dtype, op):
    generator = torch.Generator().manual_seed(6)
    G = torch.randn(19, 27, generator=generator).to(dtype).to(DEVICE)
    U = orthonormal(27, 6)
    expected = OPS[op](G.clone(), U, backend="triton")
    for name, (storage, view) in strided_views(G).items():
        before = storage.clone()
        OPS[op](view, U, backend="triton")
        assert torch.equal(view, expected), name
        untouched = torch.ones_like(storage, dtype=torch.bool)
        untouched.as_strided(view.shape, view.stride(), view.storage_offset()).fill_(False)
        assert torch.equal(storage[untouched], before[untouched]), name


def test_non_contiguous_basis():
    generator = torch.Generator().manual_seed(7)
    G = torch.randn(23, 31, generator=generator).to(DEVICE)
    U = orthonormal(31, 10)
    expected = ops.project_(G.clone(), U, backend="triton")
    transposed_storage = U.mT.contiguous().mT
    wider = torch.zeros(31, 20, device=DEVICE)
    wider[:, ::2] = U
    for view in (transposed_storage, wider[:, ::2]):
        assert not view.is_contiguous()
        assert torch.equal(ops.project_(G.clone(), view, backend="triton"), expected)


def test_zero_sizes():
    from unsc_fast.kernels import projection

    G = small_integers((6, 9), torch.float32)
    empty_basis = torch.zeros(9, 0, device=DEVICE)
    assert torch.equal(ops.project_(G.clone(), empty_basis, backend="triton"), G)
    assert torch.equal(ops.restrict_(G.clone(), empty_basis, backend="triton"), torch.zeros_like(G))
    assert torch.equal(projection.project_(G.clone(), empty_basis), G)
    assert torch.equal(projection.restrict_(G.clone(), empty_basis), torch.zeros_like(G))
    no_rows = torch.zeros(0, 9, device=DEVICE)
    U = orthonormal(9, 3)
    assert ops.project_(no_rows, U, backend="triton").shape == (0, 9)
    assert projection.restrict_(no_rows, U).shape == (0, 9)


def test_expanded_G_is_rejected():
    from unsc_fast.kernels import projection

    G = torch.ones(1, 8, device=DEVICE).expand(4, 8)
    with pytest.raises(RuntimeError, match="overlapping"):
        projection.project_(G, orthonormal(8, 2))


def test_deterministic():
    generator = torch.Generator().manual_seed(8)
    G = torch.randn(40, 50, generator=generator).to(DEVICE)
    U = orthonormal(50, 20)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        first = ops.project_(G.clone(), U, backend="triton")
        second = ops.project_(G.clone(), U, backend="triton")
    finally:
        torch.use_deterministic_algorithms(previous)
    assert torch.equal(first, second)


def test_tf32_option():
    from unsc_fast.kernels import projection

    generator = torch.Generator().manual_seed(9)
    G = torch.randn(32, 48, generator=generator).to(DEVICE)
    U = orthonormal(48, 16)
    exact, _ = exact_and_bound(G, U, "project_")
    result = projection.project_(G.clone(), U, input_precision="tf32")
    assert (result.double() - exact).abs().max() <= 1e-2 * G.abs().max()
    with pytest.raises(ValueError, match="input_precision"):
        projection.project_(G.clone(), U, input_precision="fast")


def test_fp64_goes_to_reference():
    G = torch.randn(5, 7, dtype=torch.float64, device=DEVICE)
    G0 = G.clone()
    U = orthonormal(7, 3).double()
    expected = ops.project_(G.clone(), U, backend="torch")
    assert torch.equal(ops.project_(G, U, backend="triton"), expected)
    assert torch.allclose(expected, G0 - (G0 @ U) @ U.mT, rtol=0, atol=1e-14)


@pytest.mark.skipif(available_memory_bytes() < 3 * LARGE_ELEMENTS, reason="needs ~4.3 GB for a >2**31-element buffer")
def test_offsets_beyond_int32():
    """Rows of G more than 2**31 elements apart: reads and writes use int64 offsets."""
    buffer = torch.empty(LARGE_ELEMENTS, dtype=torch.bfloat16, device=DEVICE)
    G = buffer.as_strided((3, 20), (2**30 + 7, 1))
    G.copy_(small_integers((3, 20), torch.bfloat16))
    U = small_integers((20, 4), torch.float32, low=-1, high=2, seed=1)
    expected = ops.project_(G.clone(), U, backend="torch")
    ops.project_(G, U, backend="triton")
    assert torch.equal(G, expected)
