"""FTRL-Proximal (McMahan et al., "Ad Click Prediction: a View from the Trenches", KDD 2013) for
a linear model, with per-feature adaptive steps and a step that costs O(the batch's non-zeros).

Per feature j the state is z_j (gradients summed, less the proximal terms) and n_j (squared
gradients summed); the weight is a closed form of them,

    w_j = −z_j / ((β + √n_j) / α + λ·t)

after t rows, and learning from gradient g_j does

    σ = (√(n_j + g_j²) − √n_j) / α,   z_j += g_j − σ·w_j,   n_j += g_j².

A feature absent from a batch has g_j = 0, which changes neither z_j nor n_j: only the features
present are touched, and nothing is owed to the others. The L2 term is where this FTRL differs
from the paper's: λ·t, not a constant. After t rows FTRL minimises Σ_s g_s·w + the proximal
terms + r_t(w); with r_t = t·λ/2·‖w‖² that is t times the documented objective, mean loss +
λ/2·‖w‖², linearised, so a fixed point has ∇loss + λw = 0: the optimum of the objective the rest
of largeml minimises (`largeml.objective`), reached exactly, with no per-step decay of the
absent features (tests/test_ftrl.py checks it against the Newton solver).

The state is one (n_features, 2) tensor, feature by feature (z and √n side by side: one cache
line holds a feature's state; see `largeml.kernels`); the model's input map scales the values
inside the step. On the CPU (with numba) a batch is learnt row by row, as in the paper and in
Vowpal Wabbit: each row's score, loss and update in one compiled loop; on the GPU, for dense
batches and for losses that loop does not know, in one step per batch, all rows' gradients
taken at the same weights. Either way t counts rows and the gradients are of the rows' summed
loss, so the two forms share a state and a fixed point. The model's own weights are written
from the state by `settle()`, which the Trainer calls before anything reads the model
(validation, checkpoints, the end of training). The bias has the same FTRL step, without L2.

With `l1` (regularization.l1: + λ1·‖w‖₁), as in the paper, z is soft-thresholded first:
w_j = 0 while |z_j| ≤ λ1·t, else the same closed form of z_j − sign(z_j)·λ1·t: exact zeros,
and again the fixed point is the documented objective's optimum (t times it is what FTRL
minimises).

`hogwild` = N > 1 learns each batch on N cores at once (the compiled loop; `kernels._ftrl_lanes`):
each core takes its share of the batch's rows, in order, and all share the state without locks,
as in Hogwild (Niu et al. 2011). Where the features are many and each row holds few of them,
two cores seldom touch one feature at once and the loop runs nearly N times as fast (the
uniform set of scripts/bench_sparse.py, the loop alone over its rows in memory: 0.21 s an epoch
against 0.39 s; through the CLI, beside validation and the checkpoint's write, 0.42 against
0.46 s); where a few features are in most rows (click logs' hot values), the cores take those
features' cache lines from each other and it runs slower (that set: 0.34 against 0.16 s, and
0.43 against 0.24 s through the CLI). The numbers then depend on the threads'
timing: a run is not repeated bit for bit, as it is with the default, 1. (CPU only: on the GPU
the batch step, one step for all of a batch's rows, takes no lanes.)

`lr` is α, a feature's first step, for features scaled to about [−1, 1] (which `data.scale=auto`
gives); β = 1, the paper's suggestion, keeps the first steps bounded.
"""

import torch
from torch import Tensor
from torch.optim import Optimizer

from largeml import kernels
from largeml.data.stream import RowPieces
from largeml.errors import ConfigError
from largeml.kernels import ROOT, Z
from largeml.models import Linear


class FTRL(Optimizer):
    """See the module docstring. `step_batch` is the step; `settle` writes the weights."""

    takes_batches = True  # the Trainer hands it batches, not gradients
    reads_in_place = kernels.numba is not None  # on the CPU, RowPieces (see step_batch)
    takes_l1 = True  # regularization.l1: the paper's own L1 (exact zeros)

    def __init__(self, params, lr: float = 0.3, beta: float = 1.0, l2: float = 0.0,
                 l1: float = 0.0, hogwild: int = 1) -> None:
        super().__init__(params, {"lr": lr, "beta": beta, "l2": l2, "l1": l1})
        if isinstance(hogwild, bool) or not isinstance(hogwild, int) or hogwild < 1:
            raise ValueError(f"FTRL's hogwild is a number of cores >= 1 (1: row by row), "
                             f"got {hogwild!r}")
        self.hogwild = hogwild  # cores learning at once in the compiled loop (1: row by row)
        params = [p for group in self.param_groups for p in group["params"]]
        if len(params) != 2 or params[0].dim() != 2 or params[0].shape[0] != 1:
            raise ValueError("FTRL trains a linear model (one weight row and a bias): logreg "
                             "or svm")
        self.weight, self.bias = params
        device = self.weight.device
        self.state["ftrl"] = {
            "features": self._zeros(self.weight.shape[1], device),
            "bias": torch.zeros(2, dtype=torch.float64),  # z, √n; on the CPU, read every step
            "rows": 0,  # rows learnt from: the t of λ·t
        }
        self._settled: int | None = None  # the rows learnt when settle() last wrote the model
        self._stepped = False  # whether step_batch has called step() yet

    # -- the step ---------------------------------------------------------------------------

    def step_batch(self, model: Linear, x: Tensor, y: Tensor, loss_fn) -> Tensor:
        """Learns from batch (x, y); returns the per-row losses, detached. `model` is the
        `Linear` whose parameters this optimizer holds."""
        if not isinstance(model, Linear):
            raise ConfigError(f"optimizer=ftrl trains a linear model on the input features "
                              f"(model=logreg or model=svm), not a {type(model).__name__}")
        state = self.state["ftrl"]
        features = state["features"]
        # The model's input map (fitted before the first step) scales each feature's values.
        scale = model.input.mult if model.input.active else None
        group = self.param_groups[0]
        alpha, beta, l2, l1 = group["lr"], group["beta"], group["l2"], group.get("l1", 0.0)
        loss = kernels.loss_code(loss_fn)
        if isinstance(x, RowPieces) and (loss is None or kernels.numba is None):
            x = x.csr()  # rows read in place, but for a step that wants a CSR batch
        sparse = x.layout == torch.sparse_csr
        if isinstance(x, RowPieces):
            losses = kernels.ftrl_pieces(x, y, features, scale, state["bias"], alpha, beta, l2,
                                         state["rows"], loss, l1, self.hogwild)
        elif sparse and kernels.available(x) and loss is not None:
            losses = kernels.ftrl_rows(x, y, features, scale, state["bias"], alpha, beta, l2,
                                       state["rows"], loss, l1, self.hogwild)
        else:
            losses = self._batch_step(model, x, y, loss_fn, alpha, beta, l2 * state["rows"],
                                      l1 * state["rows"])
        state["rows"] += y.shape[0]
        if not self._stepped:  # torch's LR scheduler checks, once, that step() came first
            self.step()  # (torch's wrappers make a call cost ~20 µs: not on every batch)
            self._stepped = True
        return losses

    @staticmethod
    def learns_in_lanes(loss_fn, sparse: bool, device: torch.device) -> bool:
        """Whether `step_batch` takes this run's batches in the compiled loop, whose rows
        `hogwild` splits among cores (else in `_batch_step`, one step a batch)."""
        return (device.type == "cpu" and sparse and kernels.numba is not None
                and kernels.loss_code(loss_fn) is not None)

    def step(self, closure=None) -> None:
        """Nothing: FTRL learns in `step_batch` (which calls this once)."""

    def _batch_step(self, model: Linear, x: Tensor, y: Tensor, loss_fn, alpha: float,
                    beta: float, decay: float, shrink: float = 0.0) -> Tensor:
        """One step for the whole batch, every row's gradient taken at the same weights: the
        form for the GPU, dense batches and losses the compiled loop does not know."""
        features, scale = self.state["ftrl"]["features"], model.input.mult
        bias = self._bias_value(alpha, beta)
        sparse = x.layout == torch.sparse_csr
        if sparse:
            scores = kernels.ftrl_scores(x, features, scale, alpha, beta, decay, bias, shrink)
        else:
            x = model.input(x)
            w = kernels.ftrl_weights(features[:, Z], features[:, ROOT], alpha, beta, decay,
                                     shrink)
            scores = x @ w + bias
        scores.requires_grad_()
        losses = loss_fn(scores, y)
        (d,) = torch.autograd.grad(losses.sum(), scores)
        with torch.no_grad():
            if sparse:
                kernels.ftrl_update(x, d, features, scale, alpha, beta, decay, shrink)
            else:  # x is already scaled by the model's input map
                features[:, Z], features[:, ROOT] = kernels.ftrl_step(
                    features[:, Z], features[:, ROOT], d @ x, w, alpha)
            self._bias_update(float(d.sum()), alpha, beta)
        return losses.detach()

    def _bias_value(self, alpha: float, beta: float) -> float:
        z, root = self.state["ftrl"]["bias"].tolist()
        return 0.0 if z == 0 else -z / ((beta + root) / alpha)

    def _bias_update(self, g: float, alpha: float, beta: float) -> None:
        b = self.state["ftrl"]["bias"]
        z, root = b.tolist()
        b[0], b[1] = kernels.ftrl_step(z, root, g, self._bias_value(alpha, beta), alpha)

    @staticmethod
    def _zeros(n_features: int, device: torch.device) -> Tensor:
        """A zero state for `n_features`: on the CPU on large pages (`kernels.zeros_on_huge_pages`:
        the compiled loop reads it at random features)."""
        if device.type == "cpu":
            return kernels.zeros_on_huge_pages(n_features, kernels.WIDTH)
        return torch.zeros(n_features, kernels.WIDTH, device=device)

    # -- the model's view -------------------------------------------------------------------

    @torch.no_grad()
    def settle(self) -> None:
        """Writes the weights the state stands for into the model's parameters (O(features));
        nothing to do if no row was learnt since the last call."""
        state, group = self.state["ftrl"], self.param_groups[0]
        if self._settled == state["rows"]:
            return
        alpha, beta, features = group["lr"], group["beta"], state["features"]
        rows = state["rows"]
        kernels.ftrl_weights_into(features, alpha, beta, group["l2"] * rows,
                                  group.get("l1", 0.0) * rows, self.weight.view(-1))
        self.bias.fill_(self._bias_value(alpha, beta))
        self._settled = state["rows"]

    def load_state_dict(self, state_dict) -> None:
        super().load_state_dict(state_dict)
        # Optimizer.load_state_dict moves the state of each parameter to its device; ours is
        # kept under "ftrl", not under a parameter, so it is moved here.
        state = self.state["ftrl"]
        features = state["features"]
        state["features"] = self._zeros(features.shape[0], self.weight.device)
        state["features"].copy_(features)
        state["bias"] = state["bias"].cpu()
        self._settled = None
