"""Per-sample losses against hand-computed values, labels in {0, 1}."""

import math

import pytest
import torch

from largeml.losses import bce, hinge, squared_hinge

pytestmark = pytest.mark.unit

# (score, label): t = 2y - 1, margin m = t * s
SCORES = torch.tensor([0.5, -2.0, 2.0, 2.0, -0.5])
LABELS = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0])
HINGE = [0.5, 0.0, 3.0, 0.0, 1.5]


def test_hinge_hand_values() -> None:
    torch.testing.assert_close(hinge(SCORES, LABELS), torch.tensor(HINGE))


def test_squared_hinge_hand_values() -> None:
    expected = torch.tensor([h * h for h in HINGE])  # 0.25, 0, 9, 0, 2.25
    torch.testing.assert_close(squared_hinge(SCORES, LABELS), expected)


def test_bce_hand_values() -> None:
    scores = torch.tensor([0.0, 0.0, 2.0, -1.0, 3.0])
    labels = torch.tensor([0.0, 1.0, 1.0, 1.0, 0.0])
    expected = torch.tensor(
        [
            math.log(2),
            math.log(2),
            math.log(1 + math.exp(-2.0)),  # y=1: log(1 + e^{-s})
            math.log(1 + math.exp(1.0)),
            math.log(1 + math.exp(3.0)),  # y=0: log(1 + e^{s})
        ]
    )
    torch.testing.assert_close(bce(scores, labels), expected)


def test_bce_is_stable_for_large_scores() -> None:
    losses = bce(torch.tensor([100.0, -100.0]), torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(losses, torch.tensor([100.0, 100.0]))


@pytest.mark.parametrize("loss", [bce, hinge, squared_hinge])
def test_losses_are_per_sample(loss) -> None:
    scores = torch.randn(4)
    labels = (torch.rand(4) > 0.5).float()
    assert loss(scores, labels).shape == (4,)
    # K scores a row (here 3): one loss a row.
    assert loss(torch.randn(4, 3), torch.tensor([0.0, 2.0, 1.0, 2.0])).shape == (4,)


def test_multiclass_losses_by_their_formulas() -> None:
    torch.manual_seed(0)
    scores = torch.randn(50, 4, dtype=torch.float64)
    labels = torch.randint(0, 4, (50,)).double()
    y = labels.long()
    # softmax cross-entropy: −log p_y
    p = scores.exp() / scores.exp().sum(1, keepdim=True)
    torch.testing.assert_close(bce(scores, labels), -p[torch.arange(50), y].log())
    # Crammer–Singer: max(0, 1 + max_{j≠y} s_j − s_y), row by row
    expected = torch.tensor([max(0.0, 1 + max(s[j] for j in range(4) if j != t) - s[t])
                             for s, t in zip(scores.tolist(), y.tolist(), strict=True)],
                            dtype=torch.float64)
    torch.testing.assert_close(hinge(scores, labels), expected)
    torch.testing.assert_close(squared_hinge(scores, labels), expected.pow(2))


def test_two_scores_softmax_is_the_binary_logistic_loss() -> None:
    # Two classes as two scores (s0, s1) are one score s1 − s0: the same loss.
    scores = torch.randn(30, 2, dtype=torch.float64)
    labels = (torch.rand(30) > 0.5).double()
    torch.testing.assert_close(bce(scores, labels), bce(scores[:, 1] - scores[:, 0], labels))


def test_hinge_gradient_is_the_subgradient() -> None:
    scores = torch.tensor([0.5, 2.0, 2.0, -2.0], requires_grad=True)
    labels = torch.tensor([1.0, 0.0, 1.0, 0.0])
    hinge(scores, labels).sum().backward()
    # Inside the margin d/ds = -t; outside it the loss is flat.
    torch.testing.assert_close(scores.grad, torch.tensor([-1.0, 1.0, 0.0, 0.0]))


def test_squared_hinge_gradient() -> None:
    scores = torch.tensor([0.5, 2.0, 2.0], requires_grad=True)
    labels = torch.tensor([1.0, 0.0, 1.0])
    squared_hinge(scores, labels).sum().backward()
    # d/ds (1 - t s)^2 = -2 t (1 - t s): -2*0.5, +2*3, 0
    torch.testing.assert_close(scores.grad, torch.tensor([-1.0, 6.0, 0.0]))


def test_one_vs_rest_is_k_binary_hinges_summed() -> None:
    torch.manual_seed(1)
    scores = torch.randn(20, 3, dtype=torch.float64)
    labels = torch.randint(0, 3, (20,)).double()
    expected = sum(hinge(scores[:, k], (labels == k).double()) for k in range(3))
    torch.testing.assert_close(hinge(scores, labels, multiclass="ovr"), expected)
    torch.testing.assert_close(squared_hinge(scores, labels, multiclass="ovr"),
                               sum(squared_hinge(scores[:, k], (labels == k).double())
                                   for k in range(3)))
    # One score a row (two classes): the option changes nothing.
    torch.testing.assert_close(hinge(scores[:, 0], labels.clamp(max=1), multiclass="ovr"),
                               hinge(scores[:, 0], labels.clamp(max=1)))
