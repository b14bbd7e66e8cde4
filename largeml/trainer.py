"""The Trainer: device placement, the training loop, validation, logging and checkpoints.

`fit()` reads top to bottom: for each epoch, `train_step` on groups of batches, then
`validate` and `save_checkpoint`. Models, losses and optimizers arrive built; the Trainer only
decides where they run and when each thing happens.
"""

import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler
from torch.utils.data import DataLoader

import largeml
from largeml.checkpoint import save_checkpoint
from largeml.data import BatchDataset, DataModule
from largeml.errors import ConfigError
from largeml.logger import HParamValue, RunLogger
from largeml.metrics import accuracy, roc_auc
from largeml.models import penalised_weights

log = logging.getLogger(__name__)

LossFn = Callable[[Tensor, Tensor], Tensor]
Batch = tuple[Tensor, Tensor]


def resolve_device(device: str) -> torch.device:
    """`auto` is CUDA when present, else CPU; asking for CUDA without one is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"trainer.device={device} but PyTorch sees no CUDA device "
            f"(torch {torch.__version__}); use trainer.device=auto or trainer.device=cpu"
        )
    return torch.device(device)


class Trainer:
    def __init__(
        self,
        model: nn.Module,
        data: DataModule,
        loss_fn: LossFn,
        optimizer: Callable[..., Optimizer],
        scheduler: Callable[..., LRScheduler],
        l2: float,
        run_dir: Path,
        config: Mapping[str, Any],
        hparams: Mapping[str, HParamValue],
        device: str = "auto",
        precision: str = "32",
        max_epochs: int = 10,
        max_steps: int | None = None,
        val_every_n_steps: int | None = None,
        log_every_n_steps: int = 50,
        grad_clip_norm: float | None = None,
        accumulate_grad_batches: int = 1,
        checkpoint_every_n_steps: int | None = None,
        num_threads: int | None = None,
    ) -> None:
        self.device = resolve_device(device)
        self.num_threads = num_threads or cpu_threads(data.reader_threads)
        torch.set_num_threads(self.num_threads)
        self.model = model.to(self.device)
        self.data = data
        self.loss_fn = loss_fn
        self.l2 = l2
        self.run_dir = run_dir
        self.config = config
        self.hparams = hparams
        self.precision = str(precision)
        self.val_every_n_steps = val_every_n_steps
        self.log_every_n_steps = log_every_n_steps
        self.grad_clip_norm = grad_clip_norm
        self.accumulate = accumulate_grad_batches
        self.checkpoint_every_n_steps = checkpoint_every_n_steps

        self.steps_per_epoch = math.ceil(len(data.train) / self.accumulate)
        self.max_epochs = max_epochs
        self.total_steps = max_epochs * self.steps_per_epoch
        if max_steps is not None:
            self.total_steps = min(self.total_steps, max_steps)
        self.penalised = penalised_weights(self.model)
        self.optimizer = optimizer(self.model.parameters())
        self.scheduler = scheduler(self.optimizer, total_steps=self.total_steps, l2=l2)
        self.logger = RunLogger(run_dir)

        self.step = 0
        self.epoch = 0
        # Throughput counts the time in the loop, data loading included, but not the time spent
        # validating or checkpointing (`_paused`).
        self.train_seconds = 0.0
        self.rows_seen = 0
        self._window_loss = torch.zeros((), device=self.device)
        self._window_rows = 0
        self._window_start = time.perf_counter()
        self._window_paused = 0.0
        self._last_train: dict[str, float] = {}
        self._last_val: dict[str, float] = {}
        self._last_val_step = -1

    # -- the loop ---------------------------------------------------------------------------

    def fit(self) -> dict[str, float]:
        log.info(
            "training on %s (%d CPU threads): %d steps, %d per epoch, %s precision",
            self.device, self.num_threads, self.total_steps, self.steps_per_epoch, self.precision,
        )
        try:
            if self.data.resident:
                self._load_resident()
            self._window_start = time.perf_counter()
            while self.step < self.total_steps:
                self.data.train.set_epoch(self.epoch)
                steps = min(self.steps_per_epoch, self.total_steps - self.step)
                groups = _groups(self._loader(self.data.train), self.accumulate)
                for batches in islice(groups, steps):
                    self._window_loss += self.train_step(batches)
                    self._window_rows += sum(len(y) for _, y in batches)
                    if self.step % self.log_every_n_steps == 0:
                        self._log_train()
                    if self.val_every_n_steps and self.step % self.val_every_n_steps == 0:
                        self.validate()
                    if (
                        self.checkpoint_every_n_steps
                        and self.step % self.checkpoint_every_n_steps == 0
                    ):
                        self.save_checkpoint()
                if steps == self.steps_per_epoch:
                    self.epoch += 1
                self.validate()
                self.save_checkpoint()
            if self._window_rows:
                self._log_train()
            final = self._final_metrics()
            self.logger.finish(self.hparams, final, self.step)
        finally:
            self.logger.close()
        log.info("final: %s", _format(final))
        return final

    def train_step(self, batches: list[Batch]) -> Tensor:
        """One optimizer step on mean loss + λ/2·‖w‖² over all rows of `batches` (gradient
        accumulation: the same update as one batch of all those rows). Returns the summed
        per-row loss, detached."""
        self.model.train()
        rows = sum(len(y) for _, y in batches)
        total = torch.zeros((), device=self.device)
        for x, y in batches:
            x = x.to(self.device, non_blocking=True)
            y = y.to(self.device, non_blocking=True)
            with self._autocast():
                scores = self.model(x)
            losses = self.loss_fn(scores.float(), y)
            (losses.sum() / rows).backward()
            total += losses.detach().sum()
        if self.l2 > 0:
            # The gradient of λ/2·‖w‖² is λ·w. Added directly it costs one op per weight
            # matrix; through autograd it took a quarter of a small model's step.
            for w in self.penalised:
                w.grad.add_(w.detach(), alpha=self.l2)
        if self.grad_clip_norm:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return total

    @torch.inference_mode()
    def evaluate(self, dataset: BatchDataset) -> dict[str, float]:
        """Loss, accuracy and exact ROC AUC over every row of `dataset`."""
        self.model.eval()
        scores, targets = [], []
        for x, y in self._loader(dataset):
            with self._autocast():
                scores.append(self.model(x.to(self.device, non_blocking=True)).float())
            targets.append(y.to(self.device, non_blocking=True))
        s, t = torch.cat(scores), torch.cat(targets)
        return {
            "loss": self.loss_fn(s, t).mean().item(),
            "accuracy": accuracy(s, t),
            "auc": roc_auc(s.cpu(), t.cpu()),
        }

    def validate(self) -> dict[str, float]:
        if self.data.val is None or self._last_val_step == self.step:
            return self._last_val
        with self._paused():
            metrics = {f"val/{k}": v for k, v in self.evaluate(self.data.val).items()}
        self.logger.log(metrics, self.step)
        self.logger.write_metrics(self._final_metrics(metrics))
        log.info("step %d epoch %d: %s", self.step, self.epoch, _format(metrics))
        self._last_val, self._last_val_step = metrics, self.step
        return metrics

    def save_checkpoint(self) -> None:
        with self._paused():
            self._save_checkpoint()

    def _save_checkpoint(self) -> None:
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "step": self.step,
            "epoch": self.epoch,
            "config": self.config,
            "versions": {"largeml": largeml.__version__, "torch": str(torch.__version__)},
        }
        save_checkpoint(state, self.run_dir / "checkpoints" / "last.pt")

    # -- helpers ----------------------------------------------------------------------------

    def _loader(self, dataset: BatchDataset) -> DataLoader:
        # Items are whole batches (batch_size=None); pinned host memory lets the copy to the
        # GPU run asynchronously (non_blocking=True above). Resident batches are on the device
        # already: nothing to pin, nothing for workers to read.
        if self.data.resident:
            return DataLoader(dataset, batch_size=None)
        return DataLoader(dataset, batch_size=None, num_workers=self.data.num_workers,
                          pin_memory=self.device.type == "cuda")

    def _load_resident(self) -> None:
        """Loads a resident data set's rows once onto the training device."""
        started = time.perf_counter()
        for dataset in (self.data.train, self.data.val):
            if dataset is not None:
                dataset.to_device(self.device)
        log.info("data resident on %s, loaded in %.1f s", self.device,
                 time.perf_counter() - started)

    def _autocast(self):
        if self.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    @contextmanager
    def _paused(self) -> Iterator[None]:
        """Keeps the enclosed work out of the training throughput. Waits for the device first,
        so steps still queued on a GPU are timed as training."""
        self._synchronize()
        started = time.perf_counter()
        yield
        self._window_paused += time.perf_counter() - started

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _log_train(self) -> None:
        loss = self._window_loss.item() / self._window_rows  # .item() waits for the device
        seconds = time.perf_counter() - self._window_start - self._window_paused
        self.rows_seen += self._window_rows
        self.train_seconds += seconds
        self._last_train = {
            "train/loss": loss,
            "train/lr": self.optimizer.param_groups[0]["lr"],
            "train/samples_per_sec": self._window_rows / max(seconds, 1e-9),
        }
        self.logger.log(self._last_train, self.step)
        self._window_loss.zero_()
        self._window_rows = 0
        self._window_start, self._window_paused = time.perf_counter(), 0.0

    def _final_metrics(self, val: Mapping[str, float] | None = None) -> dict[str, float]:
        """The flat record of `metrics.json`: latest validation and training figures, with
        throughput averaged over the whole run so far."""
        return {
            **(self._last_val if val is None else val),
            **self._last_train,
            "train/samples_per_sec": self.rows_seen / max(self.train_seconds, 1e-9),
            "step": self.step,
            "epoch": self.epoch,
            "cpu_threads": self.num_threads,
        }


def cpu_threads(reader_threads: int = 0) -> int:
    """Torch's intra-op threads: the cores this process may run on, less one per thread that
    reads data ahead (on 2 cores, two compute threads plus a reader thread ran the streaming
    benchmark 1.5x slower than one compute thread plus the reader)."""
    return max(1, len(os.sched_getaffinity(0)) - reader_threads)


def _groups(batches: Iterable[Batch], size: int) -> Iterator[list[Batch]]:
    """Consecutive groups of `size` batches; the last group of an epoch may be smaller."""
    group: list[Batch] = []
    for batch in batches:
        group.append(batch)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


def _format(metrics: Mapping[str, float]) -> str:
    return ", ".join(f"{k}={v:.4g}" for k, v in metrics.items())
