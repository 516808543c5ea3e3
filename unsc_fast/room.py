"""Whether the null-space projection leaves any room to unlearn a request selectively.

A weight update ``dW`` confined to the null space of the remaining data's layer inputs (basis
``U``) changes a layer's output for input ``a`` by ``dW (I - U U^T) a``: only the part of
``a`` outside ``span(U)`` moves. Unlearning is selective when the forget samples have
clearly more of their energy outside the span than the remaining samples have:

    r_forget = 1 - trace(U^T C_f U) / trace(C_f),   r_remain = 1 - trace(U^T C_r U) / trace(C_r)

For a class-wise request the forgotten class reaches directions the other classes do not
(digits, threshold 0.99: ``r_forget / r_remain`` of 2.5 to 2.8 in the classifier layers).
For a sample-wise request the remaining samples of the same classes span the same inputs:
the ratio is ~1 in every layer (1.0 to 1.3 measured), so any update that moves the forget
samples moves the remaining ones as much, and UNSC at its step sizes changes nothing
(``compare --scenario random-sample``: forget accuracy and MIA stayed at 100 %).
``selectivity`` measures this before training; ``unlearn`` refuses below ``min_selectivity``.
The gradient's surviving fraction does *not* tell the two apart (about 0.2 % of its squared
norm survives in both cases on digits), which is why the input energies are used.
"""
from __future__ import annotations

import torch
from torch import nn


class NoRoomError(ValueError):
    """The forget samples look like remaining samples to every layer: unlearning would be a no-op."""


def selectivity(model: nn.Module, projector, forget, batch_size: int = 256) -> dict[str, float]:
    """Per dense slot of a built ``projector``: ``r_forget / r_remain`` (module docstring).

    ``forget``: the forget inputs as a tensor, or an iterable of batches (as ``unlearn``
    takes them). They are observed by a throw-away per-label projector on the same layers
    (the caller's statistics are not touched). ``r_remain`` comes from the kept groups'
    covariances when the projector holds them, else ``1 - threshold``.
    """
    from unsc_fast.projector.projector import NullSpaceProjector
    from unsc_fast.training import batch_parts, model_device

    # one group, per label, never built: no budget (the default would pick one total, keyed
    # "total", and price a solve the probe never runs)
    probe = NullSpaceProjector(model, modules=list(projector.layers), statistics="per_label", memory_budget=2**62)
    device = model_device(model)
    if isinstance(forget, torch.Tensor):
        forget = [forget[start:start + batch_size] for start in range(0, len(forget), batch_size)]

    def moved(value):
        return value.to(device) if isinstance(value, torch.Tensor) else value

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), probe.observe(group="probe"):
            for batch in forget:
                args, kwargs, _ = batch_parts(batch)
                model(*map(moved, args), **{k: moved(v) for k, v in kwargs.items()})
    finally:
        model.train(was_training)
    ratios = {}
    for name, slot in projector.protection.slots.items():
        if slot.kind != "dense" or probe.store.matrix("probe", name) is None:
            continue
        basis = projector.solution.bases[name].double()
        forget = probe.store.matrix("probe", name).double().to(basis.device)
        r_forget = _outside(forget, basis)
        try:
            remain = projector.covariance(name, keys=projector.built_from).double().to(basis.device)
            r_remain = _outside(remain, basis)
        except (RuntimeError, KeyError, ValueError):
            r_remain = 1.0 - float(projector.built_threshold)
        ratios[name] = r_forget / max(r_remain, 1e-12)
    return ratios


def _outside(covariance: torch.Tensor, basis: torch.Tensor) -> float:
    total = float(torch.trace(covariance))
    if total <= 0:
        return 0.0
    return max(0.0, 1.0 - float(torch.trace(basis.T @ covariance @ basis)) / total)
