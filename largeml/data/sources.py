"""The datasets `configs/data/*.yaml` point at. Each returns a `DataModule`.

Labels are normalised once, here: {0, 1} and {−1, +1} both become {0, 1}; anything else is an
error naming the file.
"""

import logging
import math
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from largeml import device
from largeml.data import hashing, scaling
from largeml.data.batches import DataModule, InMemoryBatches, eval_share
from largeml.data.formats.libsvm import read_libsvm
from largeml.data.resident import ResidentStream
from largeml.data.shards import ShardIndex, open_shards
from largeml.data.stream import ShardStream
from largeml.errors import ConfigError, DataError
from largeml.labels import Classes, check_integer, count_labels

log = logging.getLogger(__name__)

A9A_DIR = Path(__file__).parent / "a9a"
A9A_FEATURES = 123
EVAL_BATCH_SIZE = 8192
# What a prepared index records of how its raw rows became columns (the feature map).
FEATURE_MAP = ("feature_columns", "categorical_columns", "hash_bits")
# The least a run holds per feature at once, whatever it trains with: the weight and its
# gradient (8 bytes), optimizer state (adagrad's sums 4, adam's moments 8, Newton's CG vectors
# more) and data.scale's fitting buffers (float64 sums and squares, 16). A width that needs more
# than the free RAM cannot train, so `files` stops before anything that size is allocated.
BYTES_PER_FEATURE = 32


def checked_labels(raw: np.ndarray | Tensor, where: str) -> Tensor:
    """Labels as written, float32, once checked to be integer class ids (`largeml.labels`)."""
    y = torch.as_tensor(raw, dtype=torch.float32)
    check_integer(y.double().numpy(), where)
    return y


def _module(
    train: tuple[Tensor, Tensor],
    val: tuple[Tensor, Tensor] | None,
    batch_size: int,
    seed: int,
    description: str,
    rank: int,
    world_size: int,
    scale: str = "auto",
    where: tuple[str, str] = ("training rows", "validation rows"),
) -> DataModule:
    """In-memory rows, labels as written: the classes are the training labels', and both sets'
    labels become class indices."""
    if batch_size < 1:
        raise ConfigError(f"data.batch_size must be a positive integer, got {batch_size}")
    scaling.check(scale, sparse=False)
    label_counts = count_labels(train[1])
    classes = Classes.of_counts(label_counts, where[0])
    train = train[0], classes.index(train[1])
    if val is not None:
        classes.check(count_labels(val[1]), where[1])
        val = val[0], classes.index(val[1])
    if not classes.binary:
        description += f"; {classes}"

    def share(rows: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        lo, hi = eval_share(len(rows[1]), rank, world_size)  # each rank its own rows
        return rows[0][lo:hi], rows[1][lo:hi]

    return DataModule(
        train=InMemoryBatches(*train, batch_size=batch_size, shuffle=True, seed=seed,
                              rank=rank, world_size=world_size),
        val=None if val is None else InMemoryBatches(*share(val), EVAL_BATCH_SIZE, shuffle=False),
        n_features=train[0].shape[1],
        description=description,
        n_train=len(train[1]),
        train_eval=InMemoryBatches(*share(train), EVAL_BATCH_SIZE, shuffle=False),
        held_bytes=train[0].numel() * 4 + len(train[1]) * 4,
        scale=scale,
        classes=classes,
        label_counts=label_counts,
    )


def _split(x: Tensor, y: Tensor, val_fraction: float, seed: int):
    """Holds out the last `val_fraction` of a seeded permutation of the rows for validation."""
    if not 0 <= val_fraction < 1:
        raise ConfigError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
    n_val = round(len(y) * val_fraction)
    if n_val == 0:
        return (x, y), None
    rows = torch.from_numpy(np.random.default_rng(seed).permutation(len(y)))
    train, val = rows[:-n_val], rows[-n_val:]
    return (x[train], y[train]), (x[val], y[val])


def synthetic(
    n_samples: int = 200_000,
    n_features: int = 100,
    noise: float = 0.5,
    val_fraction: float = 0.2,
    seed: int = 0,
    batch_size: int = 256,
    scale: str = "auto",
    rank: int = 0,
    world_size: int = 1,
    n_classes: int = 2,
) -> DataModule:
    """Gaussian features, labels from a random hyperplane plus Gaussian noise on the margin.

    x ~ N(0, I), w uniform on the unit sphere, y = [x·w + noise·ε > 0] with ε ~ N(0, 1). Since
    x·w ~ N(0, 1), the best any classifier can do is 1 − arccos(1/√(1 + noise²))/π accuracy
    (85.2 % for noise 0.5). With `n_classes` K > 2: K random unit directions w_k and
    y = argmax_k (x·w_k + noise·ε_k), labels 0 … K−1. The true rule's accuracy on the
    validation rows is `reference_accuracy`, which the log states so a run can be judged
    against it.
    """
    if n_samples < 2 or n_features < 1:
        raise ConfigError(
            f"data.n_samples ({n_samples}) must be at least 2 and data.n_features "
            f"({n_features}) at least 1"
        )
    if not isinstance(n_classes, int) or n_classes < 2:
        raise ConfigError(f"data.n_classes must be an integer >= 2, got {n_classes!r}")
    g = torch.Generator().manual_seed(seed)
    if n_classes > 2:
        return _synthetic_classes(n_samples, n_features, noise, val_fraction, seed, batch_size,
                                  scale, rank, world_size, n_classes, g)
    w = torch.randn(n_features, generator=g)
    w /= w.norm()
    x = torch.randn(n_samples, n_features, generator=g)
    y = (x @ w + noise * torch.randn(n_samples, generator=g) > 0).float()
    bayes = 1 - math.acos(1 / math.sqrt(1 + noise**2)) / math.pi
    train, val = _split(x, y, val_fraction, seed)
    description = (
        f"synthetic: {n_samples} rows x {n_features} features, noise {noise}; "
        f"best possible accuracy {bayes:.4f}"
    )
    module = _module(train, val, batch_size, seed, description, rank, world_size, scale)
    if val is not None:
        module.reference_accuracy = ((val[0] @ w > 0).float() == val[1]).float().mean().item()
        module.description += f", {module.reference_accuracy:.4f} on these validation rows"
    return module


def _synthetic_classes(n_samples, n_features, noise, val_fraction, seed, batch_size, scale,
                       rank, world_size, n_classes, g) -> DataModule:
    w = torch.randn(n_features, n_classes, generator=g)
    w /= w.norm(dim=0)
    x = torch.randn(n_samples, n_features, generator=g)
    y = (x @ w + noise * torch.randn(n_samples, n_classes, generator=g)).argmax(1).float()
    train, val = _split(x, y, val_fraction, seed)
    description = f"synthetic: {n_samples} rows x {n_features} features, noise {noise}"
    module = _module(train, val, batch_size, seed, description, rank, world_size, scale)
    if val is not None:
        module.reference_accuracy = ((val[0] @ w).argmax(1).float() == val[1]).float().mean().item()
        module.description += f"; the true rule scores {module.reference_accuracy:.4f} on these " \
                              "validation rows"
    return module


def libsvm(
    train_path: str,
    val_path: str | None = None,
    n_features: int | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    batch_size: int = 256,
    scale: str = "auto",
    rank: int = 0,
    world_size: int = 1,
) -> DataModule:
    """Trains on a LIBSVM file; validates on `val_path`, else on a held-out `val_fraction`.

    Without `n_features`, the width is the highest index in either file, so a test file that
    lacks the last feature (as a9a.t does) still lines up with its training file.
    """
    for key, path in (("data.train_path", train_path), ("data.val_path", val_path)):
        if path is not None and not Path(path).is_file():
            raise DataError(f"{key}: no such file: {path}")
    train_rows = read_libsvm(train_path, n_features)
    val_rows = None if val_path is None else read_libsvm(val_path, n_features)
    width = n_features or max(train_rows.width, val_rows.width if val_rows else 0)

    def tensors(rows, path: str) -> tuple[Tensor, Tensor]:
        return torch.from_numpy(rows.to_dense(width)), checked_labels(rows.labels, path)

    train = tensors(train_rows, train_path)
    if val_rows is None:
        train, val = _split(*train, val_fraction, seed)
    else:
        val = tensors(val_rows, val_path)
    n_val = 0 if val is None else len(val[1])
    description = f"libsvm {train_path}: {len(train[1])} train, {n_val} val rows x {width}"
    return _module(train, val, batch_size, seed, description, rank, world_size, scale,
                   where=(f"data.train_path {train_path}",
                          f"data.val_path {val_path}" if val_path else "data.val_fraction"))


def a9a(batch_size: int = 256, seed: int = 0, scale: str = "auto", rank: int = 0,
        world_size: int = 1) -> DataModule:
    """UCI Adult as LIBSVM's a9a: 32,561 training and 16,281 test rows, 123 binary features."""
    module = libsvm(
        str(A9A_DIR / "a9a.gz"),
        str(A9A_DIR / "a9a.t.gz"),
        n_features=A9A_FEATURES,
        seed=seed,
        batch_size=batch_size,
        scale=scale,
        rank=rank,
        world_size=world_size,
    )
    module.description = "a9a (UCI Adult, CC BY 4.0): 32561 train, 16281 val rows x 123"
    return module


def prepared(path: str, key: str, format: str, cache_dir: str, **options) -> ShardIndex:
    """A prepared directory as it is, or a raw file (or a directory of Parquet part files)
    converted once into `cache_dir`."""
    if _is_shards(Path(path), format):
        return open_shards(path)
    if not Path(path).exists():
        raise DataError(f"{key}: no such file or directory: {path}")
    from largeml.data.convert import cached  # only a raw file needs the converters

    return cached(path, Path(cache_dir).expanduser(), format=format, **options)


def _is_shards(path: Path, format: str) -> bool:
    """Whether `path` is (meant as) a prepared shard directory rather than raw input."""
    if format == "shards":
        return True
    if not path.is_dir() or format == "parquet":
        return False
    if format != "auto":
        return True  # a directory is prepared shards, whatever format names
    from largeml.data.formats.parquet import is_parquet

    return not is_parquet(path)


def check_hashing(path: str, key: str, format: str, hash_bits: int | None,
                  n_features: int | None, categorical: bool = False) -> None:
    """Before any conversion: `data.hash_bits` is for sparse LIBSVM input, or for CSV and
    Parquet with `data.categorical_columns`."""
    if hash_bits is None or _is_shards(Path(path), format):
        return  # a prepared directory is checked against its index once open
    from largeml.data.convert import check_hash_bits, resolve_format

    check_hash_bits(hash_bits, resolve_format(Path(path), format), None, n_features, "data.",
                    categorical=categorical)


def hashed_as(index: ShardIndex, key: str, hash_bits: int | None) -> ShardIndex:
    """`index`, unless `data.hash_bits` asks for hashing it was not prepared with."""
    prepared_with = index.source.get("hash_bits")
    if hash_bits is not None and prepared_with != hash_bits:
        how = ("without hashing" if prepared_with is None
               else f"with hash_bits={prepared_with}")
        raise ConfigError(
            f"{key} {index.root} was prepared {how}, but data.hash_bits={hash_bits}: prepare it "
            f"again with hash_bits={hash_bits}, or leave data.hash_bits unset to train on it as "
            "it is")
    return index


def fits_in_memory(index: ShardIndex, key: str, available: int) -> None:
    """Raises a DataError, before anything of the data's width is allocated, if a model over
    `index.n_features` features cannot fit in `available` bytes of RAM."""
    need = index.n_features * BYTES_PER_FEATURE
    if need <= available:
        return
    where = index.source.get("path", str(index.root))
    gib = f"about {need / 2**30:,.1f} GiB ({BYTES_PER_FEATURE} bytes a feature: weight, " \
          f"gradient, optimizer state, scaling), but {available / 2**30:,.1f} GiB of RAM is free"
    bits = hashing.suggested_bits(min(index.nnz, index.n_features), available, BYTES_PER_FEATURE)
    if "hash_bits" in index.source:
        raise DataError(f"{key} {where}: data.hash_bits={index.source['hash_bits']} makes "
                        f"{index.n_features:,} columns, which need {gib}; use fewer, e.g. "
                        f"data.hash_bits={bits} ({1 << bits:,} columns)")
    raise DataError(
        f"{key} {where}: its highest feature index is {index.n_features:,}, and a model that "
        f"wide needs {gib}. Hash the feature ids into fewer columns: data.hash_bits={bits} "
        f"({1 << bits:,} columns; README, \"Hashing feature ids\")")


def labelled(index: ShardIndex, key: str) -> ShardIndex:
    """`index`, unless it was prepared without labels (`label_column=null`, rows to score)."""
    if index.source.get("label_column", "") is None:
        raise DataError(f"{key} {index.root} was prepared from {index.source.get('path')} with "
                        "label_column=null: it has no labels to train on or evaluate against")
    return index


def files(
    train_path: str,
    val_path: str | None = None,
    format: str = "auto",
    n_features: int | None = None,
    labels: str | None = None,
    val_labels: str | None = None,
    label_column: str | int = "label",
    feature_columns: list[str] | None = None,
    categorical_columns: list[str] | None = None,
    cache_dir: str = "~/.cache/largeml",
    batch_size: int = 1024,
    shuffle_blocks: int = 16,
    num_workers: int = 0,
    resident: bool = False,
    scale: str = "auto",
    hash_bits: int | None = None,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
) -> DataModule:
    """Streams training (and validation) rows from disk with bounded memory.

    Each path is a prepared shard directory (`python -m largeml.prepare`) or a raw LIBSVM, CSV,
    `.npy` or Parquet file (or a directory of Parquet part files), converted on first use into
    `cache_dir` under a key of the file's identity (path, size, modification time) and the
    options, so later runs start at once.

    CSV and Parquet: `label_column`, `feature_columns` (null: every numeric column but the
    label and the categorical ones; the validation file's must be the training file's) and
    `categorical_columns`, hashed one-hot into 2^`hash_bits` buckets (null: 2^18) after them.

    With `resident` (dense data), the Trainer loads the rank's rows once onto its device and
    every epoch's batches, the same ones as streamed, are cut there (`ResidentStream`).

    `hash_bits=N` hashes LIBSVM feature ids into 2^N columns (`largeml.data.hashing`). A
    training set wider than the free RAM can hold a model of (`BYTES_PER_FEATURE`) is an error
    that suggests it.
    """
    if not isinstance(resident, bool):
        raise ConfigError(f"data.resident must be true or false, got {resident!r}")
    if resident and num_workers:
        raise ConfigError(
            "data.resident=true reads no files while training, so it takes no DataLoader "
            f"workers; set data.num_workers=0 (got {num_workers})"
        )
    if label_column is None:
        raise ConfigError("data.label_column=null means no labels: training needs them; name "
                          "the CSV's label column (largeml.predict scores unlabelled rows)")
    hashing.check(hash_bits, "data.hash_bits")
    for key, path in (("data.train_path", train_path), ("data.val_path", val_path)):
        if path is not None:
            check_hashing(path, key, format, hash_bits, n_features, bool(categorical_columns))
    options = {"n_features": n_features, "label_column": label_column}
    # Only when set: the cache keys of files converted without them stay as they were.
    for name, value in (("hash_bits", hash_bits), ("feature_columns", feature_columns),
                        ("categorical_columns", categorical_columns)):
        if value is not None:
            options[name] = list(value) if name != "hash_bits" else value
    train = prepared(train_path, "data.train_path", format, cache_dir, labels=labels, **options)
    labelled(hashed_as(train, "data.train_path", hash_bits), "data.train_path")
    fits_in_memory(train, "data.train_path", device.available_ram())
    val = None if val_path is None else prepared(
        val_path, "data.val_path", format, cache_dir, labels=val_labels, **options)
    if val is not None:
        labelled(hashed_as(val, "data.val_path", hash_bits), "data.val_path")
    if val is not None and (
        val.n_features > train.n_features
        or (train.layout == "dense" and val.n_features != train.n_features)
    ):
        raise DataError(
            f"data.val_path {val_path} has {val.n_features} features but data.train_path "
            f"{train_path} has {train.n_features}; give both data.n_features, or files of one width"
        )
    columns = train.source.get("feature_columns")
    if val is not None and val.source.get("feature_columns", columns) != columns:
        raise DataError(
            f"data.val_path {val_path} has the feature columns {val.source['feature_columns']}, "
            f"but data.train_path {train_path} has {train.source['feature_columns']}: name "
            "them in data.feature_columns, or give both files the same columns")
    scaling.check(scale, sparse=train.layout == "sparse")
    classes = Classes.of_counts(train.label_counts, f"data.train_path {train_path}")
    if val is not None:
        classes.check(val.label_counts, f"data.val_path {val_path}")
    stream = ShardStream(train, batch_size, shuffle=True, seed=seed,
                         shuffle_blocks=shuffle_blocks, rank=rank, world_size=world_size,
                         classes=classes)
    train_eval = ShardStream(train, EVAL_BATCH_SIZE, shuffle=False, rank=rank,
                             world_size=world_size, evaluation=True, classes=classes)
    if val is not None:
        val = ShardStream(val, EVAL_BATCH_SIZE, shuffle=False, rank=rank, world_size=world_size,
                          n_features=train.n_features, evaluation=True, classes=classes)
    description = f"{train.layout} shards {train.root}: {train.rows} rows x {train.n_features}"
    if not classes.binary:
        description += f", {classes}"
    if val is not None:
        description += f", validation {val.index.rows} rows"
    if resident:
        stream = ResidentStream(stream)
        val = None if val is None else ResidentStream(val)
        description += ", resident on the training device"
    if train.layout == "sparse":  # CSR: 8 bytes a non-zero, 8 a row (pointer and label)
        held_bytes = sum(s.nnz for s in train.shards) * 8 + train.rows * 8
    else:
        held_bytes = train.rows * (train.n_features + 1) * 4
    return DataModule(train=stream, val=val, n_features=train.n_features,
                      description=description, n_train=train.rows, num_workers=num_workers,
                      reader_threads=0 if num_workers or resident else 1, resident=resident,
                      train_eval=train_eval, held_bytes=held_bytes,
                      sparse=train.layout == "sparse", scale=scale, classes=classes,
                      label_counts=train.label_counts,
                      feature_map={k: train.source[k] for k in FEATURE_MAP if k in train.source})
