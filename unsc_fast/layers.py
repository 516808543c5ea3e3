"""Which modules the projector tracks, and how each one's inputs become covariance rows.

A tracked layer is an ``nn.Linear`` (input ``(..., d)``, one row per position) or an
``nn.Conv2d`` (one row per kernel-sized patch, in ``F.unfold`` order, which is the order of
``weight.flatten(1)``). Its weight is handled as a matrix ``(out, d)``.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from unsc_fast import ops

# Weight-carrying modules that look like candidates but are not handled: warned about,
# never skipped silently. Their parameters count as untracked.
UNSUPPORTED_WEIGHT_LAYERS = (
    nn.Embedding,
    nn.EmbeddingBag,
    nn.Conv1d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.RNNBase,
    nn.MultiheadAttention,
    nn.Bilinear,
)


@dataclass
class TrackedLayer:
    """One Linear/Conv2d layer: its name, module, and the width ``d`` of its input rows."""

    name: str
    module: nn.Module
    kind: str  # "linear" or "conv2d"
    dim: int

    @property
    def weight(self) -> nn.Parameter:
        return self.module.weight

    @property
    def out_features(self) -> int:
        return self.module.weight.shape[0]

    def describe(self) -> str:
        return f"{self.name!r} ({type(self.module).__name__}, d={self.dim})"

    def batch_size(self, x: torch.Tensor) -> int:
        """Samples in this input: dim 0 (an unbatched input is one sample)."""
        unbatched = x.dim() == (1 if self.kind == "linear" else 3)
        return 1 if unbatched else x.shape[0]

    def check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            got = type(x).__name__ if not isinstance(x, torch.Tensor) else str(x.dtype)
            raise TypeError(f"layer {self.name!r}: expected a floating-point input tensor, got {got}")
        if self.kind == "linear":
            if x.dim() == 0 or x.shape[-1] != self.dim:
                raise ValueError(
                    f"layer {self.name!r}: Linear input must end in {self.dim}, got shape {tuple(x.shape)}"
                )
        elif x.dim() not in (3, 4) or x.shape[-3] * _kernel_area(self.module) != self.dim:
            raise ValueError(
                f"layer {self.name!r}: Conv2d input must be (B, {self.module.in_channels}, H, W), "
                f"got shape {tuple(x.shape)}"
            )

    def accumulate_(self, C: torch.Tensor, x: torch.Tensor) -> None:
        """``C += rows^T rows`` for the rows this layer's weight multiplies."""
        if self.kind == "linear":
            ops.covariance_(C, x.reshape(-1, self.dim))
            return
        conv = self.module
        if x.dim() == 3:
            x = x.unsqueeze(0)
        padding = conv_zero_padding(conv)
        if padding is None:  # asymmetric or non-zero padding: pad explicitly, then no padding
            x = F.pad(x, conv_explicit_pads(conv), mode=_pad_mode(conv))
            padding = (0, 0)
        ops.conv_covariance_(C, x, conv.kernel_size, conv.stride, padding, conv.dilation)

    def matrix_view(self, tensor: torch.Tensor) -> torch.Tensor:
        """The weight-shaped ``tensor`` as the (out, d) matrix the basis acts on."""
        return tensor.reshape(tensor.shape[0], self.dim)

    @staticmethod
    def matrix_is_view(tensor: torch.Tensor) -> bool:
        """Whether ``matrix_view`` returns a view (writes reach ``tensor``) rather than a copy:
        the trailing dims merge into one when each stride is the next one's stride times its
        size (size-1 dims aside), e.g. not for a channels_last conv gradient. Read from sizes
        and strides, not data pointers, so that torch.compile can trace it."""
        inner = None
        for size, stride in zip(reversed(tensor.shape[1:]), reversed(tensor.stride()[1:])):
            if size == 1:
                continue
            if inner is not None and stride != inner:
                return False
            inner = stride * size
        return True


def _kernel_area(conv: nn.Conv2d) -> int:
    return conv.kernel_size[0] * conv.kernel_size[1]


def _pad_mode(conv: nn.Conv2d) -> str:
    return "constant" if conv.padding_mode == "zeros" else conv.padding_mode


def conv_explicit_pads(conv: nn.Conv2d) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) padding the conv applies, 'same' and 'valid' resolved."""
    if conv.padding == "valid":
        return (0, 0, 0, 0)
    if conv.padding == "same":
        pads = []
        for k, d in zip(reversed(conv.kernel_size), reversed(conv.dilation)):
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
        return tuple(pads)
    ph, pw = conv.padding
    return (pw, pw, ph, ph)


def conv_zero_padding(conv: nn.Conv2d) -> tuple[int, int] | None:
    """The symmetric zero padding ``(ph, pw)`` of the conv, or None when it needs explicit padding."""
    if conv.padding_mode != "zeros":
        return None
    left, right, top, bottom = conv_explicit_pads(conv)
    if left != right or top != bottom:
        return None
    return (top, left)


def _tracked_kind(module: nn.Module) -> str | None:
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Conv2d):
        return "conv2d"
    return None


def _check_supported(name: str, module: nn.Module) -> None:
    weight = getattr(module, "weight", None)
    if isinstance(weight, nn.parameter.UninitializedParameter):
        raise ValueError(f"layer {name!r}: lazy module is not initialised yet; run one forward pass first")
    if isinstance(module, nn.Conv2d) and module.groups != 1:
        raise NotImplementedError(
            f"layer {name!r}: Conv2d with groups={module.groups} is not supported; "
            "choose the layers to track with modules=[...] to leave it out"
        )
    if weight is None:
        raise ValueError(f"layer {name!r}: has no weight to project")
    if not weight.is_floating_point():
        raise TypeError(f"layer {name!r}: weight dtype {weight.dtype} is not a floating type")
    if weight.device.type == "meta":
        raise NotImplementedError(
            f"layer {name!r}: weight is on the meta device; materialise the model (to_empty) first"
        )


def find_layers(model: nn.Module, names=None) -> dict[str, TrackedLayer]:
    """Tracked layers by ``named_modules()`` name: every Linear/Conv2d, or exactly ``names``.

    Unsupported weight layers (Embedding, Conv1d, attention, ...) are listed in one warning.
    """
    modules = dict(model.named_modules())
    inside_attention = {
        f"{name}.{child}" if name else child
        for name, module in modules.items()
        if isinstance(module, nn.MultiheadAttention)
        for child, _ in module.named_modules()
        if child
    }
    if names is not None:
        if isinstance(names, str):
            names = [names]
        names = list(dict.fromkeys(names))
        if not names:
            raise ValueError("modules= is empty: name at least one nn.Linear or nn.Conv2d layer")
        chosen = []
        for name in names:
            if name not in modules:
                known = [n for n, m in modules.items() if _tracked_kind(m)]
                raise ValueError(f"unknown module name {name!r}; Linear/Conv2d layers are: {known}")
            if _tracked_kind(modules[name]) is None:
                raise TypeError(
                    f"module {name!r} is a {type(modules[name]).__name__}; only nn.Linear and nn.Conv2d are tracked"
                )
            chosen.append(name)
    else:
        chosen = [n for n, m in modules.items() if _tracked_kind(m) and n not in inside_attention]
        skipped = [
            f"{n} ({type(m).__name__})"
            for n, m in modules.items()
            if isinstance(m, UNSUPPORTED_WEIGHT_LAYERS) and n not in inside_attention
        ]
        if skipped:
            warnings.warn(
                "NullSpaceProjector does not track these layers; their weights are treated as "
                "untracked parameters: " + ", ".join(skipped),
                UserWarning,
                stacklevel=3,
            )
        if not chosen:
            raise ValueError(f"{type(model).__name__} has no nn.Linear or nn.Conv2d layer to track")
    layers = {}
    for name in chosen:
        module = modules[name]
        _check_supported(name, module)
        kind = _tracked_kind(module)
        dim = module.in_features if kind == "linear" else module.in_channels * _kernel_area(module)
        layers[name] = TrackedLayer(name, module, kind, dim)
    return layers
