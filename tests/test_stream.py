"""Streaming from shards: exact rows, rank × worker sharding, equal batch counts, resume."""

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from largeml.data.shards import ShardWriter
from largeml.data.stream import RowPieces, ShardStream
from largeml.errors import ConfigError

pytestmark = pytest.mark.unit

N, D = 1003, 6


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> tuple[Path, np.ndarray, np.ndarray]:
    """The same rows written dense and sparse in several small shards. Column 0 holds the row
    number + 1, so every streamed row says where it came from."""
    root = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, D)).astype(np.float32)
    x[rng.random(x.shape) < 0.5] = 0
    x[:, 0] = np.arange(N) + 1
    y = (rng.random(N) > 0.5).astype(np.float32)
    with ShardWriter(root / "dense", "dense", D, shard_bytes=5000) as writer:
        for i in range(0, N, 100):
            writer.write_dense(x[i:i + 100], y[i:i + 100])
    with ShardWriter(root / "sparse", "sparse", D, shard_bytes=3000) as writer:
        for i in range(0, N, 100):
            block = x[i:i + 100]
            nonzero = [np.flatnonzero(row) for row in block]
            indptr = np.concatenate([[0], np.cumsum([len(z) for z in nonzero])])
            writer.write_sparse(indptr, np.concatenate(nonzero),
                                np.concatenate([r[z] for r, z in zip(block, nonzero, strict=True)]),
                                y[i:i + 100])
    return root, x, y


def batches(stream: ShardStream, workers: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    for bx, by in DataLoader(stream, batch_size=None, num_workers=workers):
        out.append((bx.to_dense() if bx.layout == torch.sparse_csr else bx, by))
    return out


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("layout", ["dense", "sparse"])
def test_ranks_split_every_global_batch_equally(datasets, layout, shuffle, world_size, workers):
    """Batch k of every rank is its share of batch k of a single process: the same rows, split
    into equal disjoint parts (the last batch's last N % B % W rows aside)."""
    root, x, y = datasets
    batch = 30  # a multiple of 1, 2 and 3: the global batch

    def stream_of(rank: int, world: int) -> ShardStream:
        stream = ShardStream(root / layout, batch_size=batch, shuffle=shuffle, seed=1,
                             shuffle_blocks=4, rank=rank, world_size=world)
        stream.set_epoch(3)
        return stream

    # The same number of DataLoader workers: they interleave their own groups of blocks.
    single = [set((bx[:, 0].long() - 1).tolist()) for bx, _ in batches(stream_of(0, 1), workers)]
    ranks = [batches(stream_of(rank, world_size), workers) for rank in range(world_size)]
    for got in ranks:
        assert len(got) == len(single) == -(-N // batch)  # 1003 % 30 = 13 rows: every rank some
        for bx, by in got:
            rows = bx[:, 0].long().numpy() - 1
            assert torch.equal(bx, torch.from_numpy(x[rows]))
            assert torch.equal(by, torch.from_numpy(y[rows]))
    for k, whole in enumerate(single):
        shares = [got[k][0][:, 0].long() - 1 for got in ranks]
        assert len({len(share) for share in shares}) == 1
        together = torch.cat(shares)
        assert len(set(together.tolist())) == len(together) == len(whole) // world_size * world_size
        assert set(together.tolist()) <= whole


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_evaluation_streams_read_every_row_once(datasets, world_size):
    root, x, _ = datasets
    rows = []
    for rank in range(world_size):
        stream = ShardStream(root / "dense", batch_size=64, shuffle=False, rank=rank,
                             world_size=world_size, evaluation=True)
        rows += torch.cat([bx[:, 0] for bx, _ in batches(stream, 0)]).long().tolist()
    assert rows == list(range(1, N + 1))


def test_a_global_batch_must_split_evenly(datasets):
    root, _, _ = datasets
    with pytest.raises(ConfigError, match="data.batch_size=32 is the global batch.*multiple of 3"):
        ShardStream(root / "dense", batch_size=32, shuffle=True, rank=0, world_size=3)


@pytest.mark.parametrize("layout", ["dense", "sparse"])
def test_order_is_a_function_of_seed_and_epoch(datasets, layout):
    root, _, _ = datasets

    def order(seed: int, epoch: int) -> list[int]:
        stream = ShardStream(root / layout, batch_size=32, shuffle=True, seed=seed)
        stream.set_epoch(epoch)
        return torch.cat([bx[:, 0] for bx, _ in batches(stream, 0)]).long().tolist()

    assert order(0, 1) == order(0, 1)
    assert order(0, 1) != order(0, 2)
    assert order(0, 1) != order(1, 1)
    assert sorted(order(0, 1)) == list(range(1, N + 1))


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("layout", ["dense", "sparse"])
def test_resume_by_arithmetic_continues_the_epoch_exactly(datasets, layout, shuffle, workers):
    root, _, _ = datasets
    stream = ShardStream(root / layout, batch_size=32, shuffle=shuffle, seed=1, shuffle_blocks=4)
    stream.set_epoch(2)
    full = batches(stream, workers)
    for start in (1, 7, 8, len(full) - 1):
        stream.set_epoch(2, start_batch=start)
        rest = batches(stream, workers)
        assert len(rest) == len(full) - start
        for (ax, ay), (bx, by) in zip(full[start:], rest, strict=True):
            assert torch.equal(ax, bx) and torch.equal(ay, by)


@pytest.mark.parametrize("shuffle", [False, True])
def test_held_batches_stay_intact(datasets, shuffle):
    """A consumer may hold batches while later ones are read (gradient accumulation does):
    batch tensors are reused only once nothing refers to them."""
    root, x, y = datasets
    stream = ShardStream(root / "dense", batch_size=8, shuffle=shuffle, shuffle_blocks=2)
    held = list(stream)
    rows = torch.cat([bx[:, 0] for bx, _ in held]).long() - 1
    assert sorted(rows.tolist()) == list(range(N))
    assert torch.equal(torch.cat([bx for bx, _ in held]), torch.from_numpy(x[rows]))
    assert torch.equal(torch.cat([by for _, by in held]), torch.from_numpy(y[rows]))


def test_dense_batches_reuse_their_tensors_once_dropped(datasets):
    root, _, _ = datasets
    stream = ShardStream(root / "dense", batch_size=8, shuffle=True, shuffle_blocks=4)
    storages = {bx.untyped_storage().data_ptr() for bx, _ in stream}
    assert len(storages) <= 6 < len(stream)


@pytest.mark.parametrize("layout", ["dense", "sparse"])
def test_a_batch_mixes_every_block_of_its_group(datasets, layout):
    """With shuffle, a batch is one chunk of each block of its group: rows of 4 blocks, in runs
    of batch_size / 4 consecutive rows, not one block's consecutive rows."""
    root, _, _ = datasets
    stream = ShardStream(root / layout, batch_size=32, shuffle=True, shuffle_blocks=4)
    first_group = {int(b) for b in stream.block_order()[:4]}
    for bx, _ in batches(stream, 0)[:4]:
        rows = bx[:, 0].long() - 1
        assert {int(r) // 32 for r in rows} == first_group
        assert len(rows) == 32 and (rows.diff() != 1).sum() <= 4 + 3  # a run may wrap a block


@pytest.mark.parametrize("shuffle", [False, True])
def test_batches_in_place_are_the_batches_read(datasets, shuffle):
    """With `in_place`, a sparse stream yields each batch as RowPieces, where its rows lie in
    the shards: the same rows in the same order as the CSR batch read for it, the same labels,
    across shard boundaries and from a resumed position."""
    root, _, _ = datasets
    stream = ShardStream(root / "sparse", batch_size=32, shuffle=shuffle, seed=1, shuffle_blocks=4)
    stream.set_epoch(3)
    read = list(stream)
    stream.in_place = True
    for start in (0, 5):
        stream.set_epoch(3, start_batch=start)
        placed = list(stream)
        assert len(placed) == len(read) - start
        for (x, y), (pieces, labels) in zip(read[start:], placed, strict=True):
            assert isinstance(pieces, RowPieces) and pieces.shape == tuple(x.shape)
            assert pieces.to("cpu") is pieces
            assert torch.equal(pieces.csr().to_dense(), x.to_dense())
            assert torch.equal(labels, y)
    shards = {int(shard) for pieces, _ in placed for shard in pieces.pieces[:, 0]}
    assert len(shards) > 1  # the rows of one batch come from several shards
    assert any(len({int(s) for s in pieces.pieces[:, 0]}) > 1 for pieces, _ in placed)
