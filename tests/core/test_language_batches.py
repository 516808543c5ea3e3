"""Language-model batches in observe()/collect(): padding never observed, the LM-batch rule.

A padded batch must give exactly what its sequences give unpadded: with integer-valued
weights every activation and every sum is exact, so the comparison is bitwise; on a GPT-2
built from config it is within float32 rounding, with the same row counts and ranks.
"""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from unsc_fast import NullSpaceProjector
from unsc_fast.adapters.tokens import TokenMask
from unsc_fast.statistics.batches import is_language_model_batch

VOCAB, WIDTH, LENGTH = 11, 6, 7


class TinyLM(nn.Module):
    """Token + position embeddings (position ids (1, T), shared by the batch as in GPT-2) into
    a Linear, an MLP and an output head; integer weights keep everything exact."""

    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(VOCAB, WIDTH)
        self.pos = nn.Embedding(LENGTH, WIDTH)
        self.hidden = nn.Linear(WIDTH, 2 * WIDTH)
        self.head = nn.Linear(2 * WIDTH, VOCAB)
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randint(-3, 4, p.shape, generator=generator).to(p.dtype))

    def forward(self, input_ids, attention_mask=None):
        positions = torch.arange(input_ids.shape[1]).unsqueeze(0)
        h = self.tok(input_ids) + self.pos(positions)
        return self.head(torch.relu(self.hidden(h)))


def ragged(seed: int = 0, count: int = 5):
    generator = torch.Generator().manual_seed(seed)
    lengths = [LENGTH, 2, 5, 1, 4][:count]
    return [torch.randint(1, VOCAB, (n,), generator=generator) for n in lengths]


def right_padded(sequences, pad: int = 0):
    ids = torch.full((len(sequences), max(len(s) for s in sequences)), pad)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = s
        mask[i, : len(s)] = 1
    return ids, mask


def projector(model, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return NullSpaceProjector(model, dtype=torch.float64, **kwargs)


def observed(model, batches, **kwargs):
    proj = projector(model, **kwargs)
    for batch in batches:
        with proj.observe():
            model(**batch)
    return proj


def test_padded_batch_is_bitwise_the_unpadded_sequences():
    model = TinyLM()
    sequences = ragged()
    ids, mask = right_padded(sequences, pad=3)  # a real token id: only the mask says it is padding
    padded = observed(model, [{"input_ids": ids, "attention_mask": mask}])
    one_by_one = observed(model, [{"input_ids": s[None]} for s in sequences])
    for name in ("tok", "pos", "hidden", "head"):
        assert torch.equal(padded.covariance(name), one_by_one.covariance(name)), name
        assert padded.count("all", name) == one_by_one.count("all", name) == int(mask.sum())
    unmasked = observed(model, [{"input_ids": ids}])
    assert unmasked.count("all", "hidden") == ids.numel() > int(mask.sum())
    assert not torch.equal(unmasked.covariance("hidden"), one_by_one.covariance("hidden"))


def test_labels_per_sequence_under_a_mask_split_the_same_rows():
    """Per-sequence labels with a shared (1, T) position input: each label's rows are its
    sequences' real tokens, and the labels add up to the unlabelled statistics."""
    model = TinyLM()
    sequences = ragged()
    ids, mask = right_padded(sequences)
    labels = torch.tensor([0, 1, 0, 2, 1])
    proj = projector(model)
    with proj.observe(labels=labels):
        model(input_ids=ids, attention_mask=mask)
    whole = observed(model, [{"input_ids": ids, "attention_mask": mask}])
    for name in ("tok", "pos", "hidden"):
        assert torch.equal(proj.covariance(name, [0, 1, 2]), whole.covariance(name))
        alone = observed(model, [{"input_ids": sequences[i][None]} for i in (1, 4)])
        assert torch.equal(proj.covariance(name, [1]), alone.covariance(name)), name


def test_gpt2_padded_batch_matches_its_sequences():
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    config = transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=32, n_layer=2, n_head=2,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).double().eval()
    generator = torch.Generator().manual_seed(1)
    sequences = [torch.randint(0, 50, (n,), generator=generator) for n in (9, 3, 6, 1)]
    ids, mask = right_padded(sequences)
    padded = observed(model, [{"input_ids": ids, "attention_mask": mask}])
    one_by_one = observed(model, [{"input_ids": s[None]} for s in sequences])
    unmasked = observed(model, [{"input_ids": ids}])
    names = [n for n in padded.layers]
    assert "transformer.wpe" in names and "transformer.h.1.mlp.c_proj" in names
    for name in names:
        assert padded.count("all", name) == one_by_one.count("all", name) == int(mask.sum()), name
        torch.testing.assert_close(padded.covariance(name), one_by_one.covariance(name), rtol=1e-10, atol=1e-10)
    assert unmasked.count("all", "transformer.h.0.attn.c_attn") == ids.numel()
    ranks = [p.build(threshold=0.999, method="eigh").ranks() for p in (padded, one_by_one)]
    assert ranks[0] == ranks[1]


def test_rows_that_cannot_be_lined_up_with_the_mask_are_refused():
    class Flattening(TinyLM):
        def forward(self, input_ids, attention_mask=None):
            h = self.tok(input_ids)
            return self.hidden(h.reshape(h.shape[0], -1, WIDTH // 2 * 2)[:, :-1])  # drops a position

    model = Flattening()
    ids, mask = right_padded(ragged())
    proj = projector(model, modules=["tok", "hidden"])
    with pytest.raises(ValueError, match="layer 'hidden'.*does not line up with attention_mask"):
        with proj.observe():
            model(input_ids=ids, attention_mask=mask)
    assert proj.store.rows("all", "tok") == 0  # the failed forward left nothing behind


def test_a_layer_whose_rows_are_not_tokens_is_refused_under_a_mask():
    class WithConv(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tok = nn.Embedding(VOCAB, WIDTH)
            self.conv = nn.Conv1d(WIDTH, WIDTH, 3, padding=1)

        def forward(self, input_ids, attention_mask=None):
            return self.conv(self.tok(input_ids).transpose(1, 2))

    model = WithConv()
    ids, mask = right_padded(ragged())
    proj = projector(model)
    with pytest.raises(ValueError, match="layer 'conv': a Conv1d's rows are not one per token"):
        with proj.observe():
            model(input_ids=ids, attention_mask=mask)


def test_a_mask_that_is_not_a_padding_mask_is_refused():
    model = TinyLM()
    ids, mask = right_padded(ragged())
    proj = projector(model)
    with pytest.raises(ValueError, match=r"attention_mask must be a \(batch, seq\) padding mask"):
        with proj.observe():
            model(input_ids=ids, attention_mask=mask[:, None, None, :])
    with pytest.raises(ValueError, match="labels has 3 entries but attention_mask"):
        with proj.observe(labels=torch.tensor([0, 1, 2])):
            model(input_ids=ids, attention_mask=mask)


def test_token_mask_alignments():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    rows = TokenMask(mask, "x")
    x = torch.arange(2 * 3 * 2, dtype=torch.float64).view(2, 3, 2)
    assert torch.equal(rows.rows(x), x[mask])
    assert torch.equal(rows.rows(x.transpose(0, 1), batch_dim=1), x.transpose(0, 1)[mask.T])
    shared = torch.arange(3 * 2, dtype=torch.float64).view(1, 3, 2)
    assert torch.equal(rows.rows(shared), torch.stack([shared[0, 0], shared[0, 1], shared[0, 0]]))
    pooled = torch.ones(2, 4)
    assert rows.rows(pooled).shape == (2, 4)
    assert torch.equal(rows.rows(x.reshape(6, 2)), x[mask])
    assert torch.equal(rows.rows(torch.tensor([[4, 5, 6], [7, 8, 9]])), torch.tensor([4, 5, 7]))
    with pytest.raises(ValueError, match="layer 'x'"):
        rows.rows(torch.ones(2, 4, 2))


def test_sketched_layers_observe_real_tokens_only():
    from unsc_fast.statistics.sketch import FrequentDirections

    model = TinyLM()
    ids, mask = right_padded(ragged())
    proj = projector(model, sketch={"hidden": 8})
    with proj.observe():
        model(input_ids=ids, attention_mask=mask)
    expected = FrequentDirections(WIDTH, 8, torch.float64)
    with torch.no_grad():
        h = model.tok(ids) + model.pos(torch.arange(ids.shape[1])[None])
    expected.update(h[mask.bool()].double())
    assert torch.equal(proj._sketches["all"]["hidden"].parts[0].matrix(), expected.matrix())


# --------------------------------------------------------------- the LM-batch rule (collect)
def test_collect_decides_labels_from_the_batch():
    model = TinyLM()
    ids, mask = right_padded(ragged())
    hf = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    proj = projector(model).collect([hf])
    assert proj.groups == ["all"] and proj.count("all", "hidden") == int(mask.sum())
    proj = projector(model).collect([(ids, ids)])  # (tokens, targets): a language-model batch
    assert proj.groups == ["all"] and proj.count("all", "hidden") == ids.numel()
    with pytest.raises(ValueError, match=r"labels=True.*per token \(a language-model batch\)"):
        projector(model).collect([hf], labels=True)
    person = torch.tensor([3, 3, 4, 5, 4])
    proj = projector(model).collect([{**hf, "person": person}], labels="person")
    assert sorted(proj.groups) == [3, 4, 5]
    assert torch.equal(proj.covariance("hidden"), projector(model).collect([hf]).covariance("hidden"))
    with pytest.raises(ValueError, match="must be a dict with a 'person' entry"):
        projector(model).collect([hf], labels="person")


def test_collect_keeps_classifier_labels():
    model = nn.Sequential(nn.Linear(4, 3))
    x, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    proj = projector(model).collect([(x, y)])
    assert sorted(proj.groups) == [0, 1, 2]
    assert projector(model).collect([(x, y)], labels=False).groups == ["all"]
    classifier_dict = {"input": x, "labels": y}  # a dict batch with one label per sample
    assert sorted(projector(model).collect([classifier_dict]).groups) == [0, 1, 2]


@pytest.mark.parametrize("batch, expected", [
    ((torch.zeros(2, 5, dtype=torch.long),), True),  # a bare token tensor has no targets: any answer is moot
    ((torch.zeros(2, 5, dtype=torch.long), torch.zeros(2, 5, dtype=torch.long)), True),
    ((torch.zeros(2, 5, dtype=torch.long), torch.zeros(2, dtype=torch.long)), False),
    ((torch.zeros(2, 5), torch.zeros(2, 5, dtype=torch.long)), False),
])
def test_is_language_model_batch(batch, expected):
    args, targets = batch[:1], (batch[1] if len(batch) > 1 else None)
    if targets is None:
        assert is_language_model_batch(args, {}, None) is False
    else:
        assert is_language_model_batch(args, {}, targets) is expected
