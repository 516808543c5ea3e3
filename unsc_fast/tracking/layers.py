"""Which modules the projector tracks, how tied parameters share their statistics, and what
the projection covers.

``find_layers`` picks an adapter for every weight-bearing module (``unsc_fast.adapters``).
``Protection`` is the resolved plan: the slots whose statistics are collected, and per
parameter the uses its projection composes (same side: one slot for all of them, the
summed covariance; opposite sides: both projections, which commute). ``coverage`` says for
every parameter of the model whether it is protected, frozen or trained unprotected.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

from torch import nn

from unsc_fast.adapters import ForwardOverridden, LayerAdapter, Slot, Use, adapter_for


def _check_supported(adapter: LayerAdapter) -> None:
    for use in adapter.uses():
        weight = use.param
        if isinstance(weight, nn.parameter.UninitializedParameter):
            raise ValueError(f"layer {adapter.name!r}: lazy module is not initialised yet; run one forward pass first")
        if not weight.is_floating_point():
            raise TypeError(f"layer {adapter.name!r}: weight dtype {weight.dtype} is not a floating type")
        if weight.device.type == "meta":
            raise NotImplementedError(
                f"layer {adapter.name!r}: weight is on the meta device; materialise the model (to_empty) first"
            )


def find_layers(model: nn.Module, names=None) -> dict[str, LayerAdapter]:
    """Adapters by ``named_modules()`` name: every module with one and a trainable weight, or
    exactly ``names`` (frozen or not).

    A frozen layer (no weight with ``requires_grad``) cannot change, so it needs no
    statistics: by default it is left out (``coverage()`` lists it as frozen), which is what
    makes a LoRA model cheap (its frozen base layers are not observed). A module inside a
    tracked module (attention's ``out_proj``) belongs to its parent's adapter. A module whose
    class overrides a known layer's ``forward`` is refused.
    """
    modules = dict(model.named_modules())
    if names is not None:
        if isinstance(names, str):
            names = [names]
        names = list(dict.fromkeys(names))
        if not names:
            raise ValueError("modules= is empty: name at least one layer to track")
        chosen = {}
        for name in names:
            if name not in modules:
                known = [n for n, m in modules.items() if _safe_adapter(n, m) is not None]
                raise ValueError(f"unknown module name {name!r}; layers with an adapter: {known}")
            adapter = adapter_for(name, modules[name])
            if adapter is None:
                raise TypeError(
                    f"module {name!r} is a {type(modules[name]).__name__}, which has no adapter; register one "
                    "with unsc_fast.adapters.register_adapter"
                )
            chosen[name] = adapter
    else:
        chosen, frozen = discover_layers(model)
        if not chosen:
            if frozen:
                raise ValueError(
                    f"{type(model).__name__}: every layer with an adapter is frozen (no weight requires grad: "
                    f"{list(frozen)[:8]}): nothing can change, so nothing needs protection. Unfreeze the "
                    "weights to unlearn with, or name layers with modules=[...] to track them anyway"
                )
            raise ValueError(f"{type(model).__name__} has no layer that an adapter tracks")
    for adapter in chosen.values():
        _check_supported(adapter)
    return chosen


def discover_layers(model: nn.Module, refuse_overridden: bool = True) -> tuple[dict, dict]:
    """``(trainable, frozen)``: the adapters of every weight-bearing module, split by whether
    any of its weights requires grad. Modules inside one with an adapter are its own. A
    subclass overriding a known layer's ``forward`` raises, or is skipped when not
    ``refuse_overridden`` (a report naming what is there)."""
    trainable, frozen, inside = {}, {}, set()
    for name, module in model.named_modules():
        if any(name.startswith(parent + ".") or parent == "" for parent in inside):
            continue
        adapter = adapter_for(name, module) if refuse_overridden else _safe_adapter(name, module)
        if adapter is None:
            continue
        if any(use.param.requires_grad for use in adapter.uses()):
            trainable[name] = adapter
        else:
            frozen[name] = adapter
        if any(True for _ in module.children()):
            inside.add(name)
    return trainable, frozen


def _safe_adapter(name, module):
    try:
        return adapter_for(name, module)
    except ForwardOverridden:
        return None


@dataclass
class Protection:
    """The projector's plan: slots to observe and, per parameter, the uses to project with."""

    slots: dict[str, Slot]
    alias: dict[str, str]  # an adapter's own slot name -> the slot it feeds (tied parameters)
    uses: dict[nn.Parameter, list[Use]] = field(default_factory=dict)

    @property
    def names(self) -> dict[nn.Parameter, str]:
        """Each protected parameter's name (its first use's)."""
        return {param: uses[0].name for param, uses in self.uses.items()}

    def slot(self, name: str) -> Slot:
        return self.slots[self.alias.get(name, name)]


def plan_protection(adapters: dict[str, LayerAdapter]) -> Protection:
    """Resolve tied parameters: a parameter used on the same side by several layers gets one
    slot (every layer's inputs add to it); on opposite sides, both projections apply."""
    slots: dict[str, Slot] = {}
    alias: dict[str, str] = {}
    owner: dict[str, str] = {}
    for adapter in adapters.values():
        for slot in adapter.slots():
            slots[slot.name] = slot
            owner[slot.name] = adapter.name
    uses: dict[nn.Parameter, list[Use]] = {}
    for adapter in adapters.values():
        for use in adapter.uses():
            previous = uses.setdefault(use.param, [])
            same_side = next((u for u in previous if u.side == use.side), None)
            if same_side is None:
                previous.append(use)
                continue
            mine, theirs = slots[_root(alias, use.slot)], slots[_root(alias, same_side.slot)]
            if (mine.kind, mine.dim, mine.groups) != (theirs.kind, theirs.dim, theirs.groups):
                raise NotImplementedError(
                    f"parameter {same_side.name!r} is shared by layers {owner[theirs.name]!r} and "
                    f"{owner[mine.name]!r} on the same side but with different input statistics "
                    f"({theirs.kind} d={theirs.dim} vs {mine.kind} d={mine.dim}); it cannot be protected "
                    "against both. Untie it, or track only one of them with modules=[...]"
                )
            if mine.name != theirs.name:
                alias[mine.name] = theirs.name  # both layers' rows add up in one slot
    for name in list(alias):
        alias[name] = _root(alias, name)
    for name in alias:
        slots.pop(name)
    return Protection(slots, alias, uses)


def _root(alias: dict[str, str], name: str) -> str:
    while name in alias:
        name = alias[name]
    return name


def slot_named(adapters: dict[str, LayerAdapter], protection: Protection, name: str) -> Slot:
    """A slot by layer name (the layer's first slot) or by slot name."""
    if name in adapters:
        name = adapters[name].slots()[0].name
    try:
        return protection.slot(name)
    except KeyError:
        raise KeyError(f"{name!r} is not a tracked layer; tracked: {list(adapters)}") from None


def slot_devices(protection: Protection) -> dict:
    """Each slot's device: that of the first parameter using it (its bases live there)."""
    devices = {}
    for param, uses in protection.uses.items():
        for use in uses:
            devices.setdefault(protection.slot(use.slot).name, param.device)
    return devices


@dataclass
class CoverageRow:
    name: str
    shape: tuple[int, ...]
    numel: int
    status: str  # "protected", "frozen", "unprotected"
    layers: tuple[str, ...] = ()  # tracked layers using it; for a frozen, untracked weight its frozen layer


@dataclass
class Coverage:
    """What the projection covers: every parameter of the model, once (tied ones once)."""

    rows: list[CoverageRow]
    frozen_layers: tuple[str, ...] = ()  # layers with an adapter left untracked: no trainable weight

    def share(self, status: str, weights_only: bool = True) -> float:
        """Fraction of the (trainable, if status != 'frozen') weight elements with ``status``."""
        pool = [r for r in self.rows if (not weights_only or len(r.shape) >= 2)]
        pool = [r for r in pool if r.status != "frozen"] if status != "frozen" else pool
        total = sum(r.numel for r in pool)
        return sum(r.numel for r in pool if r.status == status) / total if total else 1.0

    @property
    def unprotected_weights(self) -> list[CoverageRow]:
        """Trainable weight parameters (2-D or more) that no adapter protects."""
        return [r for r in self.rows if r.status == "unprotected" and len(r.shape) >= 2]

    def __str__(self) -> str:
        lines = [
            f"protected {self.share('protected'):.2%} of trainable weight elements; "
            f"{len(self.unprotected_weights)} trainable weight parameter(s) unprotected; "
            f"{len(self.frozen_layers)} frozen layer(s) not tracked (nothing of them can change)",
            "| parameter | shape | status | layers |",
            "|---|---|---|---|",
        ]
        lines += [f"| {r.name} | {tuple(r.shape)} | {r.status} | {', '.join(r.layers)} |" for r in self.rows]
        return "\n".join(lines)


def coverage(model: nn.Module, protection: Protection, adapters: dict[str, LayerAdapter]) -> Coverage:
    users: dict[nn.Parameter, list[str]] = {}
    for adapter in adapters.values():
        for use in adapter.uses():
            users.setdefault(use.param, []).append(adapter.name)
    frozen_layers = [name for name in discover_layers(model, refuse_overridden=False)[1] if name not in adapters]
    for name in frozen_layers:
        for use in adapter_for(name, model.get_submodule(name)).uses():
            users.setdefault(use.param, []).append(name)
    rows, seen = [], set()
    for name, param in model.named_parameters(remove_duplicate=True):
        if id(param) in seen:
            continue
        seen.add(id(param))
        if not param.requires_grad:
            status = "frozen"
        elif param in protection.uses:
            status = "protected"
        else:
            status = "unprotected"
        rows.append(CoverageRow(name, tuple(param.shape), param.numel(), status, tuple(users.get(param, ()))))
    return Coverage(rows, tuple(frozen_layers))


def warn_unprotected(report: Coverage, stacklevel: int = 4) -> None:
    missing = report.unprotected_weights
    if not missing:
        return
    total = sum(r.numel for r in report.rows if r.status != "frozen" and len(r.shape) >= 2)
    share = sum(r.numel for r in missing) / total if total else 0.0
    listed = ", ".join(f"{r.name} {tuple(r.shape)}" for r in missing[:12]) + (" ..." if len(missing) > 12 else "")
    warnings.warn(
        f"NullSpaceProjector: {len(missing)} trainable weight parameter(s), {share:.2%} of the trainable weight "
        f"elements, have no adapter and are not protected: {listed}. See projector.coverage(); "
        "strict=True refuses this; NullSpaceOptimizer freezes them by default (untracked='freeze')",
        UserWarning,
        stacklevel=stacklevel,
    )


