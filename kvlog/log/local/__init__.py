"""The embedded compacted log, Kafka's log layout on local files: :class:`LocalLog` (open, append, close).

It behaves like a compacted Kafka topic behind :class:`~kvlog.log.Log`. The rest of the package:
``format`` (segment files), ``reader``, ``recovery`` (crash recovery at open), ``cleaner``
(compaction) and ``sample`` (the dirty-ratio estimate). The underscored attributes of
:class:`LocalLog` are shared by those modules and private to the package. Layout, durability,
recovery and compaction: see docs/design.md, "The embedded log".
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from ... import _fork
from ..._files import (
    DEFAULT_FILE_MODE,
    check_file_mode,
    fsync_dir,
    make_dirs,
    open_file,
    write_file_atomically,
)
from ...errors import ClosedError, LogCorruptError, LogLockedError, RecordTooLargeError, WriteError
from ..base import Log, oversize_record
from .cleaner import COMPACTOR_THREAD, Cleaner
from .reader import LocalReader
from .recovery import (
    CLEAN_SHUTDOWN_MARKER,
    finish_interrupted_swaps,
    recover_active_segment,
    take_clean_shutdown,
)
from .sample import HASH_MASK, HASH_MIX, SeenRecord
from .segments import (
    FORMAT_VERSION,
    FRAME_OVERHEAD,
    MAGIC,
    MAX_FRAME,
    BadFrame,
    Frame,
    Segment,
    encode_frame,
    parse_frames,
    segment_name,
)

__all__ = ["FRAME_OVERHEAD", "FSYNC_POLICIES", "LocalLog", "LocalReader", "encode_frame"]

log = logging.getLogger(__name__)

#: The values of ``LocalLog(fsync=...)``.
FSYNC_POLICIES = ("always", "interval", "never")

#: fdatasync where the OS has it (Linux); macOS has only fsync.
_datasync = getattr(os, "fdatasync", os.fsync)


def _write_json_atomically(path: Path, data: Mapping[str, Any]) -> None:
    write_file_atomically(path, json.dumps(data, sort_keys=True).encode(), sync=True)


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
        if not 0 < max_record_bytes <= MAX_FRAME - FRAME_OVERHEAD:
            raise ValueError(f"max_record_bytes must be in 1..{MAX_FRAME - FRAME_OVERHEAD}")
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
        self._segments: dict[int, list[Segment]] = {}
        self._end: dict[int, int] = {}
        self._active_fd: dict[int, int] = {}
        self._unsynced = False
        self._cleaner = Cleaner(self)
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
            self._cleaner.load_checkpoint(created=float(meta.get("created", 0.0)))
            clean_shutdown = take_clean_shutdown(self.path)
            for p in range(self._partitions):
                self._open_partition(p, clean_shutdown)
            self._cleaner.load_samples()
        except BaseException:
            self._release()
            raise
        self._closed = False
        _fork.register(self)
        if fsync == "interval":
            self._spawn(self._flush_loop, "kvlog-log-flusher")
        if background_compaction:
            self._spawn(self._cleaner.run, COMPACTOR_THREAD)
            # A log reopened dirty is looked at once; one that is not, only after a roll.
            if self._cleaner.is_due():
                self._cleaner.wake()

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
                empty = found.name == segment_name(0) and found.stat().st_size <= len(MAGIC)
                if found.suffix in (".log", ".swap", ".cleaned") and not empty:
                    raise LogCorruptError(
                        f"{meta_path} is missing but {directory} holds records; "
                        "restore log.json, or move the log away to start a new one"
                    )
        for p in range(partitions):
            directory = self.path / str(p)
            make_dirs(directory, self.file_mode)
            if not (directory / segment_name(0)).exists():
                self._create_segment_file(directory / segment_name(0))
        meta = {
            "format": FORMAT_VERSION,
            "log_id": uuid.uuid4().hex,
            "partitions": partitions,
            "created": time.time(),
        }
        self._save_json(meta_path, meta)
        return meta

    def _save_json(self, path: Path, data: Mapping[str, Any]) -> None:
        """Replace ``path`` with ``data`` as JSON, synced, then give it the log's file mode."""
        _write_json_atomically(path, data)  # owner-only until the chmod: never wider than asked
        if self.file_mode != DEFAULT_FILE_MODE:
            os.chmod(path, self.file_mode)

    def _open_partition(self, p: int, clean_shutdown: Mapping[str, Any]) -> None:
        directory = self.path / str(p)
        finish_interrupted_swaps(directory)
        bases = sorted(int(f.name[:-4]) for f in directory.glob("*.log") if f.name[:-4].isdigit())
        segments = []
        for base in bases:
            path = directory / segment_name(base)
            segments.append(Segment(path, base, path.stat().st_size))
        active = segments[-1]
        clean = clean_shutdown.get(str(p), {})
        if clean.get("base") == active.base and clean.get("size") == active.size:
            # Closed cleanly: the segment ends at a whole record. Skip the scan
            # (this is what makes a restart take milliseconds); index lazily.
            self.recovery[p] = []
            self._end[p] = int(clean["end"])
        else:
            self.recovery[p], self._end[p] = recover_active_segment(self.path, p, active)
        self._segments[p] = segments
        self._active_fd[p] = os.open(active.path, os.O_WRONLY)

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

    def _spawn(self, target: Callable[[], None], name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    # -- the interface ----------------------------------------------------------

    @property
    def partitions(self) -> int:
        """The number of partitions."""
        return self._partitions

    @property
    def max_record_bytes(self) -> int:
        """The largest key + value the log accepts."""
        return self._max_record_bytes

    @property
    def tombstone_retention_seconds(self) -> float:
        """How long compaction keeps a tombstone (``tombstone_retention``)."""
        return self.tombstone_retention

    def identity(self) -> dict[str, Any]:
        """Return the log's kind, id and partition count."""
        return {"kind": self.kind, "log_id": self.log_id, "partitions": self._partitions}

    def describe(self) -> str:
        """A short human description, e.g. ``embedded log at data/log``."""
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
        self._cleaner.lock = threading.Lock()
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
        oversize = oversize_record(records, limit)
        if oversize is not None:
            raise RecordTooLargeError(
                f"a record of {oversize[1]} bytes (key + value) is larger than the log accepts "
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
        index_entries = []
        sample = self._cleaner.samples[p]
        # The records of the keys the dirt sample follows (read without the
        # lock: its level only rises, and observe() checks again under it).
        threshold = sample.threshold
        seen: list[SeenRecord] = []
        crc32, mix, mask = zlib.crc32, HASH_MIX, HASH_MASK
        position = start_size
        last = len(records) - 1
        for n, (i, (key, value)) in enumerate(zip(indexes, records, strict=True)):
            frame = encode_frame(offset, timestamp, key, value, batch_end=n == last)
            frames.append(frame)
            index_entries.append((offset, position))
            size = len(frame)
            if (h := (crc32(key) * mix) & mask) < threshold:
                seen.append(SeenRecord(key, h, offset, size, -1 if value is not None else timestamp))
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
        # Published only after the write succeeded: no reader sees the records of a write cut back above.
        with self._cond:
            for entry in index_entries:
                segment.index_appended_frame(*entry)
            segment.size = position
            self._end[p] = offset
            if seen:
                sample.observe(seen, self._segments[p])
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
        path = self.path / str(p) / segment_name(base)
        self._create_segment_file(path)
        new = Segment(path, base, len(MAGIC))
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
        self._cleaner.wake()

    def begin_offsets(self) -> dict[int, int]:
        """Return the first offset of every partition (the base of its first segment)."""
        self._check_open()
        with self._cond:
            return {p: segments[0].base for p, segments in self._segments.items()}

    def end_offsets(self, timeout: float | None = None) -> dict[int, int]:
        """Return the end offset (one past the last record) of every partition."""
        self._check_open()
        with self._cond:
            return dict(self._end)

    def open_reader(self, positions: Mapping[int, int]) -> LocalReader:
        """Return a reader positioned at ``positions`` (one entry per partition)."""
        self._check_open()
        return LocalReader(self, positions)

    # -- reading segments whole (for compaction) ----------------------------------

    def _segment_frames(self, p: int, segment: Segment, size: int) -> Iterator[Frame]:
        """The frames of ``segment`` up to ``size``; a bad one raises :meth:`_corrupt`'s error."""
        with open(segment.path, "rb") as f:
            data = f.read(size)
        try:
            yield from parse_frames(data, len(MAGIC), 0, MAX_FRAME, -1)
        except BadFrame as bad:
            raise self._corrupt(p, segment, bad) from None

    def _corrupt(self, p: int, segment: Segment, bad: BadFrame) -> LogCorruptError:
        """The error for a bad frame found while reading; marks an active segment for repair."""
        with self._cond:
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

    # -- compaction (see cleaner.py) ------------------------------------------------

    def dirty_ratio(self, p: int) -> float:
        """The share of partition ``p``'s closed segments' bytes a compaction pass would remove.

        That is the records a later record of their key supersedes, and the
        tombstones older than ``tombstone_retention``. Estimated from a sample
        of the keys (exact while a partition has at most a few thousand
        keys); the records an unclean shutdown left uncounted are read first.
        """
        return self._cleaner.dirty_ratio(p)

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
        return self._cleaner.compact()

    def tombstones_dropped_after(self, positions: Mapping[int, int], since: float) -> bool:
        """Whether compaction dropped a tombstone at or past ``positions`` after ``since`` (unix time).

        Exact for this log (it records every pass that dropped tombstones), so a
        cache that was away for any length of time knows whether it may have
        missed a delete.
        """
        return self._cleaner.tombstones_dropped_after(positions, since)

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
        cleaner = self._cleaner
        partitions: dict[int, dict[str, Any]] = {}
        for p in range(self._partitions):
            with self._cond:
                segments = self._segments[p]
                partitions[p] = {
                    "segments": len(segments),
                    "bytes": sum(s.size for s in segments),
                    "begin_offset": segments[0].base,
                    "end_offset": self._end[p],
                    "cleaned_to": cleaner.cleaned_to.get(p, 0),
                }
            # What the sample counted so far: stats never read the log (after an
            # unclean shutdown, the background cleaner counts the rest soon).
            partitions[p]["dirty_ratio"] = round(cleaner.estimated_dirty_ratio(p), 3)
        return {
            "path": str(self.path),
            "fsync": self.fsync,
            "segment_bytes": self.segment_bytes,
            "partitions": partitions,
            "recovery": self.recovery,
            "last_compaction": self.last_compaction,
            "cleaner": {
                "background": any(t.name == COMPACTOR_THREAD for t in self._threads),
                "wakeups": cleaner.wakeups,
                "handled": cleaner.wakeups_handled,
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
            self._cleaner.notify_closed()
        _fork.unregister(self)
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join()
        self._cleaner.close()  # a compaction started by compact() in another thread finishes first
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
                    self.path / CLEAN_SHUTDOWN_MARKER, {"format": FORMAT_VERSION, "partitions": marker}
                )
        self._active_fd = {}
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor drops the flock
            self._lock_fd = None
