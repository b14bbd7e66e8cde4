"""`loss.class_weight`: part of the objective, through the CLI, against scikit-learn's
`class_weight` on the same scaled rows."""

import json
import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")

import datasets  # noqa: E402  (tests/datasets.py)
from conftest import run_cli  # noqa: E402

from largeml import losses  # noqa: E402
from largeml.checkpoint import load_checkpoint  # noqa: E402
from largeml.labels import Classes  # noqa: E402


@pytest.fixture(scope="module")
def rare(tmp_path_factory):
    """The 3 %-positives set of tests/datasets.py as LIBSVM files."""
    tmp = tmp_path_factory.mktemp("rare")
    split = datasets.binary_rare()
    datasets.write_libsvm(tmp / "train.svm", split.x_train, split.y_train)
    datasets.write_libsvm(tmp / "val.svm", split.x_val, split.y_val)
    return tmp, split


def train(tmp, name, *overrides):
    run_dir = tmp / name
    result = run_cli("data=files", f"data.train_path={tmp / 'train.svm'}",
                     f"data.val_path={tmp / 'val.svm'}", f"data.cache_dir={tmp / 'cache'}",
                     f"hydra.run.dir={run_dir}", *overrides, cwd=tmp, timeout=300)
    return run_dir, result


@pytest.mark.e2e
def test_balanced_weights_reach_scikit_learns_balanced_optimum(rare):
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score

    tmp, split = rare
    run_dir, result = train(tmp, "balanced", "loss.class_weight=balanced")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "loss.class_weight=balanced: -1: 0.5" in result.stdout  # n / (2 · n_class), logged
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["stopped"] == "converged"
    state = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    positives = split.y_train.mean()
    np.testing.assert_allclose(state["class_weights"],
                               [0.5 / (1 - positives), 0.5 / positives], rtol=1e-6)
    model = state["model"]
    mult = model["input.mult"].double().numpy()
    x_train, x_val = split.x_train.multiply(mult).tocsr(), split.x_val.multiply(mult).tocsr()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = LogisticRegression(C=1.0, class_weight="balanced", tol=1e-10,
                                       max_iter=10_000).fit(x_train, split.y_train)
    w, b = model["linear.weight"].double().numpy()[0], float(model["linear.bias"])
    ours = balanced_accuracy_score(split.y_val, x_val @ w + b > 0)
    theirs = balanced_accuracy_score(split.y_val, reference.predict(x_val))
    assert abs(ours - theirs) <= 0.005
    # The objective is the weighted one: its value at scikit-learn's solution is no lower.
    weights = torch.tensor(state["class_weights"], dtype=torch.float64)
    loss = losses.weighted(losses.bce, weights)

    def f(w, b):
        s = torch.from_numpy(np.asarray(x_train @ w + b))
        y = torch.from_numpy(split.y_train)
        return (loss(s, y).mean() + 0.5 / len(y) * float(w @ w)).item()

    assert metrics["train/objective"] == pytest.approx(f(w, b), rel=1e-5)
    assert f(w, b) <= f(reference.coef_[0], reference.intercept_[0]) * (1 + 1e-5)
    # Unweighted, the rare class is mostly missed: the weights are what lifts it.
    unweighted, result = train(tmp, "unweighted")
    assert result.returncode == 0, result.stderr[-3000:]
    plain = load_checkpoint(unweighted / "checkpoints" / "last.pt")["model"]
    w0, b0 = plain["linear.weight"].double().numpy()[0], float(plain["linear.bias"])
    assert balanced_accuracy_score(split.y_val, x_val @ w0 + b0 > 0) < ours - 0.05


@pytest.mark.e2e
def test_evaluate_reports_the_weighted_training_loss(rare):
    import subprocess
    import sys

    tmp, _ = rare
    run_dir, result = train(tmp, "given", "loss.class_weight={1: 4.0}", "optimizer=lbfgs")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["class_weights"] == [1.0, 4.0]
    out = tmp / "eval.json"
    evaluated = subprocess.run(
        [sys.executable, "-m", "largeml.evaluate", f"checkpoint={run_dir / 'checkpoints/last.pt'}",
         f"data.path={tmp / 'val.svm'}", f"data.cache_dir={tmp / 'cache'}", f"output={out}"],
        cwd=tmp, capture_output=True, text=True, timeout=120)
    assert evaluated.returncode == 0, evaluated.stdout[-3000:]
    assert json.loads(out.read_text())["loss"] == pytest.approx(metrics["val/loss"], rel=1e-5)


@pytest.mark.e2e
@pytest.mark.parametrize("spec, message", [
    ("loss.class_weight=heavy", "loss.class_weight must be null, balanced or"),
    ("loss.class_weight={3: 2.0}", "loss.class_weight: 3 is not one of the training classes"),
    ("loss.class_weight={1: -1}", "loss.class_weight.1 must be a positive number"),
])
def test_bad_class_weights_are_config_errors(rare, spec, message):
    tmp, _ = rare
    _, result = train(tmp, "bad", spec, "trainer.max_epochs=1")
    assert result.returncode == 2
    assert message in result.stdout + result.stderr


@pytest.mark.unit
def test_weights_follow_the_class_order_and_the_binary_convention():
    classes = Classes.of_counts({"-1": 30, "1": 10}, "test")
    torch.testing.assert_close(classes.weights("balanced", {"-1": 30, "1": 10}, "k"),
                               torch.tensor([40 / 60, 40 / 20]))
    # {0,1} and {−1,+1} are one convention: a weight for 0 is the negative class's.
    torch.testing.assert_close(classes.weights({"0": 3.0}, {}, "k"), torch.tensor([3.0, 1.0]))
    many = Classes.of_counts({"2": 5, "7": 5, "9": 10}, "test")
    torch.testing.assert_close(many.weights({"9": 0.5}, {}, "k"), torch.tensor([1.0, 1.0, 0.5]))
