"""The hashing trick (`data.hash_bits=N`): LIBSVM feature ids, or categorical values, into 2^N
columns.

Feature id i, the 1-based integer as written in the file, is hashed with splitmix64's output
function (Steele, Lea and Flood 2014; the `SplittableRandom` mixer), in uint64 arithmetic:

    z = i + 0x9E3779B97F4A7C15
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB
    h = z ^ (z >> 31)

and goes to column h & (2^N − 1) (0-based), its value multiplied by +1 if bit 63 of h is 0,
else by −1. The sign is from a bit the column does not use, so two ids that share a column get
independent signs and their cross terms in an inner product cancel in expectation (Weinberger
et al. 2009; Vowpal Wabbit and scikit-learn's FeatureHasher do the same).

A row's entries that land in one column are summed into one entry (as FeatureHasher does), and
one that sums to exactly zero is dropped: the shards never hold a column twice in a row, so
every consumer (the diagonal preconditioner's Σ x², `data.scale=maxabs`'s max |x|) sees the
hashed feature's value, not its parts.

Categorical columns (`data.categorical_columns`, CSV and Parquet) are hashed by text, not by
id: value v of column `country` goes to bucket `category_columns("country", [v], N)`, the low N
bits of BLAKE2b-64 of `country=v`, with value +1 (one-hot; no sign, as an indicator needs
none), and its column is placed after the numeric columns.
"""

from hashlib import blake2b

import numpy as np

from largeml.errors import ConfigError, DataError

MAX_BITS = 31  # columns are int32
FLOAT32_MAX = float(np.finfo(np.float32).max)  # values are stored as float32
_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_MUL1 = np.uint64(0xBF58476D1CE4E5B9)
_MUL2 = np.uint64(0x94D049BB133111EB)


def check(hash_bits: object, key: str = "hash_bits") -> None:
    """Raises a ConfigError naming `key` unless `hash_bits` is null or an integer in [1, 31]."""
    if hash_bits is None:
        return
    if isinstance(hash_bits, bool) or not isinstance(hash_bits, int) \
            or not 1 <= hash_bits <= MAX_BITS:
        raise ConfigError(f"{key} must be null or an integer from 1 to {MAX_BITS} (2^N columns: "
                          f"{key}=20 gives 1,048,576), got {hash_bits!r}")


def splitmix64(ids: np.ndarray) -> np.ndarray:
    """The 64-bit hash of each integer in `ids` (uint64 arithmetic, wrapping)."""
    z = ids.astype(np.uint64) + _GAMMA
    z = (z ^ (z >> np.uint64(30))) * _MUL1
    z = (z ^ (z >> np.uint64(27))) * _MUL2
    return z ^ (z >> np.uint64(31))


def signed_columns(ids: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """(0-based int32 columns in [0, 2^bits), float32 signs ±1) of 1-based feature `ids`."""
    h = splitmix64(ids)
    columns = (h & np.uint64((1 << bits) - 1)).astype(np.int32)
    signs = np.where((h >> np.uint64(63)) == 0, np.float32(1), np.float32(-1))
    return columns, signs


def hash_rows(indptr: np.ndarray, indices: np.ndarray, values: np.ndarray, bits: int,
              where: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CSR rows with 0-based `indices` (id − 1) as hashed CSR rows: columns sorted within each
    row, one entry per column. `where` names the rows in an error."""
    n_rows = len(indptr) - 1
    columns, signs = signed_columns(indices.astype(np.int64) + 1, bits)
    rows = np.repeat(np.arange(n_rows, dtype=np.int64), np.diff(indptr))
    return summed_rows(rows, columns, values.astype(np.float64) * signs, n_rows, where)


def summed_rows(rows: np.ndarray, columns: np.ndarray, values: np.ndarray, n_rows: int,
                where: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Entries (row, column, value), in any order, as CSR rows: columns sorted within each
    row, the entries a row has in one column summed into one, and sums of exactly 0 dropped."""
    key = (rows.astype(np.int64) << np.int64(32)) | columns  # row-major order, then by column
    order = np.argsort(key, kind="stable")
    key = key[order]
    firsts = np.flatnonzero(np.diff(key, prepend=np.int64(-1)) != 0)
    sums = np.add.reduceat(np.asarray(values, np.float64)[order], firsts) \
        if len(key) else np.zeros(0)
    if (np.abs(sums) > FLOAT32_MAX).any():
        raise DataError(f"{where}: values that hash into one column of a row sum to "
                        f"{sums[np.abs(sums) > FLOAT32_MAX][0]:g}, beyond float32")
    kept = sums != 0
    key, sums = key[firsts][kept], sums[kept]
    counts = np.bincount(key >> np.int64(32), minlength=n_rows)
    return (np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
            (key & np.int64(0xFFFFFFFF)).astype(np.int32), sums.astype(np.float32))


def category_columns(field: str, values: list[str], bits: int) -> np.ndarray:
    """The bucket in [0, 2^bits) of each value of categorical column `field`: the low `bits`
    bits of the first 8 bytes (little-endian) of BLAKE2b-64 of the UTF-8 text `field=value`
    (so `country=FR` and `device=FR` are different features). int64."""
    mask = (1 << bits) - 1
    return np.array([int.from_bytes(blake2b(f"{field}={value}".encode(), digest_size=8)
                                    .digest(), "little") & mask for value in values],
                    dtype=np.int64)


def suggested_bits(distinct: int, available_bytes: int, bytes_per_feature: int) -> int:
    """A hash_bits to suggest for at most `distinct` feature ids: 2^N ≥ 16 × distinct, so about
    one id in 16 shares its column (at least 18 bits, Vowpal Wabbit's default), but no more
    columns than fit in half of `available_bytes`."""
    bits = max(18, int(np.ceil(np.log2(max(16 * distinct, 2)))))
    fits = int(np.floor(np.log2(max(available_bytes // 2 // bytes_per_feature, 2))))
    return max(1, min(bits, fits, MAX_BITS))
