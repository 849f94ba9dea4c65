"""LocalReader: reads every partition of the embedded log from given positions.

A reader entering a segment at or before its first record starts right after
the magic; one positioned inside a segment starts at the nearest entry of the
segment's sparse index and skips the frames before its position (outside the
log's lock), indexing what it passed. Records other processes append are seen
through the log's shared head, which a waiting poll looks at every few
milliseconds. Replay reads records column by column (``poll_columns``, with
``segments.scan_frames``); ``poll`` gives the same records as objects.
"""

from __future__ import annotations

import bisect
import os
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING

from ...errors import ClosedError, LogCorruptError, PositionOutOfRangeError
from ..base import LogReader, Record
from .segments import FRAME_HEAD, BadFrame, FrameColumns, Segment, scan_frames, segment_of, skip_frames

if TYPE_CHECKING:
    from . import LocalLog

__all__ = ["LocalReader"]

#: Bytes read from a segment per system call when replaying. Each chunk is a
#: new bytes object; with 4 MiB chunks a cold replay of 100,000 records ran
#: about 10% slower than with 1 MiB ones (measured A/B; larger allocations
#: tend to be fresh pages, faulted in one by one). A larger frame is still
#: read whole.
_READ_CHUNK = 1024 * 1024
#: Seconds a waiting poll sleeps between looks at the head (for other processes' appends).
_HEAD_POLL = 0.005
#: Times a reader reloads the segment lists for one file that is not what it expected.
_RELOADS = 5


def _open_segment(segment: Segment) -> int | None:
    """Open ``segment``'s file; None if the file there is not that segment any more.

    Another process's compaction may have deleted or replaced it since this
    process last reloaded the directory.
    """
    try:
        fd = os.open(segment.path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    if segment.ino and os.fstat(fd).st_ino != segment.ino:
        os.close(fd)
        return None
    return fd


class LocalReader(LogReader):
    """Reads every partition of a :class:`~kvlog.log.local.LocalLog` from given positions.

    Raises:
        PositionOutOfRangeError: a position is before the log start or past its end.
    """

    #: Replay's records per transaction from this log. Its records decode so
    #: fast that memory is what costs: the keys and values of a smaller batch
    #: are freed before the next is decoded, which reuses their memory instead
    #: of faulting in new pages. A cold replay of 100,000 and of 1,000,000
    #: records ran 20-30% faster at 10,000 a batch than at replay's default
    #: of 50,000 (5,000 and 20,000 were close; 2,000 slower again).
    replay_batch_records = 10_000

    def __init__(self, local_log: LocalLog, positions: Mapping[int, int]) -> None:
        self._log = local_log
        self._positions = {p: positions[p] for p in range(local_log.partitions)}
        # Per partition: (segment, open file descriptor, file position of the next frame).
        self._cursors: dict[int, tuple[Segment, int, int] | None] = dict.fromkeys(self._positions)
        self._next_partition = 0
        self._closed = False
        self._woken = False
        local_log._refresh()
        with local_log._cond:
            for p, position in self._positions.items():
                self._check_position(p, position)

    def positions(self) -> dict[int, int]:
        """Return the position (next offset to read) of every partition."""
        return dict(self._positions)

    def poll(self, timeout: float, max_records: int) -> list[Record]:
        """Return up to ``max_records`` records, waiting at most ``timeout`` seconds for the first."""
        return [record for columns in self.poll_columns(timeout, max_records) for record in columns.records()]

    def poll_columns(self, timeout: float, max_records: int) -> list[FrameColumns]:
        """:meth:`poll`, the records held column by column: one :class:`FrameColumns` per partition read.

        What replay reads (see :meth:`kvlog.cache.Cache.apply_columns`): no
        object is made per record beyond its key and value.
        """
        lg = self._log
        deadline = time.monotonic() + timeout
        while True:
            if self._closed or lg._closed:
                raise ClosedError(f"{lg.describe()} is closed")
            lg._refresh()  # what other processes published
            with lg._cond:
                if self._closed or lg._closed:
                    raise ClosedError(f"{lg.describe()} is closed")
                if any(self._positions[p] < lg._end[p] for p in self._positions):
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._woken:
                    self._woken = False
                    return []
                # Appends of this process notify; those of others are seen in the head.
                lg._readers_waiting += 1  # appends notify only while someone waits
                try:
                    lg._cond.wait(min(remaining, _HEAD_POLL))
                finally:
                    lg._readers_waiting -= 1
        read: list[FrameColumns] = []
        remaining = max_records
        n = lg.partitions
        for i in range(n):
            p = (self._next_partition + i) % n
            if remaining <= 0:
                break
            columns = FrameColumns(p)
            self._read_partition(p, columns, remaining)
            if columns:
                read.append(columns)
                remaining -= len(columns)
        self._next_partition = (self._next_partition + 1) % n
        return read

    def wakeup(self) -> None:
        """Make a ``poll`` waiting in another thread return ``[]`` now."""
        with self._log._cond:
            self._woken = True
            self._log._cond.notify_all()

    # -- locating offsets (callers hold the log's _cond) -------------------------

    def _check_position(self, p: int, position: int) -> None:
        lg = self._log
        segments = lg._segments[p]
        if position < segments[0].base or position > lg._end[p]:
            raise PositionOutOfRangeError(
                f"position {position} of partition {p} is outside the log "
                f"[{segments[0].base}, {lg._end[p]}] at {lg.path}"
            )

    def _following_base(self, p: int, segment: Segment) -> int | None:
        """The base offset of the segment after ``segment``, or None if it is the active one."""
        segments = self._log._segments[p]
        if segments[-1] is segment:
            return None
        # Callers checked that the segment was not replaced, so it is in the list.
        i = bisect.bisect_right([s.base for s in segments], segment.base) - 1
        return segments[i + 1].base

    def _locate(self, p: int, position: int) -> tuple[Segment, int]:
        """Return the segment holding ``position`` and a file position at or before its frame.

        Reads nothing: the position comes from the sparse index, or is the
        first frame. A reader that starts before its position skips the frames
        in between itself, outside the lock (appends go on meanwhile), and
        indexes what it passed.
        """
        self._check_position(p, position)
        segment = segment_of(self._log._segments[p], position)
        return segment, segment.start_for(position)

    # -- reading ------------------------------------------------------------------

    def _close_cursor(self, p: int) -> None:
        cursor = self._cursors[p]
        if cursor is not None:
            os.close(cursor[1])
            self._cursors[p] = None

    def _read_partition(self, p: int, out: FrameColumns, max_records: int) -> None:
        lg = self._log
        reloads = 0
        while len(out) < max_records:
            with lg._cond:
                end = lg._end[p]
                if self._positions[p] >= end:
                    return
                cursor = self._cursors[p]
                stale = None
                if cursor is None or cursor[0].replaced:
                    # First read, or compaction replaced the segment under us:
                    # find the position again. The descriptor is opened under
                    # the lock, and checked to be the file the segment object
                    # describes (another process may have compacted since).
                    self._close_cursor(p)
                    segment, file_pos = self._locate(p, self._positions[p])
                    fd = _open_segment(segment)
                    if fd is None:
                        stale = segment
                    else:
                        cursor = (segment, fd, file_pos)
                        self._cursors[p] = cursor
            if stale is not None:
                reloads += 1
                if reloads > _RELOADS:
                    raise LogCorruptError(f"{stale.path} keeps changing under a reader of {lg.describe()}")
                lg._reload_now(force=True)
                continue
            with lg._cond:
                assert cursor is not None
                segment, fd, file_pos = cursor
                visible = segment.size
                if segment.replaced:
                    continue
                following = self._following_base(p, segment)
            if file_pos >= visible:
                if following is None:
                    return  # the active segment has nothing more yet
                # Segment done: the position moves to the next segment's base,
                # past any offsets compaction removed at the segment's end.
                self._close_cursor(p)
                self._positions[p] = max(self._positions[p], following)
                continue
            self._read_chunk(p, segment, fd, file_pos, visible, out, max_records)

    def _read_chunk(
        self,
        p: int,
        segment: Segment,
        fd: int,
        file_pos: int,
        visible: int,
        out: FrameColumns,
        max_records: int,
    ) -> None:
        """Read the frames of one chunk of ``segment`` from ``file_pos`` (outside the log's lock)."""
        lg = self._log
        # Read a large chunk, but always at least the whole first frame.
        head = os.pread(fd, FRAME_HEAD.size, file_pos)
        if len(head) < FRAME_HEAD.size:
            raise LogCorruptError(f"{segment.path} is shorter than the log expects at position {file_pos}")
        first = FRAME_HEAD.size + FRAME_HEAD.unpack(head)[0]
        buf = os.pread(fd, min(max(_READ_CHUNK, first), visible - file_pos), file_pos)
        before = len(out)
        try:
            # A reader that entered the segment before its position (at an index
            # entry, or at the start) steps over the frames below it first; they
            # are remembered in the segment's sparse index, so that the next
            # seek there starts close.
            position = self._positions[p]
            pos, after, passed = skip_frames(buf, 0, file_pos, -1, position)
            # (A batch frame holding the position was not passed: the records below it are left out.)
            pos, _ = scan_frames(buf, pos, file_pos, after, max_records - before, out, position)
        except BadFrame as bad:
            raise lg._corrupt(p, segment, bad) from None
        if pos == 0 and len(out) == before:
            # Published bytes always end at a whole frame: one that does not fit is damage.
            raise lg._corrupt(p, segment, BadFrame(file_pos, "a record runs past the end of the segment"))
        if passed:
            with lg._cond:
                segment.index_passed_frames(passed)
        if len(out) > before:
            self._positions[p] = out.offsets[-1] + 1
        self._cursors[p] = (segment, fd, file_pos + pos)

    def close(self) -> None:
        """Close the reader's segment files. Idempotent."""
        if not self._closed:
            self._closed = True
            for p in list(self._cursors):
                self._close_cursor(p)
