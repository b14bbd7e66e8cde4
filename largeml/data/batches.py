"""Datasets whose items are whole batches, for `DataLoader(batch_size=None)`.

One item per batch keeps Python out of the per-row path: a batch is a single slice or gather of
contiguous tensors instead of `batch_size` calls to `__getitem__` and a collate.
"""

import math
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset


class BatchDataset(Protocol):
    """What the Trainer needs from a source of batches."""

    n_rows: int

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]: ...

    def set_epoch(self, epoch: int) -> None: ...


class InMemoryBatches(Dataset):
    """Batches of `batch_size` rows (the last may be shorter) from tensors held in memory.

    With `shuffle`, rows are visited in a permutation that is a pure function of (seed, epoch), so
    any epoch can be replayed exactly.
    """

    def __init__(
        self, x: Tensor, y: Tensor, batch_size: int, shuffle: bool, seed: int = 0
    ) -> None:
        assert x.shape[0] == y.shape[0], (x.shape, y.shape)
        self.x, self.y = x, y
        self.n_rows = x.shape[0]
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.order: Tensor | None = None
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        if self.shuffle:
            rng = np.random.default_rng([self.seed, epoch])
            self.order = torch.from_numpy(rng.permutation(self.n_rows))

    def __len__(self) -> int:
        return math.ceil(self.n_rows / self.batch_size)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        start, stop = index * self.batch_size, (index + 1) * self.batch_size
        if self.order is None:
            return self.x[start:stop], self.y[start:stop]
        rows = self.order[start:stop]
        return self.x[rows], self.y[rows]


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
