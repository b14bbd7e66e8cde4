"""Classification metrics over a whole evaluation set, computed exactly."""

import torch
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
