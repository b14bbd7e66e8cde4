"""Streaming conversion of raw LIBSVM, CSV and `.npy` files into the shard format of `shards.py`.

    convert("train.svm.gz", "data/train")        # one pass, bounded memory -> ShardIndex
    cached("train.svm.gz", "~/.cache/largeml")   # converts once, later calls reuse the result

The input is read in chunks of whole lines (`CHUNK_BYTES` of text, or about as many bytes of rows
for `.npy`) and written through `ShardWriter`, so memory stays bounded whatever the file size,
and a conversion that fails or is killed never leaves a dataset that looks complete (a killed
one's partial directory is removed by the next conversion into the same place).

Text is parsed with numpy on a whole chunk at once: token boundaries, colons and commas are
found with array operations and every number is read by `_parse_numbers`, which is exact (the
same float64 as Python's `float`) and several times faster than a per-token loop. When anything
in a chunk looks wrong, the chunk is parsed again line by line in plain Python; that slow path
defines what is accepted and raises the error naming the file, line and token.

With `hash_bits=N` (sparse LIBSVM only), each parsed chunk's feature ids are hashed into 2^N
signed columns (`largeml.data.hashing`), the same whichever path parsed it.
"""

import csv
import fcntl
import gzip
import hashlib
import itertools
import json
import logging
import math
import os
import re
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from largeml.data import hashing, shards
from largeml.data.libsvm import MAX_INDEX, parse_line
from largeml.data.shards import ShardIndex, ShardWriter, open_shards
from largeml.errors import ConfigError, DataError
from largeml.labels import is_number
from largeml.progress import Progress

log = logging.getLogger(__name__)

FORMATS = ("libsvm", "csv", "npy")
MiB = 1 << 20
CHUNK_BYTES = 4 << 20  # text read per parse; parse temporaries are a few times this
DENSE_BLOCK_BYTES = 16 << 20  # dense rows handed to the writer at once

_WHITESPACE = np.zeros(256, dtype=bool)
_WHITESPACE[list(b" \t\n\r\x0b\x0c")] = True
_COMMENT = re.compile(rb"#[^\n]*")
_MAX_WIDTH = 32  # longer numbers are left to float()
_POW10_FLOAT = 10.0 ** np.arange(23)  # exact float64s


@dataclass
class _Rows:
    """Parsed rows of one chunk: CSR (sparse) or a matrix (dense), labels mapped to {0, 1}."""

    y: np.ndarray
    indptr: np.ndarray | None = None
    indices: np.ndarray | None = None
    values: np.ndarray | None = None
    x: np.ndarray | None = None


# ----------------------------------------------------------------------------- entry points


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
) -> ShardIndex:
    """Converts `input` into a shard directory at `output` in one streaming pass.

    `format` is `libsvm`, `csv`, `npy` or `auto` (by extension: `.npy`, `.csv`/`.csv.gz`, else
    libsvm); `.gz` text is decompressed on the fly. LIBSVM is sparse unless `layout="dense"`
    (which needs `n_features`); CSV (a header row, labels in `label_column`, by name or
    position, or no labels with `label_column=None`: rows to score, all given label 0) and `.npy`
    (features, with a 1-D `labels` `.npy`) are dense. `hash_bits=N` (sparse LIBSVM) hashes the
    feature ids into 2^N columns (`largeml.data.hashing`).
    """
    path = Path(input)
    fmt = resolve_format(path, format)
    layout = _check_options(fmt, layout, n_features, labels, shard_bytes)
    check_hash_bits(hash_bits, fmt, layout, n_features)
    if not path.is_file():
        raise DataError(f"input: no such file: {path}")
    source = {"path": str(path.resolve()), "format": fmt, "bytes": path.stat().st_size}
    if labels is not None:
        source["labels"] = str(Path(labels).resolve())
    if hash_bits is not None:
        source["hash_bits"] = hash_bits
    # Progress in MiB (KiB) of the input read, on rank 0 (under torchrun one rank converts and
    # the others wait; only rank 0 talks to the console).
    unit, scale = ("MiB", MiB) if path.stat().st_size >= MiB else ("KiB", 1024)
    progress = Progress(path.stat().st_size / scale, enabled=os.environ.get("RANK", "0") == "0",
                        unit=unit, label=f"converting {path.name}:")
    progress.start(0.0)
    try:
        if fmt == "npy":
            return _convert_npy(path, Path(labels), output, n_features, shard_bytes, source,
                                progress)
        with open(path, "rb") as raw:
            chunks = _text_chunks(path, raw, progress)
            if fmt == "csv":
                return _convert_csv(path, chunks, output, n_features, label_column, shard_bytes,
                                    source)
            return _convert_libsvm(path, chunks, output, layout, n_features, shard_bytes, source,
                                   hash_bits)
    finally:
        progress.close()


def cached(
    input: str | Path, cache_dir: str | Path, format: str = "auto", **options: Any
) -> ShardIndex:
    """Converts `input` once into `cache_dir/<stem>-<hash>`; later calls open that directly.

    The hash covers the file's absolute path, size, mtime and inode, the format, the options
    and the shard format version, so a changed file or option converts again. Partial
    directories that killed conversions left in `cache_dir` are removed on the way.
    """
    path = Path(input)
    fmt = resolve_format(path, format)
    if not path.is_file():
        raise DataError(f"input: no such file: {path}")
    key: dict[str, Any] = {"input": _identity(path), "format": fmt, "version": shards.VERSION,
                           "options": {k: str(v) for k, v in sorted(options.items())}}
    if options.get("labels") is not None:
        key["labels"] = _identity(Path(options["labels"]))
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    stem = path.name.removesuffix(".gz").rsplit(".", 1)[0] or path.name
    out = Path(cache_dir) / f"{stem}-{digest}"
    out.parent.mkdir(parents=True, exist_ok=True)
    # Processes that want the same file (the ranks of a distributed run) take turns: the first
    # converts, the others wait on the lock and then find the cache complete.
    with open(out.with_name(f".{out.name}.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        shards.remove_stale_partials(cache_dir)  # killed conversions of this or any other input
        if (out / shards.INDEX).is_file():
            try:
                index = open_shards(out)
            except DataError as err:
                log.warning("cache %s is damaged (%s); converting again", out, err)
            else:
                log.info("reusing cached %s for %s", out, path)
                return index
        start = time.perf_counter()
        index = convert(path, out, fmt, **options)
    log.info("converted %s into cache %s in %.1f s", path, out, time.perf_counter() - start)
    return index


def resolve_format(path: Path, format: str) -> str:
    """`auto` by extension: `.npy` -> npy, `.csv` / `.csv.gz` -> csv, anything else -> libsvm."""
    if format == "auto":
        name = path.name.lower().removesuffix(".gz")
        return "npy" if name.endswith(".npy") else "csv" if name.endswith(".csv") else "libsvm"
    if format not in FORMATS:
        raise ConfigError(f"format must be auto, libsvm, csv or npy; got {format!r}")
    return format


def _check_options(fmt: str, layout: str | None, n_features: int | None,
                   labels: str | Path | None, shard_bytes: int) -> str:
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
    elif layout == "sparse":
        raise ConfigError(f"layout=sparse: {fmt} input is dense; leave layout unset or dense")
    if fmt == "npy" and labels is None:
        raise ConfigError("npy input needs labels=PATH: a 1-D .npy of labels, one per row")
    if fmt != "npy" and labels is not None:
        raise ConfigError(f"labels={labels} is only for npy input; {fmt} files hold their labels")
    return layout or ("sparse" if fmt == "libsvm" else "dense")


def check_hash_bits(hash_bits: int | None, fmt: str, layout: str | None,
                    n_features: int | None, prefix: str = "") -> None:
    """Hashing is for sparse LIBSVM input, into exactly 2^N columns; the ConfigError names the
    key (`prefix` + `hash_bits`, e.g. `data.hash_bits`)."""
    key = f"{prefix}hash_bits"
    hashing.check(hash_bits, key)
    if hash_bits is None:
        return
    if fmt != "libsvm" or layout == "dense":
        what = f"{fmt} input is dense" if fmt != "libsvm" else "layout=dense was asked for"
        raise ConfigError(f"{key}={hash_bits} hashes the feature ids of sparse LIBSVM input, but "
                          f"{what}; leave {key} unset (null)")
    if n_features is not None and n_features != 1 << hash_bits:
        raise ConfigError(f"{prefix}n_features={n_features}, but {key}={hash_bits} makes "
                          f"{1 << hash_bits:,} columns; leave {prefix}n_features unset (null)")


def _identity(path: Path) -> list[Any]:
    stat = path.stat()
    return [str(path.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ino]


# ----------------------------------------------------------------------------- text input


def _text_chunks(path: Path, raw: BinaryIO, progress: Progress) -> Iterator[tuple[int, bytes]]:
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


def _padded(chunk: bytes) -> np.ndarray:
    """The chunk as uint8, with zeros after it so fixed-width gathers stay in bounds."""
    return np.frombuffer(chunk + bytes(_MAX_WIDTH), dtype=np.uint8)


def _parse_numbers(
    buf: np.ndarray, starts: np.ndarray, ends: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Reads the decimal numbers `buf[starts[i]:ends[i]]` all at once.

    Returns `(values, exact)`. `exact` marks plain decimals, `[+-]digits[.digits][e[+-]digits]`,
    whose value is an integer mantissa below 2**53 times a power of ten up to 1e22: one
    correctly rounded float64 operation, so exactly what `float()` returns. The rest (nan,
    17-digit mantissas, 1e300, text that is no number) are for the caller to `float()`.
    """
    lens = ends - starts
    width = int(min(lens.max(initial=1), _MAX_WIDTH))
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


def _parse_digits(buf: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray | None:
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


def _parse_or_none(buf: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray | None:
    """`_parse_numbers`, with `float()` for the inexact few; None if one is not a number."""
    values, exact = _parse_numbers(buf, starts, ends)
    for i in np.flatnonzero(~exact):
        try:
            values[i] = float(buf[starts[i]:ends[i]].tobytes())
        except ValueError:
            return None
    return values


def _fits_float32(values: np.ndarray) -> bool:
    with np.errstate(over="ignore", invalid="ignore"):
        return bool(np.isfinite(values.astype(np.float32)).all())


class _Labels:
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
        if lens.min(initial=1) < 1 or width > _MAX_WIDTH:
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


def _stored(raw: np.ndarray) -> np.ndarray:
    """Labels as stored: as written, float32 (class ids are exact in float32 below 2^24)."""
    return raw.astype(np.float32)


# ----------------------------------------------------------------------------- LIBSVM


def _convert_libsvm(path: Path, chunks: Iterator[tuple[int, bytes]], output: str | Path,
                    layout: str, n_features: int | None, shard_bytes: int,
                    source: dict[str, Any], hash_bits: int | None = None) -> ShardIndex:
    labels = _Labels("line")
    piece = _piece_bytes(shard_bytes)
    # Hashed, the ids are read up to the int32 limit and the columns are exactly 2^N.
    limit, width = (n_features, n_features) if hash_bits is None else (None, 1 << hash_bits)
    with ShardWriter(output, layout, width, shard_bytes, source) as writer:
        for lineno, chunk in chunks:
            rows = (_libsvm_fast(chunk, lineno, limit, labels)
                    or _libsvm_slow(chunk, lineno, path, limit, labels))
            if hash_bits is not None:
                last = lineno + chunk.count(b"\n") - 1
                where = f"{path}: lines {lineno}-{last}"
                rows.indptr, rows.indices, rows.values = hashing.hash_rows(
                    rows.indptr, rows.indices, rows.values, hash_bits, where)
            if layout == "sparse":
                _write_sparse(writer, rows, piece)
            else:
                _write_dense(writer, rows, n_features, piece)
        if not labels.first:
            raise DataError(f"{path}: no data rows (the file is empty or only comments)")
    return open_shards(output)  # the writer's own close() wrote and renamed it


def _piece_bytes(shard_bytes: int) -> int:
    """Rows go to the writer in pieces this small, so shards end close to `shard_bytes`: the
    writer starts a new shard only once a write has taken it past that size."""
    return max(1, min(DENSE_BLOCK_BYTES, shard_bytes // 8))


def _write_sparse(writer: ShardWriter, rows: _Rows, piece: int) -> None:
    # bytes as the writer counts them: 8 + 4 per row (indptr, label), 8 per non-zero
    size = 12 * np.arange(1, len(rows.y) + 1) + 8 * rows.indptr[1:]
    cuts = np.unique(np.searchsorted(size, np.arange(piece, size[-1] if len(size) else 0, piece),
                                     side="right"))
    for lo, hi in itertools.pairwise([0, *cuts.tolist(), len(rows.y)]):
        if hi > lo:
            a, b = rows.indptr[lo], rows.indptr[hi]
            writer.write_sparse(rows.indptr[lo:hi + 1], rows.indices[a:b], rows.values[a:b],
                                rows.y[lo:hi])


def _write_dense(writer: ShardWriter, rows: _Rows, n_features: int, piece: int) -> None:
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


def _libsvm_fast(chunk: bytes, lineno: int, n_features: int | None,
                 labels: _Labels) -> _Rows | None:
    """Parses a chunk with array operations; None if anything needs a closer look."""
    if b"#" in chunk:
        chunk = _COMMENT.sub(b"", chunk)
    buf = _padded(chunk)
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
    raw = _parse_or_none(buf, starts[heads], ends[heads])
    values = _parse_or_none(buf, colons + 1, ends[pairs])
    index = _parse_digits(buf, starts[pairs], colons)
    if raw is None or values is None or index is None or not _fits_float32(values):
        return None
    limit = MAX_INDEX if n_features is None else n_features
    if len(index) and (index.min() < 1 or index.max() > limit):
        return None
    if not labels.accept(raw, lineno + np.searchsorted(newlines, starts[heads])):
        return None
    counts = np.diff(np.append(heads, len(starts))) - 1
    return _Rows(y=_stored(raw), indptr=np.concatenate([[0], np.cumsum(counts)]),
                 indices=(index - 1).astype(np.int32), values=values.astype(np.float32))


def _libsvm_slow(chunk: bytes, lineno: int, path: Path, n_features: int | None,
                 labels: _Labels) -> _Rows:
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
    return _Rows(y=_stored(np.array(raw)), indptr=np.array(indptr, dtype=np.int64),
                 indices=np.array(indices, dtype=np.int32),
                 values=np.array(values, dtype=np.float32))


# ----------------------------------------------------------------------------- CSV


def _convert_csv(path: Path, chunks: Iterator[tuple[int, bytes]], output: str | Path,
                 n_features: int | None, label_column: str | int | None, shard_bytes: int,
                 source: dict[str, Any]) -> ShardIndex:
    """`label_column=None`: no label column (rows to score with `largeml.predict`); every row
    gets label 0."""
    for lineno, chunk in chunks:
        header, lineno, chunk = _read_header(chunk, lineno)
        if header is not None:
            break
    else:
        raise DataError(f"{path}: no header row (the file is empty)")
    label_at = None if label_column is None else _label_position(header, label_column, path)
    features = [i for i in range(len(header)) if i != label_at]
    if not features:
        raise DataError(f"{path}: the header has no feature columns besides the label")
    if n_features is not None and n_features != len(features):
        raise DataError(f"{path}: {len(features)} feature columns, but n_features={n_features}; "
                        "leave n_features unset for CSV")
    source["label_column"] = None if label_at is None else header[label_at]
    labels, rows_read = _Labels("line"), 0
    piece = _piece_bytes(shard_bytes)
    with ShardWriter(output, "dense", len(features), shard_bytes, source) as writer:
        for first_line, text in itertools.chain([(lineno, chunk)], chunks):
            if not text:
                continue
            if label_at is not None and labels.strings is None:
                first = _first_label(text, first_line, label_at)
                if first is not None:
                    labels.decide(first[1], f"{path}:{first[0]}")
            parsed = _csv_fast(text, first_line, len(header), label_at, labels)
            if parsed is None:
                parsed = _csv_slow(text, first_line, path, header, label_at, labels)
            x, y = parsed
            rows = _Rows(y=_stored(y), x=x.astype(np.float32))
            _write_dense(writer, rows, len(features), piece)
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


def _label_position(header: list[str], label_column: str | int, path: Path) -> int:
    if isinstance(label_column, int) and not isinstance(label_column, bool):
        if not -len(header) <= label_column < len(header):
            raise ConfigError(f"label_column={label_column} is outside the {len(header)} "
                              f"columns of {path}")
        return label_column % len(header)
    if header.count(str(label_column)) != 1:
        found = "twice" if str(label_column) in header else "not"
        raise DataError(f"{path}: label_column {label_column!r} is {found} in the header "
                        f"{header[:20]}; set label_column=NAME or a 0-based position")
    return header.index(str(label_column))


def _csv_fast(chunk: bytes, lineno: int, n_columns: int, label_at: int | None,
              labels: _Labels) -> tuple[np.ndarray, np.ndarray] | None:
    """Parses a chunk of CSV rows into float64 features and labels (codes, for string
    labels); None if anything needs a closer look."""
    if n_columns < 2:  # one column, no commas: left to the slow path
        return None
    if b"\r" in chunk:
        chunk = chunk.replace(b"\r\n", b"\n")
    buf = _padded(chunk)
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
    columns = np.arange(n_columns) != label_at
    features = _parse_or_none(buf, starts[:, columns].ravel(), ends[:, columns].ravel())
    if features is None:
        return None
    features = features.reshape(len(starts), int(columns.sum()))
    if not _fits_float32(features):
        return None
    if label_at is None:
        return features, np.zeros(len(features))
    if labels.strings:
        y = labels.codes(buf, starts[:, label_at], ends[:, label_at])
    else:
        y = _parse_or_none(buf, starts[:, label_at], ends[:, label_at])
        if y is not None and not labels.accept(y, lineno + np.flatnonzero(filled)):
            return None
    return None if y is None else (features, y)


def _csv_slow(chunk: bytes, lineno: int, path: Path, header: list[str], label_at: int | None,
              labels: _Labels) -> tuple[np.ndarray, np.ndarray]:
    """Parses a chunk of CSV line by line: what is accepted, and the error for what is not."""
    rows, y = [], []
    text = chunk.decode("utf-8", errors="replace").split("\n")
    for number, fields in enumerate(csv.reader(text), lineno):
        if not any(field.strip() for field in fields):
            continue
        where = f"{path}:{number}"
        if len(fields) != len(header):
            raise DataError(f"{where}: {len(fields)} fields, but the header has {len(header)}")
        row = []
        for column, (name, field) in enumerate(zip(header, fields, strict=True)):
            if column == label_at and labels.strings:
                y.append(labels.code(field.strip(), f"{where}: column {name!r}"))
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
                    f"{where}: column {name!r}: value {field!r} is not a number"
                ) from None
            if column == label_at:
                labels.check(value, field, f"{where}: column {name!r}", number)
                y.append(value)
            elif not _fits_float32(np.array([value])):
                raise DataError(f"{where}: column {name!r}: value {field!r} is not finite "
                                "as float32")
            else:
                row.append(value)
        rows.append(row)
    n_features = len(header) - (label_at is not None)
    x = np.array(rows, dtype=np.float64).reshape(-1, n_features)
    return x, (np.zeros(len(x)) if label_at is None else np.array(y, dtype=np.float64))


# ----------------------------------------------------------------------------- .npy


def _convert_npy(path: Path, labels_path: Path, output: str | Path, n_features: int | None,
                 shard_bytes: int, source: dict[str, Any], progress: Progress) -> ShardIndex:
    x = _load_npy(path, "input")
    y = _load_npy(labels_path, "labels")
    if x.ndim != 2 or x.dtype.kind not in "fiub" or x.shape[1] < 1:
        raise DataError(f"{path}: features must be a 2-D numeric array, got {x.dtype} "
                        f"{x.shape}")
    if y.ndim != 1 or y.dtype.kind not in "fiub":
        raise DataError(f"{labels_path}: labels must be a 1-D numeric array, got {y.dtype} "
                        f"{y.shape}")
    if len(y) != len(x):
        raise DataError(f"{labels_path} has {len(y)} labels but {path} has {len(x)} rows; "
                        "they must match one to one")
    if len(x) == 0:
        raise DataError(f"{path}: no data rows")
    if n_features is not None and n_features != x.shape[1]:
        raise DataError(f"{path}: {x.shape[1]} feature columns, but n_features={n_features}")
    check = _Labels("row")
    block = max(1, min(1 << 16, DENSE_BLOCK_BYTES // (x.itemsize * x.shape[1])))
    started = time.perf_counter()
    with ShardWriter(output, "dense", x.shape[1], shard_bytes, source) as writer:
        for lo in range(0, len(x), block):
            features = np.asarray(x[lo:lo + block], dtype=np.float64)
            raw = np.asarray(y[lo:lo + block], dtype=np.float64)
            if not _fits_float32(features):
                with np.errstate(over="ignore"):
                    bad = ~np.isfinite(features.astype(np.float32))
                row, column = np.argwhere(bad)[0]
                raise DataError(f"{path}: row {lo + row}, column {column}: value "
                                f"{features[row, column]:g} is not finite as float32")
            if not check.accept(raw, lo + np.arange(len(raw))):
                for i, value in enumerate(raw, lo):
                    check.check(float(value), f"{value:g}", f"{labels_path}: row {i}", i)
            rows = _Rows(y=_stored(raw), x=features.astype(np.float32))
            _write_dense(writer, rows, x.shape[1], _piece_bytes(shard_bytes))
            done = lo + len(features)
            progress.update(progress.total * done / len(x),
                            done / max(time.perf_counter() - started, 1e-9))
    return open_shards(output)


def _load_npy(path: Path, key: str) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"{key}: no such file: {path}")
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as err:
        raise DataError(f"{path}: not a readable .npy file ({err})") from None
