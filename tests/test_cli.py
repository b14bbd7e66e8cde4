"""`python -m largeml.train` end to end, as a user runs it: real Hydra, real files on disk."""

import json
import math
import time
from pathlib import Path

import pytest
import torch
from conftest import SMALL, run_cli
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from largeml.checkpoint import load_checkpoint
from largeml.models import MLP, Linear

pytestmark = pytest.mark.e2e

METRICS = ["train/loss", "train/lr", "perf/samples_per_sec", "perf/epoch_seconds", "val/loss",
           "val/accuracy", "val/auc"]


def read_events(run_dir: Path) -> EventAccumulator:
    assert len(list(run_dir.glob("events.out.tfevents.*"))) == 1, "one TensorBoard run per dir"
    events = EventAccumulator(str(run_dir))
    events.Reload()
    return events


def hparams_of(events: EventAccumulator) -> tuple[dict, list[str]]:
    """The HParams tab's view of a run: hyperparameter values and metric tags."""
    values, metric_tags = {}, []
    for data in events.PluginTagToContent("hparams").values():
        plugin = plugin_data_pb2.HParamsPluginData.FromString(data)
        if plugin.HasField("session_start_info"):
            for key, value in plugin.session_start_info.hparams.items():
                values[key] = getattr(value, value.WhichOneof("kind"))
        if plugin.HasField("experiment"):
            metric_tags = [info.name.tag for info in plugin.experiment.metric_infos]
    return values, metric_tags


@pytest.mark.parametrize(
    "overrides, model_class, loss",
    [
        ([], Linear, "bce"),
        (["model=svm"], Linear, "hinge"),
        (["model=mlp", "optimizer=adam"], MLP, "bce"),
    ],
    ids=["logreg", "svm", "mlp-adam"],
)
def test_train_writes_the_run_directory(tmp_path, overrides, model_class, loss):
    run_dir = tmp_path / "run"
    started = time.perf_counter()
    result = run_cli(f"hydra.run.dir={run_dir}", *SMALL, *overrides, cwd=tmp_path)
    elapsed = time.perf_counter() - started
    assert result.returncode == 0, result.stderr + result.stdout

    metrics = json.loads((run_dir / "metrics.json").read_text())
    for name in METRICS:
        assert math.isfinite(metrics[name]), name
    assert metrics["val/accuracy"] > 0.75  # 3000 rows, 20 features, noise 0.5: ~0.85 possible
    assert metrics["epoch"] == 2

    assert (run_dir / ".hydra" / "config.yaml").is_file()
    assert (run_dir / "train.log").is_file()
    assert f"largeml.losses.{loss}" in (run_dir / "config.yaml").read_text()

    checkpoint = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    model = model_class(20, **{k: v for k, v in checkpoint["config"]["model"].items()
                               if not k.startswith("_")})
    model.load_state_dict(checkpoint["model"])
    assert checkpoint["step"] == metrics["step"]

    events = read_events(run_dir)
    for name in METRICS:
        series = events.Scalars(name)
        assert series, name
        assert series[-1].value == pytest.approx(metrics[name], rel=1e-6)
    assert len(events.Scalars("val/accuracy")) >= 2  # once per epoch at least
    # each epoch's wall time, at its last step (the final metrics repeat the last one)
    epochs = {e.step: e.value for e in events.Scalars("perf/epoch_seconds")}
    assert len(epochs) == 2 and 0 < sum(epochs.values()) < elapsed

    assert "step" not in events.Tags()["scalars"]  # counters stay in metrics.json

    hparams, metric_tags = hparams_of(events)
    assert not any(key.endswith("_partial_") for key in hparams)
    assert hparams["optimizer.lr"] == pytest.approx(0.01 if "optimizer=adam" in overrides else 0.1)
    assert hparams["choice.loss"] == loss
    assert set(METRICS) <= set(metric_tags)


def test_default_run_goes_under_outputs(tmp_path):
    result = run_cli(*SMALL, "trainer.max_epochs=1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr + result.stdout
    (run_dir,) = [p.parent for p in (tmp_path / "outputs").glob("*/*/metrics.json")]
    assert (run_dir / "checkpoints" / "last.pt").is_file()


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["model=forest"], "model/forest"),
        (["optimizer.lr=-0.1"], "optimizer.lr must be a positive number, got -0.1"),
        (["data=libsvm", "data.train_path=missing.svm"],
         "data.train_path: no such file or directory: missing.svm"),
        (["data=libsvm"], "data.train_path is required"),
        (["trainer.precision=16"], "trainer.precision must be one of 32, bf16"),
        (["trainer.max_epochs=0"], "trainer.max_epochs must be a positive integer"),
        (["regularization.C=null"], "set exactly one of regularization.l2"),
        (["+trainer.epochs=3"], "epochs"),
        (["trainer.best_metric=val/f1"], "trainer.best_metric must be one of val/loss"),
        (["trainer.keep_checkpoints=0"], "trainer.keep_checkpoints must be a positive integer"),
        (["trainer.dist_timeout=-1"], "trainer.dist_timeout must be a positive number"),
    ],
    ids=["unknown-model", "negative-lr", "missing-file", "no-file", "precision", "epochs",
         "no-regularization", "unknown-key", "best-metric", "keep", "timeout"],
)
def test_bad_config_fails_before_training(tmp_path, overrides, expected):
    run_dir = tmp_path / "run"
    result = run_cli(f"hydra.run.dir={run_dir}", "trainer.max_steps=2", *overrides, cwd=tmp_path)
    assert result.returncode != 0
    assert expected in result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert not (run_dir / "checkpoints").exists()
    assert not (run_dir / "metrics.json").exists()
    assert not list(run_dir.glob("events.out.tfevents.*"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a CPU-only machine")
def test_cuda_requested_without_a_gpu_is_a_clear_error(tmp_path):
    result = run_cli(f"hydra.run.dir={tmp_path / 'run'}", *SMALL, "trainer.device=cuda",
                     cwd=tmp_path)
    assert result.returncode != 0
    assert "trainer.device=cuda but PyTorch sees no CUDA device" in result.stdout + result.stderr
