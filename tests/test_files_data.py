"""Training from disk: `prepare`d shards and raw files through the cache, dense and sparse."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, run_cli
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from largeml.data.sources import A9A_DIR
from largeml.errors import DataError
from largeml.train import run


def prepare(*args: str, cwd: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-m", "largeml.prepare", *args], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.e2e
@pytest.mark.parametrize("optimizer", ["auto", *(pytest.param(o, marks=pytest.mark.slow)
                                                for o in ("adagrad", "ftrl"))])
def test_prepared_a9a_shards_train_to_liblinear_accuracy(tmp_path, optimizer):
    """The full path a user takes: prepare both files, then train on the sparse shards: held
    in memory by the default full-batch solver, or streamed (adagrad, ftrl)."""
    prepare(f"input={A9A_DIR / 'a9a.gz'}", "output=train", cwd=tmp_path)
    prepare(f"input={A9A_DIR / 'a9a.t.gz'}", "output=test", cwd=tmp_path)
    run_dir = tmp_path / "run"
    result = run_cli(f"hydra.run.dir={run_dir}", "data=files", "data.train_path=train",
                     "data.val_path=test", f"optimizer={optimizer}", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "sparse shards" in result.stdout + result.stderr
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["val/accuracy"] >= 0.845  # LIBLINEAR, C=1: 84.99 %
    assert metrics["stopped"] == "converged"
    cores = len(os.sched_getaffinity(0))
    if optimizer == "auto":  # Newton reads its rows once: every core computes
        assert "optimizer=auto: newton" in result.stdout + result.stderr
        assert metrics["cpu_threads"] == cores
    else:  # one core is left to the thread that reads batches ahead
        assert metrics["cpu_threads"] == max(1, cores - 1)


@pytest.mark.unit
@pytest.mark.parametrize("model", ["svm", "mlp"])
def test_raw_libsvm_trains_through_the_cache(compose_config, tmp_path, caplog, model):
    caplog.set_level("INFO")
    overrides = ["data=libsvm", f"data.train_path={A9A_DIR / 'a9a.gz'}",
                 f"data.val_path={A9A_DIR / 'a9a.t.gz'}", f"data.cache_dir={tmp_path / 'cache'}",
                 f"model={model}", "trainer.num_threads=1"]
    # (One thread: what is under test is the cache. On a CPU shared with other work, two
    # threads of the Newton solve wait on each other: 11-13 s here, against 4 s with one.)
    # Three epochs of the MLP's defaults reach it (85.0 %) in a fifth of the time of its whole
    # run (early stopping after 15); the SVM's Newton solve runs to its optimum.
    capped = ["trainer.max_epochs=3"] if model == "mlp" else []
    metrics = run(compose_config(*overrides, *capped), tmp_path / "first")
    assert metrics["val/accuracy"] >= 0.845
    assert caplog.text.count("converted") == 2
    caplog.clear()
    run(compose_config(*overrides, "trainer.max_steps=2"), tmp_path / "second")
    # (an MLP's streams are built twice: optimizer=auto lowers its data.batch_size)
    assert caplog.text.count("reusing cached") == (4 if model == "mlp" else 2)
    assert "converted" not in caplog.text


def write_csv(path: Path, n_features: int, rows: int = 50, seed: int = 0) -> Path:
    """Gaussian features on scales from 0.1 to 10, labelled by one hyperplane per width (the
    same for every `seed`) plus noise: learnable, not separable."""
    w = np.random.default_rng(n_features).normal(size=n_features)
    rng = np.random.default_rng([n_features, seed])
    z = rng.normal(size=(rows, n_features))
    y = (z @ w + 0.3 * rng.normal(size=rows) > 0).astype(int)
    x = z * np.logspace(-1, 1, n_features)
    header = ",".join(["label"] + [f"f{i}" for i in range(n_features)])
    lines = [",".join([str(label), *(f"{v:.3f}" for v in row)]) for label, row in zip(y, x)]
    path.write_text(header + "\n" + "\n".join(lines) + "\n")
    return path


def read_csv(path: Path) -> tuple[np.ndarray, np.ndarray]:
    table = np.loadtxt(path, delimiter=",", skiprows=1)
    return table[:, 1:], table[:, 0]


@pytest.mark.unit
def test_dense_csv_trains(compose_config, tmp_path):
    """Two epochs of SGD on CSV files come within 3 points of scikit-learn's logistic
    regression on the same rows, which is far above a coin flip's 50 %."""
    train = write_csv(tmp_path / "train.csv", 4, rows=400, seed=1)
    val = write_csv(tmp_path / "val.csv", 4, rows=400, seed=2)
    metrics = run(compose_config("data=files", f"data.train_path={train}",
                                 f"data.val_path={val}", f"data.cache_dir={tmp_path / 'c'}",
                                 "data.batch_size=16", "trainer.max_epochs=2", "optimizer=sgd",
                                 "trainer.tol=0"), tmp_path / "run")
    assert metrics["step"] == 2 * 25  # ceil(400 / 16) steps an epoch
    (x, y), (x_val, y_val) = read_csv(train), read_csv(val)
    reference = make_pipeline(StandardScaler(), LogisticRegression()).fit(x, y).score(x_val, y_val)
    assert reference > 0.85
    assert metrics["val/accuracy"] >= reference - 0.03, (metrics["val/accuracy"], reference)


@pytest.mark.unit
def test_train_and_validation_of_different_widths_is_an_error(compose_config, tmp_path):
    train, val = write_csv(tmp_path / "train.csv", 4), write_csv(tmp_path / "val.csv", 5)
    cfg = compose_config("data=files", f"data.train_path={train}", f"data.val_path={val}",
                         f"data.cache_dir={tmp_path / 'c'}")
    with pytest.raises(DataError, match="data.val_path .*val.csv has 5 features but "
                                        "data.train_path .*train.csv has 4"):
        run(cfg, tmp_path / "run")


@pytest.mark.e2e
def test_damaged_shard_is_named_before_training(compose_config, tmp_path):
    prepare(f"input={A9A_DIR / 'a9a.t.gz'}", "output=data", cwd=tmp_path)
    shard = next((tmp_path / "data").glob("values-*.npy"))
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 10)
    cfg = compose_config("data=files", f"data.train_path={tmp_path / 'data'}")
    with pytest.raises(DataError, match=f"{shard}: .* bytes, expected"):
        run(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()
