"""Distributed: the same build over ``torch.distributed`` ranks.

Owns pooling the statistics over a process group, spreading the basis solves and sharing
the bases, and the model wrappers (DDP, FSDP2) the projector accepts.
"""
