"""Applying a built projection to one parameter-shaped tensor (a gradient or an update).

Each use of the parameter views the tensor as the matrix (or batch of matrices) whose last
dimension multiplies its slot's rows, and removes the protected part there:

- dense: ``M <- M - (M U) U^T`` (``ops.project_``), or ``M <- (M Q) Q^T`` with the complement
  Q when that is cheaper (``ops.restrict_``);
- grouped: the same per group, batched, with each group's basis padded by zero columns;
- diagonal (embedding): the columns of seen tokens are zeroed, i.e. their rows of the weight.

Uses on opposite sides of a tied parameter act on opposite sides of the matrix, so applying
them one after the other is the projection onto the intersection of both null spaces.
"""
from __future__ import annotations

import torch

from unsc_fast import ops
from unsc_fast.adapters.base import Use, trailing_dims_merge_as_view
from unsc_fast.tracking.layers import Protection
from unsc_fast.tracking.wrappers import local_rows


def project_grouped_(matrices: torch.Tensor, bases: torch.Tensor) -> torch.Tensor:
    """``M_g <- M_g - (M_g U_g) U_g^T`` for every group g, in U's precision, in place."""
    work = matrices.to(bases.dtype)
    return matrices.copy_(work - torch.bmm(torch.bmm(work, bases), bases.mT))


def apply_uses_(tensor: torch.Tensor, uses: list[Use], protection: Protection, bases: dict, complements: dict,
                on_device) -> torch.Tensor:
    """Project ``tensor`` (shaped like the parameter of ``uses``) onto the null space of
    every use, in place. ``on_device(table, slot, device)`` fetches a basis on the tensor's
    device (the projector caches the move)."""
    for use in uses:
        slot = protection.slot(use.slot)
        rows = local_rows(tensor, use.name)  # a DTensor sharded by rows: this rank's rows
        if rows is not tensor and use.side == "out":
            raise NotImplementedError(
                f"parameter {use.name!r}: its inputs multiply dim 0, along which the DTensor is sharded; "
                "the projection would need every shard. Replicate this parameter"
            )
        matrix = use.view(rows)
        if slot.kind == "diagonal":
            matrix.masked_fill_(on_device(bases, slot.name, rows.device), 0)
        elif slot.kind == "grouped":
            project_grouped_(matrix, on_device(bases, slot.name, rows.device))
        elif slot.name in complements:
            ops.restrict_(matrix, on_device(complements, slot.name, rows.device))
        else:
            ops.project_(matrix, on_device(bases, slot.name, rows.device))
        if use.side == "in" and not trailing_dims_merge_as_view(rows):
            rows.copy_(matrix.reshape(rows.shape))  # the view had to copy (e.g. channels_last)
    return tensor


def protects_nothing(uses: list[Use], protection: Protection, bases: dict) -> bool:
    """True when every slot of ``uses`` kept nothing (a plain step is exact there)."""
    for use in uses:
        slot = protection.slot(use.slot)
        basis = bases[slot.name]
        if (slot.kind == "diagonal" and bool(basis.any())) or (slot.kind != "diagonal" and basis.shape[-1] > 0):
            return False
    return True


def residual(tensor: torch.Tensor, uses: list[Use], protection: Protection, bases: dict) -> float:
    """How much of ``tensor`` (a parameter change) lies in the protected subspaces, relative
    to its size: the largest ``||M U|| / ||M||`` over the uses (per group for grouped slots;
    the seen tokens' rows for an embedding). Rounding level means the guarantee holds."""
    worst = 0.0
    for use in uses:
        slot = protection.slot(use.slot)
        matrix = use.view(tensor.detach()).to(torch.float64)
        norm = float(matrix.norm())
        if norm == 0.0:
            continue
        basis = bases[slot.name].to(tensor.device)
        if slot.kind == "diagonal":
            inside = matrix[..., basis]
        elif slot.kind == "grouped":
            inside = torch.bmm(matrix, basis.to(torch.float64))
        else:
            inside = matrix @ basis.to(torch.float64)
        worst = max(worst, float(inside.norm()) / norm)
    return worst
