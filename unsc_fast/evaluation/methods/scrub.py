"""SCRUB (Kurmanji et al. 2023, "Towards Unbounded Machine Unlearning", NeurIPS).

The unlearned model is a student initialised from the original model (the teacher, frozen).
Training alternates two kinds of epochs:

* **max-steps** on the forget data: move the student *away* from the teacher,
  minimise ``-KL_T(teacher || student)`` (only during the first ``max_steps`` epochs);
* **min-steps** on the remaining data: stay close to the teacher and correct,
  minimise ``gamma * CE(student, y) + alpha * KL_T(teacher || student)``.

Each epoch is a max-epoch (while epoch <= max_steps) followed by a min-epoch, with one
optimiser, as ``small_scale_unlearning.ipynb`` and ``thirdparty/repdistiller/helper/loops.py
::train_distill`` of the official code (meghdadk/SCRUB). The learning rate is multiplied
by ``lr_decay_rate`` for every entry of ``lr_decay_epochs`` the epoch has passed
(``adjust_learning_rate`` there). The student is in train mode, the teacher in eval mode.

Defaults are that notebook's small-scale settings: Adam, lr 5e-4, weight decay 0.1,
gamma 1, alpha 0.5, temperature 2, 3 max-steps over 10 epochs, lr decay x0.1 after epochs
5, 8, 9, forget batches of 64 and retain batches of 32. (``beta``, the weight of an extra
feature-distillation loss, is 0 there with ``distill='kd'``, so it is left out.)
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from unsc_fast.evaluation.methods.base import UnlearningMethod
from unsc_fast.evaluation.methods.distillation import distillation_kl
from unsc_fast.training import make_loader, model_device

DEFAULTS = dict(epochs=10, max_steps=3, lr=5e-4, weight_decay=0.1, gamma=1.0, alpha=0.5, temperature=2.0,
                lr_decay_epochs=(5, 8, 9), lr_decay_rate=0.1, forget_batch_size=64, retain_batch_size=32)


def scrub_lr(epoch: int, settings: dict) -> float:
    """lr * rate^(number of decay epochs strictly below ``epoch``), epochs counted from 1."""
    passed = sum(epoch > boundary for boundary in settings["lr_decay_epochs"])
    return settings["lr"] * settings["lr_decay_rate"] ** passed


def scrub_epoch(student, teacher, loader, optimizer, settings: dict, maximize: bool) -> float:
    """One max- or min-epoch over ``loader``; returns the mean objective."""
    device = model_device(student)
    temperature = settings["temperature"]
    student.train()
    total, batches = 0.0, 0
    for inputs, targets in loader:
        inputs, targets = inputs.to(device), targets.to(device)
        logits = student(inputs)
        with torch.no_grad():
            teacher_probabilities = F.softmax(teacher(inputs) / temperature, dim=1)
        divergence = distillation_kl(logits, teacher_probabilities, temperature)
        if maximize:
            loss = -divergence
        else:
            loss = settings["gamma"] * F.cross_entropy(logits, targets) + settings["alpha"] * divergence
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total, batches = total + loss.item(), batches + 1
    return total / max(1, batches)


def run(model, scenario, settings, seed, progress):
    teacher = copy.deepcopy(model).eval().requires_grad_(False)
    forget = make_loader(*scenario.forget, settings["forget_batch_size"], shuffle=True, seed=seed)
    retain = make_loader(*scenario.remain, settings["retain_batch_size"], shuffle=True, seed=seed + 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=settings["lr"], weight_decay=settings["weight_decay"])
    history = []
    for epoch in range(1, settings["epochs"] + 1):
        for group in optimizer.param_groups:
            group["lr"] = scrub_lr(epoch, settings)
        max_loss = scrub_epoch(model, teacher, forget, optimizer, settings, True) if epoch <= settings["max_steps"] else None
        min_loss = scrub_epoch(model, teacher, retain, optimizer, settings, False)
        history.append({"max": max_loss, "min": min_loss})
        if progress is not None:
            progress(f"scrub: epoch {epoch}/{settings['epochs']}, max {max_loss}, min {min_loss:.4f}")
    model.eval()
    return {"history": history}


METHOD = UnlearningMethod("scrub", "SCRUB", run, DEFAULTS,
                          summary="student moves away from the original on the forget data and stays close on the rest")
