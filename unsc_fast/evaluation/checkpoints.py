"""Loading the original model of a comparison from a file: weights only by default; a whole
pickled module (which runs the code the file names) only with an explicit opt-in."""
from __future__ import annotations

import pickle

import torch
from torch import nn

from unsc_fast.evaluation.data import DatasetSplit
from unsc_fast.evaluation.models import create_model


class UntrustedCheckpointError(ValueError):
    """A checkpoint that only the full pickle unpickler can read, loaded without ``trust_pickle``.

    Unpickling arbitrary objects runs whatever code the file names (``__reduce__``), so such
    a file is refused by default: a state dict never needs it.
    """


def load_checkpoint(path: str, model_name: str, split: DatasetSplit, *, trust_pickle: bool = False) -> nn.Module:
    """A state_dict (bare or under "state_dict") for ``model_name``; a whole pickled
    ``nn.Module`` only with ``trust_pickle=True``.

    Tensors and plain containers load with ``weights_only=True``, which cannot run code.
    Anything else (a pickled module, or any object in the file) needs the full unpickler,
    which executes what the file tells it to; that is the caller's explicit decision,
    never a silent fallback.
    """
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if not trust_pickle:
            raise UntrustedCheckpointError(_untrusted_message(path, error)) from error
        saved = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(saved, nn.Module):
        return saved.eval()
    if isinstance(saved, dict):
        model = create_model(model_name, split.num_classes, split.image_shape)
        model.load_state_dict(saved.get("state_dict", saved))
        return model.eval()
    raise TypeError(f"{path} holds a {type(saved).__name__}, not a model or a state_dict")


def _untrusted_message(path: str, error: Exception) -> str:
    """What was refused, why, and the two ways forward (re-save as a state dict, or opt in)."""
    return (f"refused to load checkpoint {path}: it holds Python objects, not only tensors "
            f"({_unpickler_reason(error)}). Unpickling them could run arbitrary code. Save the model as "
            f"torch.save(model.state_dict(), FILE) and pass that file, or, only if you trust "
            f"where {path} came from, pass --trust-checkpoint (load_checkpoint(..., trust_pickle=True)).")


def _unpickler_reason(error: Exception) -> str:
    """The one line of torch's long weights-only message that names the refused object."""
    for line in str(error).splitlines():
        if "WeightsUnpickler error:" in line:
            return line.split("WeightsUnpickler error:", 1)[1].split(". Please use")[0].strip()
    return type(error).__name__
