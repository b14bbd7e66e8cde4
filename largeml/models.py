"""Models: plain `nn.Module`s mapping features to real scores: one per row for two classes
(`n_outputs=1`, shape (rows,)), one per class for more (`n_outputs=K`, shape (rows, K)).

A score is a logit for logistic regression and a margin for the SVM; the loss decides which.
Models know nothing of devices, losses, optimizers or logging.

Every model takes either a dense float batch (rows, n_features) or a sparse CSR batch
`torch.sparse_csr_tensor(crow_indices, col_indices, values, size=(rows, n_features))`; see
`first_layer`. A sparse batch is never densified, so memory follows its non-zeros.
"""

import math
import warnings
from collections.abc import Sequence
from itertools import islice

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from largeml import kernels
from largeml.data.stream import RowPieces

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "silu": nn.SiLU,
}


def first_layer(x: Tensor, linear: nn.Linear) -> Tensor:
    """`linear(x)` -> (rows, out_features) for a dense batch or a sparse CSR batch.

    A CSR row's score is Σ values · weight[:, cols], computed from the non-zeros alone. The
    weight gradient is dense (the optimizers and the Trainer's L2 term expect that): one
    weight-sized tensor, 5.4 MB for logistic regression on 1.35 M features.
    """
    if x.layout != torch.sparse_csr:
        return linear(x)
    _check_width(x, linear)
    crow, cols, values = x.crow_indices(), x.col_indices(), x.values()
    if linear.out_features == 1:
        # Gather, multiply, sum each row's segment. Measured 10x faster forward+backward than
        # embedding_bag (4096 rows × 500 non-zeros, 1.35 M features: 16 vs 184 ms), whose
        # backward sorts every index; the gather's backward is one index_add.
        gathered = linear.weight[0].index_select(0, cols) * values
        out = torch.segment_reduce(gathered, "sum", offsets=crow).unsqueeze(-1)
    else:
        # embedding_bag reads weight.t() as a table of n_features rows. That table is
        # contiguous only if the weight is stored column-major (`column_major`); with nn.Linear's
        # row-major weight it is still correct but ~40x slower (strided reads of every row).
        out = F.embedding_bag(
            cols, linear.weight.t(), offsets=crow[:-1], per_sample_weights=values, mode="sum"
        )
    return out if linear.bias is None else out + linear.bias


def _check_width(x: Tensor, linear: nn.Linear) -> None:
    if len(x.shape) != 2 or x.shape[1] != linear.in_features:
        raise ValueError(
            f"sparse batch of shape {tuple(x.shape)} does not fit a first layer of "
            f"{linear.in_features} features; build the model with n_features={x.shape[-1]}"
        )


def column_major(linear: nn.Linear) -> nn.Linear:
    """Stores `linear.weight` column-major: same values, shape and state_dict entry
    (out_features, in_features), but weight.t() is contiguous, as `first_layer` wants for a
    sparse batch. Dense batches are unaffected (matmul reads either layout), and gradients,
    optimizer state, `.to(device)` and `load_state_dict` all keep the parameter's layout."""
    linear.weight = nn.Parameter(linear.weight.detach().t().contiguous().t())
    return linear


class Standardize(nn.Module):
    """The feature map in front of every model: x' = (x − shift) · mult per feature, fitted once
    from the training data (`largeml.data.scaling`) and saved in the state_dict, so evaluate,
    predict and export apply exactly what training did. Starts as the identity. A sparse batch
    keeps its sparsity: its shift must be zero (max-abs scaling), and only values are scaled."""

    def __init__(self, n_features: int) -> None:
        super().__init__()
        self.register_buffer("shift", torch.zeros(n_features))
        self.register_buffer("mult", torch.ones(n_features))
        self.register_buffer("active", torch.zeros((), dtype=torch.bool))

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if not self.active:
            # The identity is saved as one 0 and one 1, each viewed as n_features of them:
            # torch.save writes such a view at its one element (a checkpoint of FTRL over 2 M
            # unscaled features: 24.0 MB, where the map in full took 16 more). Loading copies
            # it into the full buffers, and its length is still the model's width.
            for name, value in (("shift", 0.0), ("mult", 1.0)):
                buffer = getattr(self, name)
                destination[prefix + name] = torch.full(
                    (1,), value, dtype=buffer.dtype, device=buffer.device).expand_as(buffer)

    @torch.no_grad()
    def set(self, shift: Tensor, mult: Tensor) -> None:
        self.shift.copy_(shift)
        self.mult.copy_(mult)
        self.active.fill_(bool((shift != 0).any() or (mult != 1).any()))

    def forward(self, x: Tensor) -> Tensor:
        if not self.active:
            return x
        if x.layout == torch.sparse_csr:
            cols = x.col_indices()
            with warnings.catch_warnings():  # PyTorch calls CSR "beta" at every build
                warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta")
                return torch.sparse_csr_tensor(x.crow_indices(), cols, x.values() * self.mult[cols],
                                               size=x.shape, check_invariants=False)
        return (x - self.shift) * self.mult


class Linear(nn.Module):
    """score = x · w + b: logistic regression with `bce`, a linear soft-margin SVM with `hinge`;
    for K classes, K scores x · W + b (multinomial logistic regression, a Crammer–Singer SVM).

    Starts from zero, as LIBLINEAR does: the objective is convex, so the start only costs steps,
    and a zero start makes every run independent of the seed.
    """

    def __init__(self, n_features: int, n_outputs: int = 1) -> None:
        super().__init__()
        self.input = Standardize(n_features)
        self.linear = nn.Linear(n_features, n_outputs)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        if n_outputs > 1:
            column_major(self.linear)  # sparse batches read weight.t() (see first_layer)

    def forward(self, x: Tensor) -> Tensor:
        if isinstance(x, RowPieces):  # rows read in place: scored where they lie
            if self.linear.out_features > 1 or torch.is_grad_enabled() or kernels.numba is None:
                x = x.csr()
            else:
                _check_width(x, self.linear)
                scale = self.input.mult if self.input.active else None
                return kernels.linear_scores(x, self.linear.weight.detach()[0], scale,
                                             float(self.linear.bias))
        if self.linear.out_features > 1:
            return first_layer(self.input(x), self.linear)
        if x.layout == torch.sparse_csr and kernels.available(x):
            _check_width(x, self.linear)
            # The input map's scale is folded into the loop (a sparse map has no shift; an
            # inactive one is not read), so the scaled batch is never built.
            scale = self.input.mult if self.input.active else None
            return _CsrLinear.apply(x, scale, self.linear.weight, self.linear.bias)
        return first_layer(self.input(x), self.linear).squeeze(-1)


class _CsrLinear(torch.autograd.Function):
    """x·(scale ⊙ w) + b for a CSR batch on the CPU, by the compiled loops of
    `largeml.kernels`: one pass over the non-zeros forward, one backward. The weight gradient is
    dense, as autograd and the optimizers expect."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        ctx.x, ctx.scale, ctx.width = x, scale, weight.shape[1]
        return kernels.csr_matvec(x, weight.detach()[0], scale, float(bias))

    @staticmethod
    def backward(ctx, d: Tensor):
        grad = torch.zeros(ctx.width)
        kernels.csr_rmatvec(ctx.x, d.contiguous(), ctx.scale, grad)
        return None, None, grad.view(1, -1), d.sum().view(1)


class MLP(nn.Module):
    """A feed-forward network: [Linear → activation → dropout] per hidden size, then the scores
    (one, or one per class)."""

    def __init__(
        self,
        n_features: int,
        hidden_sizes: Sequence[int] = (64, 64),
        activation: str = "relu",
        dropout: float = 0.0,
        n_outputs: int = 1,
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
        layers.append(nn.Linear(width, n_outputs))
        column_major(layers[0])
        self.input = Standardize(n_features)
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = first_layer(self.input(x), self.net[0])
        for layer in islice(self.net, 1, None):
            x = layer(x)
        return x.squeeze(-1) if x.shape[-1] == 1 else x


class RFF(nn.Module):
    """A kernel SVM (or kernel logistic regression) at linear cost: random Fourier features of
    the RBF kernel k(x, x') = exp(−γ‖x − x'‖²) (Rahimi & Recht, 2007), then a linear layer.

    z(x) = √(2/D) · cos(x·Ω + φ), Ω ~ N(0, 2γ) of shape (n_features, D), φ ~ U[0, 2π), so that
    z(x)·z(x') estimates k(x, x') with an error of order 1/√D. Ω and φ are drawn once from
    `seed` and kept as buffers (saved in the checkpoint, never trained or penalised); only the
    linear layer learns, so the objective stays convex. `gamma="auto"` is 1 / n_features: for
    standardised features (data.scale=auto scales dense data) scikit-learn's `gamma="scale"`.
    """

    def __init__(self, n_features: int, n_components: int = 2000, gamma: float | str = "auto",
                 seed: int = 0, n_outputs: int = 1) -> None:
        super().__init__()
        if gamma == "auto":
            gamma = 1.0 / n_features
        if not isinstance(gamma, int | float) or not gamma > 0:
            raise ValueError(f"model.gamma must be auto or a positive number, got {gamma!r}")
        if not isinstance(n_components, int) or n_components < 1:
            raise ValueError(f"model.n_components must be a positive integer, got "
                             f"{n_components!r}")
        self.input = Standardize(n_features)
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer("omega", torch.randn(n_features, n_components, generator=generator)
                             * math.sqrt(2 * gamma))
        self.register_buffer("phase", torch.rand(n_components, generator=generator) * 2 * math.pi)
        self.linear = nn.Linear(n_components, n_outputs)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def features(self, x: Tensor) -> Tensor:
        x = self.input(x)
        projected = x @ self.omega  # a CSR batch: torch's sparse × dense product
        return math.sqrt(2 / self.omega.shape[1]) * torch.cos(projected + self.phase)

    def forward(self, x: Tensor) -> Tensor:
        out = self.linear(self.features(x))
        return out.squeeze(-1) if out.shape[-1] == 1 else out


def penalised_weights(model: nn.Module) -> list[nn.Parameter]:
    """The parameters L2 regularisation applies to: weight matrices, not biases (as in
    scikit-learn and LIBLINEAR without its bias feature)."""
    return [p for p in model.parameters() if p.ndim >= 2]


def l2_penalty(model: nn.Module) -> Tensor:
    """½‖w‖² over `penalised_weights`."""
    return 0.5 * sum(w.pow(2).sum() for w in penalised_weights(model))
