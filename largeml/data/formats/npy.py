""".npy features (2-D, numeric) and labels (1-D) into dense shards, read through memory maps."""

import time
from pathlib import Path
from typing import Any

import numpy as np

from largeml.data.formats import common
from largeml.data.formats.common import (
    Labels,
    Options,
    Rows,
    fits_float32,
    piece_bytes,
    stored,
    write_dense,
)
from largeml.data.shards import ShardIndex, ShardWriter, open_shards
from largeml.errors import DataError
from largeml.progress import Progress


def convert(path: Path, output: Path, options: Options, source: dict[str, Any],
            progress: Progress) -> ShardIndex:
    """A 2-D `.npy` of features and a 1-D `.npy` of labels (`options.labels`) into dense shards,
    a block of rows at a time from memory maps."""
    assert options.labels is not None  # convert() checked
    labels_path, n_features, shard_bytes = options.labels, options.n_features, options.shard_bytes
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
    check = Labels("row")
    block = max(1, min(1 << 16, common.DENSE_BLOCK_BYTES // (x.itemsize * x.shape[1])))
    started = time.perf_counter()
    with ShardWriter(output, "dense", x.shape[1], shard_bytes, source) as writer:
        for lo in range(0, len(x), block):
            features = np.asarray(x[lo:lo + block], dtype=np.float64)
            raw = np.asarray(y[lo:lo + block], dtype=np.float64)
            if not fits_float32(features):
                with np.errstate(over="ignore"):
                    bad = ~np.isfinite(features.astype(np.float32))
                row, column = np.argwhere(bad)[0]
                raise DataError(f"{path}: row {lo + row}, column {column}: value "
                                f"{features[row, column]:g} is not finite as float32")
            if not check.accept(raw, lo + np.arange(len(raw))):
                for i, value in enumerate(raw, lo):
                    check.check(float(value), f"{value:g}", f"{labels_path}: row {i}", i)
            rows = Rows(y=stored(raw), x=features.astype(np.float32))
            write_dense(writer, rows, x.shape[1], piece_bytes(shard_bytes))
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
