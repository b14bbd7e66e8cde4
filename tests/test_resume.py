"""Checkpoints and resume, end to end and in `largeml.checkpoint` itself.

- A run killed with SIGKILL at a random checkpoint and started again with the same command ends
  bitwise equal (model and optimizer) to a run never interrupted: synthetic data, streamed
  shards, and an MLP with dropout (the RNG state must be restored too).
- SIGTERM: the run saves, writes `"stopped": "SIGTERM"` and exits 143; the same command finishes
  the run, bitwise equal to an uninterrupted one.
- Damaged checkpoints (truncated, one flipped byte) are skipped with a warning for the previous
  complete one; the `largeml.checkpoint` functions (round trip, checksum, prune, fallback).
- `trainer.resume=<path>` / `<missing or damaged path>` / `null`.
- best.pt follows `trainer.best_metric` as logged to TensorBoard; `keep_checkpoints` prunes.
- Under `torchrun --max-restarts=1`, a killed worker is restarted, every rank of both attempts
  uses one run directory, the restart resumes from last.pt and the job ends with the model of
  an uninterrupted 2-process run.

Kill points are drawn at random; each test prints its seed, and `LARGEML_TEST_SEED=<seed>`
replays a failing draw.
"""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import REPO, STREAMING, TORCHRUN, free_port, write_dense_shards, write_sparse_shards
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from largeml.checkpoint import (
    STEP_FILE,
    DamagedCheckpoint,
    link,
    load_checkpoint,
    newest_complete,
    prune,
    save_checkpoint,
    step_files,
)

TIMEOUT = 240  # seconds for one training process: generous, the CPU is shared with other tests
ENV = {**os.environ, "PYTHONPATH": str(REPO), "HYDRA_FULL_ERROR": "0"}

# Long enough (a second or more of training) to be killed mid-run. Checkpoints every 7 steps,
# which divides no epoch's step count, so a resume usually lands mid-epoch.
LONG = ["data.n_samples=6000", "data.n_features=20", "data.batch_size=16", "trainer.max_epochs=3",
        "trainer.checkpoint_every_n_steps=7", "trainer.log_every_n_steps=50", *STREAMING]
CASES = {
    "synthetic": LONG,  # 4800 training rows: 300 steps an epoch, 900 in all
    "shards": ["data=files", "data.train_path={shards}", "data.batch_size=32",
               "trainer.max_epochs=3", "trainer.checkpoint_every_n_steps=7",
               "trainer.log_every_n_steps=50", *STREAMING],  # 8000 rows: 250 steps an epoch
    "mlp-dropout": [*LONG, "model=mlp", "model.hidden_sizes=[16]", "model.dropout=0.2"],
    "mlp-3-classes": [*LONG, "data.n_classes=3", "model=mlp", "model.hidden_sizes=[16]"],
    # FTRL's state, not the model, holds the weights between checkpoints
    "ftrl-sparse": ["data=files", "data.train_path={sparse_shards}", "data.batch_size=32",
                    "optimizer=ftrl", "trainer.tol=0", "trainer.max_epochs=3",
                    "trainer.checkpoint_every_n_steps=7", "trainer.log_every_n_steps=50"],
}
# Short: 10 steps an epoch, 20 in all; step files at 3, 6, 9, 10, 12, 15, 18, 20 (15, 18 and 20
# kept).
SHORT = ["data.n_samples=3000", "data.n_features=20", "trainer.max_epochs=2",
         "trainer.checkpoint_every_n_steps=3", "trainer.log_every_n_steps=5", *STREAMING]


# -- helpers ---------------------------------------------------------------------------------


def train_command(run_dir: Path, overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "largeml.train", f"hydra.run.dir={run_dir}", *overrides]


def train(run_dir: Path, overrides: list[str]) -> subprocess.CompletedProcess:
    """Runs `python -m largeml.train` to its end; the output is stdout and stderr together."""
    return subprocess.run(train_command(run_dir, overrides), cwd=run_dir.parent, env=ENV,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=TIMEOUT)


def start(command: list[str], cwd: Path, console: Path, env: dict[str, str] = ENV,
          ) -> subprocess.Popen:
    """Starts `command` in its own process group, its output into the file `console` (a pipe
    nobody reads while we wait could fill up and stall it)."""
    with open(console, "w") as out:
        return subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def stop_group(proc: subprocess.Popen) -> None:
    """Kills what `start` began, if it still runs, its descendants included (torchrun starts
    its workers in sessions of their own): a failed test must leave nothing behind."""
    if proc.poll() is None:
        for pid in descendants(proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def descendants(pid: int) -> list[int]:
    return [d for child in children(pid) for d in (child, *descendants(child))]


def newest_step(checkpoints: Path) -> int:
    steps = [int(m[1]) for p in checkpoints.glob("step-*.pt") if (m := STEP_FILE.fullmatch(p.name))]
    return max(steps, default=-1)


def wait_for_step(proc: subprocess.Popen, checkpoints: Callable[[], Path | None], step: int,
                  console: Path) -> int:
    """Polls until a step file of `step` or later exists; returns the step seen."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        directory = checkpoints()
        seen = newest_step(directory) if directory else -1
        if seen >= step:
            return seen
        if proc.poll() is not None:
            pytest.fail(f"the run ended (status {proc.returncode}) before a checkpoint at step "
                        f">= {step}; newest was {seen}:\n{console.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"no checkpoint at step >= {step} within {TIMEOUT} s")
        time.sleep(0.002)


def kill_point(rng: random.Random, total_steps: int, every: int) -> int:
    """A checkpoint step between 15 % and 50 % of the run: late enough to be mid-run, early
    enough that the poll sees it long before the run ends."""
    return every * rng.randint(max(1, int(0.15 * total_steps) // every),
                               int(0.5 * total_steps) // every)


def assert_bitwise_equal(actual: Any, expected: Any, where: str) -> None:
    """Every tensor equal bit for bit (`torch.equal`, same dtype and shape), every other value
    equal, the same keys."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor), where
        assert (actual.dtype, actual.shape) == (expected.dtype, expected.shape), where
        if not torch.equal(actual, expected):
            diff = (actual.double() - expected.double()).abs().max().item()
            pytest.fail(f"{where} differs: max |difference| {diff:.3g}")
    elif isinstance(expected, dict):
        assert isinstance(actual, dict) and actual.keys() == expected.keys(), where
        for key in expected:
            assert_bitwise_equal(actual[key], expected[key], f"{where}[{key!r}]")
    elif isinstance(expected, list | tuple):
        assert isinstance(actual, list | tuple) and len(actual) == len(expected), where
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_bitwise_equal(a, e, f"{where}[{i}]")
    else:
        assert actual == expected, where


def assert_same_training_state(actual: dict, expected: dict) -> None:
    for key in ("model", "optimizer", "scheduler"):
        assert_bitwise_equal(actual[key], expected[key], key)
    assert (actual["step"], actual["epoch"]) == (expected["step"], expected["epoch"])


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max((a[k].double() - b[k].double()).abs().max().item() for k in b)


def metrics_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def copy_run(source: Path, target: Path) -> Path:
    """A copy of a run directory in which last.pt and best.pt are again hard links to the step
    files they share an inode with in `source` (copytree would make them separate files)."""
    shutil.copytree(source, target)
    src, dst = source / "checkpoints", target / "checkpoints"
    by_inode = {p.stat().st_ino: p.name for p in step_files(src)}
    for name in ("last.pt", "best.pt"):
        if (step_file := by_inode.get((src / name).stat().st_ino)) is not None:
            (dst / name).unlink()
            os.link(dst / step_file, dst / name)
    return target


def flip_middle_byte(path: Path) -> None:
    """Flips one bit of the byte in the middle of the model's largest tensor as stored in the
    file: mid-file and in the contents for sure (a flip in the zip's alignment padding would
    change nothing that loads)."""
    model = load_checkpoint(path)["model"]
    # (by the bytes it takes: an identity input map is stored as one number, viewed n times)
    data = max(model.values(), key=lambda t: t.untyped_storage().nbytes()).numpy().tobytes()
    contents = path.read_bytes()
    offset = contents.find(data)
    assert offset >= 0 and contents.find(data, offset + 1) < 0, "the tensor's bytes, once"
    with open(path, "r+b") as f:  # in place: every hard link to the file sees it
        f.seek(offset + len(data) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x10]))


def truncate_to_half(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


# -- fixtures --------------------------------------------------------------------------------


@pytest.fixture
def rng(request) -> random.Random:
    """A seeded random source for kill points; the seed is printed (shown on failure)."""
    seed = int(os.environ.get("LARGEML_TEST_SEED", random.randrange(2**32)))
    print(f"{request.node.nodeid}: LARGEML_TEST_SEED={seed}")
    return random.Random(seed)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_dense_shards(tmp_path_factory.mktemp("shards") / "train", 8000, 20)


@pytest.fixture(scope="module")
def case_overrides(shards) -> Callable[[str], list[str]]:
    sparse = write_sparse_shards(shards.parent / "sparse", 8000, 500)
    return lambda case: [o.format(shards=shards, sparse_shards=sparse) for o in CASES[case]]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, case_overrides) -> Callable[[str], Path]:
    """The run directory of one uninterrupted run per case, made once for the module."""
    runs: dict[str, Path] = {}

    def get(case: str) -> Path:
        if case not in runs:
            run_dir = tmp_path_factory.mktemp("uninterrupted") / case
            result = train(run_dir, case_overrides(case))
            assert result.returncode == 0, result.stdout
            runs[case] = run_dir
        return runs[case]

    return get


@pytest.fixture(scope="module")
def short_run(tmp_path_factory) -> Path:
    """A finished SHORT run; tests copy it rather than change it."""
    run_dir = tmp_path_factory.mktemp("short") / "run"
    result = train(run_dir, SHORT)
    assert result.returncode == 0, result.stdout
    return run_dir


# -- 1. SIGKILL mid-run, then the same command again -----------------------------------------


@pytest.mark.e2e
@pytest.mark.parametrize("case", [case if case == "synthetic" else
                                  pytest.param(case, marks=pytest.mark.slow) for case in CASES])
def test_killed_run_resumes_bitwise_equal(tmp_path, rng, case, case_overrides, uninterrupted):
    expected_dir = uninterrupted(case)
    expected = load_checkpoint(expected_dir / "checkpoints" / "last.pt")
    total = metrics_of(expected_dir)["step"]
    assert expected["step"] == total
    overrides = case_overrides(case)
    target = kill_point(rng, total, 7)

    run_dir = tmp_path / "run"
    checkpoints = run_dir / "checkpoints"
    proc = start(train_command(run_dir, overrides), tmp_path, tmp_path / "killed.out")
    try:
        wait_for_step(proc, lambda: checkpoints, target, tmp_path / "killed.out")
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        stop_group(proc)
    # What the rerun must resume from. Not always the step seen: a kill between writing a step
    # file and pointing last.pt at it leaves last.pt, which comes first, one save behind.
    interrupted_at = newest_complete(checkpoints)[1]["step"]
    assert 0 < interrupted_at < total, f"killed too late (target step {target})"

    result = train(run_dir, overrides)
    assert result.returncode == 0, result.stdout
    assert f"resumed at step {interrupted_at} " in result.stdout
    actual = load_checkpoint(checkpoints / "last.pt")
    assert_same_training_state(actual, expected)
    metrics, expected_metrics = metrics_of(run_dir), metrics_of(expected_dir)
    assert (metrics["step"], metrics["epoch"]) == (expected_metrics["step"],
                                                   expected_metrics["epoch"])


# -- 2. SIGTERM --------------------------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.slow
def test_sigterm_saves_exits_143_and_the_same_command_finishes(tmp_path, rng, case_overrides,
                                                               uninterrupted):
    expected_dir = uninterrupted("synthetic")
    total = metrics_of(expected_dir)["step"]
    overrides = case_overrides("synthetic")
    target = kill_point(rng, total, 7)

    run_dir = tmp_path / "run"
    checkpoints = run_dir / "checkpoints"
    console = tmp_path / "terminated.out"
    proc = start(train_command(run_dir, overrides), tmp_path, console)
    try:
        wait_for_step(proc, lambda: checkpoints, target, console)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 143, console.read_text()[-3000:]
    finally:
        stop_group(proc)
    output = console.read_text()
    assert "SIGTERM" in output and "WARNING" in output

    saved = load_checkpoint(checkpoints / "last.pt")
    assert target <= saved["step"] < total
    metrics = metrics_of(run_dir)
    assert metrics["stopped"] == "SIGTERM"
    assert metrics["step"] == saved["step"]

    result = train(run_dir, overrides)
    assert result.returncode == 0, result.stdout
    assert f"resumed at step {saved['step']} " in result.stdout
    assert_same_training_state(load_checkpoint(checkpoints / "last.pt"),
                               load_checkpoint(expected_dir / "checkpoints" / "last.pt"))
    metrics = metrics_of(run_dir)
    assert metrics["step"] == total
    assert metrics["stopped"] == "max_epochs"  # the cap, as uninterrupted: SIGTERM is history


# -- 3. damaged checkpoints ------------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.parametrize("damage", [truncate_to_half, flip_middle_byte],
                         ids=["truncated", "flipped-byte"])
def test_damaged_newest_checkpoint_is_skipped(tmp_path, short_run, damage):
    run_dir = copy_run(short_run, tmp_path / "run")
    checkpoints = run_dir / "checkpoints"
    assert [p.name for p in step_files(checkpoints)] == [
        "step-000000020.pt", "step-000000018.pt", "step-000000015.pt"]
    newest = checkpoints / "step-000000020.pt"
    assert os.path.samefile(newest, checkpoints / "last.pt")  # last.pt is a hard link
    damage(newest)
    with pytest.raises(DamagedCheckpoint):
        load_checkpoint(checkpoints / "last.pt")

    result = train(run_dir, [*SHORT, "trainer.max_epochs=3"])
    assert result.returncode == 0, result.stdout
    log = (run_dir / "train.log").read_text()
    warnings = [line for line in log.splitlines()
                if "WARNING" in line and "skipping damaged checkpoint" in line]
    assert warnings, log
    assert any(str(newest) in line or str(checkpoints / "last.pt") in line for line in warnings)
    assert f"resuming from {checkpoints / 'step-000000018.pt'}" in log
    assert "resumed at step 18 " in log
    metrics = metrics_of(run_dir)
    assert (metrics["step"], metrics["epoch"]) == (30, 3)
    assert load_checkpoint(checkpoints / "last.pt")["step"] == 30


def small_state(step: int) -> dict:
    return {"model": {"weight": torch.arange(64, dtype=torch.float32).reshape(2, 32) + step,
                      "bias": torch.tensor([0.5])},
            "optimizer": {"state": {0: {"momentum_buffer": torch.ones(3)}},
                          "param_groups": [{"lr": 0.1, "params": [0]}]},
            "step": step, "epoch": 1, "best": {"value": None, "step": -1}, "name": "x"}


@pytest.mark.unit
def test_checkpoint_round_trip(tmp_path):
    path = tmp_path / "checkpoints" / "step-000000007.pt"
    state = small_state(7)
    save_checkpoint(state, path)
    loaded = load_checkpoint(path)
    assert_bitwise_equal(loaded, state, "state")  # the checksum is not part of what loads
    assert not list(path.parent.glob(".*.tmp"))  # the temporary file was renamed away
    assert "crc32" in torch.load(path, weights_only=True)


@pytest.mark.unit
def test_changed_contents_fail_the_checksum(tmp_path):
    """A tensor value changed under the old checksum: torch.load alone would not notice."""
    path = tmp_path / "step-000000001.pt"
    save_checkpoint(small_state(1), path)
    good = path.read_bytes()
    raw = torch.load(path, weights_only=True)
    raw["model"]["weight"][0, 3] += 1
    torch.save(raw, path)
    with pytest.raises(DamagedCheckpoint, match="checksum"):
        load_checkpoint(path)

    path.write_bytes(good)
    assert load_checkpoint(path)["step"] == 1


@pytest.mark.unit
@pytest.mark.parametrize("keep", [0.0, 0.01, 0.5, 0.999], ids=["empty", "1%", "half", "-1B"])
def test_truncated_checkpoint_is_damaged(tmp_path, keep):
    path = tmp_path / "step-000000001.pt"
    save_checkpoint(small_state(1), path)
    good = path.read_bytes()
    path.write_bytes(good[:int(keep * len(good))])
    with pytest.raises(DamagedCheckpoint, match="step-000000001.pt"):
        load_checkpoint(path)


@pytest.mark.unit
def test_every_single_bit_flip_is_detected_or_harmless(tmp_path):
    """One bit flipped at each byte of the file in turn (bit i % 8 at byte i): loading raises
    DamagedCheckpoint, or it returns exactly what was saved (a flip in the zip's padding or in
    a header field nobody reads changes nothing). Nothing else may come out: no other
    exception, no other values."""
    path = tmp_path / "step-000000001.pt"
    state = small_state(1)
    save_checkpoint(state, path)
    good = path.read_bytes()
    wrong = []
    for offset in range(len(good)):
        damaged = bytearray(good)
        damaged[offset] ^= 1 << (offset % 8)
        path.write_bytes(bytes(damaged))
        try:
            loaded = load_checkpoint(path)
            assert_bitwise_equal({k: loaded[k] for k in state}, state, "state")
        except DamagedCheckpoint:
            continue
        except (Exception, pytest.fail.Exception) as err:
            wrong.append(f"byte {offset}: {type(err).__name__}: {str(err)[:150]}")
    assert not wrong, f"{len(wrong)} of {len(good)} flips:\n" + "\n".join(wrong[:10])


@pytest.mark.unit
def test_prune_keeps_the_newest_step_files(tmp_path):
    for step in (3, 9, 10, 120, 1000):
        save_checkpoint(small_state(step), tmp_path / f"step-{step:09d}.pt")
    link(tmp_path / "step-000000003.pt", tmp_path / "best.pt")
    link(tmp_path / "step-000001000.pt", tmp_path / "last.pt")
    (tmp_path / "notes.txt").write_text("kept")

    prune(tmp_path, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "best.pt", "last.pt", "notes.txt", "step-000000120.pt", "step-000001000.pt"]
    assert load_checkpoint(tmp_path / "best.pt")["step"] == 3  # its step file is gone, not it
    prune(tmp_path, 1)
    assert [p.name for p in step_files(tmp_path)] == ["step-000001000.pt"]


@pytest.mark.unit
def test_newest_complete_falls_back_past_damaged_files(tmp_path, caplog):
    assert newest_complete(tmp_path) is None
    for step in (5, 10, 15):
        save_checkpoint(small_state(step), tmp_path / f"step-{step:09d}.pt")
    link(tmp_path / "step-000000015.pt", tmp_path / "last.pt")
    path, state = newest_complete(tmp_path)
    assert (path.name, state["step"]) == ("step-000000015.pt", 15)  # step files before last.pt

    truncate_to_half(tmp_path / "step-000000015.pt")  # and so last.pt
    flip_middle_byte(tmp_path / "step-000000010.pt")
    with caplog.at_level("WARNING", logger="largeml.checkpoint"):
        path, state = newest_complete(tmp_path)
    assert (path.name, state["step"]) == ("step-000000005.pt", 5)
    damaged = [r.getMessage() for r in caplog.records if "skipping damaged" in r.getMessage()]
    assert len(damaged) == 2  # last.pt and step 15 are one file: warned about once
    assert any("step-000000010.pt" in m for m in damaged)

    truncate_to_half(tmp_path / "step-000000005.pt")
    assert newest_complete(tmp_path) is None


# -- 4. trainer.resume=<path> | null ---------------------------------------------------------


@pytest.mark.e2e
def test_resume_from_a_path_continues_in_a_new_run_directory(tmp_path, short_run):
    source = short_run / "checkpoints" / "step-000000015.pt"
    run_dir = tmp_path / "run"
    result = train(run_dir, [*SHORT, f"trainer.resume={source}"])
    assert result.returncode == 0, result.stdout
    assert "resumed at step 15 " in result.stdout
    steps = [int(STEP_FILE.fullmatch(p.name)[1]) for p in step_files(run_dir / "checkpoints")]
    assert steps == [20, 18]  # the steps after 15 only
    assert metrics_of(run_dir)["step"] == 20
    # The rest of the same run: the same model as the source run's end.
    assert_same_training_state(load_checkpoint(run_dir / "checkpoints" / "last.pt"),
                               load_checkpoint(short_run / "checkpoints" / "last.pt"))


@pytest.mark.e2e
def test_resume_from_a_missing_or_damaged_file_is_a_config_error(tmp_path, short_run):
    damaged = tmp_path / "damaged.pt"
    shutil.copyfile(short_run / "checkpoints" / "last.pt", damaged)
    truncate_to_half(damaged)
    for name, path in (("missing", tmp_path / "no-such.pt"), ("damaged", damaged)):
        run_dir = tmp_path / name
        result = train(run_dir, [*SHORT, f"trainer.resume={path}"])
        assert result.returncode == 2, result.stdout
        assert f"trainer.resume={path}" in result.stdout
        assert "Traceback" not in result.stdout
        assert not (run_dir / "checkpoints").exists()


@pytest.mark.e2e
def test_resume_null_refuses_a_directory_with_an_earlier_runs_checkpoints(tmp_path, short_run):
    """Starting from scratch there would mix two runs' step files (the earlier run's higher
    steps would outrank the new ones): the run stops before training and touches nothing."""
    run_dir = copy_run(short_run, tmp_path / "run")  # last.pt at step 20
    before = {p.name: p.stat().st_mtime_ns for p in (run_dir / "checkpoints").iterdir()}
    result = train(run_dir, [*SHORT, "trainer.max_epochs=1", "trainer.resume=null"])
    assert result.returncode == 2, result.stdout
    assert "trainer.resume=null" in result.stdout and "hydra.run.dir" in result.stdout
    assert "Traceback" not in result.stdout
    after = {p.name: p.stat().st_mtime_ns for p in (run_dir / "checkpoints").iterdir()}
    assert after == before


# -- 5. best.pt and keep_checkpoints ---------------------------------------------------------


@pytest.mark.e2e
def test_best_checkpoint_follows_the_logged_metric(tmp_path):
    run_dir = tmp_path / "run"
    # 10 steps an epoch; validation every 3 steps and at each epoch end, checkpoints every 5
    # steps (so also at every epoch's last step, saved again once the epoch is counted).
    result = train(run_dir, ["data.n_samples=3000", "data.n_features=20", "data.noise=1.0",
                             "optimizer=sgd", "optimizer.lr=0.02", "trainer.tol=0",
                             "trainer.max_epochs=5",
                             "trainer.val_every_n_steps=3", "trainer.checkpoint_every_n_steps=5",
                             "trainer.keep_checkpoints=2", "trainer.best_metric=val/accuracy"])
    assert result.returncode == 0, result.stdout
    checkpoints = run_dir / "checkpoints"
    assert len(step_files(checkpoints)) == 2
    assert step_files(checkpoints)[0].name == "step-000000050.pt"

    events = EventAccumulator(str(run_dir))
    events.Reload()
    series = events.Scalars("val/accuracy")
    assert len(series) >= 20  # every 3 steps and at every epoch end
    best = max(series, key=lambda e: e.value)  # the first of equal values
    state = load_checkpoint(checkpoints / "best.pt")
    assert state["step"] == best.step, [(e.step, e.value) for e in series]
    assert state["best"]["value"] == pytest.approx(best.value, rel=1e-6)
    assert state["best"]["step"] == best.step
    assert load_checkpoint(checkpoints / "last.pt")["step"] == 50


# -- 6. torchrun --max-restarts ---------------------------------------------------------------


# 100 steps an epoch, 200 in all. A rank that waits for a dead or hung one gives up after
# dist_timeout seconds: a restart that cannot form its process group fails the test in bounded
# time.
TORCHRUN_OVERRIDES = ["data.n_samples=4000", "data.n_features=20", "data.batch_size=32",
                      "trainer.max_epochs=2", "trainer.checkpoint_every_n_steps=7",
                      "trainer.log_every_n_steps=50", "trainer.dist_timeout=60", *STREAMING]
TORCHRUN_TIMEOUT = 200  # seconds for a whole launch: two attempts at most


def torchrun_command() -> list[str]:
    return [*TORCHRUN, "--nproc_per_node=2", "--max-restarts=1", "--master_addr=127.0.0.1",
            f"--master_port={free_port()}", "-m", "largeml.train", *TORCHRUN_OVERRIDES]


def worker_of_rank(launcher: int, rank: int) -> int | None:
    """The pid of torchrun's worker process of `rank` (from its environment), if running."""
    for pid in children(launcher):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ:
            return pid
    return None


def run_dirs(cwd: Path) -> list[Path]:
    return sorted(p.parent.parent for p in (cwd / "outputs").glob("**/checkpoints/last.pt"))


def checkpoints_under(cwd: Path) -> Path | None:
    """The checkpoints directory of the (first) run under `cwd`/outputs, wherever it is."""
    found = sorted((cwd / "outputs").glob("**/checkpoints"))
    return found[0] if found else None


@pytest.mark.distributed
@pytest.mark.slow
def test_torchrun_restarts_a_killed_worker_and_resumes(tmp_path, rng):
    env = {**ENV, "GLOO_SOCKET_IFNAME": "lo"}
    (tmp_path / "reference").mkdir()
    (tmp_path / "elastic").mkdir()
    # The uninterrupted run goes alongside (its own directory and port): it only has to finish.
    reference = start(torchrun_command(), tmp_path / "reference", tmp_path / "reference.out", env)
    console = tmp_path / "elastic.out"
    elastic = start(torchrun_command(), tmp_path / "elastic", console, env)
    try:
        target = kill_point(rng, 200, 7)
        wait_for_step(elastic, lambda: checkpoints_under(tmp_path / "elastic"), target, console)
        worker = worker_of_rank(elastic.pid, 1)
        assert worker is not None, "no worker with RANK=1 among torchrun's children"
        os.kill(worker, signal.SIGKILL)
        assert elastic.wait(timeout=TORCHRUN_TIMEOUT) == 0, console.read_text()[-5000:]
        assert reference.wait(timeout=TORCHRUN_TIMEOUT) == 0, (
            (tmp_path / "reference.out").read_text()[-5000:])
    finally:
        stop_group(elastic)
        stop_group(reference)

    output = console.read_text()
    dirs, (expected_dir,) = run_dirs(tmp_path / "elastic"), run_dirs(tmp_path / "reference")
    final = max(dirs, key=lambda d: (d / "checkpoints" / "last.pt").stat().st_mtime)
    actual = load_checkpoint(final / "checkpoints" / "last.pt")
    expected = load_checkpoint(expected_dir / "checkpoints" / "last.pt")
    print(f"torchrun restart vs uninterrupted: max |model difference| "
          f"{max_difference(actual['model'], expected['model']):.3g}")

    # One run directory for every rank of the launch and of its restart, where the restarted
    # workers resumed.
    logs = sorted((tmp_path / "elastic" / "outputs").glob("**/train*.log"))
    assert len(dirs) == 1 and all(log.parent == dirs[0] for log in logs), (
        f"expected one run directory, found checkpoints in {[str(d) for d in dirs]} and logs "
        f"{[str(log) for log in logs]}")
    resumed = [line for line in output.splitlines() if "resumed at step" in line]
    assert resumed, output[-5000:]
    assert int(resumed[-1].split("resumed at step ")[1].split()[0]) >= target
    assert metrics_of(final)["step"] == 200
    assert_same_training_state(actual, expected)
