"""`data.hash_bits`: LIBSVM feature ids hashed into 2^N signed columns, and the error that
suggests it when a file's index space is too wide for memory."""

import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO
from omegaconf import OmegaConf

from largeml import device
from largeml.data import hashing
from largeml.data.formats import libsvm as libsvm_format
from largeml.data.convert import convert
from largeml.data.shards import open_shards
from largeml.data.sources import BYTES_PER_FEATURE, files
from largeml.errors import ConfigError, DataError
from test_convert import read_csr

WIDEST = 2_000_000_000  # ids up to this: 60 GiB of model unhashed, at BYTES_PER_FEATURE


def write_wide_libsvm(path: Path, rows: int = 300, seed: int = 0) -> Path:
    """A learnable LIBSVM file over 60 ids spread up to WIDEST, 8 features a row."""
    rng = np.random.default_rng(seed)
    ids = rng.choice(WIDEST, size=60, replace=False) + 1
    ids[0] = WIDEST
    w = rng.normal(size=len(ids))
    lines = []
    for _ in range(rows):
        picked = np.sort(rng.choice(len(ids), size=8, replace=False))
        values = rng.uniform(0.5, 1.5, size=8).round(3)
        label = "+1" if w[picked] @ values > 0 else "-1"
        lines.append(" ".join([label, *(f"{ids[k]}:{v}" for k, v in zip(picked, values,
                                                                         strict=True))]))
    path.write_text("\n".join(lines) + "\n")
    return path


def hashed_by_hand(path: Path, bits: int) -> list[dict[int, float]]:
    """Each row of a LIBSVM file as {column: value}, hashed in plain Python from the formula in
    largeml/data/hashing.py: the reference the vectorised code is checked against."""
    mask = (1 << 64) - 1
    rows = []
    for line in path.read_text().splitlines():
        row: dict[int, float] = defaultdict(float)
        for token in line.split("#")[0].split()[1:]:
            name, value = token.split(":")
            z = (int(name) + 0x9E3779B97F4A7C15) & mask
            z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
            z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
            h = z ^ (z >> 31)
            row[h & ((1 << bits) - 1)] += -float(value) if h >> 63 else float(value)
        if line.split("#")[0].strip():
            rows.append({c: v for c, v in row.items() if v != 0})
    return rows


def as_rows(index) -> list[dict[int, float]]:
    indptr, indices, values, _ = read_csr(index)
    return [dict(zip(indices[a:b].tolist(), values[a:b].tolist(), strict=True))
            for a, b in zip(indptr[:-1], indptr[1:], strict=True)]


@pytest.mark.unit
def test_hash_is_splitmix64_in_range_signed_and_deterministic():
    # splitmix64's first output from state 0 (the published reference value)
    assert hashing.splitmix64(np.array([0]))[0] == 0xE220A8397B1DCDAF
    ids = np.arange(1, 200_001, dtype=np.int64)
    for bits in (1, 8, 20, 31):
        columns, signs = hashing.signed_columns(ids, bits)
        assert columns.dtype == np.int32 and columns.min() >= 0 and columns.max() < 1 << bits
        assert set(np.unique(signs)) == {-1.0, 1.0} and abs(signs.mean()) < 0.01
        again = hashing.signed_columns(ids, bits)
        np.testing.assert_array_equal(columns, again[0])
        np.testing.assert_array_equal(signs, again[1])
    columns, signs = hashing.signed_columns(ids, 8)
    # spread evenly, and a column's ids get both signs: the sign is not a function of the column
    assert np.bincount(columns, minlength=256).min() > 0.8 * len(ids) / 256
    assert all(len(np.unique(signs[columns == c])) == 2 for c in range(256))


@pytest.mark.unit
def test_a_rows_entries_in_one_column_are_summed_with_their_signs():
    columns, signs = hashing.signed_columns(np.arange(1, 100), 2)  # of 0-based indices 0..98
    same = np.flatnonzero(columns == columns[0])
    a, b = same[1:3]  # two more indices in index 0's column
    cancel = same[signs[same] != signs[0]][0]  # one of them with the other sign
    other = np.flatnonzero(columns != columns[0])[0]
    # row 0: a and b, summed; row 1: index 0 and `cancel`, summing to 0 (dropped), and `other`
    indices = np.array([a, b, 0, cancel, other])
    values = np.array([1.0, 2.0, 3.0, 3.0, 4.0], dtype=np.float32)
    indptr, cols, vals = hashing.hash_rows(np.array([0, 2, 5]), indices, values, 2, "here")
    np.testing.assert_array_equal(indptr, [0, 1, 2])
    assert cols.tolist() == [columns[0], columns[other]]
    assert vals.tolist() == [signs[a] * 1.0 + signs[b] * 2.0, signs[other] * 4.0]


@pytest.mark.unit
def test_fast_and_slow_parse_paths_hash_the_same(tmp_path, monkeypatch):
    """Ten-digit ids parse on the fast path; a `+id` (which int() takes) sends a chunk to the
    slow one. Both give what the formula gives by hand, in 2^N columns."""
    slow_calls = []
    slow = libsvm_format.parse_slow
    monkeypatch.setattr(libsvm_format, "parse_slow",
                        lambda *a: slow_calls.append(1) or slow(*a))
    fast_file = write_wide_libsvm(tmp_path / "fast.svm")
    text = fast_file.read_text().splitlines()
    first = text[0].split()
    first[1] = "+" + first[1]
    slow_file = tmp_path / "slow.svm"
    slow_file.write_text("\n".join(["# a comment", " ".join(first), *text[1:]]) + "\n")

    fast = convert(fast_file, tmp_path / "f", hash_bits=10)
    assert not slow_calls
    by_slow = convert(slow_file, tmp_path / "s", hash_bits=10)
    assert slow_calls
    assert fast.n_features == by_slow.n_features == 1024
    assert fast.source["hash_bits"] == 10
    expected = hashed_by_hand(fast_file, 10)
    assert as_rows(fast) == as_rows(by_slow)
    assert [sorted(row) for row in as_rows(fast)] == [sorted(row) for row in expected]
    for row, want in zip(as_rows(fast), expected, strict=True):
        assert row == pytest.approx(want, rel=1e-6)
    _, indices, _, _ = read_csr(fast)  # one entry a column in a row, columns sorted
    assert all(np.all(np.diff(list(row)) > 0) for row in as_rows(fast))
    assert indices.max() < 1024


@pytest.mark.unit
def test_hash_bits_is_part_of_the_cache_key(tmp_path):
    path = write_wide_libsvm(tmp_path / "a.svm", rows=20)
    for bits in (8, 9):
        data = files(str(path), format="libsvm", cache_dir=str(tmp_path / "c"), hash_bits=bits)
        assert data.n_features == 1 << bits
    assert len(list((tmp_path / "c").glob("a-*/index.json"))) == 2


@pytest.mark.unit
@pytest.mark.parametrize("bits", [0, 32, -1, True, "20", 2.5])
def test_hash_bits_out_of_range(tmp_path, bits):
    path = write_wide_libsvm(tmp_path / "a.svm", rows=5)
    with pytest.raises(ConfigError, match="data.hash_bits"):
        files(str(path), format="libsvm", cache_dir=str(tmp_path / "c"), hash_bits=bits)
    with pytest.raises(ConfigError, match="hash_bits"):
        convert(path, tmp_path / "out", hash_bits=bits)
    assert not (tmp_path / "c").exists() and not (tmp_path / "out").exists()


@pytest.mark.unit
def test_hash_bits_is_for_sparse_libsvm_only(tmp_path):
    csv = tmp_path / "a.csv"
    csv.write_text("label,f0\n1,0.5\n0,1.5\n")
    with pytest.raises(ConfigError, match="data.hash_bits=12 .* csv input is dense"):
        files(str(csv), cache_dir=str(tmp_path / "c"), hash_bits=12)
    svm = write_wide_libsvm(tmp_path / "a.svm", rows=5)
    with pytest.raises(ConfigError, match="hash_bits=12 .* layout=dense"):
        convert(svm, tmp_path / "out", layout="dense", n_features=4096, hash_bits=12)
    with pytest.raises(ConfigError, match="data.n_features=100, but data.hash_bits=12"):
        files(str(svm), format="libsvm", n_features=100, cache_dir=str(tmp_path / "c"),
              hash_bits=12)
    assert files(str(svm), format="libsvm", n_features=4096, cache_dir=str(tmp_path / "c"),
                 hash_bits=12).n_features == 4096


@pytest.mark.e2e
def test_a_prepared_directory_must_match_data_hash_bits(tmp_path):
    svm = write_wide_libsvm(tmp_path / "a.svm", rows=20)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-m", "largeml.prepare", f"input={svm}",
                             "output=hashed", "hash_bits=12"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "x 4,096 features" in result.stdout
    assert open_shards(tmp_path / "hashed").source["hash_bits"] == 12
    convert(svm, tmp_path / "plain")
    assert files(str(tmp_path / "hashed"), hash_bits=12).n_features == 4096
    assert files(str(tmp_path / "hashed")).n_features == 4096  # used as it was prepared
    with pytest.raises(ConfigError, match="prepared with hash_bits=12, but data.hash_bits=13"):
        files(str(tmp_path / "hashed"), hash_bits=13)
    with pytest.raises(ConfigError, match="prepared without hashing, but data.hash_bits=12"):
        files(str(tmp_path / "plain"), hash_bits=12)


def train(*args: str, cwd: Path) -> tuple[int, str, int]:
    """`python -m largeml.train ARGS`: (exit code, its output, its peak RSS in bytes)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HYDRA_FULL_ERROR": "0"}
    with open(cwd / "out.txt", "w+") as out:
        process = subprocess.Popen([sys.executable, "-m", "largeml.train", *args], cwd=cwd,
                                   env=env, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)  # this child's own rusage
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        return process.returncode, out.read(), usage.ru_maxrss * 1024  # KiB on Linux


@pytest.mark.e2e
def test_ids_up_to_two_billion_train_hashed(tmp_path):
    path = write_wide_libsvm(tmp_path / "wide.svm")
    code, output, _ = train(f"hydra.run.dir={tmp_path / 'run'}", "data=libsvm",
                            f"data.train_path={path}", f"data.cache_dir={tmp_path / 'cache'}",
                            "data.hash_bits=20", "trainer.max_epochs=1", cwd=tmp_path)
    assert code == 0, output
    assert "300 rows x 1048576" in output
    run_dir = tmp_path / "run"
    assert OmegaConf.load(run_dir / "config.yaml").data.hash_bits == 20
    assert json.loads((run_dir / "metrics.json").read_text())["step"] == 1
    model = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert model["linear.weight"].shape == (1, 1 << 20)


@pytest.mark.e2e
def test_too_wide_for_memory_names_hash_bits_without_allocating(tmp_path):
    if device.available_ram() >= WIDEST * BYTES_PER_FEATURE:
        pytest.skip(f"{device.available_ram() / 2**30:.0f} GiB free: a model of {WIDEST:,} "
                    "features would fit")
    path = write_wide_libsvm(tmp_path / "wide.svm")
    code, output, peak = train(f"hydra.run.dir={tmp_path / 'run'}", "data=libsvm",
                               f"data.train_path={path}", f"data.cache_dir={tmp_path / 'cache'}",
                               "trainer.max_epochs=1", cwd=tmp_path)
    assert code == 2, output
    assert f"{path}: its highest feature index is 2,000,000,000" in output
    assert "GiB" in output and "data.hash_bits=18 (262,144 columns" in output
    assert peak < 1 << 30, f"peak RSS {peak / 2**20:.0f} MiB"  # torch alone is ~300 MiB
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.unit
def test_too_wide_names_the_hashed_width(tmp_path, monkeypatch):
    path = write_wide_libsvm(tmp_path / "a.svm", rows=5)
    monkeypatch.setattr(device, "available_ram", lambda: 1 << 26)  # 64 MiB: 2^21 columns fit
    with pytest.raises(DataError, match=r"data.hash_bits=22 makes 4,194,304 columns, .*"
                                        r"data.hash_bits=18"):
        files(str(path), format="libsvm", cache_dir=str(tmp_path / "c"), hash_bits=22)
