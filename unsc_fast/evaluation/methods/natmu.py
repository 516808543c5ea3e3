"""NatMU (He et al. 2024, "Towards Natural Machine Unlearning").

Relabelling a forget sample with a wrong class asks the model to believe something false.
NatMU backs the new label with real evidence: for each forget sample it takes the original
model's top-K classes other than the sample's own (K = 4 in the paper); for each of them
it draws a distinct remaining sample of that class and blends the two through a fixed mask,

    patch = remain * (1 - M) + forget * M,   labelled with the remaining sample's class,

then fine-tunes on the remaining data plus all patches (AdamW, cosine schedule, a few epochs).

The masks are the paper's four smooth ramps: a "tent" across the rows (0 at the top and
bottom edges, highest in the middle), the same across the columns, and the two inverted
tents; each is shifted by ``delta`` and clipped to [0, 1]. A negative ``delta`` lets more of
the remaining sample through. They are built for any height, width and channel count.
"""
from __future__ import annotations

import torch
from torch import nn

from unsc_fast.evaluation.methods.base import UnlearningMethod
from unsc_fast.evaluation.methods.training_loop import excluded_classes, fine_tune
from unsc_fast.training import predict_logits

# ``None`` = per scenario: the official full-class script (class-wise/scripts/full-class/natmu.sh:
# ``--delta=-0.053 -i --lr=0.00028 --opt=adamw --wd=0.0``) re-initialises every Linear layer and
# blends more weakly than the sample-wise runs, whose settings stay as they were.
PER_SCENARIO = {
    "full_class": dict(delta=-0.053, lr=2.8e-4, init_linear=True),
    "random_sample": dict(delta=-0.1, lr=1e-3, init_linear=False),
}
DEFAULTS = dict(top_k=4, delta=None, epochs=5, lr=None, weight_decay=0.0, batch_size=64, init_linear=None)


def tent(length: int) -> torch.Tensor:
    """min(i, length - 1 - i) / (length / 2): 0 at both ends, rising linearly to the middle.

    For length 32 this is j/16 over the first half and 15/16 - j/16 over the second, the
    ramp of the paper's CIFAR masks.
    """
    positions = torch.arange(length, dtype=torch.float32)
    return torch.minimum(positions, length - 1 - positions) / (length / 2)


def natmu_masks(channels: int, height: int, width: int, delta: float) -> torch.Tensor:
    """The four forget-sample masks M, shape (4, channels, height, width), values in [0, 1].

    Order: tent across rows, tent across columns, inverted tent across rows, inverted tent
    across columns; the remaining sample's masks are ``1 - M``.
    """
    rows, columns = tent(height), tent(width)
    patterns = [
        rows[:, None].expand(height, width),
        columns[None, :].expand(height, width),
        (rows.max() - rows)[:, None].expand(height, width),
        (columns.max() - columns)[None, :].expand(height, width),
    ]
    masks = torch.stack(patterns)[:, None].expand(4, channels, height, width)
    return (masks + delta).clamp(0.0, 1.0).contiguous()


def sample_masks(shape: tuple, delta: float) -> torch.Tensor:
    """NatMU's masks for images ``(C, H, W)``: the four tents; for 1-D signals ``(C, L)`` (MNIST-1D),
    the two tents along the signal (ours: the paper defines image masks only; the row tents of
    a signal would be constant)."""
    if len(shape) == 3:
        return natmu_masks(*shape, delta=delta)
    if len(shape) == 2:
        return natmu_masks(shape[0], 1, shape[1], delta)[[1, 3], :, 0]
    raise ValueError(f"NatMU needs images (C, H, W) or signals (C, L), got samples of shape {shape}")


def candidate_classes(model: nn.Module, x: torch.Tensor, y: torch.Tensor, k: int, unavailable) -> torch.Tensor:
    """(N, k) the original model's k most likely classes per sample, leaving out the sample's
    own class and every class in ``unavailable`` (forgotten, or with no remaining sample)."""
    logits = predict_logits(model, x).float().cpu()
    allowed = torch.ones_like(logits, dtype=torch.bool)
    allowed[torch.arange(len(y)), y.cpu()] = False
    allowed[:, list(unavailable)] = False
    available = int(allowed.sum(1).min())
    if available == 0:
        raise ValueError("NatMU needs at least one remaining class besides each forget sample's own")
    return logits.masked_fill(~allowed, float("-inf")).topk(min(k, available), dim=1).indices


class _ClassSampler:
    """Draws remaining samples of a class without replacement, reshuffling only when a class runs out."""

    def __init__(self, labels: torch.Tensor, generator: torch.Generator) -> None:
        self.generator = generator
        self.members = {int(c): torch.nonzero(labels == c).flatten() for c in labels.unique()}
        self.queues: dict[int, list[int]] = {}

    def draw(self, label: int) -> int:
        if not self.queues.get(label):
            members = self.members[label]
            self.queues[label] = members[torch.randperm(len(members), generator=self.generator)].tolist()
        return self.queues[label].pop()


def patched_samples(model: nn.Module, forget, remain, *, top_k: int = 4, delta: float = 0.0, excluded=(), seed: int = 0):
    """NatMU's training samples for the forget set: ``(patches, labels, remain_indices)``.

    Each forget sample yields min(top_k, usable classes) patches; patch j blends it with a
    remaining sample of its j-th candidate class through mask j (mod 4), and carries that
    remaining sample's label. ``remain_indices`` says which remaining sample each patch used.
    """
    x_forget, y_forget = forget
    x_remain, y_remain = remain
    present = {int(c) for c in y_remain.unique()}
    unavailable = set(excluded) | (set(range(int(predict_logits(model, x_forget[:1]).shape[1]))) - present)
    classes = candidate_classes(model, x_forget, y_forget, top_k, unavailable)
    masks = sample_masks(tuple(x_forget.shape[1:]), delta).to(x_forget.device, x_forget.dtype)
    sampler = _ClassSampler(y_remain.cpu(), torch.Generator().manual_seed(seed))
    indices = torch.tensor([[sampler.draw(int(c)) for c in row] for row in classes], dtype=torch.long)
    k = classes.shape[1]
    mask = masks[torch.arange(k) % len(masks)].unsqueeze(0)            # (1, k, C, H, W)
    forget_part = x_forget.unsqueeze(1) * mask                          # (N, k, C, H, W)
    remain_part = x_remain[indices.to(x_remain.device)] * (1.0 - mask)
    patches = (forget_part + remain_part).flatten(0, 1)
    return patches, y_remain[indices.to(y_remain.device)].flatten(), indices.flatten()


def init_linear(model: nn.Module) -> None:
    """The official ``--init_linear`` (``-i``): every ``nn.Linear`` weight redrawn Xavier-normal
    with ReLU gain, biases kept (``utils/unlearning_util.py::init_linear``). The class-wise
    runs use it: the head's knowledge of the forgotten class goes at once and the blended
    samples teach the head back from the (kept) features."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_normal_(module.weight, gain=nn.init.calculate_gain("relu"))


def resolved(settings: dict, kind: str) -> dict:
    """``settings`` with every ``None`` replaced by the scenario's official value (the sample-wise
    requests, sub-class and memorised, take the random-sample values)."""
    per_kind = PER_SCENARIO[kind if kind in PER_SCENARIO else "random_sample"]
    return {k: (per_kind[k] if v is None and k in per_kind else v) for k, v in settings.items()}


def run(model, scenario, settings, seed, progress):
    settings = resolved(settings, scenario.kind)
    patches, labels, _ = patched_samples(model, scenario.forget, scenario.remain, top_k=settings["top_k"],
                                         delta=settings["delta"], excluded=excluded_classes(scenario), seed=seed)
    if settings["init_linear"]:
        init_linear(model)
    x_remain, y_remain = scenario.remain
    fine_tune(model, torch.cat([x_remain, patches]), torch.cat([y_remain, labels]), epochs=settings["epochs"],
              lr=settings["lr"], optimizer="adamw", weight_decay=settings["weight_decay"],
              batch_size=settings["batch_size"], schedule="cosine", seed=seed, progress=progress, label="natmu")
    return {"patches": len(patches), "settings": settings}


METHOD = UnlearningMethod("natmu", "NatMU", run, DEFAULTS,
                          summary="forget samples blended with remaining samples of their top-K classes, relabelled")
