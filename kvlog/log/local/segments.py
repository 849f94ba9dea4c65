"""The segment file format: frame encoding and parsing, segment names, and the in-memory segment.

A segment is the magic ``KVLSEG1\\n`` followed by frames, ``u32 body length |
u32 crc32(body) | body`` (little-endian). A *record frame* holds one record,
``body = i64 offset | i64 timestamp (ms) | u8 flags | u32 key length | key |
value``; a *batch frame* (flag 4) holds the records of one append group in
columns, ``body = i64 first offset | i64 timestamp | u8 flags | u32 count |
u32 keys bytes | u32 values bytes | keys | values [| offsets]``, each column
a msgpack array, so that one C call decodes or encodes a whole column. The
full layout is in docs/design.md, "The embedded log".
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
import operator
import os
import struct
from collections.abc import Iterator, Sequence
from pathlib import Path

import msgpack

# zlib-ng's crc32 is zlib's CRC-32 (the frames' checksum), computed several
# times faster: it is a large share of a cold replay of the embedded log.
from zlib_ng.zlib_ng import crc32 as _crc32

from ..base import Record

__all__ = [
    "BATCH_FRAME_BYTES",
    "BATCH_FRAME_RECORDS",
    "FORMAT_VERSION",
    "FRAME_HEAD",
    "FRAME_OVERHEAD",
    "INDEX_INTERVAL",
    "MAGIC",
    "MAX_FRAME",
    "PREALLOCATE_BYTES",
    "READABLE_FORMATS",
    "STATE_FORMAT",
    "BadFrame",
    "Frame",
    "FrameColumns",
    "Segment",
    "base_of",
    "cleaned_name",
    "encode_batch",
    "encode_columns",
    "encode_frame",
    "encode_frames",
    "only_zeros",
    "parse_frames",
    "record_bytes",
    "scan_frames",
    "segment_name",
    "segment_of",
    "skip_frames",
    "swap_name",
]

#: The version in ``log.json`` this code writes: 2, segments may hold batch frames. An open
#: upgrades a log of format 1 (record frames only) to it before anything is written.
FORMAT_VERSION = 2
#: The ``log.json`` versions this code opens.
READABLE_FORMATS = (1, 2)
#: The version of the cleaner's files and of the old layout's clean-shutdown marker.
STATE_FORMAT = 1
#: The first bytes of every segment file.
MAGIC = b"KVLSEG1\n"
#: The head of a frame: body length, crc32(body).
FRAME_HEAD = struct.Struct("<II")
_BODY_HEAD = struct.Struct("<qqBI")  # offset, timestamp ms, flags, key length
_TOMBSTONE = 1
_BATCH_END = 2
#: A batch frame: the records of one append group, column by column.
_BATCH = 4
#: A batch frame whose offsets are not consecutive (compaction output): it has an offsets column.
_GAPS = 8
#: Every value of the frame is one msgpack object that kvlog's msgpack codec encoded (and so
#: checked): a store with that codec need not check them again on replay.
_MSGPACK_VALUES = 16
#: A batch frame's fixed fields: first offset, timestamp ms, flags, count, keys bytes, values bytes.
_BATCH_HEAD = struct.Struct("<qqBIII")
#: A batch frame's bytes beyond its records' (see record_bytes), at most: its fixed fields, two
#: array headers (5 bytes each) and an offsets column of one record.
_BATCH_OVERHEAD = _BATCH_HEAD.size + 5 + 5 + 10
#: An append group is written as batch frames of at most this many records...
BATCH_FRAME_RECORDS = 4096
#: ... and at most this many bytes of keys and values (a larger record is a frame of its own).
BATCH_FRAME_BYTES = 1 << 20
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
    offset: int,
    timestamp_ms: int,
    key: bytes,
    value: bytes | None,
    *,
    batch_end: bool = True,
    msgpack_values: bool = False,
) -> bytes:
    """Return the bytes of one record as a segment holds it (a record frame).

    ``msgpack_values``: kvlog's msgpack codec encoded the value (flag 16).
    """
    flags = (
        (_TOMBSTONE if value is None else 0)
        | (_BATCH_END if batch_end else 0)
        | (_MSGPACK_VALUES if msgpack_values else 0)
    )
    body = _BODY_HEAD.pack(offset, timestamp_ms, flags, len(key)) + key + (value or b"")
    return FRAME_HEAD.pack(len(body), _crc32(body)) + body


class Frame:
    """One decoded record and where its frame lies in its segment (``position`` to ``end``, file positions).

    The records of a batch frame share its position and end; ``batch_end``
    is set on the last record of a frame that ends an append group, and
    ``size`` is the bytes the record itself takes (see :func:`record_bytes`).
    """

    __slots__ = (
        "batch_end",
        "batched",
        "end",
        "key",
        "last",
        "msgpack_values",
        "offset",
        "position",
        "size",
        "timestamp",
        "value",
    )

    def __init__(
        self,
        position: int,
        end: int,
        offset: int,
        timestamp: int,
        key: bytes,
        value: bytes | None,
        batch_end: bool,
        size: int = -1,
        last: bool = True,
        batched: bool = False,
        msgpack_values: bool = False,
    ) -> None:
        self.position, self.end = position, end
        self.offset, self.timestamp, self.key, self.value = offset, timestamp, key, value
        self.batch_end = batch_end
        self.size = end - position if size < 0 else size
        #: Whether this is the last record of its frame (always, for a record frame).
        self.last = last
        #: Whether the record is in a batch frame (compaction keeps it in one: see record_bytes).
        self.batched = batched
        #: Whether its frame says kvlog's msgpack codec encoded the value (flag 16).
        self.msgpack_values = msgpack_values


def _packed_bytes(data: bytes | None) -> int:
    """The bytes msgpack takes for ``data`` as a bin (``None``: nil)."""
    if data is None:
        return 1
    n = len(data)
    return n + (2 if n < 256 else 3 if n < 65536 else 5)


def record_bytes(key: bytes, value: bytes | None) -> int:
    """The bytes a record takes in a batch frame: its key and value with their msgpack headers.

    What the dirt sample counts for it (a record frame's record takes its
    whole frame, :data:`FRAME_OVERHEAD` more than its key and value); the
    frame's own fixed fields, shared by its records, are not counted. The
    count must not change when compaction rewrites the record, so compaction
    writes a record of a batch frame to a batch frame again (one of one
    record, if need be) and one of a record frame to a record frame.
    """
    return _packed_bytes(key) + _packed_bytes(value)


class BadFrame(Exception):
    """A complete frame that is wrong (bad length, CRC or offset order), at file position ``position``.

    Internal to the log: callers turn it into a
    :class:`~kvlog.errors.LogCorruptError` or a recovery cut.
    """

    def __init__(self, position: int, reason: str) -> None:
        super().__init__(reason)
        self.position, self.reason = position, reason


def parse_frames(buf: bytes, start: int, file_pos: int, max_frame: int, after: int) -> Iterator[Frame]:
    """Yield the records of the complete, valid frames of ``buf`` from ``start``; stop at the first incomplete one.

    ``file_pos`` is the file position of ``buf[0]``; ``after`` the offset the
    first record must exceed. Raises :class:`BadFrame` at a frame that is
    complete but wrong (bad length, CRC, offset order, or batch columns).
    A batch frame yields one :class:`Frame` per record.
    """
    unpack_frame, unpack_body = FRAME_HEAD.unpack_from, _BODY_HEAD.unpack_from
    head, body_head = FRAME_HEAD.size, _BODY_HEAD.size
    crc32, n = _crc32, len(buf)
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
        if flags & _BATCH:
            offsets, keys, values, _ = _batch_columns(memoryview(body), file_pos + pos)
            last = len(offsets) - 1
            ends_batch = bool(flags & _BATCH_END)
            trusted = bool(flags & _MSGPACK_VALUES)
            for i, (at, key, value) in enumerate(zip(offsets, keys, values, strict=True)):
                yield Frame(
                    file_pos + pos,
                    file_pos + end,
                    at,
                    timestamp,
                    key,
                    value,
                    ends_batch and i == last,
                    record_bytes(key, value),
                    i == last,
                    True,
                    trusted,
                )
            after = offsets[-1]
        else:
            key = body[body_head : body_head + key_len]
            value = None if flags & _TOMBSTONE else body[body_head + key_len :]
            yield Frame(
                file_pos + pos,
                file_pos + end,
                offset,
                timestamp,
                key,
                value,
                bool(flags & _BATCH_END),
                msgpack_values=bool(flags & _MSGPACK_VALUES),
            )
            after = offset
        pos = end


_unpackb = msgpack.unpackb
_BYTES = frozenset((bytes,))
_VALUE_TYPES = frozenset((bytes, type(None)))
_INTS = frozenset((int,))
_NONE_TYPE = type(None)


def _batch_columns(
    body: memoryview, position: int
) -> tuple[Sequence[int], list[bytes], list[bytes | None], bool]:
    """The offsets, keys and values of the batch frame whose body (its CRC checked) is ``body``; whether it has tombstones.

    ``position`` is the frame's file position, for the error. Every column is
    decoded and checked whole, in C: a frame whose columns do not fill it
    exactly, are not msgpack arrays of ``count`` bins (values: bins or nils),
    or whose offsets do not start at its first offset and increase, raises
    :class:`BadFrame`. Such a frame has a good CRC, so only a writer that
    did not follow the format can have made it.
    """
    size = len(body)
    if size < _BATCH_HEAD.size:
        raise BadFrame(position, f"batch frame of {size} bytes is shorter than its fixed fields")
    offset, _timestamp, flags, count, keys_bytes, values_bytes = _BATCH_HEAD.unpack_from(body)
    keys_at = _BATCH_HEAD.size
    values_at = keys_at + keys_bytes
    offsets_at = values_at + values_bytes
    if count == 0 or offsets_at > size or (offsets_at < size) != bool(flags & _GAPS):
        raise BadFrame(position, f"batch frame columns ({count} records) do not fill its {size} bytes")
    try:
        keys = _unpackb(body[keys_at:values_at])
        values = _unpackb(body[values_at:offsets_at])
        offsets = _unpackb(body[offsets_at:]) if flags & _GAPS else range(offset, offset + count)
    except Exception:  # noqa: BLE001 - whatever msgpack raises, the column is not what the format says
        raise BadFrame(position, "batch frame columns are not msgpack arrays") from None
    if (
        type(keys) is not list
        or type(values) is not list
        or type(offsets) not in (list, range)
        or len(keys) != count
        or len(values) != count
        or len(offsets) != count
        or not _BYTES.issuperset(map(type, keys))
        or not _VALUE_TYPES.issuperset(value_types := set(map(type, values)))
    ):
        raise BadFrame(position, f"batch frame columns are not {count} keys, values and offsets")
    if type(offsets) is list and (
        not _INTS.issuperset(map(type, offsets))
        or offsets[0] != offset
        or not all(map(operator.lt, offsets, itertools.islice(offsets, 1, None)))
    ):
        raise BadFrame(position, "batch frame offsets do not start at its first offset and increase")
    return offsets, keys, values, _NONE_TYPE in value_types


class FrameColumns:
    """Records of one partition read by replay, column by column, in log order.

    ``offsets[i]``, ``keys[i]`` and ``values[i]`` are the i-th record's; a
    value of ``None`` is a tombstone. No object is made per record beyond its
    key and value bytes: the cache checks whole columns and hands them to LMDB
    in one call (see :meth:`kvlog.cache.Cache.apply_columns`).
    """

    __slots__ = ("keys", "msgpack_values", "offsets", "partition", "tombstones", "values")

    def __init__(self, partition: int) -> None:
        self.partition = partition
        self.offsets: list[int] = []
        self.keys: list[bytes] = []
        self.values: list[bytes | None] = []
        #: The indexes of the tombstones, ascending.
        self.tombstones: list[int] = []
        #: Whether every record's frame says kvlog's msgpack codec encoded its value (flag 16).
        self.msgpack_values = True

    @property
    def values_codec(self) -> str | None:
        """``"msgpack"`` if kvlog's msgpack codec encoded (and so checked) every value, else None."""
        return "msgpack" if self.msgpack_values else None

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
    if _crc32(memoryview(buf)[pos + FRAME_HEAD.size : end]) != crc:
        raise BadFrame(file_pos + pos, "CRC mismatch")
    raise BadFrame(file_pos + pos, f"offset {offset} out of order or key length {key_len} invalid")


def _check_tail(buf: bytes, pos: int, file_pos: int) -> None:
    """At fewer bytes than a frame's fixed fields: an incomplete frame, unless its length is impossible."""
    if pos + FRAME_HEAD.size <= len(buf):
        length = FRAME_HEAD.unpack_from(buf, pos)[0]
        if length < _BODY_HEAD.size or length > MAX_FRAME:
            raise BadFrame(file_pos + pos, f"impossible frame length {length}")


def scan_frames(
    buf: bytes,
    start: int,
    file_pos: int,
    after: int,
    limit: int,
    columns: FrameColumns,
    position: int = -1,
) -> tuple[int, int]:
    """Append up to ``limit`` records of the complete, valid frames of ``buf`` from ``start`` to ``columns``.

    The records taken and the errors raised are those of :func:`parse_frames`
    with ``max_frame=MAX_FRAME`` (``file_pos`` is the file position of
    ``buf[0]``, ``after`` the offset the first frame must exceed): it stops at
    the first incomplete frame and raises :class:`BadFrame` at a complete one
    that is wrong. Records below ``position`` are left out: a reader whose
    position lies inside a batch frame starts at that frame (see
    :func:`skip_frames`). It is replay's loop: one ``unpack_from`` reads a
    frame's fixed fields, a memoryview slice feeds its CRC, the rare cases (a
    bad or incomplete frame) are told apart only after one combined test
    fails, and a batch frame's columns are decoded whole (:func:`_batch_columns`).

    Returns:
        The position in ``buf`` after the last frame taken whole (a batch
        frame ``limit`` cut is read again from its start by the next call), and
        the offset of the last record taken (``after`` if none was).
    """
    n = len(buf)
    if n - start > MAX_FRAME + FRAME_HEAD.size:
        # Only here could a frame longer than MAX_FRAME end inside the buffer,
        # which the combined test below relies on never happening.
        return _scan_frames_generally(buf, start, file_pos, after, limit, columns, position)
    unpack = _FRAME_START.unpack_from
    crc32 = _crc32
    offsets, keys, values = columns.offsets, columns.keys, columns.values
    stop = len(offsets) + limit
    pos = start
    with memoryview(buf) as view:
        try:
            while len(offsets) < stop:
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
                if not flags & 16:  # _MSGPACK_VALUES
                    columns.msgpack_values = False  # (taking no record of it would not need it)
                if flags & 4:  # _BATCH
                    frame_offsets, frame_keys, frame_values, tombstones = _batch_columns(
                        view[body:end], file_pos + pos
                    )
                    first = bisect.bisect_left(frame_offsets, position) if offset < position else 0
                    last = first + stop - len(offsets)
                    if first == 0 and last >= len(frame_offsets):
                        _extend(columns, frame_offsets, frame_keys, frame_values, tombstones)
                    else:
                        taken = frame_offsets[first:last]
                        _extend(columns, taken, frame_keys[first:last], frame_values[first:last], tombstones)
                        if last < len(frame_offsets):
                            # The rest of this frame is for the next call, which starts at it.
                            after = taken[-1]
                            break
                    after = frame_offsets[-1]
                    pos = end
                    continue
                if offset >= position:
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


def _extend(
    columns: FrameColumns,
    offsets: Sequence[int],
    keys: list[bytes],
    values: list[bytes | None],
    any_tombstone: bool,
) -> None:
    """Add a batch frame's records to ``columns``: whole columns at a time, the tombstones found in C.

    ``any_tombstone``: whether the frame (of which these may be a part) has any.
    """
    base = len(columns.offsets)
    columns.offsets.extend(offsets)
    columns.keys.extend(keys)
    if any_tombstone:
        at = -1
        tombstones = columns.tombstones
        with contextlib.suppress(ValueError):
            while True:
                at = values.index(None, at + 1)
                tombstones.append(base + at)
    columns.values.extend(values)


def _scan_frames_generally(
    buf: bytes, start: int, file_pos: int, after: int, limit: int, columns: FrameColumns, position: int = -1
) -> tuple[int, int]:
    pos = start
    if limit <= 0:
        return pos, after
    taken = 0
    for frame in parse_frames(buf, start, file_pos, MAX_FRAME, after):
        if frame.offset >= position:
            if taken >= limit:
                break  # inside a batch frame: it is read again from its start
            if frame.value is None:
                columns.tombstones.append(len(columns.offsets))
            if not frame.msgpack_values:
                columns.msgpack_values = False
            columns.offsets.append(frame.offset)
            columns.keys.append(frame.key)
            columns.values.append(frame.value)
            taken += 1
        after = frame.offset
        if frame.last:
            pos = frame.end - file_pos
            if taken >= limit:
                break
    return pos, after


def skip_frames(
    buf: bytes, start: int, file_pos: int, after: int, position: int
) -> tuple[int, int, list[tuple[int, int]]]:
    """Pass the frames of ``buf`` from ``start`` whose records are all below ``position``.

    A reader that entered a segment before its position steps over those
    frames with this; they are checked as :func:`scan_frames` checks them (a
    bad one raises :class:`BadFrame`; the first frame not passed is left to
    the :func:`scan_frames` that follows), but nothing of them is kept except,
    for the segment's sparse index, the ``(offset, file position)`` of the
    first one and of one every :data:`INDEX_INTERVAL` bytes after it. A batch
    frame holding ``position`` is not passed: :func:`scan_frames` leaves out
    its records below it.

    Returns:
        The position in ``buf`` of the first frame not passed (one with a
        record at or past ``position``, or incomplete), the offset of the last
        record passed (``after`` if none) and the index entries.
    """
    n = len(buf)
    passed: list[tuple[int, int]] = []
    if n - start > MAX_FRAME + FRAME_HEAD.size:
        return _skip_frames_generally(buf, start, file_pos, after, position)
    unpack = _FRAME_START.unpack_from
    crc32 = _crc32
    pos = next_entry = start
    with memoryview(buf) as view:
        try:
            while True:
                length, crc, offset, flags, key_len = unpack(buf, pos)  # struct.error: see scan_frames
                body = pos + 8
                end = body + length
                if end > n or key_len > length - 21 or offset <= after:
                    _frame_problem(buf, pos, file_pos, length, crc, offset, key_len)
                    break  # incomplete
                if offset >= position:
                    # Nothing of this frame is passed: scan_frames, which reads
                    # it next, checks it (checking it here too would decode
                    # the first batch frame of every chunk twice).
                    break
                if crc32(view[body:end]) != crc:
                    raise BadFrame(file_pos + pos, "CRC mismatch")
                last = offset
                if flags & 4:  # _BATCH: checked as scan_frames checks it
                    last = _batch_columns(view[body:end], file_pos + pos)[0][-1]
                if last >= position:
                    break
                if pos >= next_entry:
                    passed.append((offset, file_pos + pos))
                    next_entry = pos + INDEX_INTERVAL
                after = last
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
    pack_body, pack_head, crc32 = _BODY_HEAD.pack, FRAME_HEAD.pack, _crc32
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


def _skip_frames_generally(
    buf: bytes, start: int, file_pos: int, after: int, position: int
) -> tuple[int, int, list[tuple[int, int]]]:
    passed: list[tuple[int, int]] = []
    pos, next_entry = start, start
    first = -1  # the first offset of the frame being passed
    for frame in parse_frames(buf, start, file_pos, MAX_FRAME, after):
        if frame.offset >= position:
            break
        if first < 0:
            first = frame.offset
        if not frame.last:
            continue
        if frame.position - file_pos >= next_entry:
            passed.append((first, frame.position))
            next_entry = frame.position - file_pos + INDEX_INTERVAL
        after, pos, first = frame.offset, frame.end - file_pos, -1
    return pos, after, passed


_packb = msgpack.packb
_first_item, _second_item = operator.itemgetter(0), operator.itemgetter(1)
#: The types a key or value may have (msgpack packs each as a bin, as concatenation took them before).
_BYTES_LIKE = (bytes, bytearray, memoryview)


def _check_types(keys: Sequence[object], values: Sequence[object]) -> None:
    """Raise TypeError unless every key is bytes-like and every value bytes-like or None.

    msgpack would pack a ``str`` as a string, which no reader takes for a key or value.
    """
    types = set(map(type, keys))
    value_types = set(map(type, values))
    value_types.discard(type(None))
    if not all(issubclass(t, _BYTES_LIKE) for t in types | value_types):
        raise TypeError("the keys and values of a log record must be bytes (a value may be None)")


def _chunks(keys: Sequence[bytes], values: Sequence[bytes | None]) -> list[tuple[int, int]]:
    """Split ``[0, len(keys))`` into the ranges of records each batch frame holds.

    At most :data:`BATCH_FRAME_RECORDS` records and :data:`BATCH_FRAME_BYTES`
    bytes of keys and values a frame; a larger record has a frame of its own.
    """
    n = len(keys)
    if n <= BATCH_FRAME_RECORDS and (
        sum(map(len, keys)) + sum(map(len, filter(None, values))) <= BATCH_FRAME_BYTES
    ):
        return [(0, n)]
    chunks = []
    start = size = 0
    for i, (key, value) in enumerate(zip(keys, values, strict=True)):
        record = len(key) + (len(value) if value is not None else 0)
        if i > start and (i - start >= BATCH_FRAME_RECORDS or size + record > BATCH_FRAME_BYTES):
            chunks.append((start, i))
            start, size = i, 0
        size += record
    chunks.append((start, n))
    return chunks


def encode_batch(
    records: Sequence[tuple[bytes, bytes | None]],
    offset: int,
    timestamp_ms: int,
    position: int,
    index_at: int,
    *,
    msgpack_values: bool = False,
) -> tuple[bytes, list[tuple[int, int]]]:
    """The frames of ``records`` (offsets from ``offset``), as one append writes them.

    Batch frames (see :func:`encode_columns`); returns the bytes and the
    sparse-index entries, as :func:`encode_frames` does.
    """
    keys = list(map(_first_item, records))
    values = list(map(_second_item, records))
    return encode_columns(
        offset, keys, values, timestamp_ms, position, index_at, msgpack_values=msgpack_values
    )


def encode_columns(
    offsets: int | Sequence[int],
    keys: Sequence[bytes],
    values: Sequence[bytes | None],
    timestamp_ms: int,
    position: int,
    index_at: int,
    *,
    batch_end: bool = True,
    msgpack_values: bool = False,
) -> tuple[bytes, list[tuple[int, int]]]:
    """The frames of the records ``keys[i]: values[i]`` at ``offsets`` (an int: consecutive from it).

    The records go to batch frames of at most :data:`BATCH_FRAME_RECORDS`
    records and :data:`BATCH_FRAME_BYTES` bytes (a larger record is a batch
    frame of its own). A record too large for a batch frame within
    :data:`MAX_FRAME` (near ``max_record_bytes``' bound) is a record frame
    (:func:`encode_frame`). Only the last frame carries the batch-end flag
    (with ``batch_end``); every frame carries flag 16 with ``msgpack_values``
    (kvlog's msgpack codec encoded every value). Each column of a batch frame
    is one msgpack call and the frame one crc32: no Python statement runs per
    record.

    Also returned, for the segment's sparse index: the ``(offset, file
    position)`` of the first frame at or past ``index_at`` and of one every
    :data:`INDEX_INTERVAL` bytes after it, ``position`` being the file
    position the frames are written at.

    Raises:
        TypeError: a key or value is not bytes (a value may be None).
        ValueError: ``offsets`` do not increase.
    """
    n = len(keys)
    if not n:
        return b"", []
    _check_types(keys, values)
    if not isinstance(offsets, int) and not all(
        map(operator.lt, offsets, itertools.islice(offsets, 1, None))
    ):
        raise ValueError("the offsets of the records of a frame must increase")
    parts: list[bytes] = []
    entries: list[tuple[int, int]] = []
    chunks = _chunks(keys, values)
    last_chunk = len(chunks) - 1
    for c, (i, j) in enumerate(chunks):
        ends = batch_end and c == last_chunk
        if isinstance(offsets, int):
            first, chunk_offsets = offsets + i, None
        else:
            first = offsets[i]
            # Consecutive offsets need no column.
            chunk_offsets = None if offsets[j - 1] - first == j - i - 1 else list(offsets[i:j])
        if position >= index_at:
            entries.append((first, position))
            index_at = position + INDEX_INTERVAL
        if j - i == 1 and record_bytes(keys[i], values[i]) > MAX_FRAME - _BATCH_OVERHEAD:
            frame = encode_frame(
                first, timestamp_ms, keys[i], values[i], batch_end=ends, msgpack_values=msgpack_values
            )
            parts.append(frame)
            position += len(frame)
            continue
        chunk_keys = keys if j - i == n else keys[i:j]
        chunk_values = values if j - i == n else values[i:j]
        packed_keys = _packb(chunk_keys)
        packed_values = _packb(chunk_values)
        packed_offsets = b"" if chunk_offsets is None else _packb(chunk_offsets)
        flags = (
            _BATCH
            | (_BATCH_END if ends else 0)
            | (_GAPS if chunk_offsets is not None else 0)
            | (_MSGPACK_VALUES if msgpack_values else 0)
        )
        head = _BATCH_HEAD.pack(first, timestamp_ms, flags, j - i, len(packed_keys), len(packed_values))
        crc = _crc32(packed_offsets, _crc32(packed_values, _crc32(packed_keys, _crc32(head))))
        size = len(head) + len(packed_keys) + len(packed_values) + len(packed_offsets)
        parts += (FRAME_HEAD.pack(size, crc), head, packed_keys, packed_values, packed_offsets)
        position += FRAME_HEAD.size + size
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
