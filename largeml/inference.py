"""Scoring with a trained model, for evaluate, predict and export: the checkpoint's model (its
feature map and classes with it), the rows to score in the training data's vocabulary, scores
batch by batch in the run's own precision, and the run's loss.

The feature map is what turns a raw row into model input. The scaling fitted in training is a
buffer of the model (`input.shift`, `input.mult`: `largeml.data.scaling`), so it travels with
the weights. How a raw file becomes columns (its label column, feature and categorical columns,
hashing) is the training config's `data` node, saved in the checkpoint: every key of it that
`largeml.data.convert.convert` takes (`feature_map_keys`) is passed again when a file is
converted for scoring, unless the command line sets it.
"""

import inspect
import time
from collections.abc import Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from largeml import losses
from largeml.checkpoint import DamagedCheckpoint, load_checkpoint
from largeml.cli import build, build_function
from largeml.data.shards import ShardIndex
from largeml.data.sources import labelled, prepared
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


# `convert`'s parameters that belong to one file, not to the feature map.
PER_FILE = ("input", "output", "format", "labels", "shard_bytes")
# Passed even when unset, as `data=files` passes them: a file converted for training (its
# validation file) is then found in the cache under the same key.
ALWAYS_PASSED = ("n_features", "label_column")
FILES = "largeml.data.files"


def feature_map_keys() -> list[str]:
    """The converter's options that say how a raw file becomes model input (label column,
    feature and categorical columns, hashing, width): `convert`'s parameters less `PER_FILE`."""
    from largeml.data.convert import convert  # only a raw file needs the converters

    return [k for k in inspect.signature(convert).parameters if k not in PER_FILE]


def conversion_options(node: Mapping[str, Any]) -> dict[str, Any]:
    """The feature-map options of a `data` node, as `data=files` passes them to the converter:
    `ALWAYS_PASSED`, and the others where set."""
    return {k: list(v) if isinstance(v, list | tuple) else v for k, v in node.items()
            if k in feature_map_keys() and (v is not None or k in ALWAYS_PASSED)}


def scoring_node(data: DictConfig, trained: Mapping[str, Any], given: Collection[str],
                 chosen: bool) -> dict[str, Any]:
    """The `data` node to score with, from the command line's `data` (a choice of
    `configs/data/` and its defaults, or `data.path`), the training run's config `trained` and
    the keys the command line set (`given`, as `cli.given` spells them):

    - a data choice made on the command line (`chosen`, and no `path`) that the run trained
      with (the same `_target_`) takes the run's values over the choice's defaults:
      `data=synthetic` is the run's generated set (its seed, size, noise), `data=files` its
      files and options;
    - a file to convert (`data.path`, or `data=files`'s `val_path`) takes the run's feature map
      (`feature_map_keys`) whatever the run trained on;
    - what the command line set wins over both."""
    node = OmegaConf.to_container(data, resolve=True)  # `${seed}` against the command's root
    run_data = trained.get("data", {})
    own = {k: node[k] for k in {g.split(".")[1] for g in given if g.startswith("data.")}
           if k in node}
    if chosen and node.get("path") is None and run_data.get("_target_") == node.get("_target_"):
        node |= run_data
    if node.get("path") is not None or node.get("_target_") == FILES:
        node |= {k: v for k, v in run_data.items() if k in feature_map_keys()}
    return node | own


@dataclass
class Scored:
    """The rows evaluate or predict score: batches of (features, labels) in file order, how
    many rows, and what they are (a file's path, or `data=<choice>`'s validation rows)."""

    batches: Iterable[tuple[Tensor, Tensor]]
    rows: int
    name: str
    is_file: bool


def rows_to_score(node: Mapping[str, Any], width: int, batch_size: int,
                  classes: Classes | None, need_labels: bool) -> Scored:
    """The rows `node` (`scoring_node`) names: the file `path`, the `val_path` of `data=files`
    (converted with the node's feature map), or the validation rows of the DataModule any
    other data choice builds (`data=a9a`: a9a.t; `data=synthetic`: its held-out split). With
    `classes` (the checkpoint's), labels are class indices of them."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    if node.get("path") is not None or node.get("_target_") == FILES:
        if node.get("path") is not None:
            key, path, labels = "data.path", node["path"], node.get("labels")
        else:
            key, path, labels = "data.val_path", node.get("val_path"), node.get("val_labels")
            if path is None:
                raise ConfigError(
                    "data=files: data.val_path is required (the validation file to score; the "
                    "checkpoint's run had none); or give data.path=FILE to score any one file, "
                    "the training file too")
        if need_labels and node.get("label_column", "label") is None:
            raise ConfigError("data.label_column=null means no labels: evaluation needs them; "
                              "name the CSV's label column (largeml.predict scores unlabelled "
                              "rows)")
        index = prepared(str(path), key, node.get("format", "auto"),
                         node.get("cache_dir", "~/.cache/largeml"),
                         labels=None if labels is None else str(labels),
                         **conversion_options(node))
        if need_labels:
            labelled(index, key)
        return Scored(stream(index, width, batch_size, key, classes), index.rows, str(path),
                      is_file=True)
    choice = str(node["_target_"]).rsplit(".", 1)[-1]
    module = build(OmegaConf.create({k: v for k, v in node.items() if k != "path"}),
                   rank=0, world_size=1)
    if module.val is None:
        raise ConfigError(f"data={choice} has no validation rows as configured (e.g. "
                          f"data.val_fraction=0); give data.path=FILE to score a file")
    if module.n_features != width:
        raise DataError(f"data={choice} has {module.n_features} features but the model takes "
                        f"{width}; use data of the training set's width")
    # The rows' labels are class indices of the data's own training labels: the same
    # indices of the checkpoint's classes (the same labels, or 0/1 for -1/+1), or no use.
    if classes is not None and [classes.position(name) for name in module.classes.names] != \
            list(range(module.classes.k)):
        raise DataError(f"data={choice}: its labels ({', '.join(module.classes.names)}) are not "
                        f"the training classes ({', '.join(classes.names)})")
    return Scored(module.val, module.val.n_rows, f"data={choice}", is_file=False)


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
