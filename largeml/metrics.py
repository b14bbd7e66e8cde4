"""Classification metrics over a whole evaluation set, computed exactly.

Scores are one per row for two classes (shape (rows,): class 1 where the score is > 0) or one
per class (shape (rows, K): the class of the highest score); targets are class indices.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from largeml import losses


def predicted(scores: Tensor) -> Tensor:
    """Each row's predicted class index (long): score > 0 for one score, else the argmax."""
    return scores.argmax(1) if scores.dim() == 2 else (scores > 0).long()


def accuracy(scores: Tensor, targets: Tensor) -> float:
    """Fraction of rows whose predicted class equals the label."""
    return (predicted(scores) == targets.long()).float().mean().item()


def top_k_accuracy(scores: Tensor, targets: Tensor, k: int) -> float:
    """Fraction of rows whose label is among the k classes of highest score (K scores)."""
    top = scores.topk(min(k, scores.shape[1]), dim=1).indices
    return (top == targets.long().unsqueeze(1)).any(1).float().mean().item()


def roc_auc(scores: Tensor, targets: Tensor) -> float:
    """Exact ROC AUC: the probability that a random positive outscores a random negative, ties
    counting one half (the Mann-Whitney U statistic, with average ranks for tied scores).

    NaN when only one class is present. For K scores, the mean over the classes present of
    each class's AUC against the rest, ranking the rows by the class's softmax (one-vs-rest,
    macro: scikit-learn's `multi_class="ovr"` on probabilities).
    """
    if scores.dim() == 2:
        p = torch.softmax(scores.double(), dim=1)
        per_class = [roc_auc(p[:, c], (targets == c).double()) for c in range(scores.shape[1])]
        present = [a for a in per_class if a == a]
        return sum(present) / len(present) if present else float("nan")
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
    """K×K counts, rows the label and columns the prediction, as in scikit-learn; for two
    classes [[true negatives, false positives], [false negatives, true positives]]."""
    k = scores.shape[1] if scores.dim() == 2 else 2
    actual = targets.flatten().long()
    counts = torch.bincount(k * actual + predicted(scores), minlength=k * k).tolist()
    return [counts[i * k:(i + 1) * k] for i in range(k)]


def per_class(scores: Tensor, targets: Tensor) -> dict[str, list[float]]:
    """Each class's precision, recall and F1 (0.0 where undefined: scikit-learn's
    `zero_division` default) and its rows in `targets` (its support)."""
    m = torch.tensor(confusion_matrix(scores, targets), dtype=torch.float64)
    tp, predicted_n, actual_n = m.diagonal(), m.sum(0), m.sum(1)
    precision = torch.where(predicted_n > 0, tp / predicted_n.clamp(min=1), 0.0)
    recall = torch.where(actual_n > 0, tp / actual_n.clamp(min=1), 0.0)
    f1 = torch.where(tp > 0, 2 * tp / (predicted_n + actual_n).clamp(min=1), 0.0)
    return {"precision": precision.tolist(), "recall": recall.tolist(), "f1": f1.tolist(),
            "support": actual_n.tolist()}


def averaged(scores: Tensor, targets: Tensor) -> dict[str, float]:
    """Macro (unweighted mean over classes) and weighted (by support) precision, recall and F1,
    as scikit-learn's `average="macro"` and `"weighted"` (classes absent from both the labels
    and the predictions count in the macro mean as 0, as there)."""
    table = per_class(scores, targets)
    support = torch.tensor(table["support"])
    out = {}
    for name in ("precision", "recall", "f1"):
        values = torch.tensor(table[name])
        out[f"macro_{name}"] = values.mean().item()
        out[f"weighted_{name}"] = (values * support).sum().item() / max(support.sum().item(), 1)
    return out


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
    """Mean negative log-likelihood of the labels with P(y = 1) = sigmoid(score) (K scores:
    P(y = c) = softmax(scores)_c): the scores are logits, as logistic regression's are.
    Computed from the logits, so it stays finite where a probability would round to 0 or 1."""
    if scores.dim() == 2:
        return F.cross_entropy(scores.double(), targets.long()).item()
    return F.binary_cross_entropy_with_logits(scores.double().flatten(),
                                              targets.double().flatten()).item()


def hinge_loss(scores: Tensor, targets: Tensor) -> float:
    """Mean of max(0, 1 − t·s) with t = 2y − 1 ∈ {−1, +1}: the SVM's margin loss (K scores:
    Crammer–Singer's, max(0, 1 + max_{j≠y} s_j − s_y))."""
    if scores.dim() == 2:
        return losses.hinge(scores.double(), targets).mean().item()
    return losses.hinge(scores.double().flatten(), targets.double().flatten()).mean().item()
