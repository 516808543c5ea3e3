"""The facts benchmark (language-model unlearning): its data, model cache, metrics, methods
and the quick end-to-end run. The full benchmark is not a test (docs/compare.md)."""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("scipy")

from unsc_fast.evaluation.facts import data as facts_data  # noqa: E402
from unsc_fast.evaluation.facts.data import EOS, PAD, FactsSpec, FactsTask, Sequences  # noqa: E402
from unsc_fast.evaluation.facts.methods import (  # noqa: E402
    METHODS,
    method_settings,
    objective_unlearning,
    protect,
)
from unsc_fast.evaluation.facts.metrics import (  # noqa: E402
    answer_log_probs,
    evaluate,
    forget_quality,
    harmonic_mean,
    truth_ratios,
)
from unsc_fast.evaluation.facts.model import Batches, ModelSpec, gpt2  # noqa: E402
from unsc_fast.evaluation.facts.runner import quick_config, run_facts, trained_model, unlearning_context  # noqa: E402

SMALL = FactsSpec(persons=12, relations=2, values_per_relation=5, forget=2, validation=2, unseen=2, symbols=6,
                  copy_train=20, copy_test=6, perturbed=3)


def test_task_is_a_function_of_its_seed():
    a, b, c = FactsTask(SMALL, 0), FactsTask(SMALL, 0), FactsTask(SMALL, 1)
    for left, right in ((a.facts(torch.arange(12)), b.facts(torch.arange(12))), (a.copy("train"), b.copy("train"))):
        assert all(torch.equal(x, y) for x, y in zip(left.tensors(), right.tensors()))
    assert not torch.equal(a.values, c.values)
    persons = torch.cat([a.splits[s] for s in facts_data.SPLITS]).sort().values
    assert torch.equal(persons, torch.arange(12))  # the splits partition the persons
    assert [len(a.splits[s]) for s in facts_data.SPLITS] == [2, 2, 2, 6]


def test_facts_sequences_and_answers():
    task = FactsTask(SMALL, 0)
    persons = task.persons("forget")
    facts = task.facts(persons, answer_only=True)
    assert len(facts) == 2 * 2 * 3
    rows = torch.arange(len(facts))
    values = facts.input_ids[rows, facts.answer_positions[:, 0]]
    assert torch.equal(values, facts.answers[:, 0])
    true, wrong = task.answer_candidates(persons)
    assert torch.equal(true, values)
    assert not (wrong == true[:, None]).any() and wrong.shape == (12, 3)
    assert all(len(set(w.tolist())) == 3 for w in wrong)   # distinct wrong answers
    # answer-only labels: the value and the closing EOS, nothing of the question, no padding
    kept = facts.labels != -100
    assert torch.equal(kept.sum(1), torch.full((12,), 2))
    assert torch.equal(facts.labels[kept].view(-1, 2)[:, 1], torch.full((12,), EOS))
    assert (facts.input_ids[facts.attention_mask == 0] == PAD).all()
    full = task.facts(persons)
    assert torch.equal(full.labels[full.attention_mask.bool()], full.input_ids[full.attention_mask.bool()])


def test_general_tasks():
    task = FactsTask(SMALL, 0)
    train, test = task.copy("train"), task.copy("test")
    as_set = lambda s: {tuple(r) for r in s.answers.tolist()}  # noqa: E731
    assert not as_set(train) & as_set(test)
    assert torch.equal(test.input_ids[:, 2:6], test.answers)
    succ = task.successor()
    first = succ.input_ids[:, 2] - task.vocab.symbol0
    assert torch.equal(succ.answers - task.vocab.symbol0, (first[:, None] + torch.arange(1, 4)) % 6)


def test_spec_errors():
    with pytest.raises(ValueError, match="must leave retain persons"):
        FactsSpec(persons=10, forget=4, validation=3, unseen=3)
    with pytest.raises(ValueError, match="perturbed"):
        FactsSpec(values_per_relation=4, perturbed=4)


def test_batches_share_a_length_and_cover_every_sequence_once():
    task = FactsTask(SMALL, 0)
    sequences = Sequences.concat([task.facts(torch.arange(12), answer_only=True), task.copy("train")])
    batches = Batches(sequences, 5, seed=0)
    passes = [list(batches), list(batches)]
    assert len(passes[0]) == len(batches)
    for batch in passes[0]:
        assert batch["attention_mask"].all() or batch["input_ids"].shape[1] == 7  # facts are 5 or 7 long
        lengths = batch["attention_mask"].sum(1)
        assert (lengths == lengths[0]).all()
    seen = sorted(tuple(r.tolist()) for b in passes[0] for r in b["input_ids"])
    assert seen == sorted(tuple(r[: int(m.sum())].tolist()) for r, m in zip(sequences.input_ids,
                                                                              sequences.attention_mask))
    assert [b["input_ids"].tolist() for b in passes[0]] != [b["input_ids"].tolist() for b in passes[1]]
    again = list(Batches(sequences, 5, seed=0))
    assert [b["input_ids"].tolist() for b in again] == [b["input_ids"].tolist() for b in passes[0]]


def tiny_model(task):
    return gpt2(task.vocab.size, ModelSpec(n_layer=1, n_embd=16, n_head=2), seed=0)


def test_answer_log_probs_and_truth_ratio_by_hand():
    task = FactsTask(SMALL, 0)
    model = tiny_model(task)
    persons = task.persons("forget")
    sequences = task.facts(persons)
    log_probs, correct = answer_log_probs(model, sequences, batch_size=5)
    with torch.no_grad():
        logits = model(input_ids=sequences.input_ids, attention_mask=sequences.attention_mask).logits
    rows = torch.arange(len(sequences))
    scores = logits[rows, sequences.answer_positions[:, 0] - 1].log_softmax(-1)
    torch.testing.assert_close(log_probs[:, 0], scores[rows, sequences.answers[:, 0]])
    assert torch.equal(correct[:, 0], scores.argmax(-1) == sequences.answers[:, 0])
    true, wrong = task.answer_candidates(persons)
    p_true = scores[rows, true].view(-1, 3).mean(1)                      # per fact, mean over templates
    p_wrong = scores.gather(1, wrong).view(-1, 3, 3).mean((1, 2))
    torch.testing.assert_close(truth_ratios(model, task, persons), p_wrong.exp() / (p_true.exp() + 1e-10))


def test_forget_quality_and_utility_helpers():
    ratios = torch.linspace(0.1, 2.0, 40)
    assert forget_quality(ratios, ratios) == pytest.approx(1.0)
    assert forget_quality(ratios, ratios + 5) < 1e-10
    assert harmonic_mean([0.5, 0.5]) == pytest.approx(0.5)
    assert harmonic_mean([1.0, 0.0]) == 0.0
    assert harmonic_mean([1.0, 0.25]) == pytest.approx(0.4)


def test_evaluate_reports_every_metric():
    task = FactsTask(SMALL, 0)
    model = tiny_model(task)
    metrics = evaluate(model, task, truth_ratios(model, task, task.persons("forget")))
    for key in ("forget_accuracy", "retain_accuracy", "unseen_accuracy", "validation_accuracy", "copy_accuracy",
                "successor_accuracy", "forget_log_prob", "forget_quality", "model_utility"):
        assert math.isfinite(metrics[key]), key
    assert metrics["forget_quality"] == pytest.approx(1.0)  # the model against itself
    assert 0.0 <= metrics["model_utility"] <= 1.0


@pytest.fixture(scope="module")
def quick():
    config = quick_config()
    task = FactsTask(config.spec, 0)
    original, info = trained_model(config, 0, "original")
    return config, task, original, info


def test_quick_original_learns_its_facts(quick):
    config, task, original, info = quick
    assert info["epochs"] <= config.train.max_epochs
    accuracy = answer_log_probs(original, task.facts(task.persons("retain")))[1].float().mean()
    assert accuracy > 0.5  # far above chance (1 / 6 values)


def test_protected_run_keeps_every_change_in_the_null_space(quick):
    config, task, original, _ = quick
    context = unlearning_context(task)
    settings = {**method_settings("npo+nso"), "lr": 1e-3, "max_steps": 5, "stop_accuracy": -1.0}
    model, info = objective_unlearning(original, context, settings, 0, "npo")
    assert info["steps"] == 5 and not info["reached"]
    projector = protect(copy.deepcopy(original), context, settings, 0)
    before = dict(original.named_parameters())
    moved = 0
    for name, parameter in model.named_parameters():
        change = (parameter - before[name]).detach()
        tracked = projector.protection.uses.get(projector._parameter(name)) if name in _tracked(projector) else None
        if tracked is None:
            assert torch.equal(change, torch.zeros_like(change)), name  # untracked: frozen
            continue
        if change.norm() > 0:
            moved += 1
            # float32 weights: W0 + dW is stored rounded at eps * |W0|, which bounds the leak
            bound = 1e-6 + 8 * torch.finfo(torch.float32).eps * float(before[name].detach().norm() / change.norm())
            assert projector.residual(projector._parameter(name), change) < bound, name
    assert moved >= 3


def _tracked(projector) -> set[str]:
    return {use.name for uses in projector.protection.uses.values() for use in uses}


def test_stop_rule_and_unprotected_run(quick):
    config, task, original, _ = quick
    context = unlearning_context(task)
    settings = {**method_settings("graddiff"), "lr": 1e-3, "stop_accuracy": 100.0}
    model, info = objective_unlearning(original, context, settings, 0, "graddiff")
    assert info["steps"] == 0 and info["reached"]  # already at or below the stop accuracy
    settings = {**settings, "stop_accuracy": 2.0, "max_steps": 3}
    model, info = objective_unlearning(original, context, settings, 0, "ga")
    assert info["steps"] == 3
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), original.parameters()))


def test_model_cache_roundtrip(tmp_path):
    config = quick_config(output=str(tmp_path), train=quick_config().train.__class__(max_epochs=2, check_every=1))
    first, info = trained_model(config, 5, "retrain")
    from unsc_fast.evaluation.facts import model as facts_model

    facts_model._MEMORY.clear()  # only the file remains
    again, cached = trained_model(config, 5, "retrain")
    assert "cached" in cached and cached["epochs"] == info["epochs"]
    assert all(torch.equal(p, q) for p, q in zip(first.state_dict().values(), again.state_dict().values()))


def test_methods_and_settings():
    assert {"ga", "graddiff", "npo", "ga+nso", "graddiff+nso", "npo+nso"} <= set(METHODS)
    assert method_settings("npo", {"beta": 0.5})["beta"] == 0.5
    with pytest.raises(KeyError, match="has no setting 'betta'"):
        method_settings("npo", {"betta": 0.5})
    with pytest.raises(KeyError, match="unknown facts method"):
        method_settings("rmu")


def test_quick_run_end_to_end_from_the_cli(tmp_path, capsys):
    from unsc_fast.evaluation.cli import main

    code = main(["compare", "--dataset", "facts", "--quick", "--seeds", "0", "--methods", "ga,npo+nso",
                 "--output", str(tmp_path), "--quiet"])
    assert code == 0
    out = capsys.readouterr().out
    assert "| GA (AdamW) |" in out and "| retrain (reference) |" in out and "| NPO + NullSpaceOptimizer(AdamW) |" in out
    results = json.loads((tmp_path / "facts.json").read_text())
    methods = {row["method"] for row in results["rows"]}
    assert methods == {"original", "retrain", "ga", "npo+nso"}
    assert (tmp_path / "facts.md").exists()
    assert main(["compare", "--dataset", "facts", "--set", "npo.betta=1", "--quiet"]) == 2
    assert main(["compare", "--dataset", "facts", "--list-methods"]) == 0


def test_run_facts_rejects_unknown_methods():
    with pytest.raises(ValueError, match="unknown facts method"):
        run_facts(quick_config(methods=("rmu",)))
