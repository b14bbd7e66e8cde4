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
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from largeml.data.convert import convert
from largeml.data.shards import ShardIndex
from largeml.errors import ConfigError, LargemlError

log = logging.getLogger(__name__)

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "configs")


def run(cfg: DictConfig) -> tuple[ShardIndex, float]:
    """Converts as `cfg` says; returns the dataset and the seconds it took."""
    for key in ("input", "output"):
        if OmegaConf.is_missing(cfg, key) or cfg[key] in (None, ""):
            raise ConfigError(f"{key} is required: python -m largeml.prepare input=PATH "
                              "output=DIR [format=auto|libsvm|csv|npy] ...")
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


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="prepare")
def main(cfg: DictConfig) -> None:
    try:
        index, seconds = run(cfg)
    except LargemlError as err:
        log.error("%s", err)
        sys.exit(2)
    print(summary(index, seconds, index.source["bytes"]))


if __name__ == "__main__":
    main()
