"""The label contract: what a dataset's classes are, and how a label becomes a class index.

A label, as written in the data, is an integer class id (LIBSVM `+1`, `-1`, `1` … `20`; a CSV or
`.npy` column of integers). Shards store labels as written, and their index counts each one.
The classes of a run are the distinct labels of its training rows, in increasing order; class k
is the k-th of them, and the model has one score per class, except for two classes (the binary
case): one score, positive for the second class.

Binary data spelled {0, 1} or {−1, +1} is one convention, as it always was in largeml: with
training classes [0, 1] or [−1, 1], a label of 1 is the positive class and 0 or −1 the
negative, in any file (a validation file may spell them the other way).
"""

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from largeml.errors import ConfigError, DataError

BINARY_SPELLINGS = ((0.0, 1.0), (-1.0, 1.0))  # the classes of the {0,1} / {−1,+1} convention


def spell(value: float) -> str:
    """A label as text: integers without a decimal point (`-1`, `7`)."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def check_integer(values: np.ndarray, where: str) -> None:
    """Raises a DataError naming the first label that is not a finite integer."""
    bad = ~np.isfinite(values) | (values != np.round(values))
    if bad.any():
        raise DataError(f"{where}: label {values[np.argmax(bad)]!r} is not an integer class "
                        "id; labels are integers (0/1, -1/+1, or 0 ... K-1, 1 ... K)")


def count_labels(values: np.ndarray | Tensor) -> dict[str, int]:
    """{spelled label: rows} of an array of labels."""
    found, counts = np.unique(np.asarray(values, dtype=np.float64), return_counts=True)
    return {spell(v): int(n) for v, n in zip(found.tolist(), counts.tolist(), strict=True)}


@dataclass(frozen=True)
class Classes:
    """The classes of a training set: its distinct labels, in increasing order."""

    values: tuple[float, ...]

    @classmethod
    def of_counts(cls, counts: Mapping[str, int], where: str) -> "Classes":
        """The classes of a label count (`ShardIndex.label_counts`): labels with rows."""
        values = tuple(sorted(float(k) for k, n in counts.items() if n > 0))
        if len(values) < 2:
            shown = ", ".join(spell(v) for v in values) or "none"
            raise DataError(f"{where}: a classifier needs at least two classes in its training "
                            f"rows; found {len(values)} ({shown})")
        return cls(values)

    @classmethod
    def of_names(cls, names: Iterable[str]) -> "Classes":
        """From the spelled labels a checkpoint keeps."""
        return cls(tuple(float(n) for n in names))

    @property
    def k(self) -> int:
        return len(self.values)

    @property
    def binary(self) -> bool:
        return self.k == 2

    @property
    def n_outputs(self) -> int:
        """Scores per row: one for two classes, else one per class."""
        return 1 if self.binary else self.k

    @property
    def names(self) -> list[str]:
        return [spell(v) for v in self.values]

    @property
    def convention(self) -> bool:
        """Binary {0, 1} or {−1, +1}: 1 is positive, 0 and −1 both negative."""
        return self.values in BINARY_SPELLINGS

    def known(self, value: float) -> bool:
        return value in self.values or (self.convention and value in (-1.0, 0.0, 1.0))

    def check(self, counts: Mapping[str, int], where: str) -> None:
        """Raises a DataError if a set with labels `counts` has a label outside these classes."""
        unknown = [k for k, n in counts.items() if n > 0 and not self.known(float(k))]
        if unknown:
            raise DataError(f"{where}: label {unknown[0]} is not one of the training classes "
                            f"({', '.join(self.names)})")

    def index(self, labels: Tensor) -> Tensor:
        """Labels as written -> class indices, float32 (0 ... K−1; 0/1 for two classes)."""
        if self.convention:
            return (labels > 0).float()
        if self.binary:
            return (labels == self.values[1]).float()
        table = torch.tensor(self.values, dtype=labels.dtype, device=labels.device)
        return torch.searchsorted(table, labels.contiguous()).float()

    def counts(self, label_counts: Mapping[str, int]) -> list[int]:
        """Rows per class (in class order) of a label count as written."""
        out = [0] * self.k
        for label, n in label_counts.items():
            if n > 0 and self.known(float(label)):
                out[int(self.index(torch.tensor([float(label)]))[0])] += n
        return out

    def weights(self, spec: Any, label_counts: Mapping[str, int], key: str) -> Tensor | None:
        """The class weights `loss.class_weight` asks for, in class order: None (all 1),
        `balanced` (n / (K · n_class), as scikit-learn) or {label: weight} (labels as
        written; classes not named weigh 1)."""
        if spec is None:
            return None
        if spec == "balanced":
            counts = self.counts(label_counts)
            return torch.tensor([sum(counts) / (self.k * n) for n in counts])
        if not isinstance(spec, Mapping):
            raise ConfigError(f"{key} must be null, balanced or {{label: weight, ...}}, got "
                              f"{spec!r}")
        out = torch.ones(self.k)
        for label, weight in spec.items():
            try:
                value = float(label)
            except ValueError:
                value = math.nan
            if not self.known(value):
                raise ConfigError(f"{key}: {label!r} is not one of the training classes "
                                  f"({', '.join(self.names)})")
            if not isinstance(weight, int | float) or not weight > 0:
                raise ConfigError(f"{key}.{label} must be a positive number, got {weight!r}")
            out[int(self.index(torch.tensor([value]))[0])] = float(weight)
        return out

    def __str__(self) -> str:
        if self.k <= 6:
            return f"{self.k} classes ({', '.join(self.names)})"
        return f"{self.k} classes ({', '.join(self.names[:3])} ... {self.names[-1]})"


BINARY = Classes((0.0, 1.0))  # two classes spelled 0 and 1
