"""The unlearning loop: steps on the forget data, checks on a schedule, stops when measured.

One loop for every objective (classifier calibration, gradient ascent, NPO, ...): each step
hands the objective a ``Step`` (``unsc_fast.objectives``); every ``check_every`` steps the
``Monitor`` measures the forget data and the guard, and ``stopping``'s rule decides to go on,
stop, back off (restore the last state that passed the guard, halve the learning rate, raise
the protection's floor) or lower the protection (``schedule``). BatchNorm statistics stay as
they are throughout (the remaining data's must not move).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import torch
from torch import nn

from unsc_fast.objectives.base import Step
from unsc_fast.objectives.causal_lm import token_labels
from unsc_fast.training import Progress, batch_parts, frozen_batchnorm, model_device, progress_bar, to_device
from unsc_fast.unlearning.schedule import ProtectionSchedule
from unsc_fast.unlearning.stopping import Check, Monitor, StopRule


@dataclass
class LoopResult:
    losses: list[float] = field(default_factory=list)  # mean loss per pass (an objective's ``extras["loss"]``, else its value)
    steps: int = 0
    epochs: float = 0.0
    reason: str = "budget"
    trajectory: list[Check] = field(default_factory=list)


class FeatureRecorder:
    """Records the inputs of one module (the classifier) at every forward, flattened to (N, d)."""

    def __init__(self, module: nn.Module) -> None:
        self.features: torch.Tensor | None = None
        self.handle = module.register_forward_hook(lambda _m, args, _out: self._keep(args[0]))

    def _keep(self, x: torch.Tensor) -> None:
        self.features = x.flatten(1)

    def remove(self) -> None:
        self.handle.remove()


def _batches_per_pass(batches) -> int | None:
    try:
        return len(batches)
    except TypeError:
        return None


def run(model: nn.Module, batches: Iterable, make_optimizer: Callable[[float], torch.optim.Optimizer], lr: float,
        objective, rule: StopRule, schedule: ProtectionSchedule, monitor: Monitor | None, *,
        reference: nn.Module | None = None, retain: Iterable | None = None, head: nn.Module | None = None,
        on_protection: Callable[[], None] | None = None, evaluate: Callable | None = None,
        progress: Progress | None = None, progress_bar_enabled: bool | None = None) -> LoopResult:
    """Unlearn in place (module docstring). ``make_optimizer(lr)`` builds a fresh (projected)
    optimizer, as after a back-off; ``head``: the module whose inputs are the features handed to
    ``objective`` as ``step.features`` when it ``needs_features``; ``on_protection()`` runs after
    the protection changed (the objective re-reads its basis); ``evaluate(model, check)``, if given,
    runs at every check and may return ``True`` to stop (a custom criterion: ``"callback"``)."""
    device = model_device(model)
    per_pass = _batches_per_pass(batches)
    every = rule.check_every or per_pass
    budget = rule.max_steps if rule.max_steps is not None else (rule.max_epochs * per_pass if per_pass else None)
    recorder = FeatureRecorder(head) if getattr(objective, "needs_features", False) and head is not None else None
    # an iterator (``data.endless``: a loader read again each pass) as it is; in-memory batches cycled
    retain_batches = None if retain is None else retain if isinstance(retain, Iterator) else itertools.cycle(retain)
    optimizer = make_optimizer(lr)
    result = LoopResult()
    saved = _snapshot(model)
    best, stalled, backoffs = float("inf"), 0, 0
    best_erased, erase_stalled, erasing = float("inf"), 0, 0
    damage_when_forgotten = None  # the guard's reading at the first check that found the data forgotten
    pass_total = pass_count = 0.0

    def check(event_if_continue: str = "") -> str | None:
        """Measure; return why the run stops, or None to go on."""
        nonlocal saved, best, stalled, backoffs, optimizer, lr, best_erased, erase_stalled, erasing
        nonlocal damage_when_forgotten
        forget = monitor.forget(model) if monitor is not None else None
        damage, significant = monitor.guard_damage(model, rule.tolerance) if monitor is not None else (None, False)
        erased = monitor.features(model) if monitor is not None and monitor.features is not None else None
        entry = Check(result.steps, result.steps / per_pass if per_pass else float(result.epochs), schedule.threshold,
                      lr, forget, damage, erased, event_if_continue,
                      monitor.unseen(model) if monitor is not None else None)
        result.trajectory.append(entry)
        if damage is not None and damage > rule.tolerance and significant:
            _restore(model, saved)
            backoffs += 1
            entry.event = "backoff"
            if backoffs > rule.max_backoffs:
                entry.event = "guard"
                return "guard"
            schedule.back_off()
            if on_protection is not None:
                on_protection()
            lr *= 0.5
            optimizer = make_optimizer(lr)
            best, stalled = float("inf"), 0
            damage_when_forgotten = None  # the restored state is read afresh at its next forgotten check
            return None
        before, saved = saved, _snapshot(model)
        if evaluate is not None and evaluate(model, entry):
            entry.event = "callback"
            return "callback"
        if forget is not None and forget <= rule.forget_target:
            # forgotten at the outputs; with feature erasure, go on at this protection (never lower
            # it for the features) until they are erased or their erasure stops progressing
            if erased is None or erased <= rule.feature_target:
                entry.event = "forgotten"
                return "forgotten"
            if damage_when_forgotten is None:
                damage_when_forgotten = damage
            elif rule.strict_erasure and damage is not None and damage > damage_when_forgotten:
                _restore(model, before)  # erasing is polish: it may not cost the remaining data a sample
                saved = before
                entry.event = "forgotten (erasure cost the guard)"
                return "forgotten"
            if erased < best_erased * (1.0 - rule.min_feature_progress):
                best_erased, erase_stalled = erased, 0
            else:
                erase_stalled += 1
            erasing += 1
            if erase_stalled >= rule.patience or (rule.max_erasure_checks is not None
                                                  and erasing > rule.max_erasure_checks):
                entry.event = "forgotten"
                return "forgotten"
            return None
        if forget is not None:
            if forget < best - rule.min_progress:
                best, stalled = forget, 0
            else:
                stalled += 1
            if stalled >= rule.patience and schedule.lower():
                entry.event = "lower protection"
                if on_protection is not None:
                    on_protection()
                optimizer = make_optimizer(lr)
                best, stalled = forget, 0
            elif stalled >= rule.patience and rule.stop_when_stalled:  # no level left to lower
                entry.event = "stalled"
                return "stalled"
        return None

    try:
        with frozen_batchnorm(model):
            bar = progress_bar(None, "unlearn", progress_bar_enabled, total=budget, unit="step")
            done = False
            while not done:
                seen = False
                for batch in batches:
                    seen = True
                    args, kwargs, targets = batch_parts(to_device(batch, device))
                    optimizer.zero_grad(set_to_none=True)
                    outputs = model(*args, **kwargs)
                    step = Step(model, args, kwargs, targets, outputs,
                                fraction_done=result.steps / budget if budget else 0.0,
                                features=recorder.features if recorder is not None else None,
                                reference_outputs=_reference(reference, args, kwargs),
                                retain_batch=_retain(model, retain_batches, device))
                    loss = objective(step)
                    loss.backward()
                    optimizer.step()
                    result.steps += 1
                    bar.update(1)
                    pass_total += float(step.extras.get("loss", loss).detach())
                    pass_count += 1
                    if every and result.steps % every == 0:
                        reason = check()
                        if reason is not None:
                            result.reason, done = reason, True
                            break
                    if budget is not None and result.steps >= budget:
                        result.reason, done = "budget", True
                        break
                if not seen:
                    raise ValueError("the forget set is empty")
                result.epochs += 1
                result.losses.append(pass_total / max(pass_count, 1.0))
                pass_total = pass_count = 0.0
                if not done and not every:  # a loader without a length: check once per pass
                    reason = check()
                    if reason is not None:
                        result.reason, done = reason, True
                if not done and budget is None and result.epochs >= rule.max_epochs:
                    result.reason, done = "budget", True
                if progress is not None and result.trajectory:
                    progress(_progress_line(result))
            bar.close()
    finally:
        if recorder is not None:
            recorder.remove()
    if per_pass:
        result.epochs = result.steps / per_pass
    return result


def _snapshot(model: nn.Module) -> dict:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def _restore(model: nn.Module, saved: dict) -> None:
    for name, p in model.named_parameters():
        if name in saved:
            p.copy_(saved[name])


def _reference(reference: nn.Module | None, args, kwargs):
    if reference is None:
        return None

    def outputs():
        with torch.no_grad():
            return reference(*args, **kwargs)
    return outputs


def _retain(model: nn.Module, batches, device):
    if batches is None:
        return None

    def next_batch():
        args, kwargs, targets = batch_parts(to_device(next(batches), device))
        if targets is None:  # a language model's tokens alone: scored on every real token
            targets = token_labels(args, kwargs, None)
        return model(*args, **kwargs), targets
    return next_batch


def _progress_line(result: LoopResult) -> str:
    """The last check, saying only what the run has: no threshold for an unprojected run, and the
    pass's mean loss instead of the forget data and guard where neither is measured (no stop rule)."""
    last = result.trajectory[-1]
    parts = [f"unlearn: step {result.steps}"]
    if last.threshold is not None:
        parts.append(f"threshold {last.threshold}")
    if last.forget is None and last.guard_damage is None:
        parts.append(f"loss {result.losses[-1]:.4f}")
    else:
        parts.append(f"forget {_points(last.forget)}, guard damage {_points(last.guard_damage)}")
    if last.event:
        parts.append(last.event)
    return ", ".join(parts)


def _points(value: float | None) -> str:
    """A share in points for the progress line: 7.69, not 7.6923076923076925 (None: not measured)."""
    return "not measured" if value is None else f"{value:.2f}"
