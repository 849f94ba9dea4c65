"""The embedded compacted log: Kafka's log layout, on local files, for one machine.

``KVLog("./data")`` uses it when no broker is named. It behaves like a
compacted Kafka topic behind the same :class:`~kvlog.log.Log` interface:
partitions, offsets that only grow and survive compaction, tombstones that
compaction drops after a retention period.

On disk (``data/log/``)::

    LOCK                       flock()ed by the one process that writes; holds its pid
    log.json                   format version, log id (part of the cache identity), partitions
    cleaner-checkpoint.json    per partition, the offset up to which the log was compacted,
                               and when compaction dropped tombstones up to which offset
    cleaner-sample.json        per partition, the key sample the dirty ratio is estimated from
                               and the log end and segments it describes (saved at close, after
                               compaction and every few seconds of rolls; an estimate: when it is
                               missing or stale the records it lacks are counted again)
    0/00000000000000000000.log a segment of partition 0, named by its base offset
    0/00000000000000004096.log ... the last segment of a partition is the active one

A segment starts with the 8-byte magic ``KVLSEG1\\n`` followed by frames::

    u32 body length | u32 crc32(body) | body
    body = i64 offset | i64 timestamp (ms) | u8 flags | u32 key length | key | value
    flags: 1 = tombstone, 2 = the last record of an append() batch

(little-endian). Segment ``i`` covers offsets ``[base_i, base_i+1)``; records
inside it are in offset order, with gaps where compaction removed records.

Durability (``fsync``): a write returns after its frames are written to the
OS (``os.write`` on an unbuffered descriptor, so a killed *process* never
loses an acknowledged record) and, with the default ``"always"``, after
``fdatasync``, so an OS crash or power cut does not lose it either.
``"interval"`` syncs every ``fsync_interval`` seconds in the background (an
OS crash may lose up to that much); ``"never"`` leaves it to the OS.

Crash recovery on open: closed segments were synced when they were rolled, so
only the last segment is scanned; a torn or corrupt tail (short frame, bad
length, bad CRC, out-of-order offset) is truncated back to the last good
record, counted in :attr:`LocalLog.recovery` and logged. A bad frame inside a
closed segment is reported when it is read (:class:`~kvlog.errors.LogCorruptError`).

Compaction rewrites closed segments keeping, for every key, only its latest
record anywhere in the log, and dropping tombstones older than
``tombstone_retention``; offsets are kept. Consecutive small segments are
merged. A segment where nothing would change (no record superseded, no
tombstone to drop, nothing to merge with) is left as it is. The swap is
atomic: write ``<base>.cleaned``, fsync, rename it to ``<base>-<end>.swap``
(the commit point), fsync the directory, delete the segments it replaces and
rename it to ``<base>.log``; an open finds a ``.swap`` and finishes it, or a
``.cleaned`` and deletes it.

The background cleaner runs a pass when the dirty ratio of a partition (the
share of its closed bytes a pass would remove) reaches
``min_cleanable_dirty_ratio``. Knowing which records are superseded takes
every key; the ratio is estimated from a sample of keys chosen by hash
(:class:`_DirtSample`: exact up to a few thousand keys per partition, bounded
memory beyond), which appends keep up to date and each pass recounts.

Reading: a reader entering a segment at or before its first record starts
right after the magic; one positioned inside a segment starts at the nearest
entry of a sparse in-memory index and skips the frames before its position
(outside the log's lock), indexing what it passed.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import fcntl
import json
import logging
import operator
import os
import struct
import threading
import time
import uuid
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from .. import _fork
from .._files import (
    DEFAULT_FILE_MODE,
    check_file_mode,
    fsync_dir,
    make_dirs,
    open_file,
    write_file_atomically,
)
from ..errors import ClosedError, LogCorruptError, LogLockedError, RecordTooLargeError, WriteError
from . import Log, LogReader, PositionOutOfRangeError, Record

__all__ = ["FSYNC_POLICIES", "LocalLog", "LocalReader"]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MAGIC = b"KVLSEG1\n"
_FRAME_HEAD = struct.Struct("<II")  # body length, crc32(body)
_BODY_HEAD = struct.Struct("<qqBI")  # offset, timestamp ms, flags, key length
_TOMBSTONE = 1
_BATCH_END = 2
#: Bytes a record costs beyond its key and value.
FRAME_OVERHEAD = _FRAME_HEAD.size + _BODY_HEAD.size

FSYNC_POLICIES = ("always", "interval", "never")
#: A sparse index entry every this many bytes of a segment.
_INDEX_INTERVAL = 64 * 1024
#: Bytes read from a segment per system call when replaying.
_READ_CHUNK = 4 * 1024 * 1024
#: Frames longer than this are corruption. Fixed, not derived from
#: max_record_bytes: reopening with a smaller limit must not cut good records.
_MAX_FRAME = 1 << 30
#: Compaction passes that dropped tombstones remembered per partition.
_DROPS_KEPT = 256
#: Keys the dirt sample of a partition follows at most (a log with fewer is measured exactly).
_SAMPLE_KEYS = 4096
#: Records a scan hands to a dirt sample per hold of the log's lock.
_OBSERVE_BATCH = 4096
#: Seconds between saves of the dirt samples by the background cleaner.
_SAMPLE_SAVE_INTERVAL = 5.0
#: The fields of a compaction report that add up over partitions.
_REPORT_FIELDS = (
    "segments_before",
    "segments_after",
    "segments_rewritten",
    "records_before",
    "records_after",
    "bytes_before",
    "bytes_after",
    "bytes_rewritten",
    "tombstones_dropped",
)


#: fdatasync where the OS has it (Linux); macOS has only fsync.
_datasync = getattr(os, "fdatasync", os.fsync)


def _segment_name(base: int) -> str:
    return f"{base:020d}.log"


def _write_json_atomically(path: Path, data: Mapping[str, Any]) -> None:
    write_file_atomically(path, json.dumps(data, sort_keys=True).encode(), sync=True)


def encode_frame(
    offset: int, timestamp_ms: int, key: bytes, value: bytes | None, *, batch_end: bool = True
) -> bytes:
    """Return the bytes of one record as a segment holds it."""
    flags = (_TOMBSTONE if value is None else 0) | (_BATCH_END if batch_end else 0)
    body = _BODY_HEAD.pack(offset, timestamp_ms, flags, len(key)) + key + (value or b"")
    return _FRAME_HEAD.pack(len(body), zlib.crc32(body)) + body


class _Frame:
    """One decoded frame and where it lies in its segment."""

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


class _BadFrame(Exception):
    def __init__(self, position: int, reason: str) -> None:
        super().__init__(reason)
        self.position, self.reason = position, reason


def _parse(buf: bytes, start: int, file_pos: int, max_frame: int, after: int) -> Iterator[_Frame]:
    """Yield the complete, valid frames of ``buf`` from ``start``; stop at the first incomplete one.

    ``file_pos`` is the file position of ``buf[0]``; ``after`` the offset the
    first frame must exceed. Raises :class:`_BadFrame` at a frame that is
    complete but wrong (bad length, CRC, or offset order).
    """
    unpack_frame, unpack_body = _FRAME_HEAD.unpack_from, _BODY_HEAD.unpack_from
    head, body_head = _FRAME_HEAD.size, _BODY_HEAD.size
    crc32, n = zlib.crc32, len(buf)
    pos = start
    while pos + head <= n:
        length, crc = unpack_frame(buf, pos)
        if length < body_head or length > max_frame:
            raise _BadFrame(file_pos + pos, f"impossible frame length {length}")
        end = pos + head + length
        if end > n:
            return
        body = buf[pos + head : end]
        if crc32(body) != crc:
            raise _BadFrame(file_pos + pos, "CRC mismatch")
        offset, timestamp, flags, key_len = unpack_body(body)
        if offset <= after or body_head + key_len > length:
            raise _BadFrame(file_pos + pos, f"offset {offset} out of order or key length {key_len} invalid")
        key = body[body_head : body_head + key_len]
        value = None if flags & _TOMBSTONE else body[body_head + key_len :]
        yield _Frame(file_pos + pos, file_pos + end, offset, timestamp, key, value, bool(flags & _BATCH_END))
        after = offset
        pos = end


class _Segment:
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
        self.replaced = False

    def note(self, offset: int, position: int) -> None:
        """Index a frame (sparsely) as it is appended or written, past every frame indexed so far."""
        if not self.index_positions or position - self.index_positions[-1] >= _INDEX_INTERVAL:
            self.index_offsets.append(offset)
            self.index_positions.append(position)

    def hint(self, entries: Sequence[tuple[int, int]]) -> None:
        """Add ``(offset, position)`` frames a reader passed while seeking (callers hold the log's lock)."""
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


def _base_of(segments: Sequence[_Segment], offset: int) -> int:
    """The base offset of the segment of ``segments`` (ascending) that holds ``offset``."""
    if offset >= segments[-1].base:
        return segments[-1].base
    return segments[bisect.bisect_right(segments, offset, key=_base) - 1].base


#: Multiplying by this odd number spreads every bit of a crc32 into the high bits.
_HASH_MIX = 0x9E3779B1
_HASH_MASK = 0xFFFFFFFF
#: Ranks of a 32-bit hash: its leading zero bits, 0..32.
_RANKS = 33


def _key_hash(key: bytes) -> int:
    """A 32-bit hash of a key, the same in every process; its leading zero bits are its rank."""
    return (zlib.crc32(key) * _HASH_MIX) & _HASH_MASK


#: A record shown to a dirt sample: key, _key_hash(key), offset, frame bytes,
#: and the timestamp of a tombstone (-1 for a value).
_Seen = tuple[bytes, int, int, int, int]


class _DirtSample:
    """Estimates the bytes a compaction pass would remove from one partition, from a sample of its keys.

    A pass removes every record that a later record of its key supersedes,
    and the tombstones older than the retention; which records those are only
    a look at every key tells. The sample follows the keys whose hash has at
    least ``level`` leading zero bits (a share 2**-level of all keys, the same
    keys in every process): the newest record of each, and per segment the
    bytes of their records that a newer one superseded. Scaled by 2**level
    that estimates the whole. ``level`` rises whenever more than _SAMPLE_KEYS
    keys are followed, so memory stays bounded and a log with fewer keys is
    measured exactly.

    Records may be shown in any order (a scan of old records while appends go
    on): offsets decide which record of a key is the newest. Each record must
    be shown exactly once; ``pending`` lists the offset ranges not shown yet.
    Callers hold the log's lock.
    """

    __slots__ = ("dead", "latest", "level", "pending")

    def __init__(self, pending: list[tuple[int, int]]) -> None:
        self.level = 0
        #: Key id (see _key_id; its low 32 bits are the key's hash) -> offset,
        #: frame bytes and tombstone timestamp (-1: a value) of the key's newest record.
        self.latest: dict[int, tuple[int, int, int]] = {}
        #: Segment base offset -> bytes of superseded records of followed keys in it, by rank.
        self.dead: dict[int, list[int]] = {}
        self.pending = pending

    @property
    def threshold(self) -> int:
        """The keys whose _key_hash is below this are followed."""
        return 1 << (32 - self.level)

    @staticmethod
    def _key_id(key: bytes, h: int) -> int:
        return h | zlib.adler32(key) << 32 | len(key) << 64

    def observe(self, seen: Iterable[_Seen], segments: Sequence[_Segment]) -> None:
        """Count records (``segments``: the partition's segments now, to place superseded ones)."""
        latest, dead, level = self.latest, self.dead, self.level
        adler32 = zlib.adler32
        active = segments[-1].base
        active_counts = dead.get(active)
        if active_counts is None:
            active_counts = dead[active] = [0] * _RANKS
        for key, h, offset, size, tombstone in seen:
            rank = 32 - h.bit_length()
            if rank < level:
                continue
            ident = h | adler32(key) << 32 | len(key) << 64
            prev = latest.get(ident)
            if prev is None:
                latest[ident] = (offset, size, tombstone)
                if len(latest) > _SAMPLE_KEYS:
                    self._raise_level()
                    latest, level = self.latest, self.level
                continue
            if prev[0] < offset:
                latest[ident] = (offset, size, tombstone)
                offset, size = prev[0], prev[1]  # the superseded one
            elif prev[0] == offset:
                continue  # shown twice
            if offset >= active:
                active_counts[rank] += size
                continue
            base = _base_of(segments, offset)
            counts = dead.get(base)
            if counts is None:
                counts = dead[base] = [0] * _RANKS
            counts[rank] += size

    def _raise_level(self) -> None:
        while len(self.latest) > _SAMPLE_KEYS:
            self.level += 1
            limit = 1 << (32 - self.level)
            self.latest = {k: v for k, v in self.latest.items() if k & _HASH_MASK < limit}
        # Counts of lower ranks stay but are no longer summed.

    def replaced(self, bases: Sequence[int], into: int, counted: Mapping[int, Sequence[int]]) -> None:
        """Compaction replaced the segments at ``bases`` by one at ``into``, without the superseded records.

        ``counted``: the superseded bytes per segment when the pass started,
        which is what it removed; what was counted since stays.
        """
        left = [0] * _RANKS
        for base in bases:
            now = self.dead.pop(base, None)
            if now is not None:
                before = counted.get(base, ())
                for rank, size in enumerate(now):
                    left[rank] += max(0, size - (before[rank] if rank < len(before) else 0))
        if any(left):
            self.dead[into] = left

    def dropped(self, key: bytes, h: int, offset: int, size: int, base: int) -> None:
        """Compaction dropped this tombstone (newest of its key when the pass started) from the segment at ``base``."""
        rank = 32 - h.bit_length()
        if rank < self.level:
            return
        ident = self._key_id(key, h)
        prev = self.latest.get(ident)
        if prev is None:
            return
        if prev[0] == offset:
            del self.latest[ident]
        elif prev[0] > offset and base in self.dead:
            # Superseded since the pass started, and counted so: gone now.
            counts = self.dead[base]
            counts[rank] = max(0, counts[rank] - size)

    def estimate(self, below: int, horizon: int) -> int:
        """Bytes a pass would remove below offset ``below`` (the closed segments), tombstones before ``horizon`` (ms)."""
        level = self.level
        total = sum(sum(counts[level:]) for base, counts in self.dead.items() if base < below)
        total += sum(
            size for offset, size, ts in self.latest.values() if 0 <= ts < horizon and offset < below
        )
        return total << level

    def to_json(self) -> dict[str, Any]:
        return {
            "level": self.level,
            "pending": [list(r) for r in self.pending],
            "latest": [[ident, *entry] for ident, entry in self.latest.items()],
            "dead": [[base, counts] for base, counts in self.dead.items() if any(counts)],
        }

    @classmethod
    def from_json(cls, state: Mapping[str, Any]) -> _DirtSample:
        """The sample :meth:`to_json` saved (ValueError, TypeError or KeyError if it is not one)."""
        sample = cls([(int(a), int(b)) for a, b in state["pending"]])
        sample.level = int(state["level"])
        if not 0 <= sample.level <= 32:
            raise ValueError(f"level {sample.level}")
        for ident, offset, size, tombstone in state["latest"]:
            sample.latest[int(ident)] = (int(offset), int(size), int(tombstone))
        for base, counts in state["dead"]:
            if len(counts) != _RANKS:
                raise ValueError("dead counts")
            sample.dead[int(base)] = [int(c) for c in counts]
        return sample


class LocalReader(LogReader):
    """Reads every partition of a :class:`LocalLog` from given positions."""

    def __init__(self, local_log: LocalLog, positions: Mapping[int, int]) -> None:
        self._log = local_log
        self._positions = {p: positions[p] for p in range(local_log.partitions)}
        # Per partition: (segment, open file descriptor, file position of the next frame).
        self._cursors: dict[int, tuple[_Segment, int, int] | None] = dict.fromkeys(self._positions)
        self._next_partition = 0
        self._closed = False
        self._woken = False
        with local_log._cond:
            for p, position in self._positions.items():
                local_log._check_position(p, position)

    def positions(self) -> dict[int, int]:
        return dict(self._positions)

    def poll(self, timeout: float, max_records: int) -> list[Record]:
        lg = self._log
        deadline = time.monotonic() + timeout
        with lg._cond:
            while True:
                if self._closed or lg._closed:
                    raise ClosedError(f"{lg.describe()} is closed")
                if any(self._positions[p] < lg._end[p] for p in self._positions):
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._woken:
                    self._woken = False
                    return []
                lg._cond.wait(remaining)
        records: list[Record] = []
        n = lg.partitions
        for i in range(n):
            p = (self._next_partition + i) % n
            if len(records) >= max_records:
                break
            self._read_partition(p, records, max_records)
        self._next_partition = (self._next_partition + 1) % n
        return records

    def wakeup(self) -> None:
        with self._log._cond:
            self._woken = True
            self._log._cond.notify_all()

    def _close_cursor(self, p: int) -> None:
        cursor = self._cursors[p]
        if cursor is not None:
            os.close(cursor[1])
            self._cursors[p] = None

    def _read_partition(self, p: int, out: list[Record], max_records: int) -> None:
        lg = self._log
        while len(out) < max_records:
            with lg._cond:
                end = lg._end[p]
                if self._positions[p] >= end:
                    return
                cursor = self._cursors[p]
                if cursor is None or cursor[0].replaced:
                    # First read, or compaction replaced the segment under us:
                    # find the position again. The descriptor is opened under
                    # the lock, so it is the file the segment object describes.
                    self._close_cursor(p)
                    segment, file_pos = lg._locate(p, self._positions[p])
                    cursor = (segment, os.open(segment.path, os.O_RDONLY), file_pos)
                    self._cursors[p] = cursor
                segment, fd, file_pos = cursor
                visible = segment.size
                following = lg._following_base(p, segment)
            if file_pos >= visible:
                if following is None:
                    return  # the active segment has nothing more yet
                # Segment done: the position moves to the next segment's base,
                # past any offsets compaction removed at the segment's end.
                self._close_cursor(p)
                self._positions[p] = max(self._positions[p], following)
                continue
            # Read a large chunk, but always at least the whole first frame.
            head = os.pread(fd, _FRAME_HEAD.size, file_pos)
            if len(head) < _FRAME_HEAD.size:
                raise LogCorruptError(
                    f"{segment.path} is shorter than the log expects at position {file_pos}"
                )
            first = _FRAME_HEAD.size + _FRAME_HEAD.unpack(head)[0]
            buf = os.pread(fd, min(max(_READ_CHUNK, first), visible - file_pos), file_pos)
            position = self._positions[p]
            start = file_pos
            # Frames passed while seeking to the position are remembered in the
            # segment's sparse index, so that the next seek there starts close.
            passed: list[tuple[int, int]] = []
            next_hint = file_pos
            try:
                for frame in _parse(buf, 0, file_pos, _MAX_FRAME, -1):
                    file_pos = frame.end
                    if frame.offset < position:
                        # Seeking inside the segment to the reader's position.
                        if frame.position >= next_hint:
                            passed.append((frame.offset, frame.position))
                            next_hint = frame.position + _INDEX_INTERVAL
                        continue
                    out.append(Record(p, frame.offset, frame.key, frame.value))
                    position = frame.offset + 1
                    if len(out) >= max_records:
                        break
            except _BadFrame as bad:
                raise lg._corrupt(p, segment, bad) from None
            if file_pos == start:
                # Published bytes always end at a whole frame: one that does not fit is damage.
                raise lg._corrupt(p, segment, _BadFrame(start, "a record runs past the end of the segment"))
            if passed:
                with lg._cond:
                    segment.hint(passed)
            self._positions[p] = position
            self._cursors[p] = (segment, fd, file_pos)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            for p in list(self._cursors):
                self._close_cursor(p)


class LocalLog(Log):
    """A compacted log in a local directory (the embedded default of :class:`~kvlog.KVLog`).

    One process writes a log directory at a time (an exclusive ``flock`` on
    ``LOCK``); readers of the cache it feeds are not affected by that lock.

    Args:
        path: the log directory (created if missing).
        partitions: partition count of a new log (an existing log keeps its own).
        fsync: ``"always"`` (default; a write returns after ``fdatasync``),
            ``"interval"`` (synced every ``fsync_interval`` seconds) or
            ``"never"`` (left to the OS). Any policy survives a killed process;
            only ``"always"`` survives an OS crash without losing acknowledged writes.
        fsync_interval: seconds between syncs with ``fsync="interval"``.
        segment_bytes: roll to a new segment past this size (only closed
            segments are compacted).
        max_record_bytes: the largest key + value accepted (1 MiB, Kafka's default).
        tombstone_retention: seconds compaction keeps a tombstone (Kafka's
            ``delete.retention.ms``, 24 h by default).
        min_cleanable_dirty_ratio: compact a partition in the background once
            compaction would remove this share of its closed segments' bytes
            (superseded records and tombstones past the retention; see
            :meth:`dirty_ratio`). Checked after every segment roll and on open.
        background_compaction: run that background compaction at all
            (``compact()`` always works).
        file_mode: permission bits of every file the log creates (its
            directories get the matching search bits: 0o600 gives 0o700),
            applied whatever the umask. Existing files keep their modes.

    Raises:
        LogLockedError: another process (or another open log) writes this directory.
        LogCorruptError: ``log.json`` is unreadable or from another format version.
    """

    kind = "local"

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        partitions: int = 1,
        fsync: str = "always",
        fsync_interval: float = 1.0,
        segment_bytes: int = 16 * 1024 * 1024,
        max_record_bytes: int = 1024 * 1024,
        tombstone_retention: float = 24 * 3600.0,
        min_cleanable_dirty_ratio: float = 0.5,
        background_compaction: bool = True,
        file_mode: int = DEFAULT_FILE_MODE,
    ) -> None:
        if fsync not in FSYNC_POLICIES:
            raise ValueError(f"fsync must be one of {', '.join(FSYNC_POLICIES)}, not {fsync!r}")
        if partitions < 1:
            raise ValueError("partitions must be at least 1")
        if segment_bytes < 1024:
            raise ValueError("segment_bytes must be at least 1024")
        if not 0 < max_record_bytes <= _MAX_FRAME - FRAME_OVERHEAD:
            raise ValueError(f"max_record_bytes must be in 1..{_MAX_FRAME - FRAME_OVERHEAD}")
        if not 0.0 < min_cleanable_dirty_ratio <= 1.0:
            raise ValueError("min_cleanable_dirty_ratio must be in (0, 1]")
        self.path = Path(path)
        self.file_mode = check_file_mode(file_mode)
        self.fsync = fsync
        self.fsync_interval = fsync_interval
        self.segment_bytes = segment_bytes
        self._max_record_bytes = max_record_bytes
        self.tombstone_retention = tombstone_retention
        self.min_cleanable_dirty_ratio = min_cleanable_dirty_ratio
        self._closed = True  # until fully open
        self._forked = False
        self._lock_fd: int | None = None
        self._cond = threading.Condition()  # guards segments, end offsets, closed; readers wait on it
        self._append_lock = threading.Lock()  # one appender at a time
        self._compact_lock = threading.Lock()  # one compaction at a time
        self._segments: dict[int, list[_Segment]] = {}
        self._end: dict[int, int] = {}
        self._active_fd: dict[int, int] = {}
        self._unsynced = False
        self._cleaned_to: dict[int, int] = {}
        # Per partition, [unix time, highest offset] of each compaction pass
        # that dropped tombstones (the newest _DROPS_KEPT of them): what lets a
        # cache that was away know for certain whether it missed a delete.
        self._tombstone_drops: dict[int, list[tuple[float, int]]] = {}
        self._drops_known_since = 0.0
        # Per partition, what the dirty ratio is estimated from (see _DirtSample).
        self._samples: dict[int, _DirtSample] = {}
        self._samples_saved = time.monotonic()
        self._wake = threading.Event()
        # Wake-ups asked of the background cleaner, and those it has handled:
        # equal once it is idle (tests wait on that instead of sleeping).
        self._cleaner_wakeups = 0
        self._cleaner_looks = 0
        self._threads: list[threading.Thread] = []
        # Partitions whose active segment showed a bad record this session:
        # close() leaves no clean-shutdown marker for them, so the next open
        # scans that segment and cuts it back to the last good record.
        self._suspect: set[int] = set()
        #: What the last open found and repaired: per partition, a list of
        #: ``{"segment", "truncated_bytes", "reason", "last_good_offset"}``.
        self.recovery: dict[int, list[dict[str, Any]]] = {}
        #: The report of the last compaction (see :meth:`compact`).
        self.last_compaction: dict[str, Any] | None = None
        try:
            make_dirs(self.path, self.file_mode)
            self._take_lock()
            meta = self._load_meta(partitions)
            self.log_id: str = meta["log_id"]
            self._partitions: int = meta["partitions"]
            self._drops_known_since = float(meta.get("created", 0.0))
            self._load_cleaner_checkpoint()
            clean_shutdown = self._take_clean_shutdown()
            for p in range(self._partitions):
                self._open_partition(p, clean_shutdown)
            self._load_samples()
        except BaseException:
            self._release()
            raise
        self._closed = False
        _fork.register(self)
        if fsync == "interval":
            self._spawn(self._flush_loop, "kvlog-log-flusher")
        if background_compaction:
            self._spawn(self._compact_loop, "kvlog-log-compactor")
            # A log reopened dirty is looked at once; one that is not, only after a roll.
            if any(sample.pending for sample in self._samples.values()) or any(
                self._dirty_ratio(p) >= min_cleanable_dirty_ratio for p in range(self._partitions)
            ):
                self._wake_cleaner()

    # -- opening --------------------------------------------------------------

    def _take_lock(self) -> None:
        fd = open_file(self.path / "LOCK", os.O_RDWR, self.file_mode)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise LogLockedError(
                    f"the log at {self.path} is open for writing by process {holder} "
                    "(one process writes a kvlog data directory at a time; close it there first)"
                ) from None
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def _load_meta(self, partitions: int) -> dict[str, Any]:
        meta_path = self.path / "log.json"
        if not meta_path.exists():
            return self._create(meta_path, partitions)
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise LogCorruptError(f"cannot read {meta_path}: {exc}") from exc
        ok = (
            isinstance(meta, dict)
            and meta.get("format") == FORMAT_VERSION
            and isinstance(meta.get("log_id"), str)
            and isinstance(meta.get("partitions"), int)
            and not isinstance(meta.get("partitions"), bool)
            and meta["partitions"] >= 1
            and isinstance(meta.get("created", 0.0), int | float)
        )
        if not ok:
            raise LogCorruptError(
                f"{meta_path} is not the metadata of a kvlog log of format {FORMAT_VERSION}: {meta!r}"
            )
        for p in range(meta["partitions"]):
            directory = self.path / str(p)
            if not directory.is_dir() or (
                not any(directory.glob("*.log")) and not any(directory.glob("*.swap"))
            ):
                raise LogCorruptError(
                    f"partition {p} of the log at {self.path} is missing ({directory} has no segments); "
                    "restore it, or move the log away to start a new one"
                )
        return dict(meta)

    def _create(self, meta_path: Path, partitions: int) -> dict[str, Any]:
        """Create a new log: partition directories first, ``log.json`` last.

        A crash before ``log.json`` is durable leaves only empty segments, which
        the next open takes over; once it is, every partition exists.
        """
        # Every partition directory there is, not only those asked for now: a
        # log that lost its log.json may have had more partitions.
        for directory in self.path.iterdir():
            if not directory.name.isdigit() or not directory.is_dir():
                continue
            for found in directory.iterdir():
                empty = found.name == _segment_name(0) and found.stat().st_size <= len(MAGIC)
                if found.suffix in (".log", ".swap", ".cleaned") and not empty:
                    raise LogCorruptError(
                        f"{meta_path} is missing but {directory} holds records; "
                        "restore log.json, or move the log away to start a new one"
                    )
        for p in range(partitions):
            directory = self.path / str(p)
            make_dirs(directory, self.file_mode)
            if not (directory / _segment_name(0)).exists():
                self._create_segment_file(directory / _segment_name(0))
        meta = {
            "format": FORMAT_VERSION,
            "log_id": uuid.uuid4().hex,
            "partitions": partitions,
            "created": time.time(),
        }
        self._save_json(meta_path, meta)
        return meta

    def _load_cleaner_checkpoint(self) -> None:
        path = self.path / "cleaner-checkpoint.json"
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
            self._cleaned_to = {int(p): int(o) for p, o in state["cleaned_to"].items()}
            self._tombstone_drops = {
                int(p): [(float(t), int(o)) for t, o in drops]
                for p, drops in state["tombstone_drops"].items()
            }
            self._drops_known_since = max(self._drops_known_since, float(state["drops_known_since"]))
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError, TypeError) as exc:
            # Without the record of dropped tombstones no cache can prove it
            # missed none: from now on, a cache that is behind is rebuilt.
            log.warning("ignoring unreadable %s (%s); the next compaction rewrites it", path, exc)
            self._drops_known_since = time.time()

    def _save_cleaner_checkpoint(self) -> None:
        self._save_json(
            self.path / "cleaner-checkpoint.json",
            {
                "cleaned_to": {str(p): o for p, o in self._cleaned_to.items()},
                "tombstone_drops": {str(p): drops for p, drops in self._tombstone_drops.items()},
                "drops_known_since": self._drops_known_since,
            },
        )

    def _save_json(self, path: Path, data: Mapping[str, Any]) -> None:
        """Replace ``path`` with ``data`` as JSON, synced, then give it the log's file mode."""
        _write_json_atomically(path, data)  # owner-only until the chmod: never wider than asked
        if self.file_mode != DEFAULT_FILE_MODE:
            os.chmod(path, self.file_mode)

    def tombstones_dropped_after(self, positions: Mapping[int, int], since: float) -> bool:
        """Whether compaction dropped a tombstone at or past ``positions`` after ``since`` (unix time).

        Exact for this log (it records every pass that dropped tombstones), so a
        cache that was away for any length of time knows whether it may have
        missed a delete.
        """
        if since < self._drops_known_since:
            return any(positions.get(p, 0) < end for p, end in self.end_offsets().items())
        return any(
            t > since and offset >= positions.get(p, 0)
            for p, drops in self._tombstone_drops.items()
            for t, offset in drops
        )

    def _take_clean_shutdown(self) -> dict[str, Any]:
        """Read and remove the marker :meth:`close` leaves (removed first: a crash must not find it)."""
        path = self.path / "clean-shutdown.json"
        try:
            marker = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError):
            marker = {}
        path.unlink()
        fsync_dir(self.path)
        if not isinstance(marker, dict) or marker.get("format") != FORMAT_VERSION:
            return {}
        return dict(marker.get("partitions", {}))

    def _open_partition(self, p: int, clean_shutdown: Mapping[str, Any]) -> None:
        directory = self.path / str(p)
        self._finish_swaps(directory)
        bases = sorted(int(f.name[:-4]) for f in directory.glob("*.log") if f.name[:-4].isdigit())
        segments = []
        for base in bases:
            path = directory / _segment_name(base)
            segments.append(_Segment(path, base, path.stat().st_size))
        active = segments[-1]
        clean = clean_shutdown.get(str(p), {})
        if clean.get("base") == active.base and clean.get("size") == active.size:
            # Closed cleanly: the segment ends at a whole record. Skip the scan
            # (this is what makes a restart take milliseconds); index lazily.
            self.recovery[p] = []
            self._end[p] = int(clean["end"])
        else:
            self.recovery[p], self._end[p] = self._recover(p, active)
        self._segments[p] = segments
        self._active_fd[p] = os.open(active.path, os.O_WRONLY)

    def _finish_swaps(self, directory: Path) -> None:
        """Complete or undo compaction swaps a crash interrupted (see the module docstring)."""
        for cleaned in directory.glob("*.cleaned"):
            cleaned.unlink()  # never committed: the segments it would replace are intact
        for swap in sorted(directory.glob("*.swap")):
            base_text, _, end_text = swap.name[: -len(".swap")].partition("-")
            base, end = int(base_text), int(end_text)
            for old in directory.glob("*.log"):
                if old.name[:-4].isdigit() and base < int(old.name[:-4]) < end:
                    old.unlink()
            os.replace(swap, directory / _segment_name(base))
            fsync_dir(directory)
            log.info("finished an interrupted compaction of %s (offsets %d-%d)", directory, base, end)

    def _create_segment_file(self, path: Path) -> None:
        """Create a segment holding only the magic; on failure (a full disk) remove what was created."""
        fd = open_file(path, os.O_WRONLY | os.O_TRUNC, self.file_mode)
        try:
            try:
                os.write(fd, MAGIC)
                if self.fsync != "never":
                    os.fsync(fd)
            finally:
                os.close(fd)
            if self.fsync != "never":
                fsync_dir(path.parent)
        except BaseException:
            # A short file here would be taken for the active segment by the next open.
            with contextlib.suppress(OSError):
                path.unlink()
            raise

    def _recover(self, p: int, segment: _Segment) -> tuple[list[dict[str, Any]], int]:
        """Scan the active segment, index it, and cut a torn or corrupt tail.

        Returns:
            The report and the end offset of the partition.
        """
        report: list[dict[str, Any]] = []
        last = segment.base - 1
        with open(segment.path, "r+b") as f:
            data = f.read()
            good = len(MAGIC)
            reason = None
            if data[: len(MAGIC)] != MAGIC:
                if len(data) >= len(MAGIC) or MAGIC[: len(data)] != data:
                    reason = "bad segment header"
                else:
                    reason = "torn segment header"
                good = 0
            else:
                # An append() batch is all or nothing: the tail is cut back to
                # the last record that ends a batch, so a batch a crash tore
                # leaves no record behind (Kafka keeps producer batches whole too).
                pending: list[_Frame] = []
                try:
                    for frame in _parse(data, len(MAGIC), 0, _MAX_FRAME, segment.base - 1):
                        pending.append(frame)
                        if frame.batch_end:
                            for whole in pending:
                                segment.note(whole.offset, whole.position)
                            pending.clear()
                            good = frame.end
                            last = frame.offset
                except _BadFrame as bad:
                    reason = f"{bad.reason} at file position {bad.position}"
                tail = pending[-1].end if pending else good
                if reason is None and tail < len(data):
                    reason = f"incomplete record at file position {tail}"
                if pending:
                    what = (
                        f"a batch without its last record at file position {tail}"
                        if reason is None
                        else reason
                    )
                    reason = f"{what}; {len(pending)} record(s) of an incomplete batch cut with it"
            if reason is not None:
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
                    self.path,
                    truncated,
                    segment.path.name,
                    reason,
                    entry["last_good_offset"],
                )
        segment.size = good
        return report, last + 1

    def _spawn(self, target: Any, name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    # -- the interface ----------------------------------------------------------

    @property
    def partitions(self) -> int:
        return self._partitions

    @property
    def max_record_bytes(self) -> int:
        return self._max_record_bytes

    @property
    def tombstone_retention_seconds(self) -> float:
        return self.tombstone_retention

    def identity(self) -> dict[str, Any]:
        return {"kind": self.kind, "log_id": self.log_id, "partitions": self._partitions}

    def describe(self) -> str:
        return f"embedded log at {self.path}"

    def __repr__(self) -> str:
        return f"<LocalLog {str(self.path)!r} partitions={self._partitions} fsync={self.fsync!r}>"

    def _check_open(self) -> None:
        if self._closed:
            if self._forked:
                raise ClosedError(_fork.after_fork_message(self.describe()))
            raise ClosedError(f"{self.describe()} is closed")

    def _abandon_after_fork(self) -> None:
        """In a forked child: refuse every use, and let close() leave the parent's files alone."""
        self._forked = True
        self._closed = True
        # Locks another thread of the parent held at the fork stay held forever in the child.
        self._cond = threading.Condition()
        self._append_lock = threading.Lock()
        self._compact_lock = threading.Lock()
        self._threads = []

    def partition_for(self, key: bytes) -> int:
        """The partition a key's records go to (stable across processes and versions)."""
        return zlib.crc32(key) % self._partitions if self._partitions > 1 else 0

    def append(
        self, records: Sequence[tuple[bytes, bytes | None]], timeout: float = 30.0
    ) -> list[tuple[int, int]]:
        """Append records; return after they are written (and synced, per the fsync policy).

        Raises:
            RecordTooLargeError: a key + value is larger than ``max_record_bytes`` (nothing written).
            WriteError: the disk refused the write (nothing of the failed partition's batch stays).
        """
        self._check_open()
        limit = self._max_record_bytes
        for key, value in records:
            size = len(key) + (0 if value is None else len(value))
            if size > limit:
                raise RecordTooLargeError(
                    f"a record of {size} bytes (key + value) is larger than the log accepts "
                    f"({limit} bytes; LocalLog(max_record_bytes=...) raises it)"
                )
        if not records:
            return []
        with self._append_lock:
            self._check_open()
            timestamp = time.time_ns() // 1_000_000
            by_partition: dict[int, list[int]] = {}
            for i, (key, _value) in enumerate(records):
                by_partition.setdefault(self.partition_for(key), []).append(i)
            result: list[tuple[int, int]] = [(0, 0)] * len(records)
            for p, indexes in by_partition.items():
                self._append_partition(p, [records[i] for i in indexes], timestamp, indexes, result)
            return result

    def _append_partition(
        self,
        p: int,
        records: list[tuple[bytes, bytes | None]],
        timestamp: int,
        indexes: list[int],
        result: list[tuple[int, int]],
    ) -> None:
        segment = self._segments[p][-1]
        fd = self._active_fd[p]
        start_size = segment.size
        offset = self._end[p]
        frames = []
        notes = []
        # The records of the keys the dirt sample follows (read without the
        # lock: its level only rises, and observe() checks again under it).
        threshold = self._samples[p].threshold
        seen: list[_Seen] = []
        crc32, mix, mask = zlib.crc32, _HASH_MIX, _HASH_MASK
        position = start_size
        last = len(records) - 1
        for n, (i, (key, value)) in enumerate(zip(indexes, records, strict=True)):
            frame = encode_frame(offset, timestamp, key, value, batch_end=n == last)
            frames.append(frame)
            notes.append((offset, position))
            size = len(frame)
            if (h := (crc32(key) * mix) & mask) < threshold:
                seen.append((key, h, offset, size, -1 if value is not None else timestamp))
            position += size
            result[i] = (p, offset)
            offset += 1
        data = b"".join(frames)
        try:
            written = os.pwrite(fd, data, start_size)
            while written < len(data):
                written += os.pwrite(fd, data[written:], start_size + written)
            if self.fsync == "always":
                _datasync(fd)
            else:
                self._unsynced = True
        except OSError as exc:
            # Leave nothing half-written: cut the file back to the last published record.
            with contextlib.suppress(OSError):
                os.ftruncate(fd, start_size)
            raise WriteError(f"cannot append to {segment.path}: {exc}") from exc
        with self._cond:
            for note in notes:
                segment.note(*note)
            segment.size = position
            self._end[p] = offset
            if seen:
                self._samples[p].observe(seen, self._segments[p])
            self._cond.notify_all()
        if segment.size >= self.segment_bytes:
            try:
                self._roll(p)
            except OSError as exc:
                # The records are written and published: this write succeeded.
                # The segment grows past its size until a later append rolls it.
                log.warning(
                    "cannot start a new segment of partition %d of the log at %s (%s); retried after "
                    "the next append",
                    p,
                    self.path,
                    exc,
                )

    def _roll(self, p: int) -> None:
        """Close the active segment (synced) and start a new one at the end offset."""
        fd = self._active_fd[p]
        if self.fsync != "never":
            _datasync(fd)  # closed segments are never scanned on open: they must be whole
        base = self._end[p]
        path = self.path / str(p) / _segment_name(base)
        self._create_segment_file(path)
        new = _Segment(path, base, len(MAGIC))
        try:
            new_fd = os.open(path, os.O_WRONLY)
        except OSError:
            # Appends keep going to the old segment: this one must not look active to the next open.
            path.unlink()
            raise
        with self._cond:
            self._segments[p].append(new)
            self._active_fd[p] = new_fd
        os.close(fd)
        self._wake_cleaner()

    def begin_offsets(self) -> dict[int, int]:
        self._check_open()
        with self._cond:
            return {p: segments[0].base for p, segments in self._segments.items()}

    def end_offsets(self, timeout: float | None = None) -> dict[int, int]:
        self._check_open()
        with self._cond:
            return dict(self._end)

    def open_reader(self, positions: Mapping[int, int]) -> LocalReader:
        self._check_open()
        return LocalReader(self, positions)

    # -- locating offsets (callers hold self._cond) -----------------------------

    def _check_position(self, p: int, position: int) -> None:
        segments = self._segments[p]
        if position < segments[0].base or position > self._end[p]:
            raise PositionOutOfRangeError(
                f"position {position} of partition {p} is outside the log "
                f"[{segments[0].base}, {self._end[p]}] at {self.path}"
            )

    def _following_base(self, p: int, segment: _Segment) -> int | None:
        """The base offset of the segment after ``segment``, or None if it is the active one."""
        segments = self._segments[p]
        if segments[-1] is segment:
            return None
        # Callers checked that the segment was not replaced, so it is in the list.
        i = bisect.bisect_right([s.base for s in segments], segment.base) - 1
        return segments[i + 1].base

    def _locate(self, p: int, position: int) -> tuple[_Segment, int]:
        """Return the segment holding ``position`` and a file position at or before its frame.

        Reads nothing: the position comes from the sparse index, or is the
        first frame. A reader that starts before its position skips the frames
        in between itself, outside the lock (appends go on meanwhile), and
        indexes what it passed.
        """
        self._check_position(p, position)
        segments = self._segments[p]
        segment = segments[bisect.bisect_right(segments, position, key=_base) - 1]
        return segment, segment.start_for(position)

    def _corrupt(self, p: int, segment: _Segment, bad: _BadFrame) -> LogCorruptError:
        """The error for a bad frame found while reading; marks an active segment for repair."""
        with self._cond:
            return self._corrupt_locked(p, segment, bad)

    def _corrupt_locked(self, p: int, segment: _Segment, bad: _BadFrame) -> LogCorruptError:
        active = self._segments[p][-1] is segment
        if active:
            self._suspect.add(p)
        if active:
            advice = "the next open of the log cuts the segment back to the last good record before it"
        else:
            advice = "the log cannot be read past it: restore the file, or rebuild the log from a dump"
        return LogCorruptError(
            f"corrupt record in {segment.path} at file position {bad.position}: {bad.reason}; {advice}"
        )

    # -- compaction ---------------------------------------------------------------

    def _segment_frames(self, p: int, segment: _Segment, size: int) -> Iterator[_Frame]:
        with open(segment.path, "rb") as f:
            data = f.read(size)
        try:
            yield from _parse(data, len(MAGIC), 0, _MAX_FRAME, -1)
        except _BadFrame as bad:
            raise self._corrupt(p, segment, bad) from None

    def _horizon(self) -> int:
        """Tombstones with a timestamp (ms) before this are older than the retention."""
        return time.time_ns() // 1_000_000 - int(self.tombstone_retention * 1000)

    def dirty_ratio(self, p: int) -> float:
        """The share of partition ``p``'s closed segments' bytes a compaction pass would remove.

        That is the records a later record of their key supersedes, and the
        tombstones older than ``tombstone_retention``. Estimated from a sample
        of the keys (exact while a partition has at most a few thousand
        keys); the records an unclean shutdown left uncounted are read first.
        """
        if self._samples[p].pending:
            with self._compact_lock:
                self._check_open()
                self._catch_up(p)
        return self._dirty_ratio(p)

    def _dirty_ratio(self, p: int) -> float:
        """:meth:`dirty_ratio` from what the sample has counted so far (reads nothing)."""
        horizon = self._horizon()
        with self._cond:
            segments = self._segments[p]
            total = sum(s.size for s in segments[:-1])
            dirty = self._samples[p].estimate(segments[-1].base, horizon) if total else 0
        return min(1.0, dirty / total) if total else 0.0

    def _observe_segment(
        self, p: int, sample: _DirtSample, segment: _Segment, size: int, low: int, high: int
    ) -> None:
        """Show ``sample`` the records of ``segment`` (up to ``size``) with offsets in ``[low, high)``."""
        threshold = sample.threshold
        seen: list[_Seen] = []
        for frame in self._segment_frames(p, segment, size):
            if low <= frame.offset < high:
                h = _key_hash(frame.key)
                if h < threshold:
                    ts = -1 if frame.value is not None else frame.timestamp
                    seen.append((frame.key, h, frame.offset, frame.end - frame.position, ts))
                    if len(seen) >= _OBSERVE_BATCH:
                        with self._cond:
                            sample.observe(seen, self._segments[p])
                        seen, threshold = [], sample.threshold
        with self._cond:
            sample.observe(seen, self._segments[p])

    def _catch_up(self, p: int) -> None:
        """Show the dirt sample of ``p`` the records it has not counted yet (callers hold _compact_lock)."""
        with self._cond:
            sample = self._samples[p]
            segments = list(self._segments[p])
            sizes = [s.size for s in segments]
        while sample.pending:
            low, high = sample.pending[0]
            for i, segment in enumerate(segments):
                following = segments[i + 1].base if i + 1 < len(segments) else None
                if following is not None and following <= low:
                    continue
                if self._closed:
                    return  # what is left stays pending, and a save keeps it so
                self._observe_segment(p, sample, segment, sizes[i], low, high)
                with self._cond:
                    if following is None or following >= high:
                        sample.pending.pop(0)
                        break
                    sample.pending[0] = low, high = following, high

    def compact(self) -> dict[str, Any]:
        """Compact every partition now: keep each key's latest record, drop old tombstones.

        Only closed segments are rewritten (as in Kafka, the active segment is
        not), and of those only the ones where something changes: a record
        that a later record of its key supersedes, a tombstone older than the
        retention, or small segments to merge. Readers and writers keep going
        meanwhile.

        Returns:
            A report about the closed segments the pass looked at (segments
            rolled meanwhile are not in it): ``segments_before``/``after``
            (counting the active segment), ``records_before``/``after``,
            ``bytes_before``/``after``, ``segments_rewritten`` and
            ``bytes_rewritten`` (the segments replaced and their bytes; 0 when
            nothing needed it), ``tombstones_dropped``, ``seconds``.
        """
        self._check_open()
        with self._compact_lock:
            return self._compact_locked(range(self._partitions))

    def _compact_locked(self, partitions: Iterable[int]) -> dict[str, Any]:
        started = time.monotonic()
        total: dict[str, Any] = dict.fromkeys(_REPORT_FIELDS, 0)
        for p in partitions:
            for name, value in self._compact_partition(p).items():
                total[name] += value
        self._save_cleaner_checkpoint()
        self._save_samples()
        total["seconds"] = round(time.monotonic() - started, 3)
        self.last_compaction = total
        log.info("compacted %s: %s", self.describe(), total)
        return total

    def _survey(
        self, p: int, segments: list[_Segment], active_size: int, horizon: int
    ) -> tuple[dict[bytes, int], list[bool], list[int]] | None:
        """Read the partition up to the snapshot ``segments`` + ``active_size``.

        Returns the latest offset of every key, which closed segments hold a
        record the pass removes (superseded, or a tombstone past the
        retention), and their record counts. None if the log was closed meanwhile.
        """
        closed_count = len(segments) - 1
        bases = [s.base for s in segments]
        latest: dict[bytes, int] = {}
        dirty = [False] * closed_count
        records = [0] * closed_count
        for i, segment in enumerate(segments):
            if self._closed:
                return None
            is_closed = i < closed_count
            base = segment.base
            count = 0
            superseded = expired = False  # a record here superseded; a tombstone here expired
            for frame in self._segment_frames(p, segment, segment.size if is_closed else active_size):
                count += 1
                key = frame.key
                prev = latest.get(key)
                latest[key] = frame.offset
                if prev is None:
                    pass
                elif prev >= base:
                    superseded = True
                else:
                    j = bisect.bisect_right(bases, prev) - 1
                    if j < closed_count:
                        dirty[j] = True
                if frame.value is None and frame.timestamp < horizon:
                    expired = True  # (dropped, or superseded: removed either way)
            if is_closed:
                records[i] = count
                dirty[i] = dirty[i] or superseded or expired
        return latest, dirty, records

    def _compact_partition(self, p: int) -> dict[str, int]:
        self._catch_up(p)  # the sample must have counted every record for the adjustments below
        with self._cond:
            segments = list(self._segments[p])
            active_size = segments[-1].size
            sample = self._samples[p]
            # What the sample counts as superseded when the pass starts is what
            # it removes; counted later is superseded by records appended since.
            counted = {s.base: list(sample.dead.get(s.base, ())) for s in segments[:-1]}
        closed, active = segments[:-1], segments[-1]
        closed_bytes = sum(s.size for s in closed)
        report = dict.fromkeys(_REPORT_FIELDS, 0)
        report.update(
            segments_before=len(segments),
            segments_after=len(segments),
            bytes_before=closed_bytes,
            bytes_after=closed_bytes,
        )
        horizon = self._horizon()
        survey = self._survey(p, segments, active_size, horizon) if closed and not sample.pending else None
        if survey is None:
            return report
        latest, dirty, records = survey
        report["records_before"] = report["records_after"] = sum(records)
        directory = self.path / str(p)
        # Group consecutive closed segments whose combined size fits one segment.
        groups: list[list[int]] = []
        for i, segment in enumerate(closed):
            if groups and sum(closed[j].size for j in groups[-1]) + segment.size <= self.segment_bytes:
                groups[-1].append(i)
            else:
                groups.append([i])
        for members in groups:
            if len(members) == 1 and not dirty[members[0]]:
                continue  # nothing in it changes: the file stays as it is
            group = [closed[i] for i in members]
            base = group[0].base
            end = segments[members[-1] + 1].base
            cleaned = directory / f"{base:020d}.cleaned"
            new = _Segment(directory / _segment_name(base), base, 0)
            dropped_up_to = -1
            gone = dropped = 0
            threshold = sample.threshold
            removed: list[tuple[bytes, int, int, int]] = []  # dropped tombstones of followed keys
            with (
                self._removed_on_error(cleaned),
                open(open_file(cleaned, os.O_WRONLY | os.O_TRUNC, self.file_mode), "wb") as out,
            ):
                out.write(MAGIC)
                position = len(MAGIC)
                for segment in group:
                    if self._closed:  # close() does not wait for a long pass; nothing is committed yet
                        out.close()
                        cleaned.unlink()
                        return report
                    for frame in self._segment_frames(p, segment, segment.size):
                        drop = latest[frame.key] != frame.offset
                        if not drop and frame.value is None and frame.timestamp < horizon:
                            dropped += 1
                            dropped_up_to = frame.offset
                            drop = True
                            if (h := _key_hash(frame.key)) < threshold:
                                removed.append((frame.key, h, frame.offset, frame.end - frame.position))
                        if drop:
                            gone += 1
                            continue
                        data = encode_frame(frame.offset, frame.timestamp, frame.key, frame.value)
                        out.write(data)
                        new.note(frame.offset, position)
                        position += len(data)
                out.flush()
                os.fsync(out.fileno())
            new.size = position
            if dropped_up_to >= 0:
                # Recorded before the commit point: a crash in between records a
                # drop that did not happen, which only costs a cache a rebuild.
                drops = self._tombstone_drops.setdefault(p, [])
                drops.append((time.time(), dropped_up_to))
                if len(drops) > _DROPS_KEPT:
                    self._drops_known_since = max(self._drops_known_since, drops.pop(0)[0])
                with self._removed_on_error(cleaned):
                    self._save_cleaner_checkpoint()
            swap = directory / f"{base:020d}-{end:020d}.swap"
            # Commit point: once the .swap name is durable, an open finishes the swap.
            os.replace(cleaned, swap)
            fsync_dir(directory)
            with self._cond:
                for old in group[1:]:
                    old.path.unlink()
                os.replace(swap, new.path)
                current = self._segments[p]
                at = current.index(group[0])
                current[at : at + len(group)] = [new]
                for old in group:
                    old.replaced = True
                sample.replaced([s.base for s in group], base, counted)
                for key, h, offset, size in removed:
                    sample.dropped(key, h, offset, size, base)
            fsync_dir(directory)
            old_bytes = sum(s.size for s in group)
            report["segments_after"] -= len(group) - 1
            report["segments_rewritten"] += len(group)
            report["records_after"] -= gone
            report["tombstones_dropped"] += dropped
            report["bytes_after"] += new.size - old_bytes
            report["bytes_rewritten"] += old_bytes
        with self._cond:
            self._cleaned_to[p] = active.base
        return report

    @staticmethod
    @contextlib.contextmanager
    def _removed_on_error(path: Path) -> Iterator[None]:
        """Remove ``path`` if the block fails: a half-written ``.cleaned`` on a full disk only takes space."""
        try:
            yield
        except BaseException:
            with contextlib.suppress(OSError):
                path.unlink()
            raise

    def _wake_cleaner(self) -> None:
        with self._cond:
            self._cleaner_wakeups += 1
        self._wake.set()

    def _compact_loop(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            if self._closed:
                return
            with self._cond:
                asked = self._cleaner_wakeups
            try:
                self._look()
            except ClosedError:
                return
            except Exception:
                log.exception(
                    "background compaction of %s failed; it is retried after the next roll", self.path
                )
            with self._cond:
                self._cleaner_looks = asked

    def _look(self) -> None:
        """What the background cleaner does after a roll: compact the partitions that are dirty enough."""
        with self._compact_lock:
            for p in range(self._partitions):
                if self._closed:
                    return
                self._catch_up(p)
            due = [
                p for p in range(self._partitions) if self._dirty_ratio(p) >= self.min_cleanable_dirty_ratio
            ]
            if due:
                self._compact_locked(due)  # saves the samples
            elif time.monotonic() - self._samples_saved >= _SAMPLE_SAVE_INTERVAL:
                self._save_samples()

    def _load_samples(self) -> None:
        """Take up the dirt samples a previous session saved; count what they lack, or all, later."""
        path = self.path / "cleaner-sample.json"
        try:
            state = json.loads(path.read_bytes())
            saved = state["partitions"] if state["format"] == FORMAT_VERSION else {}
        except FileNotFoundError:
            saved = {}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring unreadable %s (%s); the dirty ratio is counted again", path, exc)
            saved = {}
        for p in range(self._partitions):
            segments, end = self._segments[p], self._end[p]
            sample = None
            try:
                entry = saved.get(str(p))
                if entry is not None:
                    sample = self._saved_sample(entry, segments, end)
            except (ValueError, KeyError, TypeError, AttributeError):
                sample = None
            if sample is None:
                begin = segments[0].base
                sample = _DirtSample([(begin, end)] if end > begin else [])
            self._samples[p] = sample

    @staticmethod
    def _saved_sample(entry: Mapping[str, Any], segments: list[_Segment], end: int) -> _DirtSample | None:
        """A saved sample, if it still describes these segments (compaction did not change them since)."""
        closed = entry["closed"]
        through = int(entry["through"])
        if through > end or len(closed) >= len(segments) or segments[len(closed)].base != entry["active"]:
            return None
        if any(s.base != base or s.size != size for s, (base, size) in zip(segments, closed, strict=False)):
            return None
        sample = _DirtSample.from_json(entry)
        if through < end:
            sample.pending.append((through, end))  # written after the save: a crash, most likely
        return sample

    def _save_samples(self) -> None:
        """Save the dirt samples, so that an open knows the dirty ratio without reading the log."""
        partitions = {}
        with self._cond:
            for p, sample in self._samples.items():
                segments = self._segments[p]
                partitions[str(p)] = {
                    **sample.to_json(),
                    "through": self._end[p],
                    "active": segments[-1].base,
                    "closed": [[s.base, s.size] for s in segments[:-1]],
                }
        data = json.dumps({"format": FORMAT_VERSION, "partitions": partitions}, separators=(",", ":"))
        write_file_atomically(
            self.path / "cleaner-sample.json",
            data.encode(),
            sync=self.fsync != "never",
            file_mode=self.file_mode,
        )
        self._samples_saved = time.monotonic()

    # -- syncing and closing ----------------------------------------------------------

    def flush(self) -> None:
        """Sync every active segment to disk now (what ``fsync="always"`` does per write)."""
        with self._append_lock:
            self._check_open()
            for fd in self._active_fd.values():
                _datasync(fd)
            self._unsynced = False

    def _flush_loop(self) -> None:
        while not self._closed:
            with self._cond:
                self._cond.wait_for(lambda: self._closed, timeout=self.fsync_interval)
            if self._closed:
                return
            if self._unsynced:
                try:
                    self.flush()
                except ClosedError:
                    return
                except OSError:
                    log.exception("syncing %s failed", self.path)

    def stats(self) -> dict[str, Any]:
        """Per partition: segments, bytes, begin and end offsets, dirty ratio; and the fsync policy."""
        self._check_open()
        partitions: dict[int, dict[str, Any]] = {}
        for p in range(self._partitions):
            with self._cond:
                segments = self._segments[p]
                partitions[p] = {
                    "segments": len(segments),
                    "bytes": sum(s.size for s in segments),
                    "begin_offset": segments[0].base,
                    "end_offset": self._end[p],
                    "cleaned_to": self._cleaned_to.get(p, 0),
                }
            # What the sample counted so far: stats never read the log (after an
            # unclean shutdown, the background cleaner counts the rest soon).
            partitions[p]["dirty_ratio"] = round(self._dirty_ratio(p), 3)
        return {
            "path": str(self.path),
            "fsync": self.fsync,
            "segment_bytes": self.segment_bytes,
            "partitions": partitions,
            "recovery": self.recovery,
            "last_compaction": self.last_compaction,
            "cleaner": {
                "background": any(t.name == "kvlog-log-compactor" for t in self._threads),
                "wakeups": self._cleaner_wakeups,
                "handled": self._cleaner_looks,
            },
        }

    def close(self) -> None:
        """Sync (unless ``fsync="never"``), stop the background threads, release the lock. Idempotent."""
        if self._closed:
            return
        with self._append_lock:
            with self._cond:
                self._closed = True
                self._cond.notify_all()
            self._wake.set()
        _fork.unregister(self)
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join()
        with self._compact_lock:  # a compaction started by compact() in another thread finishes first
            try:
                self._save_samples()
            except OSError as exc:
                log.warning(
                    "could not save the dirt sample of %s (%s); the next open counts again", self.path, exc
                )
        self._release(clean=True)

    def _release(self, clean: bool = False) -> None:
        synced = True
        for fd in self._active_fd.values():
            try:
                if self.fsync != "never":
                    _datasync(fd)
            except OSError:
                synced = False
            with contextlib.suppress(OSError):
                os.close(fd)
        if clean and synced and self._active_fd and self.fsync != "never":
            # The next open trusts these sizes instead of scanning the active
            # segments. Written only after the data is synced: a marker that
            # describes unsynced data could hide a torn tail after an OS crash.
            marker = {
                str(p): {"base": segments[-1].base, "size": segments[-1].size, "end": self._end[p]}
                for p, segments in self._segments.items()
                if p not in self._suspect
            }
            with contextlib.suppress(OSError):
                self._save_json(
                    self.path / "clean-shutdown.json", {"format": FORMAT_VERSION, "partitions": marker}
                )
        self._active_fd = {}
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor drops the flock
            self._lock_fd = None
