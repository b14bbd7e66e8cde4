"""Streaming throughput side by side, in one process, against the hardware floor.

    python scripts/bench_streaming.py               # 4 M x 128 dense (2 GiB), 1.35 M-feature sparse
    python scripts/bench_streaming.py --rows 500000   # quicker

Generates (once, under --dir) a dense set of --rows x --features float32 rows and a sparse set of
--sparse-rows rows over --sparse-features features, labels from a noisy hyperplane, as shards.
Then, on a warm page cache:

- floor: one streaming read of the training shards' bytes (os.preadv into a reused buffer);
- largeml: one epoch of `python -m largeml.train data=files model=logreg|svm` on those shards,
  --repeat times (the median is reported with the range: rows/s on a shared VM vary by a third),
  and its data path alone (ShardStream without training), on the first read of the shards in
  this process (each file's size and CRC-32 checked against index.json) and once they are
  checked (as in every later epoch), with the ratio of the two, and the checksum pass alone;
- hand-written: the best plain loop, preadv of batch-size blocks in file order + nn.Linear + SGD;
- row-per-item: the common map-style Dataset returning one row, with DataLoader(batch_size);
- scikit-learn: SGDClassifier.partial_fit over the same blocks (if scikit-learn is installed).

Reports rows/s, GB/s, the ratio to the floor, validation accuracy and the peak anonymous memory
(RssAnon, sampled) as a Markdown table. A benchmark, not a test: numbers depend on the machine.
"""

import argparse
import logging
import os
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir

from largeml import losses
from largeml.data import shards
from largeml.data.shards import ShardIndex, ShardWriter, data_offset, open_shards
from largeml.data.stream import ShardStream
from largeml.models import Linear
from largeml.train import CONFIG_DIR, run


def rss_anon_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class PeakMemory:
    """Samples RssAnon every 20 ms while the block runs."""

    def __enter__(self) -> "PeakMemory":
        self.peak, self._stop = rss_anon_mib(), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, rss_anon_mib())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def generate_dense(root: Path, rows: int, features: int, seed: int) -> ShardIndex:
    if (root / "index.json").is_file():
        return open_shards(root)
    rng = np.random.default_rng(seed)
    w = np.random.default_rng(0).standard_normal(features).astype(np.float32)
    w /= np.linalg.norm(w)
    with ShardWriter(root, "dense", features) as writer:
        for start in range(0, rows, 65536):
            n = min(65536, rows - start)
            x = rng.standard_normal((n, features), dtype=np.float32)
            y = (x @ w + 0.5 * rng.standard_normal(n, dtype=np.float32) > 0).astype(np.float32)
            writer.write_dense(x, y)
    return open_shards(root)


def generate_sparse(root: Path, rows: int, features: int, nnz: int, seed: int) -> ShardIndex:
    """Rows of `nnz` random features with values 1/sqrt(nnz); labels from a hyperplane over
    the first 100k features (news20-like: few informative features among very many)."""
    if (root / "index.json").is_file():
        return open_shards(root)
    rng = np.random.default_rng(seed)
    w = np.random.default_rng(0).standard_normal(features).astype(np.float32)
    w[100_000:] = 0
    with ShardWriter(root, "sparse", features) as writer:
        for start in range(0, rows, 16384):
            n = min(16384, rows - start)
            hot = rng.integers(0, 100_000, size=(n, nnz // 4))
            cold = rng.integers(0, features, size=(n, nnz - nnz // 4))
            indices = np.sort(np.concatenate([hot, cold], axis=1), axis=1)
            values = np.full(indices.shape, 1 / np.sqrt(nnz), dtype=np.float32)
            margin = (w[indices] * values).sum(1)
            y = (margin + 0.1 * rng.standard_normal(n) > 0).astype(np.float32)
            indptr = np.arange(0, n * nnz + 1, nnz)
            writer.write_sparse(indptr, indices.reshape(-1), values.reshape(-1), y)
    return open_shards(root)


def read_all(index: ShardIndex, buffer_size: int = 1 << 20) -> int:
    """Reads every byte of the shards once with preadv into one reused buffer; returns bytes."""
    view, total = memoryview(bytearray(buffer_size)), 0
    for shard in index.shards:
        for kind in shard.files:
            fd = os.open(index.path(shard, kind), os.O_RDONLY)
            offset = 0
            while (n := os.preadv(fd, [view], offset)) > 0:
                offset += n
            total += offset
            os.close(fd)
    return total


def warm(*indexes: ShardIndex) -> None:
    """Reads the shards once so the next measurement starts on a warm page cache: this VM's
    proactive reclaim (kdamond) evicts pages that have not been read for a while."""
    for index in indexes:
        read_all(index)


def floor(index: ShardIndex) -> tuple[float, int]:
    """Seconds to read every byte of the shards once, the best of three buffer sizes."""
    best, total = float("inf"), 0
    for buffer_size in (256 << 10, 1 << 20, 8 << 20):
        started = time.perf_counter()
        total = read_all(index, buffer_size)
        best = min(best, time.perf_counter() - started)
    return best, total


def largeml_epoch(train: Path, val: Path, overrides: list[str]) -> tuple[dict, float]:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[
            "data=files", f"data.train_path={train}", f"data.val_path={val}",
            "trainer.max_epochs=1", "trainer.log_every_n_steps=100", "trainer.tol=0",
            *overrides])
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as run_dir, PeakMemory() as memory:
        metrics = run(cfg, Path(run_dir))
    torch.set_num_threads(threads)  # the Trainer sets its own; the peers run with the default
    return metrics, memory.peak


def hand_written(index: ShardIndex, batch_size: int) -> float:
    """The best plain loop: preadv each block of batch_size rows, in file order, into one reused
    buffer; nn.Linear + BCE + SGD on it. No shuffle, no validation, no framework. Seconds."""
    model = torch.nn.Linear(index.n_features, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.empty(batch_size, index.n_features), torch.empty(batch_size)
    started = time.perf_counter()
    for shard in index.shards:
        fx, fy = (os.open(index.path(shard, kind), os.O_RDONLY) for kind in ("x", "y"))
        ox, oy = (data_offset(index.path(shard, kind)) for kind in ("x", "y"))
        for start in range(0, shard.rows, batch_size):
            n = min(batch_size, shard.rows - start)
            os.preadv(fx, [memoryview(x.numpy()[:n]).cast("B")], ox + start * x[0].nbytes)
            os.preadv(fy, [memoryview(y.numpy()[:n]).cast("B")], oy + start * 4)
            loss = F.binary_cross_entropy_with_logits(model(x[:n]).squeeze(1), y[:n])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        os.close(fx)
        os.close(fy)
    return time.perf_counter() - started


def stream_only(index: ShardIndex, batch_size: int, first_read: bool = False) -> float:
    """largeml's data path alone: one shuffled epoch of ShardStream, no training. Seconds.
    With `first_read`, as the first epoch of a process: every file's checksum is checked as
    it is first read (else the files are checked already, as in every later epoch)."""
    if first_read:
        shards._CHECKED.clear()  # what this process has checked: nothing, as at its start
    started = time.perf_counter()
    for _ in ShardStream(index, batch_size, shuffle=True):
        pass
    return time.perf_counter() - started


def row_per_item(index: ShardIndex, batch_size: int, max_rows: int) -> tuple[float, int]:
    """The common pattern: a map-style Dataset returning one row, batched by the DataLoader."""
    shard = index.shards[0]
    x = np.load(index.path(shard, "x"), mmap_mode="r")
    y = np.load(index.path(shard, "y"), mmap_mode="r")

    class Rows(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return min(len(y), max_rows)

        def __getitem__(self, i: int):
            return torch.from_numpy(np.array(x[i])), torch.tensor(y[i])

    model = Linear(index.n_features)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    started, rows = time.perf_counter(), 0
    for bx, by in torch.utils.data.DataLoader(Rows(), batch_size=batch_size, shuffle=True):
        losses.bce(model(bx), by).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        rows += len(by)
    return time.perf_counter() - started, rows


def sklearn_sgd(index: ShardIndex, val: ShardIndex, batch_size: int) -> tuple[float, float] | None:
    try:
        from sklearn.linear_model import SGDClassifier
    except ImportError:
        return None
    model = SGDClassifier(loss="log_loss", alpha=1 / index.rows, random_state=0)
    started = time.perf_counter()
    for shard in index.shards:
        x = np.load(index.path(shard, "x"), mmap_mode="r")
        y = np.load(index.path(shard, "y"), mmap_mode="r")
        for start in range(0, len(y), batch_size):
            model.partial_fit(x[start:start + batch_size], y[start:start + batch_size],
                              classes=[0.0, 1.0])
    seconds = time.perf_counter() - started
    vx = np.concatenate([np.load(val.path(s, "x")) for s in val.shards])
    vy = np.concatenate([np.load(val.path(s, "y")) for s in val.shards])
    return seconds, float((model.predict(vx) == vy).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=4_000_000)
    parser.add_argument("--features", type=int, default=128)
    parser.add_argument("--sparse-rows", type=int, default=200_000)
    parser.add_argument("--sparse-features", type=int, default=1_350_000)
    parser.add_argument("--sparse-nnz", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--row-per-item-rows", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=3, help="largeml epochs per model")
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "largeml-bench")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    d = args.dir / f"dense-{args.rows}x{args.features}"
    s = args.dir / f"sparse-{args.sparse_rows}x{args.sparse_features}-{args.sparse_nnz}"
    dense = generate_dense(d / "train", args.rows, args.features, seed=1)
    dense_val = generate_dense(d / "val", max(args.rows // 20, 10_000), args.features, seed=2)
    sparse = generate_sparse(s / "train", args.sparse_rows, args.sparse_features,
                             args.sparse_nnz, seed=1)
    sparse_val = generate_sparse(s / "val", max(args.sparse_rows // 10, 10_000),
                                 args.sparse_features, args.sparse_nnz, seed=2)

    table: list[str] = []
    for name, index, val in (("dense", dense, dense_val), ("sparse", sparse, sparse_val)):
        warm(index)
        floor_seconds, total_bytes = floor(index)
        results = [("floor: one read of the shards' bytes", index.rows / floor_seconds, None, None)]
        # Sparse, high-dimensional data wants per-feature step sizes: plain SGD leaves most of
        # the 1.35 M weights untouched in one epoch.
        # Streamed, mini-batch epochs (optimizer=auto would hold data that fits in memory and
        # solve it full-batch: not what this measures).
        optimizer = (["optimizer=adagrad", "scheduler=constant"] if name == "sparse"
                     else ["optimizer=sgd", "scheduler=cosine"])
        # The last: the same epoch with the rows already in memory (data.resident=true, RAM on
        # CPU), no reading; what the training step alone runs at.
        resident = [["data.resident=true"]] if name == "dense" else []
        for model, extra in [("logreg", []), ("svm", []), *(("logreg", r) for r in resident)]:
            runs = []
            for _ in range(args.repeat):
                warm(index, val)
                runs.append(largeml_epoch(index.root, val.root, [
                    f"model={model}", f"data.batch_size={args.batch_size}", *optimizer, *extra]))
            rates = sorted(metrics["perf/samples_per_sec"] for metrics, _ in runs)
            spread = (f" (median of {len(rates)}: {rates[0] / 1e6:.2f}-{rates[-1] / 1e6:.2f} M)"
                      if len(rates) > 1 else "")
            label = " ".join([f"model={model}", *optimizer, *extra[:1]])
            results.append((f"largeml `{label}` epoch{spread}",
                            rates[len(rates) // 2], runs[0][0]["val/accuracy"],
                            max(memory for _, memory in runs)))
        pairs = []  # (first read, checked already), alternately: the median of each
        for _ in range(args.repeat):
            warm(index)
            first = stream_only(index, args.batch_size, first_read=True)
            warm(index)
            pairs.append((first, stream_only(index, args.batch_size)))
        checked, unchecked = (sorted(times)[len(times) // 2] for times in zip(*pairs))
        warm(index)
        shards._CHECKED.clear()
        started = time.perf_counter()
        open_shards(index.root, verify=True)
        crc = time.perf_counter() - started
        median = f" (medians of {len(pairs)})" if len(pairs) > 1 else ""
        results += [
            (f"largeml data path alone (ShardStream, no training), files checked already{median}",
             index.rows / unchecked, None, None),
            (f"the same, first read: size and CRC-32 of each file checked "
             f"({unchecked / checked:.2f} of the rate above)", index.rows / checked, None, None),
            ("the check alone: CRC-32 of every byte (open_shards verify=True)", index.rows / crc,
             None, None)]
        if name == "dense":
            warm(index)
            results.append(("hand-written loop: preadv blocks in file order + nn.Linear, SGD",
                            index.rows / hand_written(index, args.batch_size), None, None))
            warm(index)
            seconds, n = row_per_item(index, args.batch_size, args.row_per_item_rows)
            results.append((f"row-per-item Dataset + DataLoader ({n:,} rows)", n / seconds,
                            None, None))
            warm(index)
            sgd = sklearn_sgd(index, val, args.batch_size)
            if sgd is not None:
                results.append(("scikit-learn SGDClassifier.partial_fit", index.rows / sgd[0],
                                sgd[1], None))
        for method, rate, accuracy, memory in results:
            acc = "" if accuracy is None else f"{100 * accuracy:.2f} %"
            mem = "" if memory is None else f"{memory:.0f}"
            table.append(
                f"| {name} | {method} | {rate / 1e6:.2f} M | "
                f"{rate * total_bytes / index.rows / 1e9:.2f} | "
                f"{rate * floor_seconds / index.rows:.3f} | {acc} | {mem} |")

    gib = dense.rows * dense.n_features * 4 / 2**30
    print(f"\n{dense.rows:,} x {dense.n_features} dense ({gib:.2f} GiB of features); "
          f"{sparse.rows:,} x {sparse.n_features:,} sparse, {sparse.nnz // sparse.rows} "
          f"non-zeros a row; batch {args.batch_size}; torch threads {torch.get_num_threads()} "
          f"(largeml's Trainer: {runs[0][0]['cpu_threads']}, see trainer.num_threads)\n")
    print("| data | method | rows/s | GB/s | ratio to floor | val accuracy | peak RssAnon MiB |")
    print("|---|---|---:|---:|---:|---:|---:|")
    print("\n".join(table))

if __name__ == "__main__":
    main()
