"""Reader for LIBSVM / svmlight text: `label index:value ...`, indices 1-based, `#` comments.

Every malformed token is reported with its file, line number and text.
"""

import gzip
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from largeml.errors import DataError


@dataclass
class SparseRows:
    """Rows in CSR form, as read: 0-based column indices, labels as written in the file."""

    labels: np.ndarray  # float32 (n,)
    indptr: np.ndarray  # int64 (n + 1,)
    indices: np.ndarray  # int32 (nnz,)
    values: np.ndarray  # float32 (nnz,)
    width: int  # highest 1-based index present

    def to_dense(self, n_features: int) -> np.ndarray:
        dense = np.zeros((len(self.labels), n_features), dtype=np.float32)
        rows = np.repeat(np.arange(len(self.labels)), np.diff(self.indptr))
        dense[rows, self.indices] = self.values
        return dense


MAX_INDEX = 2**31 - 1  # indices are stored as int32
FLOAT32_MAX = float(np.finfo(np.float32).max)  # values are stored as float32


def parse_line(
    line: str, where: str, n_features: int | None
) -> tuple[str, float, list[int], list[float]] | None:
    """One line of LIBSVM text as (label token, label, 0-based indices, values); None for a
    blank or comment line. Raises a DataError naming `where` and the token at fault."""
    tokens = line.split("#", 1)[0].split()
    if not tokens:
        return None
    try:
        label = float(tokens[0])
    except ValueError:
        raise DataError(f"{where}: label {tokens[0]!r} is not a number") from None
    if not math.isfinite(label):
        raise DataError(f"{where}: label {tokens[0]!r} is not finite")
    limit = MAX_INDEX if n_features is None else n_features
    indices: list[int] = []
    values: list[float] = []
    for token in tokens[1:]:
        name, _, text = token.partition(":")
        if name == "qid":
            continue
        try:
            index, value = int(name), float(text)
        except ValueError:
            raise DataError(
                f"{where}: cannot read {token!r}: expected index:value, e.g. 7:0.5"
            ) from None
        if index < 1:
            raise DataError(f"{where}: index {index} in {token!r}: indices start at 1")
        if index > limit:
            what = "the largest int32" if n_features is None else f"n_features={n_features}"
            raise DataError(f"{where}: index {index} in {token!r} exceeds {what}")
        if not math.isfinite(value):
            raise DataError(f"{where}: value in {token!r} is not finite")
        if abs(value) > FLOAT32_MAX:
            raise DataError(f"{where}: value in {token!r} is too large for float32")
        indices.append(index - 1)
        values.append(value)
    return tokens[0], label, indices, values


def _open_text(path: Path):
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="ascii", errors="replace")
    return open(path, encoding="ascii", errors="replace")


def read_libsvm(path: str | Path, n_features: int | None = None) -> SparseRows:
    """Reads a whole LIBSVM file. With `n_features`, an index above it is an error."""
    path = Path(path)
    labels: list[float] = []
    indptr: list[int] = [0]
    indices: list[int] = []
    values: list[float] = []
    with _open_text(path) as lines:
        for lineno, line in enumerate(lines, start=1):
            parsed = parse_line(line, f"{path}:{lineno}", n_features)
            if parsed is None:
                continue
            labels.append(parsed[1])
            indices += parsed[2]
            values += parsed[3]
            indptr.append(len(indices))
    if not labels:
        raise DataError(f"{path}: no data rows (the file is empty or only comments)")
    return SparseRows(
        labels=np.asarray(labels, dtype=np.float32),
        indptr=np.asarray(indptr, dtype=np.int64),
        indices=np.asarray(indices, dtype=np.int32),
        values=np.asarray(values, dtype=np.float32),
        width=max(indices, default=-1) + 1,
    )
