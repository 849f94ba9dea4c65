"""The embedded log's fast frame paths agree with the plain ones they replace.

Replay reads frames with ``scan_frames`` (and steps over those below its
position with ``skip_frames``), and ``append`` writes a batch with
``encode_batch``. Each must give exactly what ``parse_frames`` and
``encode_frame`` give, the same records and the same error at the same file
position, on any bytes: record frames and batch frames (with gaps in their
offsets or none), whole, torn, or with any byte flipped or any length field
rewritten.
"""

from __future__ import annotations

import itertools
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvlog.log.base import Record
from kvlog.log.local import LocalLog
from kvlog.log.local import segments as seg
from kvlog.log.local.segments import (
    MAX_FRAME,
    BadFrame,
    FrameColumns,
    encode_batch,
    encode_columns,
    encode_frame,
    encode_frames,
    parse_frames,
    scan_frames,
    skip_frames,
)

#: A record as the strategies draw it: key, value (None: a tombstone), offset step (0 or less: out of order).
record = st.tuples(
    st.binary(max_size=12),
    st.one_of(st.none(), st.binary(max_size=40)),
    st.integers(min_value=-2, max_value=3),
)


@st.composite
def frame_buffers(draw: st.DrawFn) -> tuple[bytes, int, int, int]:
    """``(buffer, start, file_pos, after)``: record and batch frames after a prefix, then maybe damaged.

    A batch frame holds 2 to 6 records whose offsets increase, by 1 or with
    gaps (its first may still be out of order with the frame before). Damage:
    cut the buffer anywhere (a torn tail), flip any byte, or rewrite a frame's
    length field (an impossible length, or one pointing into the next frame),
    or append garbage.
    """
    prefix = draw(st.binary(max_size=9))
    offset = draw(st.integers(min_value=-1, max_value=2**40))
    frames = []
    for _ in range(draw(st.integers(min_value=0, max_value=8))):
        if draw(st.booleans()):
            key, value, step = draw(record)
            offset += step
            frames.append(encode_frame(offset, 1_700_000_000_000, key, value, batch_end=draw(st.booleans())))
            continue
        drawn = draw(st.lists(record, min_size=2, max_size=6))
        offset += drawn[0][2]
        offsets = [offset]
        gaps = draw(st.booleans())
        for _key, _value, step in drawn[1:]:
            offset += max(1, step) if gaps else 1
            offsets.append(offset)
        data, _ = encode_columns(
            offsets,
            [key for key, _, _ in drawn],
            [value for _, value, _ in drawn],
            1_700_000_000_000,
            0,
            0,
            batch_end=draw(st.booleans()),
        )
        frames.append(data)
    buf = bytearray(prefix + b"".join(frames))
    damage = draw(st.sampled_from(["none", "cut", "flip", "length", "garbage"]))
    if damage == "cut" and buf:
        del buf[draw(st.integers(min_value=0, max_value=len(buf) - 1)) :]
    elif damage == "flip" and len(buf) > len(prefix):
        at = draw(st.integers(min_value=len(prefix), max_value=len(buf) - 1))
        buf[at] ^= 1 << draw(st.integers(min_value=0, max_value=7))
    elif damage == "length" and frames:
        at = len(prefix) + sum(map(len, frames[: draw(st.integers(min_value=0, max_value=len(frames) - 1))]))
        length = draw(st.one_of(st.integers(0, 40), st.integers(0, 2**32 - 1), st.just(MAX_FRAME + 1)))
        struct.pack_into("<I", buf, at, length)
    elif damage == "garbage":
        buf += draw(st.binary(min_size=1, max_size=40))
    file_pos = draw(st.integers(min_value=0, max_value=2**33))
    after = draw(st.sampled_from([-1, offset - 2, offset + 1]))
    return bytes(buf), len(prefix), file_pos, after


def _plain(
    buf: bytes, start: int, file_pos: int, after: int, limit: int, position: int = -1
) -> tuple[list[Any], Any, tuple[int, int]]:
    """What a reader taking ``limit`` records at or past ``position`` from parse_frames gets.

    The records, the (position, reason) parse_frames raised if it did, and
    where the next read starts with the offset it must exceed: after the last
    frame passed whole, or at the start of a batch frame the limit cut.
    """
    taken: list[Any] = []
    pos = start
    if limit <= 0:
        return taken, None, (pos, after)
    try:
        for frame in parse_frames(buf, start, file_pos, MAX_FRAME, after):
            if frame.offset >= position:
                taken.append((frame.offset, frame.key, frame.value))
            after = frame.offset
            if frame.last:
                pos = frame.end - file_pos
            if len(taken) == limit:
                break
    except BadFrame as bad:
        return taken, (bad.position, bad.reason), (pos, after)
    return taken, None, (pos, after)


def _scanned(
    buf: bytes, start: int, file_pos: int, after: int, limit: int, position: int = -1
) -> tuple[list[Any], Any, Any]:
    columns = FrameColumns(7)
    try:
        got: Any = scan_frames(buf, start, file_pos, after, limit, columns, position)
    except BadFrame as bad:
        error: Any = (bad.position, bad.reason)
        got = None
    else:
        error = None
    assert len(columns.keys) == len(columns.values) == len(columns.offsets)
    assert columns.tombstones == [i for i, value in enumerate(columns.values) if value is None]
    return list(zip(columns.offsets, columns.keys, columns.values, strict=True)), error, got


@settings(max_examples=800, deadline=None)
@given(frame_buffers(), st.integers(min_value=0, max_value=14), st.integers(min_value=-1, max_value=2**40))
def test_scan_frames_takes_and_refuses_what_parse_frames_does(
    case: tuple[bytes, int, int, int], limit: int, position: int
) -> None:
    buf, start, file_pos, after = case
    if position > 0 and buf:
        # A position inside the frames drawn, now and then (the offsets start anywhere below 2**40).
        offsets = [f.offset for f in _frames_before_damage(buf, start, file_pos, after)]
        if offsets:
            position = offsets[position % len(offsets)] + position % 2
    plain, plain_error, plain_next = _plain(buf, start, file_pos, after, limit, position)
    scanned, error, got = _scanned(buf, start, file_pos, after, limit, position)
    assert plain == scanned
    assert error == plain_error
    if error is None:
        assert got == plain_next


def _frames_before_damage(buf: bytes, start: int, file_pos: int, after: int) -> list[seg.Frame]:
    frames: list[seg.Frame] = []
    try:
        frames.extend(parse_frames(buf, start, file_pos, MAX_FRAME, after))
    except BadFrame:
        pass
    return frames


@settings(max_examples=300, deadline=None)
@given(frame_buffers(), st.integers(min_value=0, max_value=14), st.integers(min_value=-1, max_value=2**40))
def test_the_general_scan_for_huge_buffers_agrees_too(
    case: tuple[bytes, int, int, int], limit: int, position: int
) -> None:
    """The path scan_frames takes for a buffer longer than a frame may be (read whole by parse_frames)."""
    buf, start, file_pos, after = case
    offsets = [f.offset for f in _frames_before_damage(buf, start, file_pos, after)]
    if offsets:
        position = offsets[position % len(offsets)] + position % 2
    plain, plain_error, plain_next = _plain(buf, start, file_pos, after, limit, position)
    columns = FrameColumns(0)
    try:
        got = seg._scan_frames_generally(buf, start, file_pos, after, limit, columns, position)
    except BadFrame as bad:
        assert (bad.position, bad.reason) == plain_error
    else:
        assert plain_error is None
        assert got == plain_next
    assert plain == list(zip(columns.offsets, columns.keys, columns.values, strict=True))


def _plain_seek(
    buf: bytes, start: int, file_pos: int, after: int, position: int, interval: int
) -> tuple[Any, Any]:
    """The plain seek: parse_frames, stepping over the frames whose records are all below ``position``.

    Indexing the first record of one frame every ``interval`` bytes (the first
    included). Returns ``skip_frames``' answer and the error, if one was raised.
    """
    entries: list[tuple[int, int]] = []
    pos, next_entry, first = start, start, None
    try:
        for frame in parse_frames(buf, start, file_pos, MAX_FRAME, after):
            if frame.offset >= position:
                break
            if first is None:
                first = frame.offset
            if not frame.last:
                continue
            if frame.position - file_pos >= next_entry:
                entries.append((first, frame.position))
                next_entry = frame.position - file_pos + interval
            after, pos, first = frame.offset, frame.end - file_pos, None
    except BadFrame as bad:
        return None, (bad.position, bad.reason)
    return (pos, after, entries), None


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    frame_buffers(),
    st.integers(min_value=-1, max_value=2**40),
    st.sampled_from([1, 40, 1 << 16]),
    st.booleans(),
)
def test_skip_frames_passes_what_a_reader_seeking_with_parse_frames_passes(
    case: tuple[bytes, int, int, int], position: int, interval: int, inside: bool
) -> None:
    buf, start, file_pos, after = case
    if inside:
        offsets = [f.offset for f in _frames_before_damage(buf, start, file_pos, after)]
        if offsets:
            position = offsets[position % len(offsets)]
    expected, expected_error = _plain_seek(buf, start, file_pos, after, position, interval)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            seg, "INDEX_INTERVAL", interval
        )  # small intervals index several frames of a small buffer
        try:
            got = skip_frames(buf, start, file_pos, after, position)
        except BadFrame as bad:
            assert (bad.position, bad.reason) == expected_error
            return
        if expected_error is not None:
            # A bad frame that would not be passed anyway is left to
            # scan_frames, which a reader calls next: it raises the same error.
            pos, passed_to, _ = got
            assert expected_error[0] == file_pos + pos
            with pytest.raises(BadFrame) as raised:
                scan_frames(buf, pos, file_pos, passed_to, 1 << 30, FrameColumns(0), position)
            assert (raised.value.position, raised.value.reason) == expected_error
            return
        assert got == expected
        # The general path, for buffers longer than a frame may be, agrees.
        assert seg._skip_frames_generally(buf, start, file_pos, after, position) == expected


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(st.binary(max_size=20), st.one_of(st.none(), st.binary(max_size=300))), min_size=1),
    st.integers(min_value=0, max_value=2**40),
    st.integers(min_value=8, max_value=1 << 20),
    st.integers(min_value=0, max_value=1 << 20),
    st.sampled_from([1, 100, 1 << 16]),
)
def test_encode_frames_writes_the_frames_encode_frame_writes(
    batch: list[tuple[bytes, bytes | None]], offset: int, position: int, index_at: int, interval: int
) -> None:
    """The format-1 writer (record frames only), kept for tests that need a log as older versions wrote it."""
    last = len(batch) - 1
    expected = [
        encode_frame(offset + i, 42, key, value, batch_end=i == last) for i, (key, value) in enumerate(batch)
    ]
    entries: list[tuple[int, int]] = []
    at, next_entry = position, index_at
    for i, frame in enumerate(expected):
        if at >= next_entry:
            entries.append((offset + i, at))
            next_entry = at + interval
        at += len(frame)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(seg, "INDEX_INTERVAL", interval)
        assert encode_frames(batch, offset, 42, position, index_at) == (b"".join(expected), entries)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(st.binary(max_size=20), st.one_of(st.none(), st.binary(max_size=300))), min_size=1),
    st.lists(st.integers(min_value=1, max_value=3), min_size=1),
    st.integers(min_value=0, max_value=2**40),
    st.integers(min_value=8, max_value=1 << 20),
    st.sampled_from([1, 100, 1 << 16]),
    st.sampled_from([2, 3, 4096]),
    st.sampled_from([30, 1 << 20]),
)
def test_batch_frames_read_back_as_the_records_written(
    batch: list[tuple[bytes, bytes | None]],
    steps: list[int],
    offset: int,
    position: int,
    interval: int,
    frame_records: int,
    frame_bytes: int,
) -> None:
    """encode_columns' frames, with or without gaps and split at any bounds, read back whole and indexed.

    Only the last frame ends the batch; each frame is a batch frame, even one
    of one record; each index entry is a frame's first record.
    """
    offsets = list(
        itertools.accumulate(itertools.islice(itertools.cycle(steps), len(batch) - 1), initial=offset)
    )
    keys, values = [k for k, _ in batch], [v for _, v in batch]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(seg, "INDEX_INTERVAL", interval)
        patch.setattr(seg, "BATCH_FRAME_RECORDS", frame_records)
        patch.setattr(seg, "BATCH_FRAME_BYTES", frame_bytes)
        data, entries = encode_columns(offsets, keys, values, 42, position, 0)
        if offsets == list(range(offset, offset + len(batch))):
            assert encode_batch(batch, offset, 42, position, 0) == (data, entries)
    frames = list(parse_frames(data, 0, position, MAX_FRAME, -1))
    assert [(f.offset, f.key, f.value, f.timestamp) for f in frames] == [
        (o, k, v, 42) for o, (k, v) in zip(offsets, batch, strict=True)
    ]
    assert [f.batch_end for f in frames] == [False] * (len(batch) - 1) + [True]
    starts = sorted({f.position for f in frames})
    assert frames[-1].end == position + len(data)
    firsts = {f.position: f.offset for f in reversed(frames)}
    assert all(e in [(firsts[s], s) for s in starts] for e in entries) and entries[0] == (
        offsets[0],
        position,
    )
    for start in starts:
        records = [f for f in frames if f.position == start]
        assert len(records) <= frame_records
        assert len(records) == 1 or sum(len(f.key) + len(f.value or b"") for f in records) <= frame_bytes
        assert data[start - position + 24] & 4  # the batch flag, even on a frame of one record
    columns = FrameColumns(0)
    assert scan_frames(data, 0, position, -1, len(batch) + 1, columns) == (len(data), offsets[-1])
    assert columns.records() == [Record(0, o, k, v) for o, (k, v) in zip(offsets, batch, strict=True)]


def _foreign_batch(head: tuple[int, int, int, int], columns: list[bytes], keys_bytes: int = -1) -> bytes:
    """A batch frame with a good CRC around whatever columns a foreign writer put in it."""
    offset, flags, count, _ = head
    keys_len = len(columns[0]) if keys_bytes < 0 else keys_bytes
    body = struct.pack("<qqBIII", offset, 0, flags, count, keys_len, len(columns[1])) + b"".join(columns)
    return struct.pack("<II", len(body), zlib.crc32(body)) + body


_K, _V = msgpack.packb([b"a", b"b"]), msgpack.packb([b"1", None])


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        (_foreign_batch((5, 4 | 2, 2, 0), [_K, _V]), None),
        (_foreign_batch((5, 4 | 2, 3, 0), [_K, _V]), "not 3 keys"),
        (_foreign_batch((5, 4 | 2, 0, 0), [msgpack.packb([]), msgpack.packb([])]), "do not fill"),
        (_foreign_batch((5, 4 | 2, 2, 0), [_K, _V, b"\x00"]), "do not fill"),
        (_foreign_batch((5, 4 | 2, 2, 0), [_K, _V], keys_bytes=len(_K) - 1), "do not fill"),
        (_foreign_batch((5, 4 | 2, 2, 0), [_K[:-1], _V]), "not msgpack"),
        (_foreign_batch((5, 4 | 2, 2, 0), [msgpack.packb(["a", "b"]), _V]), "not 2 keys"),
        (_foreign_batch((5, 4 | 2, 2, 0), [_K, msgpack.packb([b"1", 2])]), "not 2 keys"),
        (_foreign_batch((5, 4 | 2, 2, 0), [_K, msgpack.packb({b"1": None})]), "not 2 keys"),
        (_foreign_batch((5, 4 | 8 | 2, 2, 0), [_K, _V, msgpack.packb([5, 7])]), None),
        (_foreign_batch((5, 4 | 8 | 2, 2, 0), [_K, _V, msgpack.packb([5, 5])]), "increase"),
        (_foreign_batch((5, 4 | 8 | 2, 2, 0), [_K, _V, msgpack.packb([6, 7])]), "increase"),
        (_foreign_batch((5, 4 | 8 | 2, 2, 0), [_K, _V, msgpack.packb([5, True])]), "increase"),
        (_foreign_batch((5, 4 | 8 | 2, 2, 0), [_K, _V, msgpack.packb([5])]), "not 2 keys"),
        (_foreign_batch((5, 4 | 2, 2, 0), [_K + _V, b""]), "not msgpack"),
    ],
)
def test_a_batch_frame_a_foreign_writer_got_wrong_is_refused_everywhere(
    frame: bytes, reason: str | None
) -> None:
    """A batch frame with a good CRC whose columns break the format is corruption to every reader, never records."""
    buf = seg.MAGIC + frame
    paths: list[Any] = [
        lambda: list(parse_frames(buf, 8, 0, MAX_FRAME, -1)),
        lambda: scan_frames(buf, 8, 0, -1, 10, FrameColumns(0)),
        lambda: seg._scan_frames_generally(buf, 8, 0, -1, 10, FrameColumns(0)),
        lambda: skip_frames(buf, 8, 0, -1, 100),
    ]
    for path in paths:
        if reason is None:
            path()
        else:
            with pytest.raises(BadFrame, match=reason) as info:
                path()
            assert info.value.position == 8


def test_encoding_refuses_what_no_reader_would_take() -> None:
    with pytest.raises(TypeError):
        encode_batch([(b"a", b"1"), ("b", b"2")], 0, 0, 8, 0)  # type: ignore[list-item]
    with pytest.raises(TypeError):
        encode_batch([(b"a", b"1"), (b"b", 2)], 0, 0, 8, 0)  # type: ignore[list-item]
    with pytest.raises(ValueError, match="increase"):
        encode_columns([3, 3], [b"a", b"b"], [b"1", b"2"], 0, 8, 0)
    # bytearray and memoryview are bytes to the log, as concatenation took them before.
    data, _ = encode_batch([(bytearray(b"a"), b"1"), (b"b", memoryview(b"2"))], 0, 0, 8, 0)  # type: ignore[list-item]
    assert [(f.key, f.value) for f in parse_frames(data, 0, 8, MAX_FRAME, -1)] == [(b"a", b"1"), (b"b", b"2")]


def test_frame_columns_give_records() -> None:
    columns = FrameColumns(3)
    scan_frames(encode_frame(5, 0, b"a", b"1") + encode_frame(9, 0, b"b", None), 0, 0, -1, 10, columns)
    assert columns.records() == [Record(3, 5, b"a", b"1"), Record(3, 9, b"b", None)]
    assert columns.record(1) == Record(3, 9, b"b", None) and len(columns) == 2 and columns.tombstones == [1]


@given(st.binary(max_size=300), st.binary(max_size=40))
def test_frames_carry_zlibs_crc32_and_keys_go_where_zlibs_crc32_sends_them(key: bytes, value: bytes) -> None:
    """The checksum and the partition of a key are zlib's CRC-32, as logs written before were.

    (The log computes it with zlib-ng, for speed; a log must read and route
    the same whichever computed it.)
    """
    frame = encode_frame(7, 0, key, value)
    length, crc = struct.unpack_from("<II", frame)
    assert crc == zlib.crc32(frame[8:]) and length == len(frame) - 8
    batch, _ = encode_batch([(key or b"k", value), (b"other", None)], 7, 0, 0, 0)
    assert struct.unpack_from("<I", batch, 4)[0] == zlib.crc32(batch[8:])
    log = LocalLog.__new__(LocalLog)  # partition_for reads only the partition count
    log._partitions = 7
    assert log.partition_for(key) == zlib.crc32(key) % 7


# -- the reader and the writer, on a real log ----------------------------------------------------


def _drain(reader: Any, columns: bool) -> Iterator[Record]:
    while True:
        read = reader.poll_columns(0.0, 37) if columns else reader.poll(0.0, 37)
        if not read:
            return
        if columns:
            for part in read:
                yield from part.records()
        else:
            yield from read


@pytest.mark.parametrize("partitions", [1, 3])
def test_a_reader_reads_the_same_records_as_columns_from_any_position(
    tmp_path: Path, partitions: int
) -> None:
    """Small segments, gaps left by compaction, tombstones; readers starting before, inside and past segments."""
    log = LocalLog(tmp_path, partitions=partitions, segment_bytes=1024, background_compaction=False)
    try:
        for round_ in range(6):
            log.append([(b"k%d" % (i % 17), msgpack.packb([round_, i])) for i in range(25)], timeout=10)
            log.append([(b"k%d" % i, None) for i in range(round_, 17, 5)], timeout=10)
            log.append([(b"single%d" % round_, b"v")], timeout=10)
        log.compact()
        begin, end = log.begin_offsets(), log.end_offsets()
        for start in ({p: begin[p] for p in begin}, {p: (begin[p] + end[p]) // 2 for p in begin}, end):
            as_records = list(_drain(log.open_reader(start), columns=False))
            as_columns = list(_drain(log.open_reader(start), columns=True))
            assert as_columns == as_records
            assert all(record.offset >= start[record.partition] for record in as_columns)
        everything = list(_drain(log.open_reader(begin), columns=True))
        assert len({(r.partition, r.offset) for r in everything}) == len(everything)
    finally:
        log.close()


def test_a_batch_append_writes_the_frames_of_its_records_in_order(tmp_path: Path) -> None:
    """What append() writes for a batch reads back as the batch, with offsets and partitions as it returned them."""
    log = LocalLog(tmp_path, partitions=2, background_compaction=False)
    try:
        batch = [(b"key%d" % i, None if i % 7 == 3 else b"value %d" % i) for i in range(500)]
        positions = log.append(batch, timeout=10)
        assert [p for p, _ in positions] == [log.partition_for(key) for key, _ in batch]
        for p in range(2):
            mine = [offset for part, offset in positions if part == p]
            assert mine == list(range(len(mine)))
        got = {(r.partition, r.offset): (r.key, r.value) for r in _drain(log.open_reader({0: 0, 1: 0}), True)}
        assert [got[position] for position in positions] == batch
    finally:
        log.close()
