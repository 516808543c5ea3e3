"""Padding: which positions of a token batch are real, and a layer's rows at those positions.

A padded batch of sequences carries ``attention_mask`` (B, T), nonzero at real tokens (the
Hugging Face convention). Padded positions are not data: their layer inputs must not enter
the statistics, or a padded batch would protect directions no real sequence uses (and its
ranks would depend on how the batch was padded). ``observe()`` reads the mask from the
root module's keyword arguments on every forward; each adapter whose rows are one per
token (Linear, transformers' Conv1D, Embedding, MultiheadAttention, RNN inputs) then keeps
the rows of real tokens only, so a padded batch gives what its sequences would give unpadded.

How a layer's input lines up with the mask (leading dimensions, features last):

* ``(B, T)``: one row per token, kept where the mask is set;
* ``(1, T)``: shared by every sequence (GPT-2's position embeddings): counted once per real
  token of each sequence, as the unpadded sequences would have it;
* ``(B,)``: one row per sequence (a pooled output): kept for every sequence with a real token;
* ``(B * T,)``: tokens flattened into one dimension, in the mask's order.

Anything else is refused with the layer's name: guessing could file padded rows as data.
"""
from __future__ import annotations

import torch


class TokenMask:
    """The real-token mask (B, T) of one group of sequences, as seen by one layer."""

    def __init__(self, mask: torch.Tensor, layer: str) -> None:
        self.mask, self.layer = mask, layer

    def rows(self, x: torch.Tensor, batch_dim: int = 0) -> torch.Tensor:
        """``x``'s entries at real tokens: (N, d) for a floating-point input ending in its
        features, (N,) for integer token ids. ``batch_dim=1``: ``x`` is sequence-first."""
        mask = self.mask if batch_dim == 0 else self.mask.T
        lead = tuple(x.shape[:-1]) if x.is_floating_point() else tuple(x.shape)
        batch, length = self.mask.shape
        tail = tuple(x.shape[len(lead):])
        if lead == tuple(mask.shape):
            return x[mask]
        if lead == ((1, length) if batch_dim == 0 else (length, 1)):
            return x.expand(*mask.shape, *tail)[mask]
        if lead == (batch,):
            return x[self.mask.any(1)]
        if lead == (batch * length,) and batch_dim == 0:
            return x[mask.reshape(-1)]
        raise ValueError(
            f"layer {self.layer!r}: its input {tuple(x.shape)} does not line up with attention_mask "
            f"{tuple(self.mask.shape)} (one row per token (B, T), per sequence (B,), flattened (B*T,) or shared "
            "(1, T) are understood), so its padded positions cannot be told apart: observe without "
            "attention_mask, or leave the layer out with modules=[...]"
        )


def padding_mask(kwargs: dict) -> torch.Tensor | None:
    """The forward's ``attention_mask`` keyword as a bool (B, T) mask of real tokens, or None."""
    mask = kwargs.get("attention_mask")
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or mask.is_complex():
        got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(
            f"observe(): attention_mask must be a (batch, seq) padding mask, nonzero at real tokens, to be "
            f"honoured; got {got}. Pass the 2-D mask (the model expands it itself), or observe without it"
        )
    return mask.detach() != 0
