"""Crash recovery of the embedded log.

Reads the clean-shutdown marker of the old layout (a log without a head),
finishes a compaction swap a crash committed (``.swap``) or drops one it did
not (``.cleaned``), cuts what a writer killed mid-append left past the
published end, and scans a torn or corrupt tail of an active segment back to
the last whole ``append()`` batch. What a crash at each step leaves is in
docs/design.md, "The embedded log".
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from ..._files import fsync_dir
from .segments import MAGIC, MAX_FRAME, STATE_FORMAT, BadFrame, Frame, Segment, parse_frames, segment_name

__all__ = [
    "CLEAN_SHUTDOWN_MARKER",
    "UNPUBLISHED_REASON",
    "cut_unpublished",
    "finish_interrupted_swaps",
    "recover_active_segment",
    "remove_cleaned",
    "take_clean_shutdown",
]

# The embedded log logs under one name, whichever of its modules speaks.
log = logging.getLogger(__package__)

#: The file the old layout's ``close()`` left in the log directory: per partition, the active
#: segment and its size. Read (and removed) only when a log without a head is opened.
CLEAN_SHUTDOWN_MARKER = "clean-shutdown.json"

#: The reason of a recovery entry for the bytes a writer killed mid-append left past the published end.
UNPUBLISHED_REASON = "bytes of an append that was never published (its writer died)"


def take_clean_shutdown(log_path: Path) -> dict[str, Any]:
    """Read and remove the marker ``close()`` leaves; return its partitions (``{}`` if none or unreadable).

    Removed before anything else is opened: a crash in this session must not find it.
    """
    path = log_path / CLEAN_SHUTDOWN_MARKER
    try:
        marker = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError):
        marker = {}
    path.unlink()
    fsync_dir(log_path)
    if not isinstance(marker, dict) or marker.get("format") != STATE_FORMAT:
        return {}
    return dict(marker.get("partitions", {}))


def remove_cleaned(directory: Path) -> None:
    """Remove the uncommitted compaction outputs of a partition directory.

    Only a holder of the compaction lock calls this: a live compactor's
    ``.cleaned`` is its work in progress.
    """
    for cleaned in directory.glob("*.cleaned"):
        with contextlib.suppress(FileNotFoundError):
            cleaned.unlink()  # never committed: the segments it would replace are intact


def finish_interrupted_swaps(directory: Path) -> None:
    """Complete the compaction swaps a crash interrupted in a partition directory.

    Callers hold the write lock, under which every swap is done whole: a
    ``.swap`` found then was left by a swapper that died.
    """
    for swap in sorted(directory.glob("*.swap")):
        base_text, _, end_text = swap.name[: -len(".swap")].partition("-")
        base, end = int(base_text), int(end_text)
        # Committed: the old segments it replaces may be all there, or all but the first
        # (a crash while deleting them); the first is replaced by the rename.
        for old in directory.glob("*.log"):
            if old.name[:-4].isdigit() and base < int(old.name[:-4]) < end:
                old.unlink()
        os.replace(swap, directory / segment_name(base))
        fsync_dir(directory)
        log.info("finished an interrupted compaction of %s (offsets %d-%d)", directory, base, end)


def recover_active_segment(log_path: Path, p: int, segment: Segment) -> tuple[list[dict[str, Any]], int]:
    """Scan the active segment of partition ``p``, index it, and cut a torn or corrupt tail.

    Sets ``segment.size`` to the bytes kept.

    Returns:
        The report (one entry per cut, for :attr:`LocalLog.recovery`) and the
        end offset of the partition.
    """
    report: list[dict[str, Any]] = []
    with open(segment.path, "r+b") as f:
        data = f.read()
        good, last, reason = _last_whole_batch(data, segment)
        if reason is not None and good >= len(MAGIC) and data.count(0, good) == len(data) - good:
            # Only zeros past the last record: space preallocated for appends
            # (fsync="always"; see PREALLOCATE_BYTES), never a record.
            log.info("cut %d byte(s) of preallocated space at the end of %s", len(data) - good, segment.path)
            f.truncate(good)
            f.flush()
            os.fsync(f.fileno())
        elif reason is not None:
            truncated = len(data) - good
            if good == 0:
                f.seek(0)
                f.write(MAGIC)
                good = len(MAGIC)
            f.truncate(good)
            f.flush()
            os.fsync(f.fileno())
            entry = {
                "segment": str(segment.path),
                "truncated_bytes": truncated,
                "reason": reason,
                "last_good_offset": last if last >= segment.base else None,
            }
            report.append(entry)
            log.warning(
                "recovered partition %d of the log at %s: cut %d byte(s) at the end of %s (%s); "
                "the last good record is offset %s",
                p,
                log_path,
                truncated,
                segment.path.name,
                reason,
                entry["last_good_offset"],
            )
    segment.size = good
    return report, last + 1


def _last_whole_batch(data: bytes, segment: Segment) -> tuple[int, int, str | None]:
    """Where the good part of a segment's ``data`` ends: its bytes, its last offset, and why the rest is cut.

    The reason is None when nothing is to be cut. Indexes the frames it keeps in ``segment``.
    """
    last = segment.base - 1
    if data[: len(MAGIC)] != MAGIC:
        if len(data) >= len(MAGIC) or MAGIC[: len(data)] != data:
            return 0, last, "bad segment header"
        return 0, last, "torn segment header"
    good = len(MAGIC)
    reason = None
    # An append() batch is all or nothing: the tail is cut back to the last
    # record that ends a batch, so a batch a crash tore leaves no record
    # behind (Kafka keeps producer batches whole too).
    pending: list[Frame] = []
    try:
        for frame in parse_frames(data, len(MAGIC), 0, MAX_FRAME, segment.base - 1):
            pending.append(frame)
            if frame.batch_end:
                for whole in pending:
                    segment.index_appended_frame(whole.offset, whole.position)
                pending.clear()
                good = frame.end
                last = frame.offset
    except BadFrame as bad:
        reason = f"{bad.reason} at file position {bad.position}"
    tail = pending[-1].end if pending else good
    if reason is None and tail < len(data):
        reason = f"incomplete record at file position {tail}"
    if pending:
        what = f"a batch without its last record at file position {tail}" if reason is None else reason
        reason = f"{what}; {len(pending)} record(s) of an incomplete batch cut with it"
    return good, last, reason


def cut_unpublished(
    log_path: Path, p: int, base: int, published: int, *, sync: bool = True
) -> dict[str, Any] | None:
    """Cut what a writer killed mid-append left past the published size of partition ``p``.

    ``base`` and ``published``: the active segment and its size in the head.
    A segment created past it by a roll the writer did not publish is removed.
    The cut is synced before the caller clears the head's writing flag, so that
    no later scan, even after an OS crash, can take those bytes for records.

    Returns:
        The recovery entry, or None if there was nothing to cut.
    """
    directory = log_path / str(p)
    for found in directory.glob("*.log"):
        if found.name[:-4].isdigit() and int(found.name[:-4]) > base:
            found.unlink()
            log.warning("removed %s, a segment a writer that died created but never published", found)
            if sync:
                fsync_dir(directory)
    path = directory / segment_name(base)
    fd = os.open(path, os.O_RDWR)
    try:
        size = os.fstat(fd).st_size
        if size <= published:
            return None
        os.ftruncate(fd, published)
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)
    log.warning(
        "cut %d byte(s) at the end of %s (partition %d of the log at %s): %s",
        size - published,
        path.name,
        p,
        log_path,
        UNPUBLISHED_REASON,
    )
    return {"segment": str(path), "truncated_bytes": size - published, "reason": UNPUBLISHED_REASON}
