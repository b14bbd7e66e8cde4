"""What a user watches: the real TensorBoard server reading a run back over HTTP, the progress
display on a terminal and in a log, and a diverging run stopped with a message that says why."""

import json
import re
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import torch
from conftest import SMALL, free_port, run_cli, run_in_terminal

from largeml.checkpoint import load_checkpoint, step_files

pytestmark = pytest.mark.e2e

_SCRIPT = Path(sys.executable).with_name("tensorboard")
TENSORBOARD = [str(_SCRIPT)] if _SCRIPT.is_file() else [sys.executable, "-m", "tensorboard.main"]


def get_json(base: str, path: str, **query: str):
    url = f"{base}{path}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


@pytest.mark.slow
def test_tensorboard_server_serves_the_run(tmp_path):
    logdir = tmp_path / "outputs"
    runs = {}
    for name, overrides in (("logreg", []), ("svm", ["model=svm"])):
        run_dir = logdir / name
        result = run_cli(f"hydra.run.dir={run_dir}", *SMALL, *overrides, cwd=tmp_path)
        assert result.returncode == 0, result.stderr + result.stdout
        runs[name] = json.loads((run_dir / "metrics.json").read_text())

    port = free_port()
    server = subprocess.Popen(
        [*TENSORBOARD, "--logdir", str(logdir), "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:  # the server loads the event files in the background
            try:
                if set(get_json(base, "/data/runs")) >= set(runs):
                    break
            except OSError:
                pass
            assert server.poll() is None, server.stdout.read()
            assert time.monotonic() < deadline, "TensorBoard did not list the runs in 60 s"
            time.sleep(0.5)

        for name, metrics in runs.items():
            tags = get_json(base, "/data/plugin/scalars/tags")[name]
            for tag in ("train/loss", "train/lr", "train/grad_norm", "perf/samples_per_sec",
                        "perf/step_time_ms", "perf/data_wait_fraction", "val/accuracy", "val/auc",
                        "val/loss"):
                assert tag in tags, (name, tag, sorted(tags))
            series = get_json(base, "/data/plugin/scalars/scalars", run=name, tag="val/accuracy")
            steps = [step for _, step, _ in series]
            assert steps == sorted(steps) and steps[-1] == metrics["step"]
            assert series[-1][2] == pytest.approx(metrics["val/accuracy"], rel=1e-6)
            assert 0 <= get_json(base, "/data/plugin/scalars/scalars", run=name,
                                 tag="perf/data_wait_fraction")[-1][2] <= 1
            pr_tags = get_json(base, "/data/plugin/pr_curves/tags")
            assert "val/pr_curve" in pr_tags[name], pr_tags
            # Weight histograms at each validation: the 20 weights of the linear model, then
            # its bias.
            histogram_tags = sorted(get_json(base, "/data/plugin/histograms/tags")[name])
            assert histogram_tags == ["weights/linear.bias", "weights/linear.weight"]
            for tag, count in zip(histogram_tags, (1, 20), strict=True):
                series = get_json(base, "/data/plugin/histograms/histograms", run=name, tag=tag)
                assert [step for _, step, _ in series] == [10, 20] == steps
                assert sum(bucket[2] for bucket in series[-1][2]) == pytest.approx(count)
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_progress_is_plain_lines_when_not_a_terminal(tmp_path):
    result = run_cli(f"hydra.run.dir={tmp_path / 'run'}", *SMALL, cwd=tmp_path)
    assert result.returncode == 0, result.stderr + result.stdout
    output = result.stdout + result.stderr
    assert re.search(r"step \d+/20 \(\d+%\), .* samples/s, ETA \d\d:\d\d:\d\d", output), output
    assert "\r" not in output  # no bar redrawing itself in a log


def test_progress_bar_on_a_terminal(tmp_path):
    code, screen = run_in_terminal("largeml.train", f"hydra.run.dir={tmp_path / 'run'}", *SMALL,
                                   cwd=tmp_path)
    assert code == 0, screen[-2000:]
    # One status line redrawn in place ("\r...\x1b[K"), not log lines, and cleared at the end.
    status = re.findall(r"\r(step \d+/20 \(\d+%\), [\d,-]+ samples/s, ETA \d\d:\d\d:\d\d)\x1b\[K",
                        screen)
    assert status and status[-1].startswith("step 20/20 (100%)"), screen[-2000:]
    assert screen.rstrip("\r\n").endswith("\r\x1b[K") or "final:" in screen.split(status[-1])[-1]
    assert not re.search(r"INFO\] - step \d+/20 \(", screen)  # no plain progress log lines


def test_a_diverging_run_stops_and_says_why(tmp_path):
    run_dir = tmp_path / "run"
    # A learning rate that overflows float32 within a few steps.
    result = run_cli(f"hydra.run.dir={run_dir}", *SMALL, "model=svm", "optimizer.lr=1e37",
                     "scheduler=constant", "trainer.log_every_n_steps=1",
                     "trainer.checkpoint_every_n_steps=1", cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "Traceback" not in output
    match = re.search(r"training loss (?:is (?:nan|inf)|or weights are not finite) at step (\d+) "
                      r"\(epoch 0\): the model diverged", output)
    assert match, output
    assert "optimizer.lr=1e+37" in output and "Last good checkpoint:" in output
    # Nothing diverged was saved: every checkpoint left holds finite weights, from before.
    saved = step_files(run_dir / "checkpoints")
    for path in saved:
        state = load_checkpoint(path)
        assert state["step"] < int(match[1])
        assert all(torch.isfinite(t).all() for t in state["model"].values())
    if saved:
        assert str(saved[0]) in output
    else:
        assert "Last good checkpoint: none yet" in output
