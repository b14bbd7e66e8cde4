"""Models: plain `nn.Module`s mapping features to one real score per row.

A score is a logit for logistic regression and a margin for the SVM; the loss decides which.
Models know nothing of devices, losses, optimizers or logging.
"""

from collections.abc import Sequence

from torch import Tensor, nn

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "silu": nn.SiLU,
}


class Linear(nn.Module):
    """score = x · w + b: logistic regression with `bce`, a linear soft-margin SVM with `hinge`.

    Starts from zero, as LIBLINEAR does: the objective is convex, so the start only costs steps,
    and a zero start makes every run independent of the seed.
    """

    def __init__(self, n_features: int) -> None:
        super().__init__()
        self.linear = nn.Linear(n_features, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x).squeeze(-1)


class MLP(nn.Module):
    """A feed-forward network: [Linear → activation → dropout] per hidden size, then one score."""

    def __init__(
        self,
        n_features: int,
        hidden_sizes: Sequence[int] = (64, 64),
        activation: str = "relu",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"model.activation={activation!r} is not one of {sorted(ACTIVATIONS)}"
            )
        layers: list[nn.Module] = []
        width = n_features
        for size in hidden_sizes:
            layers += [nn.Linear(width, size), ACTIVATIONS[activation]()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = size
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x).squeeze(-1)


def penalised_weights(model: nn.Module) -> list[nn.Parameter]:
    """The parameters L2 regularisation applies to: weight matrices, not biases (as in
    scikit-learn and LIBLINEAR without its bias feature)."""
    return [p for p in model.parameters() if p.ndim >= 2]


def l2_penalty(model: nn.Module) -> Tensor:
    """½‖w‖² over `penalised_weights`."""
    return 0.5 * sum(w.pow(2).sum() for w in penalised_weights(model))
