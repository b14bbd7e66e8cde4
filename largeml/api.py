"""`largeml.fit(overrides, run_dir=None)`: the training run of `python -m largeml.train
OVERRIDES`, called from Python, returning its final metrics (what `metrics.json` holds).

The config is composed from `configs/` with the same overrides the CLI takes, and the run writes
the same run directory: `config.yaml`, TensorBoard events, `metrics.json`, `checkpoints/`, and
`train.log` (`train.rank<N>.log` for other ranks). Errors are raised (`largeml.errors`), not
turned into an exit status.

Several processes: call it once in each, with the torch.distributed environment set (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), as torchrun, Ray Train's `TorchTrainer` and
Spark's `TorchDistributor` set it; the ranks meet over gloo (CPU) or nccl (CUDA) and train one
model, as under torchrun. They must share one `run_dir`, which only rank 0 writes to.
"""

import logging
import time
from collections.abc import Sequence
from pathlib import Path

from largeml.distributed import Processes, launch_id
from largeml.errors import ConfigError


def default_run_dir(processes: Processes) -> Path:
    """outputs/<date>/<time>, as the CLI's; under torchrun, the launch's own directory."""
    run_id = launch_id()
    if run_id:
        return Path("outputs") / "torchrun" / run_id
    if processes.world_size > 1:
        raise ConfigError(f"largeml.fit on {processes.world_size} processes needs run_dir: the "
                          "ranks must share one run directory, and each would name its own")
    return Path("outputs") / time.strftime("%Y-%m-%d") / time.strftime("%H-%M-%S")


def fit(overrides: Sequence[str] = (), run_dir: str | Path | None = None) -> dict[str, float]:
    """Trains as `python -m largeml.train *overrides` would, into `run_dir`; returns the final
    metrics."""
    from hydra import compose, initialize_config_dir

    from largeml.cli import CONFIG_DIR
    from largeml.train import run

    processes = Processes.from_env()
    run_dir = Path(run_dir) if run_dir is not None else default_run_dir(processes)
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3", job_name="train"):
        cfg = compose("train", overrides=list(overrides))
    run_dir.mkdir(parents=True, exist_ok=True)
    suffix = f".rank{processes.rank}" if processes.rank else ""
    handler = logging.FileHandler(run_dir / f"train{suffix}.log")
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    logger = logging.getLogger("largeml")
    level = logger.level
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        return run(cfg, run_dir)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        handler.close()
