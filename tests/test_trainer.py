"""The Trainer's step against the objective it claims to minimise, computed independently."""

import functools
from pathlib import Path

import pytest
import torch

from largeml import losses
from largeml.data import synthetic
from largeml.models import MLP, Linear, l2_penalty
from largeml.schedules import constant
from largeml.trainer import Diverged, Trainer

pytestmark = pytest.mark.unit


def make_trainer(model: torch.nn.Module, loss_fn, l2: float, run_dir: Path, **kwargs) -> Trainer:
    data = synthetic(n_samples=200, n_features=5, val_fraction=0.2, batch_size=40)
    return Trainer(
        model=model, data=data, loss_fn=loss_fn,
        optimizer=functools.partial(torch.optim.SGD, lr=1.0),
        scheduler=constant, l2=l2, run_dir=run_dir, config={}, hparams={},
        device="cpu", **kwargs,
    )


@pytest.mark.parametrize("loss_fn", [losses.bce, losses.hinge, losses.squared_hinge])
@pytest.mark.parametrize("make_model", [lambda: Linear(5), lambda: MLP(5, hidden_sizes=[4])])
def test_step_follows_the_gradient_of_mean_loss_plus_l2(tmp_path, loss_fn, make_model):
    torch.manual_seed(0)
    model = make_model()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    lam = 0.3
    trainer = make_trainer(model, loss_fn, lam, tmp_path)
    x, y = trainer.data.train[0]
    before = [p.detach().clone() for p in model.parameters()]

    objective = loss_fn(model(x), y).mean() + lam * l2_penalty(model)
    expected_grads = torch.autograd.grad(objective, list(model.parameters()))
    trainer.train_step([(x, y)])  # plain SGD with lr 1: p ← p − ∇

    for p, p0, g in zip(model.parameters(), before, expected_grads, strict=True):
        torch.testing.assert_close(p.detach(), p0 - g, rtol=1e-5, atol=1e-6)
    trainer.logger.close()


def test_accumulated_step_weights_every_row_equally(tmp_path):
    """Micro-batches of different sizes: the step is the mean over all their rows."""
    model = Linear(5)
    trainer = make_trainer(model, losses.bce, 0.0, tmp_path)
    x, y = trainer.data.train[0]
    parts = [(x[:30], y[:30]), (x[30:], y[30:])]
    expected = torch.autograd.grad(losses.bce(model(x), y).mean(), list(model.parameters()))
    before = [p.detach().clone() for p in model.parameters()]
    total = trainer.train_step(parts)
    for p, p0, g in zip(model.parameters(), before, expected, strict=True):
        torch.testing.assert_close(p.detach(), p0 - g)
    assert total.item() == pytest.approx(losses.bce(torch.zeros(40), y).sum().item(), rel=1e-6)
    trainer.logger.close()


def test_checkpoint_holds_the_weights_of_its_step_while_training_goes_on(tmp_path,
                                                                          monkeypatch):
    # The file is written by a thread while the next steps change the weights: it must hold
    # the weights of the step it is named after, not later ones.
    import time

    import largeml.trainer
    from largeml.checkpoint import load_checkpoint, save_checkpoint

    def slow_save(state, path):  # the next epoch's steps run meanwhile
        time.sleep(0.3)
        save_checkpoint(state, path)

    monkeypatch.setattr(largeml.trainer, "save_checkpoint", slow_save)
    torch.manual_seed(0)
    trainer = make_trainer(Linear(5), losses.bce, 0.01, tmp_path, max_epochs=2, tol=0)
    saved = {}  # the weights after each step, taken by the training thread itself
    train_step = trainer.train_step

    def step_and_remember(*args, **kwargs):
        total = train_step(*args, **kwargs)
        saved[trainer.step] = {k: v.clone() for k, v in trainer.module.state_dict().items()}
        return total

    trainer.train_step = step_and_remember
    trainer.fit()
    files = sorted((tmp_path / "checkpoints").glob("step-*.pt"))
    assert len(files) == 2
    for path in files:
        state = load_checkpoint(path)
        step = state["step"]
        for key, value in state["model"].items():
            assert torch.equal(value, saved[step][key]), (path, key)
    # The first epoch's weights differ from the second's: a copy taken late would not.
    first, second = (load_checkpoint(p)["model"]["linear.weight"] for p in files)
    assert not torch.equal(first, second)


def test_a_failed_checkpoint_write_fails_the_run(tmp_path, monkeypatch):
    import largeml.trainer

    def refuse(state, path):
        raise OSError(f"No space left on device: {path}")

    monkeypatch.setattr(largeml.trainer, "save_checkpoint", refuse)
    trainer = make_trainer(Linear(5), losses.bce, 0.01, tmp_path, max_epochs=2, tol=0)
    with pytest.raises(OSError, match="No space left"):
        trainer.fit()


def test_training_leaves_the_objects_it_started_with_out_of_full_collections(tmp_path,
                                                                             monkeypatch):
    """fit() freezes what is alive when training starts (a full collection over it, in the
    checkpoint thread, had slowed an epoch's steps by 0.13 s) and unfreezes it at the end, also
    when training fails; objects the caller froze stay frozen."""
    import gc

    frozen_in_steps = []
    trainer = make_trainer(Linear(5), losses.bce, 0.01, tmp_path / "a", max_epochs=1, tol=0)
    step = trainer.train_step
    monkeypatch.setattr(trainer, "train_step", lambda *a, **k: (
        frozen_in_steps.append(gc.get_freeze_count()), step(*a, **k))[1])
    assert gc.get_freeze_count() == 0
    trainer.fit()
    assert frozen_in_steps and min(frozen_in_steps) > 0 and gc.get_freeze_count() == 0

    failing = make_trainer(Linear(5), losses.bce, 0.01, tmp_path / "b", max_epochs=1, tol=0)
    monkeypatch.setattr(failing, "train_step", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        failing.fit()
    assert gc.get_freeze_count() == 0

    gc.freeze()  # the caller's own
    try:
        assert gc.get_freeze_count() > 0
        make_trainer(Linear(5), losses.bce, 0.01, tmp_path / "c", max_epochs=1, tol=0).fit()
        assert gc.get_freeze_count() > 0  # not unfrozen by fit()
    finally:
        gc.unfreeze()


def test_a_checkpoints_copy_reuses_the_last_copys_tensors_with_the_new_values():
    from largeml.trainer import _snapshot

    weight, state = torch.randn(3, 4), torch.zeros(5, 2)
    live = {"model": {"weight": weight}, "optimizer": [state, 7], "map": torch.ones(1).expand(6)}
    first = _snapshot(live)
    assert first["model"]["weight"] is not weight and torch.equal(first["model"]["weight"], weight)
    weight.add_(1.0)
    state.fill_(2.0)
    live["model"]["bias"] = torch.ones(2)  # new in this state: a new tensor
    live["optimizer"][1] = 8
    second = _snapshot(live, first)
    assert second["model"]["weight"] is first["model"]["weight"]  # the same memory, new values
    assert torch.equal(second["model"]["weight"], weight)
    assert second["optimizer"][0] is first["optimizer"][0]
    assert torch.equal(second["optimizer"][0], state) and second["optimizer"][1] == 8
    assert torch.equal(second["model"]["bias"], torch.ones(2))
    assert torch.equal(second["map"], torch.ones(6)) and second["map"].stride(0) == 0
    weight.add_(1.0)  # training goes on: the copy stays as it was
    assert not torch.equal(second["model"]["weight"], weight)
    third = _snapshot({"model": {"weight": torch.zeros(2, 2)}}, second)  # another shape
    assert third["model"]["weight"] is not second["model"]["weight"]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_weight_not_finite_is_never_saved(tmp_path, bad):
    trainer = make_trainer(Linear(5), losses.bce, 0.01, tmp_path, max_epochs=1, tol=0)
    trainer.fit()
    saved = sorted((tmp_path / "checkpoints").glob("step-*.pt"))
    with torch.no_grad():
        trainer.module.linear.weight[0, 3] = bad
    trainer.step += 1  # a step not saved yet
    with pytest.raises(Diverged, match="weights are not finite"):
        trainer.save_checkpoint()
    assert sorted((tmp_path / "checkpoints").glob("step-*.pt")) == saved


def test_all_finite_is_torchs_isfinite_all():
    from largeml.trainer import _all_finite

    values = torch.randn(1000)
    assert _all_finite(values) and _all_finite(torch.zeros(0))
    for bad in (float("nan"), float("inf"), -float("inf")):
        for where in (0, 500, 999):
            broken = values.clone()
            broken[where] = bad
            assert not _all_finite(broken) and not bool(torch.isfinite(broken).all())
    assert _all_finite(torch.full((3,), torch.finfo(torch.float32).max))
