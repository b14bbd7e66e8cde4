"""`torchrun --nproc_per_node=2 -m largeml.train` end to end, on CPU (gloo) over loopback.

Covers what a multi-process run promises: one run directory per launch written by rank 0 only;
N processes with global batch B train the same model as one process with batch B; streamed
shards of uneven sizes finish with the expected step count; a global batch that does not split
over the processes is refused before training; and a rank that dies (SIGKILL) or hangs
(SIGSTOP) ends the whole launch within a bounded time instead of leaving it waiting forever;
and training lets go of its DDP wrapper so the process group is freed before exit.

The torchrun tests launch it as a user would, in `tmp_path`, with bounded timeouts; the worker
processes are found under torchrun's pid in /proc and are always reaped.
"""

import functools
import gc
import json
import math
import os
import signal
import subprocess
import time
from contextlib import suppress
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (REPO, SMALL, STREAMING, TORCHRUN, free_port, run_cli,
                      write_sparse_shards)
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.nn.parallel import DistributedDataParallel

from largeml import distributed, kernels, losses
from largeml.checkpoint import load_checkpoint
from largeml.data import synthetic
from largeml.data.batches import global_batches
from largeml.data.shards import ShardWriter, open_shards
from largeml.distributed import Processes
from largeml.models import Linear
from largeml.schedules import constant
from largeml.trainer import Trainer

pytestmark = pytest.mark.distributed

# Environment torchrun and its workers must not inherit from whatever runs the tests.
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                 "MASTER_ADDR", "MASTER_PORT")
DIST_ERROR = "another rank died, hangs, or cannot be reached"
# A run far longer than any test waits: 250 steps an epoch for 400 epochs.
LONG = ["data.n_samples=80000", "data.n_features=20", "trainer.max_epochs=400",
        "trainer.log_every_n_steps=50", *STREAMING]


def torchrun_args(*args: str, nproc: int = 2, rdzv_id: str | None = None) -> list[str]:
    """A static rendezvous on a free loopback port, or with `rdzv_id` a c10d one named so."""
    if rdzv_id is None:
        meet = ["--master_addr=127.0.0.1", f"--master_port={free_port()}"]
    else:
        meet = ["--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}",
                f"--rdzv-id={rdzv_id}"]
    return [*TORCHRUN, f"--nproc_per_node={nproc}", *meet, "-m", "largeml.train", *args]


def torchrun_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in LAUNCHER_VARS and not k.startswith("TORCHELASTIC")}
    return {**env, "GLOO_SOCKET_IFNAME": "lo", "PYTHONPATH": str(REPO), "HYDRA_FULL_ERROR": "0"}


# -- processes, read from /proc -----------------------------------------------------------------


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name: [state, ppid, pgrp, ...]."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None


def alive(pid: int, started: str | None = None) -> bool:
    """Whether `pid` runs (and, given `started`, is still the process that started then)."""
    fields = _stat(pid)
    return (fields is not None and fields[0] not in ("Z", "X")
            and (started is None or fields[19] == started))


def descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _stat(int(entry.name))) is not None:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return {}
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0")
                if "=" in item)


class Launch:
    """A torchrun launch running in the background, its console output in `log`."""

    def __init__(self, *args: str, cwd: Path, rdzv_id: str | None = None) -> None:
        self.log = cwd / "torchrun.out"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(torchrun_args(*args, rdzv_id=rdzv_id), cwd=cwd,
                                         env=torchrun_env(),
                                         stdout=out, stderr=subprocess.STDOUT)
        self.seen: dict[int, str] = {}  # pid -> start time of every worker ever found

    def workers(self) -> dict[int, int]:
        """rank -> pid of the live `largeml.train` workers under torchrun."""
        ranks = {}
        for pid in descendants(self.proc.pid):
            env = environ(pid)
            if "RANK" in env and "TORCHELASTIC_RUN_ID" in env and (fields := _stat(pid)):
                ranks[int(env["RANK"])] = pid
                self.seen[pid] = fields[19]
        return ranks

    def wait_for_workers(self, n: int, timeout: float) -> dict[int, int]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ranks = self.workers()
            if len(ranks) == n:
                return ranks
            assert self.proc.poll() is None, self.output()
            time.sleep(0.2)
        raise AssertionError(f"{n} workers did not start in {timeout} s:\n{self.output()}")

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"torchrun still running after {timeout} s:\n{self.output()}") from None

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def cleanup(self) -> None:
        """Kills, by pid, whatever of this launch is still running: workers first (a stopped
        one is continued so that it can die), then torchrun."""
        if self.proc.poll() is None:
            self.workers()
        for pid, started in self.seen.items():
            for sig in (signal.SIGKILL, signal.SIGCONT):
                with suppress(ProcessLookupError):
                    if alive(pid, started):
                        os.kill(pid, sig)
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)


def run_torchrun(*args: str, cwd: Path, timeout: float = 180,
                 rdzv_id: str | None = None) -> tuple[int, str]:
    """Runs a 2-process launch to its end: (exit code, console output)."""
    launch = Launch(*args, cwd=cwd, rdzv_id=rdzv_id)
    try:
        return launch.wait(timeout), launch.output()
    finally:
        launch.cleanup()


def wait_until(condition, timeout: float, what: str, launch: Launch | None = None) -> float:
    """Polls `condition` until true; returns the seconds it took."""
    started = time.monotonic()
    while not condition():
        if launch is not None and launch.proc.poll() is not None:
            raise AssertionError(f"torchrun exited ({launch.proc.returncode}) before {what}:\n"
                                 f"{launch.output()}")
        if time.monotonic() - started > timeout:
            raise AssertionError(f"no {what} after {timeout} s" +
                                 (f":\n{launch.output()}" if launch else ""))
        time.sleep(0.2)
    return time.monotonic() - started


def training(launch: Launch, run_dir: Path) -> dict[int, int]:
    """Waits until both ranks run and have saved a first checkpoint; returns their pids."""
    ranks = launch.wait_for_workers(2, timeout=60)
    wait_until(lambda: list((run_dir / "checkpoints").glob("step-*.pt")), 120, "checkpoint",
               launch)
    assert launch.proc.poll() is None
    return ranks


def log_text(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


# -- tests ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("rdzv_id", [None, pytest.param("job42", marks=pytest.mark.slow)],
                         ids=["static", "c10d-named"])
def test_one_run_directory_per_launch(tmp_path, rdzv_id):
    code, output = run_torchrun(*SMALL, cwd=tmp_path, rdzv_id=rdzv_id)
    assert code == 0, output

    outputs = tmp_path / "outputs"
    run_dirs = {p.parent for p in outputs.rglob("*") if p.is_file()
                and ".hydra" not in p.parts and "checkpoints" not in p.parts}
    assert len(run_dirs) == 1, f"one launch wrote {sorted(map(str, run_dirs))}"
    (run_dir,) = run_dirs
    if rdzv_id:  # named by the launch: the same command again finds it
        assert run_dir == outputs / "torchrun" / rdzv_id
    else:  # outputs/<date>/<time>, the first time any rank proposed
        assert run_dir.parent.parent == outputs, run_dir

    assert list(tmp_path.rglob(".hydra/config.yaml")) == [run_dir / ".hydra" / "config.yaml"]
    assert len(list(tmp_path.rglob("events.out.tfevents.*"))) == 1
    assert list(tmp_path.rglob("metrics.json")) == [run_dir / "metrics.json"]
    assert (run_dir / "train.log").is_file()
    assert (run_dir / "train.rank1.log").is_file()
    assert (run_dir / "checkpoints" / "last.pt").is_file()

    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["processes"] == 2
    # Each process's share of the cores (the synthetic set has no reader thread).
    assert metrics["cpu_threads"] == max(1, len(os.sched_getaffinity(0)) // 2)
    assert metrics["epoch"] == 2
    assert metrics["step"] == 2 * math.ceil(2400 / 256)  # 3000 rows, 20 % held out for val
    assert metrics["val/accuracy"] > 0.75

    events = EventAccumulator(str(run_dir))
    events.Reload()
    accuracy = events.Scalars("val/accuracy")
    assert len(accuracy) >= 2  # once per epoch at least
    assert accuracy[-1].value == pytest.approx(metrics["val/accuracy"], rel=1e-6)


@pytest.mark.parametrize("model, classes", [
    ("logreg", 2), pytest.param("mlp", 2, marks=pytest.mark.slow),
    pytest.param("logreg", 3, marks=pytest.mark.slow)])
def test_two_processes_train_the_same_model_as_one(tmp_path, model, classes):
    # 2402 training rows in global batches of 256: nine full ones and one of 98, all even; 601
    # validation rows, which 2 ranks cannot split evenly.
    overrides = [*SMALL, "data.n_samples=3003", f"model={model}", "data.batch_size=256",
                 f"data.n_classes={classes}"]
    one = run_cli(f"hydra.run.dir={tmp_path / 'one'}", *overrides, cwd=tmp_path, timeout=180)
    assert one.returncode == 0, one.stderr + one.stdout
    code, output = run_torchrun(f"hydra.run.dir={tmp_path / 'two'}", *overrides, cwd=tmp_path)
    assert code == 0, output

    single = load_checkpoint(tmp_path / "one" / "checkpoints" / "last.pt")
    double = load_checkpoint(tmp_path / "two" / "checkpoints" / "last.pt")
    assert double["step"] == single["step"] == 20
    assert double["epoch"] == single["epoch"] == 2
    assert double["model"].keys() == single["model"].keys()
    if model == "mlp":
        assert single["config"]["model"]["dropout"] == 0  # else the ranks' masks would differ
    for name, tensor in single["model"].items():
        torch.testing.assert_close(double["model"][name], tensor, rtol=1e-5, atol=1e-6,
                                   msg=lambda m, name=name: f"{name}: {m}")
    # Validation metrics over exactly the 601 rows: each row once, none padded or repeated.
    one_metrics = json.loads((tmp_path / "one" / "metrics.json").read_text())
    two_metrics = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert two_metrics["processes"] == 2
    # (The two models agree to float rounding, so a row right at the boundary may flip.)
    assert two_metrics["val/loss"] == pytest.approx(one_metrics["val/loss"], rel=1e-4)
    assert two_metrics["val/accuracy"] == pytest.approx(one_metrics["val/accuracy"], abs=1.5 / 601)
    assert two_metrics["val/auc"] == pytest.approx(one_metrics["val/auc"], abs=1e-4)
    assert round(two_metrics["val/accuracy"] * 601) == pytest.approx(
        two_metrics["val/accuracy"] * 601, abs=1e-3)  # a whole number of the 601 rows


@pytest.mark.slow
@pytest.mark.parametrize("model", ["logreg", "svm"])
def test_two_processes_solve_the_same_full_batch_problem_as_one(tmp_path, model):
    """The default solver (full-batch Newton) under torchrun: each rank holds its share of the
    rows, f, gradients and Hessians are summed over ranks, so 2 processes take the same Newton
    steps as one and stop at the same epoch."""
    overrides = ["data.n_samples=3003", "data.n_features=20", f"model={model}"]
    one = run_cli(f"hydra.run.dir={tmp_path / 'one'}", *overrides, cwd=tmp_path, timeout=180)
    assert one.returncode == 0, one.stderr + one.stdout
    code, output = run_torchrun(f"hydra.run.dir={tmp_path / 'two'}", *overrides, cwd=tmp_path)
    assert code == 0, output
    assert "full-batch Newton" in log_text(tmp_path / "two" / "train.log")

    single = load_checkpoint(tmp_path / "one" / "checkpoints" / "last.pt")
    double = load_checkpoint(tmp_path / "two" / "checkpoints" / "last.pt")
    assert double["step"] == single["step"]
    for name, tensor in single["model"].items():
        torch.testing.assert_close(double["model"][name], tensor, rtol=1e-4, atol=1e-5,
                                   msg=lambda m, name=name: f"{name}: {m}")
    one_metrics = json.loads((tmp_path / "one" / "metrics.json").read_text())
    two_metrics = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert one_metrics["stopped"] == two_metrics["stopped"] == "converged"
    assert two_metrics["train/objective"] == pytest.approx(one_metrics["train/objective"],
                                                           rel=1e-6)


@pytest.mark.slow
@pytest.mark.skipif(kernels.numba is None, reason="numba is not installed")
def test_two_processes_solve_the_same_problem_over_sparse_rows_read_in_place(tmp_path):
    """The default over sparse shards (Newton, each pass reading the rows in place in the
    shards' memory maps) under torchrun: each rank reads its share (3001 rows: 1500 and 1501),
    f, ∇f and Hessian products are summed over ranks, so 2 processes take the same Newton and
    CG steps as one, to the same model."""
    train = write_sparse_shards(tmp_path / "train", 3001, 2500, nnz=12)
    val = write_sparse_shards(tmp_path / "val", 701, 2500, nnz=12, seed=1)
    overrides = ["data=files", f"data.train_path={train}", f"data.val_path={val}"]
    one = run_cli(f"hydra.run.dir={tmp_path / 'one'}", *overrides, cwd=tmp_path, timeout=180)
    assert one.returncode == 0, one.stderr + one.stdout
    code, output = run_torchrun(f"hydra.run.dir={tmp_path / 'two'}", *overrides, cwd=tmp_path)
    assert code == 0, output
    for run in ("one", "two"):
        text = log_text(tmp_path / run / "train.log")
        assert "optimizer=auto: newton" in text and "read in place at each pass" in text, text

    one_metrics = json.loads((tmp_path / "one" / "metrics.json").read_text())
    two_metrics = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert two_metrics["processes"] == 2 and one_metrics["processes"] == 1
    assert one_metrics["stopped"] == two_metrics["stopped"] == "converged"
    for key in ("step", "solver/iterations", "solver/cg_iterations"):
        assert two_metrics[key] == one_metrics[key], key
    assert two_metrics["train/objective"] == pytest.approx(one_metrics["train/objective"],
                                                           rel=1e-6)
    assert two_metrics["val/accuracy"] == pytest.approx(one_metrics["val/accuracy"],
                                                        abs=1.5 / 701)
    single = load_checkpoint(tmp_path / "one" / "checkpoints" / "last.pt")["model"]
    double = load_checkpoint(tmp_path / "two" / "checkpoints" / "last.pt")["model"]
    for name, tensor in single.items():
        torch.testing.assert_close(double[name], tensor, rtol=1e-4, atol=1e-5,
                                   msg=lambda m, name=name: f"{name}: {m}")


def write_shards(root: Path, sizes: list[int], features: int, seed: int) -> Path:
    """Dense shards of exactly `sizes` rows: each write is flushed as its own shard."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=features)
    with ShardWriter(root, "dense", features, shard_bytes=1) as writer:
        for rows in sizes:
            x = rng.normal(size=(rows, features)).astype(np.float32)
            y = (x @ w + 0.5 * rng.normal(size=rows) > 0).astype(np.float32)
            writer.write_dense(x, y)
    assert [s.rows for s in open_shards(root).shards] == sizes
    return root


@pytest.mark.slow
def test_uneven_shards_finish(tmp_path):
    sizes, batch = [7, 300, 41, 131], 64  # 479 rows: 7 full batches and one of 31 (odd)
    train = write_shards(tmp_path / "train", sizes, features=10, seed=0)
    val = write_shards(tmp_path / "val", [13, 88], features=10, seed=1)
    run_dir = tmp_path / "run"
    code, output = run_torchrun(
        f"hydra.run.dir={run_dir}", "data=files", f"data.train_path={train}",
        f"data.val_path={val}", f"data.batch_size={batch}", "trainer.max_epochs=2",
        "trainer.log_every_n_steps=5", *STREAMING, cwd=tmp_path, timeout=180)
    assert code == 0, output

    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["processes"] == 2
    assert metrics["epoch"] == 2
    assert metrics["step"] == 2 * global_batches(sum(sizes), batch, 2) == 16
    assert math.isfinite(metrics["val/loss"])
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["step"] == metrics["step"]


def test_batch_size_that_does_not_split_is_refused(tmp_path):
    run_dir = tmp_path / "run"
    # Refused before training: the whole launch ends within the timeout, or run_torchrun fails.
    code, output = run_torchrun(f"hydra.run.dir={run_dir}", *SMALL, "data.batch_size=255",
                                cwd=tmp_path, timeout=90)
    assert code != 0
    assert "data.batch_size=255 is the global batch" in output
    assert not list(tmp_path.rglob("*.pt"))
    assert not list(tmp_path.rglob("metrics.json"))


@pytest.mark.slow
def test_dead_rank_ends_the_launch(tmp_path):
    run_dir = tmp_path / "run"
    launch = Launch(f"hydra.run.dir={run_dir}", *LONG, "trainer.dist_timeout=20", cwd=tmp_path)
    try:
        ranks = training(launch, run_dir)

        os.kill(ranks[1], signal.SIGKILL)
        code = launch.wait(timeout=60)  # torchrun notices the dead rank within it, or this fails
        assert code != 0, launch.output()
        assert not alive(ranks[0]), "rank 0 outlived torchrun"
        assert "final:" not in log_text(run_dir / "train.log")  # stopped, did not finish
    finally:
        launch.cleanup()


@pytest.mark.slow
def test_sigterm_to_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    """A preemption notice that reaches one process: every rank finishes its step, stops at the
    same one, and rank 0 saves it and records why (rank 0 itself got no signal)."""
    run_dir = tmp_path / "run"
    launch = Launch(f"hydra.run.dir={run_dir}", *LONG, "trainer.dist_timeout=20", cwd=tmp_path)
    try:
        ranks = training(launch, run_dir)
        os.kill(ranks[1], signal.SIGTERM)
        code = launch.wait(timeout=30)  # every rank stops within it, or this fails
    finally:
        launch.cleanup()
    assert code != 0, launch.output()  # the workers exit 143, so torchrun reports a failure
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["stopped"] == "SIGTERM", launch.output()
    saved = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert saved["step"] == metrics["step"] < 400 * 250
    assert "stopped by SIGTERM after step" in log_text(run_dir / "train.log")


@pytest.mark.slow
def test_hung_rank_fails_with_a_clear_error(tmp_path):
    run_dir = tmp_path / "run"
    timeout = 5
    # An MLP whose forward and backward dominate a step: a rank stopped at a random moment is
    # most likely computing, so rank 0 waits for it in DDP's gradient all-reduce (backward).
    launch = Launch(f"hydra.run.dir={run_dir}", *LONG, "model=mlp", "model.hidden_sizes=[512,512]",
                    "trainer.checkpoint_every_n_steps=20", f"trainer.dist_timeout={timeout}",
                    cwd=tmp_path)
    try:
        ranks = training(launch, run_dir)

        os.kill(ranks[1], signal.SIGSTOP)
        stopped = time.monotonic()
        # Rank 0 gives up after the collective's timeout and says why, in the console (which
        # torchrun forwards) and in train.log, then exits.
        wait_until(
            lambda: DIST_ERROR in log_text(run_dir / "train.log") or not alive(ranks[0]),
            timeout + 40, "DistributedError message or exit of rank 0",
        )
        time.sleep(0.5)  # the console line may trail the file's
        assert DIST_ERROR in log_text(run_dir / "train.log"), launch.output()
        assert DIST_ERROR in launch.output()
        # torchrun then ends the stopped rank (SIGTERM, SIGKILL after its 30 s grace), within
        # 90 s of the stop, or the wait fails.
        code = launch.wait(timeout=max(0.0, stopped + 90 - time.monotonic()))
        assert code != 0
        assert not alive(ranks[0])
        assert not alive(ranks[1])
    finally:
        launch.cleanup()


def _fit_and_count_wrappers(rank: int, port: int, run_dir: str, counts) -> None:
    """One of 2 processes: trains, then reports how many DDP wrappers are still alive."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2")
    trainer = Trainer(
        model=Linear(5), loss_fn=losses.bce,
        data=synthetic(n_samples=200, n_features=5, batch_size=40, rank=rank, world_size=2),
        optimizer=functools.partial(torch.optim.SGD, lr=0.1), scheduler=constant, l2=0.0,
        run_dir=Path(run_dir), config={}, hparams={}, device="cpu", max_epochs=1,
        dist_timeout=60, processes=Processes.from_env())
    trainer.fit()
    gc.collect()
    counts.put((rank, sum(isinstance(o, DistributedDataParallel) for o in gc.get_objects())))
    distributed.stop()


def test_training_lets_go_of_ddp_before_the_process_group_is_destroyed(tmp_path):
    """DDP holds the process group: a wrapper still alive at exit frees the group during
    interpreter shutdown, where gloo's threads cannot take the GIL and abort the process
    ("terminate called without an active exception", about 1 launch in 25 here). After `fit`
    no wrapper may be left for `distributed.stop()` to miss."""
    context = torch.multiprocessing.get_context("spawn")
    counts = context.Queue()
    port = free_port()
    workers = [context.Process(target=_fit_and_count_wrappers,
                               args=(rank, port, str(tmp_path), counts)) for rank in (0, 1)]
    for worker in workers:
        worker.start()
    try:
        reported = dict(counts.get(timeout=120) for _ in workers)
    finally:
        for worker in workers:
            worker.join(timeout=60)
            if worker.is_alive():
                worker.kill()
    assert reported == {0: 0, 1: 0}
    assert [worker.exitcode for worker in workers] == [0, 0]
