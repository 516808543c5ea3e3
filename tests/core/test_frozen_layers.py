"""By default the projector tracks only layers with a trainable weight: a frozen layer cannot
change, so its statistics would be observed and solved for nothing (and a frozen layer that
never runs, as PEFT's original classifier beside ``modules_to_save``, would stop ``build``)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from unsc_fast import NullSpaceProjector


class SavedHead(nn.Module):
    """PEFT's ``modules_to_save`` shape: a frozen original that never runs, a trainable copy."""

    def __init__(self) -> None:
        super().__init__()
        self.original_module = nn.Linear(6, 3).requires_grad_(False)
        self.copy = nn.Linear(6, 3)

    def forward(self, x):
        return self.copy(x)


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6).requires_grad_(False), nn.Tanh(), SavedHead())


def test_frozen_layers_are_not_tracked_and_reported_as_frozen():
    net = model()
    projector = NullSpaceProjector(net)
    assert list(projector.layers) == ["2.copy"]
    report = projector.coverage()
    assert report.frozen_layers == ("0", "2.original_module")
    rows = {r.name: r for r in report.rows}
    assert rows["0.weight"].status == "frozen" and rows["0.weight"].layers == ("0",)
    assert rows["2.copy.weight"].status == "protected"
    assert "2 frozen layer(s) not tracked" in str(report)
    with projector.observe():
        net(torch.randn(5, 4))
    projector.build()  # the never-called frozen original is not waited for
    assert projector.basis("2.copy").shape[0] == 6


def test_modules_still_tracks_exactly_what_is_named():
    net = model()
    projector = NullSpaceProjector(net, modules=["0", "2.copy"])
    assert list(projector.layers) == ["0", "2.copy"]
    assert net[0].weight in projector.protection.uses


def test_a_model_with_every_layer_frozen_says_so():
    net = model().requires_grad_(False)
    with pytest.raises(ValueError, match=r"every layer with an adapter is frozen.*modules="):
        NullSpaceProjector(net)
