"""The conversion cache: a raw file converted once into `cache_dir/<stem>-<hash>`, reused after.

The hash covers the input's identity (each file's absolute path, size, mtime and inode: the
file, a directory's Parquet part files, a `.npy`'s labels file), the format, the options and the
shard format version, so a changed file or option converts again. Processes that want the same
input at once (the ranks of a distributed run) take turns on a lock file beside the entry: the
first converts, the others wait and then find the cache complete.
"""

import fcntl
import hashlib
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from largeml.data import shards
from largeml.data.shards import ShardIndex, open_shards
from largeml.errors import DataError

log = logging.getLogger(__name__)


def identity(paths: list[Path]) -> list[list[Any]]:
    """What the cache key knows of the files: absolute path, size, mtime and inode of each."""
    out = []
    for path in paths:
        stat = path.stat()
        out.append([str(path.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ino])
    return out


def cached(path: Path, cache_dir: Path, key: dict[str, Any],
           convert: Callable[[Path], ShardIndex]) -> ShardIndex:
    """The dataset `convert(out)` writes for `key`, converted once under `cache_dir`; later
    calls with an equal key open it. Partial directories that killed conversions left in
    `cache_dir` are removed on the way; a damaged entry is converted again."""
    key = {**key, "version": shards.VERSION}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    stem = path.name.removesuffix(".gz").rsplit(".", 1)[0] or path.name
    out = Path(cache_dir) / f"{stem}-{digest}"
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_name(f".{out.name}.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        shards.remove_stale_partials(cache_dir)  # killed conversions of this or any other input
        if (out / shards.INDEX).is_file():
            try:
                index = open_shards(out)
            except DataError as err:
                log.warning("cache %s is damaged (%s); converting again", out, err)
            else:
                log.info("reusing cached %s for %s", out, path)
                return index
        start = time.perf_counter()
        index = convert(out)
    log.info("converted %s into cache %s in %.1f s", path, out, time.perf_counter() - start)
    return index
