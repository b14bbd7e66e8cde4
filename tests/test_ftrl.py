"""FTRL-Proximal (largeml/ftrl.py) and the compiled loops under it (largeml/kernels.py): the
row-by-row loop against FTRL in plain Python, the compiled f, ∇f and scores against autograd and
dense algebra, the batch form on CSR against dense batches, FTRL's fixed point against the
documented objective's optimum, and its state through a checkpoint."""

import functools
import io
import os
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from largeml import auto, kernels, objective
from largeml.data.sources import files
from largeml.data.stream import RowPieces, ShardStream
from largeml.errors import ConfigError
from largeml.ftrl import FTRL
from largeml.losses import bce, hinge, squared_hinge
from largeml.losses import weighted as weighted_loss
from largeml.models import Linear
from largeml.solvers import Newton

from conftest import write_sparse_shards

pytestmark = pytest.mark.unit

needs_numba = pytest.mark.skipif(kernels.numba is None, reason="numba is not installed")


def csr(rows: int, width: int, nnz: int, seed: int = 0) -> torch.Tensor:
    """A CSR batch with repeated features in some rows and a few empty rows."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(0, nnz + 1, size=rows)
    crow = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    cols = rng.integers(0, width, size=crow[-1]).astype(np.int32)
    vals = rng.random(crow[-1]).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.sparse_csr_tensor(torch.from_numpy(crow), torch.from_numpy(cols),
                                       torch.from_numpy(vals), size=(rows, width))


def reference_rows(x, y, state, scale, bias, alpha, beta, l2, rows_before, loss_fn):
    """FTRL row by row, in plain Python: what the compiled loop must compute."""
    crow, cols, vals = x.crow_indices().tolist(), x.col_indices().tolist(), x.values().tolist()
    state, bias = state.double().clone(), bias.clone()

    def weight(z, root, decay):
        return 0.0 if z == 0 else -z / ((beta + root) / alpha + decay)

    losses = []
    for r in range(len(y)):
        decay = l2 * (rows_before + r)
        span = range(crow[r], crow[r + 1])
        ws = [weight(state[cols[i], 0].item(), state[cols[i], 1].item(), decay) for i in span]
        s = weight(bias[0].item(), bias[1].item(), 0.0) + sum(
            w * scale[cols[i]].item() * vals[i] for w, i in zip(ws, span, strict=True))
        score = torch.tensor(s, dtype=torch.float64, requires_grad=True)
        loss = loss_fn(score, y[r].double())
        (d,) = torch.autograd.grad(loss, score)
        losses.append(loss.item())
        for w, i in zip(ws, span, strict=True):
            c = cols[i]
            g = d.item() * scale[c].item() * vals[i]
            root = state[c, 1].item()
            state[c, 0] += g - ((root ** 2 + g ** 2) ** 0.5 - root) / alpha * w
            state[c, 1] = (root ** 2 + g ** 2) ** 0.5
        g, root = d.item(), bias[1].item()
        w = weight(bias[0].item(), root, 0.0)
        bias[0] += g - ((root ** 2 + g ** 2) ** 0.5 - root) / alpha * w
        bias[1] = (root ** 2 + g ** 2) ** 0.5
    return torch.tensor(losses, dtype=torch.float64), state, bias


@needs_numba
@pytest.mark.parametrize("loss_fn", [bce, hinge, squared_hinge])
def test_the_compiled_loop_is_ftrl_row_by_row(loss_fn):
    x, width = csr(60, 20, 6), 20  # 20 features: repeats within rows and across them
    g = torch.Generator().manual_seed(1)
    state = torch.zeros(width, kernels.WIDTH)
    state[:, kernels.Z] = 0.1 * torch.randn(width, generator=g)
    state[:, kernels.ROOT] = torch.rand(width, generator=g)
    scale = 0.5 + torch.rand(width, generator=g)
    state[::5, kernels.Z] = 0  # never seen
    bias = torch.tensor([0.2, 0.5], dtype=torch.float64)
    y = (torch.rand(60, generator=g) > 0.5).float()
    expected = reference_rows(x, y, state, scale, bias, 0.3, 1.0, 0.01, 7, loss_fn)
    losses = kernels.ftrl_rows(x, y, state, scale, bias, 0.3, 1.0, 0.01, 7,
                               kernels.LOSSES[loss_fn])
    torch.testing.assert_close(losses.double(), expected[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(state.double(), expected[1], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bias, expected[2], rtol=1e-6, atol=1e-8)


@pytest.fixture
def two_lanes():
    """numba's loops on two threads for the test (they may have been set to fewer)."""
    if kernels.numba is None or kernels.numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("Hogwild lanes need numba and two threads")
    before = kernels.lanes()
    kernels.set_threads(2)
    yield
    kernels.set_threads(before)


@pytest.mark.parametrize("loss_fn", [bce, hinge])
def test_hogwild_lanes_on_features_of_their_own_are_ftrl_on_each_lanes_rows(two_lanes, loss_fn):
    """optimizer.hogwild=2, where no feature is in both halves of the batch (so nothing races):
    each half's features are FTRL over that half's rows alone, from the batch's start, and the
    bias's z and n are the start's plus both halves' changes."""
    g = torch.Generator().manual_seed(3)
    halves = [csr(30, 10, 6, seed=1), csr(30, 10, 6, seed=2)]  # features 0-9, then 10-19
    zeros = torch.zeros(30, 10)
    x = torch.cat([torch.cat([halves[0].to_dense(), zeros], 1),
                   torch.cat([zeros, halves[1].to_dense()], 1)])

    def rows_of(part):  # as CSR with int32 indices, as the data path gives them
        c = part.to_sparse_csr()
        return torch.sparse_csr_tensor(c.crow_indices().int(), c.col_indices().int(), c.values(),
                                       size=c.shape)
    state = torch.zeros(20, kernels.WIDTH)
    state[:, kernels.Z] = 0.1 * torch.randn(20, generator=g)
    state[:, kernels.ROOT] = torch.rand(20, generator=g)
    scale = 0.5 + torch.rand(20, generator=g)
    bias = torch.tensor([0.2, 0.5], dtype=torch.float64)
    y = (torch.rand(60, generator=g) > 0.5).float()
    expected = [reference_rows(rows_of(x[rows]), y[rows], state, scale, bias, 0.3, 1.0, 0.01,
                               7 + rows.start, loss_fn)
                for rows in (slice(0, 30), slice(30, 60))]
    losses = kernels.ftrl_rows(rows_of(x), y, state, scale, bias, 0.3, 1.0, 0.01, 7,
                               kernels.LOSSES[loss_fn], lanes=2)
    torch.testing.assert_close(losses.double(), torch.cat([e[0] for e in expected]),
                               rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(state[:10].double(), expected[0][1][:10], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(state[10:].double(), expected[1][1][10:], rtol=1e-4, atol=1e-5)
    start = torch.tensor([0.2, 0.5], dtype=torch.float64)
    z = start[0] + sum(e[2][0] - start[0] for e in expected)
    n = start[1] ** 2 + sum(e[2][1] ** 2 - start[1] ** 2 for e in expected)
    torch.testing.assert_close(bias, torch.stack([z, n.sqrt()]), rtol=1e-6, atol=1e-8)


@needs_numba
@pytest.mark.parametrize("shrink", [0.0, 0.3])
@pytest.mark.parametrize("compiled", [True, False])
def test_the_compiled_weights_are_the_torch_forms(shrink, compiled, monkeypatch):
    """`settle`'s compiled pass (and its torch fallback, writing into the same view) against
    `ftrl_weights`' torch ops: a feature never seen (z = 0) and, with L1, every |z| ≤ λ1·t,
    weigh exactly 0."""
    rng = np.random.default_rng(0)
    state = torch.from_numpy(np.stack([rng.normal(size=1000), rng.random(1000) * 3], 1)
                             .astype(np.float32))
    state[:100] = 0.0  # never seen
    reference = kernels.ftrl_weights(state[:, 0], state[:, 1], 0.3, 1.0, 0.02, shrink)
    if not compiled:  # the torch ops, as on the GPU
        monkeypatch.setattr(kernels, "available", lambda x: False)
    out = torch.full((1000,), np.nan)
    kernels.ftrl_weights_into(state, 0.3, 1.0, 0.02, shrink, out)
    torch.testing.assert_close(out, reference, rtol=1e-6, atol=0)
    assert torch.equal(out == 0, reference == 0) and int((out == 0).sum()) >= 100


@needs_numba
def test_compiled_scores_and_gradients_agree_with_dense_algebra():
    x, width = csr(300, 50, 12), 50
    d, w, scale = torch.randn(300), torch.randn(50), 0.5 + torch.rand(50)
    dense = x.to_dense()
    torch.testing.assert_close(kernels.csr_matvec(x, w, scale, 0.25),
                               dense @ (w * scale) + 0.25, rtol=1e-5, atol=1e-5)
    out = torch.zeros(width)
    kernels.csr_rmatvec(x, d, scale, out)
    torch.testing.assert_close(out, (d @ dense) * scale, rtol=1e-5, atol=1e-5)


@needs_numba
def test_the_compiled_linear_layer_has_the_torch_layers_scores_and_gradients():
    x = csr(200, 40, 10, seed=3)
    model = Linear(40)
    torch.nn.init.normal_(model.linear.weight)
    model.input.set(torch.zeros(40), 0.5 + torch.rand(40))
    y = (torch.rand(200) > 0.5).float()
    bce(model(x), y).sum().backward()  # the compiled path: CSR on the CPU
    compiled = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    bce(model(x.to_dense()), y).sum().backward()  # the dense path
    for a, b in zip(compiled, (p.grad for p in model.parameters()), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def bce_with(scores, targets, scale):
    return bce(scale * scores, targets)


def test_sparse_and_dense_batch_steps_take_the_same_path():
    """FTRL's batch form (the GPU's) on CSR batches and on dense ones is one algorithm."""
    width = 30
    batches = [(csr(64, width, 6, seed=s), (torch.rand(64) > 0.5).float()) for s in range(20)]
    models, optimizers = [], []
    for _ in range(2):
        model = Linear(width)
        model.input.set(torch.zeros(width), torch.linspace(0.5, 2, width))
        models.append(model)
        optimizers.append(FTRL(model.parameters(), lr=0.2, l2=1e-3))
    for x, y in batches:  # a loss with keywords takes the batch form on CSR too
        optimizers[0].step_batch(models[0], x, y, functools.partial(bce_with, scale=1.0))
        optimizers[1].step_batch(models[1], x.to_dense(), y, bce)
    for opt in optimizers:
        opt.settle()
    for a, b in zip(*(m.parameters() for m in models), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert models[0].linear.weight.abs().sum() > 0


@pytest.mark.parametrize("hogwild", [1, 2])
@pytest.mark.parametrize("loss_fn", [bce, hinge])
def test_ftrl_reaches_the_objectives_optimum(loss_fn, hogwild, request):
    """λ·t in FTRL's closed form makes the documented objective's optimum its fixed point:
    after enough epochs f is where Newton (or, for the hinge, a long subgradient run) puts it;
    with optimizer.hogwild=2 too, whose two lanes share 40 features (and race on them)."""
    if hogwild > 1:
        request.getfixturevalue("two_lanes")
    width, l2 = 40, 1e-3
    batches = [(csr(100, width, 8, seed=s), None) for s in range(10)]
    w_true = torch.randn(width)
    batches = [(x, ((x @ w_true) + 0.5 * torch.randn(100) > 2).float()) for x, _ in batches]
    model = Linear(width)
    opt = FTRL(model.parameters(), lr=0.5, l2=l2, hogwild=hogwild)
    for _ in range(300):
        for x, y in batches:
            opt.step_batch(model, x, y, loss_fn)
    opt.settle()
    f_ftrl = objective.value(model, loss_fn, batches, l2, 1000)[0]
    reference = Linear(width)
    if loss_fn is bce:
        newton = Newton(reference.parameters())
        closure = objective.FullBatch(reference, bce, batches, l2, 1000, second_order=True)
        for _ in range(20):
            newton.step(closure)
    else:  # the optimum of the hinge: full-batch subgradient descent with decreasing steps
        x = torch.cat([x.to_dense() for x, _ in batches]).double().numpy()
        t = 2 * torch.cat([y for _, y in batches]).double().numpy() - 1
        w, b = np.zeros(width), 0.0
        for k in range(4000):
            active = t * (x @ w + b) < 1
            step = 1.0 / (1 + k) ** 0.5
            w -= step * (-(t[active] @ x[active]) / len(t) + l2 * w)
            b -= step * -t[active].sum() / len(t)
        with torch.no_grad():
            reference.linear.weight.copy_(torch.from_numpy(w).view(1, -1))
            reference.linear.bias.fill_(b)
    f_opt = objective.value(reference, loss_fn, batches, l2, 1000)[0]
    assert f_ftrl <= f_opt * (1 + 2e-3) + 1e-6, (f_ftrl, f_opt)


def test_state_round_trips_and_the_next_steps_are_the_same():
    width = 25
    batches = [(csr(32, width, 5, seed=s), (torch.rand(32) > 0.5).float()) for s in range(6)]
    model = Linear(width)
    opt = FTRL(model.parameters(), lr=0.3, l2=1e-2)
    for x, y in batches[:3]:
        opt.step_batch(model, x, y, bce)
    saved = {k: v.clone() if torch.is_tensor(v) else v
             for k, v in opt.state_dict()["state"]["ftrl"].items()}
    state_dict = opt.state_dict()
    other = Linear(width)
    resumed = FTRL(other.parameters(), lr=0.3, l2=1e-2)
    resumed.load_state_dict(state_dict)
    for x, y in batches[3:]:
        opt.step_batch(model, x, y, bce)
        resumed.step_batch(other, x, y, bce)
    opt.settle()
    resumed.settle()
    assert torch.equal(model.linear.weight, other.linear.weight)
    assert saved["rows"] == 3 * 32


def _large_pages_allowed(t: torch.Tensor) -> bool:
    """Whether Linux may map t's memory with large pages (THPeligible of its mapping)."""
    for block in re.split(r"\n(?=[0-9a-f]+-[0-9a-f]+ )", Path("/proc/self/smaps").read_text()):
        lo, hi = (int(v, 16) for v in block.split(None, 1)[0].split("-"))
        if lo <= t.data_ptr() < hi:
            return re.search(r"THPeligible:\s+(\d)", block)[1] == "1"
    raise AssertionError("no mapping holds the tensor")


THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


@pytest.mark.skipif(not THP.exists() or "[never]" in THP.read_text(),
                    reason="needs Linux with transparent huge pages")
def test_a_large_state_is_on_large_pages_from_the_start_and_after_a_resume():
    width = 600_000  # 4.8 MB of state: more than two large pages
    model = Linear(width)
    opt = FTRL(model.parameters(), lr=0.3)
    features = opt.state["ftrl"]["features"]
    assert features.shape == (width, kernels.WIDTH) and features.dtype == torch.float32
    assert not features.any() and _large_pages_allowed(features)
    opt.step_batch(model, csr(64, width, 20, seed=0), (torch.rand(64) > 0.5).float(), bce)
    assert features.any()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    if "[madvise]" in THP.read_text():  # (with "always", all memory may be on them)
        assert not _large_pages_allowed(loaded["state"]["ftrl"]["features"])  # torch's own
    resumed = FTRL(Linear(width).parameters(), lr=0.3)
    resumed.load_state_dict(loaded)
    assert torch.equal(resumed.state["ftrl"]["features"], features)
    assert _large_pages_allowed(resumed.state["ftrl"]["features"])
    small = FTRL(Linear(25).parameters()).state["ftrl"]["features"]  # under one page: torch's
    assert small.shape == (25, kernels.WIDTH) and not small.any()


def test_ftrl_takes_linear_models_in_one_process():
    from largeml.distributed import Processes
    from largeml.trainer import _check_batch_optimizer

    with pytest.raises(ValueError, match="linear model"):
        FTRL(torch.nn.Linear(3, 4).parameters())
    with pytest.raises(ValueError, match="hogwild"):
        FTRL(Linear(3).parameters(), hogwild=0)
    with pytest.raises(ConfigError, match="optimizer=adagrad"):
        _check_batch_optimizer(Processes(rank=0, world_size=2, local_rank=0,
                                         local_world_size=2), 1, None)
    with pytest.raises(ConfigError, match="accumulate_grad_batches"):
        _check_batch_optimizer(Processes(), 2, None)


def test_auto_streams_large_sparse_files_with_ftrl(compose_config, tmp_path, monkeypatch):
    data = files(str(write_sparse_shards(tmp_path / "train", 2000, 300)))
    cfg = compose_config("data=files", f"data.train_path={tmp_path / 'train'}")
    assert auto.optimizer(cfg, data, torch.device("cpu"))[0] == "newton"  # small: held
    monkeypatch.setattr(auto, "SPARSE_HOLD_MAX", data.held_bytes - 1)
    # Too large to hold, but Newton's passes can read the rows in place (compiled lanes) ...
    assert auto.optimizer(cfg, data, torch.device("cpu"))[0] == (
        "newton" if kernels.numba is not None else "ftrl")
    # ... and where they cannot (a weighted loss is not compiled), FTRL streams them
    cfg = compose_config("data=files", f"data.train_path={tmp_path / 'train'}",
                         "loss.class_weight=balanced")
    chosen = auto.resolve(cfg, data, torch.device("cpu"))
    assert cfg.optimizer._target_ == "largeml.ftrl.FTRL"
    assert cfg.scheduler._target_ == "largeml.schedules.constant"
    # FTRL learns row by row: auto reads 4096 rows a step (8 non-zeros a row here) ...
    assert cfg.data.batch_size == 4096 and chosen["data.batch_size"] == "4096"
    # ... but not for rows so wide that 4096 of them pass 2^20 non-zeros, nor below a given size
    monkeypatch.setattr(auto, "FTRL_BATCH_NNZ", 8 * 2000)
    cfg = compose_config("data=files", f"data.train_path={tmp_path / 'train'}",
                         "loss.class_weight=balanced")
    auto.resolve(cfg, data, torch.device("cpu"))
    assert cfg.data.batch_size == 2000
    cfg = compose_config("data=files", f"data.train_path={tmp_path / 'train'}",
                         "loss.class_weight=balanced", "data.batch_size=8192")
    assert "data.batch_size" not in auto.resolve(cfg, data, torch.device("cpu"))
    cfg = compose_config("data=files", f"data.train_path={tmp_path / 'train'}", "optimizer=ftrl")
    assert auto.resolve(cfg, data, torch.device("cpu")) == {"scheduler": "constant"}
    assert cfg.data.batch_size == 1024


@needs_numba
@pytest.mark.parametrize("loss_fn", [bce, hinge, squared_hinge])
@pytest.mark.parametrize("scaled", [False, True])
def test_the_compiled_objective_is_the_autograd_one(loss_fn, scaled):
    """objective.value's one-pass f and ‖∇f‖ for a linear model equal FullBatch's."""
    model = Linear(30)
    torch.nn.init.normal_(model.linear.weight, std=0.3)
    torch.nn.init.constant_(model.linear.bias, 0.1)
    if scaled:
        model.input.set(torch.zeros(30), 0.5 + torch.rand(30))
    batches = [(csr(50, 30, 6, seed=s), (torch.rand(50) > 0.5).float()) for s in range(4)]
    batches.append((batches[0][0].to_dense(), batches[0][1]))  # a dense batch among them
    fast = objective.value(model, loss_fn, batches, 1e-2, 250, gradient=True)
    full = objective.FullBatch(model, loss_fn, batches, 1e-2, 250)
    f = full().item()
    g = torch.cat([p.grad.reshape(-1) for p in full.params]).norm().item()
    assert fast == pytest.approx((f, g), rel=1e-5)


@needs_numba
@pytest.mark.parametrize("weighted", [False, True])
def test_rows_read_in_place_are_learnt_as_the_rows_read(tmp_path, weighted):
    """FTRL on a stream's RowPieces (its rows read where they lie in the shards' memory maps)
    takes the very steps it takes on the same batches read as CSR tensors, bit for bit; also
    for a loss its compiled loop does not know (class weights), which takes the CSR batch."""
    loss_fn = weighted_loss(bce, torch.tensor([1.0, 3.0])) if weighted else bce
    stream = ShardStream(write_sparse_shards(tmp_path / "s", 1500, 300), batch_size=256,
                         shuffle=True, seed=2)

    def learn(in_place: bool) -> list[torch.Tensor]:
        stream.in_place = in_place
        model = Linear(300)
        model.input.set(torch.zeros(300), torch.linspace(0.5, 2.0, 300))
        optimizer = FTRL(model.parameters(), l2=1e-3, l1=1e-4)
        steps = []
        for epoch in range(2):
            stream.set_epoch(epoch)
            for x, y in stream:
                assert isinstance(x, RowPieces) == in_place
                steps.append(optimizer.step_batch(model, x, y, loss_fn))
        optimizer.settle()
        state = optimizer.state["ftrl"]
        return [torch.cat(steps), state["features"], state["bias"], model.linear.weight]

    read, placed = learn(False), learn(True)
    for a, b in zip(read, placed, strict=True):
        assert torch.equal(a, b)


@needs_numba
@pytest.mark.parametrize("loss_fn", [bce, hinge])
def test_the_objective_over_rows_read_in_place_is_the_objective(tmp_path, loss_fn):
    """objective.value over a stream's RowPieces, in one lane or several side by side, is f and
    ‖∇f‖ over the same batches read as CSR tensors: in one lane bit for bit (the same sums in
    the same order), in more up to the order of the additions."""
    stream = ShardStream(write_sparse_shards(tmp_path / "s", 1500, 300), batch_size=512,
                         shuffle=False)  # 15 shards of 100 rows: pieces of several shards
    model = Linear(300)
    torch.nn.init.normal_(model.linear.weight, std=0.5)
    torch.nn.init.constant_(model.linear.bias, -0.2)
    model.input.set(torch.zeros(300), torch.linspace(0.5, 2.0, 300))
    read = objective.value(model, loss_fn, stream, 1e-3, 1500, gradient=True)
    for lanes in (1, 2, 3):
        placed = objective.value(model, loss_fn, stream.batches_in_place(), 1e-3, 1500,
                                 gradient=True, lanes=lanes)
        if lanes == 1:
            assert placed == read
        else:
            assert placed == pytest.approx(read, rel=1e-6)
    assert all(p.grad is None for p in model.parameters())


@needs_numba
def test_the_trainers_objective_pass_reads_its_rows_in_place(tmp_path):
    """On the CPU, FTRL's run over sparse shards measures f and validates with the rows read in
    place, in a lane a core, and measures what it measures with the rows read as CSR tensors:
    the same validation, bit for bit, and f up to the order of its additions."""
    from largeml.schedules import constant
    from largeml.trainer import Trainer

    data = files(str(write_sparse_shards(tmp_path / "train", 1500, 300)),
                 str(write_sparse_shards(tmp_path / "val", 700, 300, seed=1)), batch_size=256)

    def run(lanes: int | None) -> dict:
        trainer = Trainer(model=Linear(300), data=data, loss_fn=bce,
                          optimizer=functools.partial(FTRL), scheduler=constant, l2=1e-3,
                          run_dir=tmp_path / f"run-{lanes}", config={}, hparams={},
                          device="cpu", max_epochs=3)
        assert trainer.eval_lanes == len(os.sched_getaffinity(0))
        if lanes is not None:
            trainer.eval_lanes = lanes  # 0: read as CSR tensors
        return trainer.fit()

    read, placed = run(0), run(None)
    assert placed["epoch"] == read["epoch"] == 3
    assert placed["train/objective"] == pytest.approx(read["train/objective"], rel=1e-9)
    assert placed["train/grad_norm_rel"] == pytest.approx(read["train/grad_norm_rel"], rel=1e-5)
    for key in ("val/loss", "val/accuracy", "val/auc"):
        assert placed[key] == read[key]


@needs_numba
def test_a_linear_model_scores_rows_read_in_place_as_it_scores_them_read(tmp_path):
    stream = ShardStream(write_sparse_shards(tmp_path / "s", 1500, 300), batch_size=512,
                         shuffle=True, seed=3)  # pieces of several shards in each batch
    model = Linear(300)
    torch.nn.init.normal_(model.linear.weight)
    model.input.set(torch.zeros(300), torch.linspace(0.5, 2.0, 300))
    for threads in (1, 2):
        kernels.set_threads(threads)
        with torch.no_grad():
            for (x, _), (pieces, _) in zip(stream, stream.batches_in_place(), strict=True):
                assert torch.equal(model(pieces), model(x))
    with torch.enable_grad():  # a step that wants gradients takes the CSR batch
        pieces, _ = next(iter(stream.batches_in_place()))
        model(pieces).sum().backward()
    assert model.linear.weight.grad.abs().sum() > 0
