"""Triton conv covariance (implicit im2col) against ``F.unfold`` + covariance.

One test per conv geometry (padding, stride, dilation, rectangular kernel, 1x1, kernel
as large as the padded input, asymmetric everything). Small-integer inputs: bit for bit;
random inputs: the fp32 bound gamma_n * (|P|^T |P| + |C0|) of tests/test_covariance.py.
"""
import pytest
import torch
import torch.nn.functional as F

from unsc_fast import ops
from unsc_fast.ops.dispatch import triton_available, triton_interpreting

from kernel_helpers import DEVICE, LARGE_ELEMENTS, available_memory_bytes, gamma, small_integers

pytestmark = pytest.mark.skipif(
    not triton_available() or (DEVICE == "cpu" and not triton_interpreting()),
    reason="needs triton, and CUDA or TRITON_INTERPRET=1",
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# name: (x shape, kernel_size, stride, padding, dilation)
GEOMETRIES = {
    "3x3_same": ((2, 3, 8, 8), (3, 3), (1, 1), (1, 1), (1, 1)),
    "no_padding": ((2, 3, 7, 6), (3, 3), (1, 1), (0, 0), (1, 1)),
    "stride_2": ((2, 3, 9, 7), (3, 3), (2, 2), (1, 1), (1, 1)),
    "dilation_2": ((1, 2, 10, 10), (3, 3), (1, 1), (2, 2), (2, 2)),
    "rectangular": ((2, 3, 7, 9), (2, 3), (1, 2), (0, 1), (1, 1)),
    "asymmetric_all": ((1, 4, 11, 8), (3, 2), (2, 1), (2, 0), (1, 3)),
    "1x1": ((3, 5, 4, 4), (1, 1), (1, 1), (0, 0), (1, 1)),
    "1x1_stride_2": ((2, 6, 5, 5), (1, 1), (2, 2), (0, 0), (1, 1)),
    "kernel_fills_input": ((2, 2, 3, 3), (3, 3), (1, 1), (0, 0), (1, 1)),
    "stride_past_kernel": ((1, 3, 9, 9), (2, 2), (3, 3), (1, 1), (1, 1)),
    "wide_channels": ((1, 7, 5, 5), (3, 3), (1, 1), (1, 1), (1, 1)),  # d = 63: several blocks
}


def unfolded_rows(x, kernel_size, stride, padding, dilation):
    cols = F.unfold(x.double(), kernel_size, dilation=dilation, padding=padding, stride=stride)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_bitwise_on_small_integers(geometry, dtype):
    shape, kernel_size, stride, padding, dilation = GEOMETRIES[geometry]
    x = small_integers(shape, dtype)
    d = shape[1] * kernel_size[0] * kernel_size[1]
    C = small_integers((d, d), torch.float32, seed=1)
    expected = ops.conv_covariance_(C.clone(), x, kernel_size, stride, padding, dilation, backend="torch")
    ops.conv_covariance_(C, x, kernel_size, stride, padding, dilation, backend="triton")
    assert torch.equal(C, expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("geometry", ["3x3_same", "asymmetric_all", "wide_channels"])
def test_random_within_fp32_bound(geometry, dtype):
    shape, kernel_size, stride, padding, dilation = GEOMETRIES[geometry]
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(shape, generator=generator).to(dtype).to(DEVICE)
    d = shape[1] * kernel_size[0] * kernel_size[1]
    C0 = torch.randn(d, d, generator=generator).to(DEVICE)
    C = ops.conv_covariance_(C0.clone(), x, kernel_size, stride, padding, dilation, backend="triton")
    rows = unfolded_rows(x, kernel_size, stride, padding, dilation)
    exact = C0.double() + rows.mT @ rows
    n = rows.shape[0] + 1
    bound = gamma(n) * (rows.abs().mT @ rows.abs() + C0.double().abs())
    assert ((C.double() - exact).abs() <= bound).all()
    increment = ops.conv_covariance_(torch.zeros_like(C0), x, kernel_size, stride, padding, dilation, backend="triton")
    assert torch.equal(increment, increment.mT)


def test_int_and_pair_arguments_agree():
    x = small_integers((2, 3, 6, 6), torch.float32)
    C_int = ops.conv_covariance_(torch.zeros(27, 27, device=DEVICE), x, 3, 2, 1, 1, backend="triton")
    C_pair = ops.conv_covariance_(torch.zeros(27, 27, device=DEVICE), x, (3, 3), (2, 2), (1, 1), (1, 1), backend="triton")
    assert torch.equal(C_int, C_pair)


def test_column_order_is_conv_weight_order():
    """C's columns follow conv.weight.flatten(1): W.flatten(1) @ patch == conv output."""
    generator = torch.Generator().manual_seed(3)
    conv = torch.nn.Conv2d(3, 4, (2, 3), stride=(2, 1), padding=(1, 0), dilation=(1, 2), bias=False)
    x = torch.randint(-2, 3, (1, 3, 6, 7), generator=generator).float()
    with torch.no_grad():
        conv.weight.copy_(torch.randint(-2, 3, conv.weight.shape, generator=generator).float())
        outputs = conv(x).flatten(2).squeeze(0).mT  # (positions, out)
    W = conv.weight.detach().flatten(1)
    # sum over positions of (W p)(W p)^T = W C W^T
    C = ops.conv_covariance_(torch.zeros(18, 18, device=DEVICE), x.to(DEVICE), (2, 3), (2, 1), (1, 0), (1, 2), backend="triton")
    assert torch.equal((W @ C.cpu() @ W.mT), outputs.mT @ outputs)


@pytest.mark.parametrize("layout", ["channels_last", "width_major", "batch_step", "channel_slice"])
def test_non_contiguous_inputs_match_contiguous(layout):
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(4, 6, 7, 5, generator=generator).to(DEVICE)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "width_major":
        x = x.transpose(2, 3).contiguous().transpose(2, 3)
    elif layout == "batch_step":
        x = x[::2]
    else:
        x = x[:, 1:4]
    assert not x.is_contiguous()
    d = x.shape[1] * 9
    C = ops.conv_covariance_(torch.zeros(d, d, device=DEVICE), x, 3, 1, 1, 1, backend="triton")
    expected = ops.conv_covariance_(torch.zeros(d, d, device=DEVICE), x.contiguous(), 3, 1, 1, 1, backend="triton")
    assert torch.equal(C, expected)


def test_empty_batch_leaves_C_unchanged():
    x = torch.zeros(0, 3, 5, 5, device=DEVICE)
    C = small_integers((27, 27), torch.float32)
    before = C.clone()
    ops.conv_covariance_(C, x, 3, 1, 1, 1, backend="triton")
    assert torch.equal(C, before)


def test_no_patches_is_an_error():
    from unsc_fast.kernels import conv_covariance

    x = torch.zeros(1, 2, 2, 2, device=DEVICE)
    with pytest.raises(ValueError, match="no patches"):
        conv_covariance.conv_covariance_(torch.zeros(18, 18, device=DEVICE), x, (3, 3), (1, 1), (0, 0), (1, 1))


@pytest.mark.parametrize("splits", [2, 5])
def test_row_splits(splits):
    from unsc_fast.kernels import conv_covariance

    x = small_integers((3, 3, 6, 6), torch.float16)
    C = small_integers((27, 27), torch.float32, seed=5)
    expected = ops.conv_covariance_(C.clone(), x, 3, 1, 1, 1, backend="torch")
    conv_covariance.conv_covariance_(C, x, (3, 3), (1, 1), (1, 1), (1, 1), splits=splits)
    assert torch.equal(C, expected)


def test_offsets_beyond_int32():
    """Images more than 2**31 elements apart: the gather must form int64 offsets."""
    if available_memory_bytes() < 3 * LARGE_ELEMENTS:
        pytest.skip("needs ~4.3 GB for a >2**31-element buffer")
    buffer = torch.empty(LARGE_ELEMENTS, dtype=torch.bfloat16, device=DEVICE)
    x = buffer.as_strided((3, 2, 4, 4), (2**30 + 7, 16, 4, 1))
    x.copy_(small_integers((3, 2, 4, 4), torch.bfloat16))
    C = ops.conv_covariance_(torch.zeros(18, 18, device=DEVICE), x, 3, 1, 1, 1, backend="triton")
    expected = ops.conv_covariance_(torch.zeros(18, 18, device=DEVICE), x.contiguous(), 3, 1, 1, 1, backend="torch")
    assert torch.equal(C, expected)
