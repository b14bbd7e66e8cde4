"""`python -m largeml.evaluate checkpoint=PATH data.path=PATH`: a checkpoint's metrics on a
labelled data set.

The keys are in `configs/evaluate.yaml`. The model is rebuilt from the config saved in the
checkpoint, the data streamed in batches of `batch_size` rows (a shard directory, or a raw file
converted once into the cache, as `data=files` does), and the metrics printed as JSON and
written to `output`: `loss` (the training loss, as `val/loss`), `accuracy`, `auc`, `precision`,
`recall`, `f1`, `log_loss` (logistic models only), `hinge_loss`, `confusion_matrix` ([[tn, fp],
[fn, tp]]) and `rows`. For more than two classes, `auc` is the one-vs-rest mean, `precision`,
`recall` and `f1` are macro means, beside `macro_*`, `weighted_*`, `top_5_accuracy`, `classes`
(the labels as written, in the confusion matrix's order) and the K×K `confusion_matrix`. A
missing file or a bad option stops with exit code 2.
"""

import json
import logging
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from largeml import losses, metrics
from largeml.checkpoint import DamagedCheckpoint, load_checkpoint
from largeml.data.shards import ShardIndex
from largeml.data.sources import labelled, prepared
from largeml.data.stream import ShardStream
from largeml.errors import ConfigError, DataError, LargemlError
from largeml.files import replace_text
from largeml.labels import BINARY, Classes
from largeml.progress import Progress
from largeml.train import build_function
from largeml.trainer import autocast, resolve_device

log = logging.getLogger(__name__)

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "configs")


def required(cfg: DictConfig, key: str, usage: str) -> Any:
    """`cfg[key]` (dotted), or a ConfigError naming the key when it is unset."""
    if OmegaConf.is_missing(cfg, key) or OmegaConf.select(cfg, key) in (None, ""):
        raise ConfigError(f"{key} is required: {usage}")
    return OmegaConf.select(cfg, key)


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


def open_data(data: DictConfig, key: str = "data.path") -> ShardIndex:
    """The shard index of `data.path`: a prepared directory, or a raw file converted once."""
    path = str(data.path)
    if not Path(path).exists():
        raise DataError(f"{key}: no such file or directory: {path}")
    if data.label_column is None:
        raise ConfigError("data.label_column=null means no labels: evaluation needs them; name "
                          "the CSV's label column (largeml.predict scores unlabelled rows)")
    options = {"n_features": data.n_features, "label_column": data.label_column,
               "labels": None if data.labels is None else str(data.labels)}
    return labelled(prepared(path, key, data.format, data.cache_dir, **options), key)


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


def evaluate(model: nn.Module, config: dict[str, Any], batches: ShardStream,
             device: torch.device, classes: Classes = BINARY) -> dict[str, Any]:
    """Every metric over all rows of `batches` (labels as class indices of `classes`)."""
    pairs = list(scores_of(model.to(device), batches, device, precision_of(config)))
    s = torch.cat([p[0] for p in pairs])
    t = torch.cat([p[1] for p in pairs]).float()
    result: dict[str, Any] = {
        "loss": loss_of(config)(s, t).mean().item(),
        "accuracy": metrics.accuracy(s, t),
        "auc": metrics.roc_auc(s, t),
    }
    if classes.binary:
        result.update(precision=metrics.precision(s, t), recall=metrics.recall(s, t),
                      f1=metrics.f1(s, t))
    else:
        means = metrics.averaged(s, t)
        result.update(precision=means["macro_precision"], recall=means["macro_recall"],
                      f1=means["macro_f1"], **means,
                      top_5_accuracy=metrics.top_k_accuracy(s, t, 5))
    if is_logistic(config):
        result["log_loss"] = metrics.log_loss(s, t)
    result["hinge_loss"] = metrics.hinge_loss(s, t)
    result["confusion_matrix"] = metrics.confusion_matrix(s, t)
    if not classes.binary:
        result["classes"] = classes.names
    result["rows"] = len(t)
    return result


def default_output(checkpoint: str, data_path: str) -> Path:
    """`eval-<data file name less .gz, .npy, .csv>.json` in the run directory of
    `.../checkpoints/<file>.pt`, else beside the checkpoint."""
    where = Path(checkpoint).resolve().parent
    if where.name == "checkpoints":
        where = where.parent
    name = Path(data_path.rstrip("/")).name.removesuffix(".gz")
    for suffix in (".npy", ".csv"):
        name = name.removesuffix(suffix)
    return where / f"eval-{name}.json"


def write_json(result: dict[str, Any], path: Path) -> None:
    """Writes atomically: a temporary file renamed over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    replace_text(path, json.dumps(result, indent=2) + "\n")


def run(cfg: DictConfig) -> tuple[dict[str, Any], Path]:
    """Evaluates as `cfg` says; returns the metrics and the file they were written to."""
    usage = "python -m largeml.evaluate checkpoint=PATH data.path=PATH [output=FILE.json]"
    checkpoint = str(required(cfg, "checkpoint", usage))
    data_path = str(required(cfg, "data.path", usage))
    device = resolve_device(cfg.device)
    model, config, classes = load_model(checkpoint)
    index = open_data(cfg.data)
    batches = stream(index, model_width(model.state_dict()), cfg.batch_size, "data.path",
                     classes)
    result = evaluate(model, config, batches, device, classes)
    output = Path(cfg.output) if cfg.output else default_output(checkpoint, data_path)
    write_json({**result, "checkpoint": str(Path(checkpoint).resolve()),
                "data": str(Path(data_path).resolve())}, output)
    return result, output


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="evaluate")
def main(cfg: DictConfig) -> None:
    try:
        result, output = run(cfg)
    except LargemlError as err:
        log.error("%s", err)
        sys.exit(2)
    print(json.dumps(result))
    log.info("metrics of %s rows written to %s", f"{result['rows']:,}", output)


if __name__ == "__main__":
    main()
