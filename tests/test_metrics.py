"""Accuracy and exact ROC AUC against hand-computed cases and a brute-force pairwise count."""

import math

import numpy as np
import pytest
import torch

from largeml.metrics import accuracy, roc_auc

pytestmark = pytest.mark.unit


def test_accuracy_thresholds_at_zero() -> None:
    scores = torch.tensor([1.0, -1.0, 0.0, 0.2, -3.0])
    labels = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0])
    # predictions 1, 0, 0 (score 0 is class 0), 1, 0 -> right on rows 0 and 1 only
    assert accuracy(scores, labels) == pytest.approx(2 / 5)


@pytest.mark.parametrize(
    "scores, labels, expected",
    [
        ([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1], 1.0),  # perfect ranking
        ([0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1], 0.0),  # reversed
        ([0.5, 0.5, 0.5, 0.5], [0, 1, 0, 1], 0.5),  # all tied
        # pairs (pos, neg): (0.5,0.5) tie=1/2, (0.5,0.1)=1, (0.9,0.5)=1, (0.9,0.1)=1 -> 3.5/4
        ([0.5, 0.9, 0.5, 0.1], [1, 1, 0, 0], 3.5 / 4),
        # pos {0.3, 0.7}, neg {0.3, 0.3, 0.9}: 0.3 -> 1/2+1/2+0, 0.7 -> 1+1+0 -> 3/6
        ([0.3, 0.7, 0.3, 0.3, 0.9], [1, 1, 0, 0, 0], 3 / 6),
    ],
)
def test_roc_auc_hand_cases(scores: list[float], labels: list[int], expected: float) -> None:
    assert roc_auc(torch.tensor(scores), torch.tensor(labels, dtype=torch.float32)) == (
        pytest.approx(expected)
    )


@pytest.mark.parametrize("label", [0.0, 1.0])
def test_roc_auc_single_class_is_nan(label: float) -> None:
    assert math.isnan(roc_auc(torch.tensor([0.1, 0.5, 0.9]), torch.full((3,), label)))


def _pairwise_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    pos, neg = scores[labels == 1], scores[labels == 0]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(wins) / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_roc_auc_matches_brute_force_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = (rng.random(300) < 0.4).astype(np.float64)
    scores = np.round(rng.normal(size=300) + labels, 1)  # rounding makes many ties
    assert len(np.unique(scores)) < 150
    got = roc_auc(torch.from_numpy(scores), torch.from_numpy(labels))
    assert got == pytest.approx(_pairwise_auc(scores, labels), abs=1e-12)
