"""What the format converters share: the exact vectorised number parser, the label policy, the
parsed rows of one chunk and how they go to the `ShardWriter`, and the one-hot hashing of
categorical columns (CSV and Parquet).

The number parser reads every number of a chunk of text with array operations (`parse_numbers`):
exact (the same float64 as Python's `float`), several times faster than a per-token loop.
"""

import gzip
import itertools
import logging
import math
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from largeml.data import hashing, shards
from largeml.data.shards import ShardWriter
from largeml.errors import ConfigError, DataError
from largeml.labels import is_number
from largeml.progress import Progress

log = logging.getLogger(__name__)

CHUNK_BYTES = 4 << 20  # text read per parse; parse temporaries are a few times this
DENSE_BLOCK_BYTES = 16 << 20  # dense rows handed to the writer at once
CATEGORICAL_BITS = 18  # 2^18 buckets for categorical columns when hash_bits is null
MAX_COLUMNS = 2**31 - 1  # indices are int32
MAX_WIDTH = 32  # longer numbers are left to float()
_POW10_FLOAT = 10.0 ** np.arange(23)  # exact float64s

@dataclass(frozen=True)
class Options:
    """What every converter is given (`largeml.data.convert.convert` has checked it; each format
    reads the options it takes): `formats.<name>.convert(path, output, options, source, progress)`.
    """

    layout: str  # dense | sparse
    n_features: int | None = None
    labels: Path | None = None  # npy: the labels' .npy
    label_column: str | int | None = "label"  # CSV, Parquet: by name or 0-based position
    feature_columns: tuple[str, ...] | None = None  # CSV, Parquet; None: every numeric column
    categorical_columns: tuple[str, ...] = ()  # CSV, Parquet: hashed one-hot columns
    hash_bits: int | None = None  # LIBSVM ids, or the categorical buckets: 2^N columns
    shard_bytes: int = shards.SHARD_BYTES


@dataclass
class Rows:
    """Parsed rows of one chunk: CSR (sparse) or a matrix (dense), labels mapped to {0, 1}."""

    y: np.ndarray
    indptr: np.ndarray | None = None
    indices: np.ndarray | None = None
    values: np.ndarray | None = None
    x: np.ndarray | None = None



def text_chunks(path: Path, raw: BinaryIO, progress: Progress) -> Iterator[tuple[int, bytes]]:
    """Yields (number of the first line, text of whole lines ending in a newline)."""
    stream = gzip.GzipFile(fileobj=raw, mode="rb") if path.suffix == ".gz" else raw
    lineno, rest, started, size = 1, b"", time.perf_counter(), max(path.stat().st_size, 1)
    while True:
        try:
            data = stream.read(CHUNK_BYTES)
        except (OSError, EOFError, zlib.error) as err:
            raise DataError(
                f"{path}: cannot decompress ({err}); is it a complete .gz file?"
            ) from err
        if not data:
            if rest:
                yield lineno, rest + b"\n"
            return
        data = rest + data
        cut = data.rfind(b"\n") + 1
        chunk, rest = data[:cut], data[cut:]
        if chunk:
            yield lineno, chunk  # parsed and written before the next read
            lineno += chunk.count(b"\n")
        progress.update(progress.total * raw.tell() / size,
                        (lineno - 1) / (time.perf_counter() - started))




def padded(chunk: bytes) -> np.ndarray:
    """The chunk as uint8, with zeros after it so fixed-width gathers stay in bounds."""
    return np.frombuffer(chunk + bytes(MAX_WIDTH), dtype=np.uint8)


def parse_numbers(
    buf: np.ndarray, starts: np.ndarray, ends: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Reads the decimal numbers `buf[starts[i]:ends[i]]` all at once.

    Returns `(values, exact)`. `exact` marks plain decimals, `[+-]digits[.digits][e[+-]digits]`,
    whose value is an integer mantissa below 2**53 times a power of ten up to 1e22: one
    correctly rounded float64 operation, so exactly what `float()` returns. The rest (nan,
    17-digit mantissas, 1e300, text that is no number) are for the caller to `float()`.
    """
    lens = ends - starts
    width = int(min(lens.max(initial=1), MAX_WIDTH))
    n = len(starts)
    mantissa = np.zeros(n, dtype=np.int64)
    exponent = np.zeros(n, dtype=np.int16)
    n_mantissa, n_exponent, n_points, n_es, decimals = (np.zeros(n, dtype=np.int8)
                                                        for _ in range(5))
    in_exponent, seen_point, negative_exponent = (np.zeros(n, dtype=bool) for _ in range(3))
    sign_allowed = np.ones(n, dtype=bool)  # first, or right after the e
    bad = lens > width
    for j in range(width):  # one vector step per character place, Horner's rule for the digits
        c, inside = buf[starts + j], lens > j
        digit = c - 48  # uint8: anything but 0-9 wraps to 10 or more
        is_digit = (digit < 10) & inside
        is_e = ((c | 0x20) == ord("e")) & inside
        is_point = (c == ord(".")) & inside
        sign = ((c == ord("+")) | (c == ord("-"))) & sign_allowed & inside
        bad |= (inside & ~(is_digit | is_e | is_point | sign)) | (is_point & in_exponent)
        in_mantissa = is_digit & ~in_exponent
        in_exp = is_digit & in_exponent
        mantissa = np.where(in_mantissa, mantissa * 10 + digit, mantissa)
        exponent = np.where(in_exp, exponent * 10 + digit, exponent)
        n_mantissa += in_mantissa
        n_exponent += in_exp
        decimals += in_mantissa & seen_point
        seen_point |= is_point
        n_points += is_point
        n_es += is_e
        negative_exponent |= sign & in_exponent & (c == ord("-"))
        in_exponent |= is_e
        sign_allowed = is_e
    ok = (~bad & (n_mantissa >= 1) & (n_mantissa <= 18) & (n_points <= 1) & (n_es <= 1)
          & ((n_es == 0) | ((n_exponent >= 1) & (n_exponent <= 4))))
    power = np.where(negative_exponent, -exponent, exponent).astype(np.int64) - decimals
    exact = ok & (mantissa <= 2**53) & (np.abs(power) <= 22)
    scale = _POW10_FLOAT[np.minimum(np.abs(power), 22)]
    values = np.where(power >= 0, mantissa * scale, mantissa / scale)
    return np.where(buf[starts] == ord("-"), -values, values), exact


def parse_digits(buf: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray | None:
    """Reads the unsigned integers `buf[starts[i]:ends[i]]` (at most 18 digits, so int64 holds
    them: ids up to the int32 limit have 10); None if one is anything else."""
    lens = ends - starts
    width = int(lens.max(initial=1))
    if width > 18 or lens.min(initial=1) < 1:
        return None
    values = np.zeros(len(starts), dtype=np.int64)
    for j in range(width):
        digit, inside = buf[starts + j] - 48, lens > j
        if (inside & (digit >= 10)).any():
            return None
        values = np.where(inside, values * 10 + digit, values)
    return values


def parse_or_none(buf: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray | None:
    """`parse_numbers`, with `float()` for the inexact few; None if one is not a number."""
    values, exact = parse_numbers(buf, starts, ends)
    for i in np.flatnonzero(~exact):
        try:
            values[i] = float(buf[starts[i]:ends[i]].tobytes())
        except ValueError:
            return None
    return values


def fits_float32(values: np.ndarray) -> bool:
    with np.errstate(over="ignore", invalid="ignore"):
        return bool(np.isfinite(values.astype(np.float32)).all())


class Labels:
    """Checks one file's raw labels: finite integers (class ids, `largeml.labels`), kept as
    written; remembers where each label was first seen. A CSV whose first label is not a number
    has string labels (`strings`): each is stored as its code, its position in `names`."""

    def __init__(self, unit: str) -> None:
        self.unit = unit  # "line" or "row": how a place in the file is named
        self.first: dict[float, int] = {}  # raw label -> where it was first seen
        self.strings: bool | None = None  # CSV: decided by the first label (`decide`)
        self.names: dict[str, int] = {}  # string labels -> code, numbered as first met

    def decide(self, first: str, where: str) -> None:
        """String labels if the file's first label, `first`, is not a number."""
        self.strings = not is_number(first)
        if self.strings:
            log.info("%s: label %r is not a number: this file's labels are strings", where,
                     first)

    def accept(self, raw: np.ndarray, places: np.ndarray) -> bool:
        """Records a chunk's labels; False (recording nothing) if any is wrong."""
        if not (np.isfinite(raw) & (raw == np.round(raw))).all():
            return False
        for v in np.unique(raw).tolist():
            self.first.setdefault(v, int(places[np.argmax(raw == v)]))
        return True

    def check(self, value: float, token: str, where: str, place: int) -> None:
        """Records one label or raises the DataError that says what is wrong with it."""
        if not math.isfinite(value):
            raise DataError(f"{where}: label {token!r} is not finite")
        if value != round(value):
            raise DataError(f"{where}: label {token!r} is not an integer class id; labels are "
                            "integers (0/1, -1/+1, or 0 ... K-1, 1 ... K)")
        self.first.setdefault(value, place)

    def code(self, name: str, where: str) -> float:
        """The code of one string label."""
        if not name:
            raise DataError(f"{where}: the label is empty")
        return float(self.names.setdefault(name, len(self.names)))

    def codes(self, buf: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray | None:
        """The codes of the string labels `buf[starts[i]:ends[i]]`, all at once; None if one
        needs a closer look (empty, quoted, padded with spaces, or long)."""
        lens = ends - starts
        width = int(lens.max(initial=1))
        if lens.min(initial=1) < 1 or width > MAX_WIDTH:
            return None
        places = np.arange(width)
        chars = np.where(places < lens[:, None], buf[starts[:, None] + places], 0)
        edges = np.concatenate([buf[starts], buf[ends - 1]])
        if (chars == ord('"')).any() or (edges == ord(" ")).any():
            return None
        fixed = np.ascontiguousarray(chars, dtype=np.uint8).view(f"S{width}").ravel()
        found, inverse = np.unique(fixed, return_inverse=True)
        table = np.array([self.code(f.decode("utf-8", errors="replace"), "") for f in found])
        return table[inverse.ravel()]


def stored(raw: np.ndarray) -> np.ndarray:
    """Labels as stored: as written, float32 (class ids are exact in float32 below 2^24)."""
    return raw.astype(np.float32)


def piece_bytes(shard_bytes: int) -> int:
    """Rows go to the writer in pieces this small, so shards end close to `shard_bytes`: the
    writer starts a new shard only once a write has taken it past that size."""
    return max(1, min(DENSE_BLOCK_BYTES, shard_bytes // 8))


def write_rows(writer: ShardWriter, rows: Rows, piece: int) -> None:
    """Hands `rows` (CSR or a matrix) to the writer in pieces of about `piece` bytes, in the
    writer's layout (CSR rows become dense ones for a dense writer)."""
    if writer.layout == "sparse":
        write_sparse(writer, rows, piece)
    else:
        write_dense(writer, rows, writer.n_features, piece)


def write_sparse(writer: ShardWriter, rows: Rows, piece: int) -> None:
    # bytes as the writer counts them: 8 + 4 per row (indptr, label), 8 per non-zero
    size = 12 * np.arange(1, len(rows.y) + 1) + 8 * rows.indptr[1:]
    cuts = np.unique(np.searchsorted(size, np.arange(piece, size[-1] if len(size) else 0, piece),
                                     side="right"))
    for lo, hi in itertools.pairwise([0, *cuts.tolist(), len(rows.y)]):
        if hi > lo:
            a, b = rows.indptr[lo], rows.indptr[hi]
            writer.write_sparse(rows.indptr[lo:hi + 1], rows.indices[a:b], rows.values[a:b],
                                rows.y[lo:hi])


def write_dense(writer: ShardWriter, rows: Rows, n_features: int, piece: int) -> None:
    block = max(1, piece // (4 * n_features + 4))
    for lo in range(0, len(rows.y), block):
        hi = min(lo + block, len(rows.y))
        if rows.x is not None:
            writer.write_dense(rows.x[lo:hi], rows.y[lo:hi])
            continue
        a, b = rows.indptr[lo], rows.indptr[hi]
        x = np.zeros((hi - lo, n_features), dtype=np.float32)
        x[np.repeat(np.arange(hi - lo), np.diff(rows.indptr[lo:hi + 1])), rows.indices[a:b]] = \
            rows.values[a:b]
        writer.write_dense(x, rows.y[lo:hi])


def starts_with(path: Path, magic: bytes) -> bool:
    """Whether the file `path` begins with the bytes `magic` (False if it cannot be read)."""
    try:
        with open(path, "rb") as f:
            return f.read(len(magic)) == magic
    except OSError:
        return False


# ----------------------------------------------------------------------------- categorical columns


@dataclass
class Categories:
    """One chunk's values of one categorical column: row i holds `values[codes[i]]`, or nothing
    where `codes[i]` is −1 (an empty CSV field, a Parquet null)."""

    values: list[str]
    codes: np.ndarray  # int64 (rows,)

    @classmethod
    def of(cls, texts: list[str], inverse: np.ndarray | None = None) -> "Categories":
        """From row i's text `texts[inverse[i]]` (or `texts[i]`), stripped; "" is missing."""
        found: dict[str, int] = {}
        table = np.array([found.setdefault(t.strip(), len(found)) if t.strip() else -1
                          for t in texts], dtype=np.int64)
        codes = table if inverse is None else table[inverse.ravel()]
        return cls(values=list(found), codes=codes.reshape(-1))


def categories_at(buf: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> Categories | None:
    """The texts `buf[starts[i]:ends[i]]` as Categories, all at once; None if one is quoted
    (left to the csv module)."""
    lens = ends - starts
    width = max(1, int(lens.max(initial=1)))
    if width > MAX_WIDTH:  # long texts: one slice each
        texts = [buf[a:b].tobytes() for a, b in zip(starts.tolist(), ends.tolist(), strict=True)]
        if any(b'"' in t for t in texts):
            return None
        return Categories.of([t.decode("utf-8", errors="replace") for t in texts])
    places = np.arange(width)
    chars = np.where(places < lens[:, None], buf[starts[:, None] + places], 0)
    if (chars == ord('"')).any():
        return None
    fixed = np.ascontiguousarray(chars, dtype=np.uint8).view(f"S{width}").ravel()
    found, inverse = np.unique(fixed, return_inverse=True)
    return Categories.of([f.decode("utf-8", errors="replace") for f in found], inverse)


def table_rows(x: np.ndarray, categories: dict[str, Categories], bits: int | None,
               y: np.ndarray, where: str) -> Rows:
    """Rows of numeric columns `x` (float64, rows x columns) and categorical columns: dense
    without categorical columns; else CSR, column j of `x` as column j and value v of column
    `name` as one-hot column `x.shape[1] + category_columns(name, [v], bits)`."""
    if not categories:
        return Rows(y=stored(y), x=x.astype(np.float32))
    assert bits is not None
    n_rows, n_numeric = x.shape
    rows, columns = np.nonzero(x)
    rows, columns, values = [rows], [columns], [x[rows, columns]]
    for name, found in categories.items():
        present = np.flatnonzero(found.codes >= 0)
        buckets = hashing.category_columns(name, found.values, bits) + n_numeric
        rows.append(present)
        columns.append(buckets[found.codes[present]])
        values.append(np.ones(len(present)))
    indptr, indices, summed = hashing.summed_rows(
        np.concatenate(rows), np.concatenate(columns), np.concatenate(values), n_rows, where)
    return Rows(y=stored(y), indptr=indptr, indices=indices, values=summed)


# ----------------------------------------------------------------------------- columns of a table


def label_position(names: list[str], label_column: str | int, path: Path) -> int:
    """Where `label_column` (a name, or a 0-based position) is among the columns `names`."""
    if isinstance(label_column, int) and not isinstance(label_column, bool):
        if not -len(names) <= label_column < len(names):
            raise ConfigError(f"label_column={label_column} is outside the {len(names)} "
                              f"columns of {path}")
        return label_column % len(names)
    if names.count(str(label_column)) != 1:
        found = "twice" if str(label_column) in names else "not"
        raise DataError(f"{path}: label_column {label_column!r} is {found} in the header "
                        f"{names[:20]}; set label_column=NAME or a 0-based position")
    return names.index(str(label_column))


def choose_columns(names: list[str], label_at: int | None, options: Options, path: Path,
                   numeric: list[bool] | None = None) -> tuple[list[int], list[int]]:
    """The positions of the feature columns and of the categorical columns among `names`.

    The features are `options.feature_columns` in that order, or by default every column but
    the label and the categorical ones (with `numeric`, every numeric one of those)."""
    def position(name: str, key: str) -> int:
        if names.count(name) != 1:
            found = "twice" if name in names else "not"
            raise DataError(f"{path}: {key} {name!r} is {found} among the columns "
                            f"{names[:20]}{' ...' if len(names) > 20 else ''}")
        return names.index(name)

    categorical = [position(n, "categorical column") for n in options.categorical_columns]
    if options.feature_columns is None:
        features = [i for i in range(len(names)) if i != label_at and i not in categorical
                    and (numeric is None or numeric[i])]
    else:
        features = [position(n, "feature column") for n in options.feature_columns]
    for i in (*features, *categorical):
        if i == label_at:
            raise ConfigError(f"{path}: column {names[i]!r} is the label_column; it cannot be "
                              "a feature or categorical column too")
    both = set(features) & set(categorical)
    if both:
        raise ConfigError(f"{path}: column {names[min(both)]!r} is in both feature_columns and "
                          "categorical_columns; list it in one")
    if not features and not categorical:
        raise DataError(f"{path}: no feature columns besides the label (columns: "
                        f"{names[:20]}); name them with feature_columns or categorical_columns")
    return features, categorical


def table_width(path: Path, n_numeric: int, options: Options) -> int:
    """The number of columns a table's rows make: the numeric ones, then 2^hash_bits
    categorical buckets. Checked against `options.n_features`."""
    width = n_numeric + ((1 << options.hash_bits) if options.categorical_columns else 0)
    if width > MAX_COLUMNS:
        raise ConfigError(f"{n_numeric} numeric columns + 2^{options.hash_bits} categorical "
                          f"buckets exceed the {MAX_COLUMNS:,} columns an int32 index holds; "
                          "lower hash_bits")
    if options.n_features is not None and options.n_features != width:
        made = f"{n_numeric} feature columns" + (
            f" + 2^{options.hash_bits} categorical buckets" if options.categorical_columns
            else "")
        raise DataError(f"{path}: {made} make {width} columns, but n_features="
                        f"{options.n_features}; leave n_features unset for this input")
    return width
