"""Requests that cannot do what they say raise, naming why (RELIABILITY 66, issue 10.5)."""
import re

import pytest
import torch
from torch import nn

from unsc_fast import NullSpaceOptimizer, NullSpaceProjector
from unsc_fast.unlearn import unlearn


@pytest.mark.parametrize("model, empty", [
    (nn.Linear(3, 2), torch.randn(0, 3)),
    (nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(12, 2)), torch.randn(0, 2, 4, 4)),
])
def test_only_empty_batches_observed_is_an_error(model, empty):
    projector = NullSpaceProjector(model)
    with projector.observe():
        model(empty)
    names = list(projector.layers)
    with pytest.raises(RuntimeError, match=re.escape(f"layers {names!r} have 0 input rows") + ".*empty batches"):
        projector.build()
    assert not projector.built
    with pytest.raises(RuntimeError, match="build"):
        NullSpaceOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), projector).step()
    # one real batch under the same group makes it buildable
    with projector.observe():
        model(torch.randn((2, *empty.shape[1:])))
    assert projector.build().built


def test_subtracting_everything_leaves_no_rows():
    model = nn.Linear(3, 2)
    projector = NullSpaceProjector(model)
    x = torch.randn(4, 3)
    with projector.observe(group="all"):
        model(x)
    with projector.observe(group="request"):
        model(x)
    with pytest.raises(RuntimeError, match=r"0 input rows in groups \['all'\] less \['request'\]"):
        projector.build(include=["all"], subtract=["request"])


def two_coordinate_projector(kept_rows, subtracted_rows):
    model = nn.Linear(2, 1, bias=False)
    projector = NullSpaceProjector(model, dtype=torch.float64)
    with projector.observe(group="kept"):
        model(torch.tensor(kept_rows, dtype=torch.float32))
    with projector.observe(group="request"):
        model(torch.tensor(subtracted_rows, dtype=torch.float32))
    return projector


def test_subtracting_a_group_outside_the_kept_data_is_an_error():
    # more mass along e1 than the kept data has: a negative diagonal entry
    projector = two_coordinate_projector([[1.0, 0.0], [0.0, 1.0]], [[3.0, 0.0]])
    with pytest.raises(ValueError, match=r"layer '': .*indefinite \(negative diagonal mass -8.*not inside the kept"):
        projector.build(subtract=["request"])
    assert not projector.built
    # positive diagonal, yet indefinite: K = 100 I, S = 64 [[1, 1], [1, 1]], eigenvalues 36 +- 64
    projector = two_coordinate_projector([[10.0, 0.0], [0.0, 10.0]], [[8.0, 8.0]])
    with pytest.raises(ValueError, match=r"indefinite \(min eigenvalue -28"):
        projector.build(subtract=["request"])


def test_subtracting_a_group_inside_the_kept_data_builds():
    torch.manual_seed(0)
    x = torch.randn(50, 6) * torch.logspace(0, -3, 6)
    model = nn.Linear(6, 2)
    projector = NullSpaceProjector(model)  # float32: cancellation must not trip the check
    with projector.observe(group="all"):
        model(x)
    with projector.observe(group="request"):
        model(x[:20])
    projector.build(subtract=["request"])
    torch.testing.assert_close(projector.covariance("", ["all"]) - projector.covariance("", ["request"]),
                               (x[20:].T @ x[20:]), rtol=1e-4, atol=1e-5)


def test_finite_inputs_that_overflow_float32_are_not_called_nan():
    model = nn.Linear(3, 2)
    projector = NullSpaceProjector(model)
    big = torch.full((4, 3), 1e20)  # finite in float32, its square is not
    huge = torch.full((4, 3), 3e38)  # its sum is not finite either: the exact check decides
    for inputs in (big, huge):
        with pytest.raises(ValueError, match=r"layer '': overflow: .*use dtype=torch.float64 or rescale"):
            with projector.observe():
                model(inputs)
    assert projector.groups == []
    for bad in (float("nan"), float("inf")):
        x = torch.ones(4, 3)
        x[1, 2] = bad
        with pytest.raises(ValueError, match=r"layer '': the observed batch has NaN or Inf inputs"):
            with projector.observe():
                model(x)
    wide = NullSpaceProjector(model, dtype=torch.float64)
    with wide.observe():
        model(big)
    assert torch.isfinite(wide.covariance("")).all()


def test_never_observed_label_and_out_of_range_forget_class_are_named():
    model = nn.Linear(4, 5)
    x, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 4, 0])
    projector = NullSpaceProjector(model)
    with projector.observe(labels=y):
        model(x)
    with pytest.raises(ValueError, match=r"\[7\] were never observed"):
        projector.build(exclude=[7])
    for calibrate in (True, False):
        with pytest.raises(ValueError, match=r"forget_classes \[7\] are outside the model's classes 0..4"):
            unlearn(model, forget=(x[:2], y[:2]), remain=(x[2:], y[2:]), forget_classes=[7], calibrate=calibrate)


def test_bases_that_block_every_update_are_announced():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    projector = NullSpaceProjector(model)
    with projector.observe():
        model(torch.randn(20, 3))
    with pytest.warns(UserWarning, match=r"every tracked layer's basis spans its whole input space \(2 layers"):
        projector.build(threshold=1.0)
    assert projector.ranks() == {"0": 3, "2": 4}
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        projector.build(threshold=0.5)  # a null space is left: no warning
