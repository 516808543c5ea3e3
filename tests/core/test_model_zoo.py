"""The null-space guarantee on the architectures people use (random init, no downloads).

For each model: the projector constructs, covers the trainable weights (``coverage()``),
and after a few ``NullSpaceOptimizer(AdamW)`` steps on other data every protected weight's
change lies in the null space of the remaining inputs (``||dW U|| / ||dW||`` at rounding
level, per use), while the model's outputs on the remaining data move far less than with
plain AdamW. The blocks of MobileNet/ConvNeXt/ViT are defined here (torchvision and timm do
not import beside the CPU torch); transformers' models are built from config objects.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from unsc_fast import NullSpaceOptimizer, NullSpaceProjector

# Models and statistics in float64: a projected change keeps ~1e-15 of its norm in the basis.
# (In fp32 the stored weight W0 + dW is itself rounded at eps * |W0|, which exceeds eps * |dW|
# when a step is small; the guarantee is about the projection, so it is checked in float64.)
# A layer whose every group keeps its whole input space (k = d) has nothing left to move: its
# projected change is rounding noise of W0 + dW, a few ulps of W0 with no direction, so the
# leak is also allowed eps * |W0| besides ROUNDING * |dW|.
ROUNDING = 1e-9
EPS = torch.finfo(torch.float64).eps


def as_double(batch):
    if isinstance(batch, tuple):
        return tuple(as_double(b) for b in batch)
    return batch.double() if batch.is_floating_point() else batch


def check_guarantee(model, remaining, other, *, forward=None, loss=None, steps=3, lr=1e-2, threshold=1.0,
                    coverage=0.99):
    """Observe ``remaining``, step on ``other``, check the guarantee and the output movement."""
    forward = forward or (lambda m, batch: m(batch))
    loss = loss or (lambda output: output.square().mean())
    model.double().eval()  # no dropout: outputs compare exactly
    remaining, other = as_double(remaining), as_double(other)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        projector = NullSpaceProjector(model, threshold=threshold, dtype=torch.float64)
    report = projector.coverage()
    assert report.share("protected") >= coverage, str(report)
    with torch.no_grad(), projector.observe():
        before = forward(model, remaining)
    projector.build()
    plain = copy.deepcopy(model)
    start = {p: p.detach().clone() for p in model.parameters()}
    optimizer = NullSpaceOptimizer(torch.optim.AdamW(model.parameters(), lr=lr), projector)
    reference = torch.optim.AdamW(plain.parameters(), lr=lr)
    for _ in range(steps):
        for m, opt in ((model, optimizer), (plain, reference)):
            opt.zero_grad()
            loss(forward(m, other)).backward()
            opt.step()
    moved = 0
    for param, uses in projector.protection.uses.items():
        change = param.detach() - start[param]
        size, noise = float(change.norm()), EPS * float(start[param].norm())
        moved += size > noise
        leak = projector.residual(param, change)
        assert leak * size < ROUNDING * size + noise, f"{uses[0].name}: ||dW U|| / ||dW|| = {leak:.2e}, ||dW|| = {size:.2e}"
    assert moved > 0, "no protected weight moved: the test would pass vacuously"
    with torch.no_grad():
        ours = (forward(model, remaining) - before).norm()
        theirs = (forward(plain, remaining) - before).norm()
    assert ours < 1e-6 * theirs, f"outputs on remaining data moved {ours:.3e} vs {theirs:.3e} with plain AdamW"
    return projector


def logits(model, batch):
    return model(batch).logits


def last_hidden(model, batch):
    return model(batch).last_hidden_state


# --------------------------------------------------------------------- transformers
transformers = pytest.importorskip("transformers")


def tokens(seed: int, vocab: int, low: int = 0, batch: int = 2, length: int = 6):
    return torch.randint(low, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_gpt2_conv1d_and_tied_head():
    """GPT-2: attention and MLP weights are transformers' Conv1D ((in, out) storage); lm_head is
    tied to wte, so that weight gets a two-sided projection (rows of seen tokens frozen, the
    head's hidden-state basis removed)."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16,
                                     bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config)
    assert model.lm_head.weight is model.transformer.wte.weight
    projector = check_guarantee(model, tokens(0, 32), tokens(1, 64, low=32), forward=logits)
    kinds = {type(layer).__name__ for layer in projector.layers.values()}
    assert {"TransformersConv1DAdapter", "EmbeddingAdapter", "LinearAdapter"} <= kinds
    sides = {use.side for use in projector.protection.uses[model.lm_head.weight]}
    assert sides == {"in", "out"}


def test_bert():
    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                     vocab_size=64, max_position_embeddings=16)
    check_guarantee(transformers.BertModel(config), tokens(0, 32), tokens(1, 64, low=32), forward=last_hidden)


def test_llama_decoder():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=64, max_position_embeddings=16)
    check_guarantee(transformers.LlamaForCausalLM(config), tokens(0, 32), tokens(1, 64, low=32), forward=logits)


def test_vit_reports_its_raw_embeddings():
    """HF ViT: every Linear and the patch Conv2d are protected; the class token and position
    embeddings are raw parameters added to activations (their 'input' is a constant, as a
    bias's), which no adapter covers: coverage names them and strict=True refuses them."""
    torch.manual_seed(0)
    config = transformers.ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=2, intermediate_size=64)
    model = transformers.ViTModel(config, add_pooling_layer=False)
    remaining = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    other = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    projector = check_guarantee(model, remaining, other, forward=last_hidden, coverage=0.95)
    names = sorted(r.name for r in projector.coverage().unprotected_weights)
    assert names == ["embeddings.cls_token", "embeddings.position_embeddings"]
    with pytest.raises(ValueError, match="strict=True.*cls_token"):
        NullSpaceProjector(model, strict=True)


# --------------------------------------------------------------------- blocks defined here
class InvertedResidual(nn.Module):
    """MobileNetV2/V3-style: 1x1 expand, depthwise 3x3, squeeze-excite, 1x1 project."""

    def __init__(self, channels: int, expand: int = 4) -> None:
        super().__init__()
        wide = channels * expand
        self.expand = nn.Sequential(nn.Conv2d(channels, wide, 1, bias=False), nn.BatchNorm2d(wide), nn.Hardswish())
        self.depthwise = nn.Sequential(nn.Conv2d(wide, wide, 3, padding=1, groups=wide, bias=False),
                                       nn.BatchNorm2d(wide), nn.Hardswish())
        self.squeeze = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(wide, channels, 1), nn.ReLU(),
                                     nn.Conv2d(channels, wide, 1), nn.Hardsigmoid())
        self.project = nn.Sequential(nn.Conv2d(wide, channels, 1, bias=False), nn.BatchNorm2d(channels))

    def forward(self, x):
        hidden = self.depthwise(self.expand(x))
        return x + self.project(hidden * self.squeeze(hidden))


class ConvNeXtBlock(nn.Module):
    """Depthwise 7x7, LayerNorm, pointwise MLP as Linear layers, layer scale."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(channels, channels, 7, padding=3, groups=channels)
        self.norm = nn.LayerNorm(channels)
        self.mlp = nn.Sequential(nn.Linear(channels, 4 * channels), nn.GELU(), nn.Linear(4 * channels, channels))
        self.gamma = nn.Parameter(torch.full((channels,), 0.5))

    def forward(self, x):
        y = self.depthwise(x).permute(0, 2, 3, 1)
        return x + (self.gamma * self.mlp(self.norm(y))).permute(0, 3, 1, 2)


def images(seed, batch=2, channels=3, size=16):
    return torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(seed))


def test_mobilenet_style_depthwise_and_squeeze_excite():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.Hardswish(),
                          InvertedResidual(8), InvertedResidual(8), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 5))
    projector = check_guarantee(model, images(0, batch=1), images(1))
    assert projector.protection.slot("3.depthwise.0").kind == "grouped"


def test_convnext_style_block():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 4, stride=4), ConvNeXtBlock(8), ConvNeXtBlock(8))
    check_guarantee(model, images(0, batch=1), images(1), coverage=0.98)  # layer scale gamma is 1-D


def test_one_dimensional_cnn():
    """MNIST-1D-style: Conv1d with stride, padding and dilation, then a Linear head."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(1, 8, 5, stride=2, padding=1), nn.ReLU(), nn.Conv1d(8, 8, 3, dilation=2),
                          nn.ReLU(), nn.Conv1d(8, 8, 3, groups=4, padding=1, padding_mode="circular"), nn.ReLU(),
                          nn.Flatten(), nn.LazyLinear(10))
    x = torch.randn(3, 1, 40)
    model(x)
    remaining = torch.randn(1, 1, 40, generator=torch.Generator().manual_seed(0))
    check_guarantee(model, remaining, torch.randn(4, 1, 40, generator=torch.Generator().manual_seed(1)))


def test_three_dimensional_conv():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv3d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, 4, (1, 3, 3), stride=(1, 2, 2),
                          groups=2, padding=(0, 1, 1)), nn.ReLU(), nn.Flatten(), nn.LazyLinear(3))
    model(torch.randn(1, 2, 3, 6, 6))
    g = torch.Generator().manual_seed(0)
    check_guarantee(model, torch.randn(1, 2, 3, 6, 6, generator=g), torch.randn(2, 2, 3, 6, 6, generator=g))


class LoRALinear(nn.Module):
    """A faithful hand-written LoRA layer (PEFT's structure): frozen base, ``lora_A`` (in -> r)
    and ``lora_B`` (r -> out, zero-initialised), output ``base(x) + scale * B(A(x))``."""

    def __init__(self, base: nn.Linear, rank: int = 4, alpha: float = 8.0) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        self.lora_A = nn.Linear(base.in_features, rank, bias=False)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False)
        nn.init.normal_(self.lora_B.weight, std=0.02)  # non-zero, so lora_A's gradient is not zero either
        self.scale = alpha / rank

    def forward(self, x):
        return self.base(x) + self.scale * self.lora_B(self.lora_A(x))


def test_lora_adapted_model():
    """lora_A is projected against the layer input, lora_B against lora_A's output: the
    adapted layer's output on remaining data does not move (B' A' x = B A x when A' x = A x
    and B' (A x) = B (A x)). The frozen base weights are reported as frozen."""
    torch.manual_seed(0)
    model = nn.Sequential(LoRALinear(nn.Linear(16, 16)), nn.Tanh(), LoRALinear(nn.Linear(16, 4)))
    g = torch.Generator().manual_seed(0)
    projector = check_guarantee(model, torch.randn(3, 16, generator=g), torch.randn(8, 16, generator=g))
    frozen = {r.name for r in projector.coverage().rows if r.status == "frozen"}
    assert {"0.base.weight", "2.base.weight"} <= frozen


class AttentionEncoder(nn.Module):
    """torchvision-ViT-style block on nn.MultiheadAttention (packed in_proj, batch_first),
    then a cross-attention with separate k/v widths (kdim, vdim != embed_dim)."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.self_attention = nn.MultiheadAttention(width, 2, batch_first=True)
        self.cross = nn.MultiheadAttention(width, 2, kdim=6, vdim=5, batch_first=True)
        self.memory_k = nn.Linear(3, 6)
        self.memory_v = nn.Linear(3, 5)
        self.head = nn.Linear(width, 4)

    def forward(self, batch):
        x, memory = batch
        x = x + self.self_attention(x, x, x, need_weights=False)[0]
        x = x + self.cross(x, self.memory_k(memory), self.memory_v(memory))[0]
        return self.head(x)


def test_multihead_attention_self_and_cross():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    remaining = (torch.randn(1, 3, 16, generator=g), torch.randn(1, 2, 3, generator=g))
    other = (torch.randn(2, 5, 16, generator=g), torch.randn(2, 4, 3, generator=g))
    projector = check_guarantee(AttentionEncoder(), remaining, other, coverage=1.0)
    assert projector.protection.slot("self_attention#in_proj").kind == "grouped"
    assert {"cross#q", "cross#k", "cross#v", "cross#out_proj"} <= set(projector.protection.slots)


def test_recurrent_weights():
    """GRU: every weight is protected (input and recurrent, both directions; the recurrent
    weights' rows are recomputed by the adapter, see tests/core/test_recurrent.py), and the
    two directions' input weights share the layer input's slot."""
    torch.manual_seed(0)

    class Recurrent(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.GRU(6, 4, batch_first=True, bidirectional=True)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            return self.head(self.rnn(x)[0])

    model = Recurrent()
    g = torch.Generator().manual_seed(0)
    proj = check_guarantee(model, torch.randn(1, 2, 6, generator=g), torch.randn(3, 5, 6, generator=g), coverage=1.0)
    assert len(proj.protection.uses[model.rnn.weight_ih_l0]) == 1
    assert proj.protection.uses[model.rnn.weight_ih_l0][0].slot == proj.protection.uses[
        model.rnn.weight_ih_l0_reverse][0].slot
    assert model.rnn.weight_hh_l0_reverse in proj.protection.uses


def test_tied_linear_layers_share_one_slot():
    """``b.weight = a.weight``: both layers' inputs add up in one covariance, and the shared
    weight's change is orthogonal to both (issue: the optimizer used to protect one of them)."""
    torch.manual_seed(0)
    a, b = nn.Linear(8, 8, bias=False), nn.Linear(8, 8, bias=False)
    b.weight = a.weight
    model = nn.Sequential(a, nn.Tanh(), b)
    g = torch.Generator().manual_seed(0)
    remaining = torch.randn(2, 8, generator=g)
    hidden = torch.tanh(remaining @ a.weight.detach().T)  # b's remaining inputs, before any step
    projector = check_guarantee(model, remaining, torch.randn(6, 8, generator=g))
    assert list(projector.protection.slots) == ["0"] and projector.protection.alias == {"2": "0"}
    expected = remaining.T @ remaining + hidden.T @ hidden  # the one slot holds both layers' inputs
    torch.testing.assert_close(projector.covariance("0"), expected.double())


def test_timm_style_padding_inside_forward_is_refused():
    """A Conv2d subclass that pads in forward() (timm's Conv2dSame) is not tracked wrong."""

    class Conv2dSame(nn.Conv2d):
        def forward(self, x):
            return F.conv2d(F.pad(x, (0, 1, 0, 1)), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)

    model = nn.Sequential(Conv2dSame(3, 4, 2, stride=2), nn.Flatten(), nn.LazyLinear(2))
    model(torch.randn(1, 3, 8, 8))
    with pytest.raises(NotImplementedError, match=r"layer '0' is a Conv2dSame.*forward\(\) is overridden"):
        NullSpaceProjector(model)


def test_custom_layer_through_the_registry():
    """A user's layer type gets protection by registering an adapter (README 'Models')."""
    from unsc_fast.adapters import LinearAdapter, register_adapter

    class Scaled(nn.Module):  # y = 2 * x W^T: the rows are x, as for a Linear
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(3, 5))
            self.in_features = 5

        def forward(self, x):
            return 2 * x @ self.weight.T

    with pytest.warns(UserWarning, match=r"0\.weight \(3, 5\)"):
        NullSpaceProjector(nn.Sequential(Scaled(), nn.Linear(3, 2)))
    register_adapter(Scaled, LinearAdapter)
    g = torch.Generator().manual_seed(0)
    check_guarantee(nn.Sequential(Scaled(), nn.Linear(3, 2)), torch.randn(2, 5, generator=g),
                    torch.randn(4, 5, generator=g))


# --------------------------------------------------------------------- unlearn() on transformers classifiers
def _hf_classifiers():
    T = transformers
    images, ids = torch.randn(36, 3, 32, 32), torch.randint(5, 50, (36, 12))
    return {
        "vit": (lambda: T.ViTForImageClassification(T.ViTConfig(
            image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
            intermediate_size=64, num_labels=3)), images),
        "swin": (lambda: T.SwinForImageClassification(T.SwinConfig(
            image_size=32, patch_size=4, embed_dim=8, depths=[1, 1], num_heads=[1, 2], window_size=4, num_labels=3)),
            images),
        "convnext": (lambda: T.ConvNextForImageClassification(T.ConvNextConfig(
            hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, num_labels=3)), images),
        "resnet": (lambda: T.ResNetForImageClassification(T.ResNetConfig(
            embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3)), images),
        "distilbert": (lambda: T.DistilBertForSequenceClassification(T.DistilBertConfig(
            vocab_size=50, dim=32, n_layers=1, n_heads=2, hidden_dim=64, num_labels=3, max_position_embeddings=16)),
            ids),
        "roberta": (lambda: T.RobertaForSequenceClassification(T.RobertaConfig(
            vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
            num_labels=3, max_position_embeddings=20)), ids),
        "gpt2": (lambda: T.GPT2ForSequenceClassification(T.GPT2Config(
            vocab_size=50, n_embd=32, n_layer=1, n_head=2, n_positions=16, num_labels=3, pad_token_id=0)), ids),
    }


@pytest.mark.parametrize("name", ["vit", "swin", "convnext", "resnet", "distilbert", "roberta", "gpt2"])
def test_unlearn_default_runs_on_transformers_classifiers(name):
    """The default unlearn() (per-label protection, soft calibration, stop rule, feature erasure)
    on each classifier's output object: it failed on all of them (outputs with .logits), on
    ConvNeXt's depthwise convs and on Swin's windows."""
    from unsc_fast.unlearn import unlearn

    torch.manual_seed(0)
    make, x = _hf_classifiers()[name]
    model = make()
    y = torch.arange(len(x)) % 3
    forget = y == 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # untracked parameters (class tokens), Swin's windows
        result = unlearn(model, (x[forget], y[forget]), (x[~forget], y[~forget]), forget_classes=[2], epochs=2,
                         progress_bar=False)
    assert result.steps > 0 and result.trajectory and result.stop_reason in ("forgotten", "budget", "guard")
    assert result.labels.shape == (int(forget.sum()), 3) and (result.labels[:, 2] == 0).all()
