"""LIBSVM / svmlight text: `label index:value ...`, indices 1-based, `#` comments, `qid:N`
dropped. The one LIBSVM parser: `convert` streams a file into shards, `read_libsvm` reads one
whole into memory (the `libsvm` and `a9a` sources), both chunk by chunk through the same code.

Each chunk of whole lines is parsed with array operations (`parse_fast`): token boundaries and
colons are found with numpy and every number is read by `common.parse_numbers`. When anything
in a chunk looks wrong, it is parsed again line by line (`parse_slow`, `parse_line`): that slow
path defines what is accepted and raises the error naming the file, line and token.

With `hash_bits=N`, each parsed chunk's feature ids are hashed into 2^N signed columns
(`largeml.data.hashing`), the same whichever path parsed it.
"""

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from largeml.data import hashing
from largeml.data.formats.common import (
    Labels,
    Options,
    Rows,
    fits_float32,
    padded,
    parse_digits,
    parse_or_none,
    piece_bytes,
    stored,
    text_chunks,
    write_rows,
)
from largeml.data.hashing import FLOAT32_MAX
from largeml.data.shards import ShardIndex, ShardWriter, open_shards
from largeml.errors import DataError
from largeml.progress import Progress

MAX_INDEX = 2**31 - 1  # indices are stored as int32
_WHITESPACE = np.zeros(256, dtype=bool)
_WHITESPACE[list(b" \t\n\r\x0b\x0c")] = True
_COMMENT = re.compile(rb"#[^\n]*")


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


def read_libsvm(path: str | Path, n_features: int | None = None) -> SparseRows:
    """Reads a whole LIBSVM file (`.gz` too). With `n_features`, an index above it is an
    error; labels must be integer class ids, as for `convert`."""
    path = Path(path)
    labels, parts = Labels("line"), []
    with open(path, "rb") as raw:
        for lineno, chunk in text_chunks(path, raw, Progress(1, enabled=False)):
            parts.append(parse_fast(chunk, lineno, n_features, labels)
                         or parse_slow(chunk, lineno, path, n_features, labels))
    if not labels.first:
        raise DataError(f"{path}: no data rows (the file is empty or only comments)")
    offsets = np.cumsum([0] + [int(p.indptr[-1]) for p in parts[:-1]])
    indices = np.concatenate([p.indices for p in parts])
    return SparseRows(
        labels=np.concatenate([p.y for p in parts]),
        indptr=np.concatenate([[0]] + [p.indptr[1:] + o
                                       for p, o in zip(parts, offsets, strict=True)]),
        indices=indices,
        values=np.concatenate([p.values for p in parts]),
        width=int(indices.max(initial=-1)) + 1,
    )


def convert(path: Path, output: Path, options: Options, source: dict[str, Any],
            progress: Progress) -> ShardIndex:
    """LIBSVM text (`.gz` decompressed on the fly) into sparse shards, or dense ones with
    `layout=dense` and `n_features`; `hash_bits=N` hashes the feature ids into 2^N columns."""
    layout, n_features, hash_bits = options.layout, options.n_features, options.hash_bits
    shard_bytes = options.shard_bytes
    labels = Labels("line")
    piece = piece_bytes(shard_bytes)
    # Hashed, the ids are read up to the int32 limit and the columns are exactly 2^N.
    limit, width = (n_features, n_features) if hash_bits is None else (None, 1 << hash_bits)
    with ShardWriter(output, layout, width, shard_bytes, source) as writer, \
            open(path, "rb") as raw:
        for lineno, chunk in text_chunks(path, raw, progress):
            rows = (parse_fast(chunk, lineno, limit, labels)
                    or parse_slow(chunk, lineno, path, limit, labels))
            if hash_bits is not None:
                last = lineno + chunk.count(b"\n") - 1
                where = f"{path}: lines {lineno}-{last}"
                rows.indptr, rows.indices, rows.values = hashing.hash_rows(
                    rows.indptr, rows.indices, rows.values, hash_bits, where)
            write_rows(writer, rows, piece)
        if not labels.first:
            raise DataError(f"{path}: no data rows (the file is empty or only comments)")
    return open_shards(output)  # the writer's own close() wrote and renamed it


def parse_fast(chunk: bytes, lineno: int, n_features: int | None,
               labels: Labels) -> Rows | None:
    """Parses a chunk with array operations; None if anything needs a closer look."""
    if b"#" in chunk:
        chunk = _COMMENT.sub(b"", chunk)
    buf = padded(chunk)
    text = buf[:len(chunk)]
    edges = np.flatnonzero(np.diff(~_WHITESPACE[text], prepend=False, append=False))
    starts, ends = edges[0::2], edges[1::2]  # tokens: runs of non-whitespace
    newlines = np.flatnonzero(text == ord("\n"))
    first = np.zeros(len(starts) + 1, dtype=bool)  # a line's first token is its label
    first[0] = True
    first[np.searchsorted(starts, newlines)] = True
    first = first[:-1]
    colons = np.flatnonzero(text == ord(":"))
    if b"qid" in chunk:  # drop `qid:N` features (one in a label's place stays, to be reported)
        qid = (buf[starts[:, None] + np.arange(4)] == np.frombuffer(b"qid:", np.uint8)).all(1)
        dropped = qid & ~first
        owner = np.searchsorted(starts, colons, side="right") - 1
        colons = colons[~dropped[owner]]
        starts, ends, first = starts[~dropped], ends[~dropped], first[~dropped]
    pairs = np.flatnonzero(~first)
    # As many colons as features, the k-th strictly inside the k-th feature: then every feature
    # has exactly one and no label has any.
    if len(colons) != len(pairs):
        return None
    if not ((colons > starts[pairs]) & (colons < ends[pairs] - 1)).all():
        return None
    heads = np.flatnonzero(first)
    raw = parse_or_none(buf, starts[heads], ends[heads])
    values = parse_or_none(buf, colons + 1, ends[pairs])
    index = parse_digits(buf, starts[pairs], colons)
    if raw is None or values is None or index is None or not fits_float32(values):
        return None
    limit = MAX_INDEX if n_features is None else n_features
    if len(index) and (index.min() < 1 or index.max() > limit):
        return None
    if not labels.accept(raw, lineno + np.searchsorted(newlines, starts[heads])):
        return None
    counts = np.diff(np.append(heads, len(starts))) - 1
    return Rows(y=stored(raw), indptr=np.concatenate([[0], np.cumsum(counts)]),
                 indices=(index - 1).astype(np.int32), values=values.astype(np.float32))


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


def parse_slow(chunk: bytes, lineno: int, path: Path, n_features: int | None,
               labels: Labels) -> Rows:
    """Parses a chunk line by line: what is accepted, and the error for what is not."""
    raw: list[float] = []
    indptr, indices, values = [0], [], []
    for number, line in enumerate(chunk.decode("ascii", errors="replace").split("\n"), lineno):
        where = f"{path}:{number}"
        parsed = parse_line(line, where, n_features)
        if parsed is None:
            continue
        token, label, row_indices, row_values = parsed
        labels.check(label, token, where, number)
        raw.append(label)
        indices += row_indices
        values += row_values
        indptr.append(len(indices))
    return Rows(y=stored(np.array(raw)), indptr=np.array(indptr, dtype=np.int64),
                 indices=np.array(indices, dtype=np.int32),
                 values=np.array(values, dtype=np.float32))

