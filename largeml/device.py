"""Where a run computes: the device, its arithmetic (`trainer.precision`) and its CPU threads."""

import ctypes
import ctypes.util
import os
import sys
from contextlib import AbstractContextManager, nullcontext

import torch
import torch.optim.lr_scheduler

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


def skip_compiler_import() -> None:
    """Spares a run the import of torch.compile's machinery, which it never uses.

    `torch.optim.Optimizer` and `LRScheduler` wrap several methods in `torch._disable_dynamo`,
    which on the first call imports `torch._dynamo` (1.7 s here, 3.5 s on a busy machine: a
    third of a small run) only to mark the method as not to be compiled. A wrapper skips the
    import when its function is already marked, so this marks them: each then runs as plain
    Python, as it would uncompiled. Nothing to do once `torch._dynamo` is loaded. This spares
    the full-batch solvers; the built-in optimizers' `step` (SGD, Adagrad, Adam) imports it
    anyway (torch.optim's `_use_grad_for_differentiable`)."""
    if "torch._dynamo" in sys.modules:
        return
    wrapper_code = torch._disable_dynamo(lambda: None).__code__
    classes = [torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]
    classes += [c for c in vars(torch.optim).values()
                if isinstance(c, type) and issubclass(c, torch.optim.Optimizer)]
    for cls in classes:
        for attr in vars(cls).values():
            fn = getattr(attr, "__func__", attr)
            if getattr(fn, "__code__", None) is wrapper_code:
                fn.__wrapped__.__dynamo_disable = fn.__wrapped__


# glibc's malloc gives a block above its mmap threshold a mapping of its own, unmapped when
# freed; smaller ones come from heaps that keep freed memory for reuse. The threshold starts at
# 128 KiB and rises to each such block freed (up to 32 MiB), after which a wide linear model's
# vectors (8 MB each over 2 M features) come from the heaps, which keep what they once held.
# scripts/bench_sparse.py's uniform set, CLI runs' peak RssAnon, 3 each: Newton to convergence
# 520-538 MiB, 408-415 with the threshold fixed at 4 MiB; FTRL, 3 epochs, 341-370 and 303-307;
# wall times the same within the machine's noise.
MMAP_THRESHOLD = 4 << 20


def release_large_blocks() -> None:
    """Fixes glibc's mmap threshold at `MMAP_THRESHOLD` (see above), unless the environment
    sets it (MALLOC_MMAP_THRESHOLD_); without glibc, does nothing."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt(-3, MMAP_THRESHOLD)
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        pass


def available_ram() -> int:
    """RAM that can be had without swapping: MemAvailable, which counts the page cache the
    kernel would give back (MemFree alone is small on a machine that has read much data)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
