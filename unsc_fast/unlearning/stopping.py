"""When unlearning stops, and when it backs off: measured, not a fixed number of epochs.

A fixed epoch count either stops before a class is forgotten (MNIST-1D at 0.99: 20-80 % left
after 10 epochs) or goes on long after it is, paying in the remaining classes (digits CNN:
forgotten after 1-3 epochs at 0.97, 13 points of remaining accuracy lost after 10). So every
``check_every`` steps (default: every pass over the forget data) two things are measured:

* **forget**: the share of the forget data the model still knows, on the samples it trains
  on and on a held-out slice of them (``holdout``) that it never trains on: the larger of the two,
  so "forgotten" means the forgetting carried over to samples of the request it did not see.
  A classifier still knows a sample while its label is the most likely class *or* keeps at least
  ``confidence`` of the probability: stopping once the argmax is lost left more than 1 % of
  the class's unseen samples in 16 of 28 MNIST-1D validation requests, going on until the label
  is improbable in 9 (docs/fidelity.md, "How sure"). Reaching ``forget_target`` stops the run.
* **guard**: a held-out slice of the remaining data (``guard``), never observed and never trained
  on, compared sample by sample with the original model: ``damage`` is the share of it the
  original got right and the model now gets wrong, less the share it now gets right and the
  original did not, in points. A run backs off when the damage is *significantly* past
  ``tolerance``: the net loss, less the tolerance's worth of samples, exceeds twice the square
  root of the samples that changed (a one-sided McNemar-style test at ~2 sigma). On a guard of a
  few hundred samples a handful of borderline samples flip either way from noise alone (measured:
  4-5 net losses of 290 on MNIST-1D with no change on 720 validation samples), and backing off on
  those stopped every hard request far from forgotten. The slice is data the original trained
  on: where it over-fits, any change loses memorised samples and reads as damage, so held-out
  data passed as ``unlearn(guard=...)`` measures what matters (docs/fidelity.md, "The guard").
  ``tolerance`` is 1 point: at 0.5 the guard stopped MNIST-1D runs before the class was gone
  (validation: a third as much of it left at 1.0, no more Acc_r misses), and a guard of ~130
  digits samples cannot tell the two apart (docs/fidelity.md, "The guard's tolerance").

Backing off restores the last state that passed the guard, halves the learning rate and raises
the protection's floor (``schedule``); after ``max_backoffs`` the run stops there. Progress is
``min_progress`` points of forget accuracy; ``patience`` checks without it lower the protection
one level (at the floor, ``stop_when_stalled`` ends the run there). ``max_epochs`` / ``max_steps`` bound the run whatever happens; with feature erasure,
``max_erasure_checks`` bounds the checks spent erasing once the forget data is forgotten, and
``strict_erasure`` (opt-in) ends the erasure at the first guard sample it costs.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.distributed as dist

# The significance of a guard loss: net lost samples above this many standard deviations of
# the number of changed samples (a McNemar test at ~2 sigma).
GUARD_SIGMAS = 2.0


@dataclass(frozen=True)
class StopRule:
    """The stop rule's settings (module docstring). Shares and tolerances in percent points
    where they say "points", fractions of the data where they say "share"."""

    forget_target: float = 0.0  # points of the forget data still known at which unlearning stops
    # a classifier's forget sample is still known while its label is the argmax or keeps this much
    # probability (None: the argmax alone; language models: the argmax per token)
    confidence: float | None = 0.02
    holdout: float = 0.2  # share of a class-wise request's forget samples held out of training
    guard: float = 0.1  # share of the remaining samples held out as the guard
    tolerance: float = 1.0  # points of the guard the run may lose before it backs off
    patience: int = 2  # checks without progress before the protection is lowered
    min_progress: float = 2.0  # points of forget accuracy that count as progress
    max_backoffs: int = 3
    max_epochs: int = 50
    max_steps: int | None = None
    check_every: int | None = None  # steps between checks; None: once per pass over the forget data
    feature_target: float = 0.1  # with feature erasure: share of the forget features' outside energy left
    min_feature_progress: float = 0.05  # relative fall of that share that counts as progress
    max_erasure_checks: int | None = 5  # checks spent erasing features once forgotten (None: no cap; docs/fidelity.md)
    # end the erasure at the first guard sample it costs (more lost than when the class was forgotten),
    # returning the state of the check before (docs/fidelity.md, "A strict guard while erasing")
    strict_erasure: bool = False
    # stop ("stalled") when forgetting stalls with no protection level left to lower, instead of
    # spending the rest of the budget there (off by default; measured in docs/fidelity.md, "How sure")
    stop_when_stalled: bool = False

    def __post_init__(self) -> None:
        for name in ("holdout", "guard"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"StopRule.{name} is a share in [0, 1), got {getattr(self, name)}")
        for name in ("forget_target", "tolerance", "min_progress"):
            if getattr(self, name) < 0:
                raise ValueError(f"StopRule.{name} must be >= 0, got {getattr(self, name)}")
        if self.max_epochs < 1 or (self.max_steps is not None and self.max_steps < 1):
            raise ValueError("StopRule: max_epochs and max_steps must be at least 1")
        if self.patience < 1 or self.max_backoffs < 0:
            raise ValueError("StopRule: patience must be >= 1 and max_backoffs >= 0")
        if self.max_erasure_checks is not None and self.max_erasure_checks < 0:
            raise ValueError(f"StopRule.max_erasure_checks must be >= 0 or None, got {self.max_erasure_checks}")
        if self.confidence is not None and not 0.0 < self.confidence < 1.0:
            raise ValueError(f"StopRule.confidence is a probability in (0, 1) or None, got {self.confidence}")
        if self.check_every is not None and self.check_every < 1:
            raise ValueError(f"StopRule.check_every must be >= 1 or None, got {self.check_every}")


@dataclass
class Check:
    """One measurement of the run, as ``UnlearnResult.trajectory`` lists them."""

    step: int
    epoch: float
    threshold: float | None
    lr: float
    forget: float | None  # points of the forget data still right (None: not measured)
    guard_damage: float | None  # points of the guard lost against the original (None: no guard)
    features: float | None = None  # forget features' energy outside the protected subspace, share of the start
    event: str = ""  # "", "backoff", "lower protection", or why the run stopped
    unseen: float | None = None  # points still right of a given guard's forgotten-class samples (reported only)

    def as_dict(self) -> dict:
        return asdict(self)


Correct = Callable[[torch.nn.Module, tuple], torch.Tensor]  # (model, data) -> bool per unit (sample, token)


def _counts(flags: torch.Tensor) -> torch.Tensor:
    return torch.tensor([float(flags.sum()), float(flags.numel())], dtype=torch.float64)


def _reduced(values: torch.Tensor) -> torch.Tensor:
    """Summed over the processes of an initialised process group (every rank then decides alike)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else values.device
        moved = values.to(device)
        dist.all_reduce(moved)
        return moved.to(values.device)
    return values


class Monitor:
    """Measures a model against the forget data and the guard (module docstring)."""

    def __init__(self, correct: Correct, forget_sets: list, guard, original: torch.nn.Module | None,
                 features: Callable[[torch.nn.Module], float] | None = None, unseen=None,
                 forget_correct: Correct | None = None) -> None:
        self.correct, self.forget_sets, self.guard = correct, [s for s in forget_sets if s is not None], guard
        # what counts as still known on the forget data, where it is narrower than the guard's measure
        # (a language model's forget score leaves out its special tokens: language.special_token_ids)
        self.forget_correct = forget_correct or correct
        self.guard_before = correct(original, guard) if guard is not None else None
        self.features = features  # model -> share of the forget features' outside energy left (erasure)
        # samples of the forgotten classes the original never trained on (a given guard's): reported,
        # not a stop condition (requiring 0 % there cost remaining accuracy: docs/fidelity.md)
        self.unseen_set = unseen

    def _points(self, model, data, correct: Correct | None = None) -> float | None:
        right, total = _reduced(_counts((correct or self.correct)(model, data))).tolist()
        return 100.0 * right / total if total > 0 else None

    def forget(self, model) -> float | None:
        """Points of the forget data still right: the largest over the trained and held-out parts."""
        scores = [score for score in (self._points(model, data, self.forget_correct) for data in self.forget_sets)
                  if score is not None]
        return max(scores) if scores else None

    def unseen(self, model) -> float | None:
        """Points still right of the forgotten classes' unseen samples (None: none given)."""
        return self._points(model, self.unseen_set) if self.unseen_set is not None else None

    def guard_damage(self, model, tolerance: float = 0.0) -> tuple[float | None, bool]:
        """``(points lost, significantly more than tolerance)`` on the guard against the original model."""
        if self.guard is None:
            return None, False
        now = self.correct(model, self.guard)
        before = self.guard_before.to(now.device)
        lost, won, total = _reduced(torch.tensor([float((before & ~now).sum()), float((~before & now).sum()),
                                                  float(now.numel())], dtype=torch.float64)).tolist()
        damage = 100.0 * (lost - won) / max(total, 1.0)
        allowed = tolerance / 100.0 * total
        return damage, (lost - won - allowed) > GUARD_SIGMAS * (lost + won) ** 0.5
