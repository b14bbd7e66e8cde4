"""`objective.Streamed`, the full-batch closure that reads a linear model's sparse rows in place
at every pass, against `objective.FullBatch` over the same rows held as CSR tensors: f, ∇f,
the Hessian's diagonal, Hessian products and the whole Hessian, in one lane and several; and
Newton through the Trainer, streamed against held."""

import functools
import logging
import os

import pytest
import torch

from largeml import kernels, objective
from largeml.data.sources import files
from largeml.data.stream import RowPieces, ShardStream
from largeml.losses import bce, squared_hinge
from largeml.models import Linear
from largeml.schedules import constant
from largeml.solvers import Newton
from largeml.trainer import Trainer

from conftest import write_sparse_shards

pytestmark = [pytest.mark.unit,
              pytest.mark.skipif(kernels.numba is None, reason="numba is not installed")]


def _model(features: int) -> Linear:
    torch.manual_seed(0)
    model = Linear(features)
    torch.nn.init.normal_(model.linear.weight, std=0.5)
    torch.nn.init.constant_(model.linear.bias, -0.2)
    model.input.set(torch.zeros(features), torch.linspace(0.5, 2.0, features))
    return model


@pytest.mark.parametrize("loss_fn", [bce, squared_hinge])
@pytest.mark.parametrize("lanes", [1, 2, 3])
@pytest.mark.parametrize("keep", [True, False], ids=["loss'' kept", "loss'' recomputed"])
def test_a_streamed_closure_is_the_full_batch_closure(tmp_path, loss_fn, lanes, keep):
    stream = ShardStream(write_sparse_shards(tmp_path / "s", 1500, 300), batch_size=512,
                         shuffle=False)  # 15 shards of 100 rows: pieces of several shards
    model = _model(300)
    held = objective.FullBatch(model, loss_fn, [(x, y) for x, y in stream], 1e-3, 1500,
                               second_order=True)
    streamed = objective.Streamed(model, kernels.loss_code(loss_fn), stream.batches_in_place,
                                  1e-3, 1500, lanes=lanes)
    assert len(streamed.own) == lanes and streamed.keeps_curvature  # 1500 rows: kept
    streamed.keeps_curvature = keep  # as past objective.CURVATURE_BYTES
    f_held = held().item()
    g_held = [p.grad.clone() for p in model.parameters()]
    f = streamed().item()
    assert f == pytest.approx(f_held, rel=1e-7)
    for p, g in zip(model.parameters(), g_held, strict=True):
        assert p.grad.shape == g.shape
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-7)
    for a, b in zip(streamed.diagonal(), held.diagonal(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    v = [torch.randn_like(p) for p in model.parameters()]
    for a, b in zip(streamed.hvp(v), held.hvp(v), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(streamed.hessian(), held.hessian(), rtol=1e-5, atol=1e-8)
    assert streamed.n_local == 1500 and streamed.evaluations == 1

    # φ(t) is f at θ + t·d; stepping there, the next call reuses its pass
    d = [torch.randn_like(p) * 0.1 for p in model.parameters()]
    phi_held, phi = held.line(d), streamed.line(d)
    assert phi(1.0) == pytest.approx(phi_held(1.0), rel=1e-7)
    assert phi(0.5) == pytest.approx(phi_held(0.5), rel=1e-7)
    assert streamed.evaluations == 3
    with torch.no_grad():
        for p, dj in zip(model.parameters(), d, strict=True):
            p.add_(dj, alpha=0.5)
    assert streamed().item() == pytest.approx(held().item(), rel=1e-7)
    assert streamed.evaluations == 3  # θ + 0.5·d was the last point φ evaluated
    for a, b in zip(streamed.hvp(v), held.hvp(v), strict=True):  # with that point's loss″
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_newton_over_rows_read_in_place_reaches_the_held_rows_optimum(tmp_path):
    """optimizer=newton over sparse shards on the CPU holds no rows: it reads them in place at
    each pass, and stops where Newton over the rows held stops: the same f, the same model."""
    data = files(str(write_sparse_shards(tmp_path / "train", 3000, 2500, nnz=12)),
                 str(write_sparse_shards(tmp_path / "val", 700, 2500, nnz=12, seed=1)),
                 batch_size=512)

    def run(name: str, lanes: int | None) -> tuple[dict, Trainer]:
        trainer = Trainer(model=Linear(2500), data=data, loss_fn=bce,
                          optimizer=functools.partial(Newton), scheduler=constant, l2=1e-3,
                          run_dir=tmp_path / name, config={}, hparams={}, device="cpu",
                          max_epochs=30, tol=1e-6)
        assert trainer.eval_lanes == len(os.sched_getaffinity(0))
        if lanes is not None:
            trainer.eval_lanes = lanes  # 0: rows held as CSR tensors, as for any data
        return trainer.fit(), trainer

    (held, held_trainer), (streamed, trainer) = run("held", 0), run("streamed", None)
    assert isinstance(trainer.closure, objective.Streamed) and not trainer.held
    assert isinstance(held_trainer.closure, objective.FullBatch) and held_trainer.held
    assert streamed["converged"] and held["converged"]
    assert streamed["train/objective"] == pytest.approx(held["train/objective"], rel=1e-6)
    assert streamed["val/accuracy"] == pytest.approx(held["val/accuracy"], abs=2e-3)
    assert streamed["perf/samples_per_sec"] > 0
    assert streamed["solver/iterations"] == held["solver/iterations"] == streamed["step"]
    assert streamed["solver/cg_iterations"] >= streamed["solver/iterations"]
    w, w_held = trainer.module.linear.weight, held_trainer.module.linear.weight
    assert (w - w_held).norm() <= 1e-3 * w_held.norm()


def test_auto_newton_streams_sparse_files_too_large_to_hold(compose_config, tmp_path,
                                                             monkeypatch, caplog):
    """optimizer=auto on sparse shards past auto.SPARSE_HOLD_MAX: Newton still, since its
    passes read the rows in place (auto.streams_in_place says what the Trainer then does)."""
    from largeml import auto
    from largeml.train import run

    train = write_sparse_shards(tmp_path / "train", 3000, 2500, nnz=12)
    overrides = ["data=files", f"data.train_path={train}"]
    caplog.set_level(logging.INFO)
    # Read by a DataLoader worker, the rows are not read in place: small, they are held
    held = run(compose_config(*overrides, "data.num_workers=1"), tmp_path / "held")
    assert "optimizer=auto: newton" in caplog.text and "rows held" in caplog.text
    caplog.clear()
    monkeypatch.setattr(auto, "SPARSE_HOLD_MAX", 1)
    streamed = run(compose_config(*overrides), tmp_path / "streamed")
    assert "optimizer=auto: newton" in caplog.text and "read in place" in caplog.text
    assert streamed["converged"] and held["converged"]
    assert streamed["train/objective"] == pytest.approx(held["train/objective"], rel=1e-6)
    caplog.clear()  # a weighted loss has no compiled passes: FTRL streams the rows instead
    run(compose_config(*overrides, "loss.class_weight=balanced", "trainer.max_epochs=2"),
        tmp_path / "weighted")
    assert "optimizer=auto: ftrl" in caplog.text

    # Under torchrun each rank reads its share in place (2 processes against 1:
    # tests/test_distributed.py); where the rows cannot be read in place, adagrad streams them
    monkeypatch.setenv("WORLD_SIZE", "2")
    data = files(str(train), None, batch_size=512)
    for extra, chosen in [([], "newton"), (["data.num_workers=1"], "adagrad"),
                          (["loss.class_weight=balanced"], "adagrad")]:
        name, why = auto.optimizer(compose_config(*overrides, *extra), data, torch.device("cpu"))
        assert name == chosen, (extra, why)
        assert ("read them in place" in why) == (chosen == "newton")


@pytest.mark.parametrize("lanes", [1, 2])
def test_feature_scaling_from_rows_in_place_is_scaling_from_csr_batches(tmp_path, lanes):
    """data.scale's pass over rows read in place (one compiled pass, each lane its share of a
    batch's rows and its own maxima) finds each feature's max |x| exactly as over the CSR
    batches read for it."""
    from largeml.data import scaling

    root = write_sparse_shards(tmp_path / "train", 3000, 2500, nnz=12)
    stream = ShardStream(root, batch_size=256, shuffle=False)
    kernels.set_threads(lanes)

    def fitted(batches):
        return scaling.fit("maxabs", batches, 2500, True, lambda t: t, lambda t: t,
                           torch.device("cpu"))

    assert next(iter(stream))[0].layout == torch.sparse_csr
    assert isinstance(next(stream.batches_in_place())[0], RowPieces)
    in_place, csr = fitted(stream.batches_in_place()), fitted(iter(stream))
    assert in_place.kind == csr.kind == "maxabs"
    assert torch.equal(in_place.mult, csr.mult) and (csr.mult != 1).any()


def test_the_compiled_loops_lanes_leave_torchs_threads_as_the_trainer_set_them(tmp_path):
    """numba's OpenMP layer runs on torch's OpenMP runtime: setting its lanes must not change
    torch's intra-op threads (an FTRL run set to one torch thread had run every torch op of its
    steps on two)."""
    data = files(str(write_sparse_shards(tmp_path / "train", 600, 300)), None, batch_size=128)
    before = torch.get_num_threads()
    try:
        trainer = Trainer(model=Linear(300), data=data, loss_fn=bce,
                          optimizer=functools.partial(torch.optim.SGD, lr=0.1),
                          scheduler=constant, l2=1e-3, run_dir=tmp_path / "run", config={},
                          hparams={}, device="cpu", max_epochs=1, num_threads=1)
        assert trainer.eval_lanes == len(os.sched_getaffinity(0))
        assert torch.get_num_threads() == trainer.num_threads == 1
        kernels.set_threads(2)
        assert torch.get_num_threads() == 1
        assert trainer.fit()["cpu_threads"] == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
