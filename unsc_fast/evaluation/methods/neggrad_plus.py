"""NegGrad+ (Kurmanji et al. 2023, "Towards Unbounded Machine Unlearning", the SCRUB paper,
where it is one of the baselines): gradient descent on the remaining data and ascent on the forget data at the
same time, weighted by ``alpha``:

    L = alpha * (CE(retain batch) + weight_decay / 2 * ||theta - theta_0||^2) - (1 - alpha) * CE(forget batch)

Plain gradient ascent (``gradient_ascent``) has nothing holding the remaining data in place;
the retain term is that anchor. As in the official code (meghdadk/SCRUB,
``small_scale_unlearning.ipynb``: ``negative_grad`` / ``run_neggrad_epoch``), one epoch walks
over the retain batches, each paired with the next forget batch (the forget loader cycles),
with plain SGD (no momentum, no weight decay in the optimizer; the l2 pull towards the
original weights theta_0 is in the loss) and the model in eval mode (batch-norm statistics
frozen). Defaults are the notebook's: alpha 0.95, 10 epochs, lr 0.01, retain batches of 32,
forget batches of 64, weight_decay 0.1.
"""
from __future__ import annotations

import copy
import itertools

import torch
import torch.nn.functional as F

from unsc_fast.evaluation.methods.base import UnlearningMethod
from unsc_fast.training import make_loader, model_device

DEFAULTS = dict(alpha=0.95, epochs=10, lr=0.01, retain_batch_size=32, forget_batch_size=64, weight_decay=0.1)


def neggrad_plus_loss(model, original, retain_batch, forget_batch, alpha: float, weight_decay: float) -> torch.Tensor:
    """The NegGrad+ objective of one (retain, forget) pair of batches (to be minimised)."""
    (x_retain, y_retain), (x_forget, y_forget) = retain_batch, forget_batch
    pull = sum((p - p0).pow(2).sum() for p, p0 in zip(model.parameters(), original.parameters()))
    retain = F.cross_entropy(model(x_retain), y_retain) + weight_decay / 2.0 * pull
    return alpha * retain - (1.0 - alpha) * F.cross_entropy(model(x_forget), y_forget)


def run(model, scenario, settings, seed, progress):
    if not 0.0 <= settings["alpha"] <= 1.0:
        raise ValueError(f"neggrad_plus alpha must be in [0, 1], got {settings['alpha']}")
    device = model_device(model)
    original = copy.deepcopy(model).requires_grad_(False)
    retain = make_loader(*scenario.remain, settings["retain_batch_size"], shuffle=True, seed=seed)
    forget = make_loader(*scenario.forget, settings["forget_batch_size"], shuffle=True, seed=seed + 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=settings["lr"])
    model.eval()  # the official loop runs in eval mode: batch-norm statistics stay the original's
    for epoch in range(settings["epochs"]):
        total = 0.0
        for retain_batch, forget_batch in zip(retain, itertools.cycle(forget)):
            retain_batch = [t.to(device) for t in retain_batch]
            forget_batch = [t.to(device) for t in forget_batch]
            loss = neggrad_plus_loss(model, original, retain_batch, forget_batch, settings["alpha"],
                                     settings["weight_decay"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item()
        if progress is not None:
            progress(f"neggrad+: epoch {epoch + 1}/{settings['epochs']}, loss {total / max(1, len(retain)):.4f}")


METHOD = UnlearningMethod("neggrad_plus", "NegGrad+", run, DEFAULTS,
                          summary="descent on the remaining data and ascent on the forget data, weighted by alpha")
