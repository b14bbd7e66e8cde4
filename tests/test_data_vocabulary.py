"""One data vocabulary: `largeml.evaluate` and `largeml.predict` take the training data choices
(`data=a9a`, `data=synthetic`, `data=files`) and score their validation rows, and a file named by
path alone is read with the checkpoint's feature map (label, feature and categorical columns,
hashing) and scaled as in training. Each test trains with the CLI, then scores what the run
validated on and compares with the run's own `val/accuracy` in metrics.json."""

import gzip
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from largeml import evaluate
from largeml.checkpoint import load_checkpoint
from largeml.cli import CONFIG_DIR, given
from largeml.data.sources import A9A_DIR
from largeml.errors import ConfigError
from largeml.inference import feature_map_keys, scoring_node

REPO = Path(__file__).resolve().parent.parent


def run_module(module: str, *args: str, cwd: Path, timeout: float = 180):
    """`python -m largeml.<module> ARGS` as a user runs it, with the cache inside `cwd`."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HYDRA_FULL_ERROR": "0",
           "LARGEML_CACHE": str(cwd / "cache")}
    result = subprocess.run([sys.executable, "-m", f"largeml.{module}", *args], cwd=cwd,
                            env=env, capture_output=True, text=True, timeout=timeout)
    return result


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def train(root: Path, *overrides: str) -> tuple[Path, dict]:
    """A CLI training run in `root/run`: its last checkpoint and metrics.json."""
    ok(run_module("train", f"hydra.run.dir={root / 'run'}", *overrides, cwd=root))
    return (root / "run" / "checkpoints" / "last.pt",
            json.loads((root / "run" / "metrics.json").read_text()))


def evaluated(root: Path, checkpoint: Path, *args: str) -> dict:
    output = root / "eval.json"
    ok(run_module("evaluate", f"checkpoint={checkpoint}", *args, f"output={output}", cwd=root))
    return json.loads(output.read_text())


def predicted_labels(root: Path, checkpoint: Path, *args: str) -> np.ndarray:
    output = root / "predictions.npy"
    ok(run_module("predict", f"checkpoint={checkpoint}", *args, f"output={output}", cwd=root))
    return np.load(output)["label"]


def compose_evaluate(*overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("evaluate", overrides=list(overrides))


# ----------------------------------------------------------------------------- the rules


@pytest.mark.unit
def test_the_feature_map_is_every_conversion_option_of_the_converter():
    keys = set(feature_map_keys())
    assert {"label_column", "hash_bits", "n_features"} <= keys
    assert not keys & {"input", "output", "format", "labels", "shard_bytes"}  # one file's own


@pytest.mark.unit
def test_a_file_takes_the_runs_feature_map_and_the_command_line_wins():
    trained = {"data": {"_target_": "largeml.data.files", "train_path": "/t.csv",
                        "label_column": "y", "hash_bits": 8, "scale": "standard",
                        "batch_size": 64}}
    overrides = ["checkpoint=c.pt", "data.path=new.csv", "data.hash_bits=10"]
    node = scoring_node(compose_evaluate(*overrides).data, trained, given(overrides),
                        chosen=False)
    assert (node["path"], node["label_column"], node["hash_bits"]) == ("new.csv", "y", 10)
    assert node["batch_size"] == 1024 and node["train_path"] == "???"  # not the feature map


@pytest.mark.unit
def test_a_choice_the_run_trained_with_takes_the_runs_values():
    trained = {"data": {"_target_": "largeml.data.synthetic", "n_samples": 3000,
                        "n_features": 20, "noise": 0.5, "seed": 3, "val_fraction": 0.2}}
    overrides = ["checkpoint=c.pt", "data=synthetic", "data.noise=0.1"]
    node = scoring_node(compose_evaluate(*overrides).data, trained, given(overrides),
                        chosen=True)
    assert (node["n_samples"], node["seed"], node["noise"]) == (3000, 3, 0.1)
    # another choice than the run's: its own defaults, nothing of the run's
    overrides = ["checkpoint=c.pt", "data=a9a"]
    node = scoring_node(compose_evaluate(*overrides).data, trained, given(overrides),
                        chosen=True)
    assert node["_target_"] == "largeml.data.a9a" and "n_samples" not in node


@pytest.mark.unit
@pytest.mark.parametrize("overrides, message", [
    (["checkpoint=c.pt"], "data.path is required"),
    (["checkpoint=c.pt", "data=a9a", "data.path=x.svm"], "data.path=x.svm names a file"),
])
def test_evaluate_says_which_data_to_give(overrides, message):
    with pytest.raises(ConfigError, match=message):
        evaluate.run(compose_evaluate(*overrides), overrides)


README_LINES = sorted({
    line.removeprefix("$ ").strip() for line in (REPO / "README.md").read_text().splitlines()
    if line.startswith(("$ python -m largeml.evaluate ", "$ python -m largeml.predict "))})


@pytest.mark.unit
@pytest.mark.parametrize("line", README_LINES)
def test_readme_evaluate_and_predict_commands_compose(line):
    """Each README example composes with the real configs, each key it sets is in the config,
    and its data is named the one way the command accepts (a path, or a choice)."""
    name, *overrides = shlex.split(line)[2:]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(name.removeprefix("largeml."), overrides=overrides)
    for override in overrides:
        key = override.split("=", 1)[0]
        assert OmegaConf.select(cfg, key, default="missing") != "missing", key
    assert ("data=a9a" in overrides) == (cfg.get("data") is not None
                                         and cfg.data._target_ == "largeml.data.a9a")


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def a9a_run(tmp_path_factory) -> tuple[Path, dict, Path]:
    root = tmp_path_factory.mktemp("a9a")
    checkpoint, metrics = train(root, "data=a9a", "model=logreg")  # optimizer=auto: Newton
    return checkpoint, metrics, root


@pytest.mark.e2e
@pytest.mark.slow
def test_evaluate_and_predict_data_a9a_score_its_validation_split(a9a_run):
    checkpoint, metrics, root = a9a_run
    result = ok(run_module("evaluate", f"checkpoint={checkpoint}", "data=a9a", cwd=root))
    written = json.loads((root / "run" / "eval-a9a.json").read_text())  # the default output
    assert written["rows"] == 16281 and written["data"] == "data=a9a"
    for name in ("loss", "accuracy", "auc"):
        assert written[name] == pytest.approx(metrics[f"val/{name}"], abs=1e-6), name
    assert f"{written['accuracy']}" in result.stdout

    # predict: the same rows in a9a.t's order, so its labels agree with a9a.t's at that rate
    labels = predicted_labels(root, checkpoint, "data=a9a")
    with gzip.open(A9A_DIR / "a9a.t.gz", "rt") as f:
        truth = np.array([int(line.split(maxsplit=1)[0]) for line in f if line.strip()])
    assert len(labels) == len(truth) == 16281
    assert np.mean(labels == truth) == pytest.approx(metrics["val/accuracy"], abs=1e-6)


@pytest.mark.e2e
def test_data_files_with_another_runs_checkpoint_needs_its_val_path(a9a_run):
    checkpoint, _, root = a9a_run
    result = run_module("evaluate", f"checkpoint={checkpoint}", "data=files", cwd=root)
    assert result.returncode == 2, result.stdout
    assert "data=files: data.val_path is required" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr


@pytest.mark.e2e
@pytest.mark.slow
def test_data_synthetic_is_the_runs_own_split(tmp_path):
    checkpoint, metrics = train(tmp_path, "data=synthetic", "data.n_samples=3000",
                                "data.n_features=20", "seed=3", "trainer.max_epochs=2")
    written = evaluated(tmp_path, checkpoint, "data=synthetic")  # size, width, seed: the run's
    assert written["rows"] == 600
    assert written["accuracy"] == pytest.approx(metrics["val/accuracy"], abs=1e-6)
    assert written["loss"] == pytest.approx(metrics["val/loss"], rel=1e-6)
    # what the command line sets wins: a smaller set, so a smaller validation split
    assert evaluated(tmp_path, checkpoint, "data=synthetic", "data.n_samples=2000")["rows"] == 400


def write_table(path: Path, x: np.ndarray, y: np.ndarray, extra: dict[str, np.ndarray],
                with_label: bool = True) -> None:
    """A CSV with columns id, f0..f(n-1), the `extra` columns and (with_label) y."""
    names = ["id", *(f"f{j}" for j in range(x.shape[1])), *extra, *(["y"] if with_label else [])]
    lines = [",".join(names)]
    for i in range(len(x)):
        fields = [str(1000 + i), *(repr(float(v)) for v in x[i]), *(str(c[i]) for c in
                  extra.values()), *([str(int(y[i]))] if with_label else [])]
        lines.append(",".join(fields))
    path.write_text("\n".join(lines) + "\n")


def scaled_problem(rows: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Features on scales from 1e-3 to 1e4, labels from a noisy hyperplane through them."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(rows, 4))
    y = (z @ np.array([1.0, -2.0, 1.5, 0.5]) + 0.3 * rng.normal(size=rows) > 0).astype(int)
    return z * np.array([1e-3, 1.0, 1e2, 1e4]), y


@pytest.mark.e2e
@pytest.mark.slow
def test_a_file_by_path_alone_is_read_and_scaled_as_in_training(tmp_path):
    """Trained with `data=files` on CSVs whose label column is `y` and whose `id` column is left
    out by `feature_columns`, scaled (`data.scale=standard`): the validation file by path
    alone, the run's `data=files`, and predict on the file without its labels all give the
    run's validation accuracy."""
    x, y = scaled_problem(1200, seed=0)
    write_table(tmp_path / "train.csv", x[:900], y[:900], {})
    write_table(tmp_path / "val.csv", x[900:], y[900:], {})
    checkpoint, metrics = train(
        tmp_path, "data=files", f"data.train_path={tmp_path / 'train.csv'}",
        f"data.val_path={tmp_path / 'val.csv'}", "data.label_column=y",
        "data.feature_columns=[f0,f1,f2,f3]", "data.scale=standard", "data.batch_size=100",
        f"data.cache_dir={tmp_path / 'cache'}")
    mult = load_checkpoint(checkpoint)["model"]["input.mult"]
    assert mult.max() / mult.min() > 1e5  # the scaling fitted is in the model: it matters here
    assert metrics["val/accuracy"] > 0.85

    by_path = evaluated(tmp_path, checkpoint, f"data.path={tmp_path / 'val.csv'}")
    assert by_path["rows"] == 300 and by_path["data"] == str(tmp_path / "val.csv")
    assert by_path["accuracy"] == pytest.approx(metrics["val/accuracy"], abs=1e-6)
    assert by_path["loss"] == pytest.approx(metrics["val/loss"], rel=1e-5)
    own = evaluated(tmp_path, checkpoint, "data=files")  # the run's own val_path
    assert own["accuracy"] == pytest.approx(metrics["val/accuracy"], abs=1e-6)

    write_table(tmp_path / "new.csv", x[900:], y[900:], {}, with_label=False)
    labels = predicted_labels(tmp_path, checkpoint, f"input={tmp_path / 'new.csv'}")
    assert np.mean(labels == y[900:]) == pytest.approx(metrics["val/accuracy"], abs=1e-6)


@pytest.mark.e2e
@pytest.mark.slow
def test_categorical_columns_and_their_hashing_come_with_the_checkpoint(tmp_path):
    """A run with a hashed categorical column: scoring its validation file by path alone gives
    the run's accuracy (without the run's categorical columns the file would be 4 dense
    columns, not the model's 4 + 2^6)."""
    rng = np.random.default_rng(1)
    x, _ = scaled_problem(1200, seed=1)
    x = x / np.array([1e-3, 1.0, 1e2, 1e4])
    country = rng.choice(["fr", "de", "jp", "br", "us"], size=1200)
    effect = {"fr": 1.5, "de": -1.5, "jp": 0.5, "br": -0.5, "us": 0.0}
    y = (x[:, 0] - x[:, 1] + np.array([effect[c] for c in country])
         + 0.3 * rng.normal(size=1200) > 0).astype(int)
    write_table(tmp_path / "train.csv", x[:900], y[:900], {"country": country[:900]})
    write_table(tmp_path / "val.csv", x[900:], y[900:], {"country": country[900:]})
    checkpoint, metrics = train(
        tmp_path, "data=files", f"data.train_path={tmp_path / 'train.csv'}",
        f"data.val_path={tmp_path / 'val.csv'}", "data.label_column=y",
        "data.feature_columns=[f0,f1,f2,f3]", "data.categorical_columns=[country]",
        "data.hash_bits=6", "data.batch_size=100", f"data.cache_dir={tmp_path / 'cache'}")
    assert load_checkpoint(checkpoint)["model"]["input.shift"].numel() == 4 + 2**6

    by_path = evaluated(tmp_path, checkpoint, f"data.path={tmp_path / 'val.csv'}")
    assert by_path["rows"] == 300
    assert by_path["accuracy"] == pytest.approx(metrics["val/accuracy"], abs=1e-6)
    write_table(tmp_path / "new.csv", x[900:], y[900:], {"country": country[900:]},
                with_label=False)
    labels = predicted_labels(tmp_path, checkpoint, f"input={tmp_path / 'new.csv'}")
    assert np.mean(labels == y[900:]) == pytest.approx(metrics["val/accuracy"], abs=1e-6)


@pytest.mark.e2e
def test_the_columns_found_in_the_training_file_come_with_the_checkpoint(tmp_path):
    """Trained with `data.feature_columns` unset (every numeric column), the checkpoint holds
    the columns the training file had, by name: a file with the same columns in another order
    is read into the model's columns, and scores as the run's validation file did."""
    x, y = scaled_problem(1200, seed=2)
    names = ["f0", "f1", "f2", "f3", "y"]
    rows = np.column_stack([x, y])
    for name, part in (("train", rows[:900]), ("val", rows[900:])):
        np.savetxt(tmp_path / f"{name}.csv", part, delimiter=",", header=",".join(names),
                   comments="", fmt="%.17g")
    order = [3, 4, 1, 0, 2]  # f3, y, f1, f0, f2
    np.savetxt(tmp_path / "shuffled.csv", rows[900:, order], delimiter=",", comments="",
               header=",".join(names[i] for i in order), fmt="%.17g")
    checkpoint, metrics = train(
        tmp_path, "data=files", f"data.train_path={tmp_path / 'train.csv'}",
        f"data.val_path={tmp_path / 'val.csv'}", "data.label_column=y",
        f"data.cache_dir={tmp_path / 'cache'}")
    assert load_checkpoint(checkpoint)["config"]["data"]["feature_columns"] == names[:4]

    shuffled = evaluated(tmp_path, checkpoint, f"data.path={tmp_path / 'shuffled.csv'}")
    assert shuffled["rows"] == 300
    assert shuffled["accuracy"] == pytest.approx(metrics["val/accuracy"], abs=1e-6)
    assert shuffled["loss"] == pytest.approx(metrics["val/loss"], rel=1e-5)
