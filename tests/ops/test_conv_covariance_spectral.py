"""The shift kernel with spectral products (``kernel="spectral"``, csrc/conv_covariance_spectral.cpp).

The shifted products F come from the 2-D DFT of the images, so their rounding is not that of
the direct sums: on small integers the result is not bitwise the reference's (the direct
kernels are, tests/ops/test_covariance_ext.py). What is held instead, per entry of the
increment C (c, c' the channels of its row and column):

- ``|C - exact| <= 16 u sqrt(K) |x_c| |x_c'|``, with u the unit roundoff of C's dtype and K =
  H + 2W + 2B + frequencies the longest chain of additions any entry goes through (row DFT,
  column DFT, the products over the images, the inverse over the frequencies), and |x_c| the
  norm of channel c over the whole batch. Every intermediate sum is at most a few times
  |x_c| |x_c'| (Parseval), and rounding errors of such sums grow like sqrt(K) u, not K u (the
  probabilistic analysis of Higham and Mary, 2019); the worst-case bound (K u times the sums of
  absolute values) is too loose by four orders of magnitude to catch a wrong table. Measured
  errors are 2-6 u |x_c| |x_c'|, 40-100x inside.
- The increment is exactly symmetric and its diagonal holds exact sums of squares (both come
  from the shift kernel, not from the transforms).

The exact reference is the direct shift kernel in float64 (itself held to the unfold
reference bit for bit on small integers).
"""
import math
import os

import pytest
import torch

from unsc_fast.ops import reference
from unsc_fast.ops.dispatch import extension_available, load_extension

pytestmark = pytest.mark.skipif(
    not extension_available() and os.environ.get("UNSC_FAST_REQUIRE_EXT") != "1",
    reason="unsc_fast._C is not built",
)

UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float64: 2.0**-53}

# name: (x shape, kernel_size, padding, dilation); stride 1, (k - 1) * dilation <= 2 * padding
GEOMETRIES = {
    "3x3_same": ((2, 3, 8, 8), (3, 3), (1, 1), (1, 1)),
    "all_cnn_32": ((43, 48, 32, 32), (3, 3), (1, 1), (1, 1)),
    "all_cnn_16": ((43, 96, 16, 16), (3, 3), (1, 1), (1, 1)),
    "resnet_4x4": ((16, 64, 4, 4), (3, 3), (1, 1), (1, 1)),
    "odd_map": ((5, 7, 9, 11), (3, 3), (1, 1), (1, 1)),
    "non_square_kernel": ((2, 3, 7, 9), (2, 3), (1, 1), (1, 1)),
    "padding_past_kernel": ((1, 2, 4, 3), (2, 2), (3, 2), (1, 1)),
    "dilation_2": ((1, 2, 10, 10), (3, 3), (2, 2), (2, 2)),
    "dilated_5x5": ((3, 4, 13, 11), (5, 5), (4, 2), (2, 1)),
    "batch_1_cin_1": ((1, 1, 6, 5), (3, 3), (1, 1), (1, 1)),
    # 2 * frequencies * Cin * 4 bytes = 1.1 MiB per image: several image groups of 16 MiB,
    # and several frequency blocks of 4 MiB (a block holds 128 frequencies of 64 x 64)
    "groups_and_blocks": ((30, 64, 64, 64), (3, 3), (1, 1), (1, 1)),
}


def run(kernel: str, x: torch.Tensor, geometry, dtype=torch.float32, C0=None) -> torch.Tensor:
    kernel_size, padding, dilation = geometry
    d = x.shape[1] * kernel_size[0] * kernel_size[1]
    C = torch.zeros(d, d, dtype=dtype) if C0 is None else C0.clone()
    load_extension().conv_covariance_(C, x, list(kernel_size), [1, 1], list(padding), list(dilation), kernel)
    return C


def tolerance(x: torch.Tensor, geometry, dtype) -> torch.Tensor:
    kernel_size, padding, dilation = geometry
    batch, _, height, width = x.shape
    reach_h, reach_w = ((k - 1) * d for k, d in zip(kernel_size, dilation))
    frequencies = ((height + reach_h) // 2 + 1) * (width + reach_w)
    chain = height + 2 * width + 2 * batch + frequencies
    norms = x.double().transpose(0, 1).flatten(1).norm(dim=1).repeat_interleave(kernel_size[0] * kernel_size[1])
    return 16 * UNIT_ROUNDOFF[dtype] * math.sqrt(chain) * torch.outer(norms, norms)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_spectral_within_rounding_of_the_exact_covariance(name, dtype):
    shape, *geometry = GEOMETRIES[name]
    generator = torch.Generator().manual_seed(3)
    x = (torch.randn(shape, generator=generator) + 0.5).relu()  # post-ReLU inputs: a strong mean
    exact = run("shift", x.double(), geometry, torch.float64)
    ours = run("spectral", x.to(dtype), geometry, dtype)
    assert ((ours.double() - exact).abs() <= tolerance(x, geometry, dtype)).all()


@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float16])
def test_spectral_upcasts_half_precision_inputs(x_dtype):
    shape, *geometry = GEOMETRIES["odd_map"]
    x = torch.randn(shape, generator=torch.Generator().manual_seed(4)).to(x_dtype)
    exact = run("shift", x.double(), geometry, torch.float64)
    ours = run("spectral", x, geometry)
    assert ((ours.double() - exact).abs() <= tolerance(x.float(), geometry, torch.float32)).all()


def test_spectral_increment_is_symmetric_with_exact_diagonal_and_adds_to_C():
    shape, *geometry = GEOMETRIES["all_cnn_16"]
    x = torch.randn(shape, generator=torch.Generator().manual_seed(5)).relu()
    increment = run("spectral", x, geometry)
    assert torch.equal(increment, increment.mT)
    rows = reference.unfold_rows(x, (3, 3), (1, 1), (1, 1), (1, 1), torch.float64)
    torch.testing.assert_close(increment.diagonal().double(), (rows * rows).sum(0), rtol=1e-6, atol=0)
    C0 = torch.randn(increment.shape, generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(run("spectral", x, geometry, C0=C0), C0 + increment, rtol=0, atol=1e-3)


@pytest.mark.parametrize("layout", ["channels_last", "sliced", "height_width_transposed"])
def test_spectral_takes_any_strides(layout):
    base = torch.randn(4, 12, 10, 14, generator=torch.Generator().manual_seed(7))
    x = {"channels_last": base.to(memory_format=torch.channels_last), "sliced": base[:, ::2, 1:, ::2],
         "height_width_transposed": base.transpose(2, 3)}[layout]
    geometry = ((3, 3), (1, 1), (1, 1))
    torch.testing.assert_close(run("spectral", x, geometry), run("spectral", x.contiguous(), geometry), rtol=0, atol=0)


def test_spectral_refuses_reads_that_wrap_into_data():
    """Without enough padding the shift kernel's flattened reads past a row's end land on
    data, where the 2-D correlation has zeros: the spectral products would be wrong."""
    with pytest.raises(RuntimeError, match="spectral products need"):
        run("spectral", torch.zeros(2, 3, 8, 8), ((3, 3), (0, 0), (1, 1)))
    with pytest.raises(RuntimeError, match="shift kernel needs stride 1"):
        load_extension().conv_covariance_(torch.zeros(27, 27), torch.zeros(1, 3, 8, 8), [3, 3], [2, 2], [1, 1],
                                          [1, 1], "spectral")


def test_workspace_of_the_spectral_kernel_is_reported():
    """The memory budget reads this: for All-CNN's 16x16 layer the spectrum of a call's images
    (2 * 180 frequencies * 43 images * 96 channels) and a frequency block's products."""
    bytes_ = load_extension().conv_covariance_workspace_bytes([43, 96, 16, 16], [3, 3], [1, 1], [1, 1], [1, 1], 4)
    spectrum = 2 * 180 * 43 * 96 * 4
    assert spectrum < bytes_ < 64 * 2**20
