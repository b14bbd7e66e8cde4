"""What the entry points share: the config directory, required keys, and building the objects
a config names. Entry points import this, never each other."""

import functools
from pathlib import Path
from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, OmegaConf

from largeml.errors import ConfigError, LargemlError

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "configs")


def required(cfg: DictConfig, key: str, usage: str) -> Any:
    """`cfg[key]` (dotted), or a ConfigError naming the key when it is unset."""
    if OmegaConf.is_missing(cfg, key) or OmegaConf.select(cfg, key) in (None, ""):
        raise ConfigError(f"{key} is required: {usage}")
    return OmegaConf.select(cfg, key)


def build(config: DictConfig, **runtime):
    """`instantiate`, except that our own errors (a bad file, a bad value) reach the user as
    themselves rather than wrapped in Hydra's InstantiationException."""
    try:
        return instantiate(config, **runtime)
    except InstantiationException as err:
        if isinstance(err.__cause__, LargemlError):
            raise err.__cause__ from None
        raise


def build_function(config: DictConfig) -> functools.partial:
    """A `_partial_` config called on every step (the loss), as a plain functools.partial:
    Hydra 1.3's own partial re-checks its target policy on each call, ~115 µs, ten times a
    `bce` over 4096 rows."""
    kwargs = {k: v for k, v in OmegaConf.to_container(config, resolve=True).items()
              if not k.startswith("_") and k != "class_weight"}  # see `loss_function`
    return functools.partial(get_object(config._target_), **kwargs)
