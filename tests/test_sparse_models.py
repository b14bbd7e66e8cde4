"""Sparse CSR batches through the models: same scores and gradients as the dense batch, memory
and work proportional to the non-zeros, and the Trainer's step on them trains."""

import functools

import pytest
import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from largeml.data import DataModule
from largeml.losses import bce, hinge, squared_hinge
from largeml.models import MLP, Linear
from largeml.schedules import constant
from largeml.trainer import Trainer

# Every CSR constructor warns that CSR support is beta; that is known and not under test.
pytestmark = [pytest.mark.unit,
              pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")]

NEWS20_FEATURES = 1_350_000


def random_csr(
    rows: int,
    n_features: int,
    max_nnz: int,
    generator: torch.Generator,
    index_dtype: torch.dtype = torch.int64,
) -> Tensor:
    """A CSR batch with 0..max_nnz distinct sorted columns per row (so some rows may be empty).
    PyTorch requires crow_indices and col_indices of one dtype: both int64 or both int32."""
    cols, counts = [], []
    for _ in range(rows):
        k = int(torch.randint(0, max_nnz + 1, (), generator=generator))
        row = torch.randint(0, n_features, (k,), generator=generator).unique()
        cols.append(row)
        counts.append(len(row))
    crow = torch.zeros(rows + 1, dtype=index_dtype)
    crow[1:] = torch.tensor(counts).cumsum(0)
    col = torch.cat(cols).to(index_dtype)
    values = torch.randn(len(col), generator=generator)
    return torch.sparse_csr_tensor(crow, col, values, size=(rows, n_features),
                                   check_invariants=True)


def randomised_linear(n_features: int) -> Linear:
    """Linear starts at zero; random weights make the comparison mean something."""
    model = Linear(n_features)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    return model


MODELS = {
    "linear": lambda n: randomised_linear(n),
    "mlp": lambda n: MLP(n, hidden_sizes=(16, 8), activation="tanh"),
    "mlp-no-hidden": lambda n: MLP(n, hidden_sizes=()),
}


@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("name", list(MODELS))
def test_sparse_scores_and_gradients_match_dense(name: str, index_dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    model = MODELS[name](50)
    x = random_csr(32, 50, max_nnz=10, generator=torch.Generator().manual_seed(1),
                   index_dtype=index_dtype)
    weights = torch.randn(32)

    def scores_and_grads(batch: Tensor) -> tuple[Tensor, list[Tensor]]:
        model.zero_grad(set_to_none=True)
        scores = model(batch)
        (scores * weights).sum().backward()
        return scores.detach(), [p.grad.clone() for p in model.parameters()]

    sparse_scores, sparse_grads = scores_and_grads(x)
    dense_scores, dense_grads = scores_and_grads(x.to_dense())
    assert sparse_scores.shape == (32,)
    torch.testing.assert_close(sparse_scores, dense_scores)
    named = model.named_parameters()
    for (pname, _), sparse, dense in zip(named, sparse_grads, dense_grads, strict=True):
        assert sparse.shape == dense.shape, pname
        torch.testing.assert_close(sparse, dense, msg=f"gradient of {pname}")


def test_linear_empty_rows_score_the_bias() -> None:
    model = randomised_linear(50)
    crow = torch.tensor([0, 0, 2, 2])  # rows 0 and 2 have no non-zeros
    x = torch.sparse_csr_tensor(crow, torch.tensor([3, 7]), torch.tensor([1.0, -2.0]),
                                size=(3, 50), check_invariants=True)
    scores = model(x)
    bias, w = model.linear.bias.detach(), model.linear.weight.detach()[0]
    torch.testing.assert_close(scores[[0, 2]], bias.expand(2))
    torch.testing.assert_close(scores[1], w[3] - 2 * w[7] + bias[0])


def test_mlp_state_dict_keeps_nn_linear_shapes() -> None:
    """Checkpoints rely on the nn.Linear shapes; only the first weight's memory layout differs
    (column-major, so the sparse path reads contiguous rows of weight.t())."""
    model = MLP(50, hidden_sizes=(16, 8))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == {
        "input.shift": (50,), "input.mult": (50,), "input.active": (),  # the feature map
        "net.0.weight": (16, 50), "net.0.bias": (16,),
        "net.2.weight": (8, 16), "net.2.bias": (8,),
        "net.4.weight": (1, 8), "net.4.bias": (1,),
    }
    assert model.net[0].weight.t().is_contiguous()


def test_sparse_batch_of_the_wrong_width_names_n_features() -> None:
    x = random_csr(4, 60, max_nnz=5, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="n_features=60"):
        Linear(50)(x)


LARGE_MODELS = {
    "linear": lambda: Linear(NEWS20_FEATURES),
    "mlp": lambda: MLP(NEWS20_FEATURES, hidden_sizes=(8,)),
}


def _forward_backward(model: nn.Module, x: Tensor) -> None:
    model(x).sum().backward()


class LargestTensors(TorchDispatchMode):
    """Records each aten op run under it with the most elements of a dense tensor it reads or
    returns. A CSR batch is not dense: its index and value arrays count, at their own size."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[str, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        sizes = [t.numel() for t in tree_leaves((args, kwargs, out))
                 if isinstance(t, Tensor) and t.layout == torch.strided]
        self.ops.append((str(func), max(sizes, default=0)))
        return out


@pytest.mark.parametrize("name", list(LARGE_MODELS))
def test_large_sparse_batch_takes_the_sparse_path(name: str) -> None:
    """Forward and backward of 64 rows × 1.35 M features never build the dense batch (86 M
    floats, which the dense path multiplies): no op reads or returns a dense tensor larger than
    the model's largest weight, whose gradient is dense. (This was a wall-clock bound, < 1 s;
    on a shared CPU that fails for the load, not the code, so the test counts instead.)"""
    model = LARGE_MODELS[name]()
    x = random_csr(64, NEWS20_FEATURES, max_nnz=200, generator=torch.Generator().manual_seed(0))
    largest_weight = max(p.numel() for p in model.parameters())
    assert largest_weight < x.shape[0] * x.shape[1] / 4  # so the bound below can tell
    with LargestTensors() as recorded:
        _forward_backward(model, x)
    assert recorded.ops, "the recorder saw no op"
    too_large = [(op, n) for op, n in recorded.ops if n > largest_weight]
    assert not too_large, f"dense tensors larger than the weight ({largest_weight}): {too_large}"


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def _reset_peak_rss() -> None:
    # Writing 5 to clear_refs resets VmHWM to the current RSS (Linux ≥ 4.0).
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


@pytest.mark.parametrize("name", list(LARGE_MODELS))
def test_large_sparse_batch_is_never_densified(name: str) -> None:
    """The peak RSS of forward + backward grows by the weight gradient and the non-zeros' work
    (Linear ~10 MB, MLP(8) ~50 MB), far below one dense (rows × n_features) float batch
    (345 MB). A transient dense tensor would raise the peak even if freed before returning."""
    try:
        _reset_peak_rss()
    except OSError as error:
        pytest.skip(f"cannot reset the peak RSS through /proc/self/clear_refs: {error}")
    model = LARGE_MODELS[name]()
    x = random_csr(64, NEWS20_FEATURES, max_nnz=200, generator=torch.Generator().manual_seed(0))
    dense_bytes = x.shape[0] * x.shape[1] * 4
    _reset_peak_rss()
    before = _peak_rss_bytes()
    _forward_backward(model, x)
    grown = _peak_rss_bytes() - before
    assert grown < dense_bytes / 3, f"peak RSS grew by {grown / 2**20:.0f} MiB"


class OneBatch:
    """A `BatchDataset` of one batch, the same every epoch."""

    def __init__(self, x: Tensor, y: Tensor) -> None:
        self.x, self.y, self.n_rows = x, y, len(y)

    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        if index != 0:
            raise IndexError(index)
        return self.x, self.y

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        pass


@pytest.mark.parametrize("loss_fn", [bce, hinge, squared_hinge])
@pytest.mark.parametrize("make_model", [lambda n: Linear(n), lambda n: MLP(n, (16,))],
                         ids=["linear", "mlp"])
def test_training_on_a_separable_sparse_problem(tmp_path, make_model, loss_fn) -> None:
    """Trainer.train_step on a CSR batch (forward → mean loss → backward → L2 on the weight
    gradients → clip → step): the loss must fall on a linearly separable sparse problem."""
    torch.manual_seed(0)
    n_features, rows = 200, 256
    x = random_csr(rows, n_features, max_nnz=12, generator=torch.Generator().manual_seed(2))
    x.values().abs_()
    truth = torch.randn(n_features)
    y = (x.to_dense() @ truth > 0).float()  # labels only; the model sees the CSR batch
    data = DataModule(train=OneBatch(x, y), val=None, n_features=n_features,
                      description="one CSR batch", n_train=rows, sparse=True)
    trainer = Trainer(model=make_model(n_features), data=data, loss_fn=loss_fn,
                      optimizer=functools.partial(torch.optim.SGD, lr=0.5, momentum=0.9),
                      scheduler=constant, l2=1e-4, run_dir=tmp_path, config={}, hparams={},
                      device="cpu", grad_clip_norm=10.0, num_threads=1)
    losses = [trainer.train_step([data.train[0]]).item() / rows for _ in range(50)]
    assert trainer.step == 50
    assert losses[-1] < 0.5 * losses[0], losses
    with torch.no_grad():
        accuracy = ((trainer.module(x) > 0).float() == y).float().mean().item()
    assert accuracy > 0.9
