"""`largeml.fit` from Python: in one process, and in two processes spawned the way Ray Train
and Spark's TorchDistributor start their workers (the torch.distributed variables set, no
torchrun), each calling `largeml.fit`."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, SMALL, free_port

# Each worker: set the environment an engine sets, call largeml.fit, write what it returned.
WORKERS = """
import json, os, sys
import torch.multiprocessing as mp

def worker(rank, world_size, port, run_dir, overrides):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    import largeml
    metrics = largeml.fit(overrides, run_dir=run_dir)
    with open(f"{run_dir}/returned.rank{rank}.json", "w") as f:
        json.dump(metrics, f)

if __name__ == "__main__":
    world_size, port, run_dir, overrides = json.loads(sys.argv[1])
    mp.spawn(worker, args=(world_size, port, run_dir, overrides), nprocs=world_size)
"""


def python(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=240)


@pytest.mark.e2e
def test_fit_returns_the_metrics_and_writes_the_run_directory(tmp_path):
    code = ("import json, sys, largeml; "
            "print(json.dumps(largeml.fit(sys.argv[2:], run_dir=sys.argv[1])))")
    result = python("-c", code, str(tmp_path / "run"), *SMALL, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    returned = json.loads(result.stdout.strip().splitlines()[-1])
    run_dir = tmp_path / "run"
    assert returned == json.loads((run_dir / "metrics.json").read_text())
    assert returned["epoch"] == 2 and returned["stopped"] == "max_epochs"
    assert returned["val/accuracy"] > 0.75  # the synthetic set's true rule scores ~85 %
    assert (run_dir / "config.yaml").is_file() and (run_dir / "checkpoints" / "last.pt").is_file()
    assert list(run_dir.glob("events.out.tfevents.*"))
    assert "final: " in (run_dir / "train.log").read_text()


@pytest.mark.e2e
def test_fit_errors_are_raised_naming_the_key(tmp_path):
    code = ("import largeml\n"
            "try:\n    largeml.fit(['trainer.best_metric=nope'], run_dir='run')\n"
            "except largeml.errors.ConfigError as err:\n    print('raised:', err)\n")
    result = python("-c", code, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "raised: trainer.best_metric must be one of" in result.stdout


@pytest.mark.distributed
def test_fit_in_two_spawned_processes_trains_one_model(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    script = tmp_path / "workers.py"  # spawned processes import their function from a file
    script.write_text(WORKERS)
    args = json.dumps([2, free_port(), str(run_dir), SMALL])
    result = python(str(script), args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((run_dir / f"returned.rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["processes"] == 2 and ranks[0]["epoch"] == 2
    for key in ("val/accuracy", "val/loss", "step"):  # decisions from values both ranks agree on
        assert ranks[0][key] == ranks[1][key], key
    assert ranks[0] == json.loads((run_dir / "metrics.json").read_text())
    assert (run_dir / "train.log").is_file() and (run_dir / "train.rank1.log").is_file()
    assert len(list(run_dir.glob("events.out.tfevents.*"))) == 1  # rank 0 alone writes
