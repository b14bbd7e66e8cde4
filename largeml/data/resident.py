"""A shard dataset held whole on the training device (`data.resident=true`).

`ResidentStream` yields exactly the batches its `ShardStream` would stream, the same rows in the
same order (a pure function of seed and epoch, with the same resume by `set_epoch(epoch,
start_batch)`), because it takes each batch's runs of rows from the stream's own plan. It cuts
them out of one copy of the stream's rows and labels that the Trainer places on its device once,
before training (for training that is every row, as a rank's share of a global batch can come
from anywhere; for evaluation, the rank's share of the rows): from then on no file is read and
nothing is copied to the device. Dense data only: a sparse batch would have to be re-assembled
from slices of the CSR arrays.
"""

from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import IterableDataset

from largeml.data.stream import Batch, ShardStream
from largeml.errors import ConfigError


class ResidentStream(IterableDataset):
    def __init__(self, stream: ShardStream) -> None:
        if stream.sparse:
            raise ConfigError(
                f"data.resident=true holds dense data only, but {stream.index.root} holds sparse "
                "shards; set data.resident=false to stream them"
            )
        self.stream = stream
        self.n_rows = stream.n_rows
        self.nbytes = stream.n_rows * (stream.n_features + 1) * 4  # float32 rows and labels
        self.x: Tensor | None = None
        self.y: Tensor | None = None

    def __len__(self) -> int:
        return len(self.stream)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.stream.set_epoch(epoch, start_batch)

    def to_device(self, device: torch.device) -> None:
        """Reads the stream's rows and labels into tensors on `device`, one shard piece at a time,
        so host memory holds at most one piece beside them."""
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            if self.nbytes > free:
                raise ConfigError(
                    f"data.resident=true: the rows and labels take "
                    f"{self.nbytes / 2**30:.2f} GiB but {device} has {free / 2**30:.2f} GiB "
                    "free; set data.resident=false to stream them"
                )
        stream, index = self.stream, self.stream.index
        x = torch.empty(stream.n_rows, stream.n_features, device=device)
        y = torch.empty(stream.n_rows, device=device)
        row = 0
        for shard, lo, hi in stream.pieces(0, stream.n_rows):
            for kind, out in (("x", x), ("y", y)):
                path = index.checked_path(index.shards[shard], kind)  # size, CRC-32: once
                piece = np.load(path, mmap_mode="r")[lo:hi]
                out[row:row + hi - lo] = torch.from_numpy(np.array(piece))
            row += hi - lo
        self.x, self.y = x, (y if stream.label_map is None else stream.label_map(y))

    def __iter__(self) -> Iterator[Batch]:
        if self.x is None or self.y is None:
            raise RuntimeError("ResidentStream: call to_device(device) before iterating")
        # One lane: the whole epoch in batch order, from start_batch on, as ShardStream
        # serves it to a DataLoader without workers. A batch of one run is a view, no copy.
        for runs in self.stream.lane_runs(0, 1):
            if len(runs) == 1:
                (first, rows), = runs
                yield self.x[first:first + rows], self.y[first:first + rows]
            else:
                yield (torch.cat([self.x[first:first + rows] for first, rows in runs]),
                       torch.cat([self.y[first:first + rows] for first, rows in runs]))
