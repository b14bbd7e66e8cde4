"""Parquet into shards, streamed a batch of rows at a time (`ParquetFile.iter_batches`, which
reads one row group at a time), so memory is bounded by a row group, whatever the file's size.

The input is one file, or a directory of part files as Spark, Hive or pandas write them (every
file in it not named `_*` or `.*`, such as `_SUCCESS` or `.part-0.crc`, that ends in `.parquet`
or starts with Parquet's `PAR1`), read in name order as one table. The label is `label_column`
(integers, booleans, or strings stored as codes as for CSV); the features are `feature_columns`
or by default every numeric column (integers, floats, decimals, booleans) but the label and
the `categorical_columns`, which are hashed into one-hot buckets (`common.table_rows`; their
values read as text).

A null in a numeric feature column or in the label is an error naming the file, row and column;
a null in a categorical column makes no feature for that column. pyarrow is an optional
dependency (`pip install largeml[parquet]`), imported only when a Parquet file is read.
"""

import time
from pathlib import Path
from typing import Any

import numpy as np

from largeml.data.formats.common import (
    DENSE_BLOCK_BYTES,
    Categories,
    Labels,
    Options,
    choose_columns,
    fits_float32,
    label_position,
    piece_bytes,
    starts_with,
    table_rows,
    table_width,
    write_rows,
)
from largeml.data.shards import ShardIndex, ShardWriter, open_shards
from largeml.errors import ConfigError, DataError
from largeml.progress import Progress

MAGIC = b"PAR1"


def is_parquet(path: Path) -> bool:
    """A file that starts with Parquet's magic bytes or is named `.parquet`, or a directory of
    such part files (and no shard index)."""
    if path.is_dir():
        return not (path / "index.json").exists() and bool(part_files(path))
    return path.name.lower().endswith(".parquet") or starts_with(path, MAGIC)


def part_files(path: Path) -> list[Path]:
    """The Parquet files `path` stands for: itself, or a directory's part files in name order."""
    if not path.is_dir():
        return [path]
    return sorted(p for p in path.iterdir()
                  if p.is_file() and not p.name.startswith(("_", "."))
                  and (p.name.lower().endswith(".parquet") or starts_with(p, MAGIC)))


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.compute
        import pyarrow.parquet
    except ImportError:
        raise ConfigError("Parquet input needs pyarrow: pip install largeml[parquet] (or "
                          "pip install 'pyarrow>=14')") from None
    return pyarrow


def convert(path: Path, output: Path, options: Options, source: dict[str, Any],
            progress: Progress) -> ShardIndex:
    """`label_column=None`: no label column (rows to score with `largeml.predict`); every row
    gets label 0."""
    pa = _pyarrow()
    parts = part_files(path)
    if not parts:
        raise DataError(f"{path}: a directory with no Parquet part files (*.parquet)")
    schema = _open(pa, parts[0]).schema_arrow  # the first part's columns stand for all
    names = schema.names
    types = [schema.field(i).type for i in range(len(names))]
    label_at = (None if options.label_column is None
                else label_position(names, options.label_column, parts[0]))
    numeric = [_is_numeric(pa, t) for t in types]
    features, categorical = choose_columns(names, label_at, options, parts[0], numeric)
    width = table_width(parts[0], len(features), options)
    wanted = {
        "label": None if label_at is None else names[label_at],
        "features": [names[i] for i in features],
        "categorical": [names[i] for i in categorical],
    }
    source["label_column"] = wanted["label"]
    source["feature_columns"] = wanted["features"]
    if categorical:
        source["categorical_columns"] = wanted["categorical"]
    if len(parts) > 1:
        source["parts"] = len(parts)
    labels = Labels("row")
    total, read = max(1, source["bytes"]), 0  # progress: bytes of the parts done
    done, started = 0, time.perf_counter()
    layout = "sparse" if categorical else "dense"
    piece = piece_bytes(options.shard_bytes)
    with ShardWriter(output, layout, width, options.shard_bytes, source) as writer:
        for part in parts:  # one open at a time: a directory may hold thousands
            file = _open(pa, part)
            size, rows_in_part = part.stat().st_size, max(1, file.metadata.num_rows)
            for first_row, x, y, found in _batches(pa, part, file, wanted, labels):
                rows = table_rows(x, found, options.hash_bits, y,
                                  f"{part}: rows {first_row}-{first_row + len(y) - 1}")
                write_rows(writer, rows, piece)
                done += len(y)
                at = read + size * (first_row + len(y)) / rows_in_part
                progress.update(progress.total * at / total,
                                done / max(time.perf_counter() - started, 1e-9))
            read += size
            file.close()
        if not done:
            raise DataError(f"{path}: no data rows")
        if labels.strings:
            writer.label_names = list(labels.names)
    return open_shards(output)


def _open(pa, part: Path):
    """The part's ParquetFile, without pre-buffering (for object stores: on a local disk it
    only holds several row groups in memory at once, about 3x the memory of one)."""
    try:
        return pa.parquet.ParquetFile(part, pre_buffer=False)
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{part}: not a readable Parquet file ({err}); is it complete?") from None


def _is_numeric(pa, t) -> bool:
    return (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)
            or pa.types.is_decimal(t))


def _batches(pa, part: Path, file, wanted: dict[str, Any], labels: Labels):
    """Yields (first row, float64 features, labels, categories) a batch of rows at a time."""
    schema = file.schema_arrow
    columns = [c for c in (wanted["label"], *wanted["features"], *wanted["categorical"])
               if c is not None]
    for name in columns:
        if schema.get_field_index(name) < 0:
            raise DataError(f"{part}: no column {name!r} (the first part file has it); its "
                            f"columns are {schema.names[:20]}")
    for name in wanted["features"]:
        kind = schema.field(name).type
        if not _is_numeric(pa, kind):
            raise DataError(f"{part}: feature column {name!r} is {kind}, not numeric; list it "
                            "in categorical_columns (text, hashed one-hot), or leave it out of "
                            "feature_columns")
    label_type = None if wanted["label"] is None else schema.field(wanted["label"]).type
    if label_type is not None:
        if labels.strings is None:  # the first part decides, as a CSV's first label does
            labels.strings = not _is_numeric(pa, label_type)
        elif labels.strings == _is_numeric(pa, label_type):
            kind = "text" if labels.strings else "numeric"
            raise DataError(f"{part}: label column {wanted['label']!r} is {label_type}, but "
                            f"in the first part file it is {kind}")
    batch_rows = max(1024, min(1 << 16, DENSE_BLOCK_BYTES // (8 * max(len(columns), 1))))
    first = 0
    try:
        for batch in file.iter_batches(batch_size=batch_rows, columns=columns):
            x = np.zeros((batch.num_rows, len(wanted["features"])))
            for j, name in enumerate(wanted["features"]):
                x[:, j] = _numbers(pa, part, batch.column(name), name, first)
            if not fits_float32(x):
                with np.errstate(over="ignore"):
                    row, column = np.argwhere(~np.isfinite(x.astype(np.float32)))[0]
                raise DataError(f"{part}: row {first + row}, column "
                                f"{wanted['features'][column]!r}: value {x[row, column]:g} is "
                                "not finite as float32")
            found = {name: _categories(pa, batch.column(name)) for name in wanted["categorical"]}
            y = _labels(pa, part, batch, wanted["label"], labels, first)
            yield first, x, y, found
            first += batch.num_rows
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{part}: cannot read past row {first} ({err}); the Parquet file is "
                        "damaged or truncated") from None


def _numbers(pa, part: Path, column, name: str, first: int) -> np.ndarray:
    if column.null_count:
        row = int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])
        raise DataError(f"{part}: row {first + row}, column {name!r}: null in a numeric "
                        "column; fill it (e.g. with 0), or leave the column out with "
                        "feature_columns")
    return column.cast(pa.float64()).to_numpy(zero_copy_only=False)


def _categories(pa, column) -> Categories:
    """A column's values as text, each distinct one once; nulls are missing."""
    if not pa.types.is_dictionary(column.type):
        column = pa.compute.dictionary_encode(column)
    texts = column.dictionary.cast(pa.string()).to_pylist()
    codes = column.indices.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
    found = Categories.of(texts)  # stripped, "" missing, equal texts merged
    table = np.append(found.codes, -1)  # code -1 (null) -> the last entry: missing
    return Categories(values=found.values, codes=table[codes])


def _labels(pa, part: Path, batch, name: str | None, labels: Labels, first: int) -> np.ndarray:
    """A batch's labels as stored: class ids as written, or string labels' codes."""
    if name is None:
        return np.zeros(batch.num_rows)
    column = batch.column(name)
    if column.null_count:
        row = int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])
        raise DataError(f"{part}: row {first + row}, column {name!r}: the label is null")
    if labels.strings:
        found = _categories(pa, column)
        table = np.array([labels.code(v, f"{part}: column {name!r}") for v in found.values])
        if (found.codes < 0).any():
            row = int(np.flatnonzero(found.codes < 0)[0])
            raise DataError(f"{part}: row {first + row}, column {name!r}: the label is empty")
        return table[found.codes] if len(table) else np.zeros(0)
    raw = column.cast(pa.float64()).to_numpy(zero_copy_only=False)
    places = first + np.arange(len(raw))
    if not labels.accept(raw, places):
        for place, value in zip(places.tolist(), raw.tolist(), strict=True):
            labels.check(value, f"{value:g}", f"{part}: row {place}, column {name!r}", place)
    return raw
