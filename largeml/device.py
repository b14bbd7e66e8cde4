"""Where a run computes: the device, its arithmetic (`trainer.precision`) and its CPU threads."""

import os
from contextlib import AbstractContextManager, nullcontext

import torch

from largeml.errors import ConfigError


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """`auto` is CUDA when present, else CPU; asking for CUDA without one is an error. `auto`
    and `cuda` mean `cuda:LOCAL_RANK`: one GPU per process under torchrun."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"trainer.device={device} but PyTorch sees no CUDA device "
            f"(torch {torch.__version__}); use trainer.device=auto or trainer.device=cpu"
        )
    return torch.device(f"cuda:{local_rank}" if device == "cuda" else device)


def autocast(precision: str | int, device: torch.device) -> AbstractContextManager:
    """The arithmetic of `trainer.precision`: bf16 autocast, or plain float32 (32)."""
    if str(precision) == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


def cpu_threads(reader_threads: int = 0, local_processes: int = 1,
                compute_bound: bool = False) -> int:
    """Torch's intra-op threads: this process's share of the cores it may run on (cores / the
    processes torchrun started on this machine), less one per thread that reads data ahead
    when reading is what bounds the run. A linear model streamed from disk waits on its reader
    (on 2 cores, two compute threads plus the reader ran the streaming benchmark 1.5x slower
    than one compute thread plus the reader); an MLP's step is the bottleneck (`compute_bound`:
    124 k rows/s on one thread, 281 k on two), so it takes every core and the reader shares."""
    cores = max(1, len(os.sched_getaffinity(0)) // local_processes)
    return cores if compute_bound else max(1, cores - reader_threads)
