"""Dense layers: ``nn.Linear`` (weight ``(out, in)``) and Hugging Face transformers' ``Conv1D``
(GPT-2's attention and MLP weights, stored ``(in, out)`` and applied as ``x @ W + b``).

Both multiply every position's input vector: an input ``(..., d)`` gives one row per
position, ``x.reshape(-1, d)`` (a (B, T, d) sequence gives B*T rows).
"""
from __future__ import annotations

import math

import torch

from unsc_fast import ops
from unsc_fast.adapters.base import LayerAdapter, Slot, Use, check_floating, first_input, select


class LinearAdapter(LayerAdapter):
    """``y = x W^T + b``: the rows are ``x``; the weight is already the ``(out, d)`` matrix."""

    kind = "linear"
    side = "in"
    per_token = True

    def input_width(self) -> int:
        return self.module.in_features

    def slots(self) -> list[Slot]:
        return [Slot(self.slot_name(), self.input_width())]

    def uses(self) -> list[Use]:
        return [Use(self.module.weight, f"{self.name}.weight" if self.name else "weight", self.slot_name(),
                    self.side, self.matrix)]

    @staticmethod
    def matrix(tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def _input(self, args, kwargs) -> torch.Tensor:
        x = check_floating(self.name, first_input(args, kwargs))
        d = self.input_width()
        if x.dim() == 0 or x.shape[-1] != d:
            raise ValueError(
                f"layer {self.name!r}: {type(self.module).__name__} input must end in {d}, got shape {tuple(x.shape)}"
            )
        return x

    def batch_size(self, args, kwargs) -> int:
        x = self._input(args, kwargs)
        return 1 if x.dim() == 1 else x.shape[0]

    def accumulate_(self, deltas, args, kwargs, output, index) -> dict[str, int]:
        x = self._input(args, kwargs).detach()
        if x.dim() == 1:
            x = x.unsqueeze(0)
        x = select(x, index)
        name = self.slot_name()
        ops.covariance_(deltas[name], x.reshape(-1, x.shape[-1]))
        return {name: x.shape[0] * math.prod(x.shape[1:-1])}


    def input_rows(self, args, kwargs, output, index):
        x = self._input(args, kwargs).detach()
        x = select(x.unsqueeze(0) if x.dim() == 1 else x, index)
        yield self.slot_name(), None, x.reshape(-1, x.shape[-1])


class TransformersConv1DAdapter(LinearAdapter):
    """transformers' ``Conv1D``: weight ``(in, out)``; the ``(out, d)`` matrix is its transpose,
    so the rows multiply the stored weight's dim 0 (side ``"out"``)."""

    kind = "transformers_conv1d"
    side = "out"

    def input_width(self) -> int:
        return self.module.weight.shape[0]

    @staticmethod
    def matrix(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.mT


def is_transformers_conv1d(module) -> bool:
    """transformers' Conv1D, recognised by name so that transformers need not be installed."""
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers")
