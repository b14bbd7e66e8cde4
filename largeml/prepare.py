"""`python -m largeml.prepare input=PATH output=DIR [key=value ...]`: raw file -> shards.

The keys are in `configs/prepare.yaml`. Writes nothing but `output` (no Hydra run directory)
and ends with a one-line summary on stdout; a bad option or file stops with exit code 2.

    python -m largeml.prepare -m input=a.svm,b.svm 'output=${input}.shards'   # several files

converts each file in turn; Hydra's `multirun.yaml` goes to the largeml cache, not the working
directory.
"""

import logging
import sys
import time

import hydra
from omegaconf import DictConfig, OmegaConf

from largeml.cli import CONFIG_DIR, exit_2_on_error
from largeml.data import shards
from largeml.data.convert import convert
from largeml.data.shards import ShardIndex
from largeml.errors import ConfigError

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> tuple[ShardIndex, float]:
    """Converts as `cfg` says; returns the dataset and the seconds it took."""
    for key in ("input", "output"):
        if OmegaConf.is_missing(cfg, key) or cfg[key] in (None, ""):
            raise ConfigError(f"{key} is required: python -m largeml.prepare input=PATH "
                              "output=DIR [format=auto|libsvm|csv|npy|parquet] ...")
    if not isinstance(cfg.shard_mb, int | float) or cfg.shard_mb <= 0:
        raise ConfigError(f"shard_mb must be a positive number of MiB, got {cfg.shard_mb!r}")
    start = time.perf_counter()
    index = convert(
        input=str(cfg.input),
        output=str(cfg.output),
        format=cfg.format,
        layout=cfg.layout,
        n_features=cfg.n_features,
        labels=None if cfg.labels is None else str(cfg.labels),
        label_column=cfg.label_column,
        shard_bytes=max(1, int(cfg.shard_mb * 2**20)),
        hash_bits=cfg.hash_bits,
        feature_columns=cfg.get("feature_columns"),
        categorical_columns=cfg.get("categorical_columns"),
    )
    return index, time.perf_counter() - start


def summary(index: ShardIndex, seconds: float, input_bytes: int) -> str:
    nnz = f"{index.nnz:,} nnz" if index.layout == "sparse" else "nnz n/a"
    counts = sorted(index.label_counts.items(), key=lambda item: float(item[0]))
    shown = " / ".join(f"{label}: {n:,}" for label, n in counts[:10])
    if len(counts) > 10:
        shown += f" / ... ({len(counts)} labels)"
    return (
        f"prepared {index.rows:,} rows x {index.n_features:,} features, {nnz}, {index.layout}, "
        f"labels {shown} -> {index.root} "
        f"({len(index.shards)} shard{'s' * (len(index.shards) != 1)}) in {seconds:.1f} s, "
        f"{input_bytes / 1e6 / max(seconds, 1e-9):.1f} MB/s"
    )


def verify_dataset(root: str) -> int:
    """`verify=DIR`: checks every file of a prepared dataset against its index; prints `ok`
    or each damaged file; the exit code (2 on damage)."""
    index, damaged = shards.verify(root)
    files = sum(len(shard.files) for shard in index.shards)
    if not damaged:
        print(f"ok: {index.root}: {files} files of {len(index.shards)} shards, {index.rows:,} "
              f"rows: sizes and CRC-32 as in {shards.INDEX}")
        return 0
    for line in damaged:
        print(f"damaged: {line}")
    print(f"{len(damaged)} of {files} files in {index.root} are damaged: "
          f"{shards.remedy(index.root, index.source)}")
    return 2


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="prepare")
def main(cfg: DictConfig) -> None:
    with exit_2_on_error(log):
        if cfg.get("verify") is not None:
            sys.exit(verify_dataset(str(cfg.verify)))
        index, seconds = run(cfg)
    print(summary(index, seconds, index.source["bytes"]))


if __name__ == "__main__":
    main()
