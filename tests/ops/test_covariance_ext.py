"""The C++ CPU covariance kernels (``backend="ext"``) against the PyTorch reference.

- Small-integer inputs make every partial sum exact in fp32, so any summation order gives
  the same bits: ext must equal the reference exactly (``torch.equal``), whatever C0 is.
- Random inputs, strided and 1x1 convs (patch panels): the increment is a sum of N products,
  then added to C0, so ``|C - exact| <= gamma_{N+2} * (|P|^T |P| + |C0|)`` elementwise
  (Higham's gamma for fp32; the extra 1 is the separate addition of the increment to C0).
- Where ``auto`` takes the spectral products (the DFT way to the shift kernel's F: large
  stride-1 convs with "same" padding), the result is within a rounding-level tolerance of the
  exact one, not bitwise equal to it (tests/ops/test_conv_covariance_spectral.py); the
  bitwise tests below hold the direct shift kernel to the reference on those geometries.
- Random inputs, stride-1 convs (shifted products): each block is F - R - K, three sums over
  at most T = B * Hp * Wp padded positions, each of absolute sum at most ``|x_c| |x_c'|``
  (Cauchy-Schwarz over the channels' values), added chunk by chunk (at most B chunks), so
  ``|C - exact| <= gamma_{T + 3B + 4} * (3 |x_c| |x_c'| + |C0|)``.
- The increment is exactly symmetric (only the upper triangle is computed, then mirrored).

Skipped when ``unsc_fast._C`` is not built, except under ``UNSC_FAST_REQUIRE_EXT=1`` (CI),
where a missing extension must fail.
"""
import os

import pytest
import torch

from unsc_fast import ops
from unsc_fast.ops import reference
from unsc_fast.ops.dispatch import extension_available, load_extension

from kernel_helpers import gamma

pytestmark = pytest.mark.skipif(
    not extension_available() and os.environ.get("UNSC_FAST_REQUIRE_EXT") != "1",
    reason="unsc_fast._C is not built",
)

X_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
C_DTYPES = [torch.float32, torch.float64]

# name: (x shape, kernel_size, stride, padding, dilation)
GEOMETRIES = {
    "3x3_same": ((2, 3, 8, 8), (3, 3), (1, 1), (1, 1), (1, 1)),
    "no_padding": ((2, 3, 7, 6), (3, 3), (1, 1), (0, 0), (1, 1)),
    "stride_2": ((2, 3, 9, 7), (3, 3), (2, 2), (1, 1), (1, 1)),
    "dilation_2": ((1, 2, 10, 10), (3, 3), (1, 1), (2, 2), (2, 2)),
    "non_square_kernel": ((2, 3, 7, 9), (2, 3), (1, 2), (0, 1), (1, 1)),
    "asymmetric_all": ((1, 4, 11, 8), (3, 2), (2, 1), (2, 0), (1, 3)),
    "batch_1_cin_1": ((1, 1, 6, 5), (3, 3), (1, 1), (1, 1), (1, 1)),
    "1x1": ((3, 5, 4, 4), (1, 1), (1, 1), (0, 0), (1, 1)),
    "1x1_stride_2": ((2, 6, 5, 5), (1, 1), (2, 2), (0, 0), (1, 1)),
    "kernel_fills_input": ((2, 2, 3, 3), (3, 3), (1, 1), (0, 0), (1, 1)),
    "padding_past_kernel": ((1, 2, 4, 3), (2, 2), (1, 1), (3, 2), (1, 1)),
    "stride_past_kernel": ((1, 3, 9, 9), (2, 2), (3, 3), (1, 1), (1, 1)),
    # d = 7 * 49 = 343 > 256: several block rows of the symmetric update
    "wide_blocks": ((2, 7, 9, 8), (7, 7), (1, 1), (3, 3), (1, 1)),
    # 64 * 5 * 4 floats per output row: several patch panels of the 4 MiB budget
    "many_panels": ((40, 64, 10, 12), (3, 3), (2, 1), (1, 1), (1, 1)),
    # stride 1, 64 * 42 * 42 floats per padded image: chunks of 9 images of the 4 MiB budget,
    # the last one short
    "many_chunks": ((12, 64, 40, 40), (3, 3), (1, 1), (1, 1), (1, 1)),
    # stride 1: one offset shared by two tap shifts (a row down and two columns left = one
    # column right), windows narrower than half the padded width
    "shared_offsets": ((2, 3, 3, 3), (3, 3), (1, 1), (0, 0), (1, 1)),
    "dilated_5x5": ((3, 4, 13, 11), (5, 5), (1, 1), (2, 1), (2, 1)),
}


def small_integers(shape, dtype, seed=0, low=-3, high=4) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(low, high, shape, generator=generator).to(dtype)


def conv_both(C0, x, geometry):
    """(ext result with its default kernel rule, reference result) from the same C0 and x."""
    kernel_size, stride, padding, dilation = geometry
    ours = C0.clone()
    load_extension().conv_covariance_(ours, x, list(kernel_size), list(stride), list(padding), list(dilation))
    expected = reference.conv_covariance_(C0.clone(), x, kernel_size, stride, padding, dilation)
    return ours, expected


# ---------------------------------------------------------------------- conv_covariance_
@pytest.mark.parametrize("c_dtype", C_DTYPES)
@pytest.mark.parametrize("x_dtype", X_DTYPES)
@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_conv_bitwise_on_small_integers(name, x_dtype, c_dtype):
    shape, *geometry = GEOMETRIES[name]
    d = shape[1] * geometry[0][0] * geometry[0][1]
    x = small_integers(shape, x_dtype)
    C0 = small_integers((d, d), c_dtype, seed=1)  # not symmetric: the lower triangle counts too
    ours, expected = conv_both(C0, x, geometry)
    assert ours.dtype == c_dtype
    assert torch.equal(ours, expected)


# Every geometry with the panel kernel (it takes any) and the stride-1 ones with the shift kernel.
KERNEL_CASES = [(name, "panel") for name in GEOMETRIES] + [
    (name, "shift") for name, geometry in GEOMETRIES.items() if geometry[2] == (1, 1)
]


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name, kernel", KERNEL_CASES)
def test_each_conv_kernel_bitwise_on_small_integers(name, kernel, x_dtype):
    """Both CPU kernels on every geometry they take, whichever one "auto" would pick."""
    shape, kernel_size, stride, padding, dilation = GEOMETRIES[name]
    d = shape[1] * kernel_size[0] * kernel_size[1]
    x = small_integers(shape, x_dtype)
    C0 = small_integers((d, d), torch.float32, seed=1)
    ours = C0.clone()
    load_extension().conv_covariance_(ours, x, kernel_size, stride, padding, dilation, kernel)
    expected = reference.conv_covariance_(C0.clone(), x, kernel_size, stride, padding, dilation)
    assert torch.equal(ours, expected)


def auto_kernel(shape, kernel_size, stride, padding, dilation=(1, 1), allow_spectral=False) -> str:
    return load_extension().conv_covariance_kernel(list(shape), list(kernel_size), list(stride), list(padding),
                                                   list(dilation), allow_spectral)


def test_auto_kernel_rule():
    """``auto`` (the default) chooses between the two kernels that round like the reference:
    the direct shifted products on stride-1 convs where they save work, the panel kernel for
    strides, 1x1 convs and where the shifts' corrections cost more. ``fast``
    (``allow_spectral``) also takes the spectral products where they save work ("same"
    padding, wide or large maps: All-CNN's 32x32 and 16x16 maps, ResNet-18's 4x4 stage at
    batch 64). The tests' geometries exercise every kernel."""
    for allow in (False, True):
        assert auto_kernel((43, 3, 32, 32), (3, 3), (1, 1), (1, 1), allow_spectral=allow) == "shift"
        assert auto_kernel((43, 96, 16, 16), (3, 3), (1, 1), (0, 0), allow_spectral=allow) == "shift"
        assert auto_kernel((43, 96, 16, 16), (3, 3), (2, 2), (1, 1), allow_spectral=allow) == "panel"
        assert auto_kernel((43, 96, 8, 8), (1, 1), (1, 1), (0, 0), allow_spectral=allow) == "panel"
    for shape in ((43, 48, 32, 32), (43, 96, 16, 16), (64, 512, 4, 4)):
        assert auto_kernel(shape, (3, 3), (1, 1), (1, 1), allow_spectral=True) == "spectral"
        assert auto_kernel(shape, (3, 3), (1, 1), (1, 1)) in ("shift", "panel")
    chosen = {auto_kernel(shape, *geometry) for shape, *geometry in GEOMETRIES.values()}
    assert chosen == {"shift", "panel"}
    fast = {auto_kernel(shape, *geometry, allow_spectral=True) for shape, *geometry in GEOMETRIES.values()}
    assert fast == {"shift", "panel", "spectral"}


def test_default_conv_covariance_is_bitwise_where_fast_would_take_spectral(monkeypatch):
    """DESIGN section 4: the extension's default equals the reference bitwise on exact inputs,
    also on a geometry where the spectral products would save work; the opt-in
    ``UNSC_FAST_CONV_KERNEL=fast`` runs them (close, not bitwise), and a bad setting names
    the variable."""
    shape, geometry = (5, 48, 12, 12), ((3, 3), (1, 1), (1, 1), (1, 1))
    assert auto_kernel(shape, *geometry, allow_spectral=True) == "spectral"
    x = small_integers(shape, torch.float32)
    d = 48 * 9
    expected = reference.conv_covariance_(torch.zeros(d, d), x, *geometry)
    monkeypatch.delenv("UNSC_FAST_CONV_KERNEL", raising=False)
    assert torch.equal(ops.conv_covariance_(torch.zeros(d, d), x, *geometry, backend="ext"), expected)
    monkeypatch.setenv("UNSC_FAST_CONV_KERNEL", "fast")
    fast = ops.conv_covariance_(torch.zeros(d, d), x, *geometry, backend="ext")
    assert not torch.equal(fast, expected)
    torch.testing.assert_close(fast, expected, rtol=0, atol=1e-2)
    monkeypatch.setenv("UNSC_FAST_CONV_KERNEL", "fastest")
    with pytest.raises(ValueError, match="UNSC_FAST_CONV_KERNEL='fastest'"):
        ops.conv_covariance_(torch.zeros(d, d), x, *geometry, backend="ext")


def test_shift_kernel_diagonal_is_a_sum_of_squares():
    """Data only in the last row: the taps whose windows miss it must get exactly 0 on the
    diagonal (products of the whole padded domain less the rows outside the window would
    leave rounding there, possibly negative), and every diagonal entry is the window's sum
    of squares to the last bits."""
    generator = torch.Generator().manual_seed(7)
    x = torch.zeros(6, 16, 8, 8)
    x[:, :, -1, :] = torch.randn(6, 16, 8, generator=generator) * 1e3
    x[:, :, 3, 2] = torch.randn(6, 16, generator=generator)  # and small values elsewhere
    C = torch.zeros(144, 144)
    load_extension().conv_covariance_(C, x, [3, 3], [1, 1], [1, 1], [1, 1], "shift")
    rows = reference.unfold_rows(x, (3, 3), (1, 1), (1, 1), (1, 1), torch.float64)
    exact = (rows * rows).sum(0)
    diagonal = C.diagonal().double()
    assert (diagonal[exact == 0] == 0).all()
    torch.testing.assert_close(diagonal, exact, rtol=1e-6, atol=0)


def test_shift_kernel_refuses_a_stride():
    with pytest.raises(RuntimeError, match="shift kernel needs stride 1"):
        load_extension().conv_covariance_(torch.zeros(27, 27), torch.zeros(1, 3, 8, 8), [3, 3], [2, 2], [1, 1],
                                          [1, 1], "shift")


def non_contiguous_inputs():
    base = small_integers((3, 4, 9, 10), torch.float32, seed=2)
    return {
        "channels_last": base.to(memory_format=torch.channels_last),
        "sliced": base[:, ::2, 1::2, :],
        "height_width_transposed": base.transpose(2, 3),
        "batch_reversed": base.flip(0)[::2],
    }


@pytest.mark.parametrize("layout", list(non_contiguous_inputs()))
def test_conv_non_contiguous_x(layout):
    x = non_contiguous_inputs()[layout]
    geometry = ((3, 2), (2, 1), (1, 1), (1, 2))
    d = x.shape[1] * 6
    ours, expected = conv_both(small_integers((d, d), torch.float32, seed=3), x, geometry)
    assert torch.equal(ours, expected)


def test_conv_non_contiguous_C_is_updated_in_place():
    x = small_integers((2, 3, 6, 6), torch.float32, seed=4)
    storage = small_integers((27, 27), torch.float32, seed=5)
    expected = reference.conv_covariance_(storage.T.clone(), x, (3, 3), (1, 1), (1, 1), (1, 1))
    C = storage.T  # transposed view
    ops.conv_covariance_(C, x, 3, padding=1, backend="ext")
    assert torch.equal(C, expected)


def fp32_error_bound(x, kernel_size, stride, padding, dilation, C0) -> torch.Tensor:
    """The elementwise bound of the module docstring for the kernel this geometry takes."""
    taps = kernel_size[0] * kernel_size[1]
    if stride == (1, 1) and taps > 1:  # shifted products
        norms = x.double().transpose(0, 1).flatten(1).norm(dim=1).repeat_interleave(taps)
        positions = x.shape[0] * (x.shape[2] + 2 * padding[0]) * (x.shape[3] + 2 * padding[1])
        return gamma(positions + 3 * x.shape[0] + 4) * (3 * torch.outer(norms, norms) + C0.double().abs())
    rows = reference.unfold_rows(x, kernel_size, stride, padding, dilation, torch.float64)
    return gamma(rows.shape[0] + 2) * (rows.abs().mT @ rows.abs() + C0.double().abs())


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["3x3_same", "asymmetric_all", "wide_blocks", "many_panels", "many_chunks", "dilated_5x5"])
def test_conv_random_within_fp32_bound_and_symmetric(name, x_dtype):
    shape, kernel_size, stride, padding, dilation = GEOMETRIES[name]
    generator = torch.Generator().manual_seed(6)
    x = torch.randn(shape, generator=generator).to(x_dtype)
    d = shape[1] * kernel_size[0] * kernel_size[1]
    C0 = torch.randn(d, d, generator=generator)
    C = ops.conv_covariance_(C0.clone(), x, kernel_size, stride, padding, dilation, backend="ext")
    rows = reference.unfold_rows(x, kernel_size, stride, padding, dilation, torch.float64)
    exact = C0.double() + rows.mT @ rows
    bound = fp32_error_bound(x, kernel_size, stride, padding, dilation, C0)
    assert ((C.double() - exact).abs() <= bound).all()
    increment = ops.conv_covariance_(torch.zeros(d, d), x, kernel_size, stride, padding, dilation, backend="ext")
    assert torch.equal(increment, increment.mT)


def test_conv_zero_batch_leaves_C_unchanged():
    C0 = small_integers((27, 27), torch.float32)
    C = ops.conv_covariance_(C0.clone(), torch.zeros(0, 3, 8, 8), 3, padding=1, backend="ext")
    assert torch.equal(C, C0)


def test_conv_kernel_larger_than_padded_input_is_refused():
    with pytest.raises(RuntimeError, match="does not fit"):
        ops.conv_covariance_(torch.zeros(27, 27), torch.zeros(1, 3, 2, 2), 3, backend="ext")


# --------------------------------------------------------------------------- covariance_
# (N, d): odd widths, one row, one column, and widths past the one-block limit (256).
DENSE_SHAPES = [(37, 13), (1, 1), (5, 1), (1, 300), (61, 257), (130, 600)]


def dense_layouts(N, d, dtype):
    base = small_integers((N, d), dtype, seed=7)
    wide = small_integers((N, 2 * d), dtype, seed=8)
    return {
        "contiguous": base,
        "transposed": small_integers((d, N), dtype, seed=9).T,
        "sliced": wide[:, ::2],
        "column_slice": wide[:, d:],
    }


@pytest.mark.parametrize("layout", ["contiguous", "transposed", "sliced", "column_slice"])
@pytest.mark.parametrize("x_dtype", X_DTYPES)
@pytest.mark.parametrize("shape", DENSE_SHAPES)
def test_dense_bitwise_on_small_integers(shape, x_dtype, layout):
    N, d = shape
    x = dense_layouts(N, d, x_dtype)[layout]
    for c_dtype in C_DTYPES:
        C0 = small_integers((d, d), c_dtype, seed=10)
        ours = ops.covariance_(C0.clone(), x, backend="ext")
        assert torch.equal(ours, reference.covariance_(C0.clone(), x))


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(200, 90), (300, 700)])
def test_dense_random_within_fp32_bound_and_symmetric(shape, x_dtype):
    generator = torch.Generator().manual_seed(11)
    x = torch.randn(shape, generator=generator).to(x_dtype)
    d = shape[1]
    C0 = torch.randn(d, d, generator=generator)
    C = ops.covariance_(C0.clone(), x, backend="ext")
    rows = x.double()
    exact = C0.double() + rows.mT @ rows
    bound = gamma(shape[0] + 2) * (rows.abs().mT @ rows.abs() + C0.double().abs())
    assert ((C.double() - exact).abs() <= bound).all()
    increment = ops.covariance_(torch.zeros(d, d), x, backend="ext")
    assert torch.equal(increment, increment.mT)


def test_dense_zero_rows_leave_C_unchanged():
    C0 = small_integers((9, 9), torch.float32)
    assert torch.equal(ops.covariance_(C0.clone(), torch.zeros(0, 9), backend="ext"), C0)


# ------------------------------------------------------------------------------ dispatch
def test_auto_on_cpu_picks_ext_for_conv_and_wide_dense(monkeypatch):
    from unsc_fast.ops import custom_ops

    monkeypatch.delenv("UNSC_FAST_BACKEND", raising=False)
    seen = []
    original = custom_ops.covariance_
    monkeypatch.setattr(custom_ops, "covariance_", lambda C, x, backend: seen.append(backend) or original(C, x, backend))
    ops.covariance_(torch.zeros(8, 8), torch.ones(3, 8))
    wide = ops.EXT_MIN_COVARIANCE_DIM
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the measured rule: dense ext wins single-threaded
    try:
        ops.covariance_(torch.zeros(wide, wide), torch.ones(3, wide))
    finally:
        torch.set_num_threads(threads)
    monkeypatch.setenv("UNSC_FAST_BACKEND", "ext")
    ops.covariance_(torch.zeros(8, 8), torch.ones(3, 8))
    assert seen == ["torch", "ext", "ext"]

    original_conv = custom_ops.conv_covariance_
    monkeypatch.setattr(custom_ops, "conv_covariance_", lambda *args: seen.append(args[-1]) or original_conv(*args))
    monkeypatch.delenv("UNSC_FAST_BACKEND")
    ops.conv_covariance_(torch.zeros(27, 27), torch.ones(1, 3, 4, 4), 3)
    assert seen[-1] == "ext"


def test_ext_is_refused_by_ops_without_a_cpu_kernel():
    with pytest.raises(ValueError, match="not implemented"):
        ops.project_(torch.randn(3, 4), torch.linalg.qr(torch.randn(4, 2))[0], backend="ext")
    with pytest.raises(ValueError, match="resolved name"):
        torch.ops.unsc_fast.project_(torch.randn(3, 4), torch.linalg.qr(torch.randn(4, 2))[0], "ext")
