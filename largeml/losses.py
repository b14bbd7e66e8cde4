"""Per-sample losses of a real score s against a label y ∈ {0, 1}.

Each returns one loss per row; the Trainer averages them and adds the L2 term λ/2·‖w‖², so the
objective minimised is the textbook one:

    mean_i loss(s_i, y_i) + λ/2 · ‖w‖²        (λ = 1 / (C · n) is LIBLINEAR's C·Σ loss + ½‖w‖²)

Labels are {0, 1} everywhere in largeml; the margin losses use t = 2y − 1 ∈ {−1, +1}.
"""

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

SMOOTHING = 0.1  # the width h of the smoothed hinge's quadratic piece (see smooth_hinge)


def bce(scores: Tensor, targets: Tensor) -> Tensor:
    """Logistic loss log(1 + exp(−t·s)), computed stably from logits."""
    return F.binary_cross_entropy_with_logits(scores, targets, reduction="none")


def hinge(scores: Tensor, targets: Tensor) -> Tensor:
    """Soft-margin SVM loss max(0, 1 − t·s)."""
    return torch.clamp(1 - (2 * targets - 1) * scores, min=0)


def squared_hinge(scores: Tensor, targets: Tensor) -> Tensor:
    """L2-loss SVM (LIBLINEAR's default): max(0, 1 − t·s)²."""
    return torch.clamp(1 - (2 * targets - 1) * scores, min=0).pow(2)


def smooth_hinge(scores: Tensor, targets: Tensor, h: float = SMOOTHING) -> Tensor:
    """The hinge with its corner rounded over a margin width h: 0 for z ≥ 1, (1 − z)²/(2h) for
    1 − h < z < 1, 1 − z − h/2 below (z = t·s). Within h/2 of the hinge everywhere, and twice
    differentiable almost everywhere, so Newton and L-BFGS converge on it."""
    gap = 1 - (2 * targets - 1) * scores  # 1 − z: the hinge is max(0, gap)
    return torch.where(gap >= h, gap - h / 2, torch.clamp(gap, min=0).pow(2) / (2 * h))


def smoothed(loss_fn: Callable[[Tensor, Tensor], Tensor]) -> Callable[[Tensor, Tensor], Tensor]:
    """What a full-batch solver minimises for `loss_fn`: the hinge's smoothed twin, any other
    loss (logistic, squared hinge: smooth already) itself."""
    if getattr(loss_fn, "func", loss_fn) is hinge:
        return functools.partial(smooth_hinge, h=SMOOTHING)
    return loss_fn
