"""`python -m largeml.train [overrides]`: compose the config, build the parts, fit.

The config tree is in `configs/`; `train.yaml` lists the groups and their defaults.
`torchrun --nproc_per_node=N -m largeml.train [overrides]` runs the same job on N processes; all
of them share one run directory (`launch_dir`), which only rank 0 writes to.
"""

import logging
import os
import signal
import sys
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from largeml import auto, distributed, losses
from largeml.cli import CONFIG_DIR, build, build_function
from largeml.config import l2_strength, validate
from largeml.data.batches import DataModule, check_batch_size
from largeml.device import release_large_blocks, resolve_device, skip_compiler_import
from largeml.distributed import Processes, agreed, launch_id
from largeml.errors import ConfigError, LargemlError
from largeml.logger import flatten
from largeml.sweep import record_failure
from largeml.trainer import Preempted, Trainer

log = logging.getLogger(__name__)



def launch_dir(default: str) -> str:
    """The run directory: `default` (outputs/<date>/<time>) for one process. Under torchrun
    it must be the same on every rank and across the restarts of one launch, where each
    process's clock would give each its own <time>: `outputs/torchrun/<run id>` when torchrun
    has a run id (`--rdzv-id`), else the first `default` any of the launch's processes proposed.
    """
    run_id = launch_id()
    return f"outputs/torchrun/{run_id}" if run_id else agreed("run_dir", default)


def main_process_only(value: str) -> str | None:
    """`value` on rank 0, None elsewhere: Hydra writes `.hydra/` only for rank 0."""
    return value if Processes.from_env().main else None


def rank_suffix() -> str:
    """`.rank<N>` for ranks other than 0: each process logs to its own file."""
    rank = Processes.from_env().rank
    return f".rank{rank}" if rank else ""


for _name, _resolver in (("largeml.launch_dir", launch_dir),
                         ("largeml.main_process_only", main_process_only),
                         ("largeml.rank_suffix", rank_suffix)):
    if not OmegaConf.has_resolver(_name):
        OmegaConf.register_new_resolver(_name, _resolver)


def loss_function(config: DictConfig, data: DataModule):
    """The run's loss: `config`'s function, with the class weights `loss.class_weight` asks
    for (logged) multiplying each row's loss."""
    multiclass = config.get("multiclass", losses.MULTICLASS[0])
    if multiclass not in losses.MULTICLASS:
        raise ConfigError(f"loss.multiclass must be one of {', '.join(losses.MULTICLASS)}, got "
                          f"{multiclass!r}")
    loss_fn = build_function(config)
    spec = config.get("class_weight")
    spec = OmegaConf.to_container(spec) if OmegaConf.is_config(spec) else spec
    weights = data.classes.weights(spec, data.label_counts or {}, "loss.class_weight")
    if weights is None:
        return loss_fn
    log.info("loss.class_weight=%s: %s", spec if isinstance(spec, str) else "given",
             ", ".join(f"{name}: {w:.4g}" for name, w in zip(data.classes.names,
                                                             weights.tolist(), strict=True)))
    return losses.weighted(loss_fn, weights)


def run(cfg: DictConfig, run_dir: Path, choices: dict[str, str] | None = None) -> dict[str, float]:
    """Trains as `cfg` says, writing everything into `run_dir`; returns the final metrics."""
    validate(cfg)
    skip_compiler_import()
    release_large_blocks()
    processes = Processes.from_env()
    check_batch_size(cfg.data.batch_size, processes.world_size)
    torch.manual_seed(cfg.seed)
    data = build(cfg.data, rank=processes.rank, world_size=processes.world_size)
    log.info("data: %s", data.description)
    chosen = auto.resolve(cfg, data, resolve_device(cfg.trainer.device, processes.local_rank))
    validate(cfg)  # what `auto` chose
    if "data.batch_size" in chosen:  # the streams again, with the batch `auto` chose
        data = build(cfg.data, rank=processes.rank, world_size=processes.world_size)
    model = build(cfg.model, n_features=data.n_features, n_outputs=data.classes.n_outputs)
    l2 = l2_strength(cfg.regularization, data.n_train)
    l1 = float(cfg.regularization.get("l1") or 0.0)

    config = OmegaConf.to_container(cfg, resolve=True)
    # The columns as found in the training file (not the null that asked for "all numeric
    # ones"): the checkpoint then reads a new file into the same columns.
    config["data"].update(data.feature_map)
    run_dir.mkdir(parents=True, exist_ok=True)
    if processes.main:
        OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    hparams = {**flatten(config), **(choices or {}), "regularization.lambda": l2,
               **{f"auto.{group}": choice for group, choice in chosen.items()}}
    trainer = Trainer(
        model=model,
        data=data,
        loss_fn=loss_function(cfg.loss, data),
        optimizer=build(cfg.optimizer),
        scheduler=build(cfg.scheduler),
        l2=l2,
        l1=l1,
        run_dir=run_dir,
        config=config,
        hparams=hparams,
        processes=processes,
        **cfg.trainer,
    )
    try:
        final = trainer.fit()
        distributed.barrier()  # leave together: a rank tearing down early can abort another
        return final
    finally:
        distributed.stop()


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> None:
    runtime = HydraConfig.get().runtime
    if not Processes.from_env().main:  # the console shows rank 0's progress; others' warnings
        for handler in logging.getLogger().handlers:
            if type(handler) is logging.StreamHandler:
                handler.setLevel(logging.WARNING)
    choices = {f"choice.{k}": v for k, v in runtime.choices.items() if not k.startswith("hydra")}
    try:
        run(cfg, Path(runtime.output_dir), choices)
    except Preempted as err:
        log.warning("%s", err)
        sys.exit(128 + signal.SIGTERM)  # what a shell reports for a job SIGTERM ended
    except LargemlError as err:
        log.error("%s", err)
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            record_failure(runtime.output_dir, err)  # the sweep goes on; its summary says so
            return
        sys.exit(2)


def exit_now() -> None:
    """Ends a finished run at once: with torch loaded, the interpreter's own teardown takes
    1.2-1.5 s here (a seventh of a small run) and has nothing left to do, since every file
    is closed and the process group destroyed. Logs and output are flushed first."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
    exit_now()
