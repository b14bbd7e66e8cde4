"""Small file operations that a kill at any moment must not leave half done."""

import os
from pathlib import Path


def replace_text(path: Path, text: str) -> None:
    """Writes `path` atomically (a temporary file renamed over it): a reader sees the old
    contents or the new, never half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def fsync_dir(path: Path) -> None:
    """Makes a rename or a new entry in directory `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
