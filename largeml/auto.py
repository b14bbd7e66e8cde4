"""The `auto` choices of a run, made from its data when it starts, logged, and written into the
run's resolved `config.yaml` (so evaluate, predict and a resume see what was chosen):

    optimizer=auto   newton  (full-batch Newton, `largeml.solvers.Newton`) for a linear model
                             (logreg, svm) whose training rows fit in memory: a quarter of the
                             free RAM, or half the free GPU memory; for sparse rows streamed
                             from files, also at most `SPARSE_HOLD_MAX`, unless its passes
                             read them in place and hold none (`streams_in_place`: any size);
                             for more than two classes, lbfgs (full-batch L-BFGS) instead
                     ftrl    (FTRL-Proximal, `largeml.ftrl`: per-feature steps at the cost of
                             each batch's non-zeros, streamed) for a linear model on more sparse
                             data than that, in one process, two classes; it raises data.batch_size
                             to 4096 rows where that stays under 2^20 non-zeros (FTRL learns
                             row by row: see `ftrl_batch_rows`)
                     adagrad (per-feature steps, streamed) for a linear model on more dense
                             data, or sparse data under torchrun that Newton's passes
                             cannot read in place
                     adam    for an MLP (non-convex: stochastic steps, streamed), at lr
                             `MLP_LR` unless optimizer.lr is given
                     (model=rff, a linear layer on fixed random features: lbfgs where its
                     rows fit in memory, else adagrad)
    scheduler=auto   cosine for sgd; constant for every other optimizer (adaptive and
                     full-batch methods set their own step lengths)

With optimizer=auto, an MLP with validation rows stops early, after `EARLY_STOPPING_PATIENCE`
validations without a lower val/loss, and ends with the model of its best validation, instead
of by the training objective's tol rule (trainer.tol=0), unless
trainer.early_stopping_patience is set (0: no early stopping): its training objective is not
convex, and falls long after the model has begun to overfit. Its batches are at most
`MLP_BATCH_ROWS` rows (`data.batch_size` lowered to that; optimizer=adam keeps it as set): an
MLP learns from the number of its steps, and 1,024-row batches give small sets few (digits'
1,347 training rows, two an epoch). Measured in MLP_DEFAULTS below.

Feature scaling (`data.scale=auto`) is chosen from the data's values: see `largeml.data.scaling`.
"""

import logging
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from largeml import kernels
from largeml.data import DataModule
from largeml.data.stream import ShardStream
from largeml.device import available_ram
from largeml.distributed import Processes
from largeml.errors import ConfigError

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
LINEAR = "largeml.models.Linear"
RFF = "largeml.models.RFF"
EARLY_STOPPING_PATIENCE = 10
MLP_BATCH_ROWS = 256
# MLP_DEFAULTS: validation accuracy of model=mlp under optimizer=auto through the CLI, seeds 0 /
# 1 / 2 of each set's split (tests/datasets.py, the dense ones as .npy, digits and binary_rare
# as LIBSVM, data=files; a9a and 40,000 synthetic rows: seeds 0 / 1), before (two hidden
# layers of 64, patience 3, the tol rule, the last model; data=files' 1,024-row batches) and
# after (one hidden layer of 256, patience 10, tol=0, the best model, 256-row batches):
#   digits (10 classes)  97.33 96.44 96.44  ->  98.66 98.22 98.44
#   wine                 88.64 100.0 95.45  ->  93.18 100.0 95.45
#   breast_cancer        96.48 97.18 97.89  ->  96.48 97.89 97.18
#   dense_imbalanced     94.80 93.78 94.04  ->  94.99 94.08 94.17
#   binary_rare          97.92 97.77 98.02  ->  98.08 97.98 98.32
#   interactions         91.60 89.93 91.53  ->  91.93 91.00 92.60
#   shells               84.47 85.13 83.07  ->  84.40 86.87 83.53
#   a9a                  84.63 84.73        ->  84.99 85.06
#   synthetic (40,000)   83.78 84.19        ->  83.80 84.54
# Measured 2026-12-02 by scripts/mlp_defaults.py.
# Adam's step for an MLP. With early stopping, measured on four sets (validation accuracy at
# lr 0.01 / 0.003): a9a 84.23 / 84.82 %, 40,000 synthetic rows 83.98 / 84.29 %, tests'
# dense_imbalanced 94.67 / 94.52 %, binary_rare — / 97.92 %; at 0.01 the last epochs bounce.
MLP_LR = 0.003
# Sparse rows streamed from files are for data larger than memory; a full-batch solver holds
# them, unless its passes read them in place (`streams_in_place`). Up to this size it may hold
# them (Newton reaches the exact optimum in a few passes); beyond it FTRL streams them, with
# the weights and its state as the only O(n_features) memory. On the 1 M-row, 2 M-feature set
# of scripts/bench_sparse.py (328 MB of rows) holding them would take the run past 512 MiB.
SPARSE_HOLD_MAX = 128 << 20
# Losses whose full-batch passes over sparse shards are compiled (objective.SECOND_ORDER_LOSSES).
STREAMED_LOSSES = ("largeml.losses.bce", "largeml.losses.squared_hinge")
FTRL_BATCH_ROWS = 4096  # see ftrl_batch_rows
FTRL_BATCH_NNZ = 1 << 20


def is_auto(section: DictConfig) -> bool:
    return section.get("_target_") == "auto"


def memory_budget(device: torch.device) -> int:
    """Bytes a full-batch solver may hold its training rows in."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free // 2
    return available_ram() // 4


def optimizer(cfg: DictConfig, data: DataModule, device: torch.device) -> tuple[str, str]:
    """The optimizer `optimizer=auto` stands for, and why."""
    size = f"{data.held_bytes / 2**20:,.1f} MiB of training rows"
    budget = memory_budget(device)
    if float(cfg.regularization.get("l1") or 0) > 0:
        return l1_optimizer(cfg, data, size, budget)
    if cfg.model._target_ == RFF:  # convex: a linear layer on fixed features
        if data.held_bytes <= budget:
            return "lbfgs", (f"random features and a linear layer, {size} fit in memory "
                             f"({budget / 2**30:,.1f} GiB)")
        return "adagrad", f"random features and a linear layer, {size} exceed the memory budget"
    if cfg.model._target_ != LINEAR:
        return "adam", "a non-linear model"
    streamed = isinstance(data.train_eval, ShardStream)
    multiclass = not data.classes.binary
    if data.sparse and streamed and data.held_bytes > min(budget, SPARSE_HOLD_MAX):
        why = (f"a linear model, {size}, sparse, streamed: more than "
               f"{min(budget, SPARSE_HOLD_MAX) / 2**20:,.0f} MiB to hold")
        if streams_in_place(cfg, data, device):
            return "newton", why + ("; its passes read them in place, holding none, and it "
                                    "converges in a few dozen of them")
        if Processes.from_env().world_size > 1:
            return "adagrad", why + ", under torchrun"
        if multiclass:
            return "adagrad", why + f", {data.classes} (FTRL here is binary)"
        return "ftrl", why
    if data.held_bytes <= budget:
        why = f"a linear model, {size} fit in memory ({budget / 2**30:,.1f} GiB)"
        if multiclass:  # Newton's Hessian products here take one score a row
            return "lbfgs", f"{why}, {data.classes}"
        return "newton", why
    return "adagrad", f"a linear model, {size} exceed the memory budget ({budget / 2**30:,.1f} GiB)"


def streams_in_place(cfg: DictConfig, data: DataModule, device: torch.device) -> bool:
    """Whether Newton's closure would read the training rows in place at every pass
    (`objective.Streamed`), holding none: the Trainer's test (`Trainer._hold_training_rows`:
    compiled lanes on the CPU, a linear two-class model, a compiled second-order loss), made
    from the config before there is a Trainer. Under torchrun each rank reads its share of the
    rows in place, and f, ∇f and Hessian products are summed over the ranks: 2 processes take
    the same steps as one (`tests/test_distributed.py`). For a full-batch
    solver, sparse shards of any size then cost memory by the features (and at most
    `objective.CURVATURE_BYTES` by the rows); over scripts/bench_sparse.py's 1 M rows of 40
    non-zeros Newton converged in 6 passes at its points (0.4 s each on 2 cores) and 18
    Hessian products (0.12-0.17 s each)."""
    return (device.type == "cpu" and kernels.numba is not None and data.sparse
            and int(cfg.data.get("num_workers") or 0) == 0
            and hasattr(data.train_eval, "batches_in_place") and data.classes.binary
            and cfg.loss.get("_target_") in STREAMED_LOSSES and not cfg.loss.get("class_weight"))


def l1_optimizer(cfg: DictConfig, data: DataModule, size: str, budget: int) -> tuple[str, str]:
    """With regularization.l1 > 0: an optimizer with a proximal step (exact zeros)."""
    why = f"regularization.l1 > 0 needs a proximal step; {size}"
    if cfg.model._target_ not in (LINEAR, RFF):
        raise ConfigError("regularization.l1 is for linear models (model=logreg, svm, rff); an "
                          "MLP's weights have no proximal optimizer here")
    if data.held_bytes <= budget:
        return "fista", f"{why} fit in memory ({budget / 2**30:,.1f} GiB)"
    if cfg.model._target_ == LINEAR and data.classes.binary and \
            Processes.from_env().world_size == 1:
        return "ftrl", f"{why}, streamed"
    raise ConfigError(f"regularization.l1: {size} exceed the memory budget "
                      f"({budget / 2**30:,.1f} GiB) and streaming L1 here is FTRL's, for two "
                      "classes in one process")


def ftrl_batch_rows(cfg: DictConfig, data: DataModule) -> int | None:
    """The batch for FTRL chosen by `auto`, where it differs from data.batch_size: FTRL learns
    from the rows of a batch one at a time, so the batch size changes only the rows' order (the
    shuffle cuts batches) and the time a row costs. On 1 M rows of 40 non-zeros an epoch of
    1024-row steps took 1.55 s, 0.65 s of it in the loop that learns; at 4096 rows, 0.93 s.
    Up to FTRL_BATCH_ROWS rows and FTRL_BATCH_NNZ non-zeros a batch (its memory), never below
    data.batch_size."""
    nnz_per_row = max(1.0, (data.held_bytes / max(data.n_train, 1) - 8) / 8)
    rows = min(FTRL_BATCH_ROWS, int(FTRL_BATCH_NNZ / nnz_per_row))
    given = int(cfg.data.batch_size)
    return rows if rows > given else None


def mlp_defaults(cfg: DictConfig, data: DataModule) -> dict[str, str]:
    """What optimizer=auto sets for an MLP (see the module's docstring)."""
    chosen = {}
    if cfg.data.batch_size > MLP_BATCH_ROWS:
        log.info("optimizer=auto, an MLP: data.batch_size=%d (from %d: more steps an epoch; "
                 "give optimizer=adam to keep data.batch_size as set)", MLP_BATCH_ROWS,
                 cfg.data.batch_size)
        cfg.data.batch_size = MLP_BATCH_ROWS
        chosen["data.batch_size"] = str(MLP_BATCH_ROWS)
    if data.val is not None and cfg.trainer.early_stopping_patience is None:
        cfg.trainer.early_stopping_patience = EARLY_STOPPING_PATIENCE
        cfg.trainer.tol = 0
        chosen["early_stopping_patience"] = str(EARLY_STOPPING_PATIENCE)
        log.info("optimizer=auto, an MLP: trainer.early_stopping_patience=%d (on %s; the run "
                 "ends with the model of the best), trainer.tol=0 (set "
                 "trainer.early_stopping_patience to keep trainer.tol; 0: no early stopping)",
                 EARLY_STOPPING_PATIENCE, cfg.trainer.best_metric)
    return chosen


def resolve(cfg: DictConfig, data: DataModule, device: torch.device) -> dict[str, str]:
    """Replaces every `auto` section of `cfg` by its choice's config from `configs/`; returns
    the choices made (group -> choice). Where it returns "data.batch_size", `cfg.data` changed
    and the data must be built again."""
    chosen = {}
    with open_dict(cfg):
        if is_auto(cfg.optimizer):
            name, why = optimizer(cfg, data, device)
            given = {k: v for k, v in cfg.optimizer.items() if k != "_target_" and v is not None}
            if name == "adam" and "lr" not in given:
                given["lr"] = MLP_LR
            cfg.optimizer = OmegaConf.merge(
                OmegaConf.load(CONFIG_DIR / "optimizer" / f"{name}.yaml"), given)
            chosen["optimizer"] = name
            log.info("optimizer=auto: %s (%s)%s", name, why,
                     "".join(f", optimizer.{k}={v}" for k, v in given.items()))
            rows = ftrl_batch_rows(cfg, data) if name == "ftrl" else None
            if rows is not None:
                log.info("optimizer=auto: ftrl learns row by row, so a batch is only what a step "
                         "reads: data.batch_size=%d (from %d: fewer, cheaper steps; give "
                         "optimizer=ftrl to keep data.batch_size as set)", rows,
                         cfg.data.batch_size)
                cfg.data.batch_size = rows
                chosen["data.batch_size"] = str(rows)
            if name == "adam":
                chosen |= mlp_defaults(cfg, data)
        if is_auto(cfg.scheduler):
            name = "cosine" if cfg.optimizer._target_ == "torch.optim.SGD" else "constant"
            cfg.scheduler = OmegaConf.load(CONFIG_DIR / "scheduler" / f"{name}.yaml")
            chosen["scheduler"] = name
            log.info("scheduler=auto: %s (for %s)", name, cfg.optimizer._target_)
    return chosen
