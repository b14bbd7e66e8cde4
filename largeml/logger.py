"""The run's record: TensorBoard scalars as training goes, then hyperparameters with their final
metrics and `metrics.json`, all in the run directory."""

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams as hparams_summary

from largeml import kernels
from largeml.files import replace_text

HParamValue = bool | int | float | str

# Equal-width bins for the weight histograms, as TensorFlow 2's own summaries use (30 there).
# SummaryWriter's default, ~1,500 exponential bins, costs a sort of the values: 87 ms for the
# 2 M weights of a hashed linear model at every validation here, 19 ms in equal bins.
HISTOGRAM_BINS = 64


class RunLogger:
    def __init__(self, run_dir: Path, purge_step: int | None = None) -> None:
        """`purge_step`: a resumed run's first step; TensorBoard hides what the interrupted run
        had logged from that step on, so the curves do not double back."""
        self.run_dir = run_dir
        self.writer = SummaryWriter(log_dir=str(run_dir), purge_step=purge_step)

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, step)

    def pr_curve(self, tag: str, labels, probabilities, step: int) -> None:
        self.writer.add_pr_curve(tag, labels.cpu(), probabilities.cpu(), step)

    def histograms(self, module: nn.Module, step: int) -> None:
        """Each parameter's values (TensorBoard's Histograms and Distributions tabs), in
        `HISTOGRAM_BINS` equal bins from its min to its max (`histogram`)."""
        for name, parameter in module.named_parameters():
            summary = histogram(parameter.detach().reshape(-1).float().cpu())
            if summary is not None:
                self.writer.add_histogram_raw(f"weights/{name}", *summary, global_step=step)

    def write_metrics(self, metrics: Mapping[str, float]) -> None:
        """Replaces `metrics.json` atomically: a reader never sees half a file."""
        replace_text(self.run_dir / "metrics.json",
                     json.dumps(dict(metrics), indent=2, sort_keys=True) + "\n")

    def finish(
        self, hparams: Mapping[str, HParamValue], metrics: Mapping[str, float], step: int
    ) -> None:
        """Records the final metrics and the hyperparameters that produced them.

        `SummaryWriter.add_hparams` would open a second run in a sub-directory; writing the three
        HParams summaries into this run's own file keeps one run per directory, and logging the
        final metrics as scalars at the last step gives the HParams tab their real values.
        Metrics named `group/name` go to TensorBoard; counters such as `step` only to the JSON.
        """
        scalars = {name: value for name, value in metrics.items() if "/" in name}
        self.log(scalars, step)
        for summary in hparams_summary(dict(hparams), scalars):
            self.writer.file_writer.add_summary(summary)
        self.write_metrics(metrics)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def histogram(values: Tensor, bins: int = HISTOGRAM_BINS) -> tuple | None:
    """The finite `values` in `bins` equal bins from their min to their max, as
    `SummaryWriter.add_histogram_raw` takes them: (min, max, count, sum, sum of squares, each
    bin's upper edge, each bin's count); None if no value is finite.

    On the CPU one compiled pass (`kernels.binned`) after torch's min and max, else torch
    reductions; not `add_histogram`: that one converts the values to float64 in numpy and
    takes their sum of squares with numpy's BLAS, whose threads then spin for a while on both
    cores. Over the 611 k weights of scripts/bench_sparse.py's click set the next epoch's
    first ~10 batches each lost 4-20 ms to them (0.05-0.08 s an epoch)."""
    lo, hi = torch.aminmax(values)
    if not (math.isfinite(lo) and math.isfinite(hi)):  # a diverged model: what is finite
        values = values[torch.isfinite(values)]
        if len(values) == 0:
            return None
        lo, hi = torch.aminmax(values)
    lo, hi = float(lo), float(hi)
    if lo < hi and kernels.available(values):  # one compiled pass: the counts and both sums
        counts, total, squares = kernels.binned(values, lo, hi, bins)
    else:
        counts = torch.histc(values, bins, lo, hi).tolist() if lo < hi else [float(len(values))]
        total = float(values.sum(dtype=torch.float64))
        squares = float(torch.linalg.vector_norm(values, dtype=torch.float64)) ** 2
    edges = torch.linspace(lo, hi, bins + 1, dtype=torch.float64)[1:].tolist() if lo < hi else [hi]
    return lo, hi, len(values), total, squares, edges, counts


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, HParamValue]:
    """{"optimizer": {"lr": 0.1}} -> {"optimizer.lr": 0.1}; values TensorBoard cannot show as
    numbers (None, lists) become strings; Hydra's `_partial_` flags are left out."""
    flat: dict[str, HParamValue] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if key == "_partial_":
            continue
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        elif isinstance(value, bool | int | float | str):
            flat[name] = value
        else:
            flat[name] = str(value)
    return flat


class NoLogger:
    """What ranks other than 0 log: nothing (rank 0 writes the run's record)."""

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        pass

    def write_metrics(self, metrics: Mapping[str, float]) -> None:
        pass

    def pr_curve(self, tag: str, labels, probabilities, step: int) -> None:
        pass

    def histograms(self, module: nn.Module, step: int) -> None:
        pass

    def finish(self, hparams: Mapping[str, Any], metrics: Mapping[str, float], step: int) -> None:
        pass

    def close(self) -> None:
        pass
