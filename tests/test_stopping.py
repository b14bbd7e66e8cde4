"""The stopping rule end to end: a run stopped by `trainer.tol` and one stopped by the cap are
told apart in the log and in metrics.json; a capped full-batch run continued with a larger cap
ends where an uninterrupted run does; `train/objective` is the objective of the exported
weights, feature scaling included."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, run_cli

from largeml.checkpoint import load_checkpoint

pytestmark = pytest.mark.e2e

SET = ["data.n_samples=3000", "data.n_features=20"]  # 2400 training rows, in memory


def metrics_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def train_log(run_dir: Path) -> str:
    return (run_dir / "train.log").read_text()


def test_converged_and_capped_runs_are_told_apart(tmp_path):
    converged, capped, no_rule = tmp_path / "converged", tmp_path / "capped", tmp_path / "no-rule"
    for run_dir, overrides in ((converged, []), (capped, ["trainer.max_epochs=2"]),
                               (no_rule, ["trainer.tol=0", "trainer.max_epochs=9"])):
        result = run_cli(f"hydra.run.dir={run_dir}", *SET, *overrides, cwd=tmp_path)
        assert result.returncode == 0, result.stderr

    metrics = metrics_of(converged)
    assert metrics["stopped"] == "converged" and metrics["converged"] is True
    assert metrics["train/grad_norm_rel"] <= 1e-4 < metrics_of(capped)["train/grad_norm_rel"]
    assert metrics["epoch"] < 100
    assert "converged after" in train_log(converged)
    assert "did not converge" not in train_log(converged)
    assert "optimizer=auto: newton" in train_log(converged)

    metrics = metrics_of(capped)
    assert (metrics["stopped"], metrics["converged"], metrics["epoch"]) == ("max_epochs", False, 2)
    assert "did not converge: stopped by trainer.max_epochs after 2 steps" in train_log(capped)

    metrics = metrics_of(no_rule)  # tol=0: to the cap, however flat f got
    assert (metrics["stopped"], metrics["epoch"]) == ("max_epochs", 9)


def test_streaming_run_stops_when_the_objective_stops_falling(tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli(f"hydra.run.dir={run_dir}", *SET, "optimizer=adagrad", "data.batch_size=64",
                     "trainer.tol=1e-3", "trainer.max_epochs=60", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    metrics = metrics_of(run_dir)
    assert metrics["stopped"] == "converged", metrics
    assert 2 <= metrics["epoch"] < 60
    assert metrics["val/accuracy"] > 0.8
    assert "relative decrease" in train_log(run_dir)


@pytest.mark.slow  # the default tier keeps a shorter case of the same kind
def test_capped_full_batch_run_continues_to_the_uninterrupted_result(tmp_path):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert run_cli(f"hydra.run.dir={whole}", *SET, cwd=tmp_path).returncode == 0
    assert run_cli(f"hydra.run.dir={parts}", *SET, "trainer.max_epochs=2",
                   cwd=tmp_path).returncode == 0
    assert metrics_of(parts)["stopped"] == "max_epochs"
    result = run_cli(f"hydra.run.dir={parts}", *SET, cwd=tmp_path)  # the cap raised again
    assert result.returncode == 0, result.stderr
    assert "resumed at step 2 " in train_log(parts)

    expected = load_checkpoint(whole / "checkpoints" / "last.pt")
    actual = load_checkpoint(parts / "checkpoints" / "last.pt")
    assert actual["step"] == expected["step"]
    for name, tensor in expected["model"].items():
        assert torch.equal(actual["model"][name], tensor), name
    assert metrics_of(parts)["train/objective"] == metrics_of(whole)["train/objective"]
    assert metrics_of(parts)["stopped"] == "converged"

    # A converged run, started again, trains no further.
    result = run_cli(f"hydra.run.dir={parts}", *SET, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert load_checkpoint(parts / "checkpoints" / "last.pt")["step"] == expected["step"]


def export(checkpoint: Path, output: Path) -> np.ndarray:
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    subprocess.run([sys.executable, "-m", "largeml.export", f"checkpoint={checkpoint}",
                    f"output={output}"], check=True, env=env, capture_output=True)
    return np.load(output).astype(np.float64)


@pytest.mark.parametrize("model", ["logreg", "svm"])
@pytest.mark.parametrize("scales", ["unit", "mixed"])
def test_train_objective_is_the_objective_of_the_exported_weights(tmp_path, model, scales):
    rng = np.random.default_rng(3)
    n, d = 4000, 8
    x = rng.normal(size=(n, d))
    y = (x @ rng.normal(size=d) + 0.7 * rng.normal(size=n) > 0).astype(np.float32)
    if scales == "mixed":  # 1e-3 to 1e3, and an offset: data.scale=auto standardises
        x = x * np.logspace(-3, 3, d) + 5.0
    x = x.astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    run_dir = tmp_path / "run"
    result = run_cli(f"hydra.run.dir={run_dir}", f"model={model}", "data=files",
                     f"data.train_path={tmp_path / 'x.npy'}", f"data.labels={tmp_path / 'y.npy'}",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    log = train_log(run_dir)
    assert ("feature scaling: standard" if scales == "mixed" else "feature scaling: none") in log

    values = export(run_dir / "checkpoints" / "last.pt", tmp_path / "w.npy")
    w, b = values[:-1], values[-1]
    mult = load_checkpoint(run_dir / "checkpoints" / "last.pt")["model"]["input.mult"].double()
    s, t = x.astype(np.float64) @ w + b, 2 * y - 1
    loss = np.logaddexp(0, -t * s) if model == "logreg" else np.maximum(0, 1 - t * s)
    lam = 1 / n  # C = 1
    # The L2 term is on the weights of the scaled features: w' = w / mult.
    f = loss.mean() + lam / 2 * np.sum((w / mult.numpy()) ** 2)
    metrics = metrics_of(run_dir)
    assert metrics["train/objective"] == pytest.approx(f, rel=2e-5)
    assert metrics["stopped"] == "converged"


def test_early_stopping_ends_with_the_best_model(tmp_path):
    # An MLP under optimizer=auto on 2,400 noisy rows overfits: val/loss turns up, the run stops
    # 10 validations later, and ends with the model of its lowest val/loss.
    from test_cli import read_events

    run_dir = tmp_path / "run"
    result = run_cli(f"hydra.run.dir={run_dir}", *SET, "model=mlp", "trainer.max_epochs=100",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    metrics = metrics_of(run_dir)
    assert metrics["stopped"] == "early stopping"
    events = read_events(run_dir)
    # (the final step's point is the final model's: the best one, logged at the end)
    losses = {e.step: e.value for e in events.Scalars("val/loss") if e.step < metrics["step"]}
    accuracy = {e.step: e.value for e in events.Scalars("val/accuracy")}
    best = min(losses, key=losses.get)
    later = [loss for step, loss in losses.items() if step > best]
    assert len(later) == 9 and min(later) > losses[best]  # 10 validations without a better
    # metrics.json gives the best model's validation, not the last step's
    assert metrics["val/loss"] == pytest.approx(losses[best], rel=1e-6)
    assert metrics["val/accuracy"] == pytest.approx(accuracy[best], rel=1e-6)
    objective = {e.step: e.value for e in events.Scalars("train/objective")}
    assert metrics["train/objective"] == pytest.approx(objective[metrics["step"]], rel=1e-6)
    assert f"the run ends with the model of step {best}" in train_log(run_dir)
    last = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    kept = load_checkpoint(run_dir / "checkpoints" / "best.pt")
    assert kept["step"] == best and last["step"] == metrics["step"]
    for name, weights in kept["model"].items():  # last.pt holds the best model's weights
        assert torch.equal(last["model"][name], weights), name
