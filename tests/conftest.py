"""Shared fixtures: the real config tree composed through Hydra, outputs in `tmp_path`."""

import os
import pty
import re
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from largeml.data.shards import ShardWriter
from largeml.train import CONFIG_DIR

REPO = Path(__file__).resolve().parent.parent

# The `torchrun` that comes with this interpreter's torch (the same launcher as
# `python -m torch.distributed.run`, which stands in if the script is not beside it).
_SCRIPT = Path(sys.executable).with_name("torchrun")
TORCHRUN = [str(_SCRIPT)] if _SCRIPT.is_file() else [sys.executable, "-m", "torch.distributed.run"]

# Mini-batch SGD for a fixed number of epochs (no stopping rule), as tests of the loop's
# mechanics (steps, checkpoints, resume, logging) need; the defaults (`auto`) are tested on
# their own in test_convergence.py.
STREAMING = ["optimizer=sgd", "trainer.tol=0"]
# Shrinks a run to seconds: a small synthetic set and two short epochs.
SMALL = ["data.n_samples=3000", "data.n_features=20", "trainer.max_epochs=2",
         "trainer.log_every_n_steps=5", *STREAMING]


# The tiers: every test has exactly one (pyproject.toml describes them); `slow` and `gpu` go
# on top of a tier.
TIERS = ("unit", "e2e", "distributed")


@pytest.hookimpl(tryfirst=True)  # before -m deselects: every collected test is checked
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Refuses a test with no tier marker or with several, and leaves out `slow` tests unless
    the -m expression names `slow`: `pytest` and `pytest -m unit` skip the long tier, `pytest
    -m slow` runs it, `pytest -m "slow or not slow"` runs everything."""
    untiered = []
    for item in items:
        tiers = sorted({mark.name for mark in item.iter_markers()} & set(TIERS))
        if len(tiers) != 1:
            untiered.append(f"{item.nodeid}: {', '.join(tiers) or 'no tier'}")
    if untiered:
        raise pytest.UsageError(
            "every test needs exactly one tier marker, @pytest.mark.unit (in process), "
            "@pytest.mark.e2e (runs a largeml command in a subprocess) or "
            "@pytest.mark.distributed (torchrun or spawned process groups), or a module-level "
            "`pytestmark = pytest.mark.unit`; these have none or several:\n  "
            + "\n  ".join(untiered))
    if not re.search(r"\bslow\b", config.option.markexpr):
        slow = [item for item in items if item.get_closest_marker("slow")]
        if slow:
            config.hook.pytest_deselected(items=slow)
            items[:] = [item for item in items if not item.get_closest_marker("slow")]


@pytest.fixture
def compose_config() -> Callable[..., DictConfig]:
    """compose_config("model=svm", ...) -> the config `python -m largeml.train model=svm ...`
    would run, read from the real `configs/`."""

    def _compose(*overrides: str) -> DictConfig:
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            return compose("train", overrides=list(overrides))

    return _compose


def free_port() -> int:
    """A TCP port on loopback that nothing listens on (for torchrun, TensorBoard)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """Runs `python -m largeml.train ARGS` as a user would, in `cwd`."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HYDRA_FULL_ERROR": "0"}
    return subprocess.run(
        [sys.executable, "-m", "largeml.train", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
    )


def write_dense_shards(root: Path, rows: int, features: int, seed: int = 0) -> Path:
    """A dense shard set of a few hundred rows a shard: Gaussian rows, labels from a random
    hyperplane plus noise (learnable, not separable)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, features)).astype(np.float32)
    y = (x @ rng.normal(size=features) + 0.5 * rng.normal(size=rows) > 0).astype(np.float32)
    with ShardWriter(root, "dense", features, shard_bytes=(features + 1) * 4 * 200) as writer:
        for i in range(0, rows, 70):  # shards of 210 rows: batches straddle shard ends
            writer.write_dense(x[i:i + 70], y[i:i + 70])
    return root


def write_sparse_shards(root: Path, rows: int, features: int, nnz: int = 8,
                        seed: int = 0) -> Path:
    """A sparse shard set: `nnz` features a row out of `features` (a feature may repeat in a
    row), values in [0, 1), labels from a random hyperplane (learnable, not separable)."""
    rng = np.random.default_rng(seed)
    indices = rng.integers(0, features, size=rows * nnz).astype(np.int32)
    values = rng.random(rows * nnz).astype(np.float32)
    indptr = np.arange(0, rows * nnz + 1, nnz)
    w = rng.normal(size=features)
    score = np.add.reduceat(values * w[indices], indptr[:-1])
    y = (score + 0.3 * rng.normal(size=rows) > np.median(score)).astype(np.float32)
    with ShardWriter(root, "sparse", shard_bytes=nnz * 8 * 300) as writer:
        for i in range(0, rows, 100):
            a, b = indptr[i], indptr[min(i + 100, rows)]
            writer.write_sparse(indptr[i:min(i + 100, rows) + 1], indices[a:b], values[a:b],
                                y[i:i + 100])
    return root


def run_in_terminal(module: str, *args: str, cwd: Path, timeout: float = 120) -> tuple[int, str]:
    """Runs `python -m MODULE ARGS` with its stdout and stderr on a pseudo-terminal, as in an
    interactive shell: (exit code, everything the terminal received)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HYDRA_FULL_ERROR": "0"}
    leader, follower = pty.openpty()
    with subprocess.Popen([sys.executable, "-m", module, *args], cwd=cwd, env=env,
                          stdout=follower, stderr=follower) as process:
        os.close(follower)
        chunks = []
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the terminal closed with the process
                break
            if not chunk:
                break
            chunks.append(chunk)
        code = process.wait(timeout=timeout)
    os.close(leader)
    return code, b"".join(chunks).decode(errors="replace")
