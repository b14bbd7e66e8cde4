"""`python -m largeml.evaluate checkpoint=PATH data.path=PATH | data=CHOICE`: a checkpoint's
metrics on a labelled data set.

The keys are in `configs/evaluate.yaml`. The data is named as training names it: `data.path` (a
shard directory, or a raw file converted once into the cache with the training run's feature
map, `largeml.inference.scoring_node`), or a choice of `configs/data/` whose validation rows are
scored (`data=a9a`: a9a.t; `data=synthetic`: the run's held-out split; `data=files`: its
`val_path`), with the run's own values for the keys the command line leaves unset. The model is
rebuilt from the config saved in the checkpoint, the rows scored in batches of `batch_size`, and
the metrics printed as JSON and written to `output`: `loss` (the training loss, as `val/loss`),
`accuracy`, `auc`, `precision`, `recall`, `f1`, `log_loss` (logistic models only), `hinge_loss`,
`confusion_matrix` ([[tn, fp], [fn, tp]]) and `rows`. For more than two classes, `auc` is the
one-vs-rest mean, `precision`, `recall` and `f1` are macro means, beside `macro_*`,
`weighted_*`, `top_5_accuracy`, `classes` (the labels as written, in the confusion matrix's
order) and the K×K `confusion_matrix`. A missing file or a bad option stops with exit code 2.
"""

import json
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from torch import Tensor, nn

from largeml import metrics
from largeml.cli import CONFIG_DIR, exit_2_on_error, given, required
from largeml.device import resolve_device
from largeml.errors import ConfigError
from largeml.files import replace_text
from largeml.inference import (
    FILES,
    is_logistic,
    load_model,
    loss_of,
    model_width,
    precision_of,
    rows_to_score,
    scores_of,
    scoring_node,
)
from largeml.labels import BINARY, Classes

log = logging.getLogger(__name__)

USAGE = ("python -m largeml.evaluate checkpoint=PATH data.path=PATH, or a training data choice: "
         "data=a9a, data=synthetic, data=files [data.val_path=PATH] [output=FILE.json]")


def evaluate(model: nn.Module, config: dict[str, Any], batches: Iterable[tuple[Tensor, Tensor]],
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
    """`eval-<data file name less .gz, .npy, .csv>.json` (`eval-a9a.json` for `data=a9a`) in
    the run directory of `.../checkpoints/<file>.pt`, else beside the checkpoint."""
    where = Path(checkpoint).resolve().parent
    if where.name == "checkpoints":
        where = where.parent
    name = Path(data_path.rstrip("/")).name.removeprefix("data=").removesuffix(".gz")
    for suffix in (".npy", ".csv"):
        name = name.removesuffix(suffix)
    return where / f"eval-{name}.json"


def write_json(result: dict[str, Any], path: Path) -> None:
    """Writes atomically: a temporary file renamed over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    replace_text(path, json.dumps(result, indent=2) + "\n")


def run(cfg: DictConfig, overrides: Sequence[str] = ()) -> tuple[dict[str, Any], Path]:
    """Evaluates as `cfg` says (`overrides`: the command line that composed it, which tells the
    keys it set from the defaults); returns the metrics and the file they were written to."""
    checkpoint = str(required(cfg, "checkpoint", USAGE))
    keys = given(overrides)
    data = cfg.data
    if data.get("path") is None and data._target_ == FILES and data.val_path is None \
            and "data" not in keys:
        raise ConfigError(f"data.path is required: {USAGE}")
    if data.get("path") is not None and data._target_ != FILES:
        raise ConfigError(f"data.path={data.path} names a file to score, and a data choice was "
                          "given too: use data.path=FILE alone, or the choice's own keys "
                          "(data=files data.val_path=FILE)")
    device = resolve_device(cfg.device)
    model, config, classes = load_model(checkpoint)
    node = scoring_node(data, config, keys, chosen="data" in keys)
    scored = rows_to_score(node, model_width(model.state_dict()), cfg.batch_size, classes,
                           need_labels=True)
    result = evaluate(model, config, scored.batches, device, classes)
    output = Path(cfg.output) if cfg.output else default_output(checkpoint, scored.name)
    write_json({**result, "checkpoint": str(Path(checkpoint).resolve()),
                "data": str(Path(scored.name).resolve()) if scored.is_file else scored.name},
               output)
    return result, output


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="evaluate")
def main(cfg: DictConfig) -> None:
    with exit_2_on_error(log):
        result, output = run(cfg, HydraConfig.get().overrides.task)
    print(json.dumps(result))
    log.info("metrics of %s rows written to %s", f"{result['rows']:,}", output)


if __name__ == "__main__":
    main()
