"""Distance to the retrained model: KL / JS of the outputs and the tug-of-war score, on cases
small enough to compute by hand (``Lookup``: a model whose inputs are row numbers into a
table of preset logits)."""
import math

import pytest
import torch

from unsc_fast.evaluation.data import DatasetSplit
from unsc_fast.evaluation.divergence import (
    DIVERGENCE_TITLES,
    distance_to_retrain,
    js_divergence,
    kl_divergence,
    output_divergences,
    tug_of_war,
)
from unsc_fast.evaluation.scenario import full_class


from evaluation_helpers import Lookup  # noqa: E402


def rows(start, stop):
    return torch.arange(start, stop, dtype=torch.float32)[:, None]


def log(probabilities):
    return torch.tensor(probabilities, dtype=torch.float64).log()


def test_kl_and_js_by_hand():
    p, q = log([[0.5, 0.5]]), log([[0.9, 0.1]])
    assert float(kl_divergence(p, q)) == pytest.approx(0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1))
    m = [0.7, 0.3]
    expected_js = 0.5 * (0.5 * math.log(0.5 / m[0]) + 0.5 * math.log(0.5 / m[1])) \
        + 0.5 * (0.9 * math.log(0.9 / m[0]) + 0.1 * math.log(0.1 / m[1]))
    assert float(js_divergence(p, q)) == pytest.approx(expected_js)
    assert float(js_divergence(q, p)) == pytest.approx(expected_js)  # symmetric, unlike KL
    assert float(kl_divergence(q, p)) != pytest.approx(float(kl_divergence(p, q)))
    assert float(kl_divergence(p, p)) == 0.0 and float(js_divergence(q, q)) == pytest.approx(0.0, abs=1e-15)


def test_js_is_ln2_for_disjoint_outputs_and_stays_finite():
    confident = torch.tensor([[60.0, -60.0], [-60.0, 60.0]])
    a, b = Lookup(confident), Lookup(confident.flip(1))
    kl, js = output_divergences(a, b, rows(0, 2))
    assert torch.allclose(js, torch.full((2,), math.log(2.0), dtype=torch.float64), atol=1e-9)
    assert torch.isfinite(kl).all() and (kl > 100).all()


def test_tug_of_war_is_the_product_of_one_minus_accuracy_differences():
    # retrained: right on all 4 samples; model: 2 of 4 right on set A, 4 of 4 on B, 3 of 4 on C
    labels = torch.tensor([0, 1, 0, 1])
    right = torch.tensor([[5.0, 0.0], [0.0, 5.0], [5.0, 0.0], [0.0, 5.0]])
    wrong = right.flip(1)
    reference = Lookup(right)
    model = Lookup(torch.cat([right[:2], wrong[2:]]))
    mixed = Lookup(torch.cat([right[:3], wrong[3:]]))
    assert tug_of_war(model, reference, [(rows(0, 4), labels)]) == pytest.approx(0.5)
    assert tug_of_war(mixed, reference, [(rows(0, 4), labels), (rows(0, 4), labels)]) == pytest.approx(0.75 ** 2)
    assert tug_of_war(reference, reference, [(rows(0, 4), labels)]) == 1.0
    # an empty set has nothing to disagree on
    assert tug_of_war(model, reference, [(rows(0, 0), labels[:0]), (rows(0, 4), labels)]) == pytest.approx(0.5)


def test_distance_to_retrain_on_a_scenario():
    # 3 classes, rows 0-5 train (labels 0 0 1 1 2 2, class 2 forgotten), rows 6-9 test
    split = DatasetSplit(rows(0, 6), torch.tensor([0, 0, 1, 1, 2, 2]), rows(6, 10), torch.tensor([0, 1, 2, 2]),
                         num_classes=3)
    scenario = full_class(split, [2])
    truth = torch.tensor([0, 0, 1, 1, 2, 2, 0, 1, 2, 2])
    retrained = torch.full((10, 3), 0.0)
    retrained[torch.arange(10), torch.where(truth == 2, torch.tensor(0), truth)] = 4.0  # never predicts 2
    unlearned = retrained.clone()
    unlearned[4:6] = torch.tensor([0.0, 0.0, 4.0])  # still recognises the forgotten training samples
    result = distance_to_retrain(Lookup(unlearned), Lookup(retrained), scenario)
    assert list(result) == list(DIVERGENCE_TITLES)
    assert result["kl_remain"] == 0.0 and result["js_remain"] == pytest.approx(0.0, abs=1e-12)
    assert result["kl_forget"] > 1 and 0 < result["js_forget"] <= math.log(2)
    assert result["kl_test"] == pytest.approx(0.0, abs=1e-12)
    # forget accuracy 1.0 against 0.0, remaining and test the same: ToW = 0
    assert result["tow"] == 0.0
    same = distance_to_retrain(Lookup(retrained), Lookup(retrained), scenario)
    assert same["tow"] == 1.0 and all(same[key] == pytest.approx(0.0, abs=1e-12) for key in DIVERGENCE_TITLES if key != "tow")
