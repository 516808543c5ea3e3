"""Convolutions of any dimension and any ``groups``: ``nn.Conv1d``, ``nn.Conv2d``, ``nn.Conv3d``.

A conv weight ``(out, in/g, *k)`` multiplies kernel-sized patches of its input, one row per
output position, in the order of ``weight.flatten(1)`` (channel-major, as ``F.unfold``).
With ``groups = g`` the output channels of group j only see the input channels of group j:
the weight is ``g`` matrices ``(out/g, d)`` with ``d = in/g * prod(k)``, each with its own
input covariance (a depthwise conv has ``g = in`` tiny ones). Padding the conv does itself
(zeros, reflect, circular, 'same') is applied to the input first, so the rows are the real
patches. 2-D convs with one group take the implicit-im2col op (``ops.conv_covariance_``);
every other case extracts the patches with ``Tensor.unfold`` (the reference way).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from unsc_fast import ops
from unsc_fast.adapters.base import LayerAdapter, Slot, Use, check_floating, first_input, select

PATCH_CHUNK = 2**22  # numbers of patches materialised at a time for a sketch


def explicit_pads(conv: nn.modules.conv._ConvNd) -> tuple[int, ...]:
    """The padding the conv applies, 'same'/'valid' resolved, in ``F.pad`` order (last dim first)."""
    dims = len(conv.kernel_size)
    if conv.padding == "valid":
        return (0,) * (2 * dims)
    pads = []
    if conv.padding == "same":
        for k, d in zip(reversed(conv.kernel_size), reversed(conv.dilation)):
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
        return tuple(pads)
    for p in reversed(conv.padding):
        pads += [p, p]
    return tuple(pads)


def symmetric_zero_padding(conv) -> tuple[int, ...] | None:
    """Per-dim symmetric zero padding, or None when the input must be padded explicitly."""
    if conv.padding_mode != "zeros":
        return None
    pads = explicit_pads(conv)
    if any(pads[i] != pads[i + 1] for i in range(0, len(pads), 2)):
        return None
    return tuple(reversed(pads[::2]))


def patch_rows(x: torch.Tensor, kernel, stride, dilation, dtype) -> torch.Tensor:
    """Every kernel-sized patch of an already padded ``x`` (B, C, *spatial) as one row
    ``(B * positions, C * prod(kernel))``, channel-major as ``weight.flatten(1)``."""
    dims = len(kernel)
    patches = x.to(dtype)
    for axis, (k, s, d) in enumerate(zip(kernel, stride, dilation)):
        span = d * (k - 1) + 1
        patches = patches.unfold(2 + axis, span, s)
        if d > 1:
            patches = patches[..., ::d]
    # (B, C, *out, *k) -> (B, *out, C, *k)
    order = [0, *range(2, 2 + dims), 1, *range(2 + dims, 2 + 2 * dims)]
    patches = patches.permute(order)
    return patches.reshape(-1, x.shape[1] * math.prod(kernel))


class ConvAdapter(LayerAdapter):
    """``nn.Conv1d/2d/3d`` with any groups, stride, dilation and padding mode."""

    kind = "conv"

    @property
    def groups(self) -> int:
        return self.module.groups

    def input_width(self) -> int:
        conv = self.module
        return conv.in_channels // conv.groups * math.prod(conv.kernel_size)

    def slots(self) -> list[Slot]:
        if self.groups == 1:
            return [Slot(self.slot_name(), self.input_width())]
        return [Slot(self.slot_name(), self.input_width(), "grouped", self.groups)]

    def uses(self) -> list[Use]:
        return [Use(self.module.weight, f"{self.name}.weight" if self.name else "weight", self.slot_name(), "in",
                    self.matrix)]

    def matrix(self, tensor: torch.Tensor) -> torch.Tensor:
        """``(out, d)``, or ``(g, out/g, d)`` for grouped convs. ``flatten``/``unflatten`` rather
        than a reshape to a constant width: under torch.compile the weight's dims may be
        symbolic, and a reshape to ``(out, 27)`` then trips a guard on divisibility."""
        matrix = tensor.flatten(1)
        return matrix if self.groups == 1 else matrix.unflatten(0, (self.groups, -1))

    def _input(self, args, kwargs) -> torch.Tensor:
        conv = self.module
        x = check_floating(self.name, first_input(args, kwargs))
        dims = len(conv.kernel_size)
        if x.dim() not in (dims + 1, dims + 2) or x.shape[-dims - 1] != conv.in_channels:
            raise ValueError(
                f"layer {self.name!r}: {type(conv).__name__} input must be (B, {conv.in_channels}, "
                f"{', '.join('*' * dims)}), got shape {tuple(x.shape)}"
            )
        return x

    def batch_size(self, args, kwargs) -> int:
        x = self._input(args, kwargs)
        return 1 if x.dim() == len(self.module.kernel_size) + 1 else x.shape[0]

    def accumulate_(self, deltas, args, kwargs, output, index) -> dict[str, int]:
        conv = self.module
        dims = len(conv.kernel_size)
        x = self._input(args, kwargs).detach()
        if x.dim() == dims + 1:
            x = x.unsqueeze(0)
        x = select(x, index)
        padding = symmetric_zero_padding(conv)
        if padding is None:  # asymmetric or non-zero padding: pad explicitly, then none
            mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
            x = F.pad(x, explicit_pads(conv), mode=mode)
            padding = (0,) * dims
        name = self.slot_name()
        delta = deltas[name]
        if dims <= 2 and self.groups == 1:  # a 1-D conv is a 2-D one of height 1 (same column order)
            kernel, stride, dilation = conv.kernel_size, conv.stride, conv.dilation
            if dims == 1:
                x, padding = x.unsqueeze(2), (0, *padding)
                kernel, stride, dilation = (1, *kernel), (1, *stride), (1, *dilation)
            ops.conv_covariance_(delta, x, kernel, stride, padding, dilation)
            return {name: x.shape[0] * _positions(x.shape[2:], kernel, stride, padding, dilation)}
        if any(padding):
            x = F.pad(x, [p for pad in reversed(padding) for p in (pad, pad)])
        rows = patch_rows(x, conv.kernel_size, conv.stride, conv.dilation, delta.dtype)
        if self.groups == 1:
            ops.covariance_(delta, rows)
        else:
            grouped = rows.view(rows.shape[0], self.groups, -1).transpose(0, 1)  # (g, N, d)
            delta.baddbmm_(grouped.mT, grouped)
        return {name: rows.shape[0]}


    def input_rows(self, args, kwargs, output, index):
        """The patches, materialised ``PATCH_CHUNK`` numbers at a time (a sketch needs the rows
        themselves; the dense path never materialises them): ``prod(kernel)`` times the input's
        size in all, one chunk alive at a time."""
        conv = self.module
        dims = len(conv.kernel_size)
        x = self._input(args, kwargs).detach()
        x = select(x.unsqueeze(0) if x.dim() == dims + 1 else x, index)
        x = F.pad(x, explicit_pads(conv), mode="constant" if conv.padding_mode == "zeros" else conv.padding_mode)
        positions = _positions(x.shape[2:], conv.kernel_size, conv.stride, (0,) * dims, conv.dilation)
        step = max(1, PATCH_CHUNK // max(1, positions * self.input_width() * self.groups))
        name = self.slot_name()
        for chunk in x.split(step):
            rows = patch_rows(chunk, conv.kernel_size, conv.stride, conv.dilation, chunk.dtype)
            if self.groups == 1:
                yield name, None, rows
                continue
            grouped = rows.view(rows.shape[0], self.groups, -1)
            for group in range(self.groups):
                yield name, group, grouped[:, group]


def _positions(spatial, kernel, stride, padding, dilation) -> int:
    return math.prod(
        (size + 2 * p - d * (k - 1) - 1) // s + 1
        for size, k, s, p, d in zip(spatial, kernel, stride, padding, dilation)
    )
