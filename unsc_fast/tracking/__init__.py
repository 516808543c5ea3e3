"""Tracking: which weights the projector protects, and how.

Owns layer discovery (an adapter per weight-bearing module), the tied-parameter plan
(``Protection``: the slots whose statistics are kept and, per parameter, the uses its
projection composes) and ``coverage()``.
"""
