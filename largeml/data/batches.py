"""Datasets whose items are whole batches, for `DataLoader(batch_size=None)`.

One item per batch keeps Python out of the per-row path: a batch is a single slice or gather of
contiguous tensors instead of `batch_size` calls to `__getitem__` and a collate.

Under `torchrun`, `batch_size` is the global batch: batch k of an epoch is the same set of rows
whatever the number of processes, and rank r of W trains on its share of it (`rank_share`). So
every rank takes the same number of steps of the same size by construction, and W processes
compute the same updates as one (`tests/test_distributed.py`). Evaluation instead splits the rows
themselves (`eval_share`): every row once, none twice.
"""

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import IterableDataset

from largeml.errors import ConfigError
from largeml.labels import BINARY, Classes


def check_batch_size(batch_size: int, world_size: int) -> None:
    if batch_size % world_size:
        raise ConfigError(
            f"data.batch_size={batch_size} is the global batch, split evenly over all "
            f"{world_size} processes, so it must be a multiple of {world_size}; try "
            f"data.batch_size={max(world_size, batch_size // world_size * world_size)}"
        )


def global_batches(n_rows: int, batch_size: int, world_size: int) -> int:
    """Batches in an epoch of `n_rows`: the last, shorter one counts if every rank gets a row."""
    full, rest = divmod(n_rows, batch_size)
    return full + (rest >= world_size)


def rank_share(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """The rows [lo, hi) of an n-row global batch that `rank` trains on: n // world_size each
    (the final batch of an epoch leaves out its last n % world_size rows, fewer than W)."""
    share = n // world_size
    return rank * share, (rank + 1) * share


def eval_share(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """The rows [lo, hi) of n that `rank` evaluates: contiguous, sizes differing by at most one,
    every row in exactly one rank's share."""
    return n * rank // world_size, n * (rank + 1) // world_size


class BatchDataset(Protocol):
    """What the Trainer uses of a source of batches: this rank's (x, y) batches of the current
    epoch in order (iterated in the training process, or through a DataLoader with
    `batch_size=None`), how many an epoch has, and `set_epoch` to pick the epoch (its shuffle)
    and the batch to start at (a resume); `n_rows`, the rows it serves batches from.
    A source that `DataModule.resident` marks also has `to_device(device)`, called once."""

    n_rows: int

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]: ...

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None: ...


class InMemoryBatches(IterableDataset):
    """Global batches of `batch_size` rows (the last may be shorter) from tensors held in
    memory; this rank's share of each (see the module docstring).

    With `shuffle`, rows are visited in a permutation that is a pure function of (seed, epoch), so
    any epoch can be replayed exactly, and `set_epoch(epoch, start_batch)` resumes it at a batch.
    """

    def __init__(
        self, x: Tensor, y: Tensor, batch_size: int, shuffle: bool, seed: int = 0,
        rank: int = 0, world_size: int = 1,
    ) -> None:
        assert x.shape[0] == y.shape[0], (x.shape, y.shape)
        check_batch_size(batch_size, world_size)
        self.x, self.y = x, y
        self.n_rows = x.shape[0]
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.rank, self.world_size = rank, world_size
        self.order: Tensor | None = None
        self.start_batch = 0
        self.set_epoch(0)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.start_batch = start_batch
        if self.shuffle:
            rng = np.random.default_rng([self.seed, epoch])
            self.order = torch.from_numpy(rng.permutation(self.n_rows))

    def __len__(self) -> int:
        return global_batches(self.n_rows, self.batch_size, self.world_size)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        start = index * self.batch_size
        lo, hi = rank_share(min(self.batch_size, self.n_rows - start), self.rank, self.world_size)
        start, stop = start + lo, start + hi
        if self.order is None:
            return self.x[start:stop], self.y[start:stop]
        rows = self.order[start:stop]
        return self.x[rows], self.y[rows]

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for index in range(self.start_batch, len(self)):
            yield self[index]


@dataclass
class DataModule:
    """Training and validation batches plus the feature count the model is built with."""

    train: BatchDataset
    val: BatchDataset | None
    n_features: int
    description: str
    n_train: int  # training rows in all, over every rank
    num_workers: int = 0  # DataLoader worker processes per rank
    reader_threads: int = 0  # threads reading ahead inside the training process
    # Train and val hold their rows themselves and have `to_device(device)`, which the Trainer
    # calls once before training; their batches are then already on the device.
    resident: bool = False
    # Validation accuracy of a known reference classifier, where there is one (the true
    # hyperplane of synthetic data): what a well-trained model should come close to.
    reference_accuracy: float | None = None
    # This rank's share of the training rows in file order, unshuffled: what the training
    # objective is computed over, feature scaling is fitted on and a full-batch solver holds.
    train_eval: BatchDataset | None = None
    held_bytes: int = 0  # what all training rows take in memory (the full-batch solvers' need)
    sparse: bool = False
    scale: str = "auto"  # data.scale: auto | standard | maxabs | none (largeml.data.scaling)
    # The training labels' classes; batches carry class indices (`largeml.labels`).
    classes: Classes = BINARY
    label_counts: dict[str, int] | None = None  # the training rows' labels as written, counted
    # How the training file's raw rows became columns, as found in it (data=files: the feature
    # and categorical columns, the hashing): saved in the checkpoint's `data` config, so a new
    # file is read into the same columns by evaluate and predict.
    feature_map: dict[str, Any] = field(default_factory=dict)
