"""The segment file format: frame encoding and parsing, segment names, and the in-memory segment.

A segment is the magic ``KVLSEG1\\n`` followed by frames, ``u32 body length |
u32 crc32(body) | body`` with ``body = i64 offset | i64 timestamp (ms) | u8
flags | u32 key length | key | value`` (little-endian). The full layout is in
docs/design.md, "The embedded log".
"""

from __future__ import annotations

import bisect
import itertools
import operator
import os
import struct
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path

from ..base import Record

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
    "FrameColumns",
    "Segment",
    "base_of",
    "cleaned_name",
    "encode_frame",
    "encode_frames",
    "only_zeros",
    "parse_frames",
    "scan_frames",
    "segment_name",
    "segment_of",
    "skip_frames",
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
#: Both heads at once, the timestamp skipped: body length, crc32(body), offset, flags, key
#: length. Replay reads a frame's fixed fields with this one call (see scan_frames).
_FRAME_START = struct.Struct("<IIq8xBI")
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


class FrameColumns:
    """Records of one partition read by replay, column by column, in log order.

    ``offsets[i]``, ``keys[i]`` and ``values[i]`` are the i-th record's; a
    value of ``None`` is a tombstone. No object is made per record beyond its
    key and value bytes: the cache checks whole columns and hands them to LMDB
    in one call (see :meth:`kvlog.cache.Cache.apply_columns`).
    """

    __slots__ = ("keys", "offsets", "partition", "tombstones", "values")

    def __init__(self, partition: int) -> None:
        self.partition = partition
        self.offsets: list[int] = []
        self.keys: list[bytes] = []
        self.values: list[bytes | None] = []
        #: The indexes of the tombstones, ascending.
        self.tombstones: list[int] = []

    def __len__(self) -> int:
        return len(self.offsets)

    def record(self, i: int) -> Record:
        """The ``i``-th record."""
        return Record(self.partition, self.offsets[i], self.keys[i], self.values[i])

    def records(self) -> list[Record]:
        """Every record, in log order."""
        return list(map(Record, itertools.repeat(self.partition), self.offsets, self.keys, self.values))


def _frame_problem(
    buf: bytes, pos: int, file_pos: int, length: int, crc: int, offset: int, key_len: int
) -> None:
    """Raise :class:`BadFrame` for the frame at ``pos`` as :func:`parse_frames` would; return if it is incomplete.

    Called only for a frame whose combined test failed in :func:`scan_frames`
    or :func:`skip_frames`: the checks run here in parse_frames' order, so the
    three functions report every frame alike.
    """
    if length < _BODY_HEAD.size or length > MAX_FRAME:
        raise BadFrame(file_pos + pos, f"impossible frame length {length}")
    end = pos + FRAME_HEAD.size + length
    if end > len(buf):
        return
    if zlib.crc32(memoryview(buf)[pos + FRAME_HEAD.size : end]) != crc:
        raise BadFrame(file_pos + pos, "CRC mismatch")
    raise BadFrame(file_pos + pos, f"offset {offset} out of order or key length {key_len} invalid")


def _check_tail(buf: bytes, pos: int, file_pos: int) -> None:
    """At fewer bytes than a frame's fixed fields: an incomplete frame, unless its length is impossible."""
    if pos + FRAME_HEAD.size <= len(buf):
        length = FRAME_HEAD.unpack_from(buf, pos)[0]
        if length < _BODY_HEAD.size or length > MAX_FRAME:
            raise BadFrame(file_pos + pos, f"impossible frame length {length}")


def scan_frames(
    buf: bytes, start: int, file_pos: int, after: int, limit: int, columns: FrameColumns
) -> tuple[int, int]:
    """Append up to ``limit`` complete, valid frames of ``buf`` from ``start`` to ``columns``.

    The frames taken and the errors raised are those of :func:`parse_frames`
    with ``max_frame=MAX_FRAME`` (``file_pos`` is the file position of
    ``buf[0]``, ``after`` the offset the first frame must exceed): it stops at
    the first incomplete frame and raises :class:`BadFrame` at a complete one
    that is wrong. It is replay's loop: one ``unpack_from`` reads a frame's
    fixed fields, a memoryview slice feeds its CRC, and the rare cases (a bad
    or incomplete frame) are told apart only after one combined test fails.

    Returns:
        The position in ``buf`` after the last frame taken, and that frame's
        offset (``after`` if none was taken).
    """
    n = len(buf)
    if n - start > MAX_FRAME + FRAME_HEAD.size:
        # Only here could a frame longer than MAX_FRAME end inside the buffer,
        # which the combined test below relies on never happening.
        return _scan_frames_generally(buf, start, file_pos, after, limit, columns)
    unpack = _FRAME_START.unpack_from
    crc32 = zlib.crc32
    offsets, keys, values = columns.offsets, columns.keys, columns.values
    pos = start
    with memoryview(buf) as view:
        try:
            for _ in itertools.repeat(None, limit):
                # Raises struct.error where fewer bytes than the fixed fields are
                # left: a try costs nothing per frame until it catches.
                length, crc, offset, flags, key_len = unpack(buf, pos)
                body = pos + 8  # 8 and 21: the sizes of the two heads, as literals (no lookups per frame)
                end = body + length
                # key_len > length - 21 also holds for every length below 21, and a
                # length above MAX_FRAME ends past this buffer: one test for every case.
                if end > n or key_len > length - 21 or offset <= after:
                    _frame_problem(buf, pos, file_pos, length, crc, offset, key_len)
                    break  # incomplete
                if crc32(view[body:end]) != crc:
                    raise BadFrame(file_pos + pos, "CRC mismatch")
                key_end = body + 21 + key_len
                keys.append(buf[body + 21 : key_end])
                if flags & 1:  # _TOMBSTONE, as a literal: no lookup per frame
                    columns.tombstones.append(len(offsets))
                    values.append(None)
                else:
                    values.append(buf[key_end:end])
                offsets.append(offset)
                after = offset
                pos = end
        except struct.error:
            _check_tail(buf, pos, file_pos)
    return pos, after


def _scan_frames_generally(
    buf: bytes, start: int, file_pos: int, after: int, limit: int, columns: FrameColumns
) -> tuple[int, int]:
    pos = start
    for frame in itertools.islice(parse_frames(buf, start, file_pos, MAX_FRAME, after), max(limit, 0)):
        if frame.value is None:
            columns.tombstones.append(len(columns.offsets))
        columns.offsets.append(frame.offset)
        columns.keys.append(frame.key)
        columns.values.append(frame.value)
        after = frame.offset
        pos = frame.end - file_pos
    return pos, after


def skip_frames(
    buf: bytes, start: int, file_pos: int, after: int, position: int
) -> tuple[int, int, list[tuple[int, int]]]:
    """Pass the frames of ``buf`` from ``start`` whose offset is below ``position``.

    A reader that entered a segment before its position steps over those
    frames with this; they are checked as :func:`scan_frames` checks them (a
    bad one raises :class:`BadFrame`), but nothing of them is kept except,
    for the segment's sparse index, the ``(offset, file position)`` of the
    first one and of one every :data:`INDEX_INTERVAL` bytes after it.

    Returns:
        The position in ``buf`` of the first frame not passed (at or past
        ``position``, or incomplete), the offset of the last frame passed
        (``after`` if none) and the index entries.
    """
    n = len(buf)
    passed: list[tuple[int, int]] = []
    if n - start > MAX_FRAME + FRAME_HEAD.size:
        frames = parse_frames(buf, start, file_pos, MAX_FRAME, after)
        pos, next_entry = start, start
        for frame in frames:
            if frame.offset >= position:
                break
            if frame.position - file_pos >= next_entry:
                passed.append((frame.offset, frame.position))
                next_entry = frame.position - file_pos + INDEX_INTERVAL
            after, pos = frame.offset, frame.end - file_pos
        return pos, after, passed
    unpack = _FRAME_START.unpack_from
    crc32 = zlib.crc32
    pos = next_entry = start
    with memoryview(buf) as view:
        try:
            while True:
                length, crc, offset, _flags, key_len = unpack(buf, pos)  # struct.error: see scan_frames
                body = pos + 8
                end = body + length
                if end > n or key_len > length - 21 or offset <= after:
                    _frame_problem(buf, pos, file_pos, length, crc, offset, key_len)
                    break  # incomplete
                if crc32(view[body:end]) != crc:
                    raise BadFrame(file_pos + pos, "CRC mismatch")
                if offset >= position:
                    break
                if pos >= next_entry:
                    passed.append((offset, file_pos + pos))
                    next_entry = pos + INDEX_INTERVAL
                after = offset
                pos = end
        except struct.error:
            _check_tail(buf, pos, file_pos)
    return pos, after, passed


def encode_frames(
    records: Sequence[tuple[bytes, bytes | None]],
    offset: int,
    timestamp_ms: int,
    position: int,
    index_at: int,
) -> tuple[bytes, list[tuple[int, int]]]:
    """The frames of ``records`` (offsets from ``offset``), as one append writes them; only the last is a batch end.

    The bytes are those of :func:`encode_frame` for each record in turn. Also
    returned, for the segment's sparse index: the ``(offset, file position)``
    of the first frame at or past ``index_at`` and of one every
    :data:`INDEX_INTERVAL` bytes after it, ``position`` being the file
    position the frames are written at.
    """
    if not records:
        return b"", []
    parts: list[bytes] = []
    add = parts.append
    pack_body, pack_head, crc32 = _BODY_HEAD.pack, FRAME_HEAD.pack, zlib.crc32
    head = FRAME_HEAD.size
    entries: list[tuple[int, int]] = []
    last = len(records) - 1
    for key, value in itertools.islice(records, last):
        if value is None:
            body = pack_body(offset, timestamp_ms, _TOMBSTONE, len(key)) + key
        else:
            body = pack_body(offset, timestamp_ms, 0, len(key)) + key + value
        size = len(body)
        add(pack_head(size, crc32(body)))
        add(body)
        if position >= index_at:
            entries.append((offset, position))
            index_at = position + INDEX_INTERVAL
        position += head + size
        offset += 1
    key, value = records[last]
    add(encode_frame(offset, timestamp_ms, key, value, batch_end=True))
    if position >= index_at:
        entries.append((offset, position))
    return b"".join(parts), entries


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
