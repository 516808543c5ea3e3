"""Classifier objectives: cross-entropy on the new labels, and the feature-erasure term.

``FeatureErasure`` is why a class leaves the features, not only the logits (issue 27). At the
classifier's input (the features ``phi``) the remaining data occupies the protected subspace
``U`` of that layer. The part of a forget sample's features outside it, ``(I - U U^T) phi``, is
what the remaining data does not have there: directions the forgotten class has to itself.
The term ``||(I - U U^T) phi||^2``, normalised by its value on the forget data at the start,
pulls those components to zero, so that the forget samples' features look like remaining
data's in every direction the remaining data leaves free. The weights that make it are
confined to the null spaces like every other change, so the remaining samples' features do not
move (the guarantee), and what a linear probe or a relearning attack could read about the class
from the free directions goes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from unsc_fast.training import logits_of


class CrossEntropy:
    """Cross-entropy of the outputs against the step's targets (the calibrated labels)."""

    needs_step = True

    def __call__(self, step) -> torch.Tensor:
        return F.cross_entropy(logits_of(step.outputs), step.targets)

    def __repr__(self) -> str:
        return "CrossEntropy()"


class FeatureErasure:
    """``base(step) + weight * ||(I - U U^T) phi||^2 / scale``: ``U`` the classifier's protected
    basis, ``phi`` its inputs on the forget batch (``step.features``), ``scale`` the mean of the
    same norm on the forget data before unlearning (so ``weight`` is unitless)."""

    needs_step = True
    needs_features = True

    def __init__(self, base, weight: float) -> None:
        if weight < 0:
            raise ValueError(f"the feature-erasure weight must be >= 0, got {weight}")
        self.base, self.weight = base, float(weight)
        self.basis: torch.Tensor | None = None
        self.scale = 1.0

    def __repr__(self) -> str:
        return f"FeatureErasure({self.base!r}, weight={self.weight:g})"

    def calibrate(self, basis: torch.Tensor, forget_features: torch.Tensor) -> None:
        """Set the protected basis of the classifier's input and the normalising scale."""
        self.basis = basis
        outside = self.outside_energy(forget_features)
        self.scale = float(outside.mean()) if outside.numel() and float(outside.mean()) > 0 else 1.0

    def outside_energy(self, features: torch.Tensor) -> torch.Tensor:
        """Per sample, the squared norm of the features outside the protected subspace."""
        basis = self.basis.to(features.dtype)
        return (features - (features @ basis) @ basis.T).square().sum(1)

    def outside_share(self, features: torch.Tensor) -> float:
        """The mean outside energy of ``features`` (the forget data's now), as a share of the start's."""
        return float(self.outside_energy(features).mean()) / self.scale

    def __call__(self, step) -> torch.Tensor:
        loss = self.base(step)
        if self.weight == 0.0 or self.basis is None:
            return loss
        return loss + self.weight * self.outside_energy(step.features).mean() / self.scale


class RetainDistillation:
    """``base(step) + weight * KL(original || model)`` on the next batch of remaining samples: their
    outputs held to the original model's (``step.retain()`` yields the model's outputs and the
    original's logits). The projection keeps them to first order; this holds the rest."""

    needs_step = True

    def __init__(self, base, weight: float) -> None:
        if weight < 0:
            raise ValueError(f"the distillation weight must be >= 0, got {weight}")
        self.base, self.weight = base, float(weight)

    def __repr__(self) -> str:
        return f"RetainDistillation({self.base!r}, weight={self.weight:g})"

    def __call__(self, step) -> torch.Tensor:
        loss = self.base(step)
        if self.weight == 0.0:
            return loss
        outputs, original = step.retain()
        kl = F.kl_div(torch.log_softmax(logits_of(outputs).float(), -1), torch.log_softmax(original.float(), -1),
                      log_target=True, reduction="batchmean")
        return loss + self.weight * kl

