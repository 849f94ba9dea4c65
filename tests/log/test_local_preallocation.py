"""Durable appends land in space preallocated ahead of the active segment's end.

With ``fsync="always"`` an append that grows its file pays, in its
fdatasync, for journaling the file's new size; the embedded log extends the
active segment ahead of its end so that appends land inside the file's size
(docs/design.md, "The embedded log"). None of it may show: a log at rest holds
no preallocated space, a rolled segment ends at its last record, and neither a
killed process nor an OS crash loses an acknowledged write or reports a repair
for the zeros it left.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from _head import read_head, simulate_os_crash

from kvlog.log.local import LocalLog
from kvlog.log.local.segments import MAGIC, parse_frames

RECORDS = [(f"key-{i}".encode(), f"value-{i}".encode() * 3) for i in range(40)]


def read_all(local: LocalLog) -> list[tuple[int, bytes, bytes | None]]:
    reader = local.open_reader({0: 0})
    try:
        got: list[tuple[int, bytes, bytes | None]] = []
        end = local.end_offsets()[0]
        while len(got) < end:
            batch = reader.poll(1.0, 1000)
            assert batch, f"read {len(got)} of {end} records, then nothing"
            got.extend((r.offset, r.key, r.value) for r in batch)
        return got
    finally:
        reader.close()


def active_segment(log_dir: Path) -> Path:
    return max((log_dir / "0").glob("*.log"))


def published_size(log_dir: Path) -> int:
    return read_head(log_dir).entries[0][2]


def ends_at_its_last_record(segment: Path) -> bool:
    data = segment.read_bytes()
    frames = list(parse_frames(data, len(MAGIC), 0, 1 << 30, -1))
    return (frames[-1].end if frames else len(MAGIC)) == len(data)


def test_appends_land_inside_the_file_and_a_closed_log_holds_none_of_the_space(tmp_path: Path) -> None:
    log_dir = tmp_path / "log"
    local = LocalLog(log_dir, fsync="always", background_compaction=False)
    try:
        for record in RECORDS:
            local.append([record])
        # Appends land inside the file's size: the next one grows nothing.
        assert active_segment(log_dir).stat().st_size > published_size(log_dir)
    finally:
        local.close()
    assert active_segment(log_dir).stat().st_size == published_size(log_dir)
    assert ends_at_its_last_record(active_segment(log_dir))
    reopened = LocalLog(log_dir, background_compaction=False)
    try:
        assert reopened.recovery[0] == []
        assert [(k, v) for _, k, v in read_all(reopened)] == RECORDS
    finally:
        reopened.close()


def test_a_rolled_segment_ends_at_its_last_record(tmp_path: Path) -> None:
    log_dir = tmp_path / "log"
    local = LocalLog(log_dir, fsync="always", segment_bytes=1024, background_compaction=False)
    try:
        for record in RECORDS:
            local.append([record])
        closed = sorted((log_dir / "0").glob("*.log"))[:-1]
        assert len(closed) >= 2
        for segment in closed:
            assert ends_at_its_last_record(segment), f"{segment.name} holds bytes past its last record"
    finally:
        local.close()


CHILD = textwrap.dedent(
    """
    import sys
    from kvlog.log.local import LocalLog
    local = LocalLog(sys.argv[1], fsync="always", background_compaction=False)
    for i in range(int(sys.argv[2])):
        local.append([(f"key-{i}".encode(), f"value-{i}".encode() * 3)])
    print("acked", flush=True)
    sys.stdin.read()  # killed here, with the log open
    """
)


def killed_writer(log_dir: Path) -> None:
    """A process that appends every record of RECORDS, acknowledged, and is SIGKILLed with the log open."""
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(log_dir), str(len(RECORDS))],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = child.stdout.readline() if child.stdout else ""
        if line.strip() != "acked":
            child.kill()
            pytest.fail(f"the writer did not acknowledge its appends: {line!r} {child.communicate()[1]}")
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
        child.communicate()


def test_a_killed_writers_preallocated_space_is_trusted_and_reused(tmp_path: Path) -> None:
    log_dir = tmp_path / "log"
    killed_writer(log_dir)
    segment = active_segment(log_dir)
    before = segment.stat()
    assert before.st_size > published_size(log_dir)  # the kill left preallocated space
    local = LocalLog(log_dir, fsync="always", background_compaction=False)
    try:
        assert local.recovery[0] == []
        # The open trusted the head: it did not scan and cut the segment.
        after = segment.stat()
        assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
        assert [(k, v) for _, k, v in read_all(local)] == RECORDS
        assert local.append([(b"next", b"after the kill")]) == [(0, len(RECORDS))]
        assert read_all(local)[-1] == (len(RECORDS), b"next", b"after the kill")
    finally:
        local.close()
    assert segment.stat().st_size == published_size(log_dir)


def test_after_an_os_crash_the_zeros_are_cut_and_no_repair_is_reported(tmp_path: Path) -> None:
    log_dir = tmp_path / "log"
    killed_writer(log_dir)
    simulate_os_crash(log_dir)
    segment = active_segment(log_dir)
    assert segment.stat().st_size > published_size(log_dir)
    local = LocalLog(log_dir, fsync="always", background_compaction=False)
    try:
        assert local.recovery[0] == []  # zeros are not records: nothing was lost or repaired
        assert segment.stat().st_size == published_size(log_dir)  # the scan cut them
        assert [(k, v) for _, k, v in read_all(local)] == RECORDS
        assert local.append([(b"next", b"after the crash")]) == [(0, len(RECORDS))]
    finally:
        local.close()
    reopened = LocalLog(log_dir, background_compaction=False)
    try:
        assert reopened.recovery[0] == []
        assert read_all(reopened)[-1] == (len(RECORDS), b"next", b"after the crash")
    finally:
        reopened.close()


def test_bytes_other_than_zeros_past_the_published_end_are_scanned_and_cut(tmp_path: Path) -> None:
    log_dir = tmp_path / "log"
    killed_writer(log_dir)
    segment = active_segment(log_dir)
    size = segment.stat().st_size
    published = published_size(log_dir)
    with open(segment, "r+b") as f:  # something wrote into the preallocated space
        f.seek(size - 20)
        f.write(b"\xff" * 20)
    local = LocalLog(log_dir, background_compaction=False)
    try:
        [entry] = local.recovery[0]
        assert entry["truncated_bytes"] == size - published
        assert entry["last_good_offset"] == len(RECORDS) - 1
        assert [(k, v) for _, k, v in read_all(local)] == RECORDS
    finally:
        local.close()
    assert os.path.getsize(segment) == published_size(log_dir)
