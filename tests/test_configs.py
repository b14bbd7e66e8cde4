"""Every shipped config composes and trains; the defaults train properly; config semantics hold."""

import math
from pathlib import Path

import pytest
import torch
from conftest import SMALL

from largeml.checkpoint import load_checkpoint
from largeml.data.sources import A9A_DIR
from largeml.errors import ConfigError
from largeml.train import CONFIG_DIR, run

pytestmark = pytest.mark.unit

SHIPPED = sorted(
    (group.name, path.stem)
    for group in Path(CONFIG_DIR).iterdir() if group.is_dir()
    for path in group.glob("*.yaml")
)


def test_every_group_has_configs():
    groups = {group for group, _ in SHIPPED}
    assert groups == {"data", "loss", "model", "optimizer", "scheduler", "trainer"}
    assert len(SHIPPED) >= 17


@pytest.mark.parametrize("group, choice", SHIPPED, ids=[f"{g}={c}" for g, c in SHIPPED])
def test_shipped_config_trains_a_few_steps(compose_config, tmp_path, group, choice):
    overrides = [f"{group}={choice}", "trainer.max_steps=3"]
    if group != "data":
        overrides += SMALL
    if choice == "synthetic":  # its rows and features as shipped, fewer of them
        overrides += ["data.n_samples=3000"]
    if choice in ("libsvm", "files"):
        overrides += [f"data.train_path={A9A_DIR / 'a9a.t.gz'}",
                      f"data.val_path={A9A_DIR / 'a9a.t.gz'}",
                      f"data.cache_dir={tmp_path / 'cache'}"]
    cfg = compose_config(*overrides)
    metrics = run(cfg, tmp_path)
    assert metrics["step"] == 3
    assert math.isfinite(metrics["val/loss"])
    assert (tmp_path / "checkpoints" / "last.pt").is_file()


def test_svm_defaults_to_hinge_and_loss_override_wins(compose_config):
    assert compose_config("model=svm").loss._target_ == "largeml.losses.hinge"
    assert compose_config("model=svm", "loss=squared_hinge").loss._target_ == (
        "largeml.losses.squared_hinge")
    assert compose_config("model=logreg").loss._target_ == "largeml.losses.bce"
    assert compose_config("model=mlp").loss._target_ == "largeml.losses.bce"


@pytest.mark.slow
def test_default_run_reaches_the_true_hyperplanes_accuracy(compose_config, tmp_path, caplog):
    """`python -m largeml.train` as shipped: the learned model must classify the validation rows
    nearly as well as the hyperplane that generated the labels."""
    caplog.set_level("INFO")
    metrics = run(compose_config(), tmp_path)
    reference = float(caplog.text.split("best possible accuracy")[1].split(", ")[1].split()[0])
    assert metrics["val/accuracy"] >= reference - 0.005
    assert metrics["stopped"] == "converged" and metrics["converged"] is True


def test_gradient_accumulation_equals_one_larger_batch(compose_config, tmp_path):
    def weights(*overrides: str) -> dict[str, torch.Tensor]:
        run_dir = tmp_path / "-".join(overrides)
        run(compose_config(*SMALL, "trainer.max_epochs=1", *overrides), run_dir)
        return load_checkpoint(run_dir / "checkpoints" / "last.pt")["model"]

    accumulated = weights("data.batch_size=50", "trainer.accumulate_grad_batches=4")
    large = weights("data.batch_size=200")
    small = weights("data.batch_size=50")
    for name in large:
        torch.testing.assert_close(accumulated[name], large[name], rtol=1e-4, atol=1e-6)
    assert not torch.allclose(small["linear.weight"], large["linear.weight"], atol=1e-3)


def test_bf16_autocast_trains_on_cpu(compose_config, tmp_path):
    metrics = run(compose_config(*SMALL, "trainer.precision=bf16", "trainer.device=cpu"), tmp_path)
    assert metrics["val/accuracy"] > 0.8


def test_bf16_trains_three_classes_as_float32_does(compose_config, tmp_path):
    three = [*SMALL, "data.n_classes=3", "trainer.device=cpu"]
    full = run(compose_config(*three), tmp_path / "32")
    half = run(compose_config(*three, "trainer.precision=bf16"), tmp_path / "bf16")
    assert full["val/accuracy"] > 0.65  # chance is 1/3
    assert abs(half["val/accuracy"] - full["val/accuracy"]) <= 0.02


def test_regularization_c_is_lambda_times_n(compose_config, tmp_path):
    from largeml.config import l2_strength

    cfg = compose_config("regularization.C=0.5")
    assert l2_strength(cfg.regularization, 1000) == pytest.approx(1 / 500)
    cfg = compose_config("regularization.C=null", "regularization.l2=0.01")
    assert l2_strength(cfg.regularization, 1000) == 0.01


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["optimizer.lr=0"], "optimizer.lr"),
        (["optimizer=ftrl", "optimizer.hogwild=0"], "optimizer.hogwild"),
        (["data.batch_size=-4"], "data.batch_size"),
        (["trainer.accumulate_grad_batches=0"], "trainer.accumulate_grad_batches"),
        (["trainer.grad_clip_norm=-1"], "trainer.grad_clip_norm"),
        (["regularization.C=null", "regularization.l2=-1"], "regularization.l2"),
        (["regularization.l2=0.1"], "regularization.l2"),
        (["+model.hidden=3"], "model.hidden"),
        (["scheduler=pegasos", "regularization.C=null", "regularization.l2=0"], "pegasos"),
    ],
)
def test_bad_values_name_their_key_and_write_nothing(compose_config, tmp_path, overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        run(compose_config(*SMALL, *overrides), tmp_path)
    assert not (tmp_path / "checkpoints").exists()
