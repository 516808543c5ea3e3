"""Unlearn token sequences from a causal language model with UNSC's null-space projection.

A small Llama-style model is built from a config object and randomly initialised (nothing is
downloaded), briefly trained on random "documents", then asked to forget some of them:

* statistics="total": one covariance per tracked Linear over all training tokens; the request
  costs one pass over the forget documents, subtracted by the build.
* labels="keep" + loss=causal_lm_loss + objective="ascent": relabelling (calibration) is a
  classifier idea, so for an LM we push the next-token loss on the forget tokens up instead.
* untracked="freeze": norms (and anything else without an adapter) must not move; every
  tracked Linear moves only in the null space of the remaining tokens' inputs, and the token
  embedding (tracked by its own adapter) only in rows no remaining token used.

This shows the custom-loss API. Gradient ascent for a fixed number of epochs raises the
remaining documents' loss too (0.20 -> 0.63 here). For the library's default LM unlearning (NPO
plus the retain NLL, a stop rule on the forget tokens and a guard of remaining sequences),
call ``unlearn(model, forget, remain)`` with token data: docs/language_models.md.

Run: python examples/unlearn_causal_lm.py
"""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader, TensorDataset
from transformers import LlamaConfig, LlamaForCausalLM

from unsc_fast import NullSpaceOptimizer, NullSpaceProjector
from unsc_fast.training import causal_lm_loss, fit
from unsc_fast.unlearn import unlearn


def tiny_llama(vocab: int = 96, hidden: int = 64, layers: int = 2, seed: int = 0) -> LlamaForCausalLM:
    """A randomly initialised Llama with separate (untied) input and output embeddings, so the
    tracked ``lm_head`` shares no parameter with the untracked embedding."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def documents(count: int, length: int, vocab: int, seed: int) -> torch.Tensor:
    """Random token sequences, each made of a repeated short motif so that there is something to learn."""
    g = torch.Generator().manual_seed(seed)
    motifs = torch.randint(0, vocab, (count, 4), generator=g)
    return motifs.repeat(1, length // 4)


def lm_loader(tokens: torch.Tensor, batch_size: int = 8, shuffle: bool = False) -> DataLoader:
    """Batches ``(input_ids, targets)``; the targets are the inputs (causal_lm_loss shifts them)."""
    return DataLoader(TensorDataset(tokens, tokens), batch_size=batch_size, shuffle=shuffle,
                      generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def mean_loss(model, tokens: torch.Tensor) -> float:
    model.eval()
    return causal_lm_loss(model(tokens), tokens).item()


def main(epochs: int = 5, progress_bar: bool | None = None) -> dict:
    model = tiny_llama()
    tokens = documents(96, 32, model.config.vocab_size, seed=1)
    forget, remain = tokens[:8], tokens[8:]
    fit(model, lm_loader(tokens, shuffle=True), torch.optim.AdamW(model.parameters(), lr=3e-3),
        epochs=30, loss=causal_lm_loss, progress_bar_enabled=progress_bar)
    before = {"forget": mean_loss(model, forget), "remain": mean_loss(model, remain)}

    projector = NullSpaceProjector(model, threshold=0.9, statistics="total")
    print(projector.memory_estimate(labels=1))
    projector.collect(lm_loader(tokens), labels=False, progress=progress_bar)  # all training data, once
    unlearn(model, lm_loader(forget, shuffle=True), projector=projector, labels="keep", loss=causal_lm_loss,
            objective="ascent", untracked="freeze", epochs=epochs, lr=0.3, progress_bar=progress_bar)
    after = {"forget": mean_loss(model, forget), "remain": mean_loss(model, remain)}
    print(f"next-token loss before: {before}\nnext-token loss after:  {after}")
    print(f"kept ranks: {projector.ranks()}")
    return {"before": before, "after": after}


if __name__ == "__main__":
    main()
