"""What NullSpaceProjector protects on full-size architectures (random init, no download).

    python benchmarks/coverage_table.py

Prints one markdown row per model: tracked layers (only layers with a trainable weight are
tracked), frozen layers left untracked, the share of trainable weight elements (parameters
with two or more dimensions) that are protected, and the parameters no adapter can protect
(additive ones, whose "input" is a constant: no null space, frozen as a bias is), each named.
Any other unprotected weight is an error. Construction only (no data is observed): it
measures coverage, not speed.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from unsc_fast import NullSpaceProjector


# Parameters added to activations: their input is the constant 1 (the class token) or a
# position one-hot that every sample uses (ViT's learned positions), so their null space is
# empty whatever the data; UNSC freezes them, as it does biases (untracked="freeze").
ADDITIVE = {"embeddings.cls_token", "embeddings.position_embeddings"}


def transformers_models():
    import transformers as t

    yield "GPT-2 124M (transformers)", t.GPT2LMHeadModel(t.GPT2Config())
    yield "BERT-base (transformers)", t.BertModel(t.BertConfig())
    yield "ViT-B/16 (transformers)", t.ViTModel(t.ViTConfig(), add_pooling_layer=False)
    yield "Llama-style decoder, 12 x 768 (transformers)", t.LlamaForCausalLM(
        t.LlamaConfig(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                      num_key_value_heads=4, vocab_size=32000))


def peft_models():
    import peft
    import transformers as t

    lora = peft.LoraConfig(r=8, target_modules=["c_attn", "c_proj", "c_fc"])  # PEFT's default init: B = 0
    yield "GPT-2 124M + PEFT LoRA r=8 (attention and MLP)", peft.get_peft_model(t.GPT2LMHeadModel(t.GPT2Config()), lora)
    classifier = t.GPT2ForSequenceClassification(t.GPT2Config(num_labels=4, pad_token_id=0))
    yield "GPT-2 124M + PEFT LoRA, SEQ_CLS (modules_to_save head)", peft.get_peft_model(
        classifier, peft.LoraConfig(task_type="SEQ_CLS", r=8, target_modules=["c_attn"]))


def torch_models():
    from unsc_fast.evaluation.models import create_model

    yield "ViT-B/16 encoder on nn.MultiheadAttention (torchvision layout)", nn.TransformerEncoder(
        nn.TransformerEncoderLayer(768, 12, 3072, batch_first=True), 12, enable_nested_tensor=False)
    yield "ResNet-18, CIFAR (paper)", create_model("resnet18", 100, (3, 32, 32))
    yield "VGG-11-BN, SVHN (paper)", create_model("vgg11", 10, (3, 32, 32))
    yield "MNIST-1D CNN (Conv1d)", create_model("mnist1d_cnn", 10, (1, 40))
    yield "MobileNetV2-style (depthwise + pointwise, 17 blocks)", mobilenet_like()
    yield "GRU, 2 layers, bidirectional (128 -> 256)", nn.GRU(128, 256, num_layers=2, batch_first=True,
                                                                bidirectional=True)
    yield "LSTM, 2 layers, bidirectional, proj_size 64", nn.LSTM(128, 256, num_layers=2, batch_first=True,
                                                                 bidirectional=True, proj_size=64)


def mobilenet_like() -> nn.Sequential:
    def block(c_in, c_out, expand, stride):
        wide = c_in * expand
        return nn.Sequential(
            nn.Conv2d(c_in, wide, 1, bias=False), nn.BatchNorm2d(wide), nn.ReLU6(),
            nn.Conv2d(wide, wide, 3, stride, 1, groups=wide, bias=False), nn.BatchNorm2d(wide), nn.ReLU6(),
            nn.Conv2d(wide, c_out, 1, bias=False), nn.BatchNorm2d(c_out))

    layers, c = [nn.Conv2d(3, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU6()], 32
    for expand, c_out, repeats, stride in [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                                           (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]:
        for index in range(repeats):
            layers.append(block(c, c_out, expand, stride if index == 0 else 1))
            c = c_out
    layers += [nn.Conv2d(c, 1280, 1, bias=False), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(1280, 1000)]
    return nn.Sequential(*layers)


def row(name: str, model: nn.Module) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        projector = NullSpaceProjector(model)
    report = projector.coverage()
    missing = [r.name for r in report.unprotected_weights]
    unexpected = [n for n in missing if n not in ADDITIVE]
    if unexpected:
        raise SystemExit(f"{name}: trainable weights without protection: {unexpected}")
    trainable = [r for r in report.rows if r.status != "frozen" and len(r.shape) >= 2]
    protectable = sum(r.numel for r in trainable if r.name not in ADDITIVE)
    protected = sum(r.numel for r in trainable if r.status == "protected")
    additive = ", ".join(missing) or "none"
    return (f"| {name} | {len(projector.layers)} | {len(report.frozen_layers)} | {100 * protected / protectable:.2f} % "
            f"| {100 * report.share('protected'):.2f} % | {additive} |")


def main() -> None:
    torch.manual_seed(0)
    print("| model | tracked layers | frozen layers (untracked) | protectable weight elements protected "
          "| all trainable weight elements protected | additive parameters (no adapter can protect) |")
    print("|---|---|---|---|---|---|")
    for source in (transformers_models, peft_models, torch_models):
        for name, model in source():
            print(row(name, model), flush=True)
            del model


if __name__ == "__main__":
    main()
