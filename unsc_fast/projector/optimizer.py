"""NullSpaceOptimizer: any torch optimizer, with every tracked weight's change kept in the null space.

The guarantee is about the parameter change, so projecting it, ``W <- W0 + P(W - W0)`` with
``P(D) = D - D U U^T``, is exact whatever the inner optimizer does (weight decay, momentum and
Adam's per-element scaling all move a weight out of the null space even from a projected
gradient). Where the inner step is linear in the gradients (plain SGD without weight decay),
projecting the gradients instead is just as exact and the change needs no second projection.
``project_gradients="auto"`` (the default) runs that one projection per weight and step,
chosen per param group (``projection_plan``); ``True`` projects both, so that Adam's moments
are built from null-space gradients, then the change.
"""
from __future__ import annotations

import weakref
from collections import OrderedDict

import torch
from torch.optim import Optimizer

from unsc_fast.projection.plan import check_mode, projections
from unsc_fast.projector.projector import NullSpaceProjector

UNTRACKED_POLICIES = ("freeze", "train")


class NullSpaceOptimizer(Optimizer):
    """Wrap ``optimizer`` so that tracked weights only move in ``projector``'s null spaces.

    Args:
        optimizer: any ``torch.optim.Optimizer`` over the model's parameters.
        projector: a built ``NullSpaceProjector``.
        untracked: ``"freeze"`` (UNSC's choice: biases, norms and other untracked
            parameters do not move) or ``"train"``. A param group with ``project=False``
            is left entirely to the inner optimizer.
        project_gradients: ``"auto"`` (default): one projection per weight and step, chosen
            per param group at every step: the gradient alone where the inner optimizer is
            ``torch.optim.SGD`` with ``weight_decay=0`` (its steps are linear combinations of
            the projected gradients: exact), else the change alone (exact for any optimizer).
            ``True``: the gradient and then the change (momentum and Adam moments built from
            null-space gradients). ``False``: the change alone.

    In gradient-only groups, a momentum buffer not built there from projected gradients under
    the current bases (after a ``build()``, a loaded state, or a step that projected the change)
    is projected once before the step: the steps that follow equal those of projecting every
    change, since ``P`` is linear. Which buffers are known clean travels in ``state_dict``
    (``null_space.clean_momentum``, tied to a fingerprint of the bases) and through pickling,
    so a resumed run skips exactly the projections the original skips: resume is bitwise.

    ``param_groups``, ``state`` and ``defaults`` are the inner optimizer's own objects
    (also after ``load_state_dict``), so LR schedulers and GradScaler work unchanged.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        projector: NullSpaceProjector,
        *,
        untracked: str = "freeze",
        project_gradients: bool | str = "auto",
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
        self.project_gradients = check_mode(project_gradients)
        self._reset_clean_buffers()
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
        self.projector.solution.require_built()
        self._forget_clean_buffers_after_a_build()
        self._adopt_loaded_clean_buffers()
        tracked = self.projector.protection.names
        before: list[tuple[str, torch.Tensor, torch.Tensor]] = []
        gradient_only: list[tuple[str, torch.Tensor]] = []
        held_back: list[tuple[torch.Tensor, torch.Tensor]] = []
        for group in self.param_groups:
            if not group.get("project", True):
                continue
            project_gradient, project_change = projections(self.project_gradients, self.optimizer, group)
            for param in group["params"]:
                if param.grad is None:
                    continue
                if param in tracked:
                    if not self.projector.protects(param):
                        continue  # nothing of the remaining data's to protect: plain step
                    if project_gradient:
                        self.projector.project_parameter_(tracked[param], param.grad)
                    if project_change:
                        before.append((tracked[param], param, param.detach().clone()))
                    else:
                        self._project_momentum_unless_clean(tracked[param], param)
                        gradient_only.append((tracked[param], param))
                elif self.untracked == "freeze":
                    held_back.append((param, param.grad))
                    param.grad = None  # the inner optimizer skips params without a gradient
        try:
            self.optimizer.step()
        finally:
            for param, grad in held_back:
                param.grad = grad
            self._mark_clean_buffers(gradient_only)
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

    def _project_momentum_unless_clean(self, name: str, param: torch.Tensor) -> None:
        """Project SGD's momentum buffer unless it was built from projected gradients alone."""
        buffer = self.optimizer.state.get(param, {}).get("momentum_buffer")
        mark = self._clean_buffers.get(name)
        if buffer is not None and (mark is None or mark[1]() is not buffer):
            self.projector.project_parameter_(name, buffer)

    def _mark_clean_buffers(self, gradient_only: list) -> None:
        """After a step: the buffers of ``gradient_only`` are clean, those of parameters that
        stepped otherwise (e.g. with weight decay) are not, the rest did not change."""
        clean = {name: mark for name, mark in self._clean_buffers.items() if mark[0].grad is None}
        for name, param in gradient_only:
            buffer = self.optimizer.state.get(param, {}).get("momentum_buffer")
            if buffer is not None:
                clean[name] = (param, weakref.ref(buffer))
        self._clean_buffers = clean

    def _bases_changed(self) -> bool:
        bases = list(self.projector.solution.bases.values())
        return len(bases) != len(self._bases_seen) or any(ref() is not b for ref, b in zip(self._bases_seen, bases))

    def _forget_clean_buffers_after_a_build(self) -> None:
        """A new build (or a loaded projector) has new bases: no buffer is known clean there."""
        if self._bases_changed():
            self._clean_buffers.clear()
            self._bases_seen = [weakref.ref(basis) for basis in self.projector.solution.bases.values()]

    def _adopt_loaded_clean_buffers(self) -> None:
        """Marks from a loaded state (or an unpickled wrapper) hold for the buffers now in the
        state where the bases are still those they were saved under (same fingerprint)."""
        loaded, self._loaded_clean = self._loaded_clean, None
        if loaded is None or loaded["bases"] != self.projector.solution.fingerprint():
            return
        params = {name: param for param, name in self.projector.protection.names.items()}
        for name in loaded["layers"]:
            buffer = self.optimizer.state.get(params.get(name), {}).get("momentum_buffer")
            if buffer is not None:
                self._clean_buffers[name] = (params[name], weakref.ref(buffer))

    def _clean_momentum(self) -> dict | None:
        """The marks as plain values (``null_space.clean_momentum``): the names of the tracked
        weights whose momentum buffer is clean and the fingerprint of the bases it is clean under."""
        if self._loaded_clean is not None:
            return self._loaded_clean
        if not self._clean_buffers or self._bases_changed():
            return None
        names = sorted(name for name, (param, ref) in self._clean_buffers.items()
                       if ref() is not None and ref() is self.optimizer.state.get(param, {}).get("momentum_buffer"))
        return {"layers": names, "bases": self.projector.solution.fingerprint()} if names else None

    def _reset_clean_buffers(self, loaded: dict | None = None) -> None:
        """Which momentum buffers are known to be projected (name: (parameter, weak reference
        to its buffer); by name, as Dynamo mixes up dicts keyed by tensors) under which bases
        (weak references to them); ``loaded``: marks read from a state, adopted at the next step."""
        self._clean_buffers: dict = {}
        self._bases_seen: list = []
        self._loaded_clean: dict | None = loaded

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
        clean = self._clean_momentum()
        if clean is not None:
            state["null_space"]["clean_momentum"] = {"layers": list(clean["layers"]), "bases": clean["bases"]}
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
        self._reset_clean_buffers(None if options is None else options[2])
        if options is not None:
            self.untracked, self.project_gradients = options[:2]
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    # Optimizer pickles only defaults/state/param_groups; the wrapper needs all of itself.
    # The marks of clean buffers are about live objects: they travel as plain values.
    def __getstate__(self) -> dict:
        state = {k: v for k, v in self.__dict__.items() if k not in ("_clean_buffers", "_bases_seen", "_loaded_clean")}
        state["_loaded_clean"] = self._clean_momentum()
        return state

    def __setstate__(self, state: dict) -> None:
        loaded = state.pop("_loaded_clean", None)
        self.__dict__.update(state)
        self._reset_clean_buffers(loaded)
        self._patch_step_function()

    def __repr__(self) -> str:
        inner = "\n".join("    " + line for line in repr(self.optimizer).splitlines())
        return (
            f"NullSpaceOptimizer(untracked={self.untracked!r}, layers={len(self.projector.layers)},\n"
            f"{inner}\n)"
        )


def _check_options(options) -> tuple[str, bool | str, dict | None] | None:
    """The saved ``null_space`` options, refused unless exactly what ``state_dict`` writes
    (``project_gradients`` True, False or "auto"; states saved before "auto" hold a bool;
    ``clean_momentum`` where buffers are known clean): a wrong ``untracked`` would silently
    let biases train (or freeze them), and a truthy string for ``project_gradients`` is not a
    decision anybody made."""
    if options is None:
        return None
    if not isinstance(options, dict):
        raise ValueError(f"optimizer state: null_space must be a dict, got {type(options).__name__}")
    expected = {"untracked", "project_gradients"}
    if not expected <= set(options) <= expected | {"clean_momentum"}:
        raise ValueError(
            f"optimizer state: null_space must have the fields {sorted(expected)} (and optionally "
            f"clean_momentum), got {sorted(map(str, options))}"
        )
    clean = options.get("clean_momentum")
    if clean is not None and not (
        isinstance(clean, dict) and set(clean) == {"layers", "bases"} and isinstance(clean["bases"], str)
        and isinstance(clean["layers"], list) and all(isinstance(name, str) for name in clean["layers"])
    ):
        raise ValueError("optimizer state: null_space.clean_momentum must be {'layers': [names], 'bases': str}, "
                         f"got {clean!r}")
    if options["untracked"] not in UNTRACKED_POLICIES:
        raise ValueError(
            f"optimizer state: null_space.untracked must be one of {UNTRACKED_POLICIES}, "
            f"got {options['untracked']!r}"
        )
    mode = check_mode(options["project_gradients"], where="optimizer state: null_space.project_gradients")
    return options["untracked"], mode, clean
