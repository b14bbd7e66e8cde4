"""Parquet input: found by content, streamed by row group into shards, columns by name and type,
a Spark-style directory of part files, clear errors; a9a as Parquet trains like its LIBSVM file."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, run_cli

from largeml.data.convert import cached, convert, resolve_format
from largeml.data.formats.libsvm import read_libsvm
from largeml.data.shards import ShardIndex
from largeml.data.sources import A9A_DIR, files
from largeml.errors import ConfigError, DataError

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


def dense(index: ShardIndex) -> tuple[np.ndarray, np.ndarray]:
    """(features, labels as stored) of a dense dataset, read back with np.load."""
    assert index.layout == "dense"
    x = np.concatenate([np.load(index.path(s, "x")) for s in index.shards])
    y = np.concatenate([np.load(index.path(s, "y")) for s in index.shards])
    return x, y


def table(rows: int = 50, seed: int = 0) -> "pa.Table":
    """Ints, floats, booleans, a text column and integer labels."""
    rng = np.random.default_rng(seed)
    return pa.table({
        "id": pa.array([f"r{i}" for i in range(rows)]),  # text: not a feature by default
        "age": pa.array(rng.integers(18, 90, rows), pa.int32()),
        "income": pa.array(rng.normal(size=rows)),
        "member": pa.array(rng.random(rows) < 0.5),
        "label": pa.array(rng.integers(0, 2, rows)),
    })


def expected(t: "pa.Table", columns=("age", "income", "member")) -> np.ndarray:
    return np.column_stack([t[c].to_numpy().astype(np.float64) for c in columns]) \
        .astype(np.float32)


@pytest.mark.unit
def test_round_trip_by_row_group_and_found_by_content(tmp_path):
    """Several row groups into several shards; the numeric columns (booleans too) but the label
    in file order; a file not named .parquet is found by its PAR1 magic."""
    t = table(rows=300)
    path = tmp_path / "data.bin"
    pq.write_table(t, path, row_group_size=40)
    assert resolve_format(path, "auto") == "parquet"
    index = convert(path, tmp_path / "out", shard_bytes=1024)
    assert len(index.shards) > 1 and index.n_features == 3
    assert index.source["feature_columns"] == ["age", "income", "member"]
    x, y = dense(index)
    np.testing.assert_array_equal(x, expected(t))
    np.testing.assert_array_equal(y, t["label"].to_numpy())


@pytest.mark.unit
def test_feature_columns_label_column_and_string_labels(tmp_path):
    t = table().append_column("kind", pa.array(["cat", "dog"] * 25))
    pq.write_table(t, tmp_path / "a.parquet")
    index = convert(tmp_path / "a.parquet", tmp_path / "out", label_column="kind",
                    feature_columns=["member", "age"])
    x, y = dense(index)
    np.testing.assert_array_equal(x, expected(t, ("member", "age")))
    assert index.label_names == ["cat", "dog"] and y.tolist() == [0, 1] * 25
    assert index.label_counts == {"cat": 25, "dog": 25}
    # No labels (rows to score): the same columns, every label 0.
    unlabelled = convert(tmp_path / "a.parquet", tmp_path / "u", label_column=None,
                         feature_columns=["member", "age"])
    np.testing.assert_array_equal(dense(unlabelled)[0], x)
    assert unlabelled.source["label_column"] is None


@pytest.mark.unit
def test_spark_directory_of_part_files(tmp_path):
    """Parts read in name order as one table; _SUCCESS, .crc and _metadata files ignored."""
    t = table(rows=90)
    out = tmp_path / "spark.parquet"
    out.mkdir()
    for i, lo in enumerate(range(0, 90, 30)):
        pq.write_table(t.slice(lo, 30), out / f"part-{i:05d}-abc.snappy.parquet")
    (out / "_SUCCESS").write_text("")
    (out / ".part-00000-abc.snappy.parquet.crc").write_bytes(b"junk")
    (out / "_metadata").write_bytes(b"PAR1 not one")
    assert resolve_format(out, "auto") == "parquet"
    index = convert(out, tmp_path / "shards")
    x, y = dense(index)
    np.testing.assert_array_equal(x, expected(t))
    assert index.source["parts"] == 3
    # Through data=files: a directory that is not a shard directory is converted.
    module = files(str(out), str(out), cache_dir=str(tmp_path / "cache"))
    assert module.n_train == 90 and module.n_features == 3
    # A part whose label column has another kind (text, not numbers) is named.
    odd = t.slice(0, 30).set_column(4, "label", pa.array(["yes", "no"] * 15))
    pq.write_table(odd, out / "part-00009-abc.snappy.parquet")
    with pytest.raises(DataError, match=r"part-00009-abc.snappy.parquet: label column 'label' "
                                        "is string, but in the first part file it is numeric"):
        convert(out, tmp_path / "again")


@pytest.mark.unit
@pytest.mark.parametrize("cut", ["truncated", "garbage"])
def test_damaged_file_names_it(tmp_path, cut):
    good = tmp_path / "good.parquet"
    pq.write_table(table(rows=2000), good, row_group_size=500)
    data = good.read_bytes()
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(data[: len(data) // 2] if cut == "truncated" else b"PAR1" + bytes(100))
    with pytest.raises(DataError, match="bad.parquet") as err:
        convert(bad, tmp_path / "out")
    assert "Parquet" in str(err.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.unit
def test_column_errors_name_the_file_and_column(tmp_path):
    t = table()
    path = tmp_path / "a.parquet"
    pq.write_table(t, path)
    with pytest.raises(DataError, match=r"a\.parquet.*label_column 'target'"):
        convert(path, tmp_path / "out", label_column="target")
    with pytest.raises(DataError, match=r"a\.parquet.*feature column 'height' is not"):
        convert(path, tmp_path / "out", feature_columns=["age", "height"])
    with pytest.raises(DataError, match=r"feature column 'id' is string, not numeric.*"
                                        "categorical_columns"):
        convert(path, tmp_path / "out", feature_columns=["age", "id"])
    with_null = t.set_column(2, "income", pa.array([None] + t["income"].to_pylist()[1:]))
    pq.write_table(with_null, tmp_path / "n.parquet")
    with pytest.raises(DataError, match=r"n\.parquet: row 0, column 'income': null"):
        convert(tmp_path / "n.parquet", tmp_path / "out")
    half = t.set_column(4, "label", pa.array([0.5] * len(t)))
    pq.write_table(half, tmp_path / "h.parquet")
    with pytest.raises(DataError, match=r"h\.parquet: row 0, column 'label'.*not an integer"):
        convert(tmp_path / "h.parquet", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.unit
def test_without_pyarrow_says_how_to_install(tmp_path, monkeypatch):
    pq.write_table(table(), tmp_path / "a.parquet")
    for name in ("pyarrow", "pyarrow.parquet", "pyarrow.compute"):
        monkeypatch.setitem(sys.modules, name, None)  # import raises ImportError
    with pytest.raises(ConfigError, match=r"pip install largeml\[parquet\]"):
        convert(tmp_path / "a.parquet", tmp_path / "out")


@pytest.mark.unit
def test_validation_file_with_other_columns_is_an_error(tmp_path):
    t = table()
    pq.write_table(t, tmp_path / "train.parquet")
    pq.write_table(t.select(["label", "income", "age", "member"]), tmp_path / "val.parquet")
    with pytest.raises(DataError, match=r"val\.parquet has the feature columns \['income', "
                                        r"'age', 'member'\], but data.train_path"):
        files(str(tmp_path / "train.parquet"), str(tmp_path / "val.parquet"),
              cache_dir=str(tmp_path / "cache"))
    module = files(str(tmp_path / "train.parquet"), str(tmp_path / "val.parquet"),
                   feature_columns=["age", "income"], cache_dir=str(tmp_path / "cache"))
    assert module.n_features == 2


@pytest.mark.unit
def test_cache_key_covers_the_column_options(tmp_path):
    pq.write_table(table(), tmp_path / "a.parquet")
    first = cached(tmp_path / "a.parquet", tmp_path / "c", label_column="label")
    again = cached(tmp_path / "a.parquet", tmp_path / "c", label_column="label")
    other = cached(tmp_path / "a.parquet", tmp_path / "c", label_column="label",
                   feature_columns=["age"])
    assert first.root == again.root != other.root and other.n_features == 1


# ----------------------------------------------------------------------------- a9a, end to end


def write_a9a_parquet(root: Path) -> tuple[Path, Path]:
    """a9a and a9a.t as Parquet: 123 float32 columns f1 ... f123 and an int `label` (-1/+1)."""
    paths = []
    for name in ("a9a", "a9a.t"):
        rows = read_libsvm(A9A_DIR / f"{name}.gz")
        x = rows.to_dense(123)
        columns = {f"f{j + 1}": x[:, j] for j in range(123)}
        columns["label"] = rows.labels.astype(np.int64)
        pq.write_table(pa.table(columns), root / f"{name}.parquet", row_group_size=8192)
        paths.append(root / f"{name}.parquet")
    return paths[0], paths[1]


@pytest.mark.e2e
@pytest.mark.slow
def test_a9a_as_parquet_trains_like_the_libsvm_files(tmp_path):
    """The same default run (logreg, C = 1, optimizer=auto: Newton for both, as both fit in
    memory) on dense Parquet rows and on the sparse LIBSVM rows: the same val/accuracy."""
    train, test = write_a9a_parquet(tmp_path)
    metrics = {}
    for kind, (a, b) in {"parquet": (train, test),
                         "libsvm": (A9A_DIR / "a9a.gz", A9A_DIR / "a9a.t.gz")}.items():
        run_dir = tmp_path / kind
        result = run_cli(f"hydra.run.dir={run_dir}", "data=files", f"data.train_path={a}",
                         f"data.val_path={b}", f"data.cache_dir={tmp_path / 'cache'}",
                         cwd=tmp_path)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "optimizer=auto: newton" in result.stdout + result.stderr
        metrics[kind] = json.loads((run_dir / "metrics.json").read_text())
    assert "dense shards" in (tmp_path / "parquet" / "train.log").read_text()
    assert metrics["parquet"]["val/accuracy"] == pytest.approx(
        metrics["libsvm"]["val/accuracy"], abs=1e-4)
    assert metrics["parquet"]["val/accuracy"] >= 0.845  # LIBLINEAR, C = 1: 84.99 %


@pytest.mark.e2e
def test_prepare_a_parquet_file(tmp_path):
    t = table(rows=500)
    pq.write_table(t, tmp_path / "a.parquet", row_group_size=100)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-m", "largeml.prepare", "input=a.parquet", "output=shards",
         "feature_columns=[income,age]"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "prepared 500 rows x 2 features" in result.stdout
    from largeml.data.shards import open_shards

    x, _ = dense(open_shards(tmp_path / "shards"))
    np.testing.assert_array_equal(x, expected(t, ("income", "age")))
