"""The Trainer: device placement, the training loop, validation, logging and checkpoints.

`fit()` reads top to bottom: resume from the newest complete checkpoint, then for each epoch
`train_step` on groups of batches, then `validate` and `save_checkpoint`. Models, losses and
optimizers arrive built; the Trainer only decides where they run and when each thing happens.

Under torchrun every process runs the same loop on its share of each global batch (see
`largeml.data.batches`), the model wrapped in DistributedDataParallel; decisions (stop on
SIGTERM, best checkpoint, early stopping) come from values reduced over all ranks, so every rank
takes the same ones; only rank 0 writes logs, metrics and checkpoints.
"""

import gc
import logging
import math
import signal
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler
from torch.utils.data import DataLoader

import largeml
from largeml import distributed, kernels, objective
from largeml.checkpoint import (
    DamagedCheckpoint,
    link,
    load_checkpoint,
    newest_complete,
    prune,
    save_checkpoint,
    step_files,
)
from largeml.data import BatchDataset, DataModule, scaling
from largeml.device import autocast, cpu_threads, resolve_device
from largeml.distributed import Processes, SigtermAgreement
from largeml.errors import ConfigError, LargemlError
from largeml.logger import HParamValue, NoLogger, RunLogger
from largeml.losses import class_weights_of, on_device, smoothed
from largeml.metrics import accuracy, roc_auc
from largeml.models import penalised_weights
from largeml.progress import Progress, Throughput
from largeml.solvers import is_full_batch

log = logging.getLogger(__name__)

LossFn = Callable[[Tensor, Tensor], Tensor]
Batch = tuple[Tensor, Tensor]
BEST_METRICS = {"val/loss": "lowest", "val/accuracy": "highest", "val/auc": "highest"}
# Why a run ended, as `stopped` in metrics.json; only "converged" means the optimum was reached.
STOP_REASONS = ("converged", "max_epochs", "max_steps", "early stopping", "SIGTERM")
# A streaming optimizer's f moves by noise from epoch to epoch: it has converged once f has
# stopped falling (by tol) for this many epochs in a row, not after one flat epoch.
STALLED_EPOCHS = 2


class Preempted(LargemlError):
    """SIGTERM arrived: the step in progress finished and `last.pt` holds it."""


class Diverged(LargemlError):
    """The loss became NaN or infinite; no checkpoint of the diverged model was written."""


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
        max_epochs: int = 100,
        max_steps: int | None = None,
        tol: float = 1e-4,
        val_every_n_steps: int | None = None,
        log_every_n_steps: int = 50,
        grad_clip_norm: float | None = None,
        accumulate_grad_batches: int = 1,
        checkpoint_every_n_steps: int | None = None,
        keep_checkpoints: int = 3,
        best_metric: str = "val/loss",
        early_stopping_patience: int | None = None,
        resume: str | None = "auto",
        dist_timeout: float = 300.0,
        num_threads: int | None = None,
        processes: Processes | None = None,
        l1: float = 0.0,
    ) -> None:
        self.processes = processes or Processes()
        self.device = resolve_device(device, self.processes.local_rank)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.penalised = penalised_weights(model)
        self.module = model.to(self.device)  # the model itself: its state_dict is the checkpoint's
        # An optimizer that takes whole batches (FTRL) computes its own gradients, L2 included,
        # in O(the batch's non-zeros); every other one gets gradients from backward().
        self.takes_batches = getattr(getattr(optimizer, "func", optimizer), "takes_batches", False)
        _check_classes(optimizer, data)
        _check_l1(optimizer, l1)
        extra = {"l2": l2} if self.takes_batches else {}
        if l1 > 0:
            extra["l1"] = l1
        self.optimizer = optimizer(self.module.parameters(), **extra)
        # A full-batch solver (L-BFGS, Newton) takes one step per epoch over every training row,
        # held in memory; its closure sums gradients over ranks itself, so it needs no DDP.
        self.full_batch = is_full_batch(self.optimizer)
        # Threads follow the work: a streamed linear model leaves a core to its reader thread;
        # an MLP's step, or a full-batch solver (which reads its rows once), takes every core.
        self.num_threads = num_threads or cpu_threads(
            data.reader_threads, self.processes.local_world_size,
            compute_bound=len(self.penalised) > 1 or self.full_batch)
        torch.set_num_threads(self.num_threads)
        if self.takes_batches:
            _check_batch_optimizer(self.processes, accumulate_grad_batches, grad_clip_norm)
        # A learner that reads CSR rows itself on the CPU (FTRL's compiled loop) takes streamed
        # batches where they lie in the shards' memory maps (`ShardStream.in_place`): nothing
        # copied, and no reader thread. On scripts/bench_sparse.py's sets an epoch of that loop
        # took 0.56 s against 0.85 s on batches read for it (2 M features), 0.22 against 0.30 s
        # (click logs): as fast as on batches held in memory, where copying each batch beside
        # it had slowed it down.
        if (getattr(self.optimizer, "reads_in_place", False) and self.device.type == "cpu"
                and data.num_workers == 0 and hasattr(data.train, "in_place")):
            data.train.in_place = True
        distributed.start(self.processes, self.device, dist_timeout)
        self.model = self.module  # what the loop calls: under torchrun, wrapped in DDP
        if self.processes.distributed and not self.full_batch:
            with distributed.failures("broadcasting the initial weights"):
                self.model = DistributedDataParallel(
                    self.module,
                    device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.data = data
        self.loss_fn = loss_fn = on_device(loss_fn, self.device)  # class weights, once
        # The passes that evaluate a linear model over sparse shards on the CPU (the objective
        # and validation) read their rows in place too, split among this process's cores
        # (`objective._linear_value`, `kernels.linear_scores`).
        self.eval_lanes = 0  # 0: they read batches as they would for any model
        if (self.device.type == "cpu" and data.num_workers == 0 and data.sparse
                and hasattr(data.train_eval, "batches_in_place")
                and objective.compiled(self.module, self.loss_fn) is not None):
            self.eval_lanes = cpu_threads(0, self.processes.local_world_size,
                                          compute_bound=True)  # this process's cores
            kernels.set_threads(self.eval_lanes)
        # What the solver minimises: the loss itself, or for a full-batch solver a twice
        # differentiable stand-in of a non-smooth one (the hinge: see losses.smoothed).
        self.solver_loss_fn = smoothed(loss_fn) if self.full_batch else loss_fn
        self.l2, self.l1 = l2, l1
        self.run_dir = run_dir
        self.config = config
        self.hparams = hparams
        self.precision = str(precision)
        self.tol = tol
        self.val_every_n_steps = val_every_n_steps
        self.log_every_n_steps = log_every_n_steps
        self.grad_clip_norm = grad_clip_norm
        self.accumulate = accumulate_grad_batches
        self.checkpoint_every_n_steps = checkpoint_every_n_steps
        if best_metric not in BEST_METRICS:
            raise ConfigError(f"trainer.best_metric must be one of {', '.join(BEST_METRICS)}, "
                              f"got {best_metric!r}")
        self.keep_checkpoints = keep_checkpoints
        self.best_metric = best_metric
        self.early_stopping_patience = early_stopping_patience
        self.resume = resume
        self.checkpoints = run_dir / "checkpoints"

        self.epoch_length = 1 if self.full_batch else len(data.train)  # in batches
        self.steps_per_epoch = math.ceil(self.epoch_length / (1 if self.full_batch
                                                              else self.accumulate))
        self.max_epochs, self.max_steps = max_epochs, max_steps
        self.total_steps = max_epochs * self.steps_per_epoch
        if max_steps is not None:
            self.total_steps = min(self.total_steps, max_steps)
        self.scheduler = scheduler(self.optimizer, total_steps=self.total_steps, l2=l2)
        self.logger: RunLogger | NoLogger = NoLogger()
        self.held: list[Batch] = []  # the training rows of a full-batch solver, on the device
        self.closure: objective.FullBatch | objective.Streamed | None = None

        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0  # the position in the epoch, in batches: where a resume goes on
        self.best: float | None = None  # the best `best_metric` so far
        self.best_step = -1
        self.stale_validations = 0  # validations since `best` last improved
        # With early stopping: the model (and its validation) at `best`, which the run ends
        # with when it stops early.
        self.best_model: dict[str, Tensor] | None = None
        self.best_val: dict[str, float] | None = None
        # The stopping rule's record: ‖∇f‖ at the start, and the lowest f at an epoch's end.
        self.grad_norm0: float | None = None
        self.epoch_objective: float | None = None
        self.stalled_epochs = 0  # epochs in a row in which a streaming run's f fell < tol
        self.solver_objective: float | None = None  # f of what the solver minimises, last seen
        self.stop_reason: str | None = None
        self.sigterm = SigtermAgreement(self.processes, self.device)
        self._saved: tuple[int, int, int, int, str | None] | None = None
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="checkpoint")
        self._copy: Any = None  # the state the checkpoint writer was last given
        self._writing: Future | None = None  # the checkpoint being written
        # Throughput counts the time in the loop, data loading included, but not the time spent
        # validating or checkpointing (`_paused`).
        self.train_seconds = 0.0
        self.rows_seen = 0
        self.window = Throughput()
        self._window_loss = torch.zeros((), device=self.device)
        self._grad_norm: Tensor | None = None  # of the last step of a logging window
        self._progress = Progress(self.total_steps, enabled=self.processes.main)
        self._last_train: dict[str, float] = {}
        self.epoch_seconds: float | None = None  # the wall time of the last epoch, in full
        self._last_val: dict[str, float] = {}
        self._last_val_step = -1

    # -- the loop ---------------------------------------------------------------------------

    def fit(self) -> dict[str, float]:
        """Trains until the stopping rule (`tol`), the cap (`max_epochs` / `max_steps`) or early
        stopping, resuming first as `resume` says. On SIGTERM: finishes the step, saves
        `last.pt` and raises `Preempted`."""
        log.info(
            "training on %s, %d CPU threads, process %d of %d: %s, at most %d steps, %d per "
            "epoch, %s precision, tol %g", self.device, self.num_threads,
            self.processes.rank + 1, self.processes.world_size,
            f"full-batch {type(self.optimizer).__name__}" if self.full_batch
            else f"{type(self.optimizer).__name__} on batches", self.total_steps,
            self.steps_per_epoch, self.precision, self.tol,
        )
        hogwild = getattr(self.optimizer, "hogwild", 1)
        if hogwild > 1 and self.optimizer.learns_in_lanes(self.loss_fn, self.data.sparse,
                                                          self.device):
            log.info("optimizer.hogwild=%d: each batch learnt on %d cores at once, sharing the "
                     "state without locks (Hogwild): a run is not repeated bit for bit", hogwild,
                     min(hogwild, kernels.lanes()))
        elif hogwild > 1:
            log.warning("optimizer.hogwild=%d has no effect here: it splits the rows of FTRL's "
                        "compiled loop, which learns sparse rows on the CPU (with numba) for "
                        "bce, hinge and squared_hinge; this run takes one step a batch", hogwild)
        self._resume()
        if self.processes.main:  # resumed: TensorBoard hides what a killed run logged later
            self.logger = RunLogger(self.run_dir, purge_step=self.step or None)
        previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
        frozen = False
        try:
            if self.data.resident:
                self._load_resident()
            if self.step == 0 and self.grad_norm0 is None:
                self._fit_scaling()
            if self.full_batch:
                self._hold_training_rows()
            if self.grad_norm0 is None:  # f and ‖∇f‖ at the start, for the stopping rule
                with self._paused():
                    start = self._objective()
                self.epoch_objective = self.solver_objective
                self.logger.log(start, self.step)
                log.info("start: %s", _format(start))
            self.window.reset()
            # The objects alive now (torch's, Hydra's, numba's, the data's: 281,000 in an FTRL run)
            # are left out of the garbage collector's full passes while training: one such pass
            # scans them all holding the GIL, and one that ran in the checkpoint thread during
            # the second epoch of scripts/bench_sparse.py's click set took 0.13-0.15 s, the
            # steps beside it as long. The loop's own garbage is still collected. (Not when
            # the caller froze objects itself: unfreezing would undo that.)
            frozen = gc.get_freeze_count() == 0
            if frozen:
                gc.freeze()
            with distributed.failures("training (DDP's gradient all-reduce)"):
                self._train()
            if self.window.rows:
                self._log_train()
            if self.stop_reason == "SIGTERM":
                self.save_checkpoint()
                self.logger.write_metrics(self._final_metrics())
                raise Preempted(
                    f"stopped by SIGTERM after step {self.step}; {self.checkpoints / 'last.pt'} "
                    "holds it: run the same command again to resume"
                )
            final = self._final_metrics()
            self.logger.finish(self.hparams, final, self.step)
        finally:
            if frozen:
                gc.unfreeze()  # what training left of them may be collected again
            signal.signal(signal.SIGTERM, previous_handler)
            self.wait_for_checkpoint()
            self._progress.close()
            self.logger.close()
            # DDP holds the process group: let go of it so that distributed.stop() frees the
            # group (and joins gloo's threads) while the interpreter is still whole.
            self.model = self.module
        log.info("final: %s", _format(final))
        return final

    def _train(self) -> None:
        self._progress.start(self.step)
        self.sigterm.reset(self.step)
        while self.step < self.total_steps and self.stop_reason is None:
            started = time.perf_counter()
            for batches in _timed(self._epoch_groups(), self._waited):
                logging_step = (self.step + 1) % self.log_every_n_steps == 0
                self._window_loss += self.train_step(batches, grad_norm=logging_step)
                self.window.rows += (self.closure.n_local if isinstance(
                    self.closure, objective.Streamed) else sum(len(y) for _, y in batches))
                self.window.steps += 1
                self._progress.update(self.step, self._last_train.get("perf/samples_per_sec"))
                if logging_step:
                    self._log_train()
                if self.sigterm.anywhere(self.step):
                    self.stop_reason = "SIGTERM"
                    return
                if self.val_every_n_steps and self.step % self.val_every_n_steps == 0:
                    self._judge(self.validate())
                if self.stop_reason or (
                    self.checkpoint_every_n_steps and self.step % self.checkpoint_every_n_steps == 0
                ):
                    self.save_checkpoint()
                if self.step >= self.total_steps or self.stop_reason:
                    break
            end_of_epoch = self.batch_in_epoch >= self.epoch_length
            if end_of_epoch:
                self.epoch += 1
                self.batch_in_epoch = 0
            metrics = self.validate()
            self._judge(metrics)
            if end_of_epoch:
                self._check_convergence(metrics)
            self.save_checkpoint()
            if end_of_epoch:  # what the epoch cost: its steps, validation and checkpoint
                self.epoch_seconds = time.perf_counter() - started
                self.logger.log({"perf/epoch_seconds": self.epoch_seconds}, self.step)
        if self.stop_reason is None:  # the cap
            self.stop_reason = ("max_steps" if self.max_steps is not None
                                and self.step >= self.max_steps else "max_epochs")
            log.warning("did not converge: stopped by trainer.%s after %d steps (%d epochs)%s; "
                        "raise it, or loosen trainer.tol (%g)", self.stop_reason, self.step,
                        self.epoch, self._convergence_text(), self.tol)
            self.save_checkpoint()

    def _epoch_groups(self) -> Iterator[list[Batch]]:
        """The groups of batches of the rest of this epoch, one optimizer step each."""
        if self.full_batch:
            return iter([self.held] if self.batch_in_epoch == 0 else [])
        self.data.train.set_epoch(self.epoch, self.batch_in_epoch)
        return _groups(self._loader(self.data.train), self.accumulate)

    def train_step(self, batches: list[Batch], grad_norm: bool = False) -> Tensor:
        """One optimizer step on mean loss + λ/2·‖w‖² over all rows of `batches` (gradient
        accumulation: the same update as one batch of all those rows), or for a full-batch
        solver one step of it over the held training rows. Returns the summed per-row loss,
        detached. With `grad_norm`, keeps the gradient's global L2 norm (before clipping) for
        the log."""
        if not self.module.training:  # validation left it in eval mode
            self.model.train()
        if self.takes_batches:  # FTRL: no gradients here to clip, measure or zero
            x, y = batches[0]  # one: _check_batch_optimizer allows no accumulation
            losses = self.optimizer.step_batch(self.module, x.to(self.device, non_blocking=True),
                                               y.to(self.device, non_blocking=True), self.loss_fn)
            self.batch_in_epoch += 1
            self.scheduler.step()
            self.step += 1
            return losses.sum()
        if self.full_batch:
            self.optimizer.step(self.closure)
            total = self.closure.loss_sum
            self.batch_in_epoch += 1
        else:
            rows = sum(len(y) for _, y in batches)
            total = torch.zeros((), device=self.device)
            for i, (x, y) in enumerate(batches):
                x = x.to(self.device, non_blocking=True)
                y = y.to(self.device, non_blocking=True)
                # Under DDP, gradients are averaged over ranks once, on the group's last batch.
                last = i == len(batches) - 1
                with nullcontext() if last else self._no_sync():
                    losses = objective.backward_rows(self.model, self.loss_fn, x, y, rows,
                                                     self._autocast())
                total += losses.sum()
            objective.add_penalty_gradient(self.penalised, self.l2)
            self.batch_in_epoch += len(batches)
        if self.grad_clip_norm and not self.full_batch:
            self._grad_norm = nn.utils.clip_grad_norm_(self.module.parameters(),
                                                       self.grad_clip_norm)
        elif grad_norm:
            self._grad_norm = nn.utils.get_total_norm(
                [p.grad for p in self.module.parameters() if p.grad is not None])
        if not self.full_batch:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return total

    def _metrics(self, s: Tensor, t: Tensor) -> dict[str, float]:
        """Loss, accuracy and exact ROC AUC of scores `s` against labels `t`."""
        return {
            "loss": self.loss_fn(s, t).mean().item(),
            "accuracy": accuracy(s, t),
            "auc": roc_auc(s.cpu(), t.cpu()),
        }

    @torch.inference_mode()
    def scores(self, dataset: BatchDataset) -> tuple[Tensor, Tensor]:
        """The model's score and the label of every row of `dataset`, gathered from all ranks."""
        self.module.eval()
        k = self.data.classes.n_outputs  # a rank without rows still sends the right shape
        scores = [torch.zeros((0, k) if k > 1 else 0, device=self.device)]
        targets = [torch.zeros(0, device=self.device)]
        for x, y in self._eval_rows(dataset):
            with self._autocast():
                scores.append(self.module(x.to(self.device, non_blocking=True)).float())
            targets.append(y.to(self.device, non_blocking=True))
        return (distributed.gather_rows(torch.cat(scores)),
                distributed.gather_rows(torch.cat(targets)))

    def validate(self) -> dict[str, float]:
        """The metrics of this step: the training objective f over every training row
        (`train/objective`, and ‖∇f‖ relative to its start, `train/grad_norm_rel`) and, where
        there are validation rows, `val/loss`, `val/accuracy`, `val/auc`. Logged, and kept for
        metrics.json; the loop decides what follows from them."""
        if self._last_val_step == self.step:
            return self._last_val
        with self._paused():
            self._settle()
            if self._objective_wanted():
                metrics = self._objective()
            else:
                metrics, self.solver_objective = {}, None  # not measured at this validation
            if self.data.val is not None:
                scores, targets = self.scores(self.data.val)
                metrics.update({f"val/{k}": v for k, v in self._metrics(scores, targets).items()})
                # Any increasing map of the scores gives the same curve; the sigmoid puts a
                # logit or a margin in [0, 1], as TensorBoard wants. (Two classes only.)
                if scores.dim() == 1:
                    self.logger.pr_curve("val/pr_curve", targets, torch.sigmoid(scores),
                                         self.step)
            self.logger.histograms(self.module, self.step)
        self._last_val, self._last_val_step = metrics, self.step
        self.logger.log(metrics, self.step)
        self.logger.write_metrics(self._final_metrics(metrics))
        log.info("step %d epoch %d: %s", self.step, self.epoch, _format(metrics))
        return metrics

    def _objective_wanted(self) -> bool:
        """Whether this validation measures f over the training rows: always for a full-batch
        solver (its closure has it), at every validation when the stopping rule needs it
        (tol > 0), else (tol = 0: train to the cap) only at the end, since for a streaming
        optimizer it is one more pass over the training rows per validation."""
        return self.full_batch or self.tol > 0 or self.step >= self.total_steps

    def _objective(self) -> dict[str, float]:
        """f (the documented loss) and the relative gradient norm of what the solver minimises,
        over all training rows."""
        if self.closure is not None:  # full batch: the solver's own f, ∇f (its next step's start)
            closure = self.closure
            l1_term = self.l1 * objective.l1_norm(self.penalised) if self.l1 else 0.0
            self.solver_objective = closure().item() + l1_term
            g = objective.subgradient_norm(closure.params, [p.grad for p in closure.params],
                                           closure.penalised, self.l1)
            self.optimizer.zero_grad(set_to_none=True)
            f = self.solver_objective if self.solver_loss_fn is self.loss_fn else objective.value(
                self.module, self.loss_fn, self.held, self.l2, self.data.n_train,
                reduce=distributed.sum_, l1=self.l1)[0]  # a smoothed hinge: the hinge's f
        else:  # one more pass over the training set, forward and backward, updating nothing
            rows = self._eval_rows(self.data.train_eval)
            f, g = objective.value(self.module, self.loss_fn, rows, self.l2, self.data.n_train,
                                   gradient=True, reduce=distributed.sum_, device=self.device,
                                   l1=self.l1, lanes=max(self.eval_lanes, 1))
            self.solver_objective = f
        if not math.isfinite(f):
            raise self._diverged(f"training objective is {f}")
        if self.grad_norm0 is None:
            self.grad_norm0 = g
        return {"train/objective": f, "train/grad_norm_rel": g / max(self.grad_norm0, 1e-30)}

    def _judge(self, metrics: Mapping[str, float]) -> None:
        """What a validation means: divergence, a new best (saved at once: best.pt must hold
        this very step), early stopping."""
        if "val/loss" in metrics and not math.isfinite(metrics["val/loss"]):
            raise self._diverged(f"validation loss is {metrics['val/loss']}")
        if self.best_metric not in metrics:
            return
        value = metrics[self.best_metric]
        lowest = BEST_METRICS[self.best_metric] == "lowest"
        patience = self.early_stopping_patience
        if self.best is None or (value < self.best if lowest else value > self.best):
            self.best, self.best_step, self.stale_validations = value, self.step, 0
            if patience:
                self.best_model = _snapshot(self.module.state_dict())
                self.best_val = dict(metrics)
        else:
            self.stale_validations += 1
            if patience and self.stale_validations >= patience:
                self.stop_reason = "early stopping"
                log.info("early stopping: %s has not improved on %.6g (step %d) in %d "
                         "validations; the run ends with the model of step %d",
                         self.best_metric, self.best, self.best_step, self.stale_validations,
                         self.best_step)
                self._restore_best()
        if self.best_step == self.step and self.step > 0:
            self.save_checkpoint()

    def _restore_best(self) -> None:
        """Early stopping ends with the best model: its weights, and its validation as the
        final metrics (metrics.json, last.pt)."""
        if self.best_model is None:  # a checkpoint of a largeml before this record
            log.warning("early stopping: the best model is not at hand (resumed from an older "
                        "checkpoint); the run ends with the model of step %d", self.step)
            return
        self.module.load_state_dict(self.best_model)
        self._last_val = dict(self.best_val or self._last_val)
        if "train/objective" not in self._last_val:  # tol=0 measured no f at the best step
            with self._paused():
                self._last_val.update(self._objective())

    def _check_convergence(self, metrics: Mapping[str, float]) -> None:
        """The stopping rule, at the end of each epoch: a full-batch solver has converged when
        ‖∇f‖ has fallen below `tol` times its start, or when an iteration no longer lowers f at
        all (the arithmetic's limit); a streaming optimizer when f has fallen by less than
        `tol`, relatively, below its lowest so far, in each of `STALLED_EPOCHS` epochs in a row
        (f stalls: as scikit-learn's SGDClassifier, not a proof of the optimum). `tol=0` never
        stops. f is what the solver minimises."""
        f, previous = self.solver_objective, self.epoch_objective
        if f is None:  # tol = 0: f is not measured before the end, and nothing waits on it
            return
        self.epoch_objective = f if previous is None else min(f, previous)
        if self.tol <= 0 or self.stop_reason is not None:
            return
        decrease = None if previous is None else (previous - f) / max(abs(f), 1e-30)
        if self.full_batch:
            converged = metrics["train/grad_norm_rel"] <= self.tol or (
                decrease is not None and decrease <= 0)
        else:
            self.stalled_epochs = self.stalled_epochs + 1 if (
                decrease is not None and decrease < self.tol) else 0
            converged = self.stalled_epochs >= STALLED_EPOCHS
        if converged:
            self.stop_reason = "converged"
            log.info("converged after %d epochs (%d steps)%s, trainer.tol=%g", self.epoch,
                     self.step, self._convergence_text(decrease), self.tol)

    def _convergence_text(self, decrease: float | None = None) -> str:
        last = self._last_val
        if "train/objective" not in last:
            return ""
        text = (f": objective {last['train/objective']:.8g}, gradient norm "
                f"{last['train/grad_norm_rel']:.3g} of its start")
        return text if decrease is None else f"{text}, relative decrease {decrease:.3g}"

    def save_checkpoint(self) -> None:
        """Rank 0 writes `step-N.pt`, points `last.pt` (and `best.pt` when this step is the best)
        at it and keeps the newest `keep_checkpoints` step files. Every rank must call it: it
        gathers each rank's RNG state first, which also waits until all have finished the step."""
        if self._saved == self._position():
            return
        with self._paused():  # the weights checked and saved are the optimizer's current ones
            self._settle()
        finite = bool(torch.isfinite(self._window_loss)) and all(
            _all_finite(p) for p in self.module.parameters())
        if distributed.any_(not finite, self.device):  # a diverged model is never saved
            raise self._diverged("training loss or weights are not finite")
        with self._paused():
            rng = distributed.gather_objects(_rng_state(self.device))
            if self.processes.main:
                self._write_checkpoint(rng)
        self._saved = self._position()

    def _position(self) -> tuple[int, int, int, int, str | None]:
        """What a checkpoint records beyond the step: saving again is needed when it changes
        (an epoch's last step is saved by step count, then again once the epoch is counted, and
        again once the run knows why it stopped)."""
        return self.step, self.epoch, self.batch_in_epoch, self.best_step, self.stop_reason

    def _write_checkpoint(self, rng: list[dict[str, Tensor]]) -> None:
        weights = class_weights_of(self.loss_fn)
        state = {
            "model": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": None,  # bf16 autocast needs no gradient scaler
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "best": {"metric": self.best_metric, "value": self.best, "step": self.best_step,
                     "stale_validations": self.stale_validations, "model": self.best_model,
                     "val": self.best_val},
            "convergence": {"grad_norm0": self.grad_norm0, "epoch_objective": self.epoch_objective,
                            "stalled_epochs": self.stalled_epochs,
                            "stop_reason": self.stop_reason},
            "rng": rng,  # one entry per rank
            "progress": {"rows_seen": self.rows_seen, "train_seconds": self.train_seconds,
                         "last_train": self._last_train, "last_val": self._last_val,
                         "last_val_step": self._last_val_step},
            "world_size": self.processes.world_size,
            "classes": self.data.classes.names,  # the labels, as written, of class 0, 1, ...
            "class_weights": None if weights is None else weights.tolist(),
            "config": self.config,
            "versions": {"largeml": largeml.__version__, "torch": str(torch.__version__)},
        }
        # Written by a thread while training goes on (a 2 M-feature FTRL checkpoint, 24 MiB
        # with its fsyncs, took a fifth of an epoch): from a copy, so the step's own numbers.
        # One write at a time; the next save, a divergence and the end of fit() wait for it.
        self.wait_for_checkpoint()
        # Into the last copy's tensors, now written: fresh memory for a copy of 24 MiB cost
        # page faults at every epoch's end (the uniform set of scripts/bench_sparse.py: 44 ms
        # an epoch in the training thread, 10 ms into the last copy).
        self._copy = _snapshot(state, self._copy)
        self._writing = self._writer.submit(self._store, self._copy, self.step,
                                            self.best_step == self.step)

    def _store(self, state: dict[str, Any], step: int, best: bool) -> None:
        path = self.checkpoints / f"step-{step:09d}.pt"
        save_checkpoint(state, path)
        link(path, self.checkpoints / "last.pt")
        if best:
            link(path, self.checkpoints / "best.pt")
        prune(self.checkpoints, self.keep_checkpoints)

    def wait_for_checkpoint(self) -> None:
        """Returns once the checkpoint being written is on disk (raising what its write
        raised)."""
        writing, self._writing = self._writing, None
        if writing is not None:
            writing.result()

    def _resume(self) -> None:
        """`resume=auto`: from the newest complete checkpoint of this run directory, if any;
        `resume=<path>`: from that file; `resume=null`: from scratch. Rank 0 reads the file and
        sends it to the others, so only rank 0 needs to see the run directory."""
        if self.resume is None:
            if self.processes.main and step_files(self.checkpoints):
                raise ConfigError(
                    f"trainer.resume=null, but {self.checkpoints} holds an earlier run's "
                    "checkpoints; give this run its own hydra.run.dir, or use trainer.resume=auto "
                    "to continue that run"
                )
            return
        state = None
        if self.processes.main:
            if self.resume == "auto":
                found = newest_complete(self.checkpoints)
                state = None if found is None else found[1]
                if found is not None:
                    log.info("resuming from %s", found[0])
            else:
                try:
                    state = load_checkpoint(Path(self.resume))
                except (DamagedCheckpoint, OSError) as err:
                    raise ConfigError(f"trainer.resume={self.resume}: {err}") from err
                log.info("resuming from %s", self.resume)
        state = distributed.from_main(state)
        if state is None:
            return
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.epoch = state["step"], state["epoch"]
        self.batch_in_epoch = state["batch_in_epoch"]
        best = state["best"]
        if best["metric"] == self.best_metric:
            self.best, self.best_step = best["value"], best["step"]
            self.stale_validations = best["stale_validations"]
            self.best_model, self.best_val = best.get("model"), best.get("val")
        progress = state["progress"]
        self.rows_seen, self.train_seconds = progress["rows_seen"], progress["train_seconds"]
        self._last_train, self._last_val = progress["last_train"], progress["last_val"]
        self._last_val_step = progress["last_val_step"]
        # Checkpoints of largeml before the stopping rule have no record: start it afresh.
        convergence = state.get("convergence", {})
        self.grad_norm0 = convergence.get("grad_norm0")
        self.epoch_objective = convergence.get("epoch_objective")
        self.stalled_epochs = convergence.get("stalled_epochs", 0)
        if convergence.get("stop_reason") in ("converged", "early stopping"):
            self.stop_reason = convergence["stop_reason"]  # done: a rerun trains no further
        self._saved = self._position()
        rng = state["rng"]
        if len(rng) == self.processes.world_size:
            _set_rng_state(rng[self.processes.rank], self.device)
        else:
            log.warning("resuming %d processes from a checkpoint of %d: RNG states not restored",
                        self.processes.world_size, len(rng))
        log.info("resumed at step %d (epoch %d, batch %d of the epoch)",
                 self.step, self.epoch, self.batch_in_epoch)

    # -- helpers ----------------------------------------------------------------------------

    def _loader(self, dataset: BatchDataset) -> Iterable[Batch]:
        # Items are whole batches (batch_size=None); pinned host memory lets the copy to the
        # GPU run asynchronously (non_blocking=True above). Resident batches are on the device
        # already: nothing to pin, nothing for workers to read.
        # Read in this process for the CPU, the batches need nothing a DataLoader adds, and its
        # per-batch bookkeeping (a profiler range, the GIL taken back from the reader thread)
        # cost 0.3 ms a batch: a third of a sparse FTRL step of 1024 rows.
        if self.data.num_workers == 0 and (self.data.resident or self.device.type == "cpu"):
            return dataset
        # A DataLoader draws a seed for its workers from the global RNG unless given a generator
        # of its own; that draw would shift dropout's random numbers after a resume.
        generator = torch.Generator().manual_seed(0)
        return DataLoader(dataset, batch_size=None, num_workers=self.data.num_workers,
                          pin_memory=self.device.type == "cuda", generator=generator)

    def _eval_rows(self, dataset: BatchDataset) -> Iterable[Batch]:
        """The batches of an evaluation pass: read in place (`RowPieces`) where the passes of
        this model take them (`eval_lanes`), else as `_loader` reads them."""
        if self.eval_lanes and getattr(dataset, "sparse", False) and hasattr(
                dataset, "batches_in_place"):
            return dataset.batches_in_place()
        return self._loader(dataset)

    def _load_resident(self) -> None:
        """Loads a resident data set's rows once onto the training device."""
        started = time.perf_counter()
        for dataset in (self.data.train, self.data.val):
            if dataset is not None:
                dataset.to_device(self.device)
        log.info("data resident on %s, loaded in %.1f s", self.device,
                 time.perf_counter() - started)

    def _fit_scaling(self) -> None:
        """Fits `data.scale` on the training rows (one pass) into the model's input map."""
        if getattr(self.module, "input", None) is None:
            if self.data.scale not in ("none", "auto"):
                raise ConfigError(f"data.scale={self.data.scale}: this model has no input map")
            return
        with self._paused():
            fitted = scaling.fit(self.data.scale, self._eval_rows(self.data.train_eval),
                                 self.data.n_features, self.data.sparse, distributed.sum_,
                                 distributed.max_, self.device)
        self.module.input.set(fitted.shift.to(self.device), fitted.mult.to(self.device))
        log.info("feature scaling: %s (%s)", fitted.kind, fitted.why)

    def _hold_training_rows(self) -> None:
        """Reads this rank's share of the training rows once onto the device, for the full-batch
        solver's closure; a held batch is never reused by the reader (it counts references).
        A linear model over sparse shards on the CPU holds none: its closure reads them in place
        at each pass (`objective.Streamed`), on this process's cores."""
        loss = objective.compiled(self.module, self.solver_loss_fn)
        if self.eval_lanes and loss in objective.SECOND_ORDER_LOSSES:
            self.closure = objective.Streamed(
                self.module, loss, self.data.train_eval.batches_in_place, self.l2,
                self.data.n_train, reduce=distributed.sum_, lanes=self.eval_lanes)
            log.info("full batch: the training rows read in place at each pass, in %d lanes",
                     len(self.closure.own))
            return
        started = time.perf_counter()
        self.held = [(x.to(self.device), y.to(self.device))
                     for x, y in self._loader(self.data.train_eval)]
        self.closure = objective.FullBatch(
            self.module, self.solver_loss_fn, self.held, self.l2, self.data.n_train,
            reduce=distributed.sum_, second_order=getattr(self.optimizer, "second_order", False))
        log.info("full batch: %d training rows held on %s in %.1f s", sum(len(y) for _, y in
                 self.held), self.device, time.perf_counter() - started)

    def _settle(self) -> None:
        """Brings the model's parameters up to date with an optimizer that keeps them in its
        own state (FTRL), before anything reads the model."""
        if self.takes_batches:
            self.optimizer.settle()

    def _no_sync(self):
        return self.model.no_sync() if self.processes.distributed else nullcontext()

    def _on_sigterm(self, signum, frame) -> None:
        log.warning("SIGTERM: stopping after this step and saving a checkpoint")
        self.sigterm.received = True

    def _autocast(self) -> AbstractContextManager:
        return autocast(self.precision, self.device)

    @contextmanager
    def _paused(self) -> Iterator[None]:
        """Keeps the enclosed work out of the training throughput. Waits for the device first,
        so steps still queued on a GPU are timed as training."""
        self._synchronize()
        started = time.perf_counter()
        yield
        self.window.paused += time.perf_counter() - started

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _log_train(self) -> None:
        # Summed over ranks: the loss over all rows of the window, and all ranks' rows.
        window = torch.stack([self._window_loss.float(),
                              torch.tensor(float(self.window.rows), device=self.device)])
        loss_sum, rows = distributed.sum_(window).tolist()  # .tolist() waits for the device
        if not math.isfinite(loss_sum):
            raise self._diverged(f"training loss is {loss_sum}")
        figures = self.window.figures(rows)
        self.rows_seen += int(rows)
        self.train_seconds += self.window.seconds()
        self._last_train = {
            "train/loss": loss_sum / rows,
            "train/lr": self.optimizer.param_groups[0]["lr"],
            **({} if self._grad_norm is None else {"train/grad_norm": self._grad_norm.item()}),
            **figures,
            # a full-batch solver's counts so far (Newton: its iterations, CG steps, rejected
            # steps; each CG step one pass over the rows)
            **{f"solver/{k}": v for k, v in self.optimizer.state.get("solver", {}).items()
               if isinstance(v, int | float)},
        }
        self.logger.log(self._last_train, self.step)
        self._window_loss.zero_()
        self._grad_norm = None
        self.window.reset()

    def _waited(self, seconds: float) -> None:
        self.window.waited += seconds

    def _diverged(self, what: str) -> "Diverged":
        # Diverged states are never saved, so the newest step file holds the last good model.
        self.wait_for_checkpoint()
        last = step_files(self.checkpoints) if self.processes.main else []
        return Diverged(
            f"{what} at step {self.step} (epoch {self.epoch}): the model diverged. Likely "
            f"causes: a learning rate too high for this data (optimizer.lr="
            f"{self.optimizer.param_groups[0]['lr']:.3g} now), features on very different "
            "scales, or NaN/inf in the data. Last good checkpoint: "
            f"{last[0] if last else 'none yet'}"
        )

    def _final_metrics(self, val: Mapping[str, float] | None = None) -> dict[str, float]:
        """The flat record of `metrics.json`: latest validation and training figures, with
        throughput averaged over the whole run so far."""
        return {
            **(self._last_val if val is None else val),
            **self._last_train,
            "perf/samples_per_sec": self.rows_seen / max(self.train_seconds, 1e-9),
            **({} if self.epoch_seconds is None else {"perf/epoch_seconds": self.epoch_seconds}),
            "step": self.step,
            "epoch": self.epoch,
            "cpu_threads": self.num_threads,
            "processes": self.processes.world_size,
            **({"stopped": self.stop_reason, "converged": self.stop_reason == "converged"}
               if self.stop_reason else {}),
        }


def _check_l1(optimizer: Callable[..., Optimizer], l1: float) -> None:
    """An L1 term needs an optimizer that takes it (a proximal step: exact zeros)."""
    kind = getattr(optimizer, "func", optimizer)
    if l1 < 0:
        raise ConfigError(f"regularization.l1 must be a number >= 0, got {l1}")
    if l1 > 0 and not getattr(kind, "takes_l1", False):
        raise ConfigError(
            f"regularization.l1={l1:g} needs an optimizer with a proximal step, which sets "
            "weights exactly to zero: optimizer=fista (in memory) or optimizer=ftrl (streamed, "
            f"two classes), or optimizer=auto; not {getattr(kind, '__name__', kind)}")


def _check_classes(optimizer: Callable[..., Optimizer], data: DataModule) -> None:
    """Newton's Hessian products and FTRL's step take one score a row: two classes."""
    kind = getattr(optimizer, "func", optimizer)
    if data.classes.binary or not (getattr(kind, "second_order", False)
                                   or getattr(kind, "takes_batches", False)):
        return
    name = "newton" if getattr(kind, "second_order", False) else "ftrl"
    raise ConfigError(
        f"optimizer={name} trains two-class models, but the training rows have "
        f"{data.classes}; use optimizer=lbfgs (in memory) or optimizer=adagrad (streamed), or "
        "optimizer=auto, which picks one of them")


def _check_batch_optimizer(processes: Processes, accumulate: int, clip: float | None) -> None:
    if processes.world_size > 1:
        raise ConfigError("optimizer=ftrl runs in one process: under torchrun, use "
                          "optimizer=adagrad (or optimizer=auto, which picks it)")
    if accumulate != 1 or clip:
        raise ConfigError("optimizer=ftrl takes one batch per step and clips nothing: leave "
                          "trainer.accumulate_grad_batches=1 and trainer.grad_clip_norm=null")


def _snapshot(obj: Any, into: Any = None) -> Any:
    """A copy of a checkpoint's state that training cannot change: tensors copied to the CPU
    (where they are loaded back), containers rebuilt, other values as they are. `into`: an
    earlier copy no longer in use, whose tensors take the new values where shape and dtype
    agree."""
    if isinstance(obj, Tensor):
        if obj.dim() == 1 and len(obj) > 1 and obj.stride(0) == 0:  # one value, repeated (an
            return obj[:1].detach().to("cpu", copy=True).expand_as(obj)  # identity input map)
        if (isinstance(into, Tensor) and into.shape == obj.shape and into.dtype == obj.dtype
                and into.is_contiguous()):
            return into.copy_(obj.detach())
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        into = into if isinstance(into, dict) else {}
        return {key: _snapshot(value, into.get(key)) for key, value in obj.items()}
    if isinstance(obj, list | tuple):
        into = into if type(into) is type(obj) and len(into) == len(obj) else [None] * len(obj)
        return type(obj)(_snapshot(value, old) for value, old in zip(obj, into, strict=True))
    return obj


def _rng_state(device: torch.device) -> dict[str, Tensor]:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _timed(items: Iterable, waited: Callable[[float], None]) -> Iterator:
    """`items`, reporting to `waited` how long each took to arrive."""
    iterator = iter(items)
    while True:
        started = time.perf_counter()
        item = next(iterator, None)
        waited(time.perf_counter() - started)
        if item is None:
            return
        yield item


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


def _all_finite(t: Tensor) -> bool:
    """Whether every value of `t` is finite: its min and max are (NaN propagates to both). One
    pass and no mask: `torch.isfinite(t).all()` took 4 ms over 2 M weights on the CPU, this
    0.2 ms."""
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t.detach())
    return math.isfinite(lo) and math.isfinite(hi)


def _format(metrics: Mapping[str, float]) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in metrics.items())
