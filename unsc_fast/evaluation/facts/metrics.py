"""What the facts benchmark measures on a model.

* value accuracy per person split (forget / retain / validation / unseen): the value token
  is the model's most likely next token after the question, over every template;
* forget log-prob: the mean log-probability of the forget facts' values;
* general tasks: copy (held-out 4-tuples) and successor accuracy, per graded token;
* TOFU's truth ratio per fact, ``P(perturbed) / P(paraphrased)`` with TOFU's per-token
  averaging (``exp(-avg_loss)``, perturbed losses averaged; ``data.py`` defines the answers),
  its **forget quality** (the p-value of a two-sample KS test between the forget facts' truth
  ratios under the model and under the retrained model) and a **model utility**: the
  harmonic mean of answer probability, accuracy and truth-ratio score ``max(0, 1 - R)`` on
  the retain and the unseen persons, and answer probability and accuracy on the general
  tasks (TOFU takes the same three per split on retain / real authors / world facts).

Formulas as in OpenUnlearning (locuslab/open-unlearning: ``src/evals/metrics/memorization.py``
``truth_ratio``, ``src/evals/metrics/privacy.py`` ``ks_test``, ``utility.py`` ``hm_aggregate``).
"""
from __future__ import annotations

import math

import torch
from scipy import stats
from torch import nn

from unsc_fast.evaluation.facts.data import TEMPLATES, FactsTask, Sequences
from unsc_fast.training import logits_of, model_device

SPLIT_METRICS = ("forget", "retain", "validation", "unseen")


@torch.no_grad()
def answer_log_probs(model: nn.Module, sequences: Sequences, candidates: torch.Tensor | None = None,
                     batch_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log_probs, correct)`` of the graded answers, both (N, A): the log-probability of each
    answer token given what precedes it, and whether it is the most likely next token.
    With ``candidates`` (N, C): their log-probabilities at the first answer position instead
    of the answers' (``correct`` unchanged)."""
    device = model_device(model)
    log_probs, correct = [], []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(sequences), batch_size):
            index = torch.arange(start, min(start + batch_size, len(sequences)))
            part = sequences.subset(index)
            batch = part.batch()
            logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
            logits = logits_of(logits).float()
            before = (part.answer_positions - 1).clamp(min=0).to(device)            # (n, A)
            scores = logits.gather(1, before.unsqueeze(-1).expand(-1, -1, logits.shape[-1])).log_softmax(-1)
            answers = part.answers.to(device)
            correct.append((scores.argmax(-1) == answers).cpu())
            if candidates is None:
                log_probs.append(scores.gather(-1, answers.clamp(min=0).unsqueeze(-1)).squeeze(-1).cpu())
            else:
                log_probs.append(scores[:, 0].gather(-1, candidates[index].to(device)).cpu())
    finally:
        model.train(was_training)
    return torch.cat(log_probs), torch.cat(correct)


def truth_ratios(model: nn.Module, task: FactsTask, persons: torch.Tensor) -> torch.Tensor:
    """TOFU's truth ratio per fact (person, relation), ``P_perturbed / P_paraphrased`` where
    each P is ``exp(-mean NLL)`` over the fact's templates (and perturbed answers)."""
    sequences = task.facts(persons)
    true, wrong = task.answer_candidates(persons)
    log_probs, _ = answer_log_probs(model, sequences, torch.cat([true[:, None], wrong], 1))
    per_fact = log_probs.view(-1, TEMPLATES, log_probs.shape[1])                  # (facts, templates, 1 + K)
    paraphrased_loss = -per_fact[..., 0].mean(1)
    perturbed_loss = -per_fact[..., 1:].mean((1, 2))
    return torch.exp(-perturbed_loss) / (torch.exp(-paraphrased_loss) + 1e-10)


def forget_quality(ratios: torch.Tensor, reference_ratios: torch.Tensor) -> float:
    """TOFU's forget quality: the KS test's p-value between two truth-ratio samples (1: the
    model's forget facts look like the retrained model's)."""
    return float(stats.ks_2samp(ratios.double().numpy(), reference_ratios.double().numpy()).pvalue)


def harmonic_mean(values: list[float]) -> float:
    if any(v <= 0 for v in values):
        return 0.0
    return len(values) / sum(1.0 / v for v in values)


def evaluate(model: nn.Module, task: FactsTask, reference_ratios: torch.Tensor | None = None) -> dict:
    """Every metric of the module docstring (percentages for accuracies), as a flat dict.
    ``reference_ratios``: the retrained model's forget truth ratios (forget quality needs them)."""
    metrics: dict[str, float] = {}
    utility_parts: list[float] = []
    for split in SPLIT_METRICS:
        persons = task.persons(split)
        log_probs, correct = answer_log_probs(model, task.facts(persons))
        metrics[f"{split}_accuracy"] = 100.0 * correct.float().mean().item()
        if split == "forget":
            metrics["forget_log_prob"] = log_probs.mean().item()
            ratios = truth_ratios(model, task, persons)
            metrics["forget_truth_ratio"] = torch.minimum(ratios, 1 / (ratios + 1e-10)).mean().item()
            if reference_ratios is not None:
                metrics["forget_quality"] = forget_quality(ratios, reference_ratios)
        if split in ("retain", "unseen"):
            ratios = truth_ratios(model, task, persons)
            utility_parts += [log_probs.exp().mean().item(), correct.float().mean().item(),
                              (1 - ratios).clamp(min=0).mean().item()]
    general_probs, general_correct = [], []
    for name, sequences in (("copy", task.copy("test")), ("successor", task.successor())):
        log_probs, correct = answer_log_probs(model, sequences)
        metrics[f"{name}_accuracy"] = 100.0 * correct.float().mean().item()
        general_probs.append(log_probs.exp().mean().item())
        general_correct.append(correct.float().mean().item())
    utility_parts += [sum(general_probs) / 2, sum(general_correct) / 2]
    metrics["model_utility"] = harmonic_mean(utility_parts)
    metrics["finite"] = float(all(math.isfinite(v) for v in metrics.values()))
    return metrics


def forget_accuracy(model: nn.Module, task: FactsTask, sequences: Sequences | None = None) -> float:
    """Value accuracy (%) on the forget persons: the stop rule's measure."""
    sequences = task.facts(task.persons("forget")) if sequences is None else sequences
    return 100.0 * answer_log_probs(model, sequences)[1].float().mean().item()


def knows_facts(model: nn.Module, task: FactsTask, persons: torch.Tensor, target: float = 100.0,
                general: float = 99.0) -> bool:
    """Whether ``model`` answers at least ``target`` % of the facts of ``persons`` and
    ``general`` % of the general tasks (the original's training goal)."""
    if 100.0 * answer_log_probs(model, task.facts(persons))[1].float().mean().item() < target:
        return False
    return all(100.0 * answer_log_probs(model, s)[1].float().mean().item() >= general
               for s in (task.copy("test"), task.successor()))
