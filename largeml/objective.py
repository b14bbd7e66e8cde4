"""The training objective, in one place:

    f(w) = mean_i loss(s_i, y_i) + λ/2 · ‖w‖²

over every training row, where s_i is the model's score and w the `penalised_weights` (weight
matrices, not biases). The Trainer's step, the full-batch solvers, the stopping rule and the
tests all compute f through this module, so `train/objective` in the logs is this function.

Sums over rows are accumulated in float64: a solver comparing two nearby values of f needs more
than float32's 7 digits (a float32 sum stalled L-BFGS on a9a at a relative gap of 2.6e-5).
"""

import math
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager, nullcontext

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call

from largeml import kernels
from largeml.data.stream import RowPieces
from largeml.models import Linear, penalised_weights
from largeml.solvers import dot

LossFn = Callable[[Tensor, Tensor], Tensor]
LOSS_FUNCTIONS = {code: fn for fn, code in kernels.LOSSES.items()}
Batch = tuple[Tensor, Tensor]
Reduce = Callable[[Tensor], Tensor]
# The most memory the lanes of an objective pass over rows read in place take for their copies
# of w and their gradients (`_linear_value`): 16 lanes over 2 M features.
LANE_BYTES = 256 * 2**20


def _identity(t: Tensor) -> Tensor:
    return t


def penalty(weights: Sequence[Tensor], l2: float) -> Tensor:
    """λ/2 · ‖w‖², in float64, on the weights' device."""
    device = weights[0].device if weights else None
    total = torch.zeros((), dtype=torch.float64, device=device)
    for w in weights:
        total = total + w.detach().double().pow(2).sum()
    return 0.5 * l2 * total


def l1_norm(weights: Sequence[Tensor]) -> float:
    """‖w‖₁ over the penalised weights, in float64."""
    return sum(w.detach().double().abs().sum().item() for w in weights)


def subgradient_norm(params: Sequence[Tensor], grads: Sequence[Tensor],
                     penalised: Sequence[bool], l1: float) -> float:
    """‖∂F‖ of F = f + λ1·‖w‖₁ at `params`, ∇f being `grads`: the norm of F's smallest
    subgradient, g + λ1·sign(w) where w ≠ 0 and max(|g| − λ1, 0) where w = 0, zero exactly at
    F's minimum (for λ1 = 0, ‖∇f‖)."""
    total = 0.0
    for p, g, is_weight in zip(params, grads, penalised, strict=True):
        g = g.detach().double()
        if is_weight and l1 > 0:
            w = p.detach().double()
            g = torch.where(w != 0, g + l1 * torch.sign(w), (g.abs() - l1).clamp(min=0))
        total += g.pow(2).sum().item()
    return math.sqrt(total)


def add_penalty_gradient(weights: Sequence[Tensor], l2: float) -> None:
    """Adds ∇ λ/2·‖w‖² = λ·w to each weight's gradient. Added directly it costs one op per
    weight matrix; through autograd it took a quarter of a small model's step."""
    if l2 > 0:
        for w in weights:
            w.grad.add_(w.detach(), alpha=l2)


def backward_rows(model: nn.Module, loss_fn: LossFn, x: Tensor, y: Tensor, n_rows: int,
                  autocast: AbstractContextManager | None = None) -> Tensor:
    """Backpropagates Σ loss(rows of x) / n_rows into the parameters' gradients (accumulating)
    and returns the per-row losses, detached. `model` may be a DDP wrapper."""
    with autocast or nullcontext():
        scores = model(x)
    losses = loss_fn(scores.float(), y)
    (losses.sum() / n_rows).backward()
    return losses.detach()


def value(model: nn.Module, loss_fn: LossFn, batches: Iterable[Batch], l2: float, n_rows: int,
          gradient: bool = False, reduce: Reduce = _identity,
          device: torch.device | None = None, l1: float = 0.0,
          lanes: int = 1) -> tuple[float, float | None]:
    """f over `batches` (this process's rows, moved to `device`; `reduce` sums over processes,
    `n_rows` counts all of them), + λ1·‖w‖₁ with `l1`, and, with `gradient`, ‖∇f‖ over every
    parameter (with `l1`, the smallest subgradient's norm: `subgradient_norm`). In eval mode
    (f has no dropout); leaves no gradients behind. Batches of `RowPieces` (a linear model on
    the CPU) are summed in `lanes` lanes, one a core: see `_linear_value`."""
    on_device = ((x.to(device), y.to(device)) for x, y in batches) if device else batches
    was_training = model.training
    model.eval()
    try:
        weights = penalised_weights(model)
        l1_term = l1 * l1_norm(weights) if l1 > 0 else 0.0
        loss = compiled(model, loss_fn)
        if loss is not None:  # with or without ∇f: the same sums, the same f
            f, norm = _linear_value(model, loss, on_device, l2, n_rows, reduce, l1, lanes)
            return f + l1_term, norm if gradient else None
        if gradient:
            full = FullBatch(model, loss_fn, on_device, l2, n_rows, reduce)
            f = full().item() + l1_term
            return f, subgradient_norm(full.params, [p.grad for p in full.params],
                                       full.penalised, l1)
        # On the model's device: held rows on a GPU come with no `device` to move them to.
        total = torch.zeros((), dtype=torch.float64,
                            device=device or next(model.parameters()).device)
        with torch.no_grad():
            for x, y in on_device:
                total += loss_fn(model(x).float(), y).double().sum()
        return reduce(total).item() / n_rows + penalty(weights, l2).item() + l1_term, None
    finally:
        model.train(was_training)
        for p in model.parameters():
            p.grad = None


def compiled(model: nn.Module, loss_fn: LossFn) -> int | None:
    """The loss's code if f and ∇f of `model` can come from `kernels.linear_rows` (a `Linear`
    model on the CPU, a loss the compiled loop knows, numba present), else None."""
    if kernels.numba is None or not isinstance(model, Linear) or model.linear.out_features > 1:
        return None
    return kernels.loss_code(loss_fn) if model.linear.weight.device.type == "cpu" else None


@torch.no_grad()
def _linear_value(model: "Linear", loss: int, batches: Iterable[Batch], l2: float, n_rows: int,
                  reduce: Reduce, l1: float = 0.0, lanes: int = 1) -> tuple[float, float]:
    """`value(..., gradient=True)` for a linear model in one pass over each batch's non-zeros
    (CSR batches; dense ones by two matrix products), with no autograd graph: f without the
    L1 term, and the norm of the smallest subgradient with it.

    Batches of `RowPieces` (rows read in place) are split among `lanes` lanes, each with its
    own copy of w beside its own gradient (8 bytes a feature a lane, so at most
    `LANE_BYTES` of them in all). On 2 cores, medians of 3 passes over scripts/bench_sparse.py's
    sets: 0.27 s against 0.46 s over batches read for one lane (2 M features), 0.08 against
    0.17 s (click logs). The lanes' sums are added in lane order: f's last digits depend on
    how many lanes there are, and nothing else."""
    w = model.linear.weight.detach()[0]
    scale = model.input.mult if model.input.active else None
    bias = float(model.linear.bias)
    lanes = max(1, min(lanes, LANE_BYTES // (8 * len(w))))
    wg = torch.zeros(lanes, len(w), 2, dtype=w.dtype)  # w beside ∇w: see kernels.linear_rows
    wg[:, :, 0] = w
    sums = np.zeros((lanes, 2))  # each lane's loss sum and Σ ∂loss/∂bias
    for x, y in batches:
        if isinstance(x, RowPieces):
            kernels.linear_pieces(x, y, wg, scale, bias, loss, sums)
            continue
        if x.layout == torch.sparse_csr:
            loss_sum, d_sum = kernels.linear_rows(x, y, wg[0], scale, bias, loss)
        else:
            x = model.input(x)
            s = (x @ w + bias).requires_grad_()
            with torch.enable_grad():
                losses = LOSS_FUNCTIONS[loss](s, y)
                (d,) = torch.autograd.grad(losses.sum(), s)
            wg[0, :, 1] += d @ x
            loss_sum, d_sum = losses.double().sum().item(), d.sum().item()
        sums[0] += loss_sum, d_sum
    grad_w = wg[0, :, 1]
    for lane in range(1, lanes):
        grad_w += wg[lane, :, 1]
    total = torch.tensor(sums[:, 0].sum(), dtype=torch.float64)
    bias_grad = float(sums[:, 1].sum())
    flat = reduce(torch.cat([grad_w, torch.tensor([bias_grad], dtype=grad_w.dtype)]))
    grad = flat / n_rows
    grad[:-1] += l2 * w
    f = reduce(total).item() / n_rows + penalty([w], l2).item()
    return f, subgradient_norm([w, model.linear.bias], [grad[:-1], grad[-1:]], [True, False], l1)


class FullBatch:
    """f and its derivatives over a training set held in memory, for full-batch solvers.

    Calling it is a PyTorch closure (as `torch.optim.LBFGS` wants): f at the current parameters,
    with ∇f left in their `.grad`. `hvp(v)` is the Hessian of f times v at the point of the last
    call, for Newton methods; it needs a model whose score is linear in its parameters (logistic
    regression, linear SVMs), where the Hessian is Jᵀ·diag(loss″)·J/n + λ on the weights.
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, batches: Iterable[Batch], l2: float,
                 n_rows: int, reduce: Reduce = _identity, second_order: bool = False) -> None:
        self.model, self.loss_fn, self.batches = model, loss_fn, batches
        self.l2, self.n_rows, self.reduce = l2, n_rows, reduce
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.names = [name for name, p in model.named_parameters() if p.requires_grad]
        self.weights = penalised_weights(model)
        self.penalised = [any(p is w for w in self.weights) for p in self.params]
        self.second_order = second_order
        self.curvature: list[Tensor] = []  # loss″(s_i) / n for each batch, at the last call
        self.loss_sum = torch.zeros((), dtype=torch.float64)
        self.scores: list[Tensor] = []  # each batch's scores at the last call
        self.last: tuple[list[int], Tensor, list[Tensor]] | None = None  # versions, f, ∇f
        self.evaluations = 0

    @torch.enable_grad()
    def __call__(self) -> Tensor:
        # At the point of the last call (no parameter changed in place since: the same
        # versions), f and ∇f are known: the Trainer's objective at an epoch's end is where the
        # solver's next iteration starts.
        versions = [p._version for p in self.params]
        if self.last is not None and self.last[0] == versions:
            for p, g in zip(self.params, self.last[2], strict=True):
                p.grad = g.clone()
            return self.last[1]
        self.evaluations += 1
        for p in self.params:
            p.grad = None
        total = torch.zeros((), dtype=torch.float64, device=self.params[0].device)
        curvature, self.scores = [], []
        for x, y in self.batches:
            scores = self.model(x).float()
            self.scores.append(scores.detach())
            s = scores.detach().requires_grad_()
            losses = self.loss_fn(s, y)
            (first,) = torch.autograd.grad(losses.sum(), s, create_graph=self.second_order)
            if self.second_order:
                (second,) = torch.autograd.grad(first.sum(), s)
                curvature.append(second / self.n_rows)
            scores.backward(first.detach() / self.n_rows)
            total += losses.detach().double().sum()
        self.curvature = curvature
        self.loss_sum = total.clone()  # this process's Σ loss, before the sum over processes
        grads = self.reduce(torch.cat([p.grad.reshape(-1) for p in self.params]))
        for p, g in zip(self.params, grads.split([p.numel() for p in self.params]), strict=True):
            p.grad.copy_(g.view_as(p))
        add_penalty_gradient(self.weights, self.l2)
        for p in self.params:  # torch.optim.LBFGS reads grad.view(-1): a column-major
            p.grad = p.grad.contiguous()  # weight (largeml.models.column_major) has its layout
        f = self.reduce(total) / self.n_rows + penalty(self.weights, self.l2)
        self.last = ([p._version for p in self.params], f, [p.grad.clone() for p in self.params])
        return f

    @torch.no_grad()
    def line(self, direction: Sequence[Tensor]) -> Callable[[float], float]:
        """φ(t) = f(θ + t·d) from the point of the last call, for a line search: the scores move
        by t·J·d, found in one pass here, so each φ(t) costs no pass over the data (a model
        whose score is linear in its parameters, as for `hvp`)."""
        values = {name: d for name, d in zip(self.names, direction, strict=True)}
        moves = [functional_call(self.model, values, (x,)).float() for x, _ in self.batches]
        weights = [(p.detach(), d) for p, d, penalised in
                   zip(self.params, direction, self.penalised, strict=True) if penalised]

        def phi(t: float) -> float:
            total = torch.zeros((), dtype=torch.float64, device=self.params[0].device)
            for (_, y), s, m in zip(self.batches, self.scores, moves, strict=True):
                total += self.loss_fn(s + t * m, y).double().sum()
            norm = sum((w.double() + t * d.double()).pow(2).sum() for w, d in weights)
            return (self.reduce(total) / self.n_rows + 0.5 * self.l2 * norm).item()

        return phi

    @torch.no_grad()
    def diagonal(self) -> list[Tensor]:
        """The Hessian's diagonal at the point of the last call, for a preconditioner: for
        score = input(x)·w + b, Σ_i loss″_i·input(x)_ij² / n (+ λ) for w and Σ_i loss″_i / n
        for b. Needs `largeml.models.Linear` (its `input` map and `linear` layer)."""
        width = self.model.linear.in_features
        w_diag = torch.zeros(width, dtype=torch.float64, device=self.params[0].device)
        b_diag = torch.zeros((), dtype=torch.float64, device=w_diag.device)
        for (x, _), curvature in zip(self.batches, self.curvature, strict=True):
            x = self.model.input(x)
            if x.layout == torch.sparse_csr:
                rows = torch.repeat_interleave(curvature, x.crow_indices().diff())
                w_diag.index_add_(0, x.col_indices(), (x.values().pow(2) * rows).double())
            else:
                w_diag += (curvature @ x.pow(2)).double()
            b_diag += curvature.double().sum()
        w_diag, b_diag = self.reduce(w_diag), self.reduce(b_diag)
        diag = {"linear.weight": (w_diag + self.l2).float().view(1, -1),
                "linear.bias": b_diag.float().view(1)}
        return [diag[name] for name in self.names]

    @torch.no_grad()
    def hessian(self) -> Tensor:
        """The whole Hessian at the point of the last call, float64, over the parameters
        flattened in order ([w, b] for `largeml.models.Linear`): Σ_i loss″_i·z_i·z_iᵀ / n + λ on
        w, with z_i = [input(x_i), 1]. (n_features + 1)² numbers: for narrow data only."""
        width = self.model.linear.in_features
        h = torch.zeros(width + 1, width + 1, dtype=torch.float64, device=self.params[0].device)
        for (x, _), curvature in zip(self.batches, self.curvature, strict=True):
            x = self.model.input(x)
            x = x.to_dense() if x.layout == torch.sparse_csr else x
            z = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype, device=x.device)], dim=1)
            # float32 products (2x faster): a Newton direction needs no more
            h += (z.t() @ (curvature.unsqueeze(1) * z)).double()
        h = self.reduce(h)
        h.diagonal()[:width] += self.l2
        order = {"linear.weight": slice(0, width), "linear.bias": slice(width, width + 1)}
        index = torch.cat([torch.arange(width + 1)[order[name]] for name in self.names])
        return h[index][:, index]

    @torch.enable_grad()
    def hvp(self, vectors: Sequence[Tensor]) -> list[Tensor]:
        """H·v for v given as one tensor per parameter, at the point of the last call."""
        if not self.second_order:
            raise RuntimeError("FullBatch(second_order=True) is needed for hvp")
        leaves = {name: v.detach().requires_grad_() for name, v in zip(self.names, vectors,
                                                                        strict=True)}
        for (x, _), curvature in zip(self.batches, self.curvature, strict=True):
            # The score is linear in the parameters, so the score at parameters v is J·v.
            jv = functional_call(self.model, leaves, (x,)).float()
            (jv * (curvature * jv.detach())).sum().backward()  # Jᵀ·diag(loss″/n)·J·v
        out = [leaves[name].grad if leaves[name].grad is not None
               else torch.zeros_like(leaves[name]) for name in self.names]
        flat = self.reduce(torch.cat([o.reshape(-1) for o in out]))
        out = [f.view_as(v) for f, v in zip(flat.split([v.numel() for v in vectors]), vectors,
                                             strict=True)]
        for o, v, penalised in zip(out, vectors, self.penalised, strict=True):
            if penalised:
                o.add_(v, alpha=self.l2)
        return out


# The losses `Streamed` knows the second derivative of (`kernels._curvature`).
SECOND_ORDER_LOSSES = (kernels.BCE, kernels.SQUARED_HINGE)
# `Streamed` keeps each row's loss″ at its point (4 bytes a row) while all of them take at most
# this: its Hessian products then need no scores, and read half the bytes a feature (one pass
# over scripts/bench_sparse.py's uniform set, 2 lanes: 0.12-0.17 s against 0.29 s). Beyond it
# (16 M rows) they compute each row's score and loss″ again at every pass, holding nothing
# that grows with the rows.
CURVATURE_BYTES = 64 << 20


def _rows_of(curvature: np.ndarray | None, first: int, n: int) -> np.ndarray | None:
    """Rows [first, first + n) of a pass's kept loss″ (None: none kept)."""
    if curvature is not None and first + n > len(curvature):
        raise RuntimeError("the training rows changed between passes")
    return None if curvature is None else curvature[first:first + n]


class Streamed:
    """`FullBatch` for a linear model over sparse rows read in place (`RowPieces`) on the CPU,
    holding none of them: each evaluation is one compiled pass over the shards' memory maps,
    split among `lanes` lanes (each with its own (n_features, 4) of numbers, 16 bytes a
    feature: at most `LANE_BYTES` in all), so the memory a solver takes is O(n_features),
    and at most `CURVATURE_BYTES` more, whatever the number of rows.

    Calling it gives f and ∇f, and in the same pass the Hessian's diagonal (`diagonal`, Newton's
    preconditioner) and each row's loss″ (up to `CURVATURE_BYTES` of them); `hvp(v)` is one
    pass computing x·v a row (and, where no loss″ was kept, each row's score with it);
    `line(d)(t)` evaluates f, ∇f and the diagonal at θ + t·d and keeps them, so that after a
    solver takes that step its next call costs no pass (LIBLINEAR's trust-region Newton does
    the same: one pass a Newton iteration besides its conjugate-gradient steps). `rows()` gives
    this process's training batches anew for each pass.
    """

    def __init__(self, model: Linear, loss: int, rows: Callable[[], Iterable[Batch]],
                 l2: float, n_rows: int, reduce: Reduce = _identity, lanes: int = 1) -> None:
        if loss not in SECOND_ORDER_LOSSES:
            raise ValueError(f"Streamed needs a loss with a second derivative, got code {loss}")
        self.model, self.loss, self.rows = model, loss, rows
        self.l2, self.n_rows, self.reduce = l2, n_rows, reduce
        self.names = [name for name, p in model.named_parameters() if p.requires_grad]
        if sorted(self.names) != ["linear.bias", "linear.weight"]:
            raise ValueError(f"Streamed needs a linear model's weight and bias, got {self.names}")
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.penalised = [name == "linear.weight" for name in self.names]
        width = model.linear.in_features
        lanes = max(1, min(lanes, LANE_BYTES // (16 * width)))
        self.own = torch.zeros(lanes, width, 4)
        self.last: dict | None = None  # f, ∇f, the diagonal, loss″ at the last call's point
        self.ahead: dict | None = None  # the same at the point `line` evaluated last
        self.loss_sum = torch.zeros((), dtype=torch.float64)
        self.n_local = 0  # this process's rows, counted by the first pass
        self.evaluations = 0
        # whether each evaluation keeps every row's loss″ (this process has at most n_rows)
        self.keeps_curvature = 4 * n_rows <= CURVATURE_BYTES

    def _point(self) -> tuple[Tensor, float]:
        return (self.model.linear.weight.detach().reshape(-1).clone(),
                float(self.model.linear.bias.detach()))

    def _scale(self) -> Tensor | None:
        return self.model.input.mult if self.model.input.active else None

    def _split(self, w: Tensor, b: Tensor | float) -> list[Tensor]:
        """(w, b) as one tensor per parameter, in the parameters' order and shapes."""
        values = {"linear.weight": w.view(1, -1), "linear.bias": torch.as_tensor(
            b, dtype=w.dtype).reshape(1)}
        return [values[name].contiguous() for name in self.names]

    @torch.no_grad()
    def _evaluate(self, w: Tensor, b: float) -> dict:
        """One pass at (w, b): f, ∇f, the Hessian's diagonal, this process's loss sum."""
        self.evaluations += 1
        own = self.own
        own[:, :, 0] = w
        own[:, :, 1:3] = 0
        sums = np.zeros((len(own), 3))
        # (this process's rows: counted by the first pass, at most n_rows before it)
        curvature = (np.empty(self.n_local or self.n_rows, np.float32) if self.keeps_curvature
                     else None)
        rows = 0
        for x, y in self.rows():
            kernels.newton_point(x, y, own, self._scale(), b, self.loss, sums,
                                 _rows_of(curvature, rows, len(y)))
            rows += len(y)
        self.n_local = rows
        # The lanes' columns summed as they lie, in float32 as each lane added them (40 ms over
        # 2 M features here, where each column taken apart and widened first cost 110-220 ms
        # a pass; and float64 copies of these vectors were most of a run's memory).
        features = self.reduce(own[:, :, 1:3].sum(0).t().contiguous()).div_(self.n_rows)
        grad_w = features[0].add_(w, alpha=self.l2)
        diag_w = features[1].add_(self.l2)
        loss_mean, grad_b, diag_b = (self.reduce(torch.from_numpy(sums.sum(0))) /
                                     self.n_rows).tolist()
        f = loss_mean + 0.5 * self.l2 * dot([w], [w]).item()
        return {"point": (w, b), "f": torch.tensor(f, dtype=torch.float64),
                "grads": self._split(grad_w, grad_b), "diagonal": self._split(diag_w, diag_b),
                "loss_sum": torch.tensor(sums[:, 0].sum(), dtype=torch.float64),
                "curvature": None if curvature is None else curvature[:rows]}

    def _at(self, w: Tensor, b: float) -> dict | None:
        for known in (self.last, self.ahead):
            if known is not None and known["point"][1] == b and torch.equal(known["point"][0], w):
                return known
        return None

    def __call__(self) -> Tensor:
        w, b = self._point()
        self.last = self._at(w, b) or self._evaluate(w, b)
        if self.last is self.ahead:  # the solver stepped there: keep one copy, not two
            self.ahead = None
        for p, g in zip(self.params, self.last["grads"], strict=True):
            p.grad = g.clone()
        self.loss_sum = self.last["loss_sum"].clone()
        return self.last["f"].clone()

    def line(self, direction: Sequence[Tensor]) -> Callable[[float], float]:
        """φ(t) = f(θ + t·d) from the point of the last call: one pass each, whose ∇f and
        diagonal are kept for the next call if the solver steps to θ + t·d."""
        w, b = self.last["point"]
        moves = dict(zip(self.names, direction, strict=True))
        d_w, d_b = moves["linear.weight"].reshape(-1), float(moves["linear.bias"])

        def phi(t: float) -> float:
            # θ + t·d as a solver's p.add_(d, alpha=t) makes it, so that `_at` finds it
            moved = torch.tensor([b]).add_(torch.tensor([d_b]), alpha=t)
            self.ahead = self._evaluate(w.add(d_w, alpha=t), float(moved))
            return self.ahead["f"].item()

        return phi

    def diagonal(self) -> list[Tensor]:
        """The Hessian's diagonal at the point of the last call (kept from its pass)."""
        return [d.clone() for d in self.last["diagonal"]]

    @torch.no_grad()
    def hvp(self, vectors: Sequence[Tensor]) -> list[Tensor]:
        """H·v at the point of the last call: one pass."""
        w, b = self.last["point"]
        v = dict(zip(self.names, vectors, strict=True))
        sums = np.zeros((len(self.own), 1))
        v_b = float(v["linear.bias"])
        curvature = self.last["curvature"]
        # v and H·v a lane; with the rows' loss″ at hand, (n, 2) of them in the first half of
        # `own`, else w beside them to compute it
        own = (self.own if curvature is None else
               self.own.view(len(self.own), -1, 2)[:, :self.own.shape[1]])
        own[:, :, 0] = v["linear.weight"].reshape(-1)
        own[:, :, 1] = 0
        if curvature is None:
            own[:, :, 2] = w
        rows = 0
        for x, y in self.rows():
            kernels.newton_hvp(x, y, own, self._scale(), b, v_b, self.loss, sums,
                               _rows_of(curvature, rows, len(y)))
            rows += len(y)
        hv_w = self.reduce(own[:, :, 1].sum(0)).div_(self.n_rows)
        hv_w.add_(v["linear.weight"].reshape(-1), alpha=self.l2)
        return self._split(hv_w, float(self.reduce(torch.from_numpy(sums.sum(0)))) / self.n_rows)

    @torch.no_grad()
    def hessian(self) -> Tensor:
        """The whole Hessian at the point of the last call, float64, over the parameters in
        order (see `FullBatch.hessian`): one pass, O(the rows' non-zeros squared)."""
        w, b = self.last["point"]
        width = len(w)
        h = np.zeros((width + 1, width + 1))
        for x, y in self.rows():
            kernels.newton_hessian(x, y, w, self._scale(), b, self.loss, h)
        h = self.reduce(torch.from_numpy(h)) / self.n_rows
        h.diagonal()[:width] += self.l2
        order = {"linear.weight": slice(0, width), "linear.bias": slice(width, width + 1)}
        index = torch.cat([torch.arange(width + 1)[order[name]] for name in self.names])
        return h[index][:, index]
