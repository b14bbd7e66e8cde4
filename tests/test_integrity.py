"""Shard files checked against their index (size and CRC-32) before their rows are used.

A byte damaged on disk used to train to the end on wrong values (exit 0), or, in `indices`,
to die mid-epoch with `IndexError: index out of range in self`. Now every reader checks each
file the first time its process reads it, and `python -m largeml.prepare verify=DIR` checks a
whole directory.
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, STREAMING, run_cli, write_dense_shards, write_sparse_shards

from largeml.data import shards
from largeml.data.resident import ResidentStream
from largeml.data.shards import open_shards
from largeml.data.stream import ShardStream
from largeml.errors import DataError

# One short epoch: the check comes before any step, so a damaged set never gets that far.
TRAIN = ["trainer.max_epochs=1", "trainer.log_every_n_steps=5", "data.batch_size=64",
         *STREAMING]


def flip_byte(path: Path, element: int, itemsize: int) -> None:
    """Flips the high byte of array element `element` of a `.npy` file (size unchanged): an
    int32 feature index becomes out of range, a float32 value changes sign and scale."""
    at = np.load(path, mmap_mode="r").offset + element * itemsize + itemsize - 1
    data = bytearray(path.read_bytes())
    data[at] ^= 0x7F
    path.write_bytes(bytes(data))


def damaged_message(result: subprocess.CompletedProcess, victim: Path) -> str:
    output = result.stderr + result.stdout
    assert result.returncode != 0, output
    assert str(victim) in output, output
    assert "IndexError" not in output and "Traceback" not in output, output
    return output


@pytest.mark.e2e
@pytest.mark.parametrize("layout, kind", [("sparse", "values"), ("sparse", "indices"),
                                          ("dense", "x")])
def test_a_flipped_byte_is_refused_before_training(tmp_path, layout, kind):
    write = write_sparse_shards if layout == "sparse" else write_dense_shards
    data = write(tmp_path / "data", rows=1200, features=30)
    victim = data / f"{kind}-00000.npy"
    flip_byte(victim, element=17, itemsize=4)
    result = run_cli("data=files", f"data.train_path={data}", f"hydra.run.dir={tmp_path / 'run'}",
                     *TRAIN, cwd=tmp_path)
    output = damaged_message(result, victim)
    assert "checksum mismatch" in output
    assert f"prepare the dataset again: python -m largeml.prepare input=... output={data}" in output
    assert not list(tmp_path.rglob("*.pt"))  # no step, so no checkpoint
    assert not list(tmp_path.rglob("metrics.json"))


@pytest.mark.e2e
def test_a_truncated_shard_is_refused_before_training(tmp_path):
    data = write_sparse_shards(tmp_path / "data", rows=1200, features=30)
    victim = data / "indices-00001.npy"
    with open(victim, "r+b") as f:
        f.truncate(victim.stat().st_size - 4)
    result = run_cli("data=files", f"data.train_path={data}", f"hydra.run.dir={tmp_path / 'run'}",
                     *TRAIN, cwd=tmp_path)
    output = damaged_message(result, victim)
    assert "bytes, expected" in output and "prepare the dataset again" in output
    assert not list(tmp_path.rglob("*.pt"))


@pytest.mark.e2e
@pytest.mark.slow  # two training runs
def test_a_damaged_conversion_cache_says_to_delete_it(tmp_path):
    rng = np.random.default_rng(0)
    lines = [f"{'+1' if rng.random() < 0.5 else '-1'} " +
             " ".join(f"{j}:{rng.random():.3f}" for j in sorted(rng.choice(40, 5, replace=False)
                                                               + 1))
             for _ in range(600)]
    raw = tmp_path / "train.svm"
    raw.write_text("\n".join(lines) + "\n")
    cache = tmp_path / "cache"
    args = ["data=files", f"data.train_path={raw}", f"data.cache_dir={cache}", *TRAIN]
    first = run_cli(*args, f"hydra.run.dir={tmp_path / 'one'}", cwd=tmp_path)
    assert first.returncode == 0, first.stderr + first.stdout

    (converted,) = (p.parent for p in cache.glob("*/index.json"))
    victim = converted / "values-00000.npy"
    flip_byte(victim, element=3, itemsize=4)
    second = run_cli(*args, f"hydra.run.dir={tmp_path / 'two'}", cwd=tmp_path)
    output = damaged_message(second, victim)
    assert f"delete {converted} so that the next run converts it again" in output


@pytest.mark.unit
def test_each_file_is_checked_once_per_process(tmp_path, monkeypatch):
    data = write_sparse_shards(tmp_path / "data", rows=1000, features=30)
    monkeypatch.setattr(shards, "_CHECKED", set())
    checked = []
    crc32 = shards._crc32
    monkeypatch.setattr(shards, "_crc32", lambda path: checked.append(path) or crc32(path))
    index = open_shards(data)
    stream = ShardStream(index, batch_size=100, shuffle=True)
    for epoch in range(3):
        stream.set_epoch(epoch)
        assert sum(len(y) for _, y in stream) == 1000
    files = [index.path(shard, kind) for shard in index.shards for kind in shard.files]
    assert sorted(checked) == sorted(files)  # every file once, not once per epoch

    flip_byte(files[-1], element=0, itemsize=4)  # rewritten since: checked again
    with pytest.raises(DataError, match="checksum mismatch"):
        sum(1 for _ in ShardStream(index, batch_size=100, shuffle=False))


@pytest.mark.unit
def test_no_batch_of_a_damaged_shard_is_served(tmp_path, monkeypatch):
    """The first batches come from sound shards; the stream stops, naming the file, before
    the first batch that has rows of the damaged one."""
    monkeypatch.setattr(shards, "_CHECKED", set())
    data = write_dense_shards(tmp_path / "data", rows=1000, features=8)
    index = open_shards(data)
    assert len(index.shards) > 2
    victim = index.path(index.shards[2], "y")
    flip_byte(victim, element=5, itemsize=4)
    served = 0
    with pytest.raises(DataError, match=f"{victim}: checksum mismatch"):
        for _, y in ShardStream(index, batch_size=10, shuffle=False):
            served += len(y)
    assert served <= index.shards[0].rows + index.shards[1].rows


@pytest.mark.unit
def test_resident_data_is_checked_before_it_is_loaded(tmp_path, monkeypatch):
    monkeypatch.setattr(shards, "_CHECKED", set())
    data = write_dense_shards(tmp_path / "data", rows=600, features=8)
    victim = data / "x-00001.npy"
    flip_byte(victim, element=3, itemsize=4)
    resident = ResidentStream(ShardStream(data, batch_size=50, shuffle=True))
    with pytest.raises(DataError, match=f"{victim}: checksum mismatch"):
        resident.to_device(torch.device("cpu"))
    assert resident.x is None


def prepare(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([sys.executable, "-m", "largeml.prepare", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.e2e
def test_prepare_verify(tmp_path):
    data = write_sparse_shards(tmp_path / "data", rows=1000, features=30)
    files = sum(len(shard.files) for shard in open_shards(data).shards)
    good = prepare(f"verify={data}", cwd=tmp_path)
    assert good.returncode == 0, good.stderr + good.stdout
    assert good.stdout.strip() == (f"ok: {data}: {files} files of {files // 4} shards, 1,000 "
                                   "rows: sizes and CRC-32 as in index.json")

    flipped, truncated = data / "values-00002.npy", data / "y-00000.npy"
    flip_byte(flipped, element=1, itemsize=4)
    with open(truncated, "r+b") as f:
        f.truncate(truncated.stat().st_size - 8)
    bad = prepare(f"verify={data}", cwd=tmp_path)
    assert bad.returncode == 2, bad.stderr + bad.stdout
    damaged = [line for line in bad.stdout.splitlines() if line.startswith("damaged: ")]
    assert damaged == [
        f"damaged: {truncated}: {truncated.stat().st_size} bytes, expected "
        f"{truncated.stat().st_size + 8} bytes per index.json",
        f"damaged: {flipped}: checksum mismatch (CRC-32 differs from index.json)"]
    assert f"2 of {files} files in {data} are damaged: prepare the dataset again" in bad.stdout

    missing = prepare(f"verify={tmp_path / 'nothing'}", cwd=tmp_path)
    assert missing.returncode == 2
    assert f"{tmp_path / 'nothing'}: not a prepared dataset" in missing.stderr + missing.stdout
