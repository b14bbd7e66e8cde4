"""`python -m largeml.prepare` end to end, as a user runs it: real Hydra, real files on disk."""

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import run_in_terminal
from test_convert import LIBSVM, LIBSVM_X, LIBSVM_Y, read_back

from largeml.data.shards import open_shards

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parent.parent


def prepare(*args: str, cwd: Path, **env_vars: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HYDRA_FULL_ERROR": "0", **env_vars}
    return subprocess.run([sys.executable, "-m", "largeml.prepare", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120, check=False)


def test_libsvm_to_shards(tmp_path):
    (tmp_path / "train.svm").write_text(LIBSVM)
    result = prepare("input=train.svm", "output=data/train", "shard_mb=0.0001", cwd=tmp_path)
    assert result.returncode == 0, result.stderr + result.stdout

    index = open_shards(tmp_path / "data" / "train", verify=True)
    assert len(index.shards) > 1  # shard_mb is honoured
    x, y = read_back(index)
    np.testing.assert_array_equal(x, np.array(LIBSVM_X, dtype=np.float32))
    np.testing.assert_array_equal(y, LIBSVM_Y)

    summary = result.stdout.strip().splitlines()[-1]
    assert summary.startswith("prepared 5 rows x 5 features, 6 nnz, sparse, labels -1: 2 / 1: 3")
    assert "data/train" in summary and "MB/s" in summary
    # Only the dataset was written: no run directory, no .hydra/, no log file.
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")
                     if p.parent != tmp_path / "data" / "train")
    assert written == ["data", "data/train", "train.svm"]
    assert not list(tmp_path.rglob(".*"))  # no .hydra/, no leftover .partial directory


def test_progress_is_a_plain_log_line_when_not_a_terminal(tmp_path):
    (tmp_path / "train.svm").write_text(LIBSVM)
    result = prepare("input=train.svm", "output=data", cwd=tmp_path)
    assert result.returncode == 0, result.stderr + result.stdout
    output = result.stderr + result.stdout
    lines = re.findall(r"converting train\.svm: KiB [\d.]+/0\.1 \((\d+)%\), ([\d,]+) samples/s, "
                       r"ETA \d\d:\d\d:\d\d", output)
    assert len(lines) == 1 and lines[0][0] == "100", output  # a small file: one line, at the end
    assert int(lines[0][1].replace(",", "")) > 0
    assert "\r" not in output


def test_progress_bar_on_a_terminal(tmp_path):
    # 7.5 MiB of text, read in 4 MiB chunks: a status line after the first (the first always
    # shows) and after the last (at most 5 a second in between).
    (tmp_path / "big.svm").write_text("+1 1:0.5 3:0.25 4:1\n-1 2:0.75 5:2\n" * 230_000)
    code, screen = run_in_terminal("largeml.prepare", "input=big.svm", "output=data",
                                   cwd=tmp_path)
    assert code == 0, screen[-2000:]
    status = re.findall(r"\r(converting big\.svm: MiB ([\d.]+)/7\.5 \((\d+)%\), [\d,]+ "
                        r"samples/s, ETA \d\d:\d\d:\d\d)\x1b\[K", screen)
    read = [float(mib) for _, mib, _ in status]
    assert len(read) >= 2 and read == sorted(read), screen[-2000:]
    assert status[-1][2] == "100" and all(int(pct) < 100 for _, _, pct in status[:-1])
    assert "\r\x1b[Kprepared 460,000 rows" in screen  # the status line is cleared, then the summary


def test_multirun_writes_only_the_outputs(tmp_path):
    """`-m` converts several files in one command; Hydra's multirun.yaml goes to the cache."""
    work, cache = tmp_path / "work", tmp_path / "cache"
    work.mkdir()
    (work / "a.svm").write_text(LIBSVM)
    (work / "b.svm").write_text(LIBSVM.replace("+1 1:0.5", "-1 1:0.5"))
    result = prepare("-m", "input=a.svm,b.svm", "output=${input}.shards", cwd=work,
                     LARGEML_CACHE=str(cache))
    assert result.returncode == 0, result.stderr + result.stdout
    for name, first_label in (("a", 1), ("b", 0)):
        x, y = read_back(open_shards(work / f"{name}.svm.shards", verify=True))
        np.testing.assert_array_equal(x, np.array(LIBSVM_X, dtype=np.float32))
        assert y.tolist() == [first_label, *LIBSVM_Y[1:]]
    assert len(result.stdout.strip().splitlines()) == 2  # one summary per input
    assert sorted(p.name for p in work.iterdir()) == ["a.svm", "a.svm.shards", "b.svm",
                                                       "b.svm.shards"]
    assert not list(work.rglob(".*"))  # no .hydra/, no leftover .partial directory
    assert [p.name for p in (cache / "prepare-multirun").iterdir()] == ["multirun.yaml"]


@pytest.mark.parametrize("fmt", ["csv", "npy"])
def test_dense_formats_to_shards(tmp_path, fmt):
    rng = np.random.default_rng(0)
    features = rng.standard_normal((50, 3)).astype(np.float32)
    labels = (rng.random(50) < 0.5).astype(np.int64)
    if fmt == "csv":
        pairs = zip(labels, features.tolist(), strict=True)
        rows = [f"{y},{a!r},{b!r},{c!r}" for y, (a, b, c) in pairs]
        (tmp_path / "table.txt").write_text("target,a,b,c\n" + "\n".join(rows) + "\n")
        args = ["input=table.txt", "format=csv", "label_column=0"]
    else:
        np.save(tmp_path / "x.npy", features)
        np.save(tmp_path / "y.npy", labels)
        args = ["input=x.npy", "labels=y.npy"]
    result = prepare(*args, "output=out", cwd=tmp_path)
    assert result.returncode == 0, result.stderr + result.stdout
    x, y = read_back(open_shards(tmp_path / "out", verify=True))
    np.testing.assert_array_equal(x, features)
    np.testing.assert_array_equal(y, labels)
    assert "50 rows x 3 features, nnz n/a, dense" in result.stdout


@pytest.mark.parametrize(
    "args, expected",
    [
        (["output=out"], "input is required"),
        (["input=train.svm", "layout=dense"], "needs n_features"),
        (["input=bad.svm"], "bad.svm:3: cannot read '2:x'"),
    ],
    ids=["missing-input", "dense-needs-n_features", "bad-line"],
)
def test_errors_exit_2_with_one_line_and_no_output(tmp_path, args, expected):
    (tmp_path / "train.svm").write_text(LIBSVM)
    (tmp_path / "bad.svm").write_text("1 1:1\n0 2:1\n1 2:x\n")
    if not any(a.startswith("output=") for a in args):
        args = [*args, "output=out"]
    result = prepare(*args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr + result.stdout
    output = result.stdout + result.stderr
    assert expected in output
    assert "Traceback" not in output
    assert len(output.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.svm", "train.svm"]
