"""The processes of a run: one without a launcher, N under `torchrun`.

torchrun tells each process who it is through the environment (RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE) and where to meet (MASTER_ADDR, MASTER_PORT); `Processes.from_env` reads it.
The collectives below are the few the Trainer needs; each is a no-op in a single process, and
each gives up after the process group's timeout (`trainer.dist_timeout`) instead of waiting
forever for a rank that died or hangs.
"""

import os
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
    """torchrun's run id (`--rdzv-id`, else a fresh uuid per launch): the same on every rank and
    node, and across the restarts of one launch."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    return run_id if run_id and run_id != "none" else None


def start(processes: Processes, device: torch.device, timeout_s: float) -> None:
    """Joins the process group: nccl between GPUs, gloo between CPU processes."""
    if not processes.distributed or dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(
        backend, timeout=timedelta(seconds=timeout_s),
        device_id=device if device.type == "cuda" else None,
    )


def stop() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _collective(what: str):
    """Turns a collective's failure into an error that says what happened and what to do."""

    def wrap(fn):
        def call(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except RuntimeError as err:  # DistBackendError and gloo's timeouts alike
                rank = dist.get_rank() if dist.is_initialized() else 0
                raise DistributedError(
                    f"rank {rank}: {what} failed: another rank died, hangs, or cannot be reached "
                    f"within trainer.dist_timeout ({err.__class__.__name__}: "
                    f"{str(err).splitlines()[0] if str(err) else ''})"
                ) from err

        return call

    return wrap


@_collective("all_reduce")
def sum_(tensor: Tensor) -> Tensor:
    """Sums `tensor` over all ranks, in place."""
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


@_collective("all_reduce")
def any_(flag: bool, device: torch.device) -> bool:
    """True on every rank when `flag` is true on any rank."""
    if not dist.is_initialized():
        return flag
    value = torch.tensor([float(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


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
