"""The stop rule counts a forget sample as still known while its label is the argmax or keeps
``StopRule.confidence`` of the probability: a run that stops "forgotten" has left every measured
forget sample (trained on and held out) below that probability, not just off the argmax."""
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from toy_classifier import separable_mlp
from unsc_fast.unlearn import unlearn
from unsc_fast.unlearning.data import correct_predictions
from unsc_fast.unlearning.stopping import StopRule


class Fixed(nn.Module):
    """Returns the logits stored for each sample index (``x`` holds the indices)."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, x):
        return self.logits[x.long().squeeze(-1)]


def test_a_label_that_keeps_its_confidence_is_still_known_on_tensors_and_loaders():
    # label 0 each time: the argmax; 2nd of three at p ~0.10; 2nd at p ~0.01; argmax at p ~0.34
    probabilities = torch.tensor([[0.8, 0.1, 0.1], [0.10, 0.85, 0.05], [0.01, 0.98, 0.01], [0.34, 0.33, 0.33]])
    model = Fixed(probabilities.log())
    x, y = torch.arange(4).float().unsqueeze(1), torch.zeros(4, dtype=torch.long)
    assert correct_predictions(model, (x, y)).tolist() == [True, False, False, True]
    assert correct_predictions(model, (x, y), confidence=0.05).tolist() == [True, True, False, True]
    assert correct_predictions(model, (x, y), confidence=0.5).tolist() == [True, False, False, True]  # or argmax
    loader = DataLoader(TensorDataset(x, y), batch_size=3)
    assert correct_predictions(model, loader, confidence=0.05).tolist() == [True, True, False, True]
    ignored = torch.full((4,), -100)  # an ignored label is never known, and never indexes the logits
    assert correct_predictions(model, (x, ignored), confidence=0.05).tolist() == [False] * 4


@pytest.mark.parametrize("confidence", [0.3, 0.1])
def test_a_run_stopped_forgotten_leaves_every_forget_sample_below_the_confidence(confidence):
    model, x, y = separable_mlp()
    forget = y == 1
    rule = StopRule(confidence=confidence, max_erasure_checks=0)  # stop at the first check that finds it forgotten
    result = unlearn(model, (x[forget], y[forget]), (x[~forget], y[~forget]), forget_classes=[1], stop=rule,
                     features=0.0)
    assert result.stop_reason == "forgotten"
    with torch.no_grad():
        own = model(x[forget]).softmax(1)[:, 1]
    assert (own < confidence).all(), own.max().item()  # held-out samples included


def test_the_argmax_alone_stops_sooner_than_a_confidence():
    """What the confidence buys: without it the same run stops while some samples still give their
    class a fair share of the probability."""
    steps, left = {}, {}
    for confidence in (None, 0.1):
        model, x, y = separable_mlp()
        forget = y == 1
        result = unlearn(model, (x[forget], y[forget]), (x[~forget], y[~forget]), forget_classes=[1],
                         stop=StopRule(confidence=confidence, max_erasure_checks=0), features=0.0)
        with torch.no_grad():
            left[confidence] = model(x[forget]).softmax(1)[:, 1].max().item()
        steps[confidence] = result.steps
    assert steps[None] < steps[0.1] and left[None] >= 0.1 > left[0.1]


def test_the_confidence_reaches_the_forget_loader_measure():
    model, x, y = separable_mlp()
    forget = y == 1
    result = unlearn(model, DataLoader(TensorDataset(x[forget], y[forget]), batch_size=8, shuffle=True),
                     DataLoader(TensorDataset(x[~forget], y[~forget]), batch_size=16), forget_classes=[1],
                     stop=StopRule(confidence=0.1, max_erasure_checks=0), features=0.0)
    assert result.stop_reason == "forgotten"
    with torch.no_grad():
        assert (model(x[forget]).softmax(1)[:, 1] < 0.1).all()
