"""Checkpoints: dicts of state_dicts in `<run dir>/checkpoints/`, written so that a kill at any
moment leaves every file either complete or absent, and checked when read back.

    step-000001200.pt   one file per save, the last `keep` of them kept
    last.pt             the newest save (a hard link to its step file: no second write)
    best.pt             the save with the best validation metric so far (a hard link too)

Each file carries a CRC-32 of its own contents (`crc32`): torch.load notices a truncated file,
but a flipped byte in a tensor loads silently; the checksum catches both.
"""

import logging
import os
import re
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from largeml.files import fsync_dir

log = logging.getLogger(__name__)

STEP_FILE = re.compile(r"step-(\d+)\.pt")


class DamagedCheckpoint(ValueError):
    pass


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Writes `state` plus its checksum to a temporary file, fsyncs it, then renames it over
    `path` (atomic on POSIX) and fsyncs the directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        torch.save({**state, "crc32": digest(state)}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Loads tensors to CPU, refusing anything but tensors and plain containers, and checks the
    contents against the checksum written with them."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict):
            raise DamagedCheckpoint(f"{path}: not a checkpoint (a {type(state).__name__})")
        expected = state.pop("crc32", None)
        if expected is None:
            raise DamagedCheckpoint(f"{path}: has no checksum (not written by largeml?)")
        if expected != digest(state):
            raise DamagedCheckpoint(f"{path}: contents do not match their checksum")
    except DamagedCheckpoint:
        raise
    except Exception as err:  # a truncated zip, a torn pickle, a tensor with a bad stride...
        first_line = (str(err).splitlines() or [""])[0][:200]
        raise DamagedCheckpoint(
            f"{path}: cannot be read ({type(err).__name__}: {first_line})") from err
    return state


def link(target: Path, path: Path) -> None:
    """Points `path` at `target`'s contents atomically (a hard link renamed into place)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    os.link(target, tmp)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def step_files(directory: Path) -> list[Path]:
    """The step files in `directory`, newest (highest step) first."""
    found = [(int(m[1]), p) for p in directory.glob("step-*.pt")
             if (m := STEP_FILE.fullmatch(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def prune(directory: Path, keep: int) -> None:
    """Removes all but the newest `keep` step files (last.pt and best.pt keep their contents:
    they are links of their own)."""
    for old in step_files(directory)[keep:]:
        old.unlink(missing_ok=True)


def newest_complete(directory: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint in `directory` that loads and passes its checksum: the step files
    newest first (a kill between writing one and linking last.pt leaves last.pt a save behind),
    then last.pt. A damaged file is skipped with a warning naming it."""
    seen = set()
    for path in _candidates(directory):
        inode = path.stat().st_ino
        if inode in seen:  # last.pt is a link to a step file already tried
            continue
        seen.add(inode)
        try:
            return path, load_checkpoint(path)
        except DamagedCheckpoint as err:
            log.warning("skipping damaged checkpoint %s", err)
    return None


def _candidates(directory: Path) -> Iterator[Path]:
    yield from step_files(directory)
    if (directory / "last.pt").is_file():
        yield directory / "last.pt"


def digest(obj: Any, crc: int = 0) -> int:
    """CRC-32 over every tensor's bytes and every other value's repr, in the dict's order."""
    if isinstance(obj, torch.Tensor):
        data = obj.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        return zlib.crc32(data, zlib.crc32(f"{obj.dtype}{tuple(obj.shape)}".encode(), crc))
    if isinstance(obj, dict):
        for key, value in obj.items():
            crc = digest(value, zlib.crc32(repr(key).encode(), crc))
        return crc
    if isinstance(obj, list | tuple):
        for value in obj:
            crc = digest(value, crc)
        return crc
    return zlib.crc32(repr(obj).encode(), crc)
