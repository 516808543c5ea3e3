"""The language-model unlearning losses against plain reference computations.

Bitwise where both sides run the same ATen ops (OpenUnlearning's own formulation of the
per-sequence NLL), and against a per-token Python loop in float64 otherwise.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from unsc_fast.objectives import (
    grad_diff_loss,
    gradient_ascent_loss,
    next_token_nll,
    npo_loss,
    sequence_log_probs,
    token_log_probs,
)


def batch(seed=0, b=4, t=6, v=9, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, t, v, generator=generator, dtype=dtype)
    labels = torch.randint(0, v, (b, t), generator=generator)
    labels[0, :3] = -100      # a question's tokens
    labels[1, 4:] = -100      # padding
    labels[2, 1:] = -100      # nothing to predict in this sequence
    return logits, labels


def loop_reference(logits, labels):
    """Per sequence, per token: sum of log softmax(logits[t])[labels[t + 1]] in float64."""
    logits = logits.double()
    sums, counts = [], []
    for i in range(labels.shape[0]):
        total, count = 0.0, 0
        for t in range(labels.shape[1] - 1):
            target = int(labels[i, t + 1])
            if target == -100:
                continue
            total += float(torch.log_softmax(logits[i, t], -1)[target])
            count += 1
        sums.append(total)
        counts.append(count)
    return torch.tensor(sums, dtype=torch.float64), torch.tensor(counts)


def test_sequence_log_probs_are_openunlearnings_batch_nll_bitwise():
    logits, labels = batch()
    # locuslab/open-unlearning src/trainer/utils.py compute_batch_nll, written out
    nll = torch.nn.CrossEntropyLoss(ignore_index=-100, reduction="none")(
        logits[..., :-1, :].contiguous().transpose(-1, -2), labels[..., 1:].contiguous()).sum(dim=-1)
    assert torch.equal(sequence_log_probs(logits, labels), -nll)


def test_token_and_sequence_log_probs_against_a_loop():
    logits, labels = batch()
    sums, counts = loop_reference(logits, labels)
    log_probs, mask = token_log_probs(logits, labels)
    assert torch.equal(mask, labels[:, 1:] != -100)
    assert torch.equal(log_probs[~mask], torch.zeros(int((~mask).sum())))
    torch.testing.assert_close(sequence_log_probs(logits, labels).double(), sums, rtol=1e-6, atol=1e-6)
    mean = sequence_log_probs(logits, labels, "mean").double()
    torch.testing.assert_close(mean, sums / counts.clamp(min=1), rtol=1e-6, atol=1e-6)
    assert mean[2] == 0.0  # a sequence without labelled tokens


def test_next_token_nll_is_the_hugging_face_loss():
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    config = transformers.GPT2Config(vocab_size=9, n_positions=8, n_embd=8, n_layer=1, n_head=2)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    _, labels = batch()
    ids = labels.clamp(min=0)
    out = model(input_ids=ids, labels=labels)
    torch.testing.assert_close(next_token_nll(out, labels), out.loss, rtol=1e-6, atol=1e-7)
    sums, counts = loop_reference(out.logits.detach(), labels)
    assert math.isclose(float(next_token_nll(out.logits.detach(), labels)), float(-sums.sum() / counts.sum()), rel_tol=1e-6)
    assert torch.equal(gradient_ascent_loss(out.logits, labels), -next_token_nll(out.logits, labels))


def test_npo_formula_and_its_limits():
    logits, labels = batch()
    reference = sequence_log_probs(batch(seed=1)[0], labels).detach()
    beta = 0.1
    expected = -(2 / beta) * F.logsigmoid(-beta * (sequence_log_probs(logits, labels) - reference)).mean()
    assert torch.equal(npo_loss(logits, labels, reference, beta), expected)
    # at the reference model itself: (2 / beta) log 2
    at_reference = npo_loss(logits, labels, sequence_log_probs(logits, labels), beta)
    assert math.isclose(float(at_reference), 2 / beta * math.log(2), rel_tol=1e-6)
    # small beta: the gradient is that of ascent on the summed NLL (mean over sequences)
    a = logits.clone().requires_grad_(True)
    npo_loss(a, labels, sequence_log_probs(logits, labels), beta=1e-6).backward()
    b = logits.clone().requires_grad_(True)
    (sequence_log_probs(b, labels).mean()).backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6)


def test_npo_is_bounded_below_unlike_ascent():
    logits, labels = batch()
    reference = sequence_log_probs(logits, labels)
    pushed = logits.clone()  # every labelled token made (nearly) impossible
    pushed[:, :-1].scatter_(-1, labels[:, 1:].clamp(min=0).unsqueeze(-1), -1e4)
    assert float(npo_loss(pushed, labels, reference, 0.1)) >= 0.0
    assert float(gradient_ascent_loss(pushed, labels)) < -1e3


def test_grad_diff_combination():
    forget_logits, forget_labels = batch(seed=2)
    retain_logits, retain_labels = batch(seed=3)
    forget = gradient_ascent_loss(forget_logits, forget_labels)
    expected = 2.0 * forget + 0.5 * next_token_nll(retain_logits, retain_labels)
    assert torch.equal(grad_diff_loss(forget, retain_logits, retain_labels, 0.5, 2.0), expected)


def test_low_precision_logits_are_scored_in_float32():
    logits, labels = batch()
    half = logits.bfloat16()
    assert token_log_probs(half, labels)[0].dtype == torch.float32
    torch.testing.assert_close(sequence_log_probs(half, labels), sequence_log_probs(half.float(), labels))


def test_bad_inputs_are_named():
    logits, labels = batch()
    with pytest.raises(ValueError, match="labels must be integer token ids shaped like the logits"):
        sequence_log_probs(logits, labels[:, 0])
    with pytest.raises(ValueError, match=r"logits must be a floating-point \(batch, seq, vocab\)"):
        sequence_log_probs(logits[:, 0], labels)
    with pytest.raises(ValueError, match="every label is -100"):
        next_token_nll(logits, torch.full_like(labels, -100))
    with pytest.raises(ValueError, match="beta must be > 0"):
        npo_loss(logits, labels, torch.zeros(4), beta=0.0)
    with pytest.raises(ValueError, match="one entry per sequence"):
        npo_loss(logits, labels, torch.zeros(3))
    with pytest.raises(ValueError, match="reduction must be one of"):
        sequence_log_probs(logits, labels, "max")
