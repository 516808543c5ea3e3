"""What NullSpaceProjector protects on full-size architectures (random init, no download).

    python benchmarks/coverage_table.py

Prints one markdown row per model: tracked layers, the share of trainable weight elements
(parameters with two or more dimensions) that are protected, and which weights remain
unprotected. Construction only (no data is observed): it measures coverage, not speed.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from unsc_fast import NullSpaceProjector


def transformers_models():
    import transformers as t

    yield "GPT-2 124M (transformers)", t.GPT2LMHeadModel(t.GPT2Config())
    yield "BERT-base (transformers)", t.BertModel(t.BertConfig())
    yield "ViT-B/16 (transformers)", t.ViTModel(t.ViTConfig(), add_pooling_layer=False)
    yield "Llama-style decoder, 12 x 768 (transformers)", t.LlamaForCausalLM(
        t.LlamaConfig(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                      num_key_value_heads=4, vocab_size=32000))


def torch_models():
    from unsc_fast.evaluation.models import create_model

    yield "ViT-B/16 encoder on nn.MultiheadAttention (torchvision layout)", nn.TransformerEncoder(
        nn.TransformerEncoderLayer(768, 12, 3072, batch_first=True), 12, enable_nested_tensor=False)
    yield "ResNet-18, CIFAR (paper)", create_model("resnet18", 100, (3, 32, 32))
    yield "VGG-11-BN, SVHN (paper)", create_model("vgg11", 10, (3, 32, 32))
    yield "MNIST-1D CNN (Conv1d)", create_model("mnist1d_cnn", 10, (1, 40))
    yield "MobileNetV2-style (depthwise + pointwise, 17 blocks)", mobilenet_like()
    yield "GRU classifier (1 layer, bidirectional)", nn.Sequential()  # placeholder replaced below


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
    missing = report.unprotected_weights
    listed = ", ".join(r.name for r in missing[:4]) + (" ..." if len(missing) > 4 else "") or "none"
    return f"| {name} | {len(projector.layers)} | {100 * report.share('protected'):.2f} % | {listed} |"


def main() -> None:
    torch.manual_seed(0)
    print("| model | tracked layers | trainable weight elements protected | unprotected weights |")
    print("|---|---|---|---|")
    for name, model in transformers_models():
        print(row(name, model), flush=True)
        del model
    for name, model in torch_models():
        if name.startswith("GRU"):
            model = nn.GRU(128, 256, batch_first=True, bidirectional=True)
        print(row(name, model), flush=True)


if __name__ == "__main__":
    main()
