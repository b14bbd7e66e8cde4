"""FTRL through the CLI as a user runs it: it trains, and says nothing alarming on the way."""

import json

import pytest

from conftest import run_cli, write_sparse_shards

pytestmark = pytest.mark.e2e


def test_ftrl_trains_through_the_cli_without_warnings(tmp_path):
    shards = write_sparse_shards(tmp_path / "train", 6000, 400, nnz=10)
    result = run_cli(f"hydra.run.dir={tmp_path / 'run'}", "data=files",
                     f"data.train_path={shards}", "optimizer=ftrl", "trainer.tol=0",
                     "trainer.max_epochs=3", "data.batch_size=512", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    # torch's "lr_scheduler.step() before optimizer.step()": FTRL's step is step_batch
    assert "Warning" not in result.stderr, result.stderr
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["train/objective"] < 0.6, metrics  # log 2 = 0.69 at the start
