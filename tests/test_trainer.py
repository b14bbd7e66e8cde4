"""The Trainer's step against the objective it claims to minimise, computed independently."""

import functools
from pathlib import Path

import pytest
import torch

from largeml import losses
from largeml.data import synthetic
from largeml.models import MLP, Linear, l2_penalty
from largeml.schedules import constant
from largeml.trainer import Trainer


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
