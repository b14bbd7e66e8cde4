"""The `auto` choices of a run, made from its data when it starts, logged, and written into the
run's resolved `config.yaml` (so evaluate, predict and a resume see what was chosen):

    optimizer=auto   newton  (full-batch Newton, `largeml.solvers.Newton`) for a linear model
                             (logreg, svm) whose training rows fit in memory: a quarter of the
                             free RAM, or half the free GPU memory
                     adagrad (per-feature steps, streamed) for a linear model on more data
                     adam    for an MLP (non-convex: stochastic steps, streamed)
    scheduler=auto   cosine for sgd; constant for every other optimizer (adaptive and
                     full-batch methods set their own step lengths)

Feature scaling (`data.scale=auto`) is chosen from the data's values: see `largeml.data.scaling`.
"""

import logging
import os
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from largeml.data import DataModule

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
LINEAR = "largeml.models.Linear"


def is_auto(section: DictConfig) -> bool:
    return section.get("_target_") == "auto"


def memory_budget(device: torch.device) -> int:
    """Bytes a full-batch solver may hold its training rows in."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free // 2
    return available_ram() // 4


def available_ram() -> int:
    """RAM that can be had without swapping: MemAvailable, which counts the page cache the
    kernel would give back (MemFree alone is small on a machine that has read much data)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def optimizer(cfg: DictConfig, data: DataModule, device: torch.device) -> tuple[str, str]:
    """The optimizer `optimizer=auto` stands for, and why."""
    size = f"{data.held_bytes / 2**20:,.1f} MiB of training rows"
    if cfg.model._target_ != LINEAR:
        return "adam", "a non-linear model"
    budget = memory_budget(device)
    if data.held_bytes <= budget:
        return "newton", f"a linear model, {size} fit in memory ({budget / 2**30:,.1f} GiB)"
    return "adagrad", f"a linear model, {size} exceed the memory budget ({budget / 2**30:,.1f} GiB)"


def resolve(cfg: DictConfig, data: DataModule, device: torch.device) -> dict[str, str]:
    """Replaces every `auto` section of `cfg` by its choice's config from `configs/`; returns
    the choices made (group -> choice)."""
    chosen = {}
    with open_dict(cfg):
        if is_auto(cfg.optimizer):
            name, why = optimizer(cfg, data, device)
            given = {k: v for k, v in cfg.optimizer.items() if k != "_target_" and v is not None}
            cfg.optimizer = OmegaConf.merge(
                OmegaConf.load(CONFIG_DIR / "optimizer" / f"{name}.yaml"), given)
            chosen["optimizer"] = name
            log.info("optimizer=auto: %s (%s)%s", name, why,
                     "".join(f", optimizer.{k}={v}" for k, v in given.items()))
        if is_auto(cfg.scheduler):
            name = "cosine" if cfg.optimizer._target_ == "torch.optim.SGD" else "constant"
            cfg.scheduler = OmegaConf.load(CONFIG_DIR / "scheduler" / f"{name}.yaml")
            chosen["scheduler"] = name
            log.info("scheduler=auto: %s (for %s)", name, cfg.optimizer._target_)
    return chosen
