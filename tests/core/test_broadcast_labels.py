"""Per-label observation of inputs broadcast over the batch (Hugging Face position ids (1, T)).

Reference: observing each sample alone under its label. A batch observed with ``labels=``
must give every label exactly the statistics of its samples observed one by one, for every
slot (the position embedding's counts included), through ``observe`` and ``collect``.
"""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from unsc_fast import NullSpaceProjector

transformers = pytest.importorskip("transformers")

LABELS = torch.tensor([0, 1, 1, 2, 0, 1])


def gpt2():
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=40, n_positions=12)
    return transformers.GPT2LMHeadModel(config)


def bert():
    config = transformers.BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, vocab_size=40, max_position_embeddings=12)
    return transformers.BertForSequenceClassification(config)


def llama():
    config = transformers.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, vocab_size=40,
                                      max_position_embeddings=12)
    return transformers.LlamaForCausalLM(config)


def one_by_one(model, tokens) -> NullSpaceProjector:
    projector = NullSpaceProjector(model, dtype=torch.float64)
    with torch.no_grad():
        for sample, label in zip(tokens, LABELS):
            with projector.observe(labels=label.view(1)):
                model(input_ids=sample[None])
    return projector


def assert_same_statistics(batched: NullSpaceProjector, reference: NullSpaceProjector) -> None:
    assert sorted(batched.groups) == sorted(reference.groups)
    for key in reference.groups:
        for name in reference.protection.slots:
            assert batched.count(key, name) == reference.count(key, name), (key, name)
            torch.testing.assert_close(batched.store.matrix(key, name), reference.store.matrix(key, name),
                                       rtol=1e-12, atol=1e-12, msg=f"label {key}, slot {name}")


@pytest.mark.parametrize("build", [gpt2, bert, llama], ids=["gpt2", "bert", "llama"])
def test_labelled_batch_matches_samples_observed_one_by_one(build):
    torch.manual_seed(0)
    model = build().double().eval()
    tokens = torch.randint(0, 40, (len(LABELS), 7), generator=torch.Generator().manual_seed(1))
    reference = one_by_one(model, tokens)
    batched = NullSpaceProjector(model, dtype=torch.float64)
    with torch.no_grad(), batched.observe(labels=LABELS):
        model(input_ids=tokens)
    assert_same_statistics(batched, reference)
    collected = NullSpaceProjector(model, dtype=torch.float64)
    loader = [({"input_ids": tokens[:4]}, LABELS[:4]), ({"input_ids": tokens[4:]}, LABELS[4:])]
    collected.collect(([batch["input_ids"], labels] for batch, labels in loader))
    assert_same_statistics(collected, reference)


def test_gpt2_position_embedding_counts_each_sample():
    """wpe sees position ids (1, T): each label's count of a position is its sample count."""
    model = gpt2().eval()
    tokens = torch.randint(0, 40, (len(LABELS), 5), generator=torch.Generator().manual_seed(2))
    projector = NullSpaceProjector(model)
    with torch.no_grad(), projector.observe(labels=LABELS):
        model(input_ids=tokens)
    for label in (0, 1, 2):
        counts = projector.store.matrix(label, "transformer.wpe")
        expected = torch.zeros(12)
        expected[:5] = int((LABELS == label).sum())
        assert torch.equal(counts, expected)


def test_labels_for_a_single_sample_batch_are_still_refused():
    """Every layer sees batch 1 while labels have 3 entries: not a broadcast, a wrong batch."""
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    projector = NullSpaceProjector(model)
    with pytest.raises(ValueError, match=r"labels has 3 entries but the layer's input has batch size 1"):
        with projector.observe(labels=torch.tensor([0, 1, 1])):
            model(torch.randn(1, 4))
    assert not projector.store


@pytest.mark.parametrize("build", [gpt2, llama], ids=["gpt2", "llama"])
def test_unlabelled_token_batch_matches_sequences_observed_one_by_one(build):
    """Without labels or attention_mask, a token batch (B, T) counts broadcast inputs (GPT-2's
    position ids (1, T)) once per sequence, as observing each sequence alone does, whether the
    ids come positionally or as ``input_ids=``."""
    model = build().double().eval()
    tokens = torch.randint(0, 40, (len(LABELS), 6), generator=torch.Generator().manual_seed(3))
    reference = NullSpaceProjector(model, dtype=torch.float64, statistics="total")
    with torch.no_grad():
        for sample in tokens:
            with reference.observe():
                model(sample[None])
    for call in (lambda: model(tokens), lambda: model(input_ids=tokens)):
        batched = NullSpaceProjector(model, dtype=torch.float64, statistics="total")
        with torch.no_grad(), batched.observe():
            call()
        assert_same_statistics(batched, reference)


def test_total_minus_one_batch_forget_pass_keeps_the_positions_the_rest_used():
    """A total over 6 sequences in one batch less a forget pass of 2 in one batch: every
    position is still used by the 4 kept sequences (before the fix: 1 - 1 = 0, all free)."""
    model = gpt2().eval()
    tokens = torch.randint(0, 40, (len(LABELS), 5), generator=torch.Generator().manual_seed(4))
    projector = NullSpaceProjector(model, statistics="total", threshold=0.99)
    projector.collect([tokens], labels=False)
    projector.collect([tokens[:2]], labels=False, forget=True)
    projector.build()
    assert projector.ranks()["transformer.wpe"] == 5  # the 5 positions, frozen
    assert projector.basis("transformer.wpe")[:5].all()


def test_labels_under_one_total_count_the_broadcast_input_once_per_sample():
    """statistics="total" pools the labels into one group: GPT-2's position ids (1, T) count
    once per sequence there too (before: an AttributeError on the pooled group's index)."""
    model = gpt2().eval()
    tokens = torch.randint(0, 40, (len(LABELS), 5), generator=torch.Generator().manual_seed(5))
    projector = NullSpaceProjector(model, statistics="total")
    with torch.no_grad(), projector.observe(labels=LABELS):
        model(input_ids=tokens)
    (key,) = projector.groups
    expected = torch.zeros(12, dtype=projector.store.matrix(key, "transformer.wpe").dtype)
    expected[:5] = len(LABELS)
    assert torch.equal(projector.store.matrix(key, "transformer.wpe"), expected)


def test_swin_window_attention_files_each_sample_s_windows_under_its_label():
    """Swin's attention layers see ``B x windows`` entries: read sample-major (Hugging Face's
    window partition), each label gets exactly its samples' statistics, as observed one by one
    (where a lone sample's windows are all its own, whatever the layout)."""
    torch.manual_seed(0)
    config = transformers.SwinConfig(image_size=16, patch_size=2, embed_dim=8, depths=[1], num_heads=[2],
                                     window_size=4, num_labels=3)
    model = transformers.SwinForImageClassification(config).double().eval()
    images = torch.randn(len(LABELS), 3, 16, 16, dtype=torch.float64)
    reference = NullSpaceProjector(model, dtype=torch.float64)
    with torch.no_grad(), pytest.warns(UserWarning, match="consecutive entries per sample"):
        for image, label in zip(images, LABELS):
            with reference.observe(labels=label.view(1)):
                model(image[None])
    batched = NullSpaceProjector(model, dtype=torch.float64)
    with torch.no_grad(), pytest.warns(UserWarning, match="4 x the 6 labels"), batched.observe(labels=LABELS):
        model(images)
    assert_same_statistics(batched, reference)
    with pytest.raises(ValueError, match="labels has 4 entries but the layer's input has batch size 6"):
        with torch.no_grad(), batched.observe(labels=LABELS[:4]):
            model(images)
    with pytest.raises(ValueError, match="labels has 3 entries .* batch size 6; .*nothing from this batch was kept"):
        with torch.no_grad(), batched.observe(labels=LABELS[:3]):  # half the labels: no layer saw 3 samples
            model(images)
    assert_same_statistics(batched, reference)  # the refused batches left nothing behind


def test_a_sketched_window_attention_layer_is_fed_each_label_s_own_windows(monkeypatch):
    """The sketch path reads windows the same way: each label's sketch gets exactly the rows of
    its samples' windows, in the order observing the samples one by one gives them."""
    from unsc_fast.statistics import sketch as sketch_module

    torch.manual_seed(0)
    config = transformers.SwinConfig(image_size=16, patch_size=2, embed_dim=8, depths=[1], num_heads=[2],
                                     window_size=4, num_labels=3)
    model = transformers.SwinForImageClassification(config).double().eval()
    layer = "swin.encoder.layers.0.blocks.0.attention.q_proj"  # runs on the windows
    images = torch.randn(len(LABELS), 3, 16, 16, dtype=torch.float64)
    fed = []
    real = sketch_module.SlotSketch.update
    monkeypatch.setattr(sketch_module.SlotSketch, "update",
                        lambda self, group, rows: fed.append(rows.detach().clone()) or real(self, group, rows))

    def rows_by_label(observe):
        fed.clear()
        projector = NullSpaceProjector(model, dtype=torch.float64, sketch={layer: 8})
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # untracked bias table; the windows' own warning
            observe(projector)
        return fed[:]

    def batched(projector):
        with projector.observe(labels=LABELS):
            model(images)

    def one_by_one(projector):
        for image, label in zip(images, LABELS):
            with projector.observe(labels=label.view(1)):
                model(image[None])

    together, alone = rows_by_label(batched), rows_by_label(one_by_one)
    order = [i for label in sorted(set(LABELS.tolist())) for i in range(len(LABELS)) if LABELS[i] == label]
    assert len(together) == 3 and len(alone) == len(LABELS)  # one update per label, one per sample
    expected = torch.cat([alone[i].reshape(-1, alone[i].shape[-1]) for i in order])
    torch.testing.assert_close(torch.cat([r.reshape(-1, r.shape[-1]) for r in together]), expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="labels has 3 entries but the layer's input has batch size"):
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            projector = NullSpaceProjector(model, dtype=torch.float64, sketch={layer: 8})
            with projector.observe(labels=LABELS[:3]):  # half the labels: the input has 6 images, not windows
                model(images)

