"""Batches streamed from a shard directory, in contiguous runs of rows, with bounded memory.

The order of an epoch is a pure function of (seed, epoch):

1. The rows are cut into blocks of `batch_size` consecutive rows (the last may be shorter). With
   `shuffle`, the block order is permuted.
2. Under torchrun, `batch_size` is the global batch and rank r of W reads its share of every
   batch (`rank_share`: batch_size / W rows), so every rank has the same number of batches of
   the same size by construction, and the batches are the same whatever W is. An evaluation
   stream (`evaluation=True`) instead reads the rank's contiguous share of the rows: every row
   once over all ranks.
3. DataLoader workers take every n-th block of that order (see `lane` below) and mix them in
   groups of `shuffle_blocks` blocks, one batch per block: with `shuffle`, each block of the
   group is rotated by a random offset and cut into as many chunks as the group has blocks, and
   batch k takes one chunk (a random one) of every block. So a batch holds rows from all over
   the group, and is read chunk by chunk with `preadv` straight into the batch: no buffer, no
   per-row work, one pass over the bytes (for CSR rows too: a chunk's non-zeros are contiguous).
   Rows within a chunk (batch_size / shuffle_blocks consecutive rows) stay together; the chunks
   move each epoch. The order thus depends on (seed, epoch, number of workers).

So every rank yields the same number of batches per epoch, and the position in an epoch is just
the number of batches done: `set_epoch(epoch, start_batch=k)` skips the first k by arithmetic.

Batches are prepared by a thread one ahead of the consumer (`preadv` and torch ops release the
GIL), so reading overlaps training. Or, with `in_place` (which the Trainer sets for a learner
that reads CSR rows one at a time on the CPU: FTRL's compiled loop), nothing is read: a batch is
`RowPieces`, where its rows lie in the shards' memory maps, and the learner reads them there.

Why chunks and not a row permutation for dense data: on a 2-core VM a random gather of 4096 rows
out of a 32 MiB buffer ran at ~5 GB/s, a third of one streaming read, and writing the buffer
first cost a second pass; chunks cost neither.
"""

import bisect
import os
import warnings
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import IterableDataset, get_worker_info

from largeml.data.batches import check_batch_size, eval_share, global_batches, rank_share
from largeml.data.shards import ShardIndex, data_offset, open_shards
from largeml.labels import Classes

Batch = tuple[Tensor, Tensor]
Runs = list[tuple[int, int]]  # (first row, rows) runs of a batch, rows counted within the slice
PREFETCH = 1  # batches read ahead of the consumer (2 was no faster on 2 cores)


class ShardStream(IterableDataset):
    def __init__(
        self,
        root: str | Path | ShardIndex,
        batch_size: int,
        shuffle: bool,
        seed: int = 0,
        shuffle_blocks: int = 16,
        rank: int = 0,
        world_size: int = 1,
        n_features: int | None = None,
        evaluation: bool = False,
        classes: Classes | None = None,
    ) -> None:
        """`n_features` widens sparse batches beyond the data's own width, e.g. to the width of
        the training set when a validation set lacks its last features. With `classes` (the
        training set's), labels come as class indices; without, as written."""
        self.index = root if isinstance(root, ShardIndex) else open_shards(root)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.sparse = self.index.layout == "sparse"
        self.shuffle_blocks = max(1, shuffle_blocks)
        self.rank, self.world_size = (0, 1) if evaluation else (rank, world_size)
        # The rows this stream reads from: the rank's share for evaluation, else all of them.
        lo, hi = (eval_share(self.index.rows, rank, world_size) if evaluation
                  else (0, self.index.rows))
        self.first_row, self.n_rows = lo, hi - lo
        if self.n_rows < self.world_size:
            raise ValueError(f"{self.index.root}: {self.index.rows} rows for {world_size} ranks")
        check_batch_size(batch_size, self.world_size)
        self.n_features = max(n_features or 0, self.index.n_features)
        self.n_blocks = global_batches(self.n_rows, batch_size, self.world_size)
        self.shard_starts = np.cumsum([0] + [s.rows for s in self.index.shards]).tolist()
        self.epoch, self.start_batch = 0, 0
        self.classes = classes
        self.label_map = None if classes is None else classes.label_map(self.index.stored_labels)
        # Batches as RowPieces, read in place (sparse shards, in this process; see the module
        # docstring), and the memory maps they read, opened on the first such epoch.
        self.in_place = False
        self.maps: ShardMaps | None = None

    def __len__(self) -> int:
        return self.n_blocks

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def block_order(self) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.n_blocks)
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.n_blocks)

    def block_rows(self, block: int) -> int:
        return min(self.batch_size, self.n_rows - int(block) * self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        if self.in_place and self.sparse and info is None:
            yield from self.batches_in_place()
            return
        worker, n_workers = (0, 1) if info is None else (info.id, info.num_workers)
        # A DataLoader takes batches from its workers round-robin, starting with worker 0, also
        # when resuming. So batch k of the epoch is served by lane k % n_workers, and this worker
        # serves the lane that makes its first batch number start_batch; the lane, not the
        # worker, seeds the shuffle, so a resumed epoch continues exactly.
        lane = (worker + self.start_batch) % n_workers
        # In a DataLoader worker each batch is pickled into shared memory anyway: batches get
        # their own tensors there instead of reused ones (see _DenseReader).
        reader = _SparseReader(self) if self.sparse else _DenseReader(self, reuse=info is None)
        # Each item reads the next batch; planned a group at a time as the epoch goes, not all
        # at its start (an epoch of a large set has millions of batches).
        work = (partial(self._read, reader, runs) for runs in self.lane_runs(lane, n_workers))
        pool = ThreadPoolExecutor(max_workers=1)
        pending: deque[Future[Batch]] = deque()
        try:
            for item in work:
                pending.append(pool.submit(item))
                if len(pending) > PREFETCH:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()
            pool.shutdown(wait=True)
            reader.close()

    def _read(self, reader: "_DenseReader | _SparseReader", runs: Runs) -> Batch:
        x, y = reader.batch(runs)
        return x, (y if self.label_map is None else self.label_map(y))

    def batches_in_place(self) -> Iterator[tuple["RowPieces", Tensor]]:
        """This epoch's batches (one lane: all of them, from start_batch on) as RowPieces, with
        their labels (the only bytes copied: 4 a row)."""
        if self.maps is None:
            self.maps = ShardMaps(self.index)
        for runs in self.lane_runs(0, 1):
            pieces = np.array([piece for first, rows in runs for piece in self.pieces(first, rows)],
                              np.int64).reshape(-1, 3)
            y = torch.from_numpy(np.concatenate([self.maps.y[shard][lo:hi]
                                                 for shard, lo, hi in pieces]))
            yield (RowPieces(pieces, self.maps, self.n_features),
                   y if self.label_map is None else self.label_map(y))

    def lane_runs(self, lane: int, n_workers: int) -> Iterator[Runs]:
        """The runs of each batch that lane `lane` of `n_workers` serves this epoch, from its
        first batch at or after `start_batch` on. With one lane: every batch of the epoch, in
        order, which is how `ResidentStream` cuts the same batches from memory."""
        blocks = self.block_order()[lane::n_workers]
        skip = max(0, -(-(self.start_batch - lane) // n_workers))
        for group_start in range(0, len(blocks), self.shuffle_blocks):
            group = blocks[group_start:group_start + self.shuffle_blocks]
            if skip >= len(group):
                skip -= len(group)
                continue
            rng = (np.random.default_rng([self.seed, self.epoch, lane, group_start])
                   if self.shuffle else None)
            for runs in self.plan(group, rng)[skip:]:
                yield self.share(runs)
            skip = 0

    def plan(self, group: np.ndarray, rng: np.random.Generator | None) -> list[Runs]:
        """The batches of a group of blocks (one per block), each as runs of rows.

        Without shuffling, batch k is block k. With shuffling, each block is rotated by a random
        offset and cut into len(group) chunks, and batch k is one chunk of every block (a random
        one per block), cut to batch_size rows."""
        size = self.batch_size
        if rng is None:
            return [[(int(block) * size, self.block_rows(block))] for block in group]
        n = len(group)
        slots: list[Runs] = [[] for _ in range(n)]
        for block in group:
            first, rows = int(block) * size, self.block_rows(block)
            offset = int(rng.integers(rows))
            for chunk, slot in enumerate(rng.permutation(n)):
                lo, hi = chunk * rows // n + offset, (chunk + 1) * rows // n + offset
                if lo >= rows:
                    slots[slot].append((first + lo - rows, hi - lo))
                elif hi > rows:  # the chunk wraps around the end of the block
                    slots[slot] += [(first + lo, rows - lo), (first, hi - rows)]
                elif hi > lo:
                    slots[slot].append((first + lo, hi - lo))
        batches: list[Runs] = [[]]
        room = size
        for first, rows in (run for slot in slots for run in slot):
            while rows:
                if room == 0:
                    batches.append([])
                    room = size
                take = min(rows, room)
                batches[-1].append((first, take))
                first, rows, room = first + take, rows - take, room - take
        return batches

    def share(self, runs: Runs) -> Runs:
        """This rank's share of a global batch's runs."""
        if self.world_size == 1:
            return runs
        lo, hi = rank_share(sum(rows for _, rows in runs), self.rank, self.world_size)
        out, at = [], 0
        for first, rows in runs:
            a, b = max(lo, at), min(hi, at + rows)
            if a < b:
                out.append((first + a - at, b - a))
            at += rows
        return out

    def pieces(self, first: int, rows: int) -> list[tuple[int, int, int]]:
        """The (shard number, first row, end row) pieces, within shards, of rows
        [first, first + rows) of this rank's slice."""
        lo = self.first_row + first
        hi = lo + rows
        out = []
        while lo < hi:
            shard = bisect.bisect_right(self.shard_starts, lo) - 1
            end = min(hi, self.shard_starts[shard + 1])
            out.append((shard, lo - self.shard_starts[shard], end - self.shard_starts[shard]))
            lo = end
        return out


class _Files:
    """Open file descriptors and data offsets of the shard files one reader uses."""

    def __init__(self, index: ShardIndex) -> None:
        self.index = index
        self.open: dict[tuple[int, str], tuple[int, int]] = {}

    def get(self, shard: int, kind: str) -> tuple[int, int]:
        key = (shard, kind)
        if key not in self.open:
            # Size and CRC-32 checked against the index before the first read of the file.
            path = self.index.checked_path(self.index.shards[shard], kind)
            self.open[key] = (os.open(path, os.O_RDONLY), data_offset(path))
        return self.open[key]

    def pread(self, shard: int, kind: str, out: np.ndarray, first: int) -> None:
        """Fills `out` with elements starting at element `first` of the file's array (elements
        of a row of a 2-D array count as one: `first` is in units of out's rows)."""
        fd, offset = self.get(shard, kind)
        view = memoryview(out).cast("B")
        row_bytes = out.nbytes // max(len(out), 1)
        position, done = offset + first * row_bytes, 0
        while done < len(view):
            n = os.preadv(fd, [view[done:]], position + done)
            if n == 0:
                raise OSError(f"{self.index.path(self.index.shards[shard], kind)}: unexpected end")
            done += n

    def close(self) -> None:
        for fd, _ in self.open.values():
            os.close(fd)
        self.open.clear()


class _DenseReader:
    """Reads each batch's runs straight into a (rows, n_features) tensor and its labels.

    The tensors are reused once the consumer has dropped every reference to a batch (counted on
    its storage), so in steady state nothing is allocated and the few batches in flight stay in
    the CPU's cache for the training step that reads them next."""

    KEEP = 2 * PREFETCH + 2  # reusable batch tensors kept

    def __init__(self, stream: ShardStream, reuse: bool = True) -> None:
        self.stream = stream
        self.files = _Files(stream.index)
        self.reuse = reuse
        self.kept: list[tuple[Tensor, Tensor, int]] = []

    def tensors(self) -> tuple[Tensor, Tensor]:
        size, width = self.stream.batch_size, self.stream.n_features
        if not self.reuse:
            return torch.empty(size, width), torch.empty(size)
        for x, y, users in self.kept:
            if _users(x) == users and _users(y) == users:
                return x, y
        x, y = torch.empty(size, width), torch.empty(size)
        self.kept = [*self.kept[1 - self.KEEP:], (x, y, _users(x))]
        return x, y

    def batch(self, runs: Runs) -> Batch:
        x, y = self.tensors()
        xs, ys, row = x.numpy(), y.numpy(), 0
        for first, rows in runs:
            for shard, lo, hi in self.stream.pieces(first, rows):
                self.files.pread(shard, "x", xs[row:row + hi - lo], lo)
                self.files.pread(shard, "y", ys[row:row + hi - lo], lo)
                row += hi - lo
        return x[:row], y[:row]

    def close(self) -> None:
        self.files.close()


def _users(t: Tensor) -> int:
    """How many tensors share t's storage (t and its views), plus this call's own reference."""
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata)


class _SparseReader:
    """Reads each batch's runs of CSR rows: a run's non-zeros are one contiguous slice of the
    shard's `indices` and `values`, so a batch is a few preadv calls and no gather. Yields
    `torch.sparse_csr_tensor` batches of shape (rows, n_features) with int32 row pointers and
    column indices; memory follows the batch's non-zeros."""

    def __init__(self, stream: ShardStream) -> None:
        self.stream = stream
        self.files = _Files(stream.index)

    def batch(self, runs: Runs) -> Batch:
        # Row pointers first, so the non-zeros of all pieces are read straight into one array.
        pieces = [piece for first, rows in runs for piece in self.stream.pieces(first, rows)]
        pointers = []
        for shard, lo, hi in pieces:
            pointers.append(np.empty(hi - lo + 1, np.int64))
            self.files.pread(shard, "indptr", pointers[-1], lo)
        crow = np.zeros(1 + sum(len(ptr) - 1 for ptr in pointers), np.int64)
        nnz = int(sum(ptr[-1] - ptr[0] for ptr in pointers))
        indices, values = np.empty(nnz, np.int32), np.empty(nnz, np.float32)
        y = np.empty(len(crow) - 1, np.float32)
        row = at = 0
        for (shard, lo, hi), ptr in zip(pieces, pointers, strict=True):
            n = int(ptr[-1] - ptr[0])
            self.files.pread(shard, "indices", indices[at:at + n], int(ptr[0]))
            self.files.pread(shard, "values", values[at:at + n], int(ptr[0]))
            self.files.pread(shard, "y", y[row:row + hi - lo], lo)
            crow[row + 1:row + hi - lo + 1] = ptr[1:] - ptr[0] + at
            row, at = row + hi - lo, at + n
        return _csr(crow, indices, values, self.stream.n_features), torch.from_numpy(y)

    def close(self) -> None:
        self.files.close()


def _csr(crow: np.ndarray, indices: np.ndarray, values: np.ndarray, n_features: int) -> Tensor:
    """A CSR batch of shards' rows: row pointers `crow` (from 0), their column indices and
    values, `n_features` wide."""
    # int32 row pointers to match the int32 column indices (a batch holds < 2^31 non-zeros).
    # Indices were range-checked when the shards were written, and the files' checksums when
    # first read (so a damaged byte is not an index); re-checking every batch would cost a pass
    # over it. PyTorch warns that CSR support is "beta" at each build.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(torch.from_numpy(crow.astype(np.int32)),
                                       torch.from_numpy(indices), torch.from_numpy(values),
                                       size=(len(crow) - 1, n_features), check_invariants=False)


class ShardMaps:
    """The sparse shards' arrays, memory-mapped read-only (each file's size and CRC-32 checked
    first, as for any read): `indptr[s]`, `indices[s]`, `values[s]`, `y[s]` of shard s. Their
    pages are the page cache's, shared and reclaimable: nothing is held in this process's own
    memory. (largeml never writes into a finished shard directory: it removes one and renames
    a new one into place, and a removed file stays whole for the maps that hold it. A shard
    cut short by hand while mapped ends the process with SIGBUS, as for any memory map; the
    last checkpoint stays intact.) `compiled` is free for `largeml.kernels` to keep its own
    view of them in."""

    def __init__(self, index: ShardIndex) -> None:
        def mapped(kind: str) -> list[np.ndarray]:
            return [np.asarray(np.load(index.checked_path(shard, kind), mmap_mode="r"))
                    for shard in index.shards]
        self.indptr, self.indices, self.values, self.y = (
            mapped(kind) for kind in ("indptr", "indices", "values", "y"))
        self.compiled: object = None


class RowPieces:
    """A batch of CSR rows where they lie in a stream's shards: rows [first, end) of shard s for
    each (s, first, end) row of `pieces`, in that order, in `maps` (`ShardMaps`). What
    `ShardStream.in_place` yields in place of a CSR tensor: for a learner that reads the rows
    itself (`largeml.kernels.ftrl_pieces`). `csr()` builds the very CSR tensor the stream
    would have read; `to(device)` is this batch on the CPU, its CSR tensor on another."""

    layout = "row pieces"

    def __init__(self, pieces: np.ndarray, maps: ShardMaps, n_features: int) -> None:
        self.pieces, self.maps = pieces, maps
        self.shape = (int((pieces[:, 2] - pieces[:, 1]).sum()), n_features)

    def __len__(self) -> int:
        return self.shape[0]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "RowPieces | Tensor":
        if torch.device(device).type == "cpu":
            return self
        return self.csr().to(device, non_blocking=non_blocking)

    def csr(self) -> Tensor:
        m = self.maps
        ptrs = [m.indptr[s][lo:hi + 1] for s, lo, hi in self.pieces]
        nnz = np.cumsum([0] + [int(p[-1] - p[0]) for p in ptrs])
        crow = np.concatenate([[0]] + [p[1:] - p[0] + at
                                       for p, at in zip(ptrs, nnz[:-1], strict=True)])
        cols = [m.indices[s][p[0]:p[-1]] for (s, _, _), p in zip(self.pieces, ptrs, strict=True)]
        vals = [m.values[s][p[0]:p[-1]] for (s, _, _), p in zip(self.pieces, ptrs, strict=True)]
        return _csr(crow, np.concatenate(cols), np.concatenate(vals), self.shape[1])
