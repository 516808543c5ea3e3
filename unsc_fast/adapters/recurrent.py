"""Recurrent layers (``nn.RNN``, ``nn.LSTM``, ``nn.GRU``): the first layer's input weights.

``weight_ih_l0`` (and ``weight_ih_l0_reverse``) multiply the sequence's input vector at every
time step, which a hook on the module sees: every step of every sequence is one row. The
other weights multiply hidden states computed inside the module (higher layers' inputs, the
recurrent ``weight_hh_*``), which no hook can observe: they are left to the coverage report
as unprotected (and ``strict=True`` refuses them).
"""
from __future__ import annotations

import torch
from torch import nn

from unsc_fast import ops
from unsc_fast.adapters.base import LayerAdapter, Slot, Use, check_floating, first_input, select


class RecurrentInputAdapter(LayerAdapter):
    kind = "rnn_input"

    def slots(self) -> list[Slot]:
        return [Slot(self.slot_name(), self.module.input_size)]

    def uses(self) -> list[Use]:
        names = ["weight_ih_l0"] + (["weight_ih_l0_reverse"] if self.module.bidirectional else [])
        prefix = f"{self.name}." if self.name else ""
        return [Use(getattr(self.module, n), prefix + n, self.slot_name(), "in", lambda t: t) for n in names]

    def _input(self, args, kwargs) -> torch.Tensor:
        x = first_input(args, kwargs)
        if isinstance(x, nn.utils.rnn.PackedSequence):
            raise NotImplementedError(
                f"layer {self.name!r}: observing a PackedSequence is not supported; pass padded "
                "sequences inside observe() (padding adds zero rows, which add nothing to the covariance)"
            )
        x = check_floating(self.name, x)
        if x.dim() not in (2, 3) or x.shape[-1] != self.module.input_size:
            raise ValueError(f"layer {self.name!r}: input must end in {self.module.input_size}, got {tuple(x.shape)}")
        return x

    def batch_size(self, args, kwargs) -> int:
        x = self._input(args, kwargs)
        if x.dim() == 2:
            return 1
        return x.shape[0] if self.module.batch_first else x.shape[1]

    def accumulate_(self, deltas, args, kwargs, output, index) -> dict[str, int]:
        x = self._input(args, kwargs).detach()
        if x.dim() == 2:
            x = x.unsqueeze(0 if self.module.batch_first else 1)
        x = select(x, index, 0 if self.module.batch_first else 1)
        name = self.slot_name()
        rows = x.reshape(-1, x.shape[-1])
        ops.covariance_(deltas[name], rows)
        return {name: rows.shape[0]}

    def input_rows(self, args, kwargs, output, index):
        x = self._input(args, kwargs).detach()
        if x.dim() == 2:
            x = x.unsqueeze(0 if self.module.batch_first else 1)
        x = select(x, index, 0 if self.module.batch_first else 1)
        yield self.slot_name(), None, x.reshape(-1, x.shape[-1])
