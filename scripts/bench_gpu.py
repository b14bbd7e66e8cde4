"""A short GPU benchmark, in one process: the full-batch solver on device-resident data, and
streaming rows from disk to the GPU against a plain pinned-memory copy.

    python scripts/bench_gpu.py [--rows 1000000] [--stream-rows 2000000] [--out report.md]

1. Full batch: `python -m largeml.train`'s own code (`largeml.train.run`) on synthetic data
   (--rows x 100, in memory), `optimizer=newton`, the training rows held in GPU memory, against
   the same run on the CPU; seconds to convergence, epochs, objective and accuracy.
2. Streaming: dense shards (--stream-rows x 128 float32) read by the Trainer's DataLoader
   (pinned memory, `non_blocking` copies) onto the GPU, rows/s, against the floor of copying
   the same bytes from one pinned host buffer to the GPU in batch-sized pieces.
3. Sparse FTRL on the GPU: CSR batches (--sparse-rows x 40 non-zeros of 2 M features) streamed
   from shards, moved to the device and learnt by `largeml.ftrl.FTRL` (its batch form: torch
   index ops on CUDA), rows/s against the H2D copy rate of the same CSR bytes, and its
   validation accuracy against the CPU's compiled row-by-row form on the same batches.
Prints a Markdown report (and writes it to --out). A benchmark, not a test.
"""

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from torch.utils.data import DataLoader

from largeml.data.shards import ShardWriter
from largeml.data.stream import ShardStream
from largeml.train import CONFIG_DIR, run


def full_batch(rows: int, device: str, directory: Path) -> dict:
    run_dir = Path(tempfile.mkdtemp(dir=directory))
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[f"data.n_samples={rows}", "optimizer=newton",
                                          f"trainer.device={device}"])
    started = time.perf_counter()
    metrics = run(cfg, run_dir)
    metrics["seconds"] = time.perf_counter() - started
    return metrics


def write_dense(root: Path, rows: int, features: int) -> Path:
    rng = np.random.default_rng(0)
    w = rng.normal(size=features).astype(np.float32)
    with ShardWriter(root, "dense", features) as writer:
        for start in range(0, rows, 100_000):
            x = rng.normal(size=(min(100_000, rows - start), features)).astype(np.float32)
            writer.write_dense(x, (x @ w > 0).astype(np.float32))
    return root


def streaming(root: Path, batch_size: int, device: torch.device) -> tuple[float, float]:
    """(rows/s of the Trainer's data path onto the GPU, rows/s of the pinned-copy floor)."""
    stream = ShardStream(root, batch_size, shuffle=True, seed=0)
    loader = DataLoader(stream, batch_size=None, pin_memory=True)
    for x, _ in loader:  # warm the page cache and the allocator
        x.to(device, non_blocking=True)
    torch.cuda.synchronize(device)
    started, rows = time.perf_counter(), 0
    for x, y in loader:
        x.to(device, non_blocking=True)
        y.to(device, non_blocking=True)
        rows += len(y)
    torch.cuda.synchronize(device)
    path_rate = rows / (time.perf_counter() - started)

    host = torch.empty(batch_size * 16, stream.n_features + 1).pin_memory()
    target = torch.empty_like(host, device=device)
    torch.cuda.synchronize(device)
    started, copied = time.perf_counter(), 0
    while copied < rows:
        for piece in range(16):
            lo, hi = piece * batch_size, (piece + 1) * batch_size
            target[lo:hi].copy_(host[lo:hi], non_blocking=True)
        copied += 16 * batch_size
    torch.cuda.synchronize(device)
    return path_rate, copied / (time.perf_counter() - started)


def write_sparse(root: Path, rows: int, features: int, nnz: int, seed: int) -> Path:
    """Rows drawn with `seed`, labels by one rule for every seed: y = 1[x·w > 0]."""
    if (root / "index.json").is_file():
        return root
    w = np.random.default_rng(0).normal(size=features)
    rng = np.random.default_rng(seed)
    with ShardWriter(root, "sparse") as writer:
        for lo in range(0, rows, 100_000):
            n = min(100_000, rows - lo)
            cols = rng.integers(0, features, size=(n, nnz)).astype(np.int32)
            vals = rng.random((n, nnz), dtype=np.float32)
            y = ((vals * w[cols]).sum(1) > 0).astype(np.float32)
            writer.write_sparse(np.arange(0, n * nnz + 1, nnz), cols.ravel(), vals.ravel(), y)
    return root


def sparse_ftrl(root: Path, val: Path, batch_size: int, device: torch.device) -> dict:
    """One FTRL epoch over CSR batches on `device`: rows/s (copies included), the H2D floor for
    the same bytes, validation accuracy."""
    from largeml.data.shards import open_shards
    from largeml.ftrl import FTRL
    from largeml.losses import bce
    from largeml.models import Linear

    index = open_shards(root)
    model = Linear(index.n_features).to(device)
    optimizer = FTRL(model.parameters(), l2=1.0 / index.rows)
    stream = ShardStream(index, batch_size, shuffle=True, seed=0)
    batches = list(stream)  # read once: the epoch below times the copies and the steps
    nbytes = sum(x.col_indices().numel() * 8 + x.crow_indices().numel() * 4 + len(y) * 4
                 for x, y in batches)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    for x, y in batches:
        optimizer.step_batch(model, x.to(device, non_blocking=True),
                             y.to(device, non_blocking=True), bce)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started
    optimizer.settle()
    correct = total = 0
    with torch.no_grad():
        for x, y in ShardStream(val, 65536, shuffle=False):
            scores = model(x.to(device))
            correct += int(((scores > 0).float() == y.to(device)).sum())
            total += len(y)
    floor = None
    if device.type == "cuda":
        host = torch.empty(nbytes // 4).pin_memory()
        target = torch.empty_like(host, device=device)
        torch.cuda.synchronize(device)
        t = time.perf_counter()
        pieces = len(batches)
        for piece in host.chunk(pieces):
            target[:len(piece)].copy_(piece, non_blocking=True)
        torch.cuda.synchronize(device)
        floor = index.rows / (time.perf_counter() - t)
    return {"rows_per_s": index.rows / seconds, "floor_rows_per_s": floor,
            "val_accuracy": correct / total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--stream-rows", type=int, default=2_000_000)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "largeml-gpu")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--sparse-rows", type=int, default=1_000_000)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu.py needs a CUDA device")
    args.dir.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.WARNING)
    device = torch.device("cuda")
    lines = [f"# GPU check: {torch.cuda.get_device_name(device)}, torch {torch.__version__}", ""]

    lines += ["## Full-batch Newton, synthetic logistic regression", "",
              f"{args.rows:,} rows x 100 features (80 % train), defaults otherwise", "",
              "| device | seconds | epochs | stopped | train/objective | val/accuracy |",
              "|---|---:|---:|---|---:|---:|"]
    for name in ("cuda", "cpu"):
        m = full_batch(args.rows, name, args.dir)
        lines.append(f"| {name} | {m['seconds']:.2f} | {m['epoch']} | {m.get('stopped')} | "
                     f"{m['train/objective']:.8f} | {m['val/accuracy']:.4f} |")

    root = write_dense(args.dir / f"dense-{args.stream_rows}", args.stream_rows, 128)
    path_rate, floor = streaming(root, args.batch_size, device)
    lines += ["", "## Streaming to the GPU", "",
              f"{args.stream_rows:,} rows x 128 float32 from shards, batches of {args.batch_size}",
              "", "| | rows/s | of the floor |", "|---|---:|---:|",
              f"| largeml data path (ShardStream, pinned DataLoader, non_blocking) | "
              f"{path_rate:,.0f} | {path_rate / floor:.2f} |",
              f"| floor: pinned host buffer -> GPU copies | {floor:,.0f} | 1.00 |"]
    train = write_sparse(args.dir / f"sparse-{args.sparse_rows}", args.sparse_rows, 2_000_000,
                         40, seed=1)
    val = write_sparse(args.dir / f"sparse-val-{args.sparse_rows}", args.sparse_rows // 10,
                       2_000_000, 40, seed=2)
    gpu = sparse_ftrl(train, val, args.batch_size, device)
    cpu = sparse_ftrl(train, val, args.batch_size, torch.device("cpu"))
    lines += ["", "## Sparse FTRL (one epoch)", "",
              f"{args.sparse_rows:,} rows x 40 of 2,000,000 features, batches of "
              f"{args.batch_size}", "", "| | rows/s | of the H2D floor | val accuracy |",
              "|---|---:|---:|---:|",
              f"| CUDA, batch form (torch index ops) | {gpu['rows_per_s']:,.0f} | "
              f"{gpu['rows_per_s'] / gpu['floor_rows_per_s']:.2f} | {gpu['val_accuracy']:.4f} |",
              f"| CPU, row by row (compiled) | {cpu['rows_per_s']:,.0f} | | "
              f"{cpu['val_accuracy']:.4f} |",
              f"| floor: the same CSR bytes, pinned host -> GPU | "
              f"{gpu['floor_rows_per_s']:,.0f} | 1.00 | |"]
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        args.out.write_text(report)
        args.out.with_suffix(".json").write_text(json.dumps(
            {"stream_rows_per_s": path_rate, "pinned_floor_rows_per_s": floor}))


if __name__ == "__main__":
    main()
