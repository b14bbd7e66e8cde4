"""Two machines, as torchrun sees them: two `torchrun --nnodes=2 --rdzv-backend=c10d` launches
on loopback, each in its own working directory (the separate disks of two machines).

Checks what the README promises for several machines: rank 0's node holds the run directory
(config, TensorBoard, metrics.json, checkpoints), the other node only its rank's log at the same
relative path; both ranks take the same steps; the model is the one-process model on the same
data; and a node whose rendezvous endpoint is closed or does not resolve fails in seconds with
the README's `--rdzv-conf=read_timeout=...`, naming the endpoint. Without torchrun (a cluster
engine sets MASTER_ADDR and MASTER_PORT), largeml itself names a meeting point that does not
resolve, at once, or cannot be reached, after `trainer.dist_timeout`.
"""

import json
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
from conftest import REPO, SMALL, TORCHRUN, free_port, run_cli

from largeml import distributed
from largeml.checkpoint import load_checkpoint
from largeml.distributed import DistributedError, Processes

# What the README's multi-node command adds: give up on an endpoint that does not answer
# after 10 s instead of torchrun's default 60 s (about 80 s with its retry).
READ_TIMEOUT = 10
# 2402 training rows in global batches of 256 (ten steps an epoch), 601 validation rows.
JOB = [*SMALL, "data.n_samples=3003", "data.batch_size=256"]


def node_env() -> dict[str, str]:
    """This environment without what a launcher or an outer torchrun set."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                        "MASTER_ADDR", "MASTER_PORT") and not k.startswith("TORCHELASTIC")}
    return {**env, "GLOO_SOCKET_IFNAME": "lo", "PYTHONPATH": str(REPO), "HYDRA_FULL_ERROR": "0"}


def node(endpoint: str, run_id: str, cwd: Path, *conf: str,
         read_timeout: int = READ_TIMEOUT) -> subprocess.Popen:
    """One machine's `torchrun --nnodes=2 --nproc-per-node=1` of JOB, started in `cwd`."""
    cwd.mkdir(parents=True, exist_ok=True)
    args = [*TORCHRUN, "--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d",
            f"--rdzv-endpoint={endpoint}", f"--rdzv-id={run_id}",
            f"--rdzv-conf={','.join([f'read_timeout={read_timeout}', *conf])}",
            "-m", "largeml.train", *JOB]
    return subprocess.Popen(args, cwd=cwd, env=node_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def finish(process: subprocess.Popen, timeout: float) -> tuple[int, str]:
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
        raise AssertionError(f"torchrun still running after {timeout} s:\n{output}") from None
    return process.returncode, output


def final_step(log: Path) -> int:
    """The step in a rank's `final: ...` log line."""
    (line,) = [line for line in log.read_text().splitlines() if "final: " in line]
    return int(re.search(r"\bstep=(\d+)", line)[1])


@pytest.mark.distributed
@pytest.mark.slow  # two launches and a one-process run: ~30 s on 2 shared cores
def test_two_nodes_train_the_one_process_model(tmp_path):
    run_id = f"two-nodes-{uuid.uuid4().hex[:8]}"
    endpoint = f"127.0.0.1:{free_port()}"
    machines = [tmp_path / "machine0", tmp_path / "machine1"]
    processes = [node(endpoint, run_id, cwd) for cwd in machines]
    results = [finish(process, timeout=240) for process in processes]
    for code, output in results:
        assert code == 0, output

    # The node whose rank 0 wrote metrics.json holds the run; either may get rank 0.
    run_dirs = [cwd / "outputs" / "torchrun" / run_id for cwd in machines]
    (main,) = [d for d in run_dirs if (d / "metrics.json").is_file()]
    (other,) = [d for d in run_dirs if d != main]
    assert sorted(p.name for p in main.iterdir()) == [
        ".hydra", "checkpoints", "config.yaml",
        *sorted(p.name for p in main.glob("events.out.tfevents.*")), "metrics.json", "train.log"]
    assert len(list(main.glob("events.out.tfevents.*"))) == 1
    # The other machine: its rank's log, nothing else, anywhere in its working directory.
    assert [p for p in other.parent.parent.parent.rglob("*") if p.is_file()] == [
        other / "train.rank1.log"]

    metrics = json.loads((main / "metrics.json").read_text())
    assert metrics["processes"] == 2
    assert final_step(main / "train.log") == final_step(other / "train.rank1.log") \
        == metrics["step"] == 20

    one = run_cli(f"hydra.run.dir={tmp_path / 'one'}", *JOB, cwd=tmp_path, timeout=180)
    assert one.returncode == 0, one.stderr + one.stdout
    single = load_checkpoint(tmp_path / "one" / "checkpoints" / "last.pt")
    double = load_checkpoint(main / "checkpoints" / "last.pt")
    assert double["step"] == single["step"] == 20
    assert double["model"].keys() == single["model"].keys()
    for name, tensor in single["model"].items():
        torch.testing.assert_close(double["model"][name], tensor, rtol=1e-5, atol=1e-6,
                                   msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.distributed
@pytest.mark.parametrize("endpoint", [
    "closed", pytest.param("nosuchhost.invalid", marks=pytest.mark.slow)])
def test_an_unreachable_endpoint_fails_in_seconds_naming_it(tmp_path, endpoint):
    """A node that is not the rendezvous host (`is_host=false`: another machine should run the
    store) and finds no store at the endpoint, or cannot resolve its name, gives up after
    read_timeout (3 s here, to keep the test short); torchrun's default would wait 60 s and
    retry once (82 s measured). The subprocess timeout is the bound: under the default."""
    host, port = ("127.0.0.1", free_port()) if endpoint == "closed" else (endpoint, 29400)
    process = node(f"{host}:{port}", "nobody-there", tmp_path, "is_host=false", read_timeout=3)
    code, output = finish(process, timeout=45)
    assert code != 0, output
    assert f"trying to connect to ({host}, {port})" in output, output
    assert "RendezvousConnectionError" in output
    assert not (tmp_path / "outputs").exists()  # no worker started


@pytest.mark.unit
def test_a_master_addr_that_does_not_resolve_fails_at_once(monkeypatch):
    """As a cluster engine starts a worker: the torch.distributed variables, no torchrun. The
    process group would retry the name until trainer.dist_timeout (300 s)."""
    for key in [k for k in os.environ if k.startswith("TORCHELASTIC")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("MASTER_ADDR", "nosuchhost.invalid")
    monkeypatch.setenv("MASTER_PORT", "29400")
    expected = "MASTER_ADDR:MASTER_PORT=nosuchhost.invalid:29400: 'nosuchhost.invalid' does not"
    with pytest.raises(DistributedError, match=re.escape(expected)):
        distributed.start(Processes(rank=1, world_size=2), torch.device("cpu"), timeout_s=300)
    assert not torch.distributed.is_initialized()


@pytest.mark.distributed
@pytest.mark.slow  # ~20 s here: torch's store tries twice, after start-up on 2 shared cores
def test_a_master_nobody_listens_at_is_named_after_dist_timeout(tmp_path):
    """Rank 1 of 2 started by hand (or by an engine) while no rank 0 listens: the error names
    the address it waited for, after trainer.dist_timeout."""
    port = free_port()
    env = {**node_env(), "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "0",
           "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    result = subprocess.run([sys.executable, "-m", "largeml.train", *JOB,
                             "trainer.dist_timeout=3"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=90)
    output = result.stderr + result.stdout
    assert result.returncode == 2, output
    assert (f"rank 1: joining the process group at MASTER_ADDR:MASTER_PORT=127.0.0.1:{port} "
            "failed") in output
    assert "Traceback" not in output
