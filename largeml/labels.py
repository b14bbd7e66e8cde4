"""The label contract: what a dataset's classes are, and how a label becomes a class index.

A label, as written in the data, is an integer class id (LIBSVM `+1`, `-1`, `1` … `20`; a CSV or
`.npy` column of integers) or, in a CSV whose first label is not a number, a string (`cat`,
`spam`). Shards store numbers as written; a file of string labels stores each as a code, the
position of its string in the file's `label_names` (`largeml.data.shards`). Either way the
index counts each label, by its spelling (`label_counts`).

The classes of a run are the distinct labels of its training rows, in increasing order (numbers
by value, strings alphabetically); class k is the k-th of them, and the model has one score per
class, except for two classes (the binary case): one score, positive for the second class.
A checkpoint keeps the classes' spellings, in class order.

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


def is_number(name: str) -> bool:
    try:
        return math.isfinite(float(name))
    except ValueError:
        return False


@dataclass(frozen=True)
class LabelMap:
    """One file's stored labels -> class indices (float32): the stored values, sorted, and the
    class of each. Made by `Classes.label_map`; a file's labels are checked first
    (`Classes.check`), so each stored label is one of `stored`."""

    stored: Tensor  # float32, increasing
    index: Tensor  # float32, the class index of each

    def __post_init__(self) -> None:
        # Labels stored as their class indices already (0/1, 0 ... K−1) map to themselves: no
        # search per batch (4 torch ops, 0.1 ms for 4,096 rows: 2-3 % of a sparse FTRL epoch).
        object.__setattr__(self, "identity", torch.equal(self.stored, self.index))

    def __call__(self, labels: Tensor) -> Tensor:
        if self.identity:
            return labels.float()
        stored, index = self.stored.to(labels.device), self.index.to(labels.device)
        at = torch.searchsorted(stored, labels.contiguous()).clamp_(max=len(stored) - 1)
        return index[at]


@dataclass(frozen=True)
class Classes:
    """The classes of a training set: its distinct labels, spelled as written, in class order."""

    labels: tuple[str, ...]

    @classmethod
    def of_counts(cls, counts: Mapping[str, int], where: str) -> "Classes":
        """The classes of a label count (`ShardIndex.label_counts`): labels with rows, numbers
        in increasing order, or strings in alphabetical order if any label is not a number."""
        found = [str(k) for k, n in counts.items() if n > 0]
        if len(found) < 2:
            raise DataError(f"{where}: a classifier needs at least two classes in its training "
                            f"rows; found {len(found)} ({', '.join(found) or 'none'})")
        if all(is_number(k) for k in found):
            return cls(tuple(spell(v) for v in sorted(float(k) for k in found)))
        return cls(tuple(sorted(found)))

    @classmethod
    def of_names(cls, names: Iterable[Any]) -> "Classes":
        """From the spelled labels a checkpoint keeps, in class order."""
        return cls(tuple(str(n) for n in names))

    @property
    def names(self) -> list[str]:
        return list(self.labels)

    @property
    def k(self) -> int:
        return len(self.labels)

    @property
    def binary(self) -> bool:
        return self.k == 2

    @property
    def n_outputs(self) -> int:
        """Scores per row: one for two classes, else one per class."""
        return 1 if self.binary else self.k

    @property
    def numeric(self) -> bool:
        return all(is_number(n) for n in self.labels)

    @property
    def values(self) -> tuple[float, ...]:
        """The labels as numbers (numeric classes only)."""
        return tuple(float(n) for n in self.labels)

    @property
    def convention(self) -> bool:
        """Binary {0, 1} or {−1, +1}: 1 is positive, 0 and −1 both negative."""
        return self.numeric and self.values in BINARY_SPELLINGS

    def position(self, label: Any) -> int | None:
        """The class index of a label, as written (a number or a string); None if it is none
        of these classes."""
        name = str(label)
        if self.numeric and is_number(name):
            value = float(name)
            if self.convention and value in (-1.0, 0.0, 1.0):
                return int(value > 0)
            return self.values.index(value) if value in self.values else None
        return self.labels.index(name) if name in self.labels else None

    def check(self, counts: Mapping[str, int], where: str) -> None:
        """Raises a DataError if a set with labels `counts` has a label outside these classes."""
        unknown = [k for k, n in counts.items() if n > 0 and self.position(k) is None]
        if unknown:
            raise DataError(f"{where}: label {unknown[0]} is not one of the training classes "
                            f"({', '.join(self.names)})")

    def label_map(self, stored: Mapping[float, str]) -> LabelMap:
        """The map of a file whose labels are stored as the keys of `stored` (spelled as its
        values): numbers as written, or string codes (`ShardIndex.stored_labels`)."""
        keys = sorted(stored)
        index = [self.position(stored[key]) for key in keys]
        if None in index:
            raise DataError(f"label {stored[keys[index.index(None)]]} is not one of the "
                            f"training classes ({', '.join(self.names)})")
        return LabelMap(torch.tensor(keys, dtype=torch.float32),
                        torch.tensor(index, dtype=torch.float32))

    def index(self, labels: Tensor) -> Tensor:
        """Numeric labels as written -> class indices, float32 (0 ... K−1; 0/1 for two
        classes); for rows held in memory."""
        found = np.unique(labels.double().cpu().numpy()).tolist()
        return self.label_map({v: spell(v) for v in found})(labels.float())

    def counts(self, label_counts: Mapping[str, int]) -> list[int]:
        """Rows per class (in class order) of a label count as written."""
        out = [0] * self.k
        for label, n in label_counts.items():
            k = self.position(label)
            if n > 0 and k is not None:
                out[k] += n
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
            k = self.position(label)
            if k is None:
                raise ConfigError(f"{key}: {label!r} is not one of the training classes "
                                  f"({', '.join(self.names)})")
            if not isinstance(weight, int | float) or not weight > 0:
                raise ConfigError(f"{key}.{label} must be a positive number, got {weight!r}")
            out[k] = float(weight)
        return out

    def spelled(self, index: np.ndarray) -> np.ndarray:
        """Class indices -> labels as written: integers (int64) for numeric classes, else
        strings."""
        if self.numeric:
            return np.array(self.values, dtype=np.int64)[index]
        return np.array(self.names)[index]

    def __str__(self) -> str:
        if self.k <= 6:
            return f"{self.k} classes ({', '.join(self.names)})"
        return f"{self.k} classes ({', '.join(self.names[:3])} ... {self.names[-1]})"


BINARY = Classes(("0", "1"))  # two classes spelled 0 and 1
