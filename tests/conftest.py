"""Shared fixtures: the real config tree composed through Hydra, outputs in `tmp_path`."""

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from largeml.train import CONFIG_DIR

REPO = Path(__file__).resolve().parent.parent

# Shrinks a run to seconds: a small synthetic set and two short epochs.
SMALL = ["data.n_samples=3000", "data.n_features=20", "trainer.max_epochs=2",
         "trainer.log_every_n_steps=5"]


@pytest.fixture
def compose_config() -> Callable[..., DictConfig]:
    """compose_config("model=svm", ...) -> the config `python -m largeml.train model=svm ...`
    would run, read from the real `configs/`."""

    def _compose(*overrides: str) -> DictConfig:
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            return compose("train", overrides=list(overrides))

    return _compose


def run_cli(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """Runs `python -m largeml.train ARGS` as a user would, in `cwd`."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HYDRA_FULL_ERROR": "0"}
    return subprocess.run(
        [sys.executable, "-m", "largeml.train", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
    )
