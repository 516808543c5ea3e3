"""unsc_fast: machine unlearning by null-space calibration (UNSC), kernel-accelerated.

    from unsc_fast import NullSpaceProjector, NullSpaceOptimizer
"""
from unsc_fast import ops
from unsc_fast.projector.optimizer import NullSpaceOptimizer
from unsc_fast.projector.projector import NullSpaceProjector

__version__ = "0.1.0"
__all__ = ["NullSpaceProjector", "NullSpaceOptimizer", "ops", "__version__"]
