"""FTRL through the CLI as a user runs it: it trains, and says nothing alarming on the way."""

import json
import os

import pytest

from conftest import run_cli, write_dense_shards, write_sparse_shards

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


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="Hogwild needs two cores")
def test_ftrl_learns_on_two_cores_with_hogwild(tmp_path):
    """optimizer.hogwild=2: each batch's rows read in place and split between two cores, the
    state shared: it says so, and learns what one core learns, to within the races' noise."""
    shards = write_sparse_shards(tmp_path / "train", 6000, 400, nnz=10)
    objectives = {}
    for cores in (1, 2):
        run = tmp_path / f"run{cores}"
        result = run_cli(f"hydra.run.dir={run}", "data=files", f"data.train_path={shards}",
                         "optimizer=ftrl", f"optimizer.hogwild={cores}", "trainer.tol=0",
                         "trainer.max_epochs=3", "data.batch_size=512", cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        said = "optimizer.hogwild=2: each batch learnt on 2 cores" in result.stdout
        assert said == (cores == 2), result.stdout
        objectives[cores] = json.loads((run / "metrics.json").read_text())["train/objective"]
    assert objectives[2] < 0.6, objectives  # log 2 = 0.69 at the start
    assert abs(objectives[2] - objectives[1]) < 0.01 * objectives[1], objectives


def test_hogwild_where_it_cannot_apply_says_so(tmp_path):
    """Dense rows: FTRL takes one step a batch, and optimizer.hogwild=2 is a warning, not a
    claim that two cores learn."""
    shards = write_dense_shards(tmp_path / "train", 2000, 8)
    result = run_cli(f"hydra.run.dir={tmp_path / 'run'}", "data=files", f"data.train_path={shards}",
                     "optimizer=ftrl", "optimizer.hogwild=2", "trainer.tol=0",
                     "trainer.max_epochs=1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "optimizer.hogwild=2 has no effect here" in result.stdout, result.stdout
    assert "each batch learnt on" not in result.stdout, result.stdout
