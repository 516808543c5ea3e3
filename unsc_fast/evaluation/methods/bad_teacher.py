"""Bad Teacher (Chundawat et al. 2023, "Can Bad Teaching Induce Forgetting? Unlearning in
Deep Networks Using an Incompetent Teacher", AAAI).

A student, initialised from the original model, is distilled from two teachers at once:
on remaining samples from the competent teacher (the original model), on forget samples
from an *incompetent* teacher (the same architecture with random weights), so that the
forget outputs become as uninformative as an untrained network's while the rest is kept:

    L = KL(t(x) || s(x)) at temperature T,  t = incompetent teacher if x is a forget sample,
                                             competent teacher otherwise.

Defaults are the official code's (vikram2000b/bad-teaching-unlearning ``unlearn.py::
blindspot_unlearner`` as called in its notebook and in if-loops/selective-synaptic-dampening
``forget_*_strategies.py::blindspot``): 1 epoch, Adam lr 1e-4, batches of 256, T = 1, and a
random 30 % of the remaining data mixed with all forget samples. Deviation: the official
loss is ``F.kl_div(..., reduction='mean')`` (divided by batch x classes); this divides by the
batch only, which with Adam changes nothing but the effective epsilon.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from unsc_fast.evaluation.methods.base import UnlearningMethod
from unsc_fast.evaluation.methods.distillation import distillation_kl
from unsc_fast.evaluation.methods.training_loop import reset_parameters
from unsc_fast.training import fit, make_loader, model_device

DEFAULTS = dict(epochs=1, lr=1e-4, batch_size=256, temperature=1.0, retain_fraction=0.3)


def incompetent_teacher(model, seed: int):
    """A randomly initialised copy of ``model``'s architecture (eval mode, frozen)."""
    torch.manual_seed(seed)
    return reset_parameters(copy.deepcopy(model)).eval().requires_grad_(False)


def teacher_targets(competent, incompetent, x: torch.Tensor, is_forget: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(t(x) / T) with t the incompetent teacher on forget rows, the competent one elsewhere."""
    with torch.no_grad():
        good = F.softmax(competent(x) / temperature, dim=1)
        bad = F.softmax(incompetent(x) / temperature, dim=1)
    forget = is_forget.to(good.dtype).unsqueeze(1)
    return forget * bad + (1.0 - forget) * good


def unlearning_set(scenario, retain_fraction: float, generator: torch.Generator):
    """All forget samples plus a random ``retain_fraction`` of the remaining ones, with a forget flag."""
    x_forget, _ = scenario.forget
    x_remain, _ = scenario.remain
    keep = torch.randperm(len(x_remain), generator=generator)[: int(retain_fraction * len(x_remain))]
    x = torch.cat([x_remain[keep.to(x_remain.device)], x_forget])
    flag = torch.cat([torch.zeros(len(keep), dtype=torch.long), torch.ones(len(x_forget), dtype=torch.long)])
    return x, flag


def run(model, scenario, settings, seed, progress):
    if not 0.0 <= settings["retain_fraction"] <= 1.0:
        raise ValueError(f"retain_fraction must be in [0, 1], got {settings['retain_fraction']}")
    device = model_device(model)
    competent = copy.deepcopy(model).eval().requires_grad_(False)
    incompetent = incompetent_teacher(model, seed + 12345)
    x, flag = unlearning_set(scenario, settings["retain_fraction"], torch.Generator().manual_seed(seed))
    temperature = settings["temperature"]
    # the teachers are frozen, so each sample's target is computed once, not once per epoch
    targets = torch.cat([teacher_targets(competent, incompetent, x[i:i + settings["batch_size"]].to(device),
                                         flag[i:i + settings["batch_size"]].to(device), temperature).cpu()
                         for i in range(0, len(x), settings["batch_size"])])
    loader = make_loader(x, targets, settings["batch_size"], shuffle=True, seed=seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=settings["lr"])
    fit(model, loader, optimizer, epochs=settings["epochs"], progress=progress, label="bad teacher",
        loss=lambda outputs, soft: distillation_kl(outputs, soft, temperature) / temperature**2)
    model.eval()
    return {"unlearning_samples": len(x)}


METHOD = UnlearningMethod("bad_teacher", "Bad Teacher", run, DEFAULTS,
                          summary="distil from the original on the remaining data and from a random network on the forget data")
