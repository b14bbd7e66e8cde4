"""`python -m largeml.evaluate` end to end, and the metrics it adds to `largeml.metrics`."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, run_cli, write_dense_shards
from hydra import compose, initialize_config_dir

from largeml import evaluate
from largeml.errors import LargemlError
from largeml.metrics import confusion_matrix, f1, hinge_loss, log_loss, precision, recall

CONFIG_DIR = str(REPO / "configs")
A9A_TEST = REPO / "largeml" / "data" / "a9a" / "a9a.t.gz"


def run_module(module: str, *args: str, cwd: Path, timeout: float = 120):
    """`python -m largeml.<module> ARGS` as a user runs it, with the cache inside `cwd`."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HYDRA_FULL_ERROR": "0",
           "LARGEML_CACHE": str(cwd / "cache")}
    return subprocess.run([sys.executable, "-m", f"largeml.{module}", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


# ----------------------------------------------------------------------------- metrics

# Scores and labels worked by hand: predictions (score > 0) are 1 1 0 0 1 0 (score 0 is class 0)
SCORES = torch.tensor([2.0, 0.5, -1.0, -0.5, 1.0, 0.0])
LABELS = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 1.0])
# label 1, predicted 1: rows 0, 4 (tp 2); label 0, predicted 1: row 1 (fp 1);
# label 1, predicted 0: rows 2, 5 (fn 2); label 0, predicted 0: row 3 (tn 1)


@pytest.mark.unit
def test_confusion_matrix_by_hand() -> None:
    assert confusion_matrix(SCORES, LABELS) == [[1, 1], [2, 2]]


@pytest.mark.unit
def test_precision_recall_f1_by_hand() -> None:
    assert precision(SCORES, LABELS) == pytest.approx(2 / 3)
    assert recall(SCORES, LABELS) == pytest.approx(2 / 4)
    assert f1(SCORES, LABELS) == pytest.approx(2 * (2 / 3) * (1 / 2) / (2 / 3 + 1 / 2))


@pytest.mark.unit
def test_precision_recall_f1_without_positives_are_zero() -> None:
    scores, labels = torch.tensor([-1.0, -2.0]), torch.tensor([0.0, 0.0])
    assert (precision(scores, labels), recall(scores, labels), f1(scores, labels)) == (0, 0, 0)


@pytest.mark.unit
def test_log_loss_by_hand() -> None:
    # -log σ(s) for label 1, -log(1 - σ(s)) = -log σ(-s) for label 0
    signed = torch.where(LABELS == 1, SCORES, -SCORES).double()
    expected = -torch.log(torch.sigmoid(signed)).mean().item()
    assert log_loss(SCORES, LABELS) == pytest.approx(expected, rel=1e-12)
    assert log_loss(torch.tensor([0.0]), torch.tensor([1.0])) == pytest.approx(math.log(2))
    # from logits: finite where σ(s) rounds to 1 in float32
    assert log_loss(torch.tensor([-200.0]), torch.tensor([1.0])) == pytest.approx(200.0)


@pytest.mark.unit
def test_hinge_loss_by_hand() -> None:
    # t·s = 2, -0.5, -1, 0.5, 1, 0 -> max(0, 1 - t·s) = 0, 1.5, 2, 0.5, 0, 1
    assert hinge_loss(SCORES, LABELS) == pytest.approx(5.0 / 6)


@pytest.mark.unit
def test_metrics_agree_with_sklearn() -> None:
    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    labels = (rng.random(500) < 0.3).astype(np.float32)
    scores = (rng.normal(size=500) + labels).astype(np.float32)
    s, t = torch.from_numpy(scores), torch.from_numpy(labels)
    predicted = (scores > 0).astype(int)
    assert confusion_matrix(s, t) == sk.confusion_matrix(labels, predicted).tolist()
    assert precision(s, t) == pytest.approx(sk.precision_score(labels, predicted))
    assert recall(s, t) == pytest.approx(sk.recall_score(labels, predicted))
    assert f1(s, t) == pytest.approx(sk.f1_score(labels, predicted))
    probabilities = 1 / (1 + np.exp(-scores.astype(np.float64)))
    assert log_loss(s, t) == pytest.approx(sk.log_loss(labels, probabilities), rel=1e-9)
    assert hinge_loss(s, t) == pytest.approx(sk.hinge_loss(2 * labels - 1, scores), rel=1e-6)


# ----------------------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_dense_shards(tmp_path_factory.mktemp("data") / "rows", rows=1500, features=12)


def train(tmp_path: Path, shards: Path, *overrides: str) -> Path:
    """A two-epoch run on `shards`, validated on the same shards; returns its directory."""
    run_dir = tmp_path / "run"
    result = run_cli(f"hydra.run.dir={run_dir}", "data=files", f"data.train_path={shards}",
                     f"data.val_path={shards}", "data.batch_size=128", "trainer.max_epochs=2",
                     *overrides, cwd=tmp_path)
    assert result.returncode == 0, result.stderr + result.stdout
    return run_dir


@pytest.mark.e2e
@pytest.mark.parametrize("overrides, logistic", [
    ([], True), (["model=svm"], False), (["model=mlp", "optimizer=adam"], True),
    pytest.param(["model=mlp", "optimizer=adam", "trainer.precision=bf16"], True,  # in bf16 again
                 marks=pytest.mark.slow),
], ids=["logreg", "svm", "mlp", "mlp-bf16"])
def test_evaluate_reproduces_the_validation_metrics(tmp_path, shards, overrides, logistic):
    run_dir = train(tmp_path, shards, *overrides)
    logged = json.loads((run_dir / "metrics.json").read_text())

    result = run_module("evaluate", f"checkpoint={run_dir}/checkpoints/last.pt",
                        f"data.path={shards}", "batch_size=500", cwd=tmp_path)
    assert result.returncode == 0, result.stderr + result.stdout

    written = json.loads((run_dir / "eval-rows.json").read_text())  # the default output
    printed = json.loads(next(line for line in result.stdout.splitlines() if line[:1] == "{"))
    assert {k: v for k, v in written.items() if k not in ("checkpoint", "data")} == printed
    # Progress as plain log lines (the output is not a terminal): the first batch and the last.
    output = result.stdout + result.stderr
    assert re.search(r"batch 1/3 \(33%\), [\d,]+ samples/s, ETA", output), output
    assert "batch 3/3 (100%)" in output
    for name in ("loss", "accuracy", "auc"):
        assert written[name] == pytest.approx(logged[f"val/{name}"], rel=1e-6, abs=1e-7), name
    assert written["accuracy"] > 0.75  # a model that learnt, not a constant
    (tn, fp), (fn, tp) = written["confusion_matrix"]
    assert tn + fp + fn + tp == written["rows"] == 1500
    assert written["accuracy"] == pytest.approx((tn + tp) / 1500)
    assert written["precision"] == pytest.approx(tp / (tp + fp))
    assert written["recall"] == pytest.approx(tp / (tp + fn))
    assert ("log_loss" in written) == logistic
    if logistic:  # log loss is the bce training loss
        assert written["log_loss"] == pytest.approx(written["loss"], rel=1e-6)
    else:  # and hinge loss the SVM's
        assert written["hinge_loss"] == pytest.approx(written["loss"], rel=1e-6)


@pytest.mark.e2e
def test_evaluate_a9a_raw_libsvm_file(tmp_path):
    """A raw, gzipped LIBSVM file one feature narrower than the model (a9a.t lacks feature
    123), converted into the cache, gives the metrics the in-memory a9a run validated with."""
    run_dir = tmp_path / "run"
    result = run_cli(f"hydra.run.dir={run_dir}", "data=a9a", "trainer.max_epochs=1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr + result.stdout
    logged = json.loads((run_dir / "metrics.json").read_text())
    output = tmp_path / "a9a-eval.json"
    result = run_module("evaluate", f"checkpoint={run_dir}/checkpoints/last.pt",
                        f"data.path={A9A_TEST}", f"output={output}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr + result.stdout
    written = json.loads(output.read_text())
    assert written["rows"] == 16281
    for name in ("loss", "accuracy", "auc"):
        assert written[name] == pytest.approx(logged[f"val/{name}"], rel=1e-6), name


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, shards) -> Path:
    tmp_path = tmp_path_factory.mktemp("trained")
    return train(tmp_path, shards, "trainer.max_epochs=1") / "checkpoints" / "last.pt"


def compose_entry(name: str, *overrides: str):
    """The config `python -m largeml.<name> OVERRIDES` runs with, composed in this process."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(name, overrides=list(overrides))


@pytest.mark.e2e
def test_evaluate_missing_checkpoint_exits_2_naming_the_key(tmp_path, shards):
    result = run_module("evaluate", f"checkpoint={tmp_path}/missing.pt", f"data.path={shards}",
                        cwd=tmp_path)
    assert result.returncode == 2
    assert f"checkpoint: no such file: {tmp_path}/missing.pt" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr


@pytest.mark.e2e
@pytest.mark.parametrize("args, message", [
    (["checkpoint={checkpoint}", "data.path={tmp}/missing.svm"],
     "data.path: no such file or directory"),
    (["data.path={shards}"], "checkpoint is required"),
    (["checkpoint={checkpoint}"], "data.path is required"),
    (["checkpoint={checkpoint}", "data.path={shards}", "batch_size=0"], "batch_size must be"),
], ids=["no-data", "checkpoint-unset", "data-unset", "batch-size"])
def test_evaluate_bad_arguments_name_the_key(tmp_path, shards, checkpoint, args, message):
    values = {"tmp": tmp_path, "shards": shards, "checkpoint": checkpoint}
    cfg = compose_entry("evaluate", *(a.format(**values) for a in args))
    with pytest.raises(LargemlError, match=message):
        evaluate.run(cfg)


@pytest.mark.e2e
def test_evaluate_rejects_labels_outside_the_training_classes(tmp_path, checkpoint):
    data = tmp_path / "multi.csv"
    rows = np.random.default_rng(0).normal(size=(5, 12))
    lines = ["label," + ",".join(f"f{i}" for i in range(12))]
    lines += [f"{label}," + ",".join(f"{v:.3f}" for v in row) for label, row in zip(
        [0, 1, 2, 1, 0], rows, strict=True)]
    data.write_text("\n".join(lines) + "\n")
    result = run_module("evaluate", f"checkpoint={checkpoint}", f"data.path={data}",
                        cwd=tmp_path)
    assert result.returncode == 2
    assert f"data.path {data}: label 2 is not one of the training classes (0, 1)" in result.stdout


@pytest.mark.e2e
def test_evaluate_rejects_data_of_another_width(tmp_path, checkpoint):
    narrow = write_dense_shards(tmp_path / "narrow", rows=50, features=5)
    result = run_module("evaluate", f"checkpoint={checkpoint}", f"data.path={narrow}",
                        cwd=tmp_path)
    assert result.returncode == 2
    assert "has 5 features but the model takes 12" in result.stdout
