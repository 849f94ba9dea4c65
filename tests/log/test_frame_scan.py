"""The embedded log's fast frame paths agree with the plain ones they replace.

Replay reads frames with ``scan_frames`` (and steps over those below its
position with ``skip_frames``), and ``append`` writes a batch with
``encode_frames``. Each must give exactly what ``parse_frames`` and
``encode_frame`` give, the same frames and the same error at the same file
position, on any bytes: whole, torn, or with any byte flipped or any length
field rewritten.
"""

from __future__ import annotations

import itertools
import struct
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
    encode_frame,
    encode_frames,
    parse_frames,
    scan_frames,
    skip_frames,
)

#: A record as the strategies draw it: key, value (None: a tombstone), offset step (0 or less: out of order).
records = st.lists(
    st.tuples(
        st.binary(max_size=12),
        st.one_of(st.none(), st.binary(max_size=40)),
        st.integers(min_value=-2, max_value=3),
    ),
    max_size=12,
)


@st.composite
def frame_buffers(draw: st.DrawFn) -> tuple[bytes, int, int, int]:
    """``(buffer, start, file_pos, after)``: frames after a prefix, then maybe damaged.

    Damage: cut the buffer anywhere (a torn tail), flip any byte, or rewrite
    a frame's length field (an impossible length, or one pointing into the
    next frame), or append garbage.
    """
    prefix = draw(st.binary(max_size=9))
    offset = draw(st.integers(min_value=-1, max_value=2**40))
    frames = []
    for key, value, step in draw(records):
        offset += step
        frames.append(encode_frame(offset, 1_700_000_000_000, key, value, batch_end=draw(st.booleans())))
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


def _plain(buf: bytes, start: int, file_pos: int, after: int, limit: int) -> tuple[list[Any], Any]:
    """What parse_frames yields (at most ``limit``), and the (position, reason) it raised, if it did."""
    taken: list[Any] = []
    try:
        for frame in itertools.islice(parse_frames(buf, start, file_pos, MAX_FRAME, after), limit):
            taken.append((frame.offset, frame.key, frame.value, frame.end - file_pos))
    except BadFrame as bad:
        return taken, (bad.position, bad.reason)
    return taken, None


def _scanned(buf: bytes, start: int, file_pos: int, after: int, limit: int) -> tuple[list[Any], Any, Any]:
    columns = FrameColumns(7)
    try:
        pos, last = scan_frames(buf, start, file_pos, after, limit, columns)
    except BadFrame as bad:
        error: Any = (bad.position, bad.reason)
        pos = last = None
    else:
        error = None
    assert len(columns.keys) == len(columns.values) == len(columns.offsets)
    assert columns.tombstones == [i for i, value in enumerate(columns.values) if value is None]
    return list(zip(columns.offsets, columns.keys, columns.values, strict=True)), error, (pos, last)


@settings(max_examples=600, deadline=None)
@given(frame_buffers(), st.integers(min_value=0, max_value=14))
def test_scan_frames_takes_and_refuses_what_parse_frames_does(
    case: tuple[bytes, int, int, int], limit: int
) -> None:
    buf, start, file_pos, after = case
    plain, plain_error = _plain(buf, start, file_pos, after, limit)
    scanned, error, (pos, last) = _scanned(buf, start, file_pos, after, limit)
    assert [frame[:3] for frame in plain] == scanned
    assert error == plain_error
    if error is None:
        # Where the next read starts: after the last frame taken, whose offset the next must exceed.
        assert pos == (plain[-1][3] if plain else start)
        assert last == (plain[-1][0] if plain else after)


@settings(max_examples=200, deadline=None)
@given(frame_buffers(), st.integers(min_value=0, max_value=14))
def test_the_general_scan_for_huge_buffers_agrees_too(case: tuple[bytes, int, int, int], limit: int) -> None:
    """The path scan_frames takes for a buffer longer than a frame may be (read whole by parse_frames)."""
    buf, start, file_pos, after = case
    plain, plain_error = _plain(buf, start, file_pos, after, limit)
    columns = FrameColumns(0)
    try:
        seg._scan_frames_generally(buf, start, file_pos, after, limit, columns)
    except BadFrame as bad:
        assert (bad.position, bad.reason) == plain_error
    else:
        assert plain_error is None
    assert [frame[:3] for frame in plain] == list(
        zip(columns.offsets, columns.keys, columns.values, strict=True)
    )


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frame_buffers(), st.integers(min_value=-1, max_value=2**40), st.sampled_from([1, 40, 1 << 16]))
def test_skip_frames_passes_what_a_reader_seeking_with_parse_frames_passes(
    case: tuple[bytes, int, int, int], position: int, interval: int
) -> None:
    buf, start, file_pos, after = case
    # The plain seek: parse_frames, stepping over the frames below the position and
    # indexing one every INDEX_INTERVAL bytes (the first included).
    expected_entries: list[tuple[int, int]] = []
    expected_pos, expected_after, expected_error = start, after, None
    next_entry = start
    try:
        for frame in parse_frames(buf, start, file_pos, MAX_FRAME, after):
            if frame.offset >= position:
                break
            if frame.position - file_pos >= next_entry:
                expected_entries.append((frame.offset, frame.position))
                next_entry = frame.position - file_pos + interval
            expected_after, expected_pos = frame.offset, frame.end - file_pos
    except BadFrame as bad:
        expected_error = (bad.position, bad.reason)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            seg, "INDEX_INTERVAL", interval
        )  # small intervals index several frames of a small buffer
        try:
            got = skip_frames(buf, start, file_pos, after, position)
        except BadFrame as bad:
            assert (bad.position, bad.reason) == expected_error
            return
    assert expected_error is None
    assert got == (expected_pos, expected_after, expected_entries)


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


def test_frame_columns_give_records() -> None:
    columns = FrameColumns(3)
    scan_frames(encode_frame(5, 0, b"a", b"1") + encode_frame(9, 0, b"b", None), 0, 0, -1, 10, columns)
    assert columns.records() == [Record(3, 5, b"a", b"1"), Record(3, 9, b"b", None)]
    assert columns.record(1) == Record(3, 9, b"b", None) and len(columns) == 2 and columns.tombstones == [1]


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
