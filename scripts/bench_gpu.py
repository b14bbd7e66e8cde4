"""A short GPU benchmark, in one process: the full-batch solver on device-resident data, and
streaming rows from disk to the GPU against a plain pinned-memory copy.

    python scripts/bench_gpu.py [--rows 1000000] [--stream-rows 2000000] [--out report.md]

1. Full batch: `python -m largeml.train`'s own code (`largeml.train.run`) on synthetic data
   (--rows x 100, in memory), `optimizer=newton`, the training rows held in GPU memory, against
   the same run on the CPU; seconds to convergence, epochs, objective and accuracy.
2. Streaming: dense shards (--stream-rows x 128 float32) read by the Trainer's DataLoader
   (pinned memory, `non_blocking` copies) onto the GPU, rows/s, against the floor of copying
   the same bytes from one pinned host buffer to the GPU in batch-sized pieces.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--stream-rows", type=int, default=2_000_000)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "largeml-gpu")
    parser.add_argument("--out", type=Path, default=None)
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
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        args.out.write_text(report)
        args.out.with_suffix(".json").write_text(json.dumps(
            {"stream_rows_per_s": path_rate, "pinned_floor_rows_per_s": floor}))


if __name__ == "__main__":
    main()
