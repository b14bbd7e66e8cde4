"""`python -m largeml.predict` end to end: predictions equal the model's own scores, row by row."""

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli, write_dense_shards
from omegaconf import OmegaConf
from test_evaluate import compose_entry, run_module

from largeml.data.convert import convert
from largeml.errors import LargemlError
from largeml.inference import load_model
from largeml.predict import input_scores
from largeml.predict import run as predict_run

pytestmark = pytest.mark.e2e

ROWS, FEATURES, BATCH = 700, 12, 64  # 11 batches, the last one short


@pytest.fixture(scope="module")
def features(tmp_path_factory) -> np.ndarray:
    return np.random.default_rng(1).normal(size=(ROWS, FEATURES)).astype(np.float32)


def _train(root: Path, *overrides: str) -> Path:
    shards = write_dense_shards(root / "train", rows=1000, features=FEATURES)
    result = run_cli(f"hydra.run.dir={root / 'run'}", "data=files", f"data.train_path={shards}",
                     "data.batch_size=128", "trainer.max_epochs=1", *overrides, cwd=root)
    assert result.returncode == 0, result.stderr + result.stdout
    return root / "run" / "checkpoints" / "last.pt"


@pytest.fixture(scope="module")
def logreg(tmp_path_factory) -> Path:
    return _train(tmp_path_factory.mktemp("logreg"))


@pytest.fixture(scope="module")
def svm(tmp_path_factory) -> Path:
    return _train(tmp_path_factory.mktemp("svm"), "model=svm")


def direct_scores(checkpoint: Path, x: np.ndarray) -> np.ndarray:
    """The checkpoint's model applied to all of `x` at once, in this process."""
    model, _, _ = load_model(str(checkpoint))
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def read_csv(path: Path) -> tuple[list[str], np.ndarray]:
    header = path.read_text().splitlines()[0].split(",")
    return header, np.loadtxt(path, delimiter=",", skiprows=1, ndmin=2)


def text(value: np.float32) -> str:
    """A float32 as text that reads back to the same float32."""
    return repr(float(value))


def predict(tmp_path: Path, checkpoint: Path, input: Path, output: Path, *extra: str):
    result = run_module("predict", f"checkpoint={checkpoint}", f"input={input}",
                        f"output={output}", f"batch_size={BATCH}", *extra, cwd=tmp_path)
    assert result.returncode == 0, result.stderr + result.stdout
    assert f"predicted {ROWS} rows -> {output}" in result.stdout


def test_predict_npy_without_labels_to_csv_and_npy(tmp_path, logreg, features):
    np.save(tmp_path / "x.npy", features)
    expected = direct_scores(logreg, features)
    assert (expected > 0).any() and (expected <= 0).any()

    predict(tmp_path, logreg, tmp_path / "x.npy", tmp_path / "p.csv")
    header, table = read_csv(tmp_path / "p.csv")
    assert header == ["score", "probability", "label"]
    assert table.shape == (ROWS, 3)  # one line per row, in the input's order
    np.testing.assert_allclose(table[:, 0], expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(table[:, 1], 1 / (1 + np.exp(-expected)), rtol=1e-6)
    np.testing.assert_array_equal(table[:, 2], expected > 0)

    predict(tmp_path, logreg, tmp_path / "x.npy", tmp_path / "p.npy")
    saved = np.load(tmp_path / "p.npy")
    assert saved.dtype.names == ("score", "probability", "label") and saved.shape == (ROWS,)
    np.testing.assert_allclose(saved["score"], expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(saved["probability"], 1 / (1 + np.exp(-expected)), rtol=1e-6)
    np.testing.assert_array_equal(saved["label"], expected > 0)


def test_predict_libsvm_csv_and_shard_inputs(tmp_path, logreg, features):
    expected = direct_scores(logreg, features)
    labels = np.random.default_rng(2).integers(0, 2, ROWS)  # read, but not used
    header = "label," + ",".join(f"f{i}" for i in range(FEATURES)) + "\n"
    (tmp_path / "x.csv").write_text(header + "".join(
        f"{y}," + ",".join(map(text, row)) + "\n" for y, row in zip(labels, features, strict=True)))
    (tmp_path / "x.svm").write_text("".join(  # every third feature left out: sparse rows
        f"{2 * y - 1} " + " ".join(f"{j + 1}:{text(v)}" for j, v in enumerate(row) if j % 3)
        + "\n" for y, row in zip(labels, features, strict=True)))
    sparse = features * (np.arange(FEATURES) % 3 != 0)  # what the LIBSVM file holds
    np.save(tmp_path / "x.npy", features)
    np.save(tmp_path / "y.npy", labels)
    convert(tmp_path / "x.npy", tmp_path / "shards", labels=tmp_path / "y.npy")
    cases = [("x.csv", expected), ("x.svm", direct_scores(logreg, sparse)), ("shards", expected)]
    for name, scores in cases:
        predict(tmp_path, logreg, tmp_path / name, tmp_path / f"{name}.csv")
        _, table = read_csv(tmp_path / f"{name}.csv")
        np.testing.assert_allclose(table[:, 0], scores, rtol=1e-5, atol=1e-6, err_msg=name)


def test_predict_csv_without_a_label_column(tmp_path, logreg, features):
    """A file to score usually has no labels: with label_column=auto (the default) a CSV
    without a `label` column is all features; one with it has that column left out."""
    expected = direct_scores(logreg, features)
    names = [f"f{i}" for i in range(FEATURES)]
    rows = [",".join(map(text, row)) for row in features]
    (tmp_path / "plain.csv").write_text(",".join(names) + "\n" + "\n".join(rows) + "\n")
    labelled = [",".join([*row.split(",")[:3], "1", *row.split(",")[3:]]) for row in rows]
    (tmp_path / "labelled.csv").write_text(",".join([*names[:3], "label", *names[3:]]) + "\n"
                                           + "\n".join(labelled) + "\n")
    for name in ("plain.csv", "labelled.csv"):
        predict(tmp_path, logreg, tmp_path / name, tmp_path / f"{name}.out.csv")
        _, table = read_csv(tmp_path / f"{name}.out.csv")
        np.testing.assert_allclose(table[:, 0], expected, rtol=1e-5, atol=1e-6, err_msg=name)


def test_unlabelled_data_is_refused_for_training_and_evaluation(tmp_path, logreg, features):
    header = ",".join(f"f{i}" for i in range(FEATURES))
    (tmp_path / "x.csv").write_text(header + "\n" + "".join(
        ",".join(map(text, row)) + "\n" for row in features))
    result = run_cli(f"hydra.run.dir={tmp_path / 'run'}", "data=files",
                     f"data.train_path={tmp_path / 'x.csv'}", "data.label_column=null",
                     cwd=tmp_path)
    assert result.returncode == 2
    assert "data.label_column=null means no labels: training needs them" in result.stdout
    convert(tmp_path / "x.csv", tmp_path / "scoring", label_column=None)  # prepared unlabelled
    result = run_cli(f"hydra.run.dir={tmp_path / 'run2'}", "data=files",
                     f"data.train_path={tmp_path / 'scoring'}", cwd=tmp_path)
    assert result.returncode == 2
    assert f"data.train_path {tmp_path / 'scoring'} was prepared from" in result.stdout
    assert "label_column=null: it has no labels" in result.stdout
    result = run_module("evaluate", f"checkpoint={logreg}", f"data.path={tmp_path / 'scoring'}",
                        cwd=tmp_path)
    assert result.returncode == 2 and "label_column=null: it has no labels" in result.stdout


def test_predict_svm_has_no_probability(tmp_path, svm, features):
    np.save(tmp_path / "x.npy", features)
    predict(tmp_path, svm, tmp_path / "x.npy", tmp_path / "p.csv")
    header, table = read_csv(tmp_path / "p.csv")
    assert header == ["score", "label"]
    np.testing.assert_allclose(table[:, 0], direct_scores(svm, features), rtol=1e-6, atol=1e-7)
    predict(tmp_path, svm, tmp_path / "x.npy", tmp_path / "p.npy")
    assert np.load(tmp_path / "p.npy").dtype.names == ("score", "label")


def test_probability_is_only_for_logistic_models(tmp_path, logreg, svm, features):
    np.save(tmp_path / "x.npy", features)
    result = run_module("predict", f"checkpoint={svm}", f"input={tmp_path / 'x.npy'}",
                        f"output={tmp_path / 'p.csv'}", "probability=true", cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "probability=true, but this model was trained with loss=hinge" in output
    assert "use probability=auto or probability=false" in output and "Traceback" not in output
    assert not (tmp_path / "p.csv").exists()
    predict(tmp_path, logreg, tmp_path / "x.npy", tmp_path / "q.csv", "probability=false")
    assert read_csv(tmp_path / "q.csv")[0] == ["score", "label"]


@pytest.mark.parametrize("name", ["x.npy", "shards"])
def test_predict_streams_one_batch_at_a_time(tmp_path, logreg, features, name):
    np.save(tmp_path / "x.npy", features)
    write_dense_shards(tmp_path / "shards", rows=ROWS, features=FEATURES)
    cfg = OmegaConf.create({"input": str(tmp_path / name), "format": "auto", "n_features": None,
                            "label_column": "label", "cache_dir": str(tmp_path / "cache"),
                            "batch_size": BATCH})
    model, _, _ = load_model(str(logreg))
    rows, batches = input_scores(cfg, model, torch.device("cpu"))
    sizes = [len(scores) for scores in batches]
    assert rows == ROWS == sum(sizes)
    assert sizes == [BATCH] * (ROWS // BATCH) + [ROWS % BATCH]


def test_predict_missing_input_exits_2(tmp_path, logreg):
    result = run_module("predict", f"checkpoint={logreg}", f"input={tmp_path}/missing.npy",
                        f"output={tmp_path}/p.csv", cwd=tmp_path)
    assert result.returncode == 2
    assert f"input: no such file or directory: {tmp_path}/missing.npy" in result.stdout
    assert not (tmp_path / "p.csv").exists()


@pytest.mark.parametrize("args, message", [
    (["input={tmp}/x.npy", "output={tmp}/p.txt"], "must end in .csv or .npy"),
    (["output={tmp}/p.csv"], "input is required"),
    (["input={tmp}/x.npy"], "output is required"),
    (["input={tmp}/wide.npy", "output={tmp}/p.csv"], "has 13 features but the model takes 12"),
], ids=["bad-output", "input-unset", "output-unset", "width"])
def test_predict_bad_arguments_name_the_key(tmp_path, logreg, features, args, message):
    np.save(tmp_path / "x.npy", features)
    np.save(tmp_path / "wide.npy", np.zeros((3, FEATURES + 1), np.float32))
    cfg = compose_entry("predict", f"checkpoint={logreg}",
                        *(a.format(tmp=tmp_path) for a in args))
    with pytest.raises(LargemlError, match=message):
        predict_run(cfg)


# ----------------------------------------------------------------------------- export


@pytest.mark.parametrize("suffix", [".npy", ".txt"])
def test_export_gives_the_scores_of_the_model(tmp_path, svm, features, suffix):
    output = tmp_path / f"weights{suffix}"
    result = run_module("export", f"checkpoint={svm}", f"output={output}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr + result.stdout
    assert f"exported {FEATURES} weights and the bias -> {output}" in result.stdout
    values = np.load(output) if suffix == ".npy" else np.loadtxt(output, dtype=np.float32)
    assert values.shape == (FEATURES + 1,)
    w, b = values[:-1], values[-1]
    assert np.abs(w).max() > 0  # trained, not the zero start
    # float32 sums in two orders: they differ by rounding, in proportion to Σ|w_j·x_j|
    rounding = 1e-6 * (np.abs(features) @ np.abs(w) + abs(b))
    difference = np.abs(features @ w + b - direct_scores(svm, features))
    assert (difference <= rounding).all(), (difference / rounding).max()


def test_export_refuses_an_mlp(tmp_path):
    checkpoint = _train(tmp_path, "model=mlp")
    result = run_module("export", f"checkpoint={checkpoint}", f"output={tmp_path}/w.npy",
                        cwd=tmp_path)
    assert result.returncode == 2
    assert "largeml.models.MLP" in result.stdout and "linear models only" in result.stdout
    assert not (tmp_path / "w.npy").exists()
