"""The facade: ``NullSpaceProjector`` (observe, build, project, coverage, save/load), its
saved state and its checks, and ``NullSpaceOptimizer``, which applies it at every step."""
