"""Per-sample losses of scores against class indices (`largeml.labels`).

Each returns one loss per row; the Trainer averages them and adds the L2 term λ/2·‖w‖², so the
objective minimised is the textbook one:

    mean_i loss(s_i, y_i) + λ/2 · ‖w‖²        (λ = 1 / (C · n) is LIBLINEAR's C·Σ loss + ½‖w‖²)

Two classes: one score a row (shape (rows,)), labels y ∈ {0, 1}; the margin losses use
t = 2y − 1 ∈ {−1, +1}. K classes: K scores a row (shape (rows, K)), labels y ∈ {0 … K−1}:
`bce` is then the softmax cross-entropy (multinomial logistic regression), `hinge` the
Crammer–Singer multiclass hinge max(0, 1 + max_{j≠y} s_j − s_y), `squared_hinge` its square.
"""

import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

SMOOTHING = 0.1  # the width h of the smoothed hinge's quadratic piece (see smooth_hinge)


def bce(scores: Tensor, targets: Tensor) -> Tensor:
    """Logistic loss log(1 + exp(−t·s)), computed stably from logits; for K scores, the
    softmax cross-entropy −log softmax(s)_y."""
    if scores.dim() == 2:
        return F.cross_entropy(scores, targets.long(), reduction="none")
    return F.binary_cross_entropy_with_logits(scores, targets, reduction="none")


def margin_gap(scores: Tensor, targets: Tensor) -> Tensor:
    """1 − z, where z is a row's margin: t·s for one score, s_y − max_{j≠y} s_j for K. The
    hinge is max(0, 1 − z)."""
    if scores.dim() < 2:
        return 1 - (2 * targets - 1) * scores
    y = targets.long().unsqueeze(1)
    others = scores.scatter(1, y, float("-inf"))  # s_j for j ≠ y
    return 1 + others.amax(1) - scores.gather(1, y).squeeze(1)


MULTICLASS = ("crammer_singer", "ovr")  # the margin losses' `multiclass` for K scores


def one_vs_rest(scores: Tensor, targets: Tensor) -> Tensor:
    """(rows, K) binary margin gaps 1 − t_k·s_k with t_k = +1 for the row's class, −1 for the
    others: K binary SVMs, one per class against the rest."""
    t = 2 * torch.nn.functional.one_hot(targets.long(), scores.shape[1]).to(scores.dtype) - 1
    return 1 - t * scores


def _gap(scores: Tensor, targets: Tensor, multiclass: str) -> Tensor:
    if multiclass not in MULTICLASS:
        raise ValueError(f"loss.multiclass must be one of {', '.join(MULTICLASS)}, got "
                         f"{multiclass!r}")
    if scores.dim() == 2 and multiclass == "ovr":
        return one_vs_rest(scores, targets)
    return margin_gap(scores, targets)


def _per_row(losses: Tensor) -> Tensor:
    """One loss a row: one-vs-rest's K losses summed."""
    return losses.sum(1) if losses.dim() == 2 else losses


def hinge(scores: Tensor, targets: Tensor, multiclass: str = "crammer_singer") -> Tensor:
    """Soft-margin SVM loss max(0, 1 − t·s); for K scores, Crammer–Singer's (`multiclass=ovr`:
    the sum of K one-vs-rest hinges, as LIBLINEAR's default multiclass SVM)."""
    return _per_row(torch.clamp(_gap(scores, targets, multiclass), min=0))


def squared_hinge(scores: Tensor, targets: Tensor, multiclass: str = "crammer_singer") -> Tensor:
    """L2-loss SVM (LIBLINEAR's default): max(0, 1 − t·s)²; for K scores, of Crammer–Singer's
    margin (`multiclass=ovr`: K one-vs-rest ones, summed)."""
    return _per_row(torch.clamp(_gap(scores, targets, multiclass), min=0).pow(2))


def smooth_hinge(scores: Tensor, targets: Tensor, h: float = SMOOTHING,
                 multiclass: str = "crammer_singer") -> Tensor:
    """The hinge with its corner rounded over a margin width h: 0 for z ≥ 1, (1 − z)²/(2h) for
    1 − h < z < 1, 1 − z − h/2 below (z = t·s). Within h/2 of the hinge everywhere, and twice
    differentiable almost everywhere, so Newton and L-BFGS converge on it."""
    if scores.dim() == 2 and multiclass != "ovr":
        return smooth_multiclass_hinge(scores, targets, h)
    gap = _gap(scores, targets, multiclass)  # 1 − z: the hinge is max(0, gap)
    return _per_row(torch.where(gap >= h, gap - h / 2, torch.clamp(gap, min=0).pow(2) / (2 * h)))


def smooth_multiclass_hinge(scores: Tensor, targets: Tensor, h: float = SMOOTHING) -> Tensor:
    """Crammer–Singer's hinge max_j (Δ_j + s_j − s_y) (Δ_j = 1 for j ≠ y, 0 for j = y) with the
    max smoothed to γ·log Σ_j exp((Δ_j + s_j − s_y)/γ), γ = h / log K: smooth everywhere (the
    hinge's max over the other classes has a corner wherever two of them tie, which a max
    alone keeps), and between the hinge and the hinge + h."""
    k = scores.shape[1]
    gamma = h / math.log(k)
    y = targets.long().unsqueeze(1)
    margins = 1 + scores - scores.gather(1, y)  # Δ_j + s_j − s_y, with Δ_y = 1 here ...
    margins = margins.scatter(1, y, 0.0)  # ... and 0 for j = y
    return gamma * torch.logsumexp(margins / gamma, dim=1)


def weighted(loss_fn: Callable[[Tensor, Tensor], Tensor],
             weights: Tensor) -> Callable[[Tensor, Tensor], Tensor]:
    """`loss_fn` with each row's loss multiplied by its class's weight, `weights[y]` (class
    weights: `loss.class_weight`, part of the objective)."""
    return functools.partial(_weighted, loss_fn=loss_fn, weights=weights)


def class_weights_of(loss_fn) -> Tensor | None:
    """The class weights of a `weighted` loss, else None."""
    return loss_fn.keywords["weights"] if getattr(loss_fn, "func", None) is _weighted else None


def on_device(loss_fn, device: torch.device):
    """`loss_fn` with its class weights (if any) on `device`: copied there once, not at each
    call."""
    weights = class_weights_of(loss_fn)
    if weights is None or weights.device == device:
        return loss_fn
    return weighted(loss_fn.keywords["loss_fn"], weights.to(device))


def _weighted(scores: Tensor, targets: Tensor, loss_fn, weights: Tensor) -> Tensor:
    return loss_fn(scores, targets) * weights.to(scores.device)[targets.long()]


def smoothed(loss_fn: Callable[[Tensor, Tensor], Tensor]) -> Callable[[Tensor, Tensor], Tensor]:
    """What a full-batch solver minimises for `loss_fn`: the hinge's smoothed twin, any other
    loss (logistic, squared hinge: smooth already) itself; class weights kept."""
    if getattr(loss_fn, "func", None) is _weighted:
        return weighted(smoothed(loss_fn.keywords["loss_fn"]), loss_fn.keywords["weights"])
    if getattr(loss_fn, "func", loss_fn) is hinge:
        return functools.partial(smooth_hinge, h=SMOOTHING,
                                 **getattr(loss_fn, "keywords", {}))
    return loss_fn
