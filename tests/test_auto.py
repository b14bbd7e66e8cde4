"""`optimizer=auto` and `scheduler=auto`: what they choose from the model and the data."""

import pytest
import torch

from largeml import auto
from largeml.data import synthetic

pytestmark = pytest.mark.unit

CPU = torch.device("cpu")


@pytest.fixture
def data():
    return synthetic(n_samples=500, n_features=5)


@pytest.mark.parametrize("model, budget, optimizer, scheduler", [
    ("logreg", 1 << 30, "largeml.solvers.Newton", "largeml.schedules.constant"),
    ("svm", 1 << 30, "largeml.solvers.Newton", "largeml.schedules.constant"),
    ("logreg", 1000, "torch.optim.Adagrad", "largeml.schedules.constant"),  # does not fit
    ("mlp", 1 << 30, "torch.optim.Adam", "largeml.schedules.constant"),
])
def test_auto_picks_from_the_model_and_the_data(compose_config, data, monkeypatch, model, budget,
                                                optimizer, scheduler):
    monkeypatch.setattr(auto, "memory_budget", lambda device: budget)
    cfg = compose_config(f"model={model}")
    chosen = auto.resolve(cfg, data, CPU)
    assert cfg.optimizer._target_ == optimizer and cfg.scheduler._target_ == scheduler
    assert {"optimizer", "scheduler"} <= set(chosen)


def test_auto_keeps_a_given_lr_and_an_explicit_choice(compose_config, data):
    cfg = compose_config("model=mlp", "optimizer.lr=0.02")
    auto.resolve(cfg, data, CPU)
    assert (cfg.optimizer._target_, cfg.optimizer.lr) == ("torch.optim.Adam", 0.02)


def test_auto_mlp_takes_its_step_and_stops_early_on_validation(compose_config, data):
    cfg = compose_config("model=mlp", "data.batch_size=1024")
    chosen = auto.resolve(cfg, data, CPU)
    assert cfg.optimizer.lr == auto.MLP_LR
    assert cfg.trainer.early_stopping_patience == auto.EARLY_STOPPING_PATIENCE
    assert chosen["early_stopping_patience"] == str(auto.EARLY_STOPPING_PATIENCE)
    assert cfg.trainer.tol == 0  # early stopping instead of the objective's rule
    assert cfg.data.batch_size == auto.MLP_BATCH_ROWS == int(chosen["data.batch_size"])
    for patience in (7, 0):  # a given patience stands, and so does tol; 0: no early stopping
        cfg = compose_config("model=mlp", f"trainer.early_stopping_patience={patience}",
                             "data.batch_size=64")
        assert "data.batch_size" not in auto.resolve(cfg, data, CPU)
        assert cfg.trainer.early_stopping_patience == patience and cfg.trainer.tol == 1e-4
        assert cfg.data.batch_size == 64  # smaller batches stand
    cfg = compose_config("model=mlp", "optimizer=adam", "data.batch_size=1024")
    auto.resolve(cfg, data, CPU)
    assert cfg.data.batch_size == 1024  # an explicit optimizer keeps the batch as set
    cfg = compose_config("model=logreg")
    auto.resolve(cfg, data, CPU)
    assert cfg.trainer.early_stopping_patience is None  # convex: to the optimum

    cfg = compose_config("optimizer=sgd")  # explicit: only the scheduler is auto
    assert auto.resolve(cfg, data, CPU) == {"scheduler": "cosine"}
    assert cfg.scheduler._target_ == "largeml.schedules.cosine"
    cfg = compose_config("optimizer=sgd", "scheduler=step")
    assert auto.resolve(cfg, data, CPU) == {}


def test_memory_budget_is_a_share_of_what_can_be_had():
    assert 0 < auto.memory_budget(CPU) <= auto.available_ram()
