"""Classification metrics over a whole evaluation set, computed exactly."""

import torch
import torch.nn.functional as F
from torch import Tensor


def accuracy(scores: Tensor, targets: Tensor) -> float:
    """Fraction of rows whose predicted class (score > 0) equals the label."""
    return ((scores > 0).float() == targets).float().mean().item()


def roc_auc(scores: Tensor, targets: Tensor) -> float:
    """Exact ROC AUC: the probability that a random positive outscores a random negative, ties
    counting one half (the Mann-Whitney U statistic, with average ranks for tied scores).

    NaN when only one class is present.
    """
    scores, targets = scores.double().flatten(), targets.flatten()
    n_pos = int(targets.sum().item())
    n_neg = targets.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    sorted_scores, order = torch.sort(scores)
    _, inverse, counts = torch.unique_consecutive(
        sorted_scores, return_inverse=True, return_counts=True
    )
    # Tied scores share the mean of the 1-based ranks they span.
    last_rank = torch.cumsum(counts, 0).double()
    mean_rank = last_rank - (counts.double() - 1) / 2
    ranks = torch.empty_like(scores)
    ranks[order] = mean_rank[inverse]
    rank_sum_pos = ranks[targets == 1].sum().item()
    return (rank_sum_pos - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def confusion_matrix(scores: Tensor, targets: Tensor) -> list[list[int]]:
    """[[true negatives, false positives], [false negatives, true positives]], predicting
    class 1 for score > 0 (rows: the label, columns: the prediction, as in scikit-learn)."""
    predicted = (scores.flatten() > 0).long()
    actual = targets.flatten().long()
    counts = torch.bincount(2 * actual + predicted, minlength=4).tolist()
    return [counts[:2], counts[2:]]


def precision(scores: Tensor, targets: Tensor) -> float:
    """Of the rows predicted 1 (score > 0), the fraction labelled 1; 0.0 when none is
    predicted 1 (scikit-learn's `zero_division` default)."""
    (_, fp), (_, tp) = confusion_matrix(scores, targets)
    return tp / (tp + fp) if tp + fp else 0.0


def recall(scores: Tensor, targets: Tensor) -> float:
    """Of the rows labelled 1, the fraction predicted 1; 0.0 when no row is labelled 1."""
    _, (fn, tp) = confusion_matrix(scores, targets)
    return tp / (tp + fn) if tp + fn else 0.0


def f1(scores: Tensor, targets: Tensor) -> float:
    """Harmonic mean of precision and recall, 2·tp / (2·tp + fp + fn); 0.0 without positives."""
    (_, fp), (fn, tp) = confusion_matrix(scores, targets)
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def log_loss(scores: Tensor, targets: Tensor) -> float:
    """Mean negative log-likelihood of the labels with P(y = 1) = sigmoid(score): the scores
    are logits, as logistic regression's are. Computed from the logits, so it stays finite
    where a probability would round to 0 or 1."""
    return F.binary_cross_entropy_with_logits(scores.double().flatten(),
                                              targets.double().flatten()).item()


def hinge_loss(scores: Tensor, targets: Tensor) -> float:
    """Mean of max(0, 1 − t·s) with t = 2y − 1 ∈ {−1, +1}: the SVM's margin loss."""
    t = 2 * targets.double().flatten() - 1
    return torch.clamp(1 - t * scores.double().flatten(), min=0).mean().item()
