"""Streaming conversion into shards: round trips per format, errors that name file, line and
token, and what a failed or killed conversion leaves behind."""

import contextlib
import gzip
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from largeml.data import shards
from largeml.data.convert import cached, convert
from largeml.data.formats import common
from largeml.data.formats.libsvm import parse_line, read_libsvm
from largeml.data.shards import ShardIndex, open_shards
from largeml.errors import ConfigError, DataError
from largeml.labels import Classes

REPO = Path(__file__).resolve().parent.parent


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def as_classes(index: ShardIndex, y: np.ndarray) -> np.ndarray:
    """Labels as written -> the class indices a stream serves (`largeml.labels`); rows to
    score (one label, 0) as they are."""
    if len(index.label_counts) < 2:
        return y
    return Classes.of_counts(index.label_counts, "test").index(torch.from_numpy(y)).numpy()


def read_back(index: ShardIndex) -> tuple[np.ndarray, np.ndarray]:
    """(dense features, class indices) from the `.npy` files the index lists, read with
    np.load."""
    xs, ys = [], []
    for shard in index.shards:
        y = np.load(index.path(shard, "y"))
        assert y.dtype == np.float32 and len(y) == shard.rows
        ys.append(y)
        if index.layout == "dense":
            xs.append(np.load(index.path(shard, "x")))
            continue
        indptr, indices, values = (np.load(index.path(shard, k))
                                   for k in ("indptr", "indices", "values"))
        assert indptr[0] == 0 and indptr[-1] == len(indices) == len(values) == shard.nnz
        assert indices.dtype == np.int32 and values.dtype == np.float32
        x = np.zeros((shard.rows, index.n_features), dtype=np.float32)
        x[np.repeat(np.arange(shard.rows), np.diff(indptr)), indices] = values
        xs.append(x)
    return np.concatenate(xs), as_classes(index, np.concatenate(ys))


def read_csr(index: ShardIndex) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(indptr, indices, values, labels) of a sparse dataset, shards joined."""
    parts = {k: [np.load(index.path(s, k)) for s in index.shards]
             for k in ("y", "indptr", "indices", "values")}
    offsets = np.cumsum([0] + [p[-1] for p in parts["indptr"][:-1]])
    shifted = [p[1:] + o for p, o in zip(parts["indptr"], offsets, strict=True)]
    indptr = np.concatenate([[0], *shifted])
    return (indptr, np.concatenate(parts["indices"]), np.concatenate(parts["values"]),
            as_classes(index, np.concatenate(parts["y"])))


@pytest.fixture
def small_chunks(monkeypatch):
    """Reads text 64 bytes at a time, so a small file spans many chunks."""
    monkeypatch.setattr(common, "CHUNK_BYTES", 64)


LIBSVM = """# a comment line
+1 1:0.5 3:2 qid:7
-1 2:-1.5

+1
-1 5:1e-3 # 9:9 in a comment
+1 qid:2 4:7 1:-2.25
"""
LIBSVM_X = [[0.5, 0, 2, 0, 0], [0, -1.5, 0, 0, 0], [0, 0, 0, 0, 0], [0, 0, 0, 0, 1e-3],
            [-2.25, 0, 0, 7, 0]]
LIBSVM_Y = [1, 0, 1, 0, 1]


@pytest.mark.unit
@pytest.mark.parametrize("chunked", [False, True], ids=["one-chunk", "many-chunks"])
def test_libsvm_round_trip_sparse(tmp_path, request, chunked):
    if chunked:
        request.getfixturevalue("small_chunks")
    path = _write(tmp_path / "a.svm", LIBSVM)
    index = convert(path, tmp_path / "out", shard_bytes=40)  # a shard every row or two
    assert len(index.shards) > 1
    assert (index.layout, index.rows, index.n_features, index.nnz) == ("sparse", 5, 5, 6)
    assert index.label_counts == {"-1": 2, "1": 3}  # as written
    x, y = read_back(index)
    np.testing.assert_array_equal(x, np.array(LIBSVM_X, dtype=np.float32))
    np.testing.assert_array_equal(y, LIBSVM_Y)
    indptr, indices, _, _ = read_csr(index)
    np.testing.assert_array_equal(indptr, [0, 2, 3, 3, 4, 6])
    np.testing.assert_array_equal(indices, [0, 2, 1, 4, 3, 0])  # file order kept, 0-based
    open_shards(tmp_path / "out", verify=True)


@pytest.mark.unit
def test_libsvm_dense_layout_has_n_features_columns(tmp_path):
    path = _write(tmp_path / "a.svm", LIBSVM)
    index = convert(path, tmp_path / "out", layout="dense", n_features=7, shard_bytes=64)
    assert (index.layout, index.n_features, index.rows) == ("dense", 7, 5)
    x, y = read_back(index)
    expected = np.zeros((5, 7), dtype=np.float32)
    expected[:, :5] = LIBSVM_X
    np.testing.assert_array_equal(x, expected)
    np.testing.assert_array_equal(y, LIBSVM_Y)


@pytest.mark.unit
def test_libsvm_values_are_bit_identical_to_float(tmp_path, monkeypatch):
    """The vectorised number parser against Python's float(), through many chunks, on every
    way a number can be written."""
    monkeypatch.setattr(common, "CHUNK_BYTES", 4096)
    rng = np.random.default_rng(0)
    forms = [
        lambda v: f"{v:.6g}", lambda v: repr(v), lambda v: f"{v:.3e}", lambda v: f"{v:.20f}",
        lambda v: f"{v * 1e25:.17g}", lambda v: f"{v * 1e-30:g}", lambda v: f"{v:+.2f}",
        lambda v: str(int(v * 1000)), lambda v: f"{v:.0f}.", lambda v: f"{abs(v):.4f}"[1:],
        lambda v: f"{v:.5E}", lambda v: "1e+02", lambda v: "-0", lambda v: "0.000000000000001",
        lambda v: f"{v:.18f}", lambda v: "12345678901234567890",
    ]
    lines = []
    for i in range(3000):
        k = int(rng.integers(0, 12))
        index = np.sort(rng.choice(5000, k, replace=False)) + 1
        values = rng.standard_normal(k) * 10.0 ** rng.integers(-3, 4, k)
        pairs = [f"{j}:{forms[int(rng.integers(len(forms)))](float(v))}"
                 for j, v in zip(index, values, strict=True)]
        lines.append(" ".join([("1", "-1", "+1", "-1.0")[i % 4], *pairs]))
        if i % 500 == 7:
            lines.append(f"+1 +{index[0] if k else 3}:2")  # int() takes +3: the slow path
    path = _write(tmp_path / "many.svm", "\n".join(lines) + "\n")
    index = convert(path, tmp_path / "out", shard_bytes=16 << 10)
    parsed = [parse_line(line, "here", None) for line in lines]  # float() on each token
    expected_indices = np.concatenate([p[2] for p in parsed]).astype(np.int32)
    expected_values = np.concatenate([p[3] for p in parsed]).astype(np.float32)
    indptr, indices, values, y = read_csr(index)
    np.testing.assert_array_equal(indptr, np.cumsum([0] + [len(p[2]) for p in parsed]))
    np.testing.assert_array_equal(indices, expected_indices)
    np.testing.assert_array_equal(values.view(np.int32), expected_values.view(np.int32))
    np.testing.assert_array_equal(y, [p[1] > 0 for p in parsed])
    whole = read_libsvm(path)  # the in-memory reader: the same parser
    np.testing.assert_array_equal(whole.values.view(np.int32), expected_values.view(np.int32))
    np.testing.assert_array_equal(whole.indptr, indptr)


NUMBERS = ["0", "-0", "+7", "1.", ".5", "-.5", "1e5", "1E-3", "1.5e+02", "00012", "-1.25e-7",
           "0.1", "0.30000000000000004", "123456789012345", "9007199254740993", "4e22", "3e23",
           "1e-22", "7e-23", "123.456e-10", "0.000000000000000000001", "2.5e0010",
           "12345678901234567890", "nan", "inf", "-Infinity", "1_0", "", ".", "-", "e5", "1e",
           "1e+", "1.2.3", "1e5e3", "+-1", "1-", "1e5.0", "0x10", "1 2", "\x001", "abc"]


@pytest.mark.unit
def test_number_parser_matches_float_exactly():
    """What `parse_numbers` marks exact is float()'s float64, bit for bit; the rest (which
    the caller hands to float()) are never numbers it could have got wrong."""
    rng = np.random.default_rng(2)
    randoms = [f"{v:.{p}g}" for v, p in zip(rng.standard_normal(2000) * 10.0 ** rng.integers(
        -25, 25, 2000), rng.integers(1, 18, 2000), strict=True)]
    texts = NUMBERS + randoms
    data = b" ".join(t.encode() for t in texts)
    ends = np.cumsum([len(t) + 1 for t in texts]) - 1
    starts = ends - [len(t) for t in texts]
    values, exact = common.parse_numbers(common.padded(data), starts, ends)
    for text, value, is_exact in zip(texts, values, exact, strict=True):
        if is_exact:
            assert float(text) == value and np.signbit(float(text)) == np.signbit(value), text
    assert exact[len(NUMBERS):].mean() > 0.6  # most of the usual numbers need no float()
    assert not exact[[NUMBERS.index(t) for t in ("9007199254740993", "3e23", "7e-23",
                                                  "12345678901234567890", "nan", "1_0")]].any()
    assert exact[[NUMBERS.index(t) for t in ("4e22", "1e-22", "123456789012345", "-0")]].all()


@pytest.mark.unit
def test_gzip_text_is_decompressed(tmp_path):
    with gzip.open(tmp_path / "a.svm.gz", "wt") as f:
        f.write(LIBSVM)
    with gzip.open(tmp_path / "b.csv.gz", "wt") as f:
        f.write("x1,label,x2\n1.5,1,2\n-3,0,4e2\n")
    x, y = read_back(convert(tmp_path / "a.svm.gz", tmp_path / "a"))
    np.testing.assert_array_equal(x, np.array(LIBSVM_X, dtype=np.float32))
    np.testing.assert_array_equal(y, LIBSVM_Y)
    index = convert(tmp_path / "b.csv.gz", tmp_path / "b")  # auto: .csv.gz is CSV
    x, y = read_back(index)
    np.testing.assert_array_equal(x, [[1.5, 2], [-3, 400]])
    np.testing.assert_array_equal(y, [1, 0])


@pytest.mark.unit
def test_truncated_gzip_names_the_file(tmp_path):
    data = gzip.compress(LIBSVM.encode() * 50)
    path = tmp_path / "cut.svm.gz"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="cannot decompress") as err:
        convert(path, tmp_path / "out")
    assert str(path) in str(err.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.unit
@pytest.mark.parametrize("chunked", [False, True], ids=["one-chunk", "many-chunks"])
def test_csv_round_trip(tmp_path, request, chunked):
    if chunked:
        request.getfixturevalue("small_chunks")
    text = ("\n\"a\",label,b c\r\n1,-1,2\r\n\r\n 3.5 , 1,-4e-1\r\n-0.25,1,7\r\n"
            "5,-1,\"6\"\r\n")  # blank lines, CRLF, spaces, a quoted cell
    path = _write(tmp_path / "d.csv", text)
    index = convert(path, tmp_path / "out", shard_bytes=24)
    assert (index.layout, index.rows, index.n_features) == ("dense", 4, 2)
    assert index.source["label_column"] == "label"
    x, y = read_back(index)
    np.testing.assert_array_equal(x, np.array([[1, 2], [3.5, -0.4], [-0.25, 7], [5, 6]],
                                              dtype=np.float32))
    np.testing.assert_array_equal(y, [0, 1, 1, 0])


@pytest.mark.unit
def test_csv_label_column_by_position_and_explicit_format(tmp_path):
    path = _write(tmp_path / "d.txt", "y,f1,f2\n0,1,2\n1,3,4\n")
    x, y = read_back(convert(path, tmp_path / "out", format="csv", label_column=0))
    np.testing.assert_array_equal(x, [[1, 2], [3, 4]])
    np.testing.assert_array_equal(y, [0, 1])


@pytest.mark.unit
@pytest.mark.parametrize("chunked", [False, True], ids=["one-chunk", "many-chunks"])
@pytest.mark.parametrize("text, expected", [
    ("a,b,label\n1,2,5\n\n3,4,-7.5\n", [[1, 2, 5], [3, 4, -7.5]]),  # "label" is a feature
    ("only\n1.5\n-2\n", [[1.5], [-2]]),  # one column
], ids=["three-columns", "one-column"])
def test_csv_without_labels(tmp_path, request, chunked, text, expected):
    """label_column=None: every column is a feature (rows to score); each row gets label 0."""
    if chunked:
        request.getfixturevalue("small_chunks")
    index = convert(_write(tmp_path / "d.csv", text), tmp_path / "out", label_column=None)
    assert index.source["label_column"] is None
    x, y = read_back(index)
    np.testing.assert_array_equal(x, np.array(expected, dtype=np.float32))
    np.testing.assert_array_equal(y, np.zeros(len(expected)))


@pytest.mark.unit
def test_csv_without_labels_still_names_a_bad_value(tmp_path):
    path = _write(tmp_path / "d.csv", "a,b\n1,2\n3,x\n")
    with pytest.raises(DataError, match=r"d\.csv:3: column 'b': value 'x' is not a number"):
        convert(path, tmp_path / "out", label_column=None)


@pytest.mark.unit
def test_npy_round_trip_in_row_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "DENSE_BLOCK_BYTES", 200)  # a few rows per read
    rng = np.random.default_rng(1)
    features = rng.standard_normal((101, 6))
    labels = np.where(rng.random(101) < 0.3, -1, 1)
    np.save(tmp_path / "x.npy", features)
    np.save(tmp_path / "y.npy", labels)
    index = convert(tmp_path / "x.npy", tmp_path / "out", labels=tmp_path / "y.npy",
                    shard_bytes=500)
    assert (index.layout, index.rows, index.n_features) == ("dense", 101, 6)
    assert len(index.shards) > 3
    x, y = read_back(index)
    np.testing.assert_array_equal(x, features.astype(np.float32))
    np.testing.assert_array_equal(y, labels > 0)
    assert index.label_counts == {"-1": int((labels < 0).sum()), "1": int((labels > 0).sum())}


@pytest.mark.unit
@pytest.mark.parametrize("written, expected", [
    ({0.0: "0", 1.0: "1"}, [0, 1, 1, 0]),  # stored as class indices: mapped to themselves
    ({0.0: "0", 1.0: "1", 2.0: "2"}, [0, 1, 2, 0]),
    ({-1.0: "-1", 1.0: "1"}, [0, 1, 1, 0]),  # searched
    ({1.0: "1", 2.0: "2"}, [0, 1, 1, 0]),
])
def test_a_label_map_gives_class_indices_with_or_without_a_search(written, expected):
    classes = Classes.of_counts({name: 1 for name in written.values()}, "test")
    keys = sorted(written)
    labels = torch.tensor([keys[i] for i in expected], dtype=torch.float32)
    label_map = classes.label_map(written)
    assert label_map.identity == (keys == list(range(len(keys))))
    out = label_map(labels)
    assert out.dtype == torch.float32
    np.testing.assert_array_equal(out.numpy(), expected)


# ----------------------------------------------------------------------------- errors


@pytest.mark.unit
@pytest.mark.parametrize(
    "bad_line, token, n_features",
    [
        ("1 1:1 3", "'3'", None),  # no colon
        ("1 3:abc", "3:abc", None),  # value not a number
        ("1 x:2", "x:2", None),  # index not a number
        ("1 1.5:2", "1.5:2", None),  # index not an integer
        ("1 0:1", "0:1", None),  # indices are 1-based
        ("1 5:1", "5:1", 4),  # above n_features
        ("1 2:nan", "2:nan", None),
        ("1 2:-inf", "2:-inf", None),
        ("1 2:1e39", "2:1e39", None),  # finite, but not as float32
        ("yes 1:1", "yes", None),  # label not a number
        ("qid:3 1:1", "qid:3", None),  # qid where the label belongs
        ("nan 1:1", "nan", None),
        ("0.5 1:1", "'0.5'", None),  # a label is an integer class id
    ],
)
@pytest.mark.parametrize("chunked", [False, True], ids=["one-chunk", "many-chunks"])
def test_libsvm_error_names_file_line_and_token(tmp_path, request, bad_line, token, n_features,
                                                chunked):
    if chunked:
        request.getfixturevalue("small_chunks")
    good = "".join(f"{i % 2} 1:{i} 2:0.5\n" for i in range(20))
    # The bad line is line 25: comments and blank lines count.
    path = _write(tmp_path / "bad.svm", f"# header\n0 1:1\n\n{good}\n{bad_line}\n1 2:1\n")
    with pytest.raises(DataError) as err:
        convert(path, tmp_path / "out", n_features=n_features)
    message = str(err.value)
    assert f"{path}:25:" in message
    assert token in message
    assert not (tmp_path / "out").exists()


@pytest.mark.unit
@pytest.mark.parametrize("chunked", [False, True], ids=["one-chunk", "many-chunks"])
def test_labels_are_kept_as_written_and_counted(tmp_path, request, chunked):
    # -1, 0 and 1 in one file are three classes (before multiclass they were an error); the
    # classes are only known at the end, so the shards keep the labels as written.
    if chunked:
        request.getfixturevalue("small_chunks")
    lines = ["1 1:1"] * 8 + ["-1 1:2"] + ["1 1:3"] * 8 + ["0 1:4"] + ["7 1:5"]
    path = _write(tmp_path / "mix.svm", "\n".join(lines) + "\n")
    index = convert(path, tmp_path / "out")
    assert index.label_counts == {"-1": 1, "0": 1, "1": 16, "7": 1}
    _, y = read_back(index)
    assert y.tolist() == [2.0] * 8 + [0.0] + [2.0] * 8 + [1.0, 3.0]


@pytest.mark.unit
@pytest.mark.parametrize(
    "text, where, column, token",
    [
        ("a,label\n1,0\n2,1\nabc,0\n", 4, "'a'", "'abc'"),
        ("a,label\n1,0\n2,1\nnan,0\n", 4, "'a'", "'nan'"),
        ("a,label\n1,0\n2,1\n3,2.5\n", 4, "'label'", "'2.5'"),
        ("a,label\n1,0\n2,1\n3,yes\n", 4, "'label'", "'yes'"),
        ("a,label\n1,0\n\n4,,1\n", 4, None, "3 fields"),
    ],
)
def test_csv_error_names_file_line_and_column(tmp_path, text, where, column, token):
    path = _write(tmp_path / "bad.csv", text)
    with pytest.raises(DataError) as err:
        convert(path, tmp_path / "out")
    message = str(err.value)
    assert f"{path}:{where}:" in message
    assert token in message
    if column:
        assert f"column {column}" in message


@pytest.mark.unit
def test_csv_label_column_not_in_header(tmp_path):
    path = _write(tmp_path / "d.csv", "a,b\n1,0\n")
    with pytest.raises(DataError, match="label_column 'target'") as err:
        convert(path, tmp_path / "out", label_column="target")
    assert str(path) in str(err.value) and "['a', 'b']" in str(err.value)


@pytest.mark.unit
@pytest.mark.parametrize(
    "name, text",
    [("only-comments.svm", "# nothing\n\n"), ("empty.svm", ""), ("empty.csv", ""),
     ("header-only.csv", "a,label\n\n")],
)
def test_empty_input_names_the_file(tmp_path, name, text):
    path = _write(tmp_path / name, text)
    with pytest.raises(DataError) as err:
        convert(path, tmp_path / "out")
    assert str(path) in str(err.value)
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.partial-*"))


@pytest.mark.unit
def test_npy_errors_name_the_files(tmp_path):
    np.save(tmp_path / "x.npy", np.ones((5, 2)))
    np.save(tmp_path / "y4.npy", np.ones(4))
    np.save(tmp_path / "y5.npy", np.array([1, 0, 1, 0, 1]))
    np.save(tmp_path / "bad.npy", np.array([1.0, 0, 1, 0, 3.5]))
    with pytest.raises(ConfigError, match="labels="):
        convert(tmp_path / "x.npy", tmp_path / "out")
    with pytest.raises(DataError) as err:
        convert(tmp_path / "x.npy", tmp_path / "out", labels=tmp_path / "y4.npy")
    assert str(tmp_path / "x.npy") in str(err.value) and str(tmp_path / "y4.npy") in str(err.value)
    with pytest.raises(DataError, match="row 4: label '3.5'") as err:
        convert(tmp_path / "x.npy", tmp_path / "out", labels=tmp_path / "bad.npy")
    assert str(tmp_path / "bad.npy") in str(err.value)
    features = np.ones((5, 2))
    features[3, 1] = np.inf
    np.save(tmp_path / "inf.npy", features)
    with pytest.raises(DataError, match="row 3, column 1") as err:
        convert(tmp_path / "inf.npy", tmp_path / "out", labels=tmp_path / "y5.npy")
    assert str(tmp_path / "inf.npy") in str(err.value)
    np.save(tmp_path / "empty.npy", np.ones((0, 2)))
    np.save(tmp_path / "y0.npy", np.ones(0))
    with pytest.raises(DataError, match="no data rows") as err:
        convert(tmp_path / "empty.npy", tmp_path / "out", labels=tmp_path / "y0.npy")
    assert str(tmp_path / "empty.npy") in str(err.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.unit
@pytest.mark.parametrize(
    "options, key",
    [
        ({"layout": "dense"}, "n_features"),
        ({"format": "xlsx"}, "format"),
        ({"layout": "columnar"}, "layout"),
        ({"n_features": 0}, "n_features"),
        ({"labels": "y.npy"}, "labels"),
    ],
)
def test_bad_options_name_the_key(tmp_path, options, key):
    path = _write(tmp_path / "a.svm", LIBSVM)
    with pytest.raises(ConfigError, match=key):
        convert(path, tmp_path / "out", **options)


@pytest.mark.unit
def test_missing_input_names_the_file(tmp_path):
    with pytest.raises(DataError, match="no such file") as err:
        convert(tmp_path / "nope.svm", tmp_path / "out")
    assert "nope.svm" in str(err.value)


# ----------------------------------------------------------------------------- failures


@pytest.mark.unit
def test_failure_after_flushed_shards_leaves_nothing(tmp_path, monkeypatch, small_chunks):
    flushed = []
    flush = shards.ShardWriter._flush

    def counting_flush(self):
        flush(self)
        flushed.append(len(list(self.tmp_dir.glob("y-*.npy"))))

    monkeypatch.setattr(shards.ShardWriter, "_flush", counting_flush)
    good = "".join(f"{i % 2} 1:{i} 7:0.5\n" for i in range(200))
    path = _write(tmp_path / "late.svm", good + "1 7:oops\n")
    with pytest.raises(DataError, match="7:oops"):
        convert(path, tmp_path / "out", shard_bytes=256)
    assert max(flushed) >= 3  # shards were on disk before the bad line was read
    assert sorted(p.name for p in tmp_path.iterdir()) == ["late.svm"]  # no out, no .partial


KILLABLE = """
import sys, time
from largeml.data import shards
from largeml.data.convert import convert
flush = shards.ShardWriter._flush
def slow_flush(self):  # a conversion that takes a while, deterministically
    flush(self)
    time.sleep(0.02)
shards.ShardWriter._flush = slow_flush
convert(sys.argv[1], sys.argv[2], shard_bytes=2048)
"""


@pytest.mark.e2e
def test_killed_conversion_leaves_no_dataset_and_the_next_one_clears_it(tmp_path, caplog):
    good = "".join(f"{i % 2} 1:{i} 3:0.25 9:-1\n" for i in range(20000))
    path = _write(tmp_path / "big.svm", good)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", KILLABLE, str(path), str(out)], env=env,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not list(tmp_path.glob(".out.partial-*/y-00002.npy")):
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "the conversion never wrote a shard"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / shards.INDEX).exists()
    killed = tmp_path / f".out.partial-{shards._HOST}-{proc.pid}"
    assert (killed / "y-00002.npy").is_file()  # the killed process could not clean up
    with pytest.raises(DataError, match="not a prepared dataset"):
        open_shards(out)

    with live_partials(tmp_path, "out") as (live, foreign):
        with caplog.at_level(logging.WARNING, logger="largeml.data.shards"):
            index = convert(path, out)
        assert live.is_dir() and foreign.is_dir()  # owners alive, or not checkable from here
    assert not killed.exists()
    assert f"removed {killed} (" in caplog.text and "MiB" in caplog.text
    assert f"{foreign} is left from an interrupted conversion" in caplog.text
    assert str(live) not in caplog.text
    assert index.rows == 20000
    x, y = read_back(open_shards(out, verify=True))
    assert x[-1].tolist() == [19999, 0, 0.25, 0, 0, 0, 0, 0, -1]
    assert y.sum() == 10000


@contextlib.contextmanager
def live_partials(parent: Path, name: str) -> Iterator[tuple[Path, Path]]:
    """Partial directories of `name` that must survive a cleanup: one of a live process on this
    host (a sleeping child), one of another host, whose process cannot be checked."""
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        live = parent / f".{name}.partial-{shards._HOST}-{sleeper.pid}"
        foreign = parent / f".{name}.partial-other-host-{os.getpid()}"
        for partial in (live, foreign):
            partial.mkdir()
            (partial / "y-00000.npy").write_bytes(b"x" * 100)
        yield live, foreign
    finally:
        sleeper.kill()
        sleeper.wait()


@pytest.mark.e2e
def test_cached_removes_partials_of_dead_conversions_of_any_input(tmp_path, caplog):
    cache = tmp_path / "cache"
    cache.mkdir()
    finished = subprocess.Popen(["true"])
    finished.wait()  # its pid is gone
    dead = [cache / f".{stem}-0123456789abcdef.partial-{shards._HOST}-{finished.pid}"
            for stem in ("a", "older")]
    for partial in dead:
        (partial / "sub").mkdir(parents=True)
        (partial / "sub" / "x-00000.npy").write_bytes(b"x" * (3 << 20))
    path = _write(tmp_path / "a.svm", LIBSVM)
    with live_partials(cache, "b-0123456789abcdef") as (live, foreign):
        with caplog.at_level(logging.INFO, logger="largeml.data.shards"):
            index = cached(path, cache)
        assert live.is_dir() and foreign.is_dir()
    assert not any(p.exists() for p in dead)
    for partial in dead:
        assert f"removed {partial} (3.0 MiB)" in caplog.text
    lock = f".{index.root.name}.lock"
    assert sorted(p.name for p in cache.iterdir()) == sorted([index.root.name, lock, live.name,
                                                              foreign.name])
    np.testing.assert_array_equal(read_back(index)[0], np.array(LIBSVM_X, dtype=np.float32))


@pytest.mark.unit
def test_cached_converts_once(tmp_path, caplog):
    path = tmp_path / "a.svm.gz"
    path.write_bytes(gzip.compress(LIBSVM.encode()))
    cache = tmp_path / "cache"
    with caplog.at_level(logging.INFO, logger="largeml.data.cache"):
        first = cached(path, cache)
        stamp = (first.root / shards.INDEX).stat().st_mtime_ns
        second = cached(path, cache)
    assert first.root == second.root and first.root.parent == cache
    assert first.root.name.startswith("a-") and len(first.root.name) == len("a-") + 16
    assert (second.root / shards.INDEX).stat().st_mtime_ns == stamp
    messages = [r.getMessage() for r in caplog.records]
    assert sum("converted" in m for m in messages) == 1
    assert sum("reusing" in m for m in messages) == 1
    assert str(first.root) in messages[-1]
    np.testing.assert_array_equal(read_back(second)[0], np.array(LIBSVM_X, dtype=np.float32))

    # Other options, or a changed file, are another cache entry.
    assert cached(path, cache, layout="dense", n_features=5).root != first.root
    os.utime(path, ns=(stamp, stamp + 10**9))
    assert cached(path, cache).root != first.root
    assert len([d for d in cache.iterdir() if not d.name.startswith(".")]) == 3


@pytest.mark.e2e
def test_processes_converting_the_same_file_take_turns(tmp_path):
    """The ranks of a distributed run all ask for the same raw file at once: one converts, the
    others wait for it and reuse its cache (no race on the cache directory)."""
    path = _write(tmp_path / "big.svm", "".join(
        f"{i % 2} {i % 7 + 1}:{i} {i % 5 + 8}:0.5\n" for i in range(200_000)))
    code = ("import logging, sys; from largeml.data.convert import cached; "
            "logging.basicConfig(level=logging.INFO, stream=sys.stdout); "
            f"print('root', cached({str(path)!r}, {str(tmp_path / 'cache')!r}).root)")
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(3)]
    outputs = [proc.communicate(timeout=120)[0] for proc in procs]
    assert all(proc.returncode == 0 for proc in procs), outputs
    assert sum("converted" in out for out in outputs) == 1, outputs
    assert sum("reusing" in out for out in outputs) == 2, outputs
    roots = {line for out in outputs for line in out.splitlines() if line.startswith("root")}
    assert len(roots) == 1


@pytest.mark.unit
def test_cached_reconverts_a_damaged_cache(tmp_path, caplog):
    path = _write(tmp_path / "a.svm", LIBSVM)
    index = cached(path, tmp_path / "cache")
    index.path(index.shards[0], "values").unlink()
    with caplog.at_level(logging.WARNING, logger="largeml.data.cache"):
        again = cached(path, tmp_path / "cache")
    assert "damaged" in caplog.text
    assert again.root == index.root
    open_shards(again.root, verify=True)


@pytest.mark.unit
def test_one_corrupt_byte_fails_verify_naming_the_file(tmp_path):
    index = convert(_write(tmp_path / "a.svm", LIBSVM), tmp_path / "out")
    victim = index.path(index.shards[0], "values")
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0x01
    victim.write_bytes(bytes(data))
    open_shards(tmp_path / "out")  # the size is right: only the checksum tells
    with pytest.raises(DataError, match="checksum") as err:
        open_shards(tmp_path / "out", verify=True)
    assert str(victim) in str(err.value)


@pytest.mark.unit
def test_truncated_shard_fails_open_naming_the_file(tmp_path):
    index = convert(_write(tmp_path / "a.svm", LIBSVM), tmp_path / "out")
    victim = index.path(index.shards[0], "indices")
    with open(victim, "r+b") as f:
        f.truncate(victim.stat().st_size - 4)
    with pytest.raises(DataError) as err:
        open_shards(tmp_path / "out")
    assert str(victim) in str(err.value)
