"""The embedded log's ``head`` file, read and altered independently of kvlog's own code.

The layout is the one docs/design.md documents ("The locks and the head
file"): 64-bit little-endian words; a 16-word header (magic, format,
partitions, version, writing, clean, boot id, reserved), then one suspect word
per partition, then two copies of ``generation, P x (end, active base, active
size)``, the current one picked by the low bit of the version.

Tests use it to see what the head published, and to leave a log as an OS
crash would (a head written in another boot, not marked clean), so that an
open cannot trust the head and scans the active segments.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

MAGIC = b"KVLHEAD1"
HEADER_WORDS = 16


@dataclass(frozen=True)
class HeadState:
    version: int
    writing: bool
    clean: bool
    boot_id: bytes
    suspect: list[bool]
    generation: int
    #: Per partition: (end offset, active segment base, active segment size).
    entries: list[tuple[int, int, int]]


def _words(data: bytes) -> list[int]:
    return list(struct.unpack(f"<{len(data) // 8}Q", data))


def read_head(log_dir: Path) -> HeadState:
    data = (log_dir / "head").read_bytes()
    assert data[:8] == MAGIC, f"{log_dir / 'head'} has no head magic"
    w = _words(data)
    partitions = w[2]
    assert len(w) == HEADER_WORDS + partitions + 2 * (1 + 3 * partitions)
    copy_words = 1 + 3 * partitions
    start = HEADER_WORDS + partitions + (w[3] & 1) * copy_words
    copy = w[start : start + copy_words]
    entries = [(copy[1 + 3 * p], copy[2 + 3 * p], copy[3 + 3 * p]) for p in range(partitions)]
    return HeadState(
        version=w[3],
        writing=bool(w[4]),
        clean=bool(w[5]),
        boot_id=data[48:64],
        suspect=[bool(x) for x in w[HEADER_WORDS : HEADER_WORDS + partitions]],
        generation=copy[0],
        entries=entries,
    )


def _write_word(log_dir: Path, index: int, value: bytes) -> None:
    fd = os.open(log_dir / "head", os.O_RDWR)
    try:
        os.pwrite(fd, value, 8 * index)
    finally:
        os.close(fd)


def simulate_os_crash(log_dir: Path) -> None:
    """Leave the head as an OS crash leaves it: written in an earlier boot, not marked clean.

    The next open cannot trust its sizes, and scans every active segment.
    """
    _write_word(log_dir, 5, bytes(8))  # clean = 0
    _write_word(log_dir, 6, b"earlier-boot-id!")  # words 6 and 7: another boot


def set_entry(log_dir: Path, partition: int, *, end: int | None = None, size: int | None = None) -> None:
    """Make the current copy of the head say something else about a partition (a head that lies)."""
    state = read_head(log_dir)
    partitions = len(state.entries)
    start = HEADER_WORDS + partitions + (state.version & 1) * (1 + 3 * partitions)
    at = start + 1 + 3 * partition
    if end is not None:
        _write_word(log_dir, at, struct.pack("<Q", end))
    if size is not None:
        _write_word(log_dir, at + 2, struct.pack("<Q", size))


def to_old_layout(log_dir: Path, *, marker: bool = True) -> None:
    """Turn a closed log into what the code before the head left: no head, maybe a clean-shutdown marker."""
    state = read_head(log_dir)
    (log_dir / "head").unlink()
    for name in ("OPEN", "COMPACT"):
        (log_dir / name).unlink(missing_ok=True)
    if marker:
        partitions = {
            str(p): {"base": base, "size": size, "end": end}
            for p, (end, base, size) in enumerate(state.entries)
        }
        (log_dir / "clean-shutdown.json").write_text(json.dumps({"format": 1, "partitions": partitions}))
