"""Projector: the facade over the pipeline, and the optimizer that applies it.

Owns ``NullSpaceProjector`` (observe, build, project, coverage), its statistics side
(``statistics_mixin``), its saved state and the checks run before one is installed
(``persistence``, ``state_validation``), and ``NullSpaceOptimizer``, which keeps every step's
change in the null space. The facade passes the stages data (the store, the protection plan,
the bases); no stage below reaches back into it.
"""
from unsc_fast.projector.optimizer import NullSpaceOptimizer
from unsc_fast.projector.projector import STATE_FORMAT, NullSpaceProjector

__all__ = ["NullSpaceProjector", "NullSpaceOptimizer", "STATE_FORMAT"]
