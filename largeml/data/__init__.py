"""Data sources (`synthetic`, `a9a`, `libsvm`) and the batch datasets the Trainer streams."""

from largeml.data.batches import BatchDataset, DataModule, InMemoryBatches
from largeml.data.sources import a9a, checked_labels, files, libsvm, synthetic

__all__ = [
    "BatchDataset",
    "DataModule",
    "InMemoryBatches",
    "a9a",
    "files",
    "libsvm",
    "checked_labels",
    "synthetic",
]
