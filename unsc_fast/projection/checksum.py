"""A checksum over the whole content of a saved projector state, verified before anything loads.

``torch.save`` files carry no check of their content: a flipped bit inside a tensor's bytes
loads silently and changes a statistic or a basis (58 of 58 single-bit flips in a saved
per-label state did). So ``state_dict()`` seals its state with a sha256 over every field and
every tensor, in a canonical order (dict entries sorted, tensors as dtype, shape and bytes,
devices and strides left out), and ``load_state_dict`` / ``load`` recompute it before any
field is parsed. A state without a checksum (saved before checksums, or unsealed on purpose
by a user who edited it) loads with a warning; one whose checksum does not match is refused.
"""
from __future__ import annotations

import hashlib
import struct

import torch

CHECKSUM_FIELD = "checksum"
ALGORITHM = "sha256"


class ChecksumError(TypeError):
    """A value that a saved state cannot hold (so cannot be checksummed)."""


def state_checksum(state: dict) -> str:
    """``"sha256:<hex>"`` over every field of ``state`` but the checksum itself."""
    digest = hashlib.new(ALGORITHM)
    _feed(digest, {key: value for key, value in state.items() if key != CHECKSUM_FIELD})
    return f"{ALGORITHM}:{digest.hexdigest()}"


def seal_state(state: dict) -> dict:
    """Set ``state[CHECKSUM_FIELD]`` to the checksum of its content, in place; returns ``state``.

    ``state_dict()`` does this; a user who edits a state on purpose calls it again (or deletes
    the field, and the state loads with a warning that it cannot be verified)."""
    state[CHECKSUM_FIELD] = state_checksum(state)
    return state


def _sort_key(key) -> tuple[str, str]:
    return type(key).__name__, repr(key)


def _feed(digest, value) -> None:
    """Type-tagged, length-prefixed bytes of ``value``: distinct contents never share a stream."""
    if isinstance(value, torch.Tensor):
        data = value.detach().to("cpu").contiguous().reshape(-1)
        header = f"{str(value.dtype).removeprefix('torch.')}{list(value.shape)}".encode()
        digest.update(b"T" + struct.pack("<Q", len(header)) + header)
        raw = data.view(torch.uint8) if data.numel() else torch.empty(0, dtype=torch.uint8)
        digest.update(struct.pack("<Q", raw.numel()))
        digest.update(raw.numpy())
    elif isinstance(value, dict):
        digest.update(b"D" + struct.pack("<Q", len(value)))
        for key in sorted(value, key=_sort_key):
            _feed(digest, key)
            _feed(digest, value[key])
    elif isinstance(value, (list, tuple)):
        digest.update((b"L" if isinstance(value, list) else b"U") + struct.pack("<Q", len(value)))
        for item in value:
            _feed(digest, item)
    elif value is None or isinstance(value, (bool, int, float, str)):
        text = value.hex() if isinstance(value, float) else repr(value)
        encoded = f"{type(value).__name__}:{text}".encode()
        digest.update(b"P" + struct.pack("<Q", len(encoded)) + encoded)
    else:
        raise ChecksumError(f"a projector state holds tensors and plain values only, not {type(value).__name__}")
