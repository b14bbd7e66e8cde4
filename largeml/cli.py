"""What the entry points share: the config directory, required keys, the keys a command line
set, the "log the error, exit 2" block, and building the objects a config names. Entry points
import this, never each other."""

import contextlib
import functools
import logging
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
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


def given(overrides: Sequence[str]) -> set[str]:
    """The keys and groups that command-line `overrides` set: `data=a9a` gives `data`,
    `data.val_path=x` and `+data.x=1` give `data.val_path` and `data.x`."""
    return {o.key_or_group for o in OverridesParser.create().parse_overrides(list(overrides))}


@contextlib.contextmanager
def exit_2_on_error(log: logging.Logger) -> Iterator[None]:
    """Our own errors (a bad option, a missing file) end the command with their message logged
    and exit code 2, without a traceback: the message names the key or file and the fix."""
    try:
        yield
    except LargemlError as err:
        log.error("%s", err)
        sys.exit(2)


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
