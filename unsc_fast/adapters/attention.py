"""``nn.MultiheadAttention``: the q/k/v input projections and the output projection.

The module calls ``F.multi_head_attention_forward`` with its weights directly, so hooks on
its ``out_proj`` child never fire; everything is observed from the attention module's own
hook. q, k and v multiply the ``query``, ``key`` and ``value`` inputs: with the packed
``in_proj_weight (3E, E)`` they are three row blocks with one input covariance each (equal
for self-attention, where the three inputs are one tensor); with separate
``q/k/v_proj_weight`` (``kdim``/``vdim`` differ from E), three dense slots. ``out_proj``
multiplies the heads' concatenated output, which the hook recomputes by running the module
again with an identity output projection (``torch.func.functional_call``): exact, at the cost
of a second attention pass while observing. Dropout would make that pass differ, so the
module must be observed in eval mode (or with ``dropout=0``).
"""
from __future__ import annotations

import torch
from torch import nn

from unsc_fast import ops
from unsc_fast.adapters.base import LayerAdapter, Slot, Use, check_floating, select


class MultiheadAttentionAdapter(LayerAdapter):
    kind = "multihead_attention"
    per_token = True

    def __init__(self, name: str, module: nn.MultiheadAttention) -> None:
        super().__init__(name, module)
        self.busy = False  # true while the hook re-runs the module

    @property
    def packed(self) -> bool:
        return self.module._qkv_same_embed_dim

    def slots(self) -> list[Slot]:
        m = self.module
        if self.packed:
            projections = [Slot(self.slot_name("in_proj"), m.embed_dim, "grouped", 3)]
        else:
            projections = [Slot(self.slot_name("q"), m.embed_dim), Slot(self.slot_name("k"), m.kdim),
                           Slot(self.slot_name("v"), m.vdim)]
        return projections + [Slot(self.slot_name("out_proj"), m.embed_dim)]

    def uses(self) -> list[Use]:
        m, prefix = self.module, f"{self.name}." if self.name else ""
        identity = lambda t: t  # noqa: E731
        if self.packed:
            E = m.embed_dim
            uses = [Use(m.in_proj_weight, prefix + "in_proj_weight", self.slot_name("in_proj"), "in",
                        lambda t: t.view(3, E, E))]
        else:
            uses = [Use(getattr(m, f"{p}_proj_weight"), f"{prefix}{p}_proj_weight", self.slot_name(p), "in", identity)
                    for p in "qkv"]
        return uses + [Use(m.out_proj.weight, prefix + "out_proj.weight", self.slot_name("out_proj"), "in", identity)]

    def _inputs(self, args, kwargs) -> list[torch.Tensor]:
        names = ("query", "key", "value")
        inputs = [args[i] if len(args) > i else kwargs.get(n) for i, n in enumerate(names)]
        return [check_floating(self.name, x, n) for x, n in zip(inputs, names)]

    def _batch_dim(self, x: torch.Tensor) -> int | None:
        if x.dim() == 2:
            return None  # unbatched (L, E)
        return 0 if self.module.batch_first else 1

    def batch_size(self, args, kwargs) -> int:
        query = self._inputs(args, kwargs)[0]
        dim = self._batch_dim(query)
        return 1 if dim is None else query.shape[dim]

    def _rows(self, x: torch.Tensor, index) -> torch.Tensor:
        dim = self._batch_dim(x)
        x = x.detach() if dim is not None else x.detach().unsqueeze(0)
        return select(x, index, dim or 0).reshape(-1, x.shape[-1])

    def accumulate_(self, deltas, args, kwargs, output, index) -> dict[str, int]:
        query, key, value = self._inputs(args, kwargs)
        rows = {}
        if self.packed:
            name = self.slot_name("in_proj")
            increments = {}  # one covariance per distinct input tensor (self-attention: one)
            for block, x in enumerate((query, key, value)):
                if id(x) not in increments:
                    part = self._rows(x, index)
                    increments[id(x)] = torch.zeros_like(deltas[name][block])
                    ops.covariance_(increments[id(x)], part)
                    rows.setdefault(name, part.shape[0])
                deltas[name][block].add_(increments[id(x)])
        else:
            for letter, x in zip("qkv", (query, key, value)):
                part = self._rows(x, index)
                ops.covariance_(deltas[self.slot_name(letter)], part)
                rows[self.slot_name(letter)] = part.shape[0]
        heads = self._head_outputs(args, kwargs)
        name = self.slot_name("out_proj")
        part = self._rows(heads, index)
        ops.covariance_(deltas[name], part)
        rows[name] = part.shape[0]
        return rows

    def input_rows(self, args, kwargs, output, index):
        query, key, value = self._inputs(args, kwargs)
        if self.packed:
            for block, x in enumerate((query, key, value)):
                yield self.slot_name("in_proj"), block, self._rows(x, index)
        else:
            for letter, x in zip("qkv", (query, key, value)):
                yield self.slot_name(letter), None, self._rows(x, index)
        yield self.slot_name("out_proj"), None, self._rows(self._head_outputs(args, kwargs), index)

    def _head_outputs(self, args, kwargs) -> torch.Tensor:
        """The concatenated heads, i.e. ``out_proj``'s input, by re-running the module with an
        identity output projection."""
        m = self.module
        if m.training and m.dropout > 0:
            raise ValueError(
                f"layer {self.name!r}: MultiheadAttention with dropout={m.dropout} must be observed in eval "
                "mode (dropout would change the inputs of its out_proj); use model.eval() or projector.collect()"
            )
        weight = m.out_proj.weight
        identity = {"out_proj.weight": torch.eye(m.embed_dim, dtype=weight.dtype, device=weight.device)}
        if m.out_proj.bias is not None:
            identity["out_proj.bias"] = torch.zeros_like(m.out_proj.bias)
        self.busy = True
        try:
            with torch.no_grad():
                result = torch.func.functional_call(m, identity, args, kwargs)
        finally:
            self.busy = False
        return result[0] if isinstance(result, tuple) else result
