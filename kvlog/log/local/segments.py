"""The segment file format: frame encoding and parsing, segment names, and the in-memory segment.

A segment is the magic ``KVLSEG1\\n`` followed by frames, ``u32 body length |
u32 crc32(body) | body`` with ``body = i64 offset | i64 timestamp (ms) | u8
flags | u32 key length | key | value`` (little-endian). The full layout is in
docs/design.md, "The embedded log".
"""

from __future__ import annotations

import bisect
import operator
import os
import struct
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path

__all__ = [
    "FORMAT_VERSION",
    "FRAME_HEAD",
    "FRAME_OVERHEAD",
    "INDEX_INTERVAL",
    "MAGIC",
    "MAX_FRAME",
    "PREALLOCATE_BYTES",
    "BadFrame",
    "Frame",
    "Segment",
    "base_of",
    "cleaned_name",
    "encode_frame",
    "only_zeros",
    "parse_frames",
    "segment_name",
    "segment_of",
    "swap_name",
]

#: The version in ``log.json`` (and the cleaner's files) this code reads and writes.
FORMAT_VERSION = 1
#: The first bytes of every segment file.
MAGIC = b"KVLSEG1\n"
#: The head of a frame: body length, crc32(body).
FRAME_HEAD = struct.Struct("<II")
_BODY_HEAD = struct.Struct("<qqBI")  # offset, timestamp ms, flags, key length
_TOMBSTONE = 1
_BATCH_END = 2
#: Bytes a record costs beyond its key and value.
FRAME_OVERHEAD = FRAME_HEAD.size + _BODY_HEAD.size
#: A sparse index entry every this many bytes of a segment.
INDEX_INTERVAL = 64 * 1024
#: Frames longer than this are corruption. Fixed, not derived from
#: max_record_bytes: reopening with a smaller limit must not cut good records.
MAX_FRAME = 1 << 30
#: With fsync="always", the active segment is extended this far ahead of its
#: end (fallocate): an fdatasync after a write inside the file's size has no
#: new size to journal. The bytes past the published end are never records: a
#: roll and the last close cut them, and recovery cuts a tail of zeros.
PREALLOCATE_BYTES = 1 << 20


def only_zeros(path: Path | str, start: int, size: int) -> bool:
    """Whether the bytes of the file at ``path`` from ``start`` to ``size`` (its size) are all zeros."""
    with open(path, "rb") as f:
        f.seek(start)
        remaining = size - start
        while remaining > 0:
            chunk = f.read(min(remaining, 1 << 20))
            if not chunk:
                return False  # shorter than it was
            if chunk.count(0) != len(chunk):
                return False
            remaining -= len(chunk)
    return True


def segment_name(base: int) -> str:
    """The file name of the segment whose first offset is ``base``."""
    return f"{base:020d}.log"


def cleaned_name(base: int) -> str:
    """The file name compaction writes the new segment at ``base`` under, before its commit point."""
    return f"{base:020d}.cleaned"


def swap_name(base: int, end: int) -> str:
    """The name of a committed compaction output replacing the segments in offsets ``[base, end)``."""
    return f"{base:020d}-{end:020d}.swap"


def encode_frame(
    offset: int, timestamp_ms: int, key: bytes, value: bytes | None, *, batch_end: bool = True
) -> bytes:
    """Return the bytes of one record as a segment holds it."""
    flags = (_TOMBSTONE if value is None else 0) | (_BATCH_END if batch_end else 0)
    body = _BODY_HEAD.pack(offset, timestamp_ms, flags, len(key)) + key + (value or b"")
    return FRAME_HEAD.pack(len(body), zlib.crc32(body)) + body


class Frame:
    """One decoded frame and where it lies in its segment (``position`` to ``end``, file positions)."""

    __slots__ = ("batch_end", "end", "key", "offset", "position", "timestamp", "value")

    def __init__(
        self,
        position: int,
        end: int,
        offset: int,
        timestamp: int,
        key: bytes,
        value: bytes | None,
        batch_end: bool,
    ) -> None:
        self.position, self.end = position, end
        self.offset, self.timestamp, self.key, self.value = offset, timestamp, key, value
        self.batch_end = batch_end


class BadFrame(Exception):
    """A complete frame that is wrong (bad length, CRC or offset order), at file position ``position``.

    Internal to the log: callers turn it into a
    :class:`~kvlog.errors.LogCorruptError` or a recovery cut.
    """

    def __init__(self, position: int, reason: str) -> None:
        super().__init__(reason)
        self.position, self.reason = position, reason


def parse_frames(buf: bytes, start: int, file_pos: int, max_frame: int, after: int) -> Iterator[Frame]:
    """Yield the complete, valid frames of ``buf`` from ``start``; stop at the first incomplete one.

    ``file_pos`` is the file position of ``buf[0]``; ``after`` the offset the
    first frame must exceed. Raises :class:`BadFrame` at a frame that is
    complete but wrong (bad length, CRC, or offset order).
    """
    unpack_frame, unpack_body = FRAME_HEAD.unpack_from, _BODY_HEAD.unpack_from
    head, body_head = FRAME_HEAD.size, _BODY_HEAD.size
    crc32, n = zlib.crc32, len(buf)
    pos = start
    while pos + head <= n:
        length, crc = unpack_frame(buf, pos)
        if length < body_head or length > max_frame:
            raise BadFrame(file_pos + pos, f"impossible frame length {length}")
        end = pos + head + length
        if end > n:
            return
        body = buf[pos + head : end]
        if crc32(body) != crc:
            raise BadFrame(file_pos + pos, "CRC mismatch")
        offset, timestamp, flags, key_len = unpack_body(body)
        if offset <= after or body_head + key_len > length:
            raise BadFrame(file_pos + pos, f"offset {offset} out of order or key length {key_len} invalid")
        key = body[body_head : body_head + key_len]
        value = None if flags & _TOMBSTONE else body[body_head + key_len :]
        yield Frame(file_pos + pos, file_pos + end, offset, timestamp, key, value, bool(flags & _BATCH_END))
        after = offset
        pos = end


class Segment:
    """A segment file of one partition: immutable once closed, appended to while active."""

    def __init__(self, path: Path, base: int, size: int) -> None:
        self.path = path
        self.base = base
        #: Bytes of complete, published frames; readers never read past it.
        self.size = size
        #: Sparse index: offsets and file positions of frames, ascending. Only
        #: a hint of where to start reading for an offset (any entry is a real
        #: frame; a reader skips frames below its position), so it may have
        #: holes: a segment nobody has read into since the open has none.
        self.index_offsets: list[int] = []
        self.index_positions: list[int] = []
        #: Set when compaction replaced this segment's file: a reader on it finds its position again.
        self.replaced = False
        #: The file's inode and modification time when this object was made: a reload of the
        #: directory (another process may have compacted) keeps the object only if they match.
        self.ino = 0
        self.mtime_ns = 0
        #: Where this instance last preallocated the file to (0: not known). Another process may
        #: have cut the file since; every change another process makes resets it (see _sync_locked).
        self.allocated = 0

    def identify(self, st: os.stat_result) -> Segment:
        """Record which file this is (``st``: its stat); return the segment."""
        self.ino, self.mtime_ns = st.st_ino, st.st_mtime_ns
        return self

    def index_appended_frame(self, offset: int, position: int) -> None:
        """Index a frame (sparsely) as it is appended or written, past every frame indexed so far."""
        if not self.index_positions or position - self.index_positions[-1] >= INDEX_INTERVAL:
            self.index_offsets.append(offset)
            self.index_positions.append(position)

    def index_passed_frames(self, entries: Sequence[tuple[int, int]]) -> None:
        """Index the ``(offset, position)`` frames a reader passed while seeking.

        Callers hold the log's lock.
        """
        for offset, position in entries:
            i = bisect.bisect_left(self.index_positions, position)
            if i == len(self.index_positions) or self.index_positions[i] != position:
                self.index_positions.insert(i, position)
                self.index_offsets.insert(i, offset)

    def start_for(self, position: int) -> int:
        """A file position at or before the frame of offset ``position`` (callers hold the log's lock).

        Right after the magic when no indexed frame is at or below it: that is
        where a reader entering the segment at its base starts, with no scan.
        """
        j = bisect.bisect_right(self.index_offsets, position) - 1
        return self.index_positions[j] if j >= 0 else len(MAGIC)


_base = operator.attrgetter("base")


def segment_of(segments: Sequence[Segment], offset: int) -> Segment:
    """The segment of ``segments`` (ascending, ``offset`` at or past the first base) that holds ``offset``."""
    return segments[bisect.bisect_right(segments, offset, key=_base) - 1]


def base_of(segments: Sequence[Segment], offset: int) -> int:
    """The base offset of the segment of ``segments`` (ascending) that holds ``offset``."""
    if offset >= segments[-1].base:
        return segments[-1].base
    return segment_of(segments, offset).base
