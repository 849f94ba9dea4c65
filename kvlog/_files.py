"""Durable file operations shared by the embedded log and the cache."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["fsync_dir", "write_file_atomically"]


def fsync_dir(path: Path) -> None:
    """Sync a directory: a rename or a new file is durable only once its directory entry is."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_atomically(path: Path, data: bytes, *, sync: bool) -> None:
    """Replace ``path`` with ``data`` through a temporary file and a rename (synced if ``sync``)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        if sync:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)
    if sync:
        fsync_dir(path.parent)
