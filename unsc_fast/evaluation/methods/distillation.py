"""Temperature-scaled KL divergence between a student's and a teacher's outputs, shared by
the teacher-student baselines (SCRUB, Bad Teacher)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def distillation_kl(student_logits: torch.Tensor, teacher_probabilities: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) at ``temperature``, summed over classes, averaged over the batch,
    times T^2 (Hinton et al. 2015; the ``DistillKL`` of the SCRUB code). ``teacher_probabilities``
    must already be softmax(teacher_logits / T)."""
    log_student = F.log_softmax(student_logits / temperature, dim=1)
    return F.kl_div(log_student, teacher_probabilities, reduction="batchmean") * temperature**2
