"""largeml against scikit-learn's SGDClassifier, Vowpal Wabbit and LIBLINEAR on large sparse data.

    python scripts/bench_sparse.py                      # 1 M + 100 k rows, both sets
    python scripts/bench_sparse.py --quick              # --rows 100000 --features 200000
                                                        #   --vocab 20000: about a minute
    python scripts/bench_sparse.py --rows 300000 --datasets uniform --json /tmp/bench.json
    python scripts/bench_sparse.py --largeml-args "data.batch_size=4096"
    python scripts/bench_sparse.py --datasets uniform --ftrl-args "optimizer.hogwild=2"

Two synthetic sets, generated once (seeded) under --dir and reused:

- uniform: --rows training + --rows/10 validation rows, --nnz distinct features a row drawn
  uniformly from --features, values uniform in [0, 1); y = 1[x.w > 0] with w ~ N(0, 1).
- clicks: 26 categorical fields, vocabularies log-spaced from 10 to --vocab, each field's value
  Zipf(1.2)-distributed over its vocabulary, one-hot into disjoint index ranges (values 1.0);
  y ~ Bernoulli(sigmoid(b + sum of per-value weights ~ N(0, 0.5^2))), b set for ~25 % positives.

Each split is written three ways: largeml shards (`ShardWriter`), which `data=files` reads; VW's
text format (labels +-1, one namespace `f`, integer feature names, which VW maps to themselves
plus the namespace's hash: with -b 23 no two features collide); and the shards are read back as
scipy CSR matrices for scikit-learn.

Measured, every tool in its own process, peak anonymous memory (RssAnon from /proc/<pid>/status,
polled every 20 ms) kept for each:

- largeml, through its CLI (`python -m largeml.train data=files ...` plus --largeml-args, nothing
  else), each run in a fresh run directory: an untimed `trainer.max_epochs=1 trainer.tol=0` run
  first (the first run after a code change compiles largeml's kernels), then --repeats pairs of
  the same again and `trainer.max_epochs=3 trainer.tol=0`, wall time of each subprocess; one
  epoch is the median over the pairs of half their difference (start-up cancels; each epoch's
  validation is included); also the median of the 3-epoch runs' second epoch as the Trainer
  timed it (`perf/epoch_seconds` read back from the run's TensorBoard file: the same steps,
  validation and checkpoint, without two start-ups' jitter), and its own
  `perf/samples_per_sec` (training only) from metrics.json. These runs stream: `STREAMING`
  (FTRL) plus --ftrl-args, the method to set against SGD and VW epoch for epoch. Then a
  run of that which stops by its own rule, and one with the defaults (`auto`), which stops by
  its own rule too: wall time, epochs, `stopped`. The optimizer and feature scaling that
  largeml chose (`auto`) are read from the run's config.yaml and log.
- SGDClassifier(loss="log_loss", max_iter=1 and 3, tol=None, random_state=0, otherwise default):
  fit time on the in-memory CSR matrix, the median of --repeats fits. And the 1-epoch fit
  again, in a second process of its own kept alive beside largeml's runs: once before each
  pair of them and once after the last, so that each pair's epoch is set against SGD's fits
  in the same minutes (this VM's speed drifts from one minute to the next, and the blocks
  above are minutes apart); the report sets their median against the epoch's.
- Vowpal Wabbit through `vowpalwabbit.Workspace`, which runs the `vw` driver when given a data
  source or --passes: its cache is built by an untimed pass over the text, then one pass and
  three passes from the cache are timed, medians of --repeats (`--loss_function logistic
  -b 23`, otherwise VW's defaults: with --passes > 1 VW holds out every 10th row for its own
  early stopping). Validation accuracy from a separate, untimed `-t -i model` run over the
  validation text.
- LIBLINEAR: LogisticRegression(solver="liblinear", C=1.0, default tol) to convergence, fit time.

Validation accuracy for everything; rows/s ratios are to the faster of SGDClassifier and VW. A
benchmark, not a test: timings depend on the machine and on what else runs on it (on the 2-core
VM here, the same run varies by a third from one minute to the next: hence the medians, and
the --json file keeps every repeat).
"""

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
SEED = 20261201
VW_BITS = 23
CLICK_FIELDS = 26
CLICK_ZIPF = 1.2
CLICK_WEIGHT_STD = 0.5
CLICK_POSITIVE_RATE = 0.25
CHUNK_ROWS = 50_000
# largeml's streaming runs, epoch for epoch against SGD and VW: FTRL, as many rows a step as
# optimizer=auto gives it (its defaults converge by full-batch Newton instead, whose epoch is a
# Newton iteration: several passes over the rows).
STREAMING = ["optimizer=ftrl", "data.batch_size=4096"]
# A generated block of rows: indices (n, k), values (n, k), labels (n,), the generating rule's
# decision (n,), every row with k non-zeros.
Block = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
PEERS = {"sklearn": "scikit-learn", "scipy": "scipy", "vowpalwabbit": "vowpalwabbit"}


# --- data -------------------------------------------------------------------------------------

def uniform_chunks(seed: int, rows: int, features: int, nnz: int) -> Iterator[Block]:
    """Yields (indices (n, nnz) sorted per row, values (n, nnz), y (n,), the generating rule's
    decision) blocks of the uniform set: distinct features a row, drawn uniformly; labels from
    the sign of x.w (so the rule's decision is y itself)."""
    w = np.random.default_rng(SEED).standard_normal(features).astype(np.float32)
    rng = np.random.default_rng(seed)
    for start in range(0, rows, CHUNK_ROWS):
        n = min(CHUNK_ROWS, rows - start)
        indices = np.sort(rng.integers(0, features, size=(n, nnz), dtype=np.int32), axis=1)
        while (repeated := (np.diff(indices, axis=1) == 0).any(axis=1)).any():
            indices[repeated] = np.sort(
                rng.integers(0, features, size=(int(repeated.sum()), nnz), dtype=np.int32), axis=1)
        values = rng.random((n, nnz), dtype=np.float32)
        margin = (values * w[indices]).sum(axis=1)
        yield indices, values, (margin > 0).astype(np.float32), margin > 0


def click_fields(vocab_max: int) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """Field vocabulary sizes (log-spaced 10 .. vocab_max), their offsets in the one-hot index
    space, and each field's Zipf CDF over its ranks."""
    sizes = np.unique(np.rint(np.geomspace(10, vocab_max, CLICK_FIELDS)).astype(np.int64))
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    cdfs = []
    for size in sizes:
        p = np.arange(1, size + 1, dtype=np.float64) ** -CLICK_ZIPF
        cdfs.append(np.cumsum(p) / p.sum())
    return sizes, offsets, cdfs


def click_indices(rng: np.random.Generator, n: int, offsets: np.ndarray,
                  cdfs: list[np.ndarray]) -> np.ndarray:
    u = rng.random((n, len(cdfs)))
    ranks = [np.minimum(np.searchsorted(cdf, u[:, j], side="right"), len(cdf) - 1)
             for j, cdf in enumerate(cdfs)]
    return (np.stack(ranks, axis=1) + offsets).astype(np.int32)


def click_bias(vocab_max: int, w: np.ndarray) -> float:
    """The bias that puts the expected positive rate at CLICK_POSITIVE_RATE (bisection on a
    calibration sample of its own)."""
    _, offsets, cdfs = click_fields(vocab_max)
    score = w[click_indices(np.random.default_rng(SEED + 7), 200_000, offsets, cdfs)].sum(axis=1)
    low, high = -20.0, 20.0
    for _ in range(60):
        mid = (low + high) / 2
        rate = np.mean(1 / (1 + np.exp(-(score + mid))))
        low, high = (mid, high) if rate < CLICK_POSITIVE_RATE else (low, mid)
    return (low + high) / 2


def click_chunks(seed: int, rows: int, vocab_max: int) -> Iterator[Block]:
    """Yields (indices (n, fields), values, y, Bayes decision) blocks of the click-like set."""
    sizes, offsets, cdfs = click_fields(vocab_max)
    w = (CLICK_WEIGHT_STD * np.random.default_rng(SEED + 1).standard_normal(sizes.sum()))
    bias = click_bias(vocab_max, w)
    rng = np.random.default_rng(seed)
    for start in range(0, rows, CHUNK_ROWS):
        n = min(CHUNK_ROWS, rows - start)
        indices = click_indices(rng, n, offsets, cdfs)
        score = w[indices].sum(axis=1) + bias
        y = (rng.random(n) < 1 / (1 + np.exp(-score))).astype(np.float32)
        yield indices, np.ones(indices.shape, np.float32), y, score > 0


def vw_text(indices: np.ndarray, values: np.ndarray, y: np.ndarray) -> bytes:
    """Rows with a fixed number of non-zeros as VW text, `1 |f 12:0.500000 345:1 ...`, built
    with array operations: every token is laid out in a fixed-width byte row, 0 marking unused
    bytes, and the zeros are dropped at the end. Values must lie in [0, 1]."""
    if values.min() < 0 or values.max() > 1:
        raise ValueError("vw_text writes values in [0, 1] only")
    n, k = indices.shape
    width = 18  # " " + 8 digits + ":" + "0.dddddd"
    tokens = np.zeros((n, k + 1, width), np.uint8)
    tokens[:, 0, :6] = np.where(y[:, None] > 0, np.frombuffer(b"1 |f\0\0", np.uint8),
                                np.frombuffer(b"-1 |f\0", np.uint8))
    features = tokens[:, 1:]
    features[..., 0] = ord(" ")
    powers = 10 ** np.arange(7, -1, -1, dtype=np.int32)
    digits = indices[..., None] // powers % 10
    shown = indices[..., None] >= powers
    shown[..., -1] = True
    features[..., 1:9] = np.where(shown, ord("0") + digits, 0)
    features[..., 9] = ord(":")
    micro = np.rint(values * 1e6).astype(np.int32)
    one = micro >= 1_000_000
    features[..., 10] = ord("0") + one
    features[..., 11] = np.where(one, 0, ord("."))
    fraction = micro[..., None] // 10 ** np.arange(5, -1, -1, dtype=np.int32) % 10
    features[..., 12:] = np.where(one[..., None], 0, ord("0") + fraction)
    lines = np.concatenate([tokens.reshape(n, -1), np.full((n, 1), ord("\n"), np.uint8)], axis=1)
    return lines[lines != 0].tobytes()


def generate(root: Path, kind: str, args: argparse.Namespace) -> dict:
    """Writes train/ and val/ shard directories and train.vw, val.vw under `root` (once:
    `meta.json` is written last and marks a complete set); returns the set's description."""
    if (root / "meta.json").is_file():
        return json.loads((root / "meta.json").read_text())
    from largeml.data.shards import ShardWriter

    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    rows = {"train": args.rows, "val": max(args.rows // 10, 1)}
    meta: dict = {"name": kind, "rows": rows}
    if kind == "uniform":
        features = args.features
        meta["description"] = (
            f"{args.nnz} distinct features a row, uniform over {features:,}; values U[0, 1); "
            f"y = 1[x.w > 0], w ~ N(0, 1)")
    else:
        sizes, _, _ = click_fields(args.vocab)
        features = int(sizes.sum())
        meta["description"] = (
            f"{len(sizes)} one-hot fields, vocabularies {sizes.min()}..{sizes.max():,} "
            f"(log-spaced, {features:,} features), values Zipf({CLICK_ZIPF}) within each field; "
            f"y ~ Bernoulli(sigmoid(b + sum of weights ~ N(0, {CLICK_WEIGHT_STD}^2))), "
            f"b for ~{CLICK_POSITIVE_RATE:.0%} positives")
    meta.update(features=features, nnz_per_row=args.nnz if kind == "uniform" else CLICK_FIELDS)
    for split, seed in (("train", SEED + 10), ("val", SEED + 20)):
        chunks = (uniform_chunks(seed, rows[split], features, args.nnz) if kind == "uniform"
                  else click_chunks(seed, rows[split], args.vocab))
        positives = bayes_correct = 0
        with ShardWriter(root / split, "sparse", n_features=features) as writer, \
                open(root / f"{split}.vw", "wb") as text:
            for indices, values, y, decision in chunks:
                n, k = indices.shape
                writer.write_sparse(np.arange(0, n * k + 1, k), indices.reshape(-1),
                                    values.reshape(-1), y)
                text.write(vw_text(indices, values, y))
                positives += int(y.sum())
                bayes_correct += int(np.sum(decision == (y > 0)))
        meta[f"{split}_positive_rate"] = positives / rows[split]
        meta[f"{split}_generating_rule_accuracy"] = bayes_correct / rows[split]
    (root / "meta.json").write_text(json.dumps(meta, indent=1))
    return meta


def load_csr(shard_dir: Path) -> tuple:
    """A shard directory as (scipy CSR float32, labels in {0, 1}), read with numpy alone (the
    format is plain .npy files; see largeml/data/shards.py), so a peer's process holds no torch."""
    import scipy.sparse

    index = json.loads((shard_dir / "index.json").read_text())
    parts = {kind: [] for kind in ("y", "indptr", "indices", "values")}
    offset = 0
    for shard in index["shards"]:
        for kind in parts:
            array = np.load(shard_dir / shard["files"][kind]["name"])
            if kind == "indptr":
                array = (array if offset == 0 else array[1:]) + offset
                offset = int(array[-1])
            parts[kind].append(array)
    x = scipy.sparse.csr_matrix(
        (np.concatenate(parts["values"]), np.concatenate(parts["indices"]),
         np.concatenate(parts["indptr"])), shape=(index["rows"], index["n_features"]))
    return x, np.concatenate(parts["y"]).astype(np.int64)


def warm(*paths: Path) -> None:
    """Reads files once so a timed run starts on a warm page cache (this VM evicts pages that
    have not been read for a while, and a cold read is several times slower)."""
    for path in paths:
        for file in (sorted(path.rglob("*")) if path.is_dir() else [path]):
            if file.is_file():
                with open(file, "rb") as f:
                    while f.read(8 << 20):
                        pass


# --- processes and memory ---------------------------------------------------------------------

def rss_anon_mib(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) / 1024
    except OSError:  # the process has just exited
        pass
    return 0.0


def run_polled(command: list[str], log_path: Path) -> tuple[int, float, float]:
    """Runs `command` (output to `log_path`), sampling its RssAnon every 20 ms; returns
    (exit status, wall seconds, peak RssAnon MiB)."""
    with open(log_path, "wb") as log:
        started = time.perf_counter()
        process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        peak = 0.0
        while process.poll() is None:
            peak = max(peak, rss_anon_mib(process.pid))
            time.sleep(0.02)
        wall = time.perf_counter() - started
    return process.returncode, wall, peak


def fail(what: str, log_path: Path) -> None:
    tail = log_path.read_text(errors="replace").splitlines()[-30:]
    sys.exit(f"bench_sparse: {what} failed; the end of {log_path}:\n" + "\n".join(tail))


# --- largeml ----------------------------------------------------------------------------------

def largeml_run(root: Path, name: str, overrides: list[str], extra: list[str]) -> dict:
    """One `python -m largeml.train` subprocess on the set's shards, in a fresh run directory
    (resume=auto would otherwise continue an earlier run); its wall time, peak RssAnon and
    metrics.json."""
    from omegaconf import OmegaConf
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = root / "runs" / name
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    command = [sys.executable, "-m", "largeml.train", "data=files",
               f"data.train_path={root / 'train'}", f"data.val_path={root / 'val'}",
               f"hydra.run.dir={run_dir}", *overrides, *extra]
    warm(root / "train", root / "val")
    status, wall, peak = run_polled(command, run_dir / "cli.log")
    if status != 0:
        fail(f"largeml ({shlex.join(command[1:])}) exit {status}", run_dir / "cli.log")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    events = EventAccumulator(str(run_dir)).Reload()
    epoch_seconds = {e.step: e.value for e in events.Scalars("perf/epoch_seconds")}
    config = OmegaConf.load(run_dir / "config.yaml")
    scaling = re.search(r"feature scaling: (\S+)", (run_dir / "cli.log").read_text())
    return {"command": shlex.join(command[1:]), "wall_s": wall, "peak_rss_anon_mib": peak,
            "val_accuracy": metrics.get("val/accuracy"), "epochs": metrics.get("epoch"),
            "stopped": metrics.get("stopped"),
            "samples_per_sec": metrics.get("perf/samples_per_sec"),
            "epoch_seconds": [epoch_seconds[step] for step in sorted(epoch_seconds)],
            "optimizer": config.optimizer.get("_target_"),
            "batch_size": config.data.get("batch_size"),
            "feature_scaling": scaling.group(1) if scaling else None}


def bench_largeml(root: Path, rows: int, extra: list[str], ftrl: list[str], repeats: int,
                  beside: "SgdBeside") -> dict:
    # Untimed first: the first run after a code change compiles and caches largeml's kernels.
    streaming_args = [*STREAMING, *ftrl]
    epochs = [*streaming_args, "trainer.tol=0"]
    warmup = largeml_run(root, "warmup", [*epochs, "trainer.max_epochs=1"], extra)
    pairs, sgd_s = [], [beside.fit()]
    for _ in range(repeats):  # interleaved: a slow spell of the machine hits both
        pairs.append((largeml_run(root, "epochs1", [*epochs, "trainer.max_epochs=1"], extra),
                      largeml_run(root, "epochs3", [*epochs, "trainer.max_epochs=3"], extra)))
        sgd_s.append(beside.fit())
    epochs_s = [(three["wall_s"] - one["wall_s"]) / 2 for one, three in pairs]
    epoch_s = float(np.median(epochs_s))
    # The same epoch as the Trainer times it (`perf/epoch_seconds`: its steps, validation and
    # checkpoint), without the start-up jitter of two whole runs: each 3-epoch run's second
    # (the first warms the page cache's maps, the last ends with the objective's pass).
    seconds = [three["epoch_seconds"][1] for _, three in pairs]
    second_s = float(np.median(seconds))
    one, three = (median_run([pair[i] for pair in pairs]) for i in (0, 1))
    streaming = largeml_run(root, "streaming", streaming_args, extra)
    default = largeml_run(root, "defaults", [], extra)
    return {"warmup": warmup, "epochs1": one, "epochs3": three, "streaming": streaming,
            "defaults": default, "streaming_args": streaming_args, "epoch_s": epoch_s,
            "epoch_s_each": epochs_s,
            "rows_per_s": rows / epoch_s if epoch_s > 0 else float("nan"),
            "second_epoch_s": second_s, "second_epoch_s_each": seconds,
            "sgd_between_s_each": sgd_s, "sgd_between_s": float(np.median(sgd_s)),
            # medians of the same minutes (not round by round: an epoch, as a difference of
            # two runs, can come out near 0 or below in one round)
            "between_ratio": float(np.median(sgd_s)) / epoch_s if epoch_s > 0 else float("nan")}


def median_run(runs: list[dict]) -> dict:
    """The run of median wall time (the runs' accuracies are equal: the same seed), with every
    run's wall time kept."""
    chosen = sorted(runs, key=lambda run: run["wall_s"])[len(runs) // 2]
    return {**chosen, "wall_s_each": [run["wall_s"] for run in runs]}


def timed_fits(fit, repeats: int) -> tuple[float, list[float]]:
    """The median wall time of `repeats` calls of `fit()`, and each one's."""
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        fit()
        seconds.append(time.perf_counter() - started)
    return float(np.median(seconds)), seconds


# --- peers, each run as `bench_sparse.py --peer NAME --set-dir DIR --result FILE` ---------------

def peer_sgd(root: Path, repeats: int) -> dict:
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import SGDClassifier

    x, y = load_csr(root / "train")
    x_val, y_val = load_csr(root / "val")
    result = {}
    for epochs in (1, 3):
        model = SGDClassifier(loss="log_loss", max_iter=epochs, tol=None, random_state=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            seconds, each = timed_fits(lambda: model.fit(x, y), repeats)  # fit() starts afresh
        result[f"epochs{epochs}"] = {"fit_s": seconds, "fit_s_each": each,
                                     "val_accuracy": float(model.score(x_val, y_val))}
    return result


def sgd_beside(root: Path) -> None:
    """A child kept alive beside largeml's runs: one SGDClassifier 1-epoch fit (as
    `peer_sgd`'s) for each line on stdin, its seconds printed as a line."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import SGDClassifier

    x, y = load_csr(root / "train")
    model = SGDClassifier(loss="log_loss", max_iter=1, tol=None, random_state=0)
    print("ready", flush=True)
    for _ in sys.stdin:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            seconds = timed_fits(lambda: model.fit(x, y), 1)[0]
        print(seconds, flush=True)


class SgdBeside:
    """`sgd_beside` in a child process of this script: `fit()` times one fit there, between
    largeml's runs, so that both sides of a ratio meet the machine in the same spell."""

    def __init__(self, root: Path) -> None:
        self.log = open(root / "peer-sgd-beside.log", "w")
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--beside", "--set-dir", str(root)], cwd=REPO,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True)
        self._line()  # "ready": the data are loaded

    def _line(self) -> str:
        line = self.process.stdout.readline()
        if not line:
            self.log.close()
            fail(f"SGD beside largeml exit {self.process.wait()}", Path(self.log.name))
        return line

    def fit(self) -> float:
        self.process.stdin.write("fit\n")
        self.process.stdin.flush()
        return float(self._line())

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()
        self.log.close()


def peer_liblinear(root: Path, repeats: int) -> dict:
    """Fitted once, whatever --repeats says: it takes from seconds to minutes."""
    from sklearn.linear_model import LogisticRegression

    x, y = load_csr(root / "train")
    x_val, y_val = load_csr(root / "val")
    model = LogisticRegression(solver="liblinear", C=1.0)
    started = time.perf_counter()
    model.fit(x, y)
    seconds = time.perf_counter() - started
    return {"fit_s": seconds, "iterations": int(model.n_iter_.max()),
            "val_accuracy": float(model.score(x_val, y_val))}


def vw_accuracy(root: Path, model: Path) -> float:
    from vowpalwabbit import Workspace

    predictions = root / "vw" / "val.predictions"
    Workspace(f"-t -i {model} -d {root / 'val.vw'} -p {predictions} --quiet").finish()
    scores = np.loadtxt(predictions, usecols=0)
    y = np.loadtxt(root / "val.vw", usecols=0)  # +-1
    return float(np.mean((scores > 0) == (y > 0)))


def peer_vw(root: Path, repeats: int) -> dict:
    """Workspace(args) runs VW's driver over the data (-d or --passes) inside the constructor,
    as the vw binary does; finish() writes the model (-f)."""
    from vowpalwabbit import Workspace

    work = root / "vw"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    cache = work / "train.cache"
    options = f"--loss_function logistic -b {VW_BITS}"
    started = time.perf_counter()  # untimed in the comparison: text parsing plus cache writing
    Workspace(f"-d {root / 'train.vw'} --cache_file {cache} -k {options} --quiet "
              f"-f {work / 'text.model'}").finish()
    result = {"from_text_s": time.perf_counter() - started, "options": options}
    for passes in (1, 3):
        model = work / f"passes{passes}.model"
        warm(cache)
        runs = []

        def fit() -> None:
            # The driver's summary (captured, not printed): how many rows each pass trained on.
            runs.append(Workspace(f"--cache_file {cache} --passes {passes} {options} -f {model}",
                                  enable_logging=True))
            runs[-1].finish()

        seconds, each = timed_fits(fit, repeats)
        summary = "\n".join(runs[-1].get_log())
        rows = re.search(r"number of examples(?: per pass)? = (\d+)", summary)
        used = re.search(r"passes used = (\d+)", summary)
        result[f"passes{passes}"] = {
            "fit_s": seconds, "fit_s_each": each, "val_accuracy": vw_accuracy(root, model),
            "rows_per_pass": int(rows.group(1)) if rows else None,
            "passes_used": int(used.group(1)) if used else passes}
    return result


PEER_FUNCTIONS = {"sgd": peer_sgd, "liblinear": peer_liblinear, "vw": peer_vw}


def run_peer(root: Path, name: str, repeats: int) -> dict:
    """Runs one peer in a child process of this script, polling its memory."""
    result_path = root / f"peer-{name}.json"
    result_path.unlink(missing_ok=True)
    log_path = root / f"peer-{name}.log"
    command = [sys.executable, __file__, "--peer", name, "--set-dir", str(root),
               "--result", str(result_path), "--repeats", str(repeats)]
    status, wall, peak = run_polled(command, log_path)
    if status != 0:
        fail(f"peer {name} exit {status}", log_path)
    result = json.loads(result_path.read_text())
    result.update(process_wall_s=wall, peak_rss_anon_mib=peak)
    return result


# --- report -----------------------------------------------------------------------------------

def fmt(value, spec: str, scale: float = 1, unit: str = "") -> str:
    """`value * scale` formatted, with its unit; blank for None or NaN."""
    return "" if value is None or value != value else format(value * scale, spec) + unit


def report(meta: dict, r: dict) -> str:
    rows, lm, sgd, vw = meta["rows"]["train"], r["largeml"], r["sgd"], r["vw"]
    sgd_rate = rows / sgd["epochs1"]["fit_s"]
    vw_rate = rows / vw["passes1"]["fit_s"]
    best = max(sgd_rate, vw_rate)
    vw3 = vw["passes3"]
    vw3_rows = (vw3["rows_per_pass"] or rows) * vw3["passes_used"]
    table = [  # method, epochs, seconds, rows/s, val accuracy, peak MiB, notes
        ("SGDClassifier log_loss, 1 epoch", 1, sgd["epochs1"]["fit_s"], sgd_rate,
         sgd["epochs1"]["val_accuracy"], sgd["peak_rss_anon_mib"],
         "fit alone; peak: the process, data included"),
        ("SGDClassifier log_loss, 3 epochs", 3, sgd["epochs3"]["fit_s"],
         3 * rows / sgd["epochs3"]["fit_s"], sgd["epochs3"]["val_accuracy"], None,
         "same process as above"),
        ("VW, 1 pass from cache", 1, vw["passes1"]["fit_s"], vw_rate,
         vw["passes1"]["val_accuracy"], vw["peak_rss_anon_mib"],
         f"from text, writing the cache: {vw['from_text_s']:.1f} s (untimed)"),
        ("VW, 3 passes from cache", vw3["passes_used"], vw3["fit_s"], vw3_rows / vw3["fit_s"],
         vw3["val_accuracy"], None,
         f"trains on {vw3['rows_per_pass'] or rows:,} rows a pass (holds 1 in 10 out)"),
        ("SGDClassifier log_loss, 1 epoch, timed between largeml's runs", 1,
         lm["sgd_between_s"], rows / lm["sgd_between_s"], None, None,
         "the median of a fit before each pair and one after the last, in a process of its own"),
        ("largeml FTRL epoch: (3-epoch - 1-epoch wall) / 2", 1, lm["epoch_s"],
         lm["rows_per_s"], None, None,
         f"`{' '.join(lm['streaming_args'])}`; validation included"),
        ("largeml FTRL epoch 2 of the 3-epoch runs, as timed inside", 1, lm["second_epoch_s"],
         rows / lm["second_epoch_s"], None, None,
         "`perf/epoch_seconds`: steps, validation, checkpoint"),
        ("largeml FTRL `trainer.max_epochs=1 trainer.tol=0`", 1, lm["epochs1"]["wall_s"],
         lm["epochs1"]["samples_per_sec"], lm["epochs1"]["val_accuracy"],
         lm["epochs1"]["peak_rss_anon_mib"],
         "seconds: CLI wall; rows/s: its perf/samples_per_sec"),
        ("largeml FTRL `trainer.max_epochs=3 trainer.tol=0`", 3, lm["epochs3"]["wall_s"],
         lm["epochs3"]["samples_per_sec"], lm["epochs3"]["val_accuracy"],
         lm["epochs3"]["peak_rss_anon_mib"], "as above"),
        ("largeml FTRL (stops by its own rule)", lm["streaming"]["epochs"],
         lm["streaming"]["wall_s"], lm["streaming"]["samples_per_sec"],
         lm["streaming"]["val_accuracy"], lm["streaming"]["peak_rss_anon_mib"],
         f"stopped: {lm['streaming']['stopped']}; as above"),
        ("largeml defaults (stops by its own rule)", lm["defaults"]["epochs"],
         lm["defaults"]["wall_s"], lm["defaults"]["samples_per_sec"],
         lm["defaults"]["val_accuracy"], lm["defaults"]["peak_rss_anon_mib"],
         f"stopped: {lm['defaults']['stopped']}; seconds: CLI wall; epochs: Newton "
         "iterations for newton"),
        ("LIBLINEAR LogisticRegression C=1 (converged)", r["liblinear"]["iterations"],
         r["liblinear"]["fit_s"], None, r["liblinear"]["val_accuracy"],
         r["liblinear"]["peak_rss_anon_mib"], "fit alone; epochs: its Newton iterations"),
    ]
    lines = [
        f"### {meta['name']}: {rows:,} train + {meta['rows']['val']:,} val rows x "
        f"{meta['features']:,} features, {meta['nnz_per_row']} non-zeros a row",
        "",
        f"{meta['description']}. Positive rate: train {meta['train_positive_rate']:.1%}, "
        f"val {meta['val_positive_rate']:.1%}; the generating rule itself scores "
        f"{meta['val_generating_rule_accuracy']:.2%} on the validation rows.",
        f"largeml chose `{lm['defaults']['optimizer']}`, feature scaling "
        f"`{lm['defaults']['feature_scaling']}` (data.scale=auto); "
        f"VW options: `{r['vw']['options']}`, otherwise defaults. SGDClassifier, LIBLINEAR "
        "and VW's learner use one core each; largeml picks its threads (`trainer.num_threads`).",
        "",
        "| method | epochs | seconds | rows/s | ratio to best peer | val accuracy | "
        "peak RssAnon MiB | notes |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for method, epochs, seconds, rate, accuracy, peak, notes in table:
        lines.append(
            f"| {method} | {fmt(epochs, 'd')} | {fmt(seconds, '.2f')} | "
            f"{fmt(rate, '.3f', 1e-6, ' M')} | {fmt(rate, '.3f', 1 / best)} | "
            f"{fmt(accuracy, '.2f', 100, ' %')} | {fmt(peak, '.0f')} | {notes} |")
    each = ", ".join(f"{seconds:.2f}" for seconds in lm["sgd_between_s_each"])
    lines += ["", f"In the same minutes (SGDClassifier's fits between largeml's runs, "
              f"{each} s): largeml's FTRL epoch at {fmt(lm['between_ratio'], '.2f')}x its rows/s "
              f"({fmt(lm['sgd_between_s'], '.2f')} s against {fmt(lm['epoch_s'], '.2f')} s)."]
    return "\n".join(lines)


# --- main -------------------------------------------------------------------------------------

def check_peers() -> None:
    import importlib.util

    missing = [pip for module, pip in PEERS.items() if importlib.util.find_spec(module) is None]
    if missing:
        sys.exit(f"bench_sparse: missing peers {', '.join(missing)}; "
                 f"install them with: pip install {' '.join(missing)}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/bench_sparse"),
                        help="work directory: data sets (reused) and runs")
    parser.add_argument("--datasets", default="uniform,clicks", help="comma-separated")
    parser.add_argument("--rows", type=int, default=1_000_000, help="training rows (val: /10)")
    parser.add_argument("--features", type=int, default=2_000_000, help="uniform: features")
    parser.add_argument("--nnz", type=int, default=40, help="uniform: non-zeros a row")
    parser.add_argument("--vocab", type=int, default=200_000, help="clicks: largest vocabulary")
    parser.add_argument("--quick", action="store_true",
                        help="100 k rows, 200 k features, vocabularies up to 20 k")
    parser.add_argument("--largeml-args", default="",
                        help='overrides appended to every largeml run, e.g. "data.batch_size=4096"')
    parser.add_argument("--ftrl-args", default="",
                        help='overrides appended to the FTRL runs alone, e.g. '
                        '"optimizer.hogwild=2"')
    parser.add_argument("--json", type=Path, help="write every figure here")
    parser.add_argument("--repeats", type=int, default=5,
                        help="timed runs of each epoch count (medians reported); LIBLINEAR "
                        "and largeml's default run: once")
    parser.add_argument("--peer", choices=sorted(PEER_FUNCTIONS), help=argparse.SUPPRESS)
    parser.add_argument("--beside", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--set-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.rows, args.features, args.vocab = 100_000, 200_000, 20_000
    if not 0 < args.nnz <= args.features or args.features >= 2**VW_BITS or args.vocab < 10:
        parser.error(f"need 0 < --nnz <= --features < 2^{VW_BITS} and --vocab >= 10")
    return args


def main() -> None:
    args = parse_args()
    if args.peer:  # a child process: one peer on one set
        args.result.write_text(json.dumps(PEER_FUNCTIONS[args.peer](args.set_dir, args.repeats)))
        return
    if args.beside:  # a child process: SGD's 1-epoch fits between largeml's runs
        sgd_beside(args.set_dir)
        return
    check_peers()
    extra = shlex.split(args.largeml_args)
    version = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=REPO,
                             capture_output=True, text=True).stdout.strip() or "unknown"
    print(f"largeml at {version}; {os.cpu_count()} CPUs\n", flush=True)
    everything = {"args": {k: str(v) for k, v in vars(args).items()}, "largeml_version": version,
                  "datasets": {}}
    for kind in args.datasets.split(","):
        if kind not in ("uniform", "clicks"):
            sys.exit(f"bench_sparse: --datasets: unknown set {kind!r}; use uniform and/or clicks")
        shape = (f"{args.features}x{args.nnz}" if kind == "uniform" else f"v{args.vocab}")
        root = args.dir / f"{kind}-{args.rows}-{shape}"
        started = time.perf_counter()
        meta = generate(root, kind, args)
        print(f"[{kind}] data ready in {root} ({time.perf_counter() - started:.0f} s)",
              file=sys.stderr)
        results = {}
        for name in ("sgd", "vw", "liblinear"):
            print(f"[{kind}] {name} ...", file=sys.stderr)
            results[name] = run_peer(root, name, args.repeats)
        print(f"[{kind}] largeml ...", file=sys.stderr)
        beside = SgdBeside(root)
        try:
            results["largeml"] = bench_largeml(root, meta["rows"]["train"], extra,
                                               shlex.split(args.ftrl_args), args.repeats,
                                               beside)
        finally:
            beside.close()
        everything["datasets"][kind] = {"meta": meta, **results}
        if args.json:  # after each set, so a later failure keeps what was measured
            args.json.write_text(json.dumps(everything, indent=1))
        print(report(meta, results) + "\n", flush=True)


if __name__ == "__main__":
    main()
