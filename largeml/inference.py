"""Scoring with a trained model, for evaluate, predict and export: the checkpoint's model (its
feature map and classes with it), the evaluation stream of a data set, scores batch by batch in
the run's own precision, and the run's loss."""

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import Tensor, nn

from largeml import losses
from largeml.checkpoint import DamagedCheckpoint, load_checkpoint
from largeml.cli import build_function
from largeml.data.shards import ShardIndex
from largeml.data.stream import ShardStream
from largeml.device import autocast
from largeml.errors import ConfigError, DataError
from largeml.labels import BINARY, Classes
from largeml.progress import Progress


def model_width(state: dict[str, Tensor]) -> int:
    """The number of input features: the length of every model's input map."""
    return state["input.shift"].numel()


def load_model(path: str) -> tuple[nn.Module, dict[str, Any], Classes]:
    """The checkpoint's model in eval mode, on CPU, the training config saved with it (its
    `loss.class_weight` resolved to the weights the run used, in class order) and the classes
    it was trained on (two, 0 and 1, for checkpoints older than that record)."""
    if not Path(path).is_file():
        raise ConfigError(f"checkpoint: no such file: {path}")
    try:
        checkpoint = load_checkpoint(Path(path))
    except DamagedCheckpoint as err:
        raise DataError(f"checkpoint: {err}") from None
    config, state = checkpoint["config"], checkpoint["model"]
    classes = Classes.of_names(checkpoint.get("classes", BINARY.names))
    model = instantiate(config["model"], n_features=model_width(state),
                        n_outputs=classes.n_outputs)
    model.load_state_dict(state)
    config["loss"] = {**config["loss"], "class_weight": checkpoint.get("class_weights")}
    return model.eval(), config, classes


def is_logistic(config: dict[str, Any]) -> bool:
    """Whether the scores are logits: the model was trained with the logistic loss."""
    return config["loss"]["_target_"].endswith(".bce")


def stream(index: ShardIndex, width: int, batch_size: int, key: str,
           classes: Classes | None = None) -> ShardStream:
    """The rows of `index` in file order, batch by batch, `width` features wide; with
    `classes` (the checkpoint's), labels as class indices, checked to be among them."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    if index.n_features > width or (index.layout == "dense" and index.n_features != width):
        raise DataError(f"{key} {index.root} has {index.n_features} features but the model "
                        f"takes {width}; use data of the training set's width")
    if classes is not None:
        classes.check(index.label_counts, f"{key} {index.source.get('path', index.root)}")
    return ShardStream(index, batch_size, shuffle=False, n_features=width, evaluation=True,
                       classes=classes)


def precision_of(config: dict[str, Any]) -> str:
    """The training run's `trainer.precision`: scores computed as its validation computed them."""
    return str(config["trainer"].get("precision", 32))


@torch.no_grad()
def score(model: nn.Module, x: Tensor, device: torch.device, precision: str) -> Tensor:
    """The model's scores of the rows `x`, as float32 on the CPU."""
    with autocast(precision, device):
        return model(x.to(device)).float().cpu()


@torch.no_grad()
def scores_of(model: nn.Module, batches: ShardStream, device: torch.device,
              precision: str = "32") -> Iterator[tuple[Tensor, Tensor]]:
    """(scores, labels) of each batch, on the CPU, in file order, with a progress line."""
    progress = Progress(len(batches), unit="batch")
    progress.start(0)
    started, rows = time.perf_counter(), 0
    try:
        for done, (x, y) in enumerate(batches, 1):
            yield score(model, x, device, precision), y
            rows += len(y)
            progress.update(done, rows / max(time.perf_counter() - started, 1e-9))
    finally:
        progress.close()


def loss_of(config: dict[str, Any]):
    """The training run's loss, class weights included (as `load_model` gives them)."""
    loss_fn = build_function(OmegaConf.create(config["loss"]))
    weights = config["loss"].get("class_weight")
    return loss_fn if weights is None else losses.weighted(loss_fn, torch.tensor(weights))
