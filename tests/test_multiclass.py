"""More than two classes, end to end through the CLI: train with defaults, then evaluate,
predict and export reading the checkpoint back; the answers against scikit-learn's on the same
scaled features (the checkpoint's own input map, applied to the raw rows)."""

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")

import datasets  # noqa: E402  (tests/datasets.py)
from conftest import REPO, run_cli  # noqa: E402

from largeml.checkpoint import load_checkpoint  # noqa: E402
from scipy import sparse  # noqa: E402
from scipy.special import logsumexp  # noqa: E402


def run_module(module: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def written(tmp: Path, split: datasets.Split) -> tuple[Path, Path]:
    train, val = tmp / "train.svm", tmp / "val.svm"
    datasets.write_libsvm(train, split.x_train, split.y_train, signed=False)
    datasets.write_libsvm(val, split.x_val, split.y_val, signed=False)
    return train, val


def train(tmp: Path, name: str, train_file: Path, val_file: Path, *overrides: str) -> Path:
    run_dir = tmp / name
    result = run_cli("data=files", f"data.train_path={train_file}",
                     f"data.val_path={val_file}", f"data.cache_dir={tmp / 'cache'}",
                     f"hydra.run.dir={run_dir}", *overrides, cwd=tmp, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def scaled(x, state: dict) -> np.ndarray | sparse.csr_matrix:
    """The rows as the model saw them: its input map (x − shift)·mult."""
    mult, shift = state["input.mult"].double().numpy(), state["input.shift"].double().numpy()
    if sparse.issparse(x):
        assert not shift.any()
        return sparse.csr_matrix(x @ sparse.diags(mult))
    return (x - shift) * mult


def multinomial_objective(w: np.ndarray, b: np.ndarray, x, y: np.ndarray, lam: float) -> float:
    s = np.asarray(x @ w.T) + b
    loss = logsumexp(s, axis=1) - s[np.arange(len(y)), y.astype(int)]
    return float(loss.mean() + lam / 2 * (w ** 2).sum())


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> tuple[Path, datasets.Split, Path, Path]:
    tmp = tmp_path_factory.mktemp("digits")
    split = datasets.digits_classes()
    return (tmp, split, *written(tmp, split))


@pytest.mark.e2e
@pytest.mark.slow  # the default tier keeps a shorter case of the same kind
def test_logreg_on_digits_is_scikit_learns_multinomial_optimum(digits):
    from sklearn.linear_model import LogisticRegression

    tmp, split, train_file, val_file = digits
    run_dir = train(tmp, "logreg", train_file, val_file)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["stopped"] == "converged"
    state = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert state["classes"] == [str(k) for k in range(10)]
    weight, bias = state["model"]["linear.weight"], state["model"]["linear.bias"]
    assert weight.shape == (10, 64) and bias.shape == (10,)
    x_train, x_val = scaled(split.x_train, state["model"]), scaled(split.x_val, state["model"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = LogisticRegression(C=1.0, tol=1e-10, max_iter=20_000).fit(x_train,
                                                                            split.y_train)
    lam = 1 / len(split.y_train)
    optimum = multinomial_objective(reference.coef_, reference.intercept_, x_train,
                                    split.y_train, lam)
    ours = multinomial_objective(weight.double().numpy(), bias.double().numpy(), x_train,
                                 split.y_train, lam)
    assert ours <= optimum * (1 + 1e-4), (ours, optimum)
    assert metrics["train/objective"] == pytest.approx(ours, rel=1e-4)
    assert abs(metrics["val/accuracy"] - reference.score(x_val, split.y_val)) <= 0.005

    # evaluate, predict and export read the checkpoint back: the same answers.
    checkpoint = run_dir / "checkpoints" / "last.pt"
    out = tmp / "eval.json"
    result = run_module("largeml.evaluate", f"checkpoint={checkpoint}", f"data.path={val_file}",
                        f"data.cache_dir={tmp / 'cache'}", f"output={out}", cwd=tmp)
    assert result.returncode == 0, result.stderr[-3000:]
    evaluated = json.loads(out.read_text())
    assert evaluated["accuracy"] == pytest.approx(metrics["val/accuracy"], abs=1e-6)
    assert evaluated["classes"] == [str(k) for k in range(10)]
    confusion = np.array(evaluated["confusion_matrix"])
    assert confusion.shape == (10, 10) and confusion.sum() == len(split.y_val)
    assert np.trace(confusion) / confusion.sum() == pytest.approx(evaluated["accuracy"])
    assert 0 < evaluated["macro_f1"] <= 1 and evaluated["top_5_accuracy"] >= evaluated["accuracy"]

    predictions = tmp / "predictions.csv"
    result = run_module("largeml.predict", f"checkpoint={checkpoint}", f"input={val_file}",
                        f"cache_dir={tmp / 'cache'}", f"output={predictions}", cwd=tmp)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(predictions) as f:
        header = f.readline().strip().split(",")
    assert header == ([f"score_{k}" for k in range(10)] + [f"probability_{k}" for k in range(10)]
                      + ["label"])
    table = np.loadtxt(predictions, delimiter=",", skiprows=1)
    assert np.mean(table[:, -1] == split.y_val) == pytest.approx(metrics["val/accuracy"])
    np.testing.assert_allclose(table[:, 10:20].sum(1), 1, atol=1e-5)

    exported = tmp / "weights.npy"
    result = run_module("largeml.export", f"checkpoint={checkpoint}", f"output={exported}",
                        cwd=tmp)
    assert result.returncode == 0, result.stderr[-3000:]
    values = np.load(exported)
    assert values.shape == (10, 65)
    raw_scores = split.x_val @ values[:, :64].T + values[:, 64]
    np.testing.assert_array_equal(raw_scores.argmax(1), table[:, -1])


@pytest.mark.e2e
@pytest.mark.parametrize("multiclass", ["crammer_singer", "ovr"])
def test_svm_on_digits_within_a_point_of_linear_svc(digits, multiclass):
    from sklearn.svm import LinearSVC

    tmp, split, train_file, val_file = digits
    run_dir = train(tmp, f"svm-{multiclass}", train_file, val_file, "model=svm",
                    f"loss.multiclass={multiclass}")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["stopped"] == "converged"
    state = load_checkpoint(run_dir / "checkpoints" / "last.pt")["model"]
    x_train, x_val = scaled(split.x_train, state), scaled(split.x_val, state)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = LinearSVC(C=1.0, max_iter=100_000).fit(x_train, split.y_train)
    assert metrics["val/accuracy"] >= reference.score(x_val, split.y_val) - 0.01


@pytest.mark.e2e
def test_mlp_on_digits_beats_the_linear_models(digits):
    # With defaults (optimizer=auto: Adam, early stopping on val/loss, one hidden layer of 256),
    # above scikit-learn's multinomial LogisticRegression and LinearSVC on the same rows, and
    # above largeml's own linear models; evaluate reads the checkpoint back to the same accuracy.
    from sklearn.linear_model import LogisticRegression
    from sklearn.svm import LinearSVC

    tmp, split, train_file, val_file = digits
    run_dir = train(tmp, "mlp", train_file, val_file, "model=mlp")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    state = load_checkpoint(run_dir / "checkpoints" / "last.pt")["model"]
    x_train, x_val = scaled(split.x_train, state), scaled(split.x_val, state)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peers = [LogisticRegression(C=1.0, tol=1e-10, max_iter=20_000),
                 LinearSVC(C=1.0, max_iter=100_000)]
        best_linear = max(peer.fit(x_train, split.y_train).score(x_val, split.y_val)
                          for peer in peers)
    ours = [json.loads((run_dir.parent / name / "metrics.json").read_text())["val/accuracy"]
            for name in ("logreg", "svm-crammer_singer") if (run_dir.parent / name).is_dir()]
    assert metrics["val/accuracy"] > max([best_linear, *ours]), (metrics, best_linear, ours)

    out = tmp / "eval-mlp.json"
    result = run_module("largeml.evaluate", f"checkpoint={run_dir / 'checkpoints' / 'last.pt'}",
                        f"data.path={val_file}", f"data.cache_dir={tmp / 'cache'}",
                        f"output={out}", cwd=tmp)
    assert result.returncode == 0, result.stderr[-3000:]
    evaluated = json.loads(out.read_text())
    assert evaluated["accuracy"] == pytest.approx(metrics["val/accuracy"], abs=1e-6)


@pytest.mark.e2e
def test_twenty_topics_sparse_logreg_within_half_a_point_of_scikit_learn(tmp_path):
    from sklearn.linear_model import LogisticRegression

    split = datasets.topics()
    train_file, val_file = written(tmp_path, split)
    run_dir = train(tmp_path, "topics", train_file, val_file)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    state = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert len(state["classes"]) == 20 and metrics["stopped"] == "converged"
    x_train = scaled(split.x_train, state["model"])
    x_val = scaled(split.x_val, state["model"])
    reference = LogisticRegression(C=1.0, tol=1e-8, max_iter=20_000).fit(x_train, split.y_train)
    assert abs(metrics["val/accuracy"] - reference.score(x_val, split.y_val)) <= 0.005


@pytest.mark.e2e
@pytest.mark.parametrize("optimizer", ["newton", "ftrl"])
def test_two_class_optimizers_refuse_more_classes_naming_the_way_out(digits, optimizer):
    tmp, _, train_file, val_file = digits
    result = run_cli("data=files", f"data.train_path={train_file}", f"data.val_path={val_file}",
                     f"data.cache_dir={tmp / 'cache'}", f"hydra.run.dir={tmp / optimizer}",
                     f"optimizer={optimizer}", cwd=tmp)
    assert result.returncode == 2
    output = result.stdout + result.stderr  # the log goes to the console
    assert f"optimizer={optimizer} trains two-class models" in output
    assert "10 classes" in output and "optimizer=lbfgs" in output


@pytest.mark.unit
def test_multiclass_metrics_match_scikit_learn():
    from sklearn import metrics as sk

    from largeml import metrics

    torch.manual_seed(0)
    scores = torch.randn(300, 5)
    targets = torch.randint(0, 5, (300,)).float()
    targets[:40] = scores[:40].argmax(1).float()  # better than chance
    y, predicted = targets.long().numpy(), scores.argmax(1).numpy()
    assert metrics.accuracy(scores, targets) == pytest.approx(sk.accuracy_score(y, predicted))
    assert metrics.confusion_matrix(scores, targets) == sk.confusion_matrix(y, predicted).tolist()
    means = metrics.averaged(scores, targets)
    for average in ("macro", "weighted"):
        assert means[f"{average}_f1"] == pytest.approx(sk.f1_score(y, predicted, average=average))
        assert means[f"{average}_precision"] == pytest.approx(
            sk.precision_score(y, predicted, average=average, zero_division=0))
        assert means[f"{average}_recall"] == pytest.approx(
            sk.recall_score(y, predicted, average=average))
    probabilities = torch.softmax(scores.double(), 1).numpy()
    assert metrics.log_loss(scores, targets) == pytest.approx(sk.log_loss(y, probabilities))
    assert metrics.roc_auc(scores, targets) == pytest.approx(
        sk.roc_auc_score(y, probabilities, multi_class="ovr", average="macro"), abs=1e-9)
    assert metrics.top_k_accuracy(scores, targets, 2) == pytest.approx(
        sk.top_k_accuracy_score(y, scores.numpy(), k=2))
