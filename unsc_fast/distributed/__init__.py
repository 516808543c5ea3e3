"""Distributed: the same build over the ranks of a ``torch.distributed`` process group.

Owns agreeing on the request, pooling the statistics onto the rank that solves each slot
(the statistics boundary), and sending every basis to every rank (the bases boundary); the
solve between them is the single-process one (``unsc_fast.solve``). Nothing below this stage
communicates. The model wrappers (DDP, FSDP2) are ``unsc_fast.tracking.wrappers``.
"""
from unsc_fast.distributed.pooling import LOCAL, build, pooled_covariance, resolve_group

__all__ = ["LOCAL", "build", "pooled_covariance", "resolve_group"]
