"""Tracking: which weights the projector protects, and how it sees them.

Owns layer discovery (an adapter per weight-bearing module), the tied-parameter plan
(``Protection``: the slots whose statistics are kept and, per parameter, the uses its
projection composes), ``coverage()`` (``layers``), and the wrappers around a model that the
projector sees through: DataParallel / DDP, ``torch.compile``, FSDP2 and its ``DTensor``
rows (``wrappers``).
"""
