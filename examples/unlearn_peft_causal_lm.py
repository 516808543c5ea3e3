"""Unlearn token sequences from a causal LM through a fresh PEFT LoRA adapter, with UNSC.

A small GPT-2 is built from a config object and randomly initialised (nothing is downloaded),
trained on random "documents", then wrapped by ``peft.get_peft_model`` with PEFT's default
LoRA initialisation (B = 0) and asked to forget some documents:

* Only the LoRA factors are trainable, so only they are tracked (the frozen base layers
  cannot change and are not observed).
* B = 0: the factor-wise rule would move nothing, so ``build()`` (run inside ``unlearn``)
  first moves each lora_A's rows into the null space of the remaining tokens' inputs (which
  changes nothing while B = 0) and leaves lora_B free: the effective weight ``W0 + s B A``
  then changes only in the null space (``unsc_fast.solve.lora``).
* The forget documents share a topic (tokens the others never use): a sample-wise request
  needs inputs that differ from the remaining ones somewhere, or ``unlearn`` refuses it.
* statistics="total" + one pass over the forget documents; labels="keep" +
  loss=causal_lm_loss + objective="ascent" (calibration is a classifier idea).
* The adapter merges back into a plain GPT-2 (``merge_and_unload``) with the same outputs.

Run: python examples/unlearn_peft_causal_lm.py
"""
from __future__ import annotations

import peft
import torch
from torch.utils.data import DataLoader, TensorDataset
from transformers import GPT2Config, GPT2LMHeadModel

from unsc_fast import NullSpaceProjector
from unsc_fast.training import causal_lm_loss, fit
from unsc_fast.unlearn import unlearn


def tiny_gpt2(vocab: int = 96, width: int = 64, layers: int = 2, seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=width, n_layer=layers, n_head=4, n_positions=64,
                                      bos_token_id=0, eos_token_id=0))


def documents(count: int, length: int, tokens: range, seed: int) -> torch.Tensor:
    """Random token sequences from ``tokens``, each a repeated short motif (something to learn)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(tokens.start, tokens.stop, (count, 4), generator=g).repeat(1, length // 4)


def lm_loader(tokens: torch.Tensor, batch_size: int = 8, shuffle: bool = False) -> DataLoader:
    """Batches ``(input_ids, targets)``; the targets are the inputs (causal_lm_loss shifts them)."""
    return DataLoader(TensorDataset(tokens, tokens), batch_size=batch_size, shuffle=shuffle,
                      generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def mean_loss(model, tokens: torch.Tensor) -> float:
    model.eval()
    return causal_lm_loss(model(tokens), tokens).item()


def main(epochs: int = 5, train_epochs: int = 30, progress_bar: bool | None = None) -> dict:
    base = tiny_gpt2()
    vocab = base.config.vocab_size  # the forget documents share a topic: a part of the vocabulary
    forget, remain = documents(8, 32, range(0, vocab // 4), seed=1), documents(88, 32, range(vocab // 4, vocab), seed=2)
    tokens = torch.cat([forget, remain])
    fit(base, lm_loader(tokens, shuffle=True), torch.optim.AdamW(base.parameters(), lr=3e-3),
        epochs=train_epochs, loss=causal_lm_loss, progress_bar_enabled=progress_bar)
    before = {"forget": mean_loss(base, forget), "remain": mean_loss(base, remain)}

    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn", "c_proj", "c_fc"], lora_dropout=0.0)
    model = peft.get_peft_model(base, config)  # B = 0: the model is unchanged so far
    projector = NullSpaceProjector(model, threshold=0.9, statistics="total")
    print(projector.coverage().__str__().splitlines()[0])
    projector.collect(lm_loader(tokens), labels=False, progress=progress_bar)  # all training data, once
    unlearn(model, lm_loader(forget, shuffle=True), projector=projector, labels="keep", loss=causal_lm_loss,
            objective="ascent", untracked="freeze", epochs=epochs, lr=0.3, progress_bar=progress_bar)
    after = {"forget": mean_loss(model, forget), "remain": mean_loss(model, remain)}
    merged = model.merge_and_unload()
    merged_after = {"forget": mean_loss(merged, forget), "remain": mean_loss(merged, remain)}
    print(f"next-token loss before:          {before}\nnext-token loss after:           {after}")
    print(f"after merging the adapter back:  {merged_after}")
    return {"before": before, "after": after, "merged": merged_after, "projector": projector}


if __name__ == "__main__":
    main()
