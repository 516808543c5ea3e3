"""NullSpaceOptimizer: any torch optimizer, with every tracked weight's change kept in the null space.

Projecting the gradient alone is exact only for plain SGD: momentum, weight decay and Adam's
per-element scaling all move the weight out of the null space again. So the wrapper
projects the gradient (which keeps the inner optimizer's state in the null space too), lets
the inner optimizer step, and then projects the *parameter change* itself:
``W <- W0 + P(W - W0)`` with ``P(D) = D - D U U^T``. The guarantee holds whatever the inner
optimizer does.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch.optim import Optimizer

from unsc_fast.projector import NullSpaceProjector

UNTRACKED_POLICIES = ("freeze", "train")


class NullSpaceOptimizer(Optimizer):
    """Wrap ``optimizer`` so that tracked weights only move in ``projector``'s null spaces.

    Args:
        optimizer: any ``torch.optim.Optimizer`` over the model's parameters.
        projector: a built ``NullSpaceProjector``.
        untracked: ``"freeze"`` (UNSC's choice: biases, norms and other untracked
            parameters do not move) or ``"train"``. A param group with ``project=False``
            is left entirely to the inner optimizer.
        project_gradients: also project the gradients before the inner step, so that
            momentum and Adam moments are built from null-space gradients.

    ``param_groups``, ``state`` and ``defaults`` are the inner optimizer's own objects
    (also after ``load_state_dict``), so LR schedulers and GradScaler work unchanged.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        projector: NullSpaceProjector,
        *,
        untracked: str = "freeze",
        project_gradients: bool = True,
    ) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if isinstance(optimizer, NullSpaceOptimizer):
            raise TypeError("optimizer is already a NullSpaceOptimizer")
        if isinstance(optimizer, torch.optim.LBFGS):
            raise ValueError(
                "LBFGS re-evaluates its closure inside step(); its line search cannot be confined "
                "to the null space. Use a first-order optimizer (SGD, Adam, AdamW, ...)"
            )
        if not isinstance(projector, NullSpaceProjector):
            raise TypeError(f"projector must be a NullSpaceProjector, got {type(projector).__name__}")
        if untracked not in UNTRACKED_POLICIES:
            raise ValueError(f"untracked must be one of {UNTRACKED_POLICIES}, got {untracked!r}")
        self.optimizer = optimizer
        self.projector = projector
        self.untracked = untracked
        self.project_gradients = bool(project_gradients)
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        self._patch_step_function()

    # The inner optimizer's containers, never copies: schedulers and load_state_dict stay in sync.
    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, groups):
        self.optimizer.param_groups = groups

    @property
    def state(self):
        return self.optimizer.state

    @state.setter
    def state(self, state):
        self.optimizer.state = state

    @property
    def defaults(self):
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, defaults):
        self.optimizer.defaults = defaults

    def step(self, closure=None):
        """One inner step whose change to every tracked weight lies in the null space.

        ``closure`` (re-computes the loss and gradients) is called once, before projecting.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._projected_step()
        return loss

    @torch.no_grad()
    def _projected_step(self) -> None:
        self.projector._require_built()
        tracked = self.projector.protection.names
        before: list[tuple[str, torch.Tensor, torch.Tensor]] = []
        held_back: list[tuple[torch.Tensor, torch.Tensor]] = []
        for group in self.param_groups:
            if not group.get("project", True):
                continue
            for param in group["params"]:
                if param.grad is None:
                    continue
                if param in tracked:
                    if not self.projector.protects(param):
                        continue  # nothing of the remaining data's to protect: plain step
                    if self.project_gradients:
                        self.projector.project_parameter_(tracked[param], param.grad)
                    before.append((tracked[param], param, param.detach().clone()))
                elif self.untracked == "freeze":
                    held_back.append((param, param.grad))
                    param.grad = None  # the inner optimizer skips params without a gradient
        try:
            self.optimizer.step()
        finally:
            for param, grad in held_back:
                param.grad = grad
        # W <- W0 + P(W - W0), computed in the parameter's own storage: the change W - W0
        # replaces W, is projected in place, and W0 is added back (the same values as with a
        # separate change tensor, without allocating one per parameter and step).
        for name, param, start in before:
            weight = param.detach()
            weight.sub_(start)
            try:
                self.projector.project_parameter_(name, weight)
            finally:
                weight.add_(start)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict) -> None:
        """New groups are projected like the others (``project=False`` opts a group out)."""
        self.optimizer.add_param_group(param_group)

    def state_dict(self) -> dict:
        for hook in self._optimizer_state_dict_pre_hooks.values():
            hook(self)
        state = self.optimizer.state_dict()
        state["null_space"] = {"untracked": self.untracked, "project_gradients": self.project_gradients}
        for hook in self._optimizer_state_dict_post_hooks.values():
            result = hook(self, state)
            if result is not None:
                state = result
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """Load the inner optimizer's state and the wrapper's options (``null_space``).

        The options are checked before the inner optimizer is touched, so a bad state
        changes nothing; a plain optimizer's state dict (no ``null_space``) keeps the
        wrapper's current options.
        """
        if not isinstance(state_dict, dict):
            raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        state_dict = dict(state_dict)
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        options = _check_options(state_dict.pop("null_space", None))
        self.optimizer.load_state_dict(state_dict)
        if options is not None:
            self.untracked, self.project_gradients = options
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    # Optimizer pickles only defaults/state/param_groups; the wrapper needs all of itself.
    def __getstate__(self) -> dict:
        return dict(self.__dict__)

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._patch_step_function()

    def __repr__(self) -> str:
        inner = "\n".join("    " + line for line in repr(self.optimizer).splitlines())
        return (
            f"NullSpaceOptimizer(untracked={self.untracked!r}, layers={len(self.projector.layers)},\n"
            f"{inner}\n)"
        )


def _check_options(options) -> tuple[str, bool] | None:
    """The saved ``null_space`` options, refused unless exactly what ``state_dict`` writes:
    a wrong ``untracked`` would silently let biases train (or freeze them), and a truthy
    string for ``project_gradients`` is not a decision anybody made."""
    if options is None:
        return None
    if not isinstance(options, dict):
        raise ValueError(f"optimizer state: null_space must be a dict, got {type(options).__name__}")
    expected = {"untracked", "project_gradients"}
    if set(options) != expected:
        raise ValueError(
            f"optimizer state: null_space must have the fields {sorted(expected)}, got {sorted(map(str, options))}"
        )
    if options["untracked"] not in UNTRACKED_POLICIES:
        raise ValueError(
            f"optimizer state: null_space.untracked must be one of {UNTRACKED_POLICIES}, "
            f"got {options['untracked']!r}"
        )
    if not isinstance(options["project_gradients"], bool):
        raise ValueError(
            f"optimizer state: null_space.project_gradients must be True or False, "
            f"got {options['project_gradients']!r}"
        )
    return options["untracked"], options["project_gradients"]
