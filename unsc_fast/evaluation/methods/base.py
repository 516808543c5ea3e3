"""The one interface every unlearning method keeps.

A method is a function ``run(model, scenario, settings, seed, progress) -> dict | None`` that
unlearns ``model`` (a private copy of the original) in place and may return extra facts
(e.g. the labels it trained on). ``UnlearningMethod`` wraps it: it checks the scenario, merges
the user's settings over the method's defaults, copies the original, seeds and times the run.

A ``sequential`` scenario is run one request (``scenario.stages``) at a time, each on the
previous request's result; a method may hand something to the next request by returning it
under the key ``"carry"`` (UNSC: its per-label statistics), which the next stage finds as
``scenario.carry``. A method that trains from scratch (``from_scratch``: retrain) is run once,
on the final state.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field, replace
from typing import Callable

import torch
from torch import nn

from unsc_fast.evaluation.scenario import SCENARIOS, Scenario
from unsc_fast.training import Progress


class UnsupportedScenario(ValueError):
    """Raised instead of quietly running something else when a method cannot do a scenario."""


@dataclass
class MethodResult:
    """An unlearned model and how it was made."""

    method: str
    model: nn.Module
    seconds: float
    settings: dict
    info: dict = field(default_factory=dict)
    carry: object = None  # for the next request of a sequence (not reported)


@dataclass
class UnlearningMethod:
    """A named unlearning method: its function, default settings and the scenarios it can do."""

    name: str
    title: str
    run: Callable[..., dict | None]
    defaults: dict
    scenarios: tuple[str, ...] = SCENARIOS
    unsupported_reason: str = ""
    summary: str = ""
    from_scratch: bool = False  # trains a fresh model on the remaining data: a sequence is one run
    scenario_defaults: dict = field(default_factory=dict)  # scenario kind -> defaults that differ there

    def supports(self, scenario_kind: str) -> bool:
        """A sequence of requests is a series of full-class requests."""
        return ("full_class" if scenario_kind == "sequential" else scenario_kind) in self.scenarios

    def unsupported_message(self, scenario_kind: str) -> str:
        message = f"{self.name} cannot do {scenario_kind.replace('_', '-')} forgetting"
        return message + (f": {self.unsupported_reason}" if self.unsupported_reason else "")

    def settings(self, overrides: dict | None = None, scenario_kind: str | None = None) -> dict:
        """Defaults (those of ``scenario_defaults[scenario_kind]`` over the general ones) with
        ``overrides`` applied; an unknown name is an error, not a silent no-op."""
        overrides = dict(overrides or {})
        unknown = sorted(set(overrides) - set(self.defaults))
        if unknown:
            raise KeyError(f"{self.name} has no setting {', '.join(unknown)}; it has {', '.join(sorted(self.defaults))}")
        return {**self.defaults, **self.scenario_defaults.get(scenario_kind, {}), **overrides}

    def __call__(
        self,
        original: nn.Module,
        scenario: Scenario,
        settings: dict | None = None,
        seed: int = 0,
        progress: Progress | None = None,
    ) -> MethodResult:
        if not self.supports(scenario.kind):
            raise UnsupportedScenario(self.unsupported_message(scenario.kind))
        settings = self.settings(settings, scenario.kind)
        if scenario.kind == "sequential" and not self.from_scratch:
            return self._sequence(original, scenario, settings, seed, progress)
        model = copy.deepcopy(original)
        torch.manual_seed(seed)
        start = time.perf_counter()
        info = dict(self.run(model, scenario, settings, seed, progress) or {})
        carry = info.pop("carry", None)
        model.eval()
        return MethodResult(self.name, model, time.perf_counter() - start, settings, info, carry)

    def _sequence(self, original, scenario: Scenario, settings: dict, seed: int, progress) -> MethodResult:
        """Each request of ``scenario.stages`` applied to the previous one's result; the time is
        the sum, ``info["stages"]`` each request's classes, time and info."""
        model, carry, seconds, stages = original, None, 0.0, []
        for stage in scenario.stages:
            result = self(model, replace(stage, carry=carry), settings, seed, progress)
            model, carry, seconds = result.model, result.carry, seconds + result.seconds
            stages.append({"forget_classes": list(stage.new_classes), "seconds": result.seconds, **result.info})
        return MethodResult(self.name, model, seconds, settings, {"stages": stages})
