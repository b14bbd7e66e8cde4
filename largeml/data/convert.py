"""Streaming conversion of raw LIBSVM, CSV, `.npy` and Parquet input into the shard format of
`shards.py`: the entry points; each format's converter is in `largeml.data.formats`.

    convert("train.svm.gz", "data/train")        # one pass, bounded memory -> ShardIndex
    cached("train.svm.gz", "~/.cache/largeml")   # converts once, later calls reuse the result

The input is read a chunk at a time (`formats.common.CHUNK_BYTES` of text, a block of `.npy`
rows, a batch of a Parquet row group) and written through `ShardWriter`, so memory stays bounded
whatever the file size, and a conversion that fails or is killed never leaves a dataset that
looks complete (a killed one's partial directory is removed by the next conversion into the
same place).

CSV and Parquet columns: the label (`label_column`), numeric features (`feature_columns`, by
default every numeric column but the label and the categorical ones) and `categorical_columns`,
whose values are hashed with their column's name into 2^`hash_bits` one-hot buckets (default
2^18) placed after the numeric columns, which makes the rows sparse.
"""

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from largeml.data import cache, hashing, shards
from largeml.data.formats import csv, libsvm, npy, parquet
from largeml.data.formats.common import CATEGORICAL_BITS, Options, starts_with
from largeml.data.formats.csv import csv_header  # noqa: F401  (predict reads a CSV's header)
from largeml.data.shards import ShardIndex
from largeml.errors import ConfigError, DataError
from largeml.progress import Progress

log = logging.getLogger(__name__)

FORMATS = ("libsvm", "csv", "npy", "parquet")
CONVERTERS = {"libsvm": libsvm.convert, "csv": csv.convert, "npy": npy.convert,
              "parquet": parquet.convert}
TABLES = ("csv", "parquet")  # the formats with named columns
MiB = 1 << 20
_NPY_MAGIC = b"\x93NUMPY"


def convert(
    input: str | Path,
    output: str | Path,
    format: str = "auto",
    layout: str | None = None,
    n_features: int | None = None,
    labels: str | Path | None = None,
    label_column: str | int | None = "label",
    shard_bytes: int = shards.SHARD_BYTES,
    hash_bits: int | None = None,
    feature_columns: Sequence[str] | None = None,
    categorical_columns: Sequence[str] | None = None,
) -> ShardIndex:
    """Converts `input` into a shard directory at `output` in one streaming pass.

    `format` is `libsvm`, `csv`, `npy`, `parquet` or `auto` (`resolve_format`); `.gz` text is
    decompressed on the fly. LIBSVM is sparse unless `layout="dense"` (which needs
    `n_features`); `hash_bits=N` hashes its feature ids into 2^N columns. `.npy` features come
    with a 1-D `labels` `.npy`. CSV (a header row) and Parquet (a file or a directory of part
    files) hold labels in `label_column`, by name or position (None: no labels, rows to score,
    all given label 0); they are dense unless `categorical_columns` are given, whose values go
    to 2^`hash_bits` one-hot buckets (default 2^18) after the `feature_columns`.
    """
    path = Path(input)
    fmt = resolve_format(path, format)
    features = _names(feature_columns, "feature_columns")
    categorical = _names(categorical_columns, "categorical_columns") or ()
    if (features is not None or categorical) and fmt not in TABLES:
        raise ConfigError(f"feature_columns and categorical_columns name the columns of CSV or "
                          f"Parquet input, but {path} is {fmt}; leave them unset (null)")
    layout = _check_options(fmt, layout, n_features, labels, shard_bytes, bool(categorical))
    check_hash_bits(hash_bits, fmt, layout, n_features, categorical=bool(categorical))
    if categorical and hash_bits is None:
        hash_bits = CATEGORICAL_BITS
        log.info("categorical columns %s: hashed into 2^%d buckets (set hash_bits=N to change)",
                 list(categorical), hash_bits)
    files = _input_files(path, fmt)
    source: dict[str, Any] = {"path": str(path.resolve()), "format": fmt,
                              "bytes": sum(f.stat().st_size for f in files)}
    if labels is not None:
        source["labels"] = str(Path(labels).resolve())
    if hash_bits is not None:
        source["hash_bits"] = hash_bits
    options = Options(layout=layout, n_features=n_features,
                      labels=None if labels is None else Path(labels), label_column=label_column,
                      feature_columns=features, categorical_columns=categorical,
                      hash_bits=hash_bits, shard_bytes=shard_bytes)
    # Progress in MiB (KiB) of the input read, on rank 0 (under torchrun one rank converts and
    # the others wait; only rank 0 talks to the console).
    unit, scale = ("MiB", MiB) if source["bytes"] >= MiB else ("KiB", 1024)
    progress = Progress(source["bytes"] / scale, enabled=os.environ.get("RANK", "0") == "0",
                        unit=unit, label=f"converting {path.name}:")
    progress.start(0.0)
    try:
        return CONVERTERS[fmt](path, Path(output), options, source, progress)
    finally:
        progress.close()


def cached(
    input: str | Path, cache_dir: str | Path, format: str = "auto", **options: Any
) -> ShardIndex:
    """Converts `input` once into `cache_dir/<stem>-<hash>`; later calls open that directly.

    The hash covers the input's identity (path, size, mtime and inode of each of its files),
    the format, the options and the shard format version, so a changed file or option converts
    again (`largeml.data.cache`).
    """
    path = Path(input)
    fmt = resolve_format(path, format)
    key: dict[str, Any] = {"input": cache.identity(_input_files(path, fmt)), "format": fmt,
                           "options": {k: str(v) for k, v in sorted(options.items())}}
    if fmt != "parquet":  # as before Parquet, so existing caches stay valid
        key["input"] = key["input"][0]
    if options.get("labels") is not None:
        key["labels"] = cache.identity([Path(options["labels"])])[0]
    return cache.cached(path, Path(cache_dir), key,
                        lambda out: convert(path, out, fmt, **options))


def resolve_format(path: Path, format: str) -> str:
    """`auto` by content and name: a Parquet file (`PAR1` first, or named `.parquet`) or a
    directory of Parquet part files -> parquet; `.npy` (or its magic bytes) -> npy; `.csv` /
    `.csv.gz` -> csv; anything else -> libsvm."""
    if format == "auto":
        name = path.name.lower().removesuffix(".gz")
        if parquet.is_parquet(path):
            return "parquet"
        if name.endswith(".npy") or starts_with(path, _NPY_MAGIC):
            return "npy"
        return "csv" if name.endswith(".csv") else "libsvm"
    if format not in FORMATS:
        raise ConfigError(f"format must be auto, {', '.join(FORMATS)}; got {format!r}")
    return format


def _input_files(path: Path, fmt: str) -> list[Path]:
    """The files `path` stands for (a Parquet directory: its part files); a DataError if none."""
    if path.is_file():
        return [path]
    if fmt == "parquet" and path.is_dir():
        parts = parquet.part_files(path)
        if parts:
            return parts
        raise DataError(f"input: {path} is a directory with no Parquet part files (*.parquet)")
    raise DataError(f"input: no such file: {path}")


def _names(columns: Sequence[str] | None, key: str) -> tuple[str, ...] | None:
    """Column names as a tuple (a YAML list arrives as a ListConfig); a ConfigError naming
    `key` if they are not a list of distinct names."""
    if columns is None:
        return None
    if isinstance(columns, str) or not all(isinstance(c, str) and c for c in columns):
        raise ConfigError(f"{key} must be a list of column names, e.g. {key}=[a,b]; got "
                          f"{columns!r}")
    names = tuple(columns)
    if len(set(names)) != len(names):
        raise ConfigError(f"{key} names a column twice: {list(names)}")
    return names


def _check_options(fmt: str, layout: str | None, n_features: int | None,
                   labels: str | Path | None, shard_bytes: int, categorical: bool) -> str:
    """Validates the options before any data is read; returns the layout to write."""
    if n_features is not None and (not isinstance(n_features, int) or n_features < 1):
        raise ConfigError(f"n_features must be a positive integer or null, got {n_features!r}")
    if not isinstance(shard_bytes, int) or shard_bytes < 1:
        raise ConfigError(f"shard size must be a positive number of bytes, got {shard_bytes!r}")
    if layout not in (None, *shards.LAYOUTS):
        raise ConfigError(f"layout must be sparse or dense, got {layout!r}")
    if fmt == "libsvm":
        if layout == "dense" and n_features is None:
            raise ConfigError(
                "layout=dense for LIBSVM input needs n_features (the number of columns, i.e. the "
                "highest feature index): set n_features=N, or use layout=sparse"
            )
    elif categorical:
        if layout == "dense":
            raise ConfigError(f"layout=dense: {fmt} input with categorical_columns is sparse "
                              "(one-hot buckets); leave layout unset or sparse")
        layout = "sparse"
    elif layout == "sparse":
        raise ConfigError(f"layout=sparse: {fmt} input is dense; leave layout unset or dense")
    if fmt == "npy" and labels is None:
        raise ConfigError("npy input needs labels=PATH: a 1-D .npy of labels, one per row")
    if fmt != "npy" and labels is not None:
        raise ConfigError(f"labels={labels} is only for npy input; {fmt} files hold their labels")
    return layout or ("sparse" if fmt == "libsvm" else "dense")


def check_hash_bits(hash_bits: int | None, fmt: str, layout: str | None,
                    n_features: int | None, prefix: str = "", categorical: bool = False) -> None:
    """Hashing is for sparse LIBSVM input, into exactly 2^N columns, or for the categorical
    columns of CSV and Parquet; the ConfigError names the key (`prefix` + `hash_bits`, e.g.
    `data.hash_bits`)."""
    key = f"{prefix}hash_bits"
    hashing.check(hash_bits, key)
    if hash_bits is None or categorical:
        return
    if fmt != "libsvm" or layout == "dense":
        what = (f"{fmt} input is dense (no {prefix}categorical_columns)" if fmt != "libsvm"
                else "layout=dense was asked for")
        raise ConfigError(f"{key}={hash_bits} hashes the feature ids of sparse LIBSVM input or "
                          f"the values of categorical columns, but {what}; leave {key} unset "
                          "(null)")
    if n_features is not None and n_features != 1 << hash_bits:
        raise ConfigError(f"{prefix}n_features={n_features}, but {key}={hash_bits} makes "
                          f"{1 << hash_bits:,} columns; leave {prefix}n_features unset (null)")
