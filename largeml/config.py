"""Checks a composed config before any data or device is touched, naming the key at fault."""

import inspect
from collections.abc import Callable
from pathlib import Path

from hydra.utils import get_object
from omegaconf import DictConfig, OmegaConf

from largeml.auto import is_auto
from largeml.device import resolve_device
from largeml.errors import ConfigError
from largeml.trainer import BEST_METRICS, Trainer

PRECISIONS = ("32", "bf16")


def _positive(cfg: DictConfig, key: str, integer: bool = False, optional: bool = False) -> None:
    value = OmegaConf.select(cfg, key)
    if value is None and optional:
        return
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or value <= 0:
        what = "a positive integer" if integer else "a positive number"
        raise ConfigError(f"{key} must be {what}, got {value!r}")


# Keys of a section that are not arguments of its target: the loss's class weights are
# resolved from the data, then applied around the loss function (largeml.train.loss_function).
EXTRA_KEYS = {"loss": {"class_weight"}}


def _known_keys(cfg: DictConfig, section: str, target: Callable, runtime: set[str]) -> None:
    """Every key of `section` must be an argument of `target`; `runtime` ones are passed in code."""
    parameters = inspect.signature(target).parameters
    if any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
        return
    allowed = (set(parameters) - runtime - {"self"}) | EXTRA_KEYS.get(section, set())
    for key in cfg[section]:
        if not key.startswith("_") and key not in allowed:
            takes = ", ".join(sorted(allowed)) or "no settings"
            name = getattr(target, "__qualname__", target)
            raise ConfigError(f"{section}.{key} is not a setting of {section} ({name}); "
                              f"it takes: {takes}")


def validate(cfg: DictConfig) -> None:
    """Raises `ConfigError` for the first value that cannot work."""
    missing = [k for k in ("model", "loss", "optimizer", "scheduler", "data", "trainer")
               if k not in cfg]
    if missing:
        raise ConfigError(f"config has no {missing[0]!r} section; pick one, e.g. {missing[0]}=...")
    for section, runtime in (
        ("model", {"n_features", "n_outputs"}),
        ("optimizer", {"params"}),
        ("scheduler", {"optimizer", "total_steps", "l2"}),
        ("data", {"rank", "world_size"}),
        ("loss", {"scores", "targets"}),
    ):
        if section in ("optimizer", "scheduler") and is_auto(cfg[section]):
            continue  # chosen once the data is known (largeml.auto), then checked again
        try:
            target = get_object(cfg[section]._target_)
        except Exception as err:
            raise ConfigError(
                f"{section}._target_: cannot import {cfg[section]._target_}: {err}"
            ) from err
        _known_keys(cfg, section, target, runtime)
    _known_keys(cfg, "trainer", Trainer.__init__, {
        "model", "data", "loss_fn", "optimizer", "scheduler", "l2", "l1", "run_dir", "config",
        "hparams", "processes"})

    for key in OmegaConf.to_container(cfg.data, resolve=False):
        if OmegaConf.is_missing(cfg.data, key):
            raise ConfigError(f"data.{key} is required: add data.{key}=... to the command")

    _positive(cfg, "optimizer.lr", optional=is_auto(cfg.optimizer))
    _positive(cfg, "optimizer.hogwild", integer=True, optional=True)
    tol = cfg.trainer.get("tol")
    if isinstance(tol, bool) or not isinstance(tol, int | float) or tol < 0:
        raise ConfigError(f"trainer.tol must be a number >= 0 (0: no stopping rule), got {tol!r}")
    _positive(cfg, "data.batch_size", integer=True)
    _positive(cfg, "data.n_features", integer=True, optional=True)
    _positive(cfg, "trainer.max_epochs", integer=True)
    _positive(cfg, "trainer.max_steps", integer=True, optional=True)
    _positive(cfg, "trainer.log_every_n_steps", integer=True)
    _positive(cfg, "trainer.val_every_n_steps", integer=True, optional=True)
    _positive(cfg, "trainer.checkpoint_every_n_steps", integer=True, optional=True)
    _positive(cfg, "trainer.accumulate_grad_batches", integer=True)
    _positive(cfg, "trainer.grad_clip_norm", optional=True)
    _positive(cfg, "trainer.keep_checkpoints", integer=True)
    _positive(cfg, "trainer.early_stopping_patience", integer=True, optional=True)
    _positive(cfg, "trainer.dist_timeout")
    if cfg.trainer.best_metric not in BEST_METRICS:
        raise ConfigError(f"trainer.best_metric must be one of {', '.join(BEST_METRICS)}, "
                          f"got {cfg.trainer.best_metric!r}")

    if str(cfg.trainer.precision) not in PRECISIONS:
        raise ConfigError(
            f"trainer.precision must be one of {', '.join(PRECISIONS)}, "
            f"got {cfg.trainer.precision!r}"
        )
    resolve_device(str(cfg.trainer.device))

    reg = cfg.regularization
    if (reg.l2 is None) == (reg.C is None):
        raise ConfigError(
            "set exactly one of regularization.l2 (λ) and regularization.C, the other to null; "
            f"got l2={reg.l2}, C={reg.C}"
        )
    if reg.C is not None:
        _positive(cfg, "regularization.C")
    elif not isinstance(reg.l2, int | float) or reg.l2 < 0:
        raise ConfigError(f"regularization.l2 must be a number >= 0, got {reg.l2!r}")

    l1 = reg.get("l1", 0.0)
    if not isinstance(l1, int | float) or isinstance(l1, bool) or l1 < 0:
        raise ConfigError(f"regularization.l1 must be a number >= 0, got {l1!r}")

    for key in ("train_path", "val_path"):
        path = cfg.data.get(key)
        if path is not None and not Path(path).exists():
            raise ConfigError(f"data.{key}: no such file or directory: {path}")


def l2_strength(reg: DictConfig, n_train: int) -> float:
    """λ of `mean loss + λ/2·‖w‖²`. LIBLINEAR's C (objective `C·Σ loss + ½‖w‖²`) is the same
    problem scaled by C·n, so λ = 1/(C·n)."""
    return float(reg.l2) if reg.C is None else 1.0 / (reg.C * n_train)
