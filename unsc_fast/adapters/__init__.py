"""Layer adapters: one per kind of weight-bearing module, and the registry that picks them.

    from unsc_fast.adapters import LayerAdapter, register_adapter
    register_adapter(MyLayer, MyLayerAdapter)   # then NullSpaceProjector tracks MyLayer

An adapter is looked up by the module's exact class first, then along its base classes. A
subclass that overrides ``forward`` (timm's ``Conv2dSame`` pads inside ``forward``) does not
inherit its base's adapter: its inputs are not what the base's geometry assumes, so it is
refused with a clear error until an adapter is registered for it.
"""
from __future__ import annotations

from typing import Callable

from torch import nn

from unsc_fast.adapters.attention import MultiheadAttentionAdapter
from unsc_fast.adapters.base import LayerAdapter, Slot, Use
from unsc_fast.adapters.conv import ConvAdapter
from unsc_fast.adapters.embedding import EmbeddingAdapter
from unsc_fast.adapters.linear import LinearAdapter, TransformersConv1DAdapter, is_transformers_conv1d
from unsc_fast.adapters.recurrent import RecurrentAdapter, RecurrentInputAdapter

AdapterFactory = Callable[[str, nn.Module], LayerAdapter]

_REGISTRY: dict[type, AdapterFactory] = {
    nn.Linear: LinearAdapter,
    nn.Conv1d: ConvAdapter,
    nn.Conv2d: ConvAdapter,
    nn.Conv3d: ConvAdapter,
    nn.Embedding: EmbeddingAdapter,
    nn.EmbeddingBag: EmbeddingAdapter,
    nn.MultiheadAttention: MultiheadAttentionAdapter,
    nn.RNN: RecurrentAdapter,
    nn.LSTM: RecurrentAdapter,
    nn.GRU: RecurrentAdapter,
}


def register_adapter(module_class: type, factory: AdapterFactory) -> None:
    """Track every module of ``module_class`` (and its subclasses that keep its ``forward``)
    with ``factory(name, module)``, a ``LayerAdapter``. Replaces a previous registration."""
    if not isinstance(module_class, type) or not issubclass(module_class, nn.Module):
        raise TypeError(f"register_adapter: module_class must be an nn.Module subclass, got {module_class!r}")
    if not callable(factory):
        raise TypeError(f"register_adapter: factory must be callable, got {factory!r}")
    _REGISTRY[module_class] = factory


class ForwardOverridden(NotImplementedError):
    """A known layer type whose subclass computes something else in ``forward``."""


def adapter_for(name: str, module: nn.Module) -> LayerAdapter | None:
    """The adapter tracking ``module``, None for a module without one (containers, norms,
    unknown types), or ``ForwardOverridden`` for a subclass that changed ``forward``."""
    cls = type(module)
    if cls in _REGISTRY:
        return _REGISTRY[cls](name, module)
    if is_transformers_conv1d(module):
        return TransformersConv1DAdapter(name, module)
    for base in cls.__mro__[1:]:
        if base in _REGISTRY:
            if cls.forward is not base.forward:
                raise ForwardOverridden(
                    f"layer {name!r} is a {cls.__name__}, a {base.__name__} whose forward() is overridden "
                    f"(e.g. padding inside forward, as timm's Conv2dSame): its inputs are not what "
                    f"{base.__name__}'s geometry assumes, so it cannot be tracked as one. Register an adapter "
                    "with unsc_fast.adapters.register_adapter, or leave it out with modules=[...]"
                )
            return _REGISTRY[base](name, module)
    return None


__all__ = [
    "LayerAdapter", "Slot", "Use", "register_adapter", "adapter_for", "ForwardOverridden",
    "LinearAdapter", "TransformersConv1DAdapter", "ConvAdapter", "EmbeddingAdapter",
    "MultiheadAttentionAdapter", "RecurrentAdapter", "RecurrentInputAdapter",
]
