"""Knowledge distillation's loss (the notes' teacher-student chapter)."""

import torch.nn.functional as F
from torch import Tensor


def distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    temperature: float = 4.0,
    alpha: float = 0.9,
) -> Tensor:
    """Hinton et al. (2015): alpha T^2 KL(softmax(z_t / T) || softmax(z_s / T)) + (1 - alpha)
    CE(y, z_s). T^2 keeps the soft term's gradients on the scale of the hard one's as T grows.
    `labels`: class indices (B,), or mixup / cutmix's class probabilities (B, K)."""
    t = temperature
    soft = F.kl_div(
        F.log_softmax(student_logits / t, dim=1),
        F.log_softmax(teacher_logits / t, dim=1),
        reduction="batchmean",
        log_target=True,
    )
    hard = F.cross_entropy(student_logits, labels)
    return alpha * t * t * soft + (1 - alpha) * hard
