"""PEFT LoRA layers: the guarantee on the effective weight ``W0 + s B A``, from ``B = 0`` too.

A PEFT LoRA layer computes ``base(x) + s * lora_B(lora_A(dropout(x)))``; ``lora_A`` and
``lora_B`` are ``nn.Linear`` layers that ``LinearAdapter`` tracks (the frozen base is not
tracked: it cannot change).

- **Trained adapter (B != 0): factor by factor.** A is projected against the layer input x,
  B against A's output ``A x``: ``A' x = A x`` and then ``B' (A x) = B (A x)`` for every
  remaining x, so ``s B' A' x = s B A x``.
- **Fresh adapter (B = 0, PEFT's default initialisation).** The factor-wise rule moves
  nothing there: ``A x`` spans all r directions, so B's basis keeps them all and B stays 0,
  and A gets no gradient (it is multiplied by B = 0). ``build()`` therefore moves A's rows
  into the null space of the remaining inputs, ``A <- A - (A U) U^T`` with U the basis of x,
  which changes nothing while B = 0 (``W0 + s 0 A' = W0``), and leaves B free (an empty
  basis). A's own updates stay in that null space, so ``A' U = 0`` for good and every
  effective change ``s B' A'`` satisfies ``s B' A' U = 0``: the null-space guarantee of the
  effective weight, whatever B does. lora_B's stored statistics are replaced by what it now
  sees (``A' C A'^T`` per key, C being A's input covariance), so a later request on the then
  trained adapter applies the factor-wise rule to the right statistics.

A LoRA layer where nothing can move (B = 0 and the inputs span everything, so ``A' = 0``; or
both factors fully blocked) is named in a warning, layer by layer, even when others can move.
PEFT is recognised by structure (``lora_A``/``lora_B`` module dicts and ``scaling``): the core
does not import it.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class LoraFactors:
    """One adapter (``key``) of one PEFT LoRA layer (``layer``)."""

    layer: str
    key: str
    A: nn.Parameter  # (r, d_in)
    B: nn.Parameter  # (d_out, r)


def is_peft_lora(module: nn.Module) -> bool:
    return (isinstance(getattr(module, "lora_A", None), nn.ModuleDict)
            and isinstance(getattr(module, "lora_B", None), nn.ModuleDict)
            and isinstance(getattr(module, "scaling", None), dict))


def lora_factors(model: nn.Module) -> list[LoraFactors]:
    """Every Linear-factored adapter of every PEFT LoRA layer of ``model``."""
    found = []
    for name, module in model.named_modules():
        if not is_peft_lora(module):
            continue
        for key, A in module.lora_A.items():
            B = module.lora_B[key] if key in module.lora_B else None
            if isinstance(A, nn.Linear) and isinstance(B, nn.Linear):
                found.append(LoraFactors(name, key, A.weight, B.weight))
    return found


def start_zero_adapters_(factors: list[LoraFactors], protection, bases: dict, store) -> None:
    """The zero-start rule above, in place on A's weights, lora_B's statistics in ``store``
    and ``bases`` (B's basis emptied); then the warning for layers where nothing can move."""
    stuck = []
    for f in factors:
        a_slot, b_slot = _dense_slot(protection, f.A), _dense_slot(protection, f.B)
        zero = not bool(f.B.detach().any())
        if zero and a_slot is not None and b_slot is not None:
            basis = bases[a_slot]
            with torch.no_grad():
                work = f.A.detach().to(torch.float64)
                basis64 = basis.to(device=work.device, dtype=torch.float64)
                f.A.copy_(work - (work @ basis64) @ basis64.T)
            _restate_b_(store, a_slot, b_slot, f.A.detach())
            bases[b_slot] = basis.new_zeros((f.B.shape[1], 0))
            if basis.shape[1] == basis.shape[0]:
                stuck.append(f"{f.layer} [{f.key}]: B = 0 and the remaining inputs span all {basis.shape[0]} "
                             "input dimensions, so A's rows have no null space to move in (A' = 0)")
        elif not (_can_move(f.B, b_slot, bases) or (not zero and _can_move(f.A, a_slot, bases))):
            why = "B = 0 and B is blocked" if zero else "both factors are blocked"
            stuck.append(f"{f.layer} [{f.key}]: {why} (every input direction kept, or not trainable)")
    if stuck:
        warnings.warn(
            f"build(): {len(stuck)} LoRA layer(s) cannot move at all, so unlearning cannot change them:\n  "
            + "\n  ".join(stuck) + "\nLower the threshold, observe less data, or track the factors "
            "(both lora_A and lora_B) so that a zero B can start from A's null space",
            UserWarning,
            stacklevel=4,
        )


def _dense_slot(protection, param) -> str | None:
    """The dense slot of a factor tracked once on its input side, else None."""
    uses = protection.uses.get(param)
    if not uses or len(uses) != 1 or uses[0].side != "in":
        return None
    slot = protection.slot(uses[0].slot)
    return slot.name if slot.kind == "dense" else None


def _can_move(param, slot: str | None, bases: dict) -> bool:
    if not param.requires_grad:
        return False
    if slot is None:
        return True  # trainable and not projected as a dense factor: left to the coverage report
    basis = bases[slot]
    return basis.shape[1] < basis.shape[0]


def _restate_b_(store, a_slot: str, b_slot: str, A: torch.Tensor) -> None:
    """lora_B's input covariance per key, as it is with the new A: ``A C A^T``."""
    A = A.to(torch.float64)
    for key in store.keys:
        inputs, outputs = store.matrix(key, a_slot), store.matrix(key, b_slot)
        if inputs is not None and outputs is not None:
            A_here = A.to(inputs.device)
            outputs.copy_(A_here @ inputs.to(torch.float64) @ A_here.T)
