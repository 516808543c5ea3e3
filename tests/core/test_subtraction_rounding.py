"""build()'s definiteness check allows the rounding of a subtraction of samples that are inside
the kept data, and no more (issue 28.2; ``unsc_fast.solve.checks.rounding_allowance``)."""
import math

import pytest
import torch
from torch import nn

from unsc_fast import NullSpaceProjector
from unsc_fast.solve.checks import ROW_ULPS, rounding_allowance


def test_a_forget_pass_over_kept_samples_builds_under_the_total_policy():
    """The issue's case: two samples, the first observed again with forget=True. The second
    forward (a batch of one) rounds differently; the float64 total used to be held to float64
    rounding and refused it as 'not inside the kept groups'."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    x = torch.randn(2, 6)
    projector = NullSpaceProjector(model, statistics="total")
    with projector.observe(labels=torch.tensor([0, 0])):
        model(x)
    with projector.observe(labels=torch.tensor([0]), forget=True):
        model(x[:1])
    layer_input = torch.relu(model[0](x[:1])).detach().double()
    trace = float(layer_input.square().sum())
    difference = projector.covariance("2", ["forget"]) - (layer_input.T @ layer_input)
    assert float(difference.abs().max()) < 2 * ROW_ULPS * torch.finfo(torch.float32).eps * trace
    projector.build()
    remaining = NullSpaceProjector(model, dtype=torch.float64)
    with remaining.observe():
        model(x[1:])
    remaining.build()
    assert projector.ranks() == remaining.ranks()


def test_a_forget_pass_in_other_batches_builds_on_a_conv_net():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 7 * 7, 10)).eval()
    x = torch.randn(16, 3, 16, 16)
    projector = NullSpaceProjector(model, statistics="total")
    with torch.no_grad():
        with projector.observe(labels=torch.arange(16) % 4):
            model(x)
        for i in (0, 5, 9):  # one at a time: other GEMM shapes, other rounding
            with projector.observe(labels=torch.tensor([i % 4]), forget=True):
                model(x[i : i + 1])
    projector.build()


def test_bfloat16_rows_are_allowed_bfloat16_rounding():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4)).to(torch.bfloat16)
    x = torch.randn(8, 16, dtype=torch.bfloat16)
    projector = NullSpaceProjector(model, statistics="total")
    with projector.observe():
        model(x)
    with projector.observe(forget=True):
        model(x[:3])
    assert projector.store.row_dtypes == {"0": torch.bfloat16, "2": torch.bfloat16}
    projector.build()


def two_coordinate_request(c: float) -> tuple[NullSpaceProjector, float]:
    """Kept rows e1, e2 (K = I); subtracted row c (1, 1): K - S has the eigenvalues 1 and
    1 - 2 c^2, so c > 1/sqrt(2) makes a real deficit of 2 c^2 - 1 with a positive diagonal
    (only the eigenvalue test can see it). Returns the projector and that deficit, exactly."""
    model = nn.Linear(2, 1, bias=False)
    projector = NullSpaceProjector(model, dtype=torch.float64)
    with projector.observe(group="kept"):
        model(torch.eye(2))
    row = torch.tensor([[c, c]], dtype=torch.float32)
    with projector.observe(group="request"):
        model(row)
    c = float(row[0, 0])  # as float32 holds it; c^2 is exact in float64
    return projector, 2 * c * c - 1


@pytest.mark.parametrize("side", ["inside", "outside"])
def test_the_line_between_rounding_and_a_foreign_subtraction(side):
    allowance = rounding_allowance(1.0, 2.0, rows=3, row_eps=torch.finfo(torch.float32).eps,
                                   dtype=torch.float64, dim=2)
    deficit_wanted = allowance / 2 if side == "inside" else allowance * 2
    projector, deficit = two_coordinate_request(math.sqrt((1 + deficit_wanted) / 2))
    # the deficit really is on the chosen side of the allowance this request gets
    request_allowance = rounding_allowance(1 + deficit, 2.0, 3, torch.finfo(torch.float32).eps,
                                           torch.float64, 2)
    if side == "inside":
        assert 0 < deficit < request_allowance
        projector.build(include=["kept"], subtract=["request"])
        assert projector.built
    else:
        assert deficit > 1.5 * request_allowance
        with pytest.raises(ValueError, match=r"layer '': .*indefinite \(min eigenvalue -0\.000122; .*allows 6\.1e-05\): .*not inside"):
            projector.build(include=["kept"], subtract=["request"])
        assert not projector.built


def test_a_real_foreign_subtraction_is_refused_under_the_total_policy():
    """A forget pass over a sample that was never observed with the rest: refused, naming
    the layer, under the same allowance that accepts a recomputed kept sample."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    projector = NullSpaceProjector(model, statistics="total")
    with projector.observe():
        model(torch.randn(2, 6))
    with projector.observe(forget=True):
        model(torch.randn(1, 6))
    with pytest.raises(ValueError, match=r"layer '0': the kept covariance less the subtracted groups is indefinite"):
        projector.build()
