"""LIBSVM reading and the `libsvm` data source: values, skipped tokens, labels and errors."""

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from largeml.data.formats.libsvm import read_libsvm
from largeml.data.sources import libsvm
from largeml.errors import DataError

pytestmark = pytest.mark.unit


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_dense_values_from_one_based_indices(tmp_path: Path) -> None:
    path = _write(tmp_path / "a.txt", "+1 1:0.5 3:2\n-1 2:-1.5\n+1\n")
    rows = read_libsvm(path)
    assert rows.width == 3
    np.testing.assert_array_equal(rows.labels, [1, -1, 1])
    expected = [[0.5, 0, 2, 0], [0, -1.5, 0, 0], [0, 0, 0, 0]]
    np.testing.assert_array_equal(rows.to_dense(4), np.array(expected, dtype=np.float32))


def test_comments_blank_lines_and_qid_are_skipped(tmp_path: Path) -> None:
    text = "# header comment\n\n1 qid:3 2:4 # trailing comment 9:9\n   \n0 qid:3 1:1\n"
    rows = read_libsvm(_write(tmp_path / "b.txt", text))
    np.testing.assert_array_equal(rows.labels, [1, 0])
    np.testing.assert_array_equal(rows.to_dense(2), [[0, 4], [1, 0]])


def test_reads_gzip(tmp_path: Path) -> None:
    path = tmp_path / "c.txt.gz"
    with gzip.open(path, "wt") as f:
        f.write("1 2:3\n0 1:7\n")
    rows = read_libsvm(path)
    np.testing.assert_array_equal(rows.to_dense(rows.width), [[0, 3], [7, 0]])


@pytest.mark.parametrize("raw", ["-1 +1 +1 -1", "0 1 1 0"])
def test_binary_labels_become_zero_one(tmp_path: Path, raw: str) -> None:
    path = _write(tmp_path / "binary.txt", "".join(f"{label} 1:{i}\n"
                                                   for i, label in enumerate(raw.split(), 1)))
    data = libsvm(str(path), val_fraction=0.0)
    assert data.classes.binary and data.n_features == 1
    y = torch.cat([y for _, y in data.train_eval])
    x = torch.cat([x for x, _ in data.train_eval])[:, 0]
    assert y.dtype == torch.float32
    # Rows are in file order in the evaluation view: labels 0 1 1 0 by feature value 1 2 3 4.
    assert dict(zip(x.tolist(), y.tolist())) == {1.0: 0.0, 2.0: 1.0, 3.0: 1.0, 4.0: 0.0}


def test_labels_one_two_are_two_classes(tmp_path: Path) -> None:
    # {1, 2}: two classes, 1 the first (index 0), 2 the second (index 1).
    path = _write(tmp_path / "labels.txt", "1 1:1\n2 1:2\n2 1:3\n")
    data = libsvm(str(path), val_fraction=0.0)
    assert data.classes.names == ["1", "2"]
    assert torch.cat([y for _, y in data.train_eval]).tolist() == [0.0, 1.0, 1.0]


def test_many_labels_are_many_classes(tmp_path: Path) -> None:
    path = _write(tmp_path / "labels.txt", "3 1:1\n-2 1:2\n7 1:3\n3 1:4\n")
    data = libsvm(str(path), val_fraction=0.0)
    assert data.classes.names == ["-2", "3", "7"] and data.classes.n_outputs == 3
    assert torch.cat([y for _, y in data.train_eval]).tolist() == [1.0, 0.0, 2.0, 1.0]


@pytest.mark.parametrize("labels", ["1 1 1", "1 0.5 0"])
def test_one_class_or_a_fractional_label_is_refused_naming_the_file(tmp_path: Path,
                                                                   labels: str) -> None:
    path = _write(tmp_path / "labels.txt", "".join(f"{label} 1:{i}\n"
                                                   for i, label in enumerate(labels.split(), 1)))
    with pytest.raises(DataError) as err:
        libsvm(str(path), val_fraction=0.0)
    assert str(path) in str(err.value)


def test_validation_label_unknown_to_training_is_refused(tmp_path: Path) -> None:
    train = _write(tmp_path / "train.txt", "1 1:1\n2 1:2\n3 1:3\n")
    val = _write(tmp_path / "val.txt", "1 1:1\n4 1:2\n")
    with pytest.raises(DataError, match="label 4 is not one of the training classes"):
        libsvm(str(train), str(val))


@pytest.mark.parametrize(
    "bad_line, token, n_features",
    [
        ("1 1:1 3", "3", None),  # no colon
        ("1 3:abc", "3:abc", None),  # value not a number
        ("1 0:1", "0:1", None),  # indices are 1-based
        ("1 5:1", "5:1", 4),  # above n_features
        ("1 2:nan", "2:nan", None),  # not finite
        ("yes 1:1", "yes", None),  # label not a number
    ],
)
def test_malformed_token_names_file_line_and_token(
    tmp_path: Path, bad_line: str, token: str, n_features: int | None
) -> None:
    # The bad line is line 4: comments and blank lines still count.
    path = _write(tmp_path / "bad.txt", f"# comment\n1 1:1\n\n{bad_line}\n0 2:1\n")
    with pytest.raises(DataError) as err:
        read_libsvm(path, n_features)
    message = str(err.value)
    assert f"{path}:4:" in message
    assert token in message


def test_empty_file_rejected_naming_file(tmp_path: Path) -> None:
    path = _write(tmp_path / "empty.txt", "# only a comment\n\n")
    with pytest.raises(DataError) as err:
        read_libsvm(path)
    assert str(path) in str(err.value)


def test_val_file_without_last_feature_gets_the_same_width(tmp_path: Path) -> None:
    train = _write(tmp_path / "train.txt", "1 1:1 5:2\n-1 2:1\n1 3:1\n-1 1:3\n")
    val = _write(tmp_path / "val.txt", "1 1:1\n-1 2:4\n")
    data = libsvm(str(train), str(val), batch_size=2)
    assert data.n_features == 5
    assert data.train.x.shape == (4, 5) and data.val.x.shape == (2, 5)
    torch.testing.assert_close(data.val.x[1], torch.tensor([0.0, 4.0, 0.0, 0.0, 0.0]))
    assert sorted(data.train.y.tolist()) == [0.0, 0.0, 1.0, 1.0]
    assert data.val.y.tolist() == [1.0, 0.0]


def test_width_is_highest_index_in_either_file(tmp_path: Path) -> None:
    train = _write(tmp_path / "train.txt", "1 1:1\n0 2:1\n")
    val = _write(tmp_path / "val.txt", "1 7:1\n0 1:1\n")
    data = libsvm(str(train), str(val))
    assert data.n_features == 7
    assert data.train.x.shape == (2, 7) and data.val.x.shape == (2, 7)


def test_missing_train_file_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="data.train_path") as err:
        libsvm(str(tmp_path / "nope.txt"))
    assert "nope.txt" in str(err.value)
