"""Labels as the data spells them: CSV string labels (`setosa`, `spam`) through prepare, train,
evaluate and predict, and binary labels written back as -1/+1 where the data says -1/+1."""

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli
from test_evaluate import run_module

from largeml.data.convert import convert
from largeml.errors import DataError

SPECIES = np.array(["setosa", "versicolor", "virginica"])


def _species(seed: int, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Four Gaussian features; the class is the largest of the first three plus noise."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, 4)).round(5)
    y = np.argmax(x[:, :3] + 0.5 * rng.normal(size=(rows, 3)), axis=1)
    return x, y


def _write_csv(path: Path, x: np.ndarray, labels: np.ndarray, quote: bool = False) -> Path:
    """The label third of five columns, as an exported table might have it."""
    with open(path, "w") as f:
        f.write("a,b,species,c,d\n")
        for row, label in zip(x, labels, strict=True):
            label = f'"{label}"' if quote else label
            f.write(f"{row[0]},{row[1]},{label},{row[2]},{row[3]}\n")
    return path


@pytest.fixture(scope="module")
def species(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("species")
    x_train, y_train = _species(0, 2400)
    x_val, y_val = _species(1, 900)
    # No setosa in the validation file: its codes 0 and 1 stand for classes 1 and 2, so the
    # class of a code must be found through the file's own names.
    x_val, y_val = x_val[y_val > 0], y_val[y_val > 0]
    train = _write_csv(root / "train.csv", x_train, SPECIES[y_train])
    val = _write_csv(root / "val.csv", x_val, SPECIES[y_val])
    result = run_cli(f"hydra.run.dir={root / 'run'}", "data=files", f"data.train_path={train}",
                     f"data.val_path={val}", "data.label_column=species", "data.scale=none",
                     f"data.cache_dir={root / 'cache'}", cwd=root)
    assert result.returncode == 0, result.stderr + result.stdout
    return {"root": root, "val": val, "x": (x_train, x_val), "y": (y_train, y_val),
            "run": root / "run", "checkpoint": root / "run" / "checkpoints" / "last.pt"}


@pytest.mark.unit
def test_string_labels_are_stored_as_codes_of_the_files_own_names(tmp_path):
    x, y = _species(2, 50)
    index = convert(_write_csv(tmp_path / "s.csv", x, SPECIES[y]), tmp_path / "shards",
                    label_column="species")
    assert index.label_names == SPECIES.tolist()  # one chunk: its labels' codes alphabetical
    assert index.label_counts == {name: int((y == k).sum()) for k, name in enumerate(SPECIES)}
    stored = np.load(index.path(index.shards[0], "y"))
    np.testing.assert_array_equal(stored, y)


@pytest.mark.unit
def test_quoted_and_unquoted_string_labels_read_alike(tmp_path):
    # Quotes send every chunk through the line-by-line reader; both readers agree.
    x, y = _species(3, 200)
    plain = convert(_write_csv(tmp_path / "plain.csv", x, SPECIES[y]), tmp_path / "plain",
                    label_column="species")
    quoted = convert(_write_csv(tmp_path / "quoted.csv", x, SPECIES[y], quote=True),
                     tmp_path / "quoted", label_column="species")
    assert plain.label_names == quoted.label_names and plain.label_counts == quoted.label_counts
    for kind in ("x", "y"):
        np.testing.assert_array_equal(np.load(plain.path(plain.shards[0], kind)),
                                      np.load(quoted.path(quoted.shards[0], kind)))


@pytest.mark.unit
def test_a_string_after_numeric_labels_names_its_line(tmp_path):
    path = tmp_path / "mixed.csv"
    path.write_text("a,label\n0.5,1\n0.25,0\n0.75,other\n")
    with pytest.raises(DataError, match=r"mixed\.csv:4: column 'label': label 'other' is not a "
                                        r"number, but this file's first label was"):
        convert(path, tmp_path / "shards")


@pytest.mark.unit
def test_an_empty_string_label_names_its_line(tmp_path):
    path = tmp_path / "empty.csv"
    path.write_text("a,label\n0.5,cat\n0.25,\n")
    with pytest.raises(DataError, match=r"empty\.csv:3: column 'label': the label is empty"):
        convert(path, tmp_path / "shards")


@pytest.mark.e2e
def test_training_on_string_labels_reaches_scikit_learns_optimum(species):
    from sklearn.linear_model import LogisticRegression

    metrics = json.loads((species["run"] / "metrics.json").read_text())
    (x_train, x_val), (y_train, y_val) = species["x"], species["y"]
    peer = LogisticRegression(C=1.0, tol=1e-10, max_iter=10_000).fit(x_train, y_train)
    assert abs(metrics["val/accuracy"] - peer.score(x_val, y_val)) <= 0.005
    assert metrics["val/accuracy"] > 0.75  # well above a third: the labels were read right


@pytest.mark.e2e
def test_evaluate_and_predict_speak_the_datas_labels(species, tmp_path):
    from sklearn.linear_model import LogisticRegression

    val, checkpoint = species["val"], species["checkpoint"]
    (x_train, x_val), (y_train, y_val) = species["x"], species["y"]
    cache = f"data.cache_dir={species['root'] / 'cache'}"
    result = run_module("evaluate", f"checkpoint={checkpoint}", f"data.path={val}",
                        "data.label_column=species", cache, f"output={tmp_path / 'eval.json'}",
                        cwd=tmp_path)
    assert result.returncode == 0, result.stderr + result.stdout
    evaluated = json.loads((tmp_path / "eval.json").read_text())
    metrics = json.loads((species["run"] / "metrics.json").read_text())
    assert evaluated["classes"] == SPECIES.tolist()
    assert evaluated["accuracy"] == pytest.approx(metrics["val/accuracy"])
    confusion = np.array(evaluated["confusion_matrix"])
    assert confusion.sum(axis=1).tolist() == np.bincount(y_val, minlength=3).tolist()

    for output in (tmp_path / "p.csv", tmp_path / "p.npy"):
        result = run_module("predict", f"checkpoint={checkpoint}", f"input={val}",
                            "label_column=species", f"cache_dir={species['root'] / 'cache'}",
                            f"output={output}", cwd=tmp_path)
        assert result.returncode == 0, result.stderr + result.stdout
        if output.suffix == ".csv":
            lines = output.read_text().splitlines()
            assert lines[0].split(",")[-4:] == ["probability_setosa", "probability_versicolor",
                                                "probability_virginica", "label"]
            labels = np.array([line.rsplit(",", 1)[1] for line in lines[1:]])
        else:
            labels = np.load(output)["label"]
        assert set(labels) <= set(SPECIES)
        assert np.mean(labels == SPECIES[y_val]) == pytest.approx(evaluated["accuracy"])
        peer = LogisticRegression(C=1.0, tol=1e-10, max_iter=10_000).fit(x_train, y_train)
        assert np.mean(labels == SPECIES[peer.predict(x_val)]) >= 0.99


@pytest.mark.e2e
@pytest.mark.slow  # the default tier keeps a shorter case of the same kind
def test_binary_string_labels_and_their_class_weights(tmp_path):
    rng = np.random.default_rng(4)
    x = rng.normal(size=(1500, 2)).round(4)
    spam = x[:, 0] + x[:, 1] + 0.5 * rng.normal(size=1500) > 1.0
    path = tmp_path / "mail.csv"
    with open(path, "w") as f:
        f.write("f1,f2,label\n")
        for row, is_spam in zip(x, spam, strict=True):
            f.write(f"{row[0]},{row[1]},{'spam' if is_spam else 'ham'}\n")
    runs = {}
    for name, weights in (("plain", []), ("weighted", ["+loss.class_weight={spam: 4}"])):
        result = run_cli(f"hydra.run.dir={tmp_path / name}", "data=files",
                         f"data.train_path={path}", f"data.cache_dir={tmp_path / 'cache'}",
                         *weights, cwd=tmp_path)
        assert result.returncode == 0, result.stderr + result.stdout
        output = tmp_path / f"{name}.csv"
        result = run_module("predict", f"checkpoint={tmp_path / name / 'checkpoints/last.pt'}",
                            f"input={path}", f"cache_dir={tmp_path / 'cache'}",
                            f"output={output}", cwd=tmp_path)
        assert result.returncode == 0, result.stderr + result.stdout
        lines = output.read_text().splitlines()
        assert lines[0] == "score,probability,label"
        rows = [line.split(",") for line in lines[1:]]
        # One score, positive for the second class in alphabetical order: spam.
        assert all((float(score) > 0) == (label == "spam") for score, _, label in rows)
        runs[name] = np.array([label == "spam" for _, _, label in rows])
    assert runs["plain"].mean() == pytest.approx(spam.mean(), abs=0.05)
    assert runs["weighted"].mean() > runs["plain"].mean() + 0.02  # spam weighs 4, so more spam


@pytest.mark.e2e
@pytest.mark.slow  # the default tier keeps a shorter case of the same kind
def test_binary_labels_are_predicted_as_the_data_spells_them(tmp_path):
    rng = np.random.default_rng(5)
    x = rng.normal(size=(400, 3))
    signed = np.where(x[:, 0] > 0, 1, -1)
    path = tmp_path / "signed.svm"
    path.write_text("".join(f"{t:+d} 1:{a:.5f} 2:{b:.5f} 3:{c:.5f}\n"
                            for t, (a, b, c) in zip(signed, x, strict=True)))
    result = run_cli(f"hydra.run.dir={tmp_path / 'run'}", "data=files",
                     f"data.train_path={path}", f"data.cache_dir={tmp_path / 'cache'}",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr + result.stdout
    for output in (tmp_path / "p.csv", tmp_path / "p.npy"):
        result = run_module("predict", f"checkpoint={tmp_path / 'run/checkpoints/last.pt'}",
                            f"input={path}", f"cache_dir={tmp_path / 'cache'}",
                            f"output={output}", cwd=tmp_path)
        assert result.returncode == 0, result.stderr + result.stdout
        if output.suffix == ".csv":
            table = np.loadtxt(output, delimiter=",", skiprows=1)
            score, label = table[:, 0], table[:, -1]
        else:
            table = np.load(output)
            score, label = table["score"], table["label"]
        assert set(np.unique(label)) == {-1, 1}
        np.testing.assert_array_equal(label, np.where(score > 0, 1, -1))
        assert np.mean(label == signed) > 0.95


@pytest.mark.e2e
def test_a_validation_label_outside_the_training_classes_names_the_file(tmp_path):
    x, y = _species(6, 300)
    train = _write_csv(tmp_path / "train.csv", x, SPECIES[y])
    labels = SPECIES[y].copy()
    labels[7] = "unknown"
    val = _write_csv(tmp_path / "val.csv", x, labels)
    result = run_cli(f"hydra.run.dir={tmp_path / 'run'}", "data=files", f"data.train_path={train}",
                     f"data.val_path={val}", "data.label_column=species",
                     f"data.cache_dir={tmp_path / 'cache'}", cwd=tmp_path)
    assert result.returncode != 0
    assert (f"data.val_path {val}: label unknown is not one of the training classes "
            "(setosa, versicolor, virginica)") in result.stderr + result.stdout
