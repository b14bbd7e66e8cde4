"""The processes of a run: one without a launcher, N under `torchrun`.

torchrun tells each process who it is through the environment (RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE) and where to meet (MASTER_ADDR, MASTER_PORT); `Processes.from_env` reads it.
The collectives below are the few the Trainer needs; each is a no-op in a single process, and
each gives up after the process group's timeout (`trainer.dist_timeout`) instead of waiting
forever for a rank that died or hangs.
"""

import functools
import gc
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor

from largeml.errors import LargemlError


class DistributedError(LargemlError, RuntimeError):
    """Another rank died, hangs, or cannot be reached."""


@dataclass(frozen=True)
class Processes:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @classmethod
    def from_env(cls) -> "Processes":
        env = os.environ
        return cls(
            rank=int(env.get("RANK", 0)),
            world_size=int(env.get("WORLD_SIZE", 1)),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            local_world_size=int(env.get("LOCAL_WORLD_SIZE", 1)),
        )

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes logs, metrics and checkpoints."""
        return self.rank == 0


def launch_id() -> str | None:
    """torchrun's run id (`--rdzv-id`, or a fresh uuid per launch without `--master_port`): the
    same on every rank and node, and across the restarts of one launch."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    return run_id if run_id and run_id != "none" else None


@functools.cache
def agreed(key: str, proposal: str) -> str:
    """The first `proposal` any process of this torchrun launch made for `key`: kept in the
    store torchrun's agent runs at MASTER_ADDR:MASTER_PORT, which outlives restarts of the
    workers. Without that store (no torchrun), `proposal` itself."""
    env = os.environ
    if env.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or "MASTER_PORT" not in env:
        return proposal
    store = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), is_master=False,
                          timeout=timedelta(seconds=60))
    return store.compare_set(f"largeml/{key}", "", proposal).decode()


def start(processes: Processes, device: torch.device, timeout_s: float) -> None:
    """Joins the process group: nccl between GPUs, gloo between CPU processes."""
    if not processes.distributed or dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = timedelta(seconds=timeout_s)
    where = meeting_point()
    meeting = {}
    env = os.environ
    with failures(f"joining the process group at MASTER_ADDR:MASTER_PORT={where}"):
        if env.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            # torchrun's store outlives a restart of the workers, and the restarted ones would
            # read the previous attempt's addresses from it (gloo: "connectFullMesh failed ...
            # Connection refused"): each attempt meets under its own prefix.
            store = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), is_master=False,
                                  timeout=timeout)
            attempt = env.get("TORCHELASTIC_RESTART_COUNT", "0")
            meeting = {"store": dist.PrefixStore(f"largeml/attempt-{attempt}", store),
                       "rank": processes.rank, "world_size": processes.world_size}
        dist.init_process_group(
            backend, timeout=timeout, device_id=device if device.type == "cuda" else None,
            **meeting,
        )


def meeting_point() -> str:
    """`MASTER_ADDR:MASTER_PORT`, where rank 0 (or torchrun's agent) listens, once it is known
    to name a host: a name that does not resolve fails here at once, where the process group
    would retry it until `trainer.dist_timeout`."""
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not addr or not port or not port.isdigit():
        raise DistributedError(
            f"MASTER_ADDR={addr} MASTER_PORT={port}: {os.environ.get('WORLD_SIZE')} processes "
            "need rank 0's host and a port to meet at; torchrun sets them, a cluster engine "
            "(Ray Train, Spark's TorchDistributor) too, else set both in every process")
    try:
        socket.getaddrinfo(addr, int(port), type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as err:
        raise DistributedError(
            f"MASTER_ADDR:MASTER_PORT={addr}:{port}: {addr!r} does not resolve ({err}); set "
            "MASTER_ADDR to rank 0's host name or address") from None
    return f"{addr}:{port}"


def stop() -> None:
    """Leaves the process group and frees it now. A group still referenced at exit (by a DDP
    wrapper in a reference cycle, say) is freed during interpreter shutdown, where gloo's worker
    threads can no longer take the GIL: "terminate called without an active exception", SIGABRT,
    in about 1 of 25 two-process runs here."""
    if dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


# What the backends' errors say when a peer is gone or silent (gloo raises plain RuntimeErrors,
# e.g. from DDP's all-reduce inside backward()).
_PEER_TROUBLE = ("timed out", "timeout", "connection", "closed by peer", "pair closure",
                 "socket", "gloo", "nccl")


@contextmanager
def failures(what: str) -> Iterator[None]:
    """Turns a collective's failure into an error that says what happened and what to do;
    other errors pass through unchanged."""
    try:
        yield
    except RuntimeError as err:
        message = str(err)
        if not (isinstance(err, dist.DistBackendError)
                or any(marker in message.lower() for marker in _PEER_TROUBLE)):
            raise
        rank = dist.get_rank() if dist.is_initialized() else os.environ.get("RANK", 0)
        first_line = message.splitlines()[0] if message else ""
        raise DistributedError(
            f"rank {rank}: {what} failed: another rank died, hangs, or cannot be reached "
            f"within trainer.dist_timeout ({type(err).__name__}: {first_line})"
        ) from err


def _collective(what: str):
    def wrap(fn):
        @functools.wraps(fn)
        def call(*args, **kwargs):
            with failures(what):
                return fn(*args, **kwargs)

        return call

    return wrap


@_collective("all_reduce")
def sum_(tensor: Tensor) -> Tensor:
    """Sums `tensor` over all ranks, in place."""
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


@_collective("all_reduce")
def max_(tensor: Tensor) -> Tensor:
    """The elementwise maximum of `tensor` over all ranks, in place."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def any_(flag: bool, device: torch.device) -> bool:
    """True on every rank when `flag` is true on any rank."""
    return bool(max_(torch.tensor([float(flag)], device=device)).item())


@_collective("all_gather")
def gather_rows(tensor: Tensor) -> Tensor:
    """Every rank's `tensor` (any number of rows, the same other dims), concatenated in rank
    order, on every rank: padded for the transfer, trimmed after, so no row is counted twice."""
    if not dist.is_initialized():
        return tensor
    size = torch.tensor([len(tensor)], device=tensor.device)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    longest = int(max(sizes).item())
    padded = torch.zeros((longest, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    padded[:len(tensor)] = tensor
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([part[:int(n.item())] for part, n in zip(parts, sizes, strict=True)])


@_collective("all_gather_object")
def gather_objects(obj) -> list:
    """Every rank's picklable `obj`, in rank order, on every rank."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


@_collective("broadcast")
def from_main(obj):
    """Rank 0's `obj`, on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@_collective("barrier")
def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class SigtermAgreement:
    """Whether any rank got SIGTERM, so that all ranks stop at the same step.

    Under torchrun that takes an all-reduce, which costs about as much as a small step
    (~280 µs between 2 CPU processes here), so the ranks ask about once every `every` seconds:
    each proposes the steps it ran in that long at its last pace, and the smallest proposal,
    the same on every rank, sets the next step to ask at. One process just reads its flag."""

    def __init__(self, processes: Processes, device: torch.device, every: float = 1.0) -> None:
        self.processes, self.device, self.every = processes, device, every
        self.received = False  # set by the signal handler
        self.reset(0)

    def reset(self, step: int) -> None:
        self.next_step, self.last = step, (step, time.perf_counter())

    def anywhere(self, step: int) -> bool:
        if not self.processes.distributed:
            return self.received
        if step < self.next_step:
            return False
        now = time.perf_counter()
        last_step, last_time = self.last
        pace = (step - last_step) / max(now - last_time, 1e-9)
        steps = min(max(1, int(pace * self.every)), 10_000)
        # One all-reduce (max) for both: any rank's flag, and minus the smallest proposal.
        flag, fewest = max_(torch.tensor([float(self.received), -steps],
                                         device=self.device)).tolist()
        self.next_step = step - int(fewest)
        self.last = (step, now)
        return bool(flag)
