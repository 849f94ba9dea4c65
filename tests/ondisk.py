"""Reading what a crash left on disk, independently of the code under test.

The embedded log's segments are parsed here from the format in
docs/design.md ("Segment and frame format"), not with kvlog's own parser, so
a bug there cannot hide itself; the cache is read back as a plain mapping.
Shared by the crash tests of the log and the fault tests of the cache.
"""

from __future__ import annotations

import struct
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack

from kvlog.cache import Cache
from kvlog.log.local import LocalLog

#: The first bytes of every segment file.
MAGIC = b"KVLSEG1\n"


def active_segments(log_dir: Path) -> dict[int, Path]:
    """Per partition, the segment with the highest base offset (the active one)."""
    result = {}
    for directory in log_dir.iterdir():
        if directory.is_dir() and directory.name.isdigit():
            segments = sorted(f for f in directory.glob("*.log") if f.name[:-4].isdigit())
            if segments:
                result[int(directory.name)] = segments[-1]
    return result


@dataclass(frozen=True)
class Tail:
    """What a SIGKILL left at the end of an active segment, and what recovery must cut.

    ``cut``: the bytes after the end of the last whole frame that ends an
    ``append()`` batch (flag 2), which recovery cuts; ``last``: that frame's
    last offset (None if the segment has none); ``frames_end``: the file
    position after the last whole frame; ``batch_records``: the records of the
    whole frames after the cut point (of a batch the kill tore, cut with it);
    ``torn_magic``: the file is shorter than the magic.
    """

    cut: int
    last: int | None
    frames_end: int
    batch_records: int
    torn_magic: bool


def frame_records(body: bytes) -> tuple[list[int], list[bytes], list[bytes | None]]:
    """The offsets, keys and values of a frame's body, as docs/design.md ("Segment and frame format") documents it.

    A record frame (flags without 4) holds one record; a batch frame (flag 4)
    holds ``count`` records in msgpack columns, with an offsets column if
    flag 8 is set and consecutive offsets from its first otherwise.
    """
    offset, _timestamp, flags, count = struct.unpack_from("<qqBI", body, 0)
    if not flags & 4:
        return [offset], [body[21 : 21 + count]], [None if flags & 1 else body[21 + count :]]
    keys_bytes, values_bytes = struct.unpack_from("<II", body, 21)
    keys = msgpack.unpackb(body[29 : 29 + keys_bytes])
    values = msgpack.unpackb(body[29 + keys_bytes : 29 + keys_bytes + values_bytes])
    rest = body[29 + keys_bytes + values_bytes :]
    offsets = msgpack.unpackb(rest) if flags & 8 else list(range(offset, offset + count))
    assert len(keys) == len(values) == len(offsets) == count, f"a batch frame of {count} records holds others"
    return offsets, keys, values


def torn_tail(segment: Path) -> Tail:
    """Parse a segment as docs/design.md ("Segment and frame format") documents it.

    A SIGKILL can leave an incomplete last frame, never a complete but bad
    one: that fails the test here.
    """
    data = segment.read_bytes()
    if len(data) < len(MAGIC):
        assert MAGIC.startswith(data), f"{segment} starts with {data!r}, not a prefix of the magic"
        return Tail(len(data), None, 0, 0, torn_magic=True)
    assert data[: len(MAGIC)] == MAGIC, f"{segment} has a bad magic {data[:8]!r}"
    pos = good = len(MAGIC)
    last, pending = None, 0
    while pos + 8 <= len(data):
        length, crc = struct.unpack_from("<II", data, pos)
        if pos + 8 + length > len(data):
            break
        body = data[pos + 8 : pos + 8 + length]
        assert zlib.crc32(body) == crc, f"a whole frame with a bad CRC at {segment}:{pos} after a SIGKILL"
        flags = body[16]
        offsets, _, _ = frame_records(body)
        pos += 8 + length
        pending += len(offsets)
        if flags & 2:  # the frame ends an append() batch: the batch is whole up to here
            good, last, pending = pos, offsets[-1], 0
    return Tail(len(data) - good, last, pos, pending, torn_magic=False)


def expected_reason(tail: Tail) -> str:
    """The ``reason`` of the recovery entry for a torn tail (see ``kvlog.log.local.recovery``)."""
    if tail.torn_magic:
        return "torn segment header"
    reason = f"incomplete record at file position {tail.frames_end}"
    if tail.batch_records:
        reason += f"; {tail.batch_records} record(s) of an incomplete batch cut with it"
    return reason


def fold_log(
    log_dir: Path, upto: dict[int, int] | None = None
) -> tuple[dict[bytes, bytes], dict[int, int], dict[int, int]]:
    """Read the whole log with a LocalReader and fold it.

    Returns:
        ``(key -> value bytes of the records below upto, end offsets,
        per partition the number of records at or after upto)``.
    """
    local = LocalLog(log_dir, background_compaction=False)
    try:
        end = local.end_offsets()
        reader = local.open_reader(local.begin_offsets())
        state: dict[bytes, bytes] = {}
        after: dict[int, int] = dict.fromkeys(end, 0)
        deadline = time.monotonic() + 120
        while any(reader.positions()[p] < end[p] for p in end):
            assert time.monotonic() < deadline, "reading the log back did not finish"
            for record in reader.poll(1.0, 100_000):
                if upto is not None and record.offset >= upto.get(record.partition, 0):
                    after[record.partition] += 1
                    continue
                assert record.key is not None
                if record.value is None:
                    state.pop(record.key, None)
                else:
                    state[record.key] = record.value
        reader.close()
    finally:
        local.close()
    return state, end, after


#: The first bytes of the embedded log's ``head`` file.
LOG_HEAD_MAGIC = b"KVLHEAD1"


def log_head_clean(log_dir: Path) -> bool:
    """Whether the embedded log's head is marked clean (word 5: the last close synced and marked it)."""
    data = (log_dir / "head").read_bytes()
    assert data[:8] == LOG_HEAD_MAGIC, f"{log_dir}/head starts with {data[:8]!r}"
    return bool(struct.unpack_from("<Q", data, 8 * 5)[0])


#: The cache directory's HEAD file: magic, then the live generation (docs/design.md, "The cache").
CACHE_HEAD_MAGIC = b"KVLCACH1"


def cache_generation(cache_dir: Path) -> int:
    """The live generation of the cache at ``cache_dir``, read from its HEAD file."""
    data = (cache_dir / "HEAD").read_bytes()
    assert len(data) >= 16 and data[:8] == CACHE_HEAD_MAGIC, f"{cache_dir}/HEAD is {data!r}"
    return int(struct.unpack_from("<Q", data, 8)[0])


def cache_env_dir(cache_dir: Path) -> Path:
    """The directory of the live LMDB environment (data.mdb, lock.mdb, CLOSED, UNSYNCED, DAMAGED) of a cache."""
    return cache_dir / f"gen-{cache_generation(cache_dir):06d}"


def cache_contents(cache_dir: Path) -> tuple[dict[bytes, bytes], dict[int, int], dict[str, Any] | None]:
    cache = Cache(cache_dir)
    try:
        return dict(cache.items()), cache.checkpoint(), cache.identity()
    finally:
        cache.close()
