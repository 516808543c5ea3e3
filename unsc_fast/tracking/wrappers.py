"""The wrappers around a model that the projector sees through: DataParallel / DDP and
``torch.compile`` (the user's module inside), FSDP2 (sharded modules, ``DTensor`` weights
sharded along dim 0), and the flat-parameter wrappers it refuses (FSDP1, DeepSpeed).

They concern the model, not the build: a single-process run meets DataParallel and
``torch.compile`` too. ``torch.distributed`` submodules are never imported here (they cost
seconds); a model can only hold their objects if something else already imported them.
"""
from __future__ import annotations

import sys
import warnings
from typing import Iterable

import torch
from torch import nn

WRAPPER_PREFIX = "module."


def _loaded(module_name: str):
    """A torch.distributed submodule if something already imported it, else None: a model
    cannot hold its objects otherwise, and importing it would cost every user seconds."""
    return sys.modules.get(module_name)


def check_model(model) -> None:
    """Refuse wrappers whose parameters are flattened: their weights are not (out, d) matrices."""
    fsdp = _loaded("torch.distributed.fsdp")  # never imported here: it costs seconds
    flat = [] if fsdp is None else [
        type(m).__name__ for m in model.modules() if isinstance(m, fsdp.FullyShardedDataParallel)
    ]
    if type(model).__name__ == "DeepSpeedEngine":
        flat.append("DeepSpeedEngine")
    if flat:
        raise NotImplementedError(
            f"{flat[0]} flattens parameters into 1-D buffers, which cannot be projected row by row. "
            "Shard with FSDP2 (torch.distributed.fsdp.fully_shard) instead, or build the projector "
            "on the unwrapped model"
        )


def unprefixed_names(names, inner_names: Iterable[str]):
    """Module names as the user knows them: a DDP/DataParallel ``module.`` prefix is dropped
    (unless the prefixed name itself exists inside the wrapped model)."""
    if names is None:
        return None
    if isinstance(names, str):
        names = [names]
    inner = set(inner_names)
    return [n if n in inner or not n.startswith(WRAPPER_PREFIX) else n[len(WRAPPER_PREFIX):] for n in names]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's model inside a DataParallel/DDP wrapper or a ``torch.compile`` module."""
    wrappers = (nn.DataParallel, nn.parallel.DistributedDataParallel)
    if isinstance(model, wrappers):
        return model.module
    original = getattr(model, "_orig_mod", None)
    if isinstance(original, nn.Module):  # torch.compile's OptimizedModule
        warnings.warn(
            "the model is compiled: hooks added after compilation do not fire in the compiled "
            "graph (pytorch#117758), so run the original module (model._orig_mod) inside "
            "observe(), or create the projector before compiling",
            UserWarning,
            stacklevel=3,
        )
        return original
    return model


def reshard(model) -> None:
    """Put every FSDP2 module of ``model`` back into its sharded state (local, no communication).

    After a forward without backward (as in ``observe()``) FSDP2 leaves the root module's
    weights gathered and registered as plain unsharded parameters; an optimizer created then
    would hold those instead of the sharded ones, and the wrapper would not find them.
    """
    fsdp = _loaded("torch.distributed.fsdp")
    if fsdp is None:  # nothing can be sharded by a module nobody imported
        return
    for module in model.modules():
        if isinstance(module, fsdp.FSDPModule):
            module.reshard()


def local_rows(tensor: torch.Tensor, name: str) -> torch.Tensor:
    """The rows of a weight-shaped tensor this process holds: itself, or a DTensor's local
    shard (a view sharing its storage) when it is sharded along dim 0 or replicated."""
    dtensor = _loaded("torch.distributed.tensor")
    if dtensor is None or not isinstance(tensor, dtensor.DTensor):
        return tensor
    for placement in tensor.placements:
        if isinstance(placement, dtensor.Replicate) or (isinstance(placement, dtensor.Shard) and placement.dim == 0):
            continue
        raise NotImplementedError(
            f"layer {name!r}: DTensor placement {placement!r} is not supported; the null-space "
            "projection acts on output rows, so weights must be sharded along dim 0 (FSDP2's "
            "default Shard(0)) or replicated, and gradients reduced (no Partial)"
        )
    return tensor.to_local()
