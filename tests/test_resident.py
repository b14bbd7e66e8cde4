"""`data.resident=true`: the rank's rows held on the device, batched exactly as streamed."""

import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_dense_shards
from torch import Tensor

from largeml.checkpoint import load_checkpoint
from largeml.data.resident import ResidentStream
from largeml.data.shards import ShardWriter
from largeml.data.sources import files
from largeml.data.stream import ShardStream
from largeml.errors import ConfigError
from largeml.train import run

pytestmark = pytest.mark.unit

N, D = 1003, 5
SETTINGS = {"batch_size": 32, "seed": 3, "shuffle_blocks": 4}

Batches = list[tuple[Tensor, Tensor]]


@pytest.fixture(scope="module")
def dense(tmp_path_factory) -> Path:
    return write_dense_shards(tmp_path_factory.mktemp("shards") / "dense", N, D)


def streamed(stream: ShardStream) -> Batches:
    # The stream reuses a batch's tensors once it is dropped: keep copies.
    return [(x.clone(), y.clone()) for x, y in stream]


def resident_twin(root: Path, **settings) -> ResidentStream:
    resident = ResidentStream(ShardStream(root, **settings))
    resident.to_device(torch.device("cpu"))
    return resident


def assert_same(got: Batches, expected: Batches) -> None:
    assert len(got) == len(expected)
    for (gx, gy), (ex, ey) in zip(got, expected, strict=True):
        assert torch.equal(gx, ex) and torch.equal(gy, ey)


@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("shuffle", [False, True])
def test_resident_batches_are_the_streamed_batches(dense, shuffle, world_size):
    rows = 0
    for rank in range(world_size):
        settings = {**SETTINGS, "shuffle": shuffle, "rank": rank, "world_size": world_size}
        stream, resident = ShardStream(dense, **settings), resident_twin(dense, **settings)
        for epoch in range(3):
            stream.set_epoch(epoch)
            resident.set_epoch(epoch)
            got = list(resident)
            assert_same(got, streamed(stream))
            assert len(got) == len(resident) == -(-N // 32)
        rows += sum(len(y) for _, y in got)
    assert rows == N // 32 * 32 + N % 32 // world_size * world_size


@pytest.mark.parametrize("shuffle", [False, True])
def test_resume_by_arithmetic_matches_streaming(dense, shuffle):
    stream = ShardStream(dense, shuffle=shuffle, **SETTINGS)
    resident = resident_twin(dense, shuffle=shuffle, **SETTINGS)
    resident.set_epoch(2)
    full = list(resident)
    for start in (1, 7, 8, len(full) - 1):
        stream.set_epoch(2, start_batch=start)
        resident.set_epoch(2, start_batch=start)
        rest = list(resident)
        assert_same(rest, full[start:])
        assert_same(rest, streamed(stream))


def test_no_file_is_read_after_loading(dense, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(dense, copy)
    resident = resident_twin(copy, shuffle=True, **SETTINGS)
    shutil.rmtree(copy)
    for epoch in range(2):
        resident.set_epoch(epoch)
        assert sum(len(y) for _, y in resident) == N


def test_batches_need_a_device_first(dense):
    with pytest.raises(RuntimeError, match="to_device"):
        next(iter(ResidentStream(ShardStream(dense, shuffle=False, **SETTINGS))))


def test_resident_run_trains_exactly_like_streaming(compose_config, tmp_path, dense, caplog):
    caplog.set_level("INFO")

    def train(resident: str) -> tuple[dict[str, float], dict[str, Tensor]]:
        run_dir = tmp_path / f"resident-{resident}"
        cfg = compose_config("data=files", f"data.train_path={dense}", f"data.val_path={dense}",
                             "data.batch_size=32", "data.shuffle_blocks=4",
                             f"data.resident={resident}", "trainer.max_epochs=2",
                             "trainer.device=cpu", "trainer.num_threads=1", "optimizer=sgd",
                             "trainer.tol=0")
        metrics = run(cfg, run_dir)
        return metrics, load_checkpoint(run_dir / "checkpoints" / "last.pt")["model"]

    streamed_metrics, streamed_weights = train("false")
    assert "resident" not in caplog.text
    resident_metrics, resident_weights = train("true")
    assert "data resident on cpu" in caplog.text
    for name, weight in streamed_weights.items():
        assert torch.equal(resident_weights[name], weight), name
    for key in ("val/loss", "val/accuracy", "val/auc", "train/loss", "step", "epoch"):
        assert resident_metrics[key] == streamed_metrics[key], key
    assert resident_metrics["step"] == 2 * 32 and resident_metrics["val/accuracy"] > 0.8


def test_resident_module_reads_ahead_with_no_thread(dense):
    """A resident module's batches are cut from memory in the training thread: iterating it
    starts no thread (the streamed module starts its reader thread, so the check can see one)
    and yields the streamed batches; so the Trainer leaves no core to a reader."""
    settings = {"batch_size": 32, "shuffle_blocks": 4, "seed": 3}
    streaming = files(str(dense), **settings)
    resident = files(str(dense), resident=True, **settings)
    resident.train.to_device(torch.device("cpu"))

    def batches_and_threads_started(dataset) -> tuple[Batches, set[threading.Thread]]:
        before, started, batches = set(threading.enumerate()), set(), []
        for x, y in dataset:
            started |= set(threading.enumerate()) - before
            batches.append((x.clone(), y.clone()))
        return batches, started

    streamed_batches, reader = batches_and_threads_started(streaming.train)
    resident_batches, started = batches_and_threads_started(resident.train)
    assert reader, "the streamed module started no reader thread"
    assert not started, f"the resident module started {started}"
    assert_same(resident_batches, streamed_batches)
    assert (resident.reader_threads, streaming.reader_threads) == (0, 1)


def test_sparse_data_cannot_be_resident(compose_config, tmp_path):
    with ShardWriter(tmp_path / "sparse", "sparse") as writer:
        writer.write_sparse(np.array([0, 1, 2]), np.array([0, 3]), np.array([1.0, 2.0]),
                            np.array([0.0, 1.0]))
    cfg = compose_config("data=files", f"data.train_path={tmp_path / 'sparse'}",
                         "data.resident=true")
    with pytest.raises(ConfigError, match=r"data.resident=true holds dense data only, but "
                                          r".*sparse holds sparse shards; set data.resident=false"):
        run(cfg, tmp_path / "run")


@pytest.mark.parametrize("settings, message", [
    ({"resident": "auto"}, "data.resident must be true or false, got 'auto'"),
    ({"resident": True, "num_workers": 2}, "takes no DataLoader workers; set data.num_workers=0"),
])
def test_bad_resident_settings_name_the_key(dense, settings, message):
    with pytest.raises(ConfigError, match=message):
        files(str(dense), **settings)
