"""`python -m largeml.predict checkpoint=PATH input=PATH|data=CHOICE output=FILE.csv|FILE.npy`: one
prediction per input row, in the input's order.

The keys are in `configs/predict.yaml`. The rows are `input` (a file or shard directory,
converted with the training run's feature map: `largeml.inference.feature_map_keys`), or the
validation rows of a choice of `configs/data/` as evaluate reads them (`data=a9a`: a9a.t,
`data=files`: the run's `val_path` or `data.val_path=PATH`). Per row: `score` (the model's
output), `probability` (sigmoid of the score, for models trained with `loss=bce` only) and
`label` (the second class if score > 0, else the first: 1 or 0 for data labelled 0/1, +1 or -1
for -1/+1). For a model of K > 2 classes: `score_<label>` for each class, `probability_<label>`
(the softmax, loss=bce only) and `label`, the class of the highest score. Labels are spelled as
the training data spelled them (numbers, or a CSV's strings). The input is read and the output
written `batch_size` rows at a time, so memory is one batch whatever the file's size. A `.npy`
input is read in place (memory-mapped) and needs no labels, nor does a CSV or Parquet file
without the training run's label column; shard directories and LIBSVM / CSV / Parquet files go
through the same conversion cache as `data=files`. A missing file or a bad option stops with
exit code 2.
"""

import logging
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from torch import Tensor, nn

from largeml.cli import CONFIG_DIR, exit_2_on_error, given, required
from largeml.data.convert import csv_header, resolve_format
from largeml.data.sources import prepared
from largeml.device import resolve_device
from largeml.errors import ConfigError, DataError
from largeml.inference import (
    conversion_options,
    feature_map_keys,
    is_logistic,
    load_model,
    model_width,
    precision_of,
    rows_to_score,
    score,
    scores_of,
    scoring_node,
    stream,
)
from largeml.labels import BINARY, Classes

log = logging.getLogger(__name__)

USAGE = ("python -m largeml.predict checkpoint=PATH input=PATH output=FILE.csv|FILE.npy, or "
         "data=CHOICE (the validation rows of data=a9a, data=files data.val_path=PATH, ...) "
         "instead of input")


def npy_batches(path: Path, width: int, batch_size: int) -> tuple[int, Iterator[Tensor]]:
    """The row count of a 2-D `.npy` of features and its rows, `batch_size` at a time, read
    from a memory map (only the batch in hand is in memory)."""
    try:
        x = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as err:
        raise DataError(f"input {path}: not a readable .npy file ({err})") from None
    if x.ndim != 2 or x.dtype.kind not in "fiub":
        raise DataError(f"input {path}: features must be a 2-D numeric array, got {x.dtype} "
                        f"{x.shape}")
    if x.shape[1] != width:
        raise DataError(f"input {path} has {x.shape[1]} features but the model takes {width}")
    # np.array copies the batch out of the read-only map: torch wants writable memory.
    batches = (torch.from_numpy(np.array(x[lo:lo + batch_size], dtype=np.float32))
               for lo in range(0, len(x), batch_size))
    return len(x), batches


def input_scores(cfg: DictConfig, model: nn.Module, device: torch.device,
                 precision: str = "32", trained: Mapping[str, Any] | None = None,
                 ) -> tuple[int, Iterator[Tensor]]:
    """The number of rows of `cfg.input` and the model's scores, batch by batch, in row order,
    computed in `precision` (the training run's). A raw file is converted with the feature map
    of `trained` (the training config), with `cfg`'s `n_features` and `label_column` over it."""
    path = Path(str(cfg.input))
    width = model_width(model.state_dict())
    if not isinstance(cfg.batch_size, int) or cfg.batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {cfg.batch_size!r}")
    if not path.exists():
        raise DataError(f"input: no such file or directory: {path}")
    if path.is_file() and resolve_format(path, cfg.format) == "npy":
        rows, batches = npy_batches(path, width, cfg.batch_size)
        return rows, (score(model, x, device, precision) for x in batches)
    run_data = (trained or {}).get("data", {})
    node = {k: v for k, v in run_data.items() if k in feature_map_keys()}
    if cfg.n_features is not None:
        node["n_features"] = cfg.n_features
    node["label_column"] = cfg.label_column
    if cfg.label_column == "auto":  # a file to score often has no labels
        name = run_data.get("label_column", "label")
        node["label_column"] = name if name in column_names(path, cfg.format) else None
    index = prepared(str(path), "input", cfg.format, cfg.cache_dir, labels=None,
                     **conversion_options(node))
    shards = stream(index, width, cfg.batch_size, "input")
    return index.rows, (s for s, _ in scores_of(model, shards, device, precision))


def column_names(path: Path, format: str) -> list[str]:
    """The columns of a CSV (its header) or Parquet file (of a directory of parts, the
    first's); none for other inputs."""
    if path.is_dir() and format in ("auto", "shards") and (path / "index.json").exists():
        return []
    fmt = resolve_format(path, format)
    if fmt == "csv":
        return csv_header(path)
    if fmt == "parquet":
        import pyarrow.parquet  # only for Parquet input

        from largeml.data.formats.parquet import part_files

        parts = part_files(path)
        return pyarrow.parquet.read_schema(parts[0]).names if parts else []
    return []


def data_scores(cfg: DictConfig, overrides: Sequence[str], model: nn.Module,
                trained: dict[str, Any], device: torch.device,
                precision: str) -> tuple[int, Iterator[Tensor]]:
    """The validation rows of `cfg.data`, a data choice, and their scores, as evaluate reads
    them (`largeml.inference.rows_to_score`); labels, where there are, are not used."""
    node = scoring_node(cfg.data, trained, given(overrides), chosen=True)
    scored = rows_to_score(node, model_width(model.state_dict()), cfg.batch_size, None,
                           need_labels=False)
    return scored.rows, (s for s, _ in scores_of(model, scored.batches, device, precision))


def columns(scores: Tensor, logistic: bool, classes: Classes = BINARY) -> dict[str, np.ndarray]:
    """The output columns of a batch's scores, in order; `label`, the predicted class, is
    spelled as the training data spells it."""
    if classes.binary:
        out = {"score": scores.numpy()}
        if logistic:
            out["probability"] = torch.sigmoid(scores).numpy()
        out["label"] = classes.spelled((scores > 0).long().numpy())
        return out
    out = {f"score_{name}": scores[:, k].numpy() for k, name in enumerate(classes.names)}
    if logistic:
        p = torch.softmax(scores, dim=1)
        out |= {f"probability_{name}": p[:, k].numpy() for k, name in enumerate(classes.names)}
    out["label"] = classes.spelled(scores.argmax(1).numpy())
    return out


def label_dtype(classes: Classes) -> str:
    """The `.npy` type of the label column: the smallest integer that holds the labels, or
    strings as long as the longest."""
    if not classes.numeric:
        return f"U{max(len(n) for n in classes.names)}"
    values = np.array(classes.values)
    for kind in ("i1", "i2", "i4"):
        info = np.iinfo(kind)
        if info.min <= values.min() and values.max() <= info.max:
            return kind
    return "i8"


def csv_rows(values: dict[str, np.ndarray], names: list[str]) -> tuple[np.ndarray, list[str]]:
    """A batch's columns as one table for `np.savetxt`, and each column's format."""
    formats = ["%.9g"] * (len(names) - 1) + ["%d" if values["label"].dtype.kind == "i" else "%s"]
    if values["label"].dtype.kind == "i":
        return np.column_stack([values[n] for n in names]), formats
    table = np.empty((len(values["label"]), len(names)), dtype=object)
    for j, name in enumerate(names):
        table[:, j] = values[name]
    return table, formats


def run(cfg: DictConfig, overrides: Sequence[str] = ()) -> tuple[int, Path]:
    """Predicts as `cfg` says (`overrides`: the command line that composed it, which tells the
    `data.*` keys it set); returns the number of rows written and the output file."""
    checkpoint = str(required(cfg, "checkpoint", USAGE))
    from_data = cfg.get("data") is not None
    if from_data and cfg.input is not None:
        raise ConfigError(f"input={cfg.input} and data={cfg.data._target_.rsplit('.', 1)[-1]} "
                          "both name rows to predict: give one of them")
    if not from_data:
        required(cfg, "input", USAGE)
    output = Path(str(required(cfg, "output", USAGE)))
    if output.suffix not in (".csv", ".npy"):
        raise ConfigError(f"output={output} must end in .csv or .npy")
    device = resolve_device(cfg.device)
    model, config, classes = load_model(checkpoint)
    logistic = wants_probability(cfg.probability, config)
    if from_data:
        rows, batches = data_scores(cfg, overrides, model.to(device), config, device,
                                    precision_of(config))
    else:
        rows, batches = input_scores(cfg, model.to(device), device, precision_of(config),
                                     config)
    names = list(columns(torch.zeros((1, classes.k) if classes.n_outputs > 1 else 1), logistic,
                         classes))
    output.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    if output.suffix == ".npy":
        dtype = np.dtype([(n, label_dtype(classes) if n == "label" else "f4") for n in names])
        table = np.lib.format.open_memmap(output, mode="w+", dtype=dtype, shape=(rows,))
        for scores in batches:
            for name, values in columns(scores, logistic, classes).items():
                table[name][written:written + len(scores)] = values
            written += len(scores)
        table.flush()
        del table
    else:
        with open(output, "w") as file:
            file.write(",".join(names) + "\n")
            for scores in batches:
                table, formats = csv_rows(columns(scores, logistic, classes), names)
                np.savetxt(file, table, fmt=formats, delimiter=",")
                written += len(scores)
    assert written == rows, f"wrote {written} of {rows} rows"
    return written, output


def wants_probability(probability: Any, config: dict[str, Any]) -> bool:
    """Whether to write the probability column: `auto` for logistic models, `true` only where a
    score is a log-odds (loss=bce); a margin (hinge losses) is not a probability."""
    if probability not in ("auto", True, False):
        raise ConfigError(f"probability must be auto, true or false, got {probability!r}")
    if probability is True and not is_logistic(config):
        loss = config["loss"]["_target_"].rsplit(".", 1)[-1]
        raise ConfigError(
            f"probability=true, but this model was trained with loss={loss}: its scores are "
            "margins, not log-odds, so there is no probability to give (only models trained "
            "with loss=bce have one); use probability=auto or probability=false"
        )
    return is_logistic(config) if probability == "auto" else probability


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="predict")
def main(cfg: DictConfig) -> None:
    with exit_2_on_error(log):
        rows, output = run(cfg, HydraConfig.get().overrides.task)
    print(f"predicted {rows:,} rows -> {output}")


if __name__ == "__main__":
    main()
