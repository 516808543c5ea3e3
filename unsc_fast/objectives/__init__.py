"""What unlearning minimises: objectives that see one training step (``Step``) and return the
loss. ``unlearn()`` takes one by name or as a callable; each lives in a module of its own."""
from unsc_fast.objectives.base import Objective, Step, as_objective
from unsc_fast.objectives.classification import CrossEntropy, FeatureErasure

__all__ = ["Objective", "Step", "as_objective", "CrossEntropy", "FeatureErasure"]
