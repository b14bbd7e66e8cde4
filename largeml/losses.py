"""Per-sample losses of a real score s against a label y ∈ {0, 1}.

Each returns one loss per row; the Trainer averages them and adds the L2 term λ/2·‖w‖², so the
objective minimised is the textbook one:

    mean_i loss(s_i, y_i) + λ/2 · ‖w‖²        (λ = 1 / (C · n) is LIBLINEAR's C·Σ loss + ½‖w‖²)

Labels are {0, 1} everywhere in largeml; the margin losses use t = 2y − 1 ∈ {−1, +1}.
"""

import torch
import torch.nn.functional as F
from torch import Tensor


def bce(scores: Tensor, targets: Tensor) -> Tensor:
    """Logistic loss log(1 + exp(−t·s)), computed stably from logits."""
    return F.binary_cross_entropy_with_logits(scores, targets, reduction="none")


def hinge(scores: Tensor, targets: Tensor) -> Tensor:
    """Soft-margin SVM loss max(0, 1 − t·s)."""
    return torch.clamp(1 - (2 * targets - 1) * scores, min=0)


def squared_hinge(scores: Tensor, targets: Tensor) -> Tensor:
    """L2-loss SVM (LIBLINEAR's default): max(0, 1 − t·s)²."""
    return torch.clamp(1 - (2 * targets - 1) * scores, min=0).pow(2)
