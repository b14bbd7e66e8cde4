"""The on-disk dataset format: a directory of `.npy` shards plus `index.json`.

    dataset/
      index.json          what is below, with per-file sizes and CRC-32 checksums
      y-00000.npy         float32 (rows,): labels as written (integer class ids), or for
                          string labels (CSV) their codes: positions in the index's label_names
      x-00000.npy         dense:  float32 (rows, n_features), row-major
      indptr-00000.npy    sparse: int64 (rows + 1,), starting at 0 in every shard
      indices-00000.npy   sparse: int32 (nnz,), 0-based feature indices
      values-00000.npy    sparse: float32 (nnz,)

Every file is a plain `.npy` array (`np.load(path, mmap_mode="r")` reads it), so a shard can be
inspected without largeml. A dataset is complete exactly when `index.json` exists: the writer
fills a hidden sibling directory, `.<name>.partial-<host>-<pid>`, and renames it into place only
after the index is written and synced, so a killed conversion never leaves a directory that looks
finished. The next writer into the same place removes such leftovers once their process is gone.

Readers check each file's size and CRC-32 against the index the first time a process reads it
(`checked_path`), so a shard damaged on disk is an error naming the file, not training on wrong
rows; `verify` checks a whole directory at once (`python -m largeml.prepare verify=DIR`).
"""

import glob
import json
import logging
import os
import re
import shutil
import socket
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from largeml.errors import DataError
from largeml.files import fsync_dir
from largeml.labels import count_labels

FORMAT = "largeml-shards"
VERSION = 1
INDEX = "index.json"
LAYOUTS = ("dense", "sparse")
FILES = {"dense": ("y", "x"), "sparse": ("y", "indptr", "indices", "values")}
DTYPES = {"y": np.float32, "x": np.float32, "indptr": np.int64, "indices": np.int32,
          "values": np.float32}
SHARD_BYTES = 64 << 20

log = logging.getLogger(__name__)

# In partial directory names, so a writer can tell its own machine's leftovers, whose pids it can
# check, from those of a machine sharing the file system, whose pids it cannot.
_HOST = re.sub(r"[^A-Za-z0-9.-]+", "_", socket.gethostname()) or "localhost"


@dataclass
class Shard:
    rows: int
    nnz: int
    files: dict[str, dict[str, Any]]  # kind -> {"name", "bytes", "crc32"}


@dataclass
class ShardIndex:
    """A prepared dataset, as described by its `index.json`."""

    root: Path
    layout: str
    rows: int
    n_features: int
    nnz: int
    label_counts: dict[str, int]
    shards: list[Shard]
    source: dict[str, Any]
    label_names: list[str] | None = None  # string labels: code i stands for label_names[i]

    @property
    def stored_labels(self) -> dict[float, str]:
        """Each label value stored in the shards, and the label it stands for."""
        if self.label_names is not None:
            return {float(code): name for code, name in enumerate(self.label_names)}
        return {float(label): label for label in self.label_counts}

    def path(self, shard: Shard, kind: str) -> Path:
        return self.root / shard.files[kind]["name"]

    def checked_path(self, shard: Shard, kind: str) -> Path:
        """`path(shard, kind)`, after checking the file's size and CRC-32 against the index
        the first time this process asks (one read of the file; once per file, not per epoch).
        A damaged file is a DataError naming it and how to make it again."""
        path = self.path(shard, kind)
        stat = path.stat() if path.is_file() else None
        # Keyed by the file's identity too: a file replaced since (prepared again) is checked.
        key = (str(path.resolve()), stat and (stat.st_ino, stat.st_size, stat.st_mtime_ns))
        with _CHECKED_LOCK:
            if key in _CHECKED:
                return path
        problem = _problem(path, shard.files[kind], crc=True)
        if problem:
            raise DataError(f"{path}: {problem}: the shard is damaged; "
                            f"{remedy(self.root, self.source)}")
        with _CHECKED_LOCK:
            _CHECKED.add(key)
        return path


# The shard files this process has checked (`ShardIndex.checked_path`), by path and identity.
_CHECKED: set[tuple[str, Any]] = set()
_CHECKED_LOCK = threading.Lock()


def remedy(root: Path, source: dict[str, Any]) -> str:
    """How to make a damaged dataset again: a directory of the conversion cache (which keeps
    its lock file `.<name>.lock` beside it) is deleted so that the next run converts again;
    any other is prepared again from its source."""
    if root.with_name(f".{root.name}.lock").is_file():
        return (f"it is largeml's conversion cache of {source.get('path', 'a raw file')}: "
                f"delete {root} so that the next run converts it again")
    return (f"prepare the dataset again: python -m largeml.prepare "
            f"input={source.get('path', '...')} output={root}")


class _CrcWriter:
    """A write-only file wrapper that checksums what passes through it."""

    def __init__(self, file) -> None:
        self.file, self.crc, self.bytes = file, 0, 0

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        self.crc = zlib.crc32(view, self.crc)
        self.bytes += len(view)
        return self.file.write(view)


class ShardWriter:
    """Writes rows into a new shard directory; use as a context manager.

    Rows are buffered until a shard holds about `shard_bytes`, so memory stays bounded whatever
    the input size. On an exception the partial directory is removed.
    """

    def __init__(
        self,
        out_dir: str | Path,
        layout: str,
        n_features: int | None = None,
        shard_bytes: int = SHARD_BYTES,
        source: dict[str, Any] | None = None,
    ) -> None:
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        if layout == "dense" and not n_features:
            raise ValueError("a dense layout needs n_features up front")
        self.out_dir = Path(out_dir)
        self.layout = layout
        self.n_features = n_features
        self.shard_bytes = shard_bytes
        self.source = source or {}
        self.tmp_dir = self.out_dir.with_name(
            f".{self.out_dir.name}.partial-{_HOST}-{os.getpid()}")
        remove_stale_partials(self.out_dir.parent, self.out_dir.name)
        shutil.rmtree(self.tmp_dir, ignore_errors=True)
        self.tmp_dir.mkdir(parents=True)
        self.shards: list[Shard] = []
        self.label_counts: dict[str, int] = {}  # rows per label, as written
        # String labels: the writer of the rows sets these (code i stands for label_names[i])
        # before close(), which then counts labels by name.
        self.label_names: list[str] | None = None
        self.width = 0  # highest feature index seen + 1
        self._pending: list[tuple[np.ndarray, ...]] = []
        self._pending_bytes = 0

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            shutil.rmtree(self.tmp_dir, ignore_errors=True)

    def write_dense(self, x: np.ndarray, y: np.ndarray) -> None:
        """Appends rows: `x` float32 (n, n_features), `y` labels (integer class ids)."""
        assert self.layout == "dense" and x.shape == (len(y), self.n_features), x.shape
        self._count_labels(y)
        self._pending.append((np.ascontiguousarray(y, np.float32),
                              np.ascontiguousarray(x, np.float32)))
        self._add_pending(x.nbytes + 4 * len(y))

    def write_sparse(
        self, indptr: np.ndarray, indices: np.ndarray, values: np.ndarray, y: np.ndarray
    ) -> None:
        """Appends rows in CSR form: row i's non-zeros are `indices[indptr[i] - indptr[0] :
        indptr[i + 1] - indptr[0]]` (0-based features) and the same slice of `values`."""
        assert self.layout == "sparse" and len(indptr) == len(y) + 1
        assert len(indices) == len(values) == indptr[-1] - indptr[0]
        self._count_labels(y)
        indices = np.asarray(indices, np.int32)
        if len(indices):
            self.width = max(self.width, int(indices.max()) + 1)
        self._pending.append((np.asarray(y, np.float32), np.asarray(indptr, np.int64) - indptr[0],
                              indices, np.asarray(values, np.float32)))
        self._add_pending(8 * len(indptr) + 8 * len(indices) + 4 * len(y))

    def close(self) -> ShardIndex:
        """Writes the last shard and the index, then moves the directory into place."""
        self._flush()
        n_features = self.n_features or self.width
        if self.n_features and self.width > self.n_features:
            raise DataError(f"feature index {self.width} exceeds n_features={self.n_features}")
        counts = self.label_counts
        if self.label_names is not None:
            counts = {self.label_names[int(float(code))]: n for code, n in counts.items()}
        index = {
            "format": FORMAT,
            "version": VERSION,
            "layout": self.layout,
            "rows": sum(s.rows for s in self.shards),
            "n_features": n_features,
            "dtype": "float32",
            "nnz": sum(s.nnz for s in self.shards),
            "label_counts": counts,
            **({} if self.label_names is None else {"label_names": self.label_names}),
            "shards": [{"rows": s.rows, "nnz": s.nnz, "files": s.files} for s in self.shards],
            "source": self.source,
        }
        _write_synced(self.tmp_dir / INDEX, json.dumps(index, indent=1).encode())
        fsync_dir(self.tmp_dir)
        if self.out_dir.exists():
            shutil.rmtree(self.out_dir)
        os.replace(self.tmp_dir, self.out_dir)
        fsync_dir(self.out_dir.parent)
        return open_shards(self.out_dir)

    def _count_labels(self, y: np.ndarray) -> None:
        for label, n in count_labels(y).items():
            self.label_counts[label] = self.label_counts.get(label, 0) + n

    def _add_pending(self, nbytes: int) -> None:
        self._pending_bytes += nbytes
        if self._pending_bytes >= self.shard_bytes:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        kinds = FILES[self.layout]
        if self.layout == "dense":
            arrays = {kind: np.concatenate([p[i] for p in self._pending])
                      for i, kind in enumerate(kinds)}
        else:
            offsets = np.cumsum([0] + [int(p[1][-1]) for p in self._pending[:-1]])
            arrays = {
                "y": np.concatenate([p[0] for p in self._pending]),
                "indptr": np.concatenate(
                    [[0]] + [p[1][1:] + off for p, off in zip(self._pending, offsets, strict=True)]
                ).astype(np.int64),
                "indices": np.concatenate([p[2] for p in self._pending]),
                "values": np.concatenate([p[3] for p in self._pending]),
            }
        self._pending, self._pending_bytes = [], 0
        number = len(self.shards)
        files = {}
        for kind in kinds:
            name = f"{kind}-{number:05d}.npy"
            with open(self.tmp_dir / name, "wb") as f:
                writer = _CrcWriter(f)
                np.lib.format.write_array(writer, arrays[kind], allow_pickle=False)
                f.flush()
                os.fsync(f.fileno())
            files[kind] = {"name": name, "bytes": writer.bytes, "crc32": writer.crc}
        nnz = len(arrays["indices"]) if self.layout == "sparse" else 0
        self.shards.append(Shard(rows=len(arrays["y"]), nnz=nnz, files=files))


def open_shards(root: str | Path, verify: bool = False) -> ShardIndex:
    """Reads `root/index.json` and checks every shard file is there with the recorded size.

    With `verify`, also recomputes each file's CRC-32 (reads every byte once); readers do that
    file by file as they first read them (`ShardIndex.checked_path`).
    """
    index = _read_index(Path(root))
    for shard in index.shards:
        for kind in shard.files:
            if verify:
                index.checked_path(shard, kind)
            elif problem := _problem(index.path(shard, kind), shard.files[kind], crc=False):
                raise DataError(f"{index.path(shard, kind)}: {problem}: the shard is damaged; "
                                f"{remedy(index.root, index.source)}")
    return index


def verify(root: str | Path) -> tuple[ShardIndex, list[str]]:
    """Checks the size and CRC-32 of every file of a prepared dataset against its index:
    the dataset, and one line per damaged file (none when all are sound)."""
    index = _read_index(Path(root))
    damaged = []
    for shard in index.shards:
        for kind, info in shard.files.items():
            if problem := _problem(index.path(shard, kind), info, crc=True):
                damaged.append(f"{index.path(shard, kind)}: {problem}")
    return index, damaged


def _read_index(root: Path) -> ShardIndex:
    index_path = root / INDEX
    if not index_path.is_file():
        hint = ("a conversion was interrupted" if root.is_dir() else "no such directory")
        raise DataError(
            f"{root}: not a prepared dataset ({INDEX} missing: {hint}); "
            f"convert it with: python -m largeml.prepare input=... output={root}"
        )
    try:
        meta = json.loads(index_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(
            f"{index_path}: unreadable index ({err}); prepare the dataset again"
        ) from None
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise DataError(
            f"{index_path}: format {meta.get('format')!r} version {meta.get('version')!r}; "
            f"this largeml reads {FORMAT!r} version {VERSION}"
        )
    return ShardIndex(
        root=root,
        layout=meta["layout"],
        rows=meta["rows"],
        n_features=meta["n_features"],
        nnz=meta["nnz"],
        label_counts=meta["label_counts"],
        shards=[Shard(**s) for s in meta["shards"]],
        source=meta.get("source", {}),
        label_names=meta.get("label_names"),
    )


def _problem(path: Path, info: dict[str, Any], crc: bool) -> str | None:
    """What is wrong with one shard file against its entry in the index, or None."""
    size = path.stat().st_size if path.is_file() else None
    if size != info["bytes"]:
        found = "missing" if size is None else f"{size} bytes"
        return f"{found}, expected {info['bytes']} bytes per {INDEX}"
    if crc and _crc32(path) != info["crc32"]:
        return f"checksum mismatch (CRC-32 differs from {INDEX})"
    return None


def remove_stale_partials(parent: str | Path, name: str | None = None) -> None:
    """Removes the partial directories in `parent` (of output `name`, or of any output) left by
    writers that were killed: those named for this host and a pid that no longer exists.

    A live pid is never touched, even if it was reused by an unrelated process. Leftovers of
    other hosts (a shared file system) or of largeml versions that did not name the host are
    only pointed at, as their owner cannot be checked from here.
    """
    parent = Path(parent)
    if not parent.is_dir():
        return
    pattern = "*" if name is None else glob.escape(name)
    for partial in sorted(parent.glob(f".{pattern}.partial-*")):
        owner = re.fullmatch(r"\..+\.partial-(.+)-(\d+)", partial.name)
        if owner is None or owner[1] != _HOST:
            log.warning("%s is left from an interrupted conversion, or is one running on another "
                        "machine; delete it if no conversion into %s is running", partial, parent)
            continue
        pid = int(owner[2])
        if pid == os.getpid() or _pid_alive(pid) or not partial.is_dir() or partial.is_symlink():
            continue
        size = _tree_bytes(partial)
        shutil.rmtree(partial, ignore_errors=True)  # another writer may be removing it too
        if partial.exists():
            log.warning("%s is left from an interrupted conversion (process %d is gone) but "
                        "could not be removed; delete it by hand", partial, pid)
        else:
            log.warning("removed %s (%.1f MiB), left by an interrupted conversion (process %d "
                        "is gone)", partial, size / 2**20, pid)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # another user's process, or no pid: keep it
        return True
    return True


def _tree_bytes(root: Path) -> int:
    total = 0
    for folder, _, names in os.walk(root):
        for name in names:
            try:
                total += os.lstat(os.path.join(folder, name)).st_size
            except FileNotFoundError:
                pass
    return total


def data_offset(path: Path) -> int:
    """Byte offset of the array data in a `.npy` file (after its header)."""
    return np.load(path, mmap_mode="r").offset


def _crc32(path: Path) -> int:
    # Into one reused 1 MiB buffer, which stays in the CPU's cache; zlib lets go of the GIL.
    crc, buffer = 0, bytearray(1 << 20)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            crc = zlib.crc32(view[:n], crc)
    return crc


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
