"""Real PEFT LoRA models (GPT-2, Llama, BERT from configs, random init, no download).

The guarantee is checked on the effective weight ``W0 + s B A`` of every LoRA layer: after
``NullSpaceOptimizer(AdamW)`` steps on other data, ``||dW_eff U|| / ||dW_eff||`` is at rounding
level (U: the basis of the layer's remaining inputs) and the layer's real output on its
remaining inputs does not move, from PEFT's default initialisation (B = 0, where the zero-start
rule of ``unsc_fast.solve.lora`` applies) and from a trained adapter (B != 0, factor by factor).
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

from unsc_fast import NullSpaceOptimizer, NullSpaceProjector

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

ROUNDING = 1e-9


def gpt2():
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16)
    return transformers.GPT2LMHeadModel(config), ["c_attn", "c_proj"]


def llama():
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=64, max_position_embeddings=16)
    return transformers.LlamaForCausalLM(config), ["q_proj", "v_proj", "down_proj"]


def bert():
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                     vocab_size=64, max_position_embeddings=16)
    return transformers.BertModel(config), ["query", "value"]


def output(model, tokens):
    result = model(input_ids=tokens)
    return result.logits if hasattr(result, "logits") else result.last_hidden_state


def peft_model(build, trained: bool):
    torch.manual_seed(0)
    base, targets = build()
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.1,
                             init_lora_weights=not trained)  # False: B random, as a trained adapter
    return peft.get_peft_model(base, config).double().eval()


def lora_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}


def effective_delta(layer, start) -> torch.Tensor:
    """s (B' A' - B A), the change of the effective (out, in) weight."""
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    return layer.scaling["default"] * (B.detach() @ A.detach() - start[B] @ start[A])


def layer_inputs(model, tokens) -> dict:
    """Each LoRA layer's input and output on ``tokens``."""
    seen, handles = {}, []
    for name, layer in lora_layers(model).items():
        handles.append(layer.register_forward_hook(
            lambda m, args, out, name=name: seen.__setitem__(name, (args[0].detach(), out.detach()))))
    with torch.no_grad():
        output(model, tokens)
    for handle in handles:
        handle.remove()
    return seen


@pytest.mark.parametrize("trained", [False, True], ids=["B=0", "trained"])
@pytest.mark.parametrize("build", [gpt2, llama, bert], ids=["gpt2", "llama", "bert"])
def test_effective_weight_keeps_the_guarantee(build, trained):
    model = peft_model(build, trained)
    g = torch.Generator().manual_seed(1)
    remaining, other = torch.randint(0, 32, (1, 6), generator=g), torch.randint(32, 64, (3, 6), generator=g)
    projector = NullSpaceProjector(model, threshold=1.0, dtype=torch.float64)
    assert all(".lora_A." in n or ".lora_B." in n for n in projector.layers), list(projector.layers)
    with torch.no_grad(), projector.observe():
        before = output(model, remaining)
    inputs = layer_inputs(model, remaining)
    plain = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every LoRA layer can move: no warning
        projector.build()
    start = {p: p.detach().clone() for p in model.parameters()}
    layers = lora_layers(model)
    for layer in layers.values():
        if not trained:  # the zero start changed A, not the model: A's rows in the null space
            A = layer.lora_A["default"].weight
            assert float((A.detach() @ projector.basis(_name(model, layer.lora_A["default"]))).norm()) < 1e-12
    optimizer = NullSpaceOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), projector)
    reference = torch.optim.AdamW(plain.parameters(), lr=1e-2)
    for _ in range(3):
        for m, opt in ((model, optimizer), (plain, reference)):
            opt.zero_grad()
            output(m, other)[..., ::2].square().mean().backward()  # not a LayerNorm constant
            opt.step()
    moved = 0
    for name, layer in layers.items():
        delta = effective_delta(layer, start)
        basis = projector.basis(_name(model, layer.lora_A["default"])).double()
        size = float(delta.norm())
        moved += size > 1e-8
        assert float((delta @ basis).norm()) <= ROUNDING * size + 1e-15, name
        x, y = inputs[name]
        with torch.no_grad():
            change = float((layer(x) - y).norm())
        assert change <= 1e-9 * float(y.norm()), f"{name}: output on remaining inputs moved {change:.2e}"
    assert moved == len(layers), "every LoRA layer's effective weight must move"
    with torch.no_grad():
        ours, theirs = (output(model, remaining) - before).norm(), (output(plain, remaining) - before).norm()
    assert ours < 1e-6 * theirs, (float(ours), float(theirs))


def _name(model, module) -> str:
    return next(n for n, m in model.named_modules() if m is module)


def test_zero_start_restates_lora_b_statistics():
    """After A moves into the null space, lora_B's stored statistics are what it now sees: a
    new observation of the same data gives the same covariance."""
    model = peft_model(gpt2, trained=False)
    tokens = torch.randint(0, 32, (2, 6), generator=torch.Generator().manual_seed(2))
    projector = NullSpaceProjector(model, threshold=0.9, dtype=torch.float64)
    with torch.no_grad(), projector.observe(labels=torch.tensor([0, 1])):
        output(model, tokens)
    projector.build(exclude=(1,))
    fresh = NullSpaceProjector(model, threshold=0.9, dtype=torch.float64)
    with torch.no_grad(), fresh.observe(labels=torch.tensor([0, 1])):
        output(model, tokens)
    for name in projector.protection.slots:
        for key in (0, 1):
            torch.testing.assert_close(projector.store.matrix(key, name), fresh.store.matrix(key, name),
                                       rtol=1e-9, atol=1e-12)


def test_layers_that_cannot_move_are_named():
    """Remaining inputs spanning a layer's whole input space leave a zero-B adapter no room:
    c_proj (attention outputs span all 32 dimensions) is named, c_attn (its LayerNorm inputs
    have zero mean: 31 dimensions) can move and is not."""
    model = peft_model(gpt2, trained=False)
    tokens = torch.randint(0, 64, (8, 12), generator=torch.Generator().manual_seed(3))
    projector = NullSpaceProjector(model, threshold=1.0, dtype=torch.float64)
    with torch.no_grad(), projector.observe():
        output(model, tokens)
    with pytest.warns(UserWarning, match=r"LoRA layer\(s\) cannot move(.|\n)*h\.0\.attn\.c_proj \[default\]: B = 0") as caught:
        projector.build()
    message = str(caught[0].message)
    assert "h.1.attn.c_proj [default]" in message and "c_attn" not in message


def test_sequence_classification_recipe_builds():
    """PEFT's SEQ_CLS recipe: the classifier is a trainable copy beside a frozen, never-called
    original (modules_to_save); only trainable layers are tracked, so build() succeeds."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16, num_labels=3,
                                     pad_token_id=0)
    base = transformers.GPT2ForSequenceClassification(config)
    model = peft.get_peft_model(base, peft.LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["c_attn"]))
    projector = NullSpaceProjector(model)
    assert sum(".lora_" in n for n in projector.layers) == 4
    assert any("modules_to_save" in n for n in projector.layers)
    assert not any("original_module" in n for n in projector.layers)
    report = projector.coverage()
    assert report.share("protected") == 1.0 and report.frozen_layers
    with torch.no_grad(), projector.observe(labels=torch.tensor([0, 2])):
        model(input_ids=torch.randint(1, 64, (2, 5)))
    projector.build(exclude=(2,))


def test_example_unlearns_through_a_fresh_adapter(load_example):
    """examples/unlearn_peft_causal_lm.py on its tiny random-init GPT-2: the forget documents'
    loss rises through a B = 0 adapter, the remaining documents' barely moves, and merging
    the adapter gives the same losses. The zero start ran: every lora_B is free (rank 0) and
    every lora_A's rows are in the null space of its remaining inputs."""
    example = load_example("unlearn_peft_causal_lm")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = example.main(steps=3, train_epochs=5, progress_bar=False)
    before, after, merged = result["before"], result["after"], result["merged"]
    assert after["forget"] > before["forget"] + 1e-3
    assert abs(after["remain"] - before["remain"]) < 0.1 * (after["forget"] - before["forget"])
    assert merged == pytest.approx(after, rel=1e-5)
    projector = result["projector"]
    ranks = projector.ranks()
    assert {r for name, r in ranks.items() if ".lora_B." in name} == {0}
    for param, uses in projector.protection.uses.items():
        if ".lora_A." in uses[0].name:
            inside = param.detach().double() @ projector.basis(uses[0].slot).double()
            assert float(inside.norm()) < 1e-5 * float(param.norm()), uses[0].name


def test_incremental_build_starts_zero_adapters_too():
    model = peft_model(gpt2, trained=False)
    tokens = torch.randint(0, 32, (2, 6), generator=torch.Generator().manual_seed(4))
    projector = NullSpaceProjector(model, dtype=torch.float64)
    with torch.no_grad(), projector.observe(labels=torch.tensor([0, 1])):
        output(model, tokens)
    projector.build_incremental(exclude=(1,))
    assert {r for name, r in projector.ranks().items() if ".lora_B." in name} == {0}
