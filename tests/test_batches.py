"""InMemoryBatches: batch count, contiguous order, seeded per-epoch shuffles, DataLoader use."""

import pytest
import torch
from torch.utils.data import DataLoader

from largeml.data.batches import InMemoryBatches

pytestmark = pytest.mark.unit

N, BATCH = 23, 5


def _data(n: int = N) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.arange(n, dtype=torch.float32).unsqueeze(1).repeat(1, 3)  # row i is [i, i, i]
    y = torch.arange(n, dtype=torch.float32)
    return x, y


def _rows(ds: InMemoryBatches) -> list[int]:
    """Row ids in visiting order, checking that x and y stay paired."""
    out: list[int] = []
    for i in range(len(ds)):
        xb, yb = ds[i]
        assert torch.equal(xb[:, 0], yb)
        out += yb.long().tolist()
    return out


@pytest.mark.parametrize("n, batch, expected", [(23, 5, 5), (20, 5, 4), (1, 5, 1), (5, 1, 5)])
def test_len_is_ceil(n: int, batch: int, expected: int) -> None:
    assert len(InMemoryBatches(*_data(n), batch_size=batch, shuffle=False)) == expected


def test_without_shuffle_batches_are_contiguous_slices() -> None:
    ds = InMemoryBatches(*_data(), batch_size=BATCH, shuffle=False)
    sizes = [len(ds[i][1]) for i in range(len(ds))]
    assert sizes == [5, 5, 5, 5, 3]
    assert torch.equal(ds[1][1], torch.arange(5, 10, dtype=torch.float32))
    assert _rows(ds) == list(range(N))


def test_shuffle_covers_every_row_once_per_epoch() -> None:
    ds = InMemoryBatches(*_data(), batch_size=BATCH, shuffle=True, seed=3)
    orders = []
    for epoch in range(3):
        ds.set_epoch(epoch)
        rows = _rows(ds)
        assert sorted(rows) == list(range(N))
        orders.append(rows)
    assert orders[0] != list(range(N))
    assert orders[0] != orders[1] and orders[1] != orders[2]


def test_shuffle_is_a_function_of_seed_and_epoch() -> None:
    a = InMemoryBatches(*_data(), batch_size=BATCH, shuffle=True, seed=7)
    b = InMemoryBatches(*_data(), batch_size=BATCH, shuffle=True, seed=7)
    c = InMemoryBatches(*_data(), batch_size=BATCH, shuffle=True, seed=8)
    a.set_epoch(2)
    b.set_epoch(5)
    b.set_epoch(2)  # replaying an epoch after another gives the same order
    c.set_epoch(2)
    assert _rows(a) == _rows(b)
    assert _rows(a) != _rows(c)


def test_works_with_dataloader_batch_size_none() -> None:
    ds = InMemoryBatches(*_data(), batch_size=BATCH, shuffle=True, seed=1)
    loaded = list(DataLoader(ds, batch_size=None))
    assert len(loaded) == len(ds)
    for i, (xb, yb) in enumerate(loaded):
        assert torch.equal(xb, ds[i][0]) and torch.equal(yb, ds[i][1])
    assert sorted(torch.cat([yb for _, yb in loaded]).long().tolist()) == list(range(N))


@pytest.mark.parametrize("index", [-1, 5, 100])
def test_index_out_of_range(index: int) -> None:
    ds = InMemoryBatches(*_data(), batch_size=BATCH, shuffle=False)
    with pytest.raises(IndexError):
        ds[index]
