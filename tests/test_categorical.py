"""Categorical columns (`categorical_columns`, CSV and Parquet): each value hashed with its
column's name into one-hot buckets after the numeric columns; missing values make no feature.
A generated set trains through the CLI to scikit-learn's one-hot LogisticRegression."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, run_cli

from largeml.data import hashing
from largeml.data.convert import convert
from largeml.data.formats import common
from largeml.data.shards import ShardIndex, open_shards
from largeml.errors import ConfigError, DataError

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

CSV = """label,x1,country,device,x2
1,0.5,FR,phone,2
0,-1,DE,,0
1,0,"FR",tablet,1.5
0,3,, phone ,-2
"""
# The rows above as (numeric values, categorical values); None: missing.
ROWS = [((0.5, 2.0), {"country": "FR", "device": "phone"}),
        ((-1.0, 0.0), {"country": "DE", "device": None}),
        ((0.0, 1.5), {"country": "FR", "device": "tablet"}),
        ((3.0, -2.0), {"country": None, "device": "phone"})]  # " phone " is stripped


def entries(index: ShardIndex) -> list[dict[int, float]]:
    """Each row of a sparse dataset as {column: value}, read back with np.load."""
    out = []
    for shard in index.shards:
        indptr, indices, values = (np.load(index.path(shard, k))
                                   for k in ("indptr", "indices", "values"))
        out += [dict(zip(indices[a:b].tolist(), values[a:b].tolist(), strict=True))
                for a, b in zip(indptr[:-1], indptr[1:], strict=True)]
    return out


def by_hand(bits: int) -> list[dict[int, float]]:
    """ROWS as the documented map makes them: x1, x2 as columns 0, 1; value v of column c as
    column 2 + category_columns(c, [v], bits), value 1."""
    out = []
    for numbers, categories in ROWS:
        row = {j: v for j, v in enumerate(numbers) if v != 0}
        for name, value in categories.items():
            if value is not None:
                column = 2 + int(hashing.category_columns(name, [value], bits)[0])
                row[column] = row.get(column, 0) + 1.0
        out.append(row)
    return out


@pytest.mark.unit
@pytest.mark.parametrize("chunked", [False, True], ids=["one-chunk", "line-by-line"])
def test_csv_values_are_one_hot_after_the_numeric_columns(tmp_path, monkeypatch, chunked):
    """The quoted "FR" sends its chunk to the csv module; in small chunks the other lines take
    the fast path: both give the documented map. Empty fields make no feature."""
    if chunked:
        monkeypatch.setattr(common, "CHUNK_BYTES", 24)  # about a line a chunk
    (tmp_path / "a.csv").write_text(CSV)
    index = convert(tmp_path / "a.csv", tmp_path / "out", categorical_columns=["country", "device"],
                    hash_bits=8)
    assert index.layout == "sparse" and index.n_features == 2 + 256
    assert entries(index) == by_hand(8)
    assert index.source["feature_columns"] == ["x1", "x2"]
    assert index.source["categorical_columns"] == ["country", "device"]
    assert index.source["hash_bits"] == 8


@pytest.mark.unit
def test_parquet_nulls_and_text_give_the_same_rows_as_csv(tmp_path):
    t = pa.table({
        "label": [1, 0, 1, 0],
        "x1": [0.5, -1.0, 0.0, 3.0],
        "country": ["FR", "DE", "FR", None],
        "device": pa.array(["phone", None, "tablet", " phone "]).dictionary_encode(),
        "x2": pa.array([2, 0, 1.5, -2], pa.float32()),
    })
    pq.write_table(t, tmp_path / "a.parquet")
    index = convert(tmp_path / "a.parquet", tmp_path / "out",
                    categorical_columns=["country", "device"], hash_bits=8)
    assert entries(index) == by_hand(8)
    assert np.load(index.path(index.shards[0], "y")).tolist() == [1, 0, 1, 0]


@pytest.mark.unit
def test_a_rows_values_in_one_bucket_are_summed(tmp_path):
    """With 2 buckets, country=a and device=b that share one make a single entry of 2."""
    levels = [f"v{i}" for i in range(8)]
    country = hashing.category_columns("country", levels, 1)
    device = hashing.category_columns("device", levels, 1)
    a, b = next((i, j) for i in range(8) for j in range(8) if country[i] == device[j])
    (tmp_path / "a.csv").write_text(f"label,country,device\n1,{levels[a]},{levels[b]}\n")
    index = convert(tmp_path / "a.csv", tmp_path / "out", categorical_columns=["country", "device"],
                    hash_bits=1)
    assert entries(index) == [{int(country[a]): 2.0}]


@pytest.mark.unit
def test_default_buckets_and_unlabelled_rows_keep_the_map(tmp_path, caplog):
    """hash_bits null: 2^18 buckets, logged. Rows without labels (as predict converts them) get
    the same columns."""
    (tmp_path / "a.csv").write_text(CSV)
    with caplog.at_level(logging.INFO, logger="largeml.data.convert"):
        index = convert(tmp_path / "a.csv", tmp_path / "out",
                        categorical_columns=["country", "device"])
    assert "2^18 buckets" in caplog.text
    assert index.n_features == 2 + (1 << 18) and entries(index) == by_hand(18)
    (tmp_path / "b.csv").write_text("\n".join(line.split(",", 1)[1] for line in CSV.splitlines()))
    unlabelled = convert(tmp_path / "b.csv", tmp_path / "u", label_column=None,
                         categorical_columns=["country", "device"])
    assert unlabelled.n_features == index.n_features and entries(unlabelled) == by_hand(18)


@pytest.mark.unit
def test_option_errors_name_the_column_or_key(tmp_path):
    (tmp_path / "a.csv").write_text(CSV)
    csv = tmp_path / "a.csv"
    with pytest.raises(DataError, match=r"a\.csv:2: column 'country': value 'FR' is not a "
                                        r"number \(a column of text goes in categorical_columns"):
        convert(csv, tmp_path / "out")
    with pytest.raises(DataError, match=r"a\.csv: categorical column 'city' is not among"):
        convert(csv, tmp_path / "out", categorical_columns=["city"])
    with pytest.raises(ConfigError, match="'country' is in both feature_columns and "
                                          "categorical_columns"):
        convert(csv, tmp_path / "out", feature_columns=["x1", "country"],
                categorical_columns=["country"])
    with pytest.raises(ConfigError, match="layout=dense"):
        convert(csv, tmp_path / "out", categorical_columns=["country"], layout="dense")
    with pytest.raises(ConfigError, match="categorical_columns must be a list"):
        convert(csv, tmp_path / "out", categorical_columns="country")
    (tmp_path / "a.svm").write_text("1 1:0.5\n")
    with pytest.raises(ConfigError, match=r"a\.svm is libsvm"):
        convert(tmp_path / "a.svm", tmp_path / "out", categorical_columns=["country"])
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- end to end

LEVELS = {"country": 30, "device": 8, "site": 40}


def categorical_set(rows: int = 4000, seed: int = 0) -> dict[str, np.ndarray]:
    """Three text columns of tens of levels (3 % of `site` missing), two numeric columns and
    labels drawn from a logistic model over the one-hot levels and the numbers."""
    rng = np.random.default_rng(seed)
    columns: dict[str, np.ndarray] = {}
    logit = 0.3 + 0.8 * (x1 := rng.normal(size=rows)) - 0.5 * (x2 := 2 * rng.normal(size=rows))
    for name, n in LEVELS.items():
        level = rng.integers(0, n, rows)
        logit += rng.normal(size=n)[level]
        columns[name] = np.array([f"{name[0]}{i}" for i in level], dtype=object)
    columns["site"][rng.random(rows) < 0.03] = None
    columns["x1"], columns["x2"] = x1, x2
    columns["label"] = (rng.random(rows) < 1 / (1 + np.exp(-logit))).astype(np.int64)
    return columns


def one_hot(data: dict[str, np.ndarray], levels: dict[str, list[str]]) -> np.ndarray:
    """The numeric columns and one 0/1 column per training level (missing: all zeros)."""
    parts = [data["x1"][:, None], data["x2"][:, None]]
    parts += [(data[name][:, None] == np.array(levels[name])[None, :]).astype(float)
              for name in LEVELS]
    return np.hstack(parts)


def sklearn_accuracy(train: dict[str, np.ndarray], val: dict[str, np.ndarray]) -> float:
    from sklearn.linear_model import LogisticRegression

    levels = {name: sorted({v for v in train[name] if v is not None}) for name in LEVELS}
    model = LogisticRegression(C=1.0, max_iter=5000).fit(one_hot(train, levels), train["label"])
    return float(model.score(one_hot(val, levels), val["label"]))


def write_parquet(data: dict[str, np.ndarray], rows: slice, path: Path) -> dict[str, np.ndarray]:
    part = {name: column[rows] for name, column in data.items()}
    pq.write_table(pa.table({name: pa.array(list(column) if column.dtype == object else column)
                             for name, column in part.items()}), path, row_group_size=1000)
    return part


@pytest.mark.e2e
def test_trains_to_sklearns_one_hot_logistic_regression(tmp_path):
    """Defaults (logreg, C = 1, 2^18 buckets) through `data=files` on Parquet train and
    validation files: within 1 point of scikit-learn's LogisticRegression(C=1) on the one-hot
    encoding of the same split (measured: 0.784 against 0.785)."""
    data = categorical_set()
    train = write_parquet(data, slice(0, 3000), tmp_path / "train.parquet")
    val = write_parquet(data, slice(3000, None), tmp_path / "val.parquet")
    reference = sklearn_accuracy(train, val)
    run_dir = tmp_path / "run"
    result = run_cli(f"hydra.run.dir={run_dir}", "data=files", "data.train_path=train.parquet",
                     "data.val_path=val.parquet", "data.categorical_columns=[country,device,site]",
                     f"data.cache_dir={tmp_path / 'cache'}", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    log = result.stdout + result.stderr
    assert "sparse shards" in log and "2^18 buckets" in log
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert abs(metrics["val/accuracy"] - reference) <= 0.01, (metrics["val/accuracy"], reference)
    # The checkpoint scores a file without labels through the same feature map (columns,
    # buckets): predict needs only the path.
    pq.write_table(pq.read_table(tmp_path / "val.parquet").drop(["label"]),
                   tmp_path / "score.parquet")
    env = {**os.environ, "PYTHONPATH": str(REPO), "LARGEML_CACHE": str(tmp_path / "cache")}
    result = subprocess.run(
        [sys.executable, "-m", "largeml.predict", f"checkpoint={run_dir}/checkpoints/last.pt",
         "input=score.parquet", "output=pred.csv"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    predicted = np.genfromtxt(tmp_path / "pred.csv", delimiter=",", names=True)["label"]
    assert np.mean(predicted == val["label"]) == pytest.approx(metrics["val/accuracy"],
                                                               abs=1e-6)


@pytest.mark.e2e
def test_prepare_a_csv_with_categorical_columns(tmp_path):
    data = categorical_set(rows=500)
    lines = ["label,x1,country,device,site,x2"]
    lines += [f"{data['label'][i]},{float(data['x1'][i])!r},{data['country'][i]},"
              f"{data['device'][i]},{data['site'][i] or ''},{float(data['x2'][i])!r}"
              for i in range(500)]
    (tmp_path / "a.csv").write_text("\n".join(lines) + "\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-m", "largeml.prepare", "input=a.csv", "output=shards",
         "categorical_columns=[country,device,site]", "hash_bits=12"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"prepared 500 rows x {2 + 4096:,} features" in result.stdout
    index = open_shards(tmp_path / "shards")
    missing = sum(v is None for v in data["site"])
    # two numbers (unless 0) and a bucket per present value, unless two share one
    assert index.nnz <= 500 * 5 - missing and index.nnz >= 500 * 4 - missing
