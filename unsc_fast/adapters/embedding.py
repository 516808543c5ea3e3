"""Embeddings: ``nn.Embedding`` and ``nn.EmbeddingBag``.

An embedding looks up row ``t`` of its weight ``(V, H)`` for token ``t``: as a matrix it is
``W^T`` acting on the one-hot vector ``e_t``. The covariance of one-hot inputs is diagonal
(a count per token), so the slot keeps ``V`` counts, never ``V x V``. Its null space is every
token the remaining data never used: the rows of seen tokens are frozen, the others are free.
A bag sums (or averages) several one-hots; protecting every token seen in any bag is a
superset of its null-space condition, so the guarantee holds, with less freedom.
"""
from __future__ import annotations

import torch
from torch import nn

from unsc_fast.adapters.base import LayerAdapter, Slot, Use, first_input, select


class EmbeddingAdapter(LayerAdapter):
    kind = "embedding"

    @property
    def per_token(self) -> bool:
        """A bag's rows are whole bags, not tokens: padding inside it is its padding_idx's job."""
        return not isinstance(self.module, nn.EmbeddingBag)

    def slots(self) -> list[Slot]:
        return [Slot(self.slot_name(), self.module.num_embeddings, "diagonal")]

    def uses(self) -> list[Use]:
        return [Use(self.module.weight, f"{self.name}.weight" if self.name else "weight", self.slot_name(), "out",
                    lambda tensor: tensor.mT)]

    def _indices(self, args, kwargs) -> torch.Tensor:
        indices = first_input(args, kwargs)
        if not isinstance(indices, torch.Tensor) or indices.is_floating_point() or indices.is_complex():
            got = type(indices).__name__ if not isinstance(indices, torch.Tensor) else str(indices.dtype)
            raise TypeError(f"layer {self.name!r}: expected integer token indices, got {got}")
        return indices

    def batch_size(self, args, kwargs) -> int:
        indices = self._indices(args, kwargs)
        offsets = kwargs.get("offsets", args[1] if len(args) > 1 else None)
        if isinstance(self.module, nn.EmbeddingBag) and indices.dim() == 1:
            return 1 if offsets is None else offsets.numel() - int(self.module.include_last_offset)
        return 1 if indices.dim() == 0 else indices.shape[0]

    def accumulate_(self, deltas, args, kwargs, output, index) -> dict[str, int]:
        indices = self._indices(args, kwargs).detach()
        if isinstance(self.module, nn.EmbeddingBag) and indices.dim() == 1:
            indices = self._bag_tokens(indices, args, kwargs, index)
        else:
            indices = select(indices.reshape(1) if indices.dim() == 0 else indices, index)
        name = self.slot_name()
        flat = indices.reshape(-1).to(deltas[name].device)
        deltas[name].add_(torch.bincount(flat, minlength=self.module.num_embeddings).to(deltas[name].dtype))
        return {name: flat.numel()}

    def _bag_tokens(self, indices, args, kwargs, index) -> torch.Tensor:
        """The tokens of the selected bags of a flat ``input`` with ``offsets``."""
        offsets = kwargs.get("offsets", args[1] if len(args) > 1 else None)
        if offsets is None or index is None:
            return indices
        bounds = torch.cat([offsets.cpu(), torch.tensor([indices.numel()])])
        bags = [indices[int(bounds[i]):int(bounds[i + 1])] for i in index.cpu().tolist()]
        return torch.cat(bags) if bags else indices[:0]
