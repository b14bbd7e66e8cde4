"""CSV (or `.csv.gz`) into shards: a header row, labels in `label_column` (by name or position,
numbers, or strings from the first row on), numeric feature columns and, with
`categorical_columns`, text columns hashed into one-hot buckets (`common.table_rows`).

Each chunk of whole lines is parsed with array operations (`_fast`): commas and line ends are
found with numpy, numbers read by `common.parse_numbers`. Anything unusual (quotes, a wrong field
count, text in a numeric column) sends the chunk to the csv module line by line (`_slow`), which
defines what is accepted and raises the error naming the file, line and column.

An empty field in a numeric column is an error (fill it, or leave the column out with
`feature_columns`); an empty field in a categorical column makes no feature for that column.
"""

import csv
import gzip
import itertools
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from largeml.data.formats.common import (
    Categories,
    Labels,
    Options,
    categories_at,
    choose_columns,
    fits_float32,
    label_position,
    padded,
    parse_or_none,
    piece_bytes,
    table_rows,
    table_width,
    text_chunks,
    write_rows,
)
from largeml.data.shards import ShardIndex, ShardWriter, open_shards
from largeml.errors import DataError
from largeml.progress import Progress

Parsed = tuple[np.ndarray, np.ndarray, dict[str, Categories]]  # features, labels, categories


def convert(path: Path, output: Path, options: Options, source: dict[str, Any],
            progress: Progress) -> ShardIndex:
    """`label_column=None`: no label column (rows to score with `largeml.predict`); every row
    gets label 0."""
    with open(path, "rb") as raw:
        chunks = text_chunks(path, raw, progress)
        for lineno, chunk in chunks:
            header, lineno, chunk = _read_header(chunk, lineno)
            if header is not None:
                break
        else:
            raise DataError(f"{path}: no header row (the file is empty)")
        label_at = (None if options.label_column is None
                    else label_position(header, options.label_column, path))
        features, categorical = choose_columns(header, label_at, options, path)
        width = table_width(path, len(features), options)
        source["label_column"] = None if label_at is None else header[label_at]
        source["feature_columns"] = [header[i] for i in features]
        if categorical:
            source["categorical_columns"] = [header[i] for i in categorical]
        layout = "sparse" if categorical else "dense"
        labels, rows_read = Labels("line"), 0
        piece = piece_bytes(options.shard_bytes)
        with ShardWriter(output, layout, width, options.shard_bytes, source) as writer:
            for first_line, text in itertools.chain([(lineno, chunk)], chunks):
                if not text:
                    continue
                if label_at is not None and labels.strings is None:
                    first = _first_label(text, first_line, label_at)
                    if first is not None:
                        labels.decide(first[1], f"{path}:{first[0]}")
                x, y, found = (
                    _fast(text, first_line, header, label_at, features, categorical, labels)
                    or _slow(text, first_line, path, header, label_at, features, categorical,
                             labels))
                last = first_line + text.count(b"\n") - 1
                rows = table_rows(x, found, options.hash_bits, y,
                                  f"{path}: lines {first_line}-{last}")
                write_rows(writer, rows, piece)
                rows_read += len(x)
            if not rows_read:
                raise DataError(f"{path}: no data rows after the header")
            if labels.strings:
                writer.label_names = list(labels.names)
    return open_shards(output)


def _first_label(text: bytes, lineno: int, label_at: int) -> tuple[int, str] | None:
    """The line number and label of the chunk's first data line (None if it has none)."""
    for number, line in enumerate(text.split(b"\n"), lineno):
        if line.strip():
            fields = next(csv.reader([line.decode("utf-8", errors="replace")]))
            return number, (fields[label_at].strip() if label_at < len(fields) else "")
    return None


def csv_header(path: Path) -> list[str]:
    """The column names in the first non-blank line of a CSV (or .csv.gz) file."""
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as lines:
            for line in lines:
                if line.strip():
                    return _read_header(line, 0)[0] or []
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"{path}: cannot read ({err})") from err
    return []


def _read_header(chunk: bytes, lineno: int) -> tuple[list[str] | None, int, bytes]:
    """The first non-blank line's column names, and the line number and text after it."""
    while chunk:
        line, _, chunk = chunk.partition(b"\n")
        lineno += 1
        if line.strip():
            names = next(csv.reader([line.decode("utf-8-sig", errors="replace")]))
            return [name.strip() for name in names], lineno, chunk
    return None, lineno, chunk


def _fast(chunk: bytes, lineno: int, header: list[str], label_at: int | None,
          features: list[int], categorical: list[int], labels: Labels) -> Parsed | None:
    """Parses a chunk of CSV rows into float64 features, labels (codes, for string labels)
    and categories; None if anything needs a closer look."""
    n_columns = len(header)
    if n_columns < 2:  # one column, no commas: left to the slow path
        return None
    if b"\r" in chunk:
        chunk = chunk.replace(b"\r\n", b"\n")
    buf = padded(chunk)
    text = buf[:len(chunk)]
    newlines = np.flatnonzero(text == ord("\n"))
    line_starts = np.concatenate([[0], newlines[:-1] + 1])
    is_comma = text == ord(",")
    per_line = np.add.reduceat(is_comma, line_starts, dtype=np.int64)
    filled = newlines > line_starts  # blank lines are skipped
    if (per_line[filled] != n_columns - 1).any():
        return None
    commas = np.flatnonzero(is_comma).reshape(-1, n_columns - 1)  # row by row
    starts = np.column_stack([line_starts[filled], commas + 1])
    ends = np.column_stack([commas, newlines[filled]])
    x = parse_or_none(buf, starts[:, features].ravel(), ends[:, features].ravel())
    if x is None:
        return None
    x = x.reshape(len(starts), len(features))
    if not fits_float32(x):
        return None
    found = {}
    for column in categorical:
        found[header[column]] = categories_at(buf, starts[:, column], ends[:, column])
        if found[header[column]] is None:
            return None
    if label_at is None:
        return x, np.zeros(len(x)), found
    if labels.strings:
        y = labels.codes(buf, starts[:, label_at], ends[:, label_at])
    else:
        y = parse_or_none(buf, starts[:, label_at], ends[:, label_at])
        if y is not None and not labels.accept(y, lineno + np.flatnonzero(filled)):
            return None
    return None if y is None else (x, y, found)


def _slow(chunk: bytes, lineno: int, path: Path, header: list[str], label_at: int | None,
          features: list[int], categorical: list[int], labels: Labels) -> Parsed:
    """Parses a chunk of CSV line by line: what is accepted, and the error for what is not."""
    rows, y = [], []
    texts: dict[int, list[str]] = {column: [] for column in categorical}
    wanted = set(features)
    text = chunk.decode("utf-8", errors="replace").split("\n")
    for number, fields in enumerate(csv.reader(text), lineno):
        if not any(field.strip() for field in fields):
            continue
        where = f"{path}:{number}"
        if len(fields) != len(header):
            raise DataError(f"{where}: {len(fields)} fields, but the header has {len(header)}")
        values = {}
        for column, (name, field) in enumerate(zip(header, fields, strict=True)):
            if column in texts:
                texts[column].append(field)
                continue
            if column == label_at and labels.strings:
                y.append(labels.code(field.strip(), f"{where}: column {name!r}"))
                continue
            if column != label_at and column not in wanted:
                continue
            try:
                value = float(field)
            except ValueError:
                if column == label_at:
                    raise DataError(
                        f"{where}: column {name!r}: label {field!r} is not a number, but this "
                        "file's first label was: a CSV's labels are all numbers, or strings "
                        "from the first row on") from None
                raise DataError(
                    f"{where}: column {name!r}: value {field!r} is not a number (a column of "
                    "text goes in categorical_columns; an empty field in a numeric column is "
                    "an error: fill it, or leave the column out with feature_columns)"
                ) from None
            if column == label_at:
                labels.check(value, field, f"{where}: column {name!r}", number)
                y.append(value)
            elif not fits_float32(np.array([value])):
                raise DataError(f"{where}: column {name!r}: value {field!r} is not finite "
                                "as float32")
            else:
                values[column] = value
        rows.append([values[column] for column in features])
    x = np.array(rows, dtype=np.float64).reshape(-1, len(features))
    found = {header[column]: Categories.of(texts[column]) for column in categorical}
    return x, (np.zeros(len(x)) if label_at is None else np.array(y, dtype=np.float64)), found
