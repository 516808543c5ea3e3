"""unlearn() on DataLoaders with any loss: a causal LM (transformers Llama, random init from a
config) keeps every tracked layer's change in the null space; classifier loaders relabel per batch."""
import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import unsc_fast.unlearning.targets as unlearn_targets

from unsc_fast import NullSpaceProjector
from unsc_fast.objectives.classification import RetainDistillation
from unsc_fast.training import causal_lm_loss
from toy_classifier import separable_mlp
from unsc_fast.unlearn import unlearn
from unsc_fast.unlearning.stopping import StopRule

transformers = pytest.importorskip("transformers")


def tiny_llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=False,
    )
    return transformers.LlamaForCausalLM(config)


def token_loader(tokens, shuffle=False):
    return DataLoader(TensorDataset(tokens, tokens), batch_size=4, shuffle=shuffle,
                      generator=torch.Generator().manual_seed(0))


def null_space_leaks(projector, before):
    """Per tracked layer: ``(||dW U||, ||dW||, ||W||)`` of the change since ``before``."""
    leaks = {}
    for name, layer in projector.layers.items():
        if projector.basis(name).dim() != 2 or projector.basis(name).dtype == torch.bool:
            continue  # dense (d, k) bases only; the embedding's row mask is another engineer's test
        weight = layer.weight.detach().double()
        weight = weight.reshape(weight.shape[0], -1)
        change = weight - before[name].double().reshape(weight.shape)
        leaks[name] = ((change @ projector.basis(name).double()).norm().item(), change.norm().item(),
                       weight.norm().item())
    return leaks


def check_null_space(projector, before, unit_roundoff):
    """The only leak left is the rounding of the stored weight: ``W + dW`` is rounded once per
    step to the parameter dtype, at most ``u |w|`` per element, so ``||dW U|| <= steps * u ||W||``
    (U U^T is a projection: it does not grow the error). Bound used: ``4 u ||W||``
    (two steps and a factor two of slack). Where the layer moved by at least 1 % of its weight
    this is also a relative leak ``||dW U|| / ||dW|| < 400 u`` (< 1e-5 at fp32's u = 2^-24)."""
    for name, (leak, size, norm) in null_space_leaks(projector, before).items():
        assert size > 1e-4, name  # the layer did move ...
        assert leak <= 4 * unit_roundoff * norm, (name, leak, norm)  # ... only in the null space
        if size >= 0.01 * norm:
            assert leak / size < 400 * unit_roundoff, (name, leak / size)


@pytest.mark.parametrize("statistics", ["total", "per_label"])
def test_causal_lm_gradient_ascent_moves_tracked_layers_only_in_the_null_space(statistics):
    model = tiny_llama()
    tokens = torch.randint(0, 48, (24, 12), generator=torch.Generator().manual_seed(1))
    # threshold 0.9 leaves a null space to move in: 288 tokens span the 32-wide inputs
    projector = NullSpaceProjector(model, threshold=0.9, statistics=statistics)
    if statistics == "total":  # whole training data once, then the request's forget pass
        projector.collect(token_loader(tokens), labels=False)
        remain = None
    else:  # remaining data observed inside unlearn()
        remain = token_loader(tokens[4:])
    assert "lm_head" in projector.layers and "model.layers.0.mlp.down_proj" in projector.layers
    before = {name: layer.weight.detach().clone() for name, layer in projector.layers.items()}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if "norm" in n}
    result = unlearn(model, token_loader(tokens[:4], shuffle=True), remain, projector=projector, labels="keep",
                     loss=causal_lm_loss, objective="ascent", untracked="freeze", epochs=2, lr=0.5)
    assert result.labels is None and len(result.losses) == 2
    assert result.losses[-1] > result.losses[0]  # ascent: the forget loss goes up
    check_null_space(projector, before, unit_roundoff=2.0**-24)
    for name, value in frozen.items():  # untracked norms are frozen
        assert torch.equal(dict(model.named_parameters())[name], value), name


def test_classifier_loaders_calibrate_per_batch_like_tensors():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4))
    x, y = torch.randn(80, 6), torch.arange(80) % 4
    forget = y == 1
    twin = copy.deepcopy(model)
    seen = []
    loader = DataLoader(TensorDataset(x[forget], y[forget]), batch_size=8)
    record = lambda inputs, targets: seen.append(targets) or torch.full_like(targets, 2)  # noqa: E731
    unlearn(model, loader, DataLoader(TensorDataset(x[~forget], y[~forget]), batch_size=16),
            forget_classes=[1], labels=record, epochs=1)
    assert torch.cat(seen).eq(1).all()  # the relabel callable saw the original targets
    # the calibrated rule on a loader relabels with the frozen original model, never class 1
    result = unlearn(twin, loader, (x[~forget], y[~forget]), forget_classes=[1], epochs=2)
    assert result.labels is None and result.projector.built_from == (0, 2, 3)
    with pytest.raises(ValueError, match="labels must be one of"):
        unlearn(twin, loader, (x, y), labels="shuffle")


def test_soft_labels_train_toward_the_distribution_under_the_stop_rule_for_tensors_and_loaders(monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4))
    x, y = torch.randn(80, 6), torch.arange(80) % 4
    forget = y == 1
    result = unlearn(copy.deepcopy(model), (x[forget], y[forget]), (x[~forget], y[~forget]), forget_classes=[1],
                     labels="soft", epochs=2)
    assert result.labels.shape == (int(forget.sum()), 4) and torch.allclose(result.labels.sum(1), torch.ones(20))
    assert (result.labels[:, 1] == 0).all() and result.trajectory  # measured: the stop rule ran
    seen = []
    real = unlearn_targets.calibrated
    monkeypatch.setattr(unlearn_targets, "calibrated", lambda *args: seen.append(real(*args)) or seen[-1])
    loader = DataLoader(TensorDataset(x[forget], y[forget]), batch_size=8)
    unlearn(copy.deepcopy(model), loader, (x[~forget], y[~forget]), forget_classes=[1], labels="soft", epochs=1)
    assert seen and all(batch.shape[1] == 4 and (batch[:, 1] == 0).all() for batch in seen)


# ---------------------------------------------------------------------------- the stop rule on loaders


def test_a_forget_loader_is_measured_and_the_run_stops_when_forgotten():
    model, x, y = separable_mlp()
    forget = y == 1
    result = unlearn(model, DataLoader(TensorDataset(x[forget], y[forget]), batch_size=8, shuffle=True),
                     DataLoader(TensorDataset(x[~forget], y[~forget]), batch_size=16), forget_classes=[1],
                     stop=StopRule(confidence=0.1))  # what this toy reaches (its floor is ~0.03)
    assert all(check["forget"] is not None for check in result.trajectory)  # measured at every check
    assert result.stop_reason == "forgotten" and result.steps < 50 * 5  # before the 50-pass budget
    assert result.guard == "remain batches (the first 1, observed too), 16 samples"
    assert all(check["guard_damage"] is not None for check in result.trajectory)
    with torch.no_grad():
        assert not model(x[forget]).argmax(1).eq(1).any()


class Recording(TensorDataset):
    """Remembers every index read inside the unlearning loop and whether autograd was on: the loop
    trains with it on and measures under ``no_grad`` (reads before the loop only peek)."""

    def __init__(self, *tensors):
        super().__init__(*tensors)
        self.reads, self.in_loop = [], False

    def __getitem__(self, index):
        if self.in_loop:
            self.reads.append((index, torch.is_grad_enabled()))
        return super().__getitem__(index)


def test_a_map_style_forget_loader_holds_out_a_share_it_measures_and_never_trains_on(monkeypatch):
    import unsc_fast.unlearn as unlearn_module
    model, x, y = separable_mlp()
    forget = y == 1
    data = Recording(x[forget], y[forget])
    real_run = unlearn_module.loop.run

    def run(*args, **kwargs):
        data.in_loop = True
        try:
            return real_run(*args, **kwargs)
        finally:
            data.in_loop = False
    monkeypatch.setattr(unlearn_module.loop, "run", run)
    result = unlearn(model, DataLoader(data, batch_size=8, shuffle=True),
                     DataLoader(TensorDataset(x[~forget], y[~forget]), batch_size=16), forget_classes=[1],
                     stop=StopRule(confidence=0.1))
    held = result.holdout
    assert held is not None and held.shape == (len(data),) and int(held.sum()) == round(0.2 * len(data))
    trained_on = {i for i, grad in data.reads if grad}
    measured = {i for i, grad in data.reads if not grad}
    assert trained_on and not trained_on & set(held.nonzero().flatten().tolist())
    assert set(held.nonzero().flatten().tolist()) <= measured
    assert result.stop_reason == "forgotten"
    with torch.no_grad():  # the held-out samples too
        assert (model(x[forget]).softmax(1)[:, 1] < 0.1).all()


def test_held_out_loader_keeps_the_loader_s_settings_and_refuses_what_it_cannot_cut():
    from torch.utils.data import IterableDataset, RandomSampler
    from unsc_fast.unlearning.data import held_out_loader
    data = TensorDataset(torch.arange(23.0).unsqueeze(1), torch.zeros(23, dtype=torch.long))
    collate = lambda batch: torch.utils.data.default_collate(batch)  # noqa: E731
    trained, held, mask = held_out_loader(DataLoader(data, batch_size=4, shuffle=True, drop_last=True,
                                                     collate_fn=collate), 0.2, seed=3)
    assert int(mask.sum()) == 5 and trained.batch_size == held.batch_size == 4
    assert isinstance(trained.sampler, RandomSampler) and trained.drop_last and not held.drop_last
    assert trained.collate_fn is collate
    seen_held = torch.cat([batch[0] for batch in held]).flatten().long().sort().values
    assert seen_held.tolist() == mask.nonzero().flatten().tolist()  # every held-out sample, nothing else
    seen_trained = torch.cat([batch[0] for batch in trained]).flatten().long()
    assert len(seen_trained) == 16 and not mask[seen_trained].any()  # 18 trained, drop_last: 4 batches
    again = held_out_loader(DataLoader(data, batch_size=4), 0.2, seed=3)
    assert torch.equal(again[2], mask) and not isinstance(again[0].sampler, RandomSampler)  # seeded, order kept

    class Stream(IterableDataset):
        def __iter__(self):
            yield from zip(torch.zeros(4, 1), torch.zeros(4, dtype=torch.long))

    assert held_out_loader(DataLoader(Stream(), batch_size=2), 0.2, seed=0) is None
    assert held_out_loader(DataLoader(data, batch_size=4, sampler=RandomSampler(data, replacement=True)), 0.2,
                           seed=0) is None
    assert held_out_loader(DataLoader(data, batch_size=4, sampler=RandomSampler(data, num_samples=5)), 0.2,
                           seed=0) is None  # draws a subset each pass: a cut would change what it reads
    assert held_out_loader(DataLoader(data, batch_size=4, sampler=RandomSampler(data, num_samples=len(data))), 0.2,
                           seed=0) is not None
    assert held_out_loader(DataLoader(data, batch_sampler=[[0, 1], [2]]), 0.2, seed=0) is None
    assert held_out_loader([(torch.zeros(2, 1), torch.zeros(2))], 0.2, seed=0) is None
    assert held_out_loader(DataLoader(data, batch_size=4), 0.0, seed=0) is None
    assert held_out_loader(DataLoader(TensorDataset(torch.zeros(1, 1)), batch_size=4), 0.2, seed=0) is None


def test_held_out_loader_draws_per_class_where_the_dataset_states_its_labels():
    """As for tensors: each class of a two-class request loses its own fifth (30 -> 6, 5 -> 1),
    so the small class is measured on unseen samples too; a dataset that would have to be read
    for its labels gets the draw over the whole request."""
    from unsc_fast.unlearning.data import held_out, held_out_loader
    y = torch.cat([torch.zeros(30, dtype=torch.long), torch.ones(5, dtype=torch.long)])[torch.randperm(35)]
    x = torch.arange(35.0).unsqueeze(1)
    _, _, mask = held_out_loader(DataLoader(TensorDataset(x, y), batch_size=4, shuffle=True), 0.2, seed=1)
    assert (int(mask[y == 0].sum()), int(mask[y == 1].sum())) == (6, 1)
    assert torch.equal(mask, held_out(y, 0.2, torch.Generator().manual_seed(1)))  # the tensor path's draw

    class Targets(torch.utils.data.Dataset):  # torchvision's convention: labels as a list attribute
        targets = y.tolist()

        def __len__(self):
            return 35

        def __getitem__(self, i):
            return x[i], self.targets[i]

    _, _, by_attribute = held_out_loader(DataLoader(Targets(), batch_size=4), 0.2, seed=1)
    assert torch.equal(by_attribute, mask)

    class Unlabelled(Targets):
        targets = None

    _, _, over_request = held_out_loader(DataLoader(Unlabelled(), batch_size=4), 0.2, seed=1)
    assert int(over_request.sum()) == 7


def test_an_empty_forget_loader_is_a_clear_error():
    model, x, y = separable_mlp()
    forget = y == 1
    with pytest.raises(ValueError, match="the forget set is empty"):
        unlearn(model, DataLoader(TensorDataset(x[:0], y[:0]), batch_size=8),
                DataLoader(TensorDataset(x[~forget], y[~forget]), batch_size=16), forget_classes=[1])


def test_the_guard_of_batches_is_their_first_ones_read_without_touching_the_global_rng():
    from unsc_fast.unlearning.data import batches_guard, guard_size

    x, y = torch.randn(80, 3), torch.arange(80)
    loader = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True)  # draws its seed from the global RNG
    state = torch.random.get_rng_state()
    guard = batches_guard(loader, 0.25)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert len(guard) == 2 and guard_size(guard) == 16  # a quarter of 10 batches, rounded
    assert len(batches_guard(loader, 1.0, limit=20)) == 3  # stops once about `limit` samples are in
    listed = [(x[:8], y[:8]), (x[8:16], y[8:16])]
    assert batches_guard(listed, 0.5) == listed[:1]
    assert batches_guard(iter(listed), 0.5) is None  # a generator would be used up
    assert batches_guard(loader, 0.0) is None
    assert guard_size([{"input_ids": torch.zeros(5, 7, dtype=torch.long)}]) == 5
    assert guard_size([{"pixel_values": torch.zeros(3, 3, 8, 8), "labels": torch.zeros(3)}]) == 3
    assert guard_size([({"x": [1, 2]}, torch.zeros(6))]) == 6  # inputs without a tensor: counted by their targets
    assert guard_size([torch.zeros(4, 2), torch.zeros(())]) == 5  # a bare batch; a 0-d one counts 1


def test_a_language_model_s_loader_guard_comes_from_remain_else_retain():
    from unsc_fast.unlearning import language_request
    from unsc_fast.unlearning.stopping import StopRule

    tokens = torch.randint(0, 48, (40, 8))
    remain, retain = token_loader(tokens[:20]), token_loader(tokens[20:])
    _, guard, observed = language_request.split_data(tokens[:4], remain, None, StopRule(guard=0.1), 0)
    assert observed is remain and len(guard) == 1 and torch.equal(guard[0][0], tokens[:4])
    _, guard, _ = language_request.split_data(tokens[:4], None, None, StopRule(guard=0.1), 0, retain)
    assert torch.equal(guard[0][0], tokens[20:24])


# ---------------------------------------------------------------------------- Hugging Face classifiers
def _tiny_bert(classes: int = 3):
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, num_labels=classes, max_position_embeddings=16)
    return transformers.BertForSequenceClassification(config)


class _Sentences(torch.utils.data.Dataset):
    """Token sequences whose class is their first token, right-padded to different lengths."""

    def __init__(self, count: int = 120, classes: int = 3, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.labels = torch.arange(count) % classes
        self.ids = torch.randint(3 + classes, 40, (count, 10), generator=generator)
        self.ids[:, 0] = 3 + self.labels
        lengths = torch.randint(4, 11, (count,), generator=generator)
        self.mask = (torch.arange(10)[None, :] < lengths[:, None]).long()
        self.ids = self.ids * self.mask  # padding id 0

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.labels[i]}


def test_calibration_of_dict_batches_asks_the_model_with_every_key_of_the_batch():
    """A Hugging Face batch's attention mask reaches the calibrating model (it was called with
    input_ids alone, and its output object was taken for logits)."""
    model = _tiny_bert()
    data = _Sentences()
    batch = next(iter(DataLoader(data, batch_size=16)))
    for rule, soft in (("calibrate", False), ("soft", True)):
        relabel = unlearn_targets.relabel_rule(model, rule, [2], None, torch.Generator())
        (new,) = [b["labels"] for b in unlearn_targets.Relabelled([batch], relabel)]
        with torch.no_grad():
            logits = model.eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        assert torch.equal(new, unlearn_targets.calibrated(logits, batch["labels"], [2], soft))
        without_mask = unlearn_targets.calibrated(model(input_ids=batch["input_ids"]).logits, batch["labels"], [2], True)
        assert not torch.allclose(unlearn_targets.calibrated(logits, batch["labels"], [2], True), without_mask)


def test_a_hugging_face_classifier_unlearns_from_tensors_and_from_dict_loaders():
    from unsc_fast.unlearning.data import correct_predictions

    data = _Sentences()
    trained = _tiny_bert()
    optimizer = torch.optim.AdamW(trained.parameters(), lr=3e-3)
    for _ in range(10):
        for batch in DataLoader(data, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0)):
            optimizer.zero_grad()
            trained(**batch).loss.backward()
            optimizer.step()
    forget, remain = (data.labels == 2).nonzero().flatten(), (data.labels != 2).nonzero().flatten()
    loaders = (DataLoader(torch.utils.data.Subset(data, forget), batch_size=8, shuffle=True),
               DataLoader(torch.utils.data.Subset(data, remain), batch_size=16))
    assert correct_predictions(trained, loaders[0]).float().mean() == 1.0
    model = copy.deepcopy(trained)
    result = unlearn(model, *loaders, forget_classes=[2], progress_bar=False)
    assert result.stop_reason == "forgotten" and not correct_predictions(model, loaders[0]).any()
    assert correct_predictions(model, loaders[1]).float().mean() >= 0.95
    tensors = unlearn(copy.deepcopy(trained), (data.ids[forget], data.labels[forget]),
                      (data.ids[remain], data.labels[remain]), forget_classes=[2], progress_bar=False)
    assert tensors.labels.shape == (len(forget), 3) and (tensors.labels[:, 2] == 0).all()  # soft calibration


def test_the_causal_lm_example_runs_and_its_ascent_raises_the_forget_loss(load_example):
    """examples/unlearn_causal_lm.py as a user runs it (its figures are quoted in its docstring)."""
    import warnings

    example = load_example("unlearn_causal_lm")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = example.main(progress_bar=False)
    before, after = result["before"], result["after"]
    assert after["forget"] > 10 * before["forget"]  # 0.05 -> 4.0
    assert after["remain"] < after["forget"] / 4  # 0.20 -> 0.63: raised too, far less


def test_a_loader_request_erases_features_and_distils_like_a_tensor_one():
    """The default's feature erasure and retain distillation run on loaders too: the objective
    says so, the erasure is measured at every check and goes down, and the retain batches are read
    from the remaining loader with the original model's logits as targets."""
    model, x, y = separable_mlp()
    forget = y == 1
    original = copy.deepcopy(model)
    read = []

    class Counting(DataLoader):  # counts the passes over the remaining loader
        def __iter__(self):
            read.append(1)
            return super().__iter__()

    remain = Counting(TensorDataset(x[~forget], y[~forget]), batch_size=16, shuffle=True,
                      generator=torch.Generator().manual_seed(0))
    result = unlearn(model, DataLoader(TensorDataset(x[forget], y[forget]), batch_size=8, shuffle=True), remain,
                     forget_classes=[1], stop=StopRule(max_erasure_checks=3))
    assert result.objective == "FeatureErasure(RetainDistillation(CrossEntropy(), weight=1), weight=1)"
    shares = [check["features"] for check in result.trajectory]
    assert all(share is not None for share in shares) and shares[-1] < 0.5 * shares[0]
    # one retain batch per step, the loader read again each pass (not one pass cached and cycled: 4 reads)
    assert len(read) >= result.steps // len(remain)
    with torch.no_grad():
        assert not model(x[forget]).argmax(1).eq(1).any()
        kept = (model(x[~forget]).argmax(1) == original(x[~forget]).argmax(1)).float().mean()
    assert kept > 0.97


def test_retain_distillation_on_a_loader_targets_the_original_logits(monkeypatch):
    model, x, y = separable_mlp()
    forget = y == 1
    original = copy.deepcopy(model)
    seen = []
    real = RetainDistillation.__call__

    def spy(self, step):
        outputs, targets = step.retain()
        seen.append((outputs.detach(), targets))
        return real(self, step)

    monkeypatch.setattr(RetainDistillation, "__call__", spy)
    remain = DataLoader(TensorDataset(x[~forget], y[~forget]), batch_size=16)
    unlearn(model, DataLoader(TensorDataset(x[forget], y[forget]), batch_size=8), remain, forget_classes=[1],
            epochs=2)
    assert seen
    logits = original(x[~forget]).detach()
    for _, targets in seen:  # every target is a row block of the original's logits on remaining inputs
        assert targets.shape[1] == 4
        assert any(torch.allclose(targets, logits[start:start + len(targets)], atol=1e-5)
                   for start in range(0, len(logits), 16))
