"""Fisher forgetting (Golatkar et al. 2020, "Eternal Sunshine of the Spotless Net: Selective
Forgetting in Deep Networks", CVPR): add Gaussian noise to the weights, most
where the *remaining* data does not constrain them, so that what only the forget data
pinned down is washed out.

The noise covariance is the inverse of the diagonal Fisher information of the remaining
data. As in the official code (AdityaGolatkar/SelectiveForgetting, ``Forgetting.ipynb``:
``hessian`` and ``get_mean_var``; the same code is in the SCRUB and SSD repositories):

* F = mean over remaining samples x of sum_c p(c | x) * (d CE(f(x), c) / d theta)^2
  (the model's own predictive distribution, one sample at a time; eval mode);
* var = alpha * clamp(1 / (F + 1e-8), max=1e3), clamped at 1e2 for the classifier head;
  for a weight with more than one dimension var is averaged over its input dimension
  (dim 1), i.e. one variance per output unit (and per kernel position for convolutions);
* class forgetting: the head's row (weight and bias) of every forgotten class is set to 0
  with variance 1e-4;
* the classifier head and every 1-d parameter (biases, batch-norm) get 10 x the variance;
* theta <- mu + sqrt(var) * N(0, 1), mu = the original weights (0 on the forgotten rows).

``alpha = 1e-6`` is the official value. Deviation: the official code spots the head by
``p.size(0) == num_classes``; here it is the last ``nn.Linear``'s weight and bias, so that a
layer which happens to have ``num_classes`` outputs is not mistaken for it. Per-sample
gradients come from ``torch.func`` (vmap), the same numbers as the official batch-size-1 loop.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from unsc_fast.evaluation.methods.base import UnlearningMethod
from unsc_fast.training import eval_mode, model_device

DEFAULTS = dict(alpha=1e-6, batch_size=64)


def fisher_diagonal(model: nn.Module, x: torch.Tensor, batch_size: int = 64) -> dict[str, torch.Tensor]:
    """{parameter name: E_x sum_c p(c|x) (grad_theta CE(f(x), c))^2}, per-sample gradients, eval mode."""
    from torch.func import functional_call, grad, vmap

    device = model_device(model)
    parameters = {name: p.detach() for name, p in model.named_parameters()}
    buffers = {name: b.detach() for name, b in model.named_buffers()}
    totals = {name: torch.zeros_like(p) for name, p in parameters.items()}

    def loss(params, sample, label):
        logits = functional_call(model, (params, buffers), (sample.unsqueeze(0),))
        return F.cross_entropy(logits, label.unsqueeze(0))

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))
    with eval_mode(model):
        for start in range(0, len(x), batch_size):
            inputs = x[start:start + batch_size].to(device)
            with torch.no_grad():
                probabilities = model(inputs).softmax(1)
            for label in range(probabilities.shape[1]):
                targets = torch.full((len(inputs),), label, dtype=torch.long, device=device)
                gradients = per_sample(parameters, inputs, targets)
                weight = probabilities[:, label]
                for name, g in gradients.items():
                    totals[name] += torch.einsum("n,n...->...", weight, g.pow(2))
    return {name: total / max(1, len(x)) for name, total in totals.items()}


def head_names(model: nn.Module) -> set[str]:
    """Names of the last ``nn.Linear``'s parameters (the classifier head)."""
    last = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last = name
    return {f"{last}.{p}" if last else p for p in ("weight", "bias")} if last is not None else set()


def noise_distribution(model: nn.Module, fisher: dict, alpha: float, forget_classes=()) -> dict:
    """{parameter name: (mean, variance)} of the official ``get_mean_var``."""
    head = head_names(model)
    result = {}
    for name, p in model.named_parameters():
        mu = p.detach().clone()
        var = (1.0 / (fisher[name] + 1e-8)).clamp(max=1e3)
        if name in head:
            var = var.clamp(max=1e2)
        var = alpha * var
        if p.ndim > 1:
            var = var.mean(dim=1, keepdim=True).expand_as(p).clone()
        if name in head and forget_classes:
            rows = list(forget_classes)
            mu[rows] = 0.0
            var[rows] = 1e-4
        if name in head or p.ndim == 1:
            var = var * 10
        result[name] = (mu, var)
    return result


def run(model, scenario, settings, seed, progress):
    x_remain, _ = scenario.remain
    fisher = fisher_diagonal(model, x_remain, settings["batch_size"])
    forget_classes = scenario.forget_classes if scenario.kind == "full_class" else ()
    distribution = noise_distribution(model, fisher, settings["alpha"], forget_classes)
    generator = torch.Generator(device=model_device(model)).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            mu, var = distribution[name]
            noise = torch.randn(p.shape, generator=generator, device=p.device, dtype=p.dtype)
            p.copy_(mu + var.sqrt() * noise)
    if progress is not None:
        progress("fisher: noise added")


METHOD = UnlearningMethod("fisher", "Fisher forgetting", run, DEFAULTS,
                          summary="Gaussian weight noise with the inverse Fisher of the remaining data as covariance")
