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
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig
from torch import nn

from largeml import metrics
from largeml.cli import CONFIG_DIR, required
from largeml.data.shards import ShardIndex
from largeml.data.sources import labelled, prepared
from largeml.data.stream import ShardStream
from largeml.device import resolve_device
from largeml.errors import ConfigError, DataError, LargemlError
from largeml.files import replace_text
from largeml.inference import (
    is_logistic,
    load_model,
    loss_of,
    model_width,
    precision_of,
    scores_of,
    stream,
)
from largeml.labels import BINARY, Classes

log = logging.getLogger(__name__)

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
