"""The embedded compacted log, Kafka's log layout on local files: :class:`LocalLog` (open, append, close).

It behaves like a compacted Kafka topic behind :class:`~kvlog.log.Log`. The rest of the package:
``segments`` (segment files), ``head`` (the published state every process maps), ``reader``,
``recovery`` (crash recovery), ``cleaner`` (compaction) and ``sample`` (the dirty-ratio
estimate). The underscored attributes of :class:`LocalLog` are shared by those modules and
private to the package. Any number of processes (and of instances in one process) open the same
directory at once, like SQLite in WAL mode. Layout, locks, durability, recovery and compaction:
see docs/design.md, "The embedded log".
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import itertools
import json
import logging
import operator
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from zlib_ng.zlib_ng import crc32

from ... import _fork
from ..._files import (
    DEFAULT_FILE_MODE,
    check_file_mode,
    fsync_dir,
    make_dirs,
    open_file,
    write_file_atomically,
)
from ...errors import ClosedError, LogCorruptError, RecordTooLargeError, WriteError
from ..base import Log, oversize_record
from .cleaner import COMPACTOR_THREAD, Cleaner
from .head import W_CLEAN, W_VERSION, W_WRITING, Entry, Head, Snapshot, current_boot_id
from .reader import LocalReader
from .recovery import (
    cut_unpublished,
    finish_interrupted_swaps,
    recover_active_segment,
    take_clean_shutdown,
)
from .sample import HASH_MASK, HASH_MIX, SeenRecord
from .segments import (
    FORMAT_VERSION,
    FRAME_OVERHEAD,
    INDEX_INTERVAL,
    MAGIC,
    MAX_FRAME,
    PREALLOCATE_BYTES,
    READABLE_FORMATS,
    BadFrame,
    Frame,
    Segment,
    encode_columns,
    encode_frame,
    only_zeros,
    parse_frames,
    segment_name,
)

__all__ = ["FRAME_OVERHEAD", "FSYNC_POLICIES", "LocalLog", "LocalReader", "encode_frame"]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: The values of ``LocalLog(fsync=...)``.
FSYNC_POLICIES = ("always", "interval", "never")

#: fdatasync where the OS has it (Linux); macOS has only fsync.
_datasync = getattr(os, "fdatasync", os.fsync)


def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """Linux's ``sync_file_range`` from the C library (the os module lacks it), or None where there is none."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        function = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    function.restype = ctypes.c_int
    return function


_start_writeback = _sync_file_range()
#: SYNC_FILE_RANGE_WRITE: start writing the range's dirty pages out, without waiting.
_WRITEBACK = 2
#: Writes at least this large start their writeback before the work that comes before the fdatasync.
_WRITEBACK_FROM_BYTES = 16 * 1024

#: The write lock: flock()ed exclusively for one append (or roll, swap, reload), never longer.
LOCK_FILE = "LOCK"
#: flock()ed shared by every open instance: the close that can take it exclusively is the last user.
OPEN_FILE = "OPEN"
#: flock()ed exclusively for a compaction pass: one pass at a time, over every process.
COMPACT_FILE = "COMPACT"

_flock = fcntl.flock


def _preallocate(fd: int, start: int, length: int) -> int:
    """Make the file at least ``start + length`` long; return that end (0 on failure).

    posix_fallocate never shrinks a file, so it is safe on one that is already
    longer. No fstat asks first: on ext4 a stat marks the inode's change
    counter as seen, and the next write must then journal the inode, which
    made every fdatasync about half again as slow.
    """
    try:
        os.posix_fallocate(fd, start, length)
    except OSError:
        return 0  # no room for the whole chunk, or no fallocate: the write itself extends the file
    return start + length


_LOCK_EX, _LOCK_UN = fcntl.LOCK_EX, fcntl.LOCK_UN


def _write_json_atomically(path: Path, data: Mapping[str, Any]) -> None:
    write_file_atomically(path, json.dumps(data, sort_keys=True).encode(), sync=True)


_first, _second = operator.itemgetter(0), operator.itemgetter(1)


def _followed(
    keys: Sequence[bytes],
    values: Sequence[bytes | None],
    crcs: Sequence[int],
    offset: int,
    timestamp: int,
    threshold: int,
) -> list[SeenRecord]:
    """The records (the first at ``offset``) whose key the dirt sample follows: its hash below ``threshold``.

    The hash of every key (see :func:`~kvlog.log.local.sample.key_hash`) is
    computed and compared in C loops; only the followed records, a few
    thousand keys' worth at most, are looked at in Python. A record's size is
    what it takes in the batch frames :func:`~kvlog.log.local.segments.encode_batch`
    writes (:func:`~kvlog.log.local.segments.record_bytes`).
    """
    hashes = list(
        map(operator.and_, map(operator.mul, crcs, itertools.repeat(HASH_MIX)), itertools.repeat(HASH_MASK))
    )
    seen = []
    make = tuple.__new__  # SeenRecord(...) runs a Python __new__; this builds the same tuple in C
    for i in itertools.compress(itertools.count(), map(threshold.__gt__, hashes)):
        key, value = keys[i], values[i]
        # record_bytes(key, value), inline: a fifth of the cost of a followed record.
        n = len(key)
        size = n + (2 if n < 256 else 3 if n < 65536 else 5)
        if value is None:
            seen.append(make(SeenRecord, (key, hashes[i], offset + i, size + 1, timestamp)))
        else:
            n = len(value)
            size += n + (2 if n < 256 else 3 if n < 65536 else 5)
            seen.append(make(SeenRecord, (key, hashes[i], offset + i, size, -1)))
    return seen


class LocalLog(Log):
    """A compacted log in a local directory (the embedded default of :class:`~kvlog.KVLog`).

    Any number of instances, in any number of processes, may have one
    directory open at once, each reading and writing. Appends serialise on
    an ``flock`` of ``LOCK`` held only for the append; the published end of
    every partition is in the shared, memory-mapped ``head`` file, so every
    instance sees every other's records.

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
        self._lock_fd: int | None = None  # LOCK: the write lock
        self._open_fd: int | None = None  # OPEN: shared while open
        self._compact_fd: int | None = None  # COMPACT: the compaction lock
        self._head: Head | None = None
        #: The head version and generation this instance's view of the segments reflects.
        self._version = -1
        self._generation = -1
        # _mutex guards segments, end offsets, closed; readers wait on _cond. The
        # append path takes _mutex itself: a C-level lock, where entering the
        # Condition runs two Python methods.
        self._mutex = threading.RLock()
        self._cond = threading.Condition(self._mutex)
        # Readers waiting on _cond for appends (an append notifies only if there are any).
        self._readers_waiting = 0
        self._append_lock = threading.Lock()  # one thread of this instance at the write lock at a time
        self._segments: dict[int, list[Segment]] = {}
        self._end: dict[int, int] = {}
        self._active_fd: dict[int, int] = {}
        self._unsynced = False
        self._cleaner = Cleaner(self)
        self._threads: list[threading.Thread] = []
        #: What the last open found and repaired: per partition, a list of
        #: ``{"segment", "truncated_bytes", "reason", "last_good_offset"}``.
        self.recovery: dict[int, list[dict[str, Any]]] = {}
        #: The report of the last compaction (see :meth:`compact`).
        self.last_compaction: dict[str, Any] | None = None
        try:
            make_dirs(self.path, self.file_mode)
            alone = self._take_open_lock()
            self._lock_fd = open_file(self.path / LOCK_FILE, os.O_RDWR, self.file_mode)
            self._compact_fd = open_file(self.path / COMPACT_FILE, os.O_RDWR, self.file_mode)
            with self._append_lock:
                _flock(self._lock_fd, _LOCK_EX)
                try:
                    meta = self._load_meta(partitions)
                    self.log_id: str = meta["log_id"]
                    self._partitions: int = meta["partitions"]
                    self._cleaner.load_checkpoint(created=float(meta.get("created", 0.0)))
                    self._open_partitions(alone)
                finally:
                    _flock(self._lock_fd, _LOCK_UN)
            if alone:
                assert self._open_fd is not None
                _flock(self._open_fd, fcntl.LOCK_SH)  # let other instances open now
            self._cleaner.remove_leftovers_if_idle()
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
            # A log that its saved samples say is dirty is looked at once; any other only
            # after a roll. What the samples have not counted is not a reason: the process
            # that compacts counts it, once for every process (see Cleaner.is_due).
            if self._cleaner.is_due():
                self._cleaner.wake()

    # -- opening --------------------------------------------------------------

    def _take_open_lock(self) -> bool:
        """Hold ``OPEN`` shared for the life of this instance; return whether no other instance is open.

        Then it is held exclusively until the open is done (the caller
        converts it), so that a second instance waits for this open to finish.
        """
        fd = self._open_fd = open_file(self.path / OPEN_FILE, os.O_RDWR, self.file_mode)
        try:
            _flock(fd, _LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _flock(fd, fcntl.LOCK_SH)  # waits while the last user of the log closes it
            return False
        return True

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
            and meta.get("format") in READABLE_FORMATS
            and isinstance(meta.get("log_id"), str)
            and isinstance(meta.get("partitions"), int)
            and not isinstance(meta.get("partitions"), bool)
            and meta["partitions"] >= 1
            and isinstance(meta.get("created", 0.0), int | float)
        )
        if not ok:
            raise LogCorruptError(
                f"{meta_path} is not the metadata of a kvlog log of format "
                f"{' or '.join(map(str, READABLE_FORMATS))}: {meta!r}"
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
        if meta["format"] != FORMAT_VERSION:
            # Appends write batch frames, which an older kvlog would misread: from now on
            # it refuses the log (under the write lock, before anything is written).
            meta["format"] = FORMAT_VERSION
            self._save_json(meta_path, meta)
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

    def _list_segments(self, p: int) -> list[Segment]:
        """The segments of partition ``p`` in its directory, with their file sizes (callers hold the write lock)."""
        directory = self.path / str(p)
        bases = sorted(int(f[:-4]) for f in os.listdir(directory) if f.endswith(".log") and f[:-4].isdigit())
        segments = []
        for base in bases:
            path = directory / segment_name(base)
            st = os.stat(path)
            segments.append(Segment(path, base, st.st_size).identify(st))
        return segments

    def _open_partitions(self, alone: bool) -> None:
        """Recover and take up every partition (under the write lock; see "Opening" in docs/design.md).

        The head's sizes are trusted if it was written in this boot (a killed
        process loses nothing the page cache holds) or if the last close
        marked it clean; an active segment whose size is not the published one
        is scanned. Without a head (the old layout), the clean-shutdown marker
        is read instead, and the head is created.
        """
        head = Head.open(self.path, self._partitions)
        marker: Mapping[str, Any] = {}
        snap: Snapshot | None = None
        trusted = False
        if head is None:
            marker = take_clean_shutdown(self.path)
        else:
            self._head = head
            snap = head.snapshot()
            boot = current_boot_id()
            trusted = head.clean or (head.boot_id == boot and any(boot))
            if head.writing and trusted:
                # A writer died mid-append (or mid-roll): cut what it never published.
                for p, entry in enumerate(snap.entries):
                    cut = cut_unpublished(self.path, p, entry.base, entry.size)
                    if cut is not None:
                        cut["last_good_offset"] = entry.end - 1 if entry.end > entry.base else None
                        self.recovery.setdefault(p, []).append(cut)
            head.writing = False
        entries: list[Entry] = []
        for p in range(self._partitions):
            finish_interrupted_swaps(self.path / str(p))
            segments = self._list_segments(p)
            active = segments[-1]
            report = self.recovery.setdefault(p, [])
            end = -1
            if snap is not None and head is not None:
                entry = snap.entries[p]
                if (
                    trusted
                    and entry.base == active.base
                    and entry.end >= active.base
                    and not (alone and head.suspect(p))
                    and (
                        entry.size == active.size
                        # Space preallocated past the published end (fsync="always").
                        or (
                            entry.size < active.size <= entry.size + 2 * PREALLOCATE_BYTES
                            and only_zeros(active.path, entry.size, active.size)
                        )
                    )
                ):
                    end = entry.end  # no scan: what makes an open take milliseconds
                    active.size = entry.size
            else:
                clean = marker.get(str(p), {})
                if clean.get("base") == active.base and clean.get("size") == active.size:
                    end = int(clean["end"])
            if end < 0:
                found, end = recover_active_segment(self.path, p, active)
                report.extend(found)
                active.identify(os.stat(active.path))
                if head is not None:
                    head.set_suspect(p, False)
            self._segments[p] = segments
            self._end[p] = end
            self._active_fd[p] = os.open(active.path, os.O_WRONLY)
            entries.append(Entry(end, active.base, active.size))
        if head is None:
            self._head = head = Head.create(self.path, entries, self.file_mode)
        elif snap is None or entries != snap.entries or head.boot_id != current_boot_id():
            head.publish(dict(enumerate(entries)), generation_step=1)
            head.stamp_boot()
            head.writing = False
        snap = head.snapshot()
        self._version, self._generation = snap.version, snap.generation

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
        # The lock files' descriptors share their open file descriptions (and so their flocks)
        # with the parent: closed here, without unlocking (that would unlock the parent's), so
        # that a parent that dies holding the write lock does not leave it held by this child.
        for name in ("_lock_fd", "_open_fd", "_compact_fd"):
            fd = getattr(self, name)
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
                setattr(self, name, None)
        if self._head is not None:
            self._head.abandon()
            self._head = None
        # Locks another thread of the parent held at the fork stay held forever in the child.
        self._mutex = threading.RLock()
        self._cond = threading.Condition(self._mutex)
        self._readers_waiting = 0
        self._append_lock = threading.Lock()
        self._cleaner.lock = threading.Lock()
        self._threads = []

    def partition_for(self, key: bytes) -> int:
        """The partition a key's records go to (stable across processes and versions)."""
        return crc32(key) % self._partitions if self._partitions > 1 else 0

    # -- the shared state: the write lock and the head ---------------------------------

    @contextlib.contextmanager
    def _write_locked(self, force_reload: bool = False) -> Iterator[None]:
        """Hold the write lock (this instance's threads, then every process), with the view synced."""
        with self._append_lock:
            fd = self._lock_fd
            if fd is None:
                raise ClosedError(f"{self.describe()} is closed")
            _flock(fd, _LOCK_EX)
            try:
                self._sync_locked(force_reload)
                yield
            finally:
                _flock(fd, _LOCK_UN)

    def _sync_locked(self, force_reload: bool = False) -> None:
        """Bring this instance's view up to the head (callers hold the write lock).

        Cuts what a writer that died mid-append left; reloads the segment lists
        if the generation moved (under the write lock the directory is never
        half-way through a swap).
        """
        head = self._head
        assert head is not None
        for segments in self._segments.values():
            segments[-1].allocated = 0  # another process may have cut or rolled it
        if head.writing:
            self._cut_unpublished_locked()
        if head.version == self._version and not force_reload:
            return
        snap = head.snapshot()
        if force_reload or snap.generation != self._generation:
            self._reload(snap)
        else:
            self._adopt(snap)

    def _cut_unpublished_locked(self) -> None:
        head = self._head
        assert head is not None
        head.forget_last()
        for p, entry in enumerate(head.snapshot().entries):
            cut_unpublished(self.path, p, entry.base, entry.size)
        head.writing = False

    def _refresh(self) -> None:
        """See what other processes published (readers call this; one word read when nothing changed)."""
        head = self._head
        if head is None or head.words[W_VERSION] == self._version:
            return
        snap = head.snapshot()
        if snap.generation != self._generation:
            self._reload_now()
        else:
            self._adopt(snap)

    def _reload_now(self, force: bool = False) -> None:
        """Reload the segment lists under the write lock (a reader found the directory changed)."""
        self._check_open()
        with self._write_locked(force_reload=force):
            pass

    def _adopt(self, snap: Snapshot) -> None:
        """Take up the ends another process published (the segment lists did not change)."""
        samples = self._cleaner.samples
        with self._cond:
            if snap.version <= self._version:
                return
            moved = False
            for p, entry in enumerate(snap.entries):
                old = self._end[p]
                if entry.end > old:
                    segment = self._segments[p][-1]
                    if segment.base == entry.base:
                        segment.size = max(segment.size, entry.size)
                    self._end[p] = entry.end
                    sample = samples.get(p)
                    if sample is not None:
                        sample.add_pending(old, entry.end)  # records this sample has not seen
                    moved = True
            self._version = snap.version
            if moved:
                self._cond.notify_all()

    def _reload(self, snap: Snapshot) -> None:
        """Reload every partition's segment list from the directory (callers hold the write lock).

        Segments whose file is still the one this instance knew keep their
        objects (and sparse indexes); the others are marked ``replaced``, so
        that a reader on one finds its position again in the new list. A
        ``.swap`` found now was left by a swapper that died: it is finished.
        """
        for p in range(self._partitions):
            finish_interrupted_swaps(self.path / str(p))
            entry = snap.entries[p]
            old_list = self._segments[p]
            old_active = old_list[-1]
            known = {s.base: s for s in old_list}
            new_list: list[Segment] = []
            for found in self._list_segments(p):
                segment = known.get(found.base)
                # The file this instance knew as active is held open by it: its inode cannot
                # be reused. A closed one is the same file only if nothing rewrote it.
                same = segment is not None and (
                    segment.ino == found.ino and (segment is old_active or segment.mtime_ns == found.mtime_ns)
                )
                if segment is None or not same:
                    segment = found
                elif segment is old_active:
                    segment.identify(os.stat(segment.path))
                segment.size = entry.size if found.base == entry.base else found.size
                new_list.append(segment)
            kept = {id(s) for s in new_list}
            replaced = [s for s in old_list if id(s) not in kept]
            fresh = self._cleaner.fresh_sample(p, new_list, entry.end) if replaced else None
            with self._cond:
                for segment in replaced:
                    segment.replaced = True
                self._segments[p] = new_list
                old_end = self._end[p]
                self._end[p] = entry.end
                if fresh is not None:
                    # Another process compacted: this sample's counts describe files that are gone.
                    self._cleaner.samples[p] = fresh
                elif entry.end > old_end and p in self._cleaner.samples:
                    self._cleaner.samples[p].add_pending(old_end, entry.end)
            if new_list[-1] is not old_active:
                self._switch_active_fd(p, new_list[-1])
        with self._cond:
            self._version, self._generation = snap.version, snap.generation
            self._cond.notify_all()

    def _switch_active_fd(self, p: int, active: Segment) -> None:
        """Write to ``active`` from now on (another process rolled, or compaction renamed)."""
        old = self._active_fd.get(p)
        new = os.open(active.path, os.O_WRONLY)
        with self._cond:
            self._active_fd[p] = new
        if old is not None:
            try:
                if self._unsynced and self.fsync != "never":
                    _datasync(old)  # what this instance wrote there with fsync="interval"
            finally:
                os.close(old)

    def _publish_generation(self) -> None:
        """Tell every process that a segment list changed (callers hold the write lock)."""
        head = self._head
        assert head is not None
        with self._cond:
            self._version = head.publish((), generation_step=1)
            self._generation = head.snapshot().generation

    # -- appending --------------------------------------------------------------------------

    def append(
        self,
        records: Sequence[tuple[bytes, bytes | None]],
        timeout: float = 30.0,
        *,
        on_appended: Callable[[dict[int, int], list[tuple[int, int]], dict[int, int]], object] | None = None,
        msgpack_values: bool = False,
    ) -> list[tuple[int, int]]:
        """Append records; return after they are written (and synced, per the fsync policy).

        ``on_appended(before, positions, after)``, if given, is called while
        the write lock is still held, once the records are written, synced and
        published: ``before`` and ``after`` are the end offsets of every
        partition just before and just after this append, ``positions`` what
        this returns. No other append, in any process, comes in between. If it
        raises, the records stay appended and the exception propagates. It is
        not called for an empty ``records``.

        ``msgpack_values``: kvlog's msgpack codec encoded every value (the
        store says so for its own writes); the frames carry the flag that
        lets a store with that codec replay them without checking each value
        again. A caller that sets it for other bytes makes such a store serve
        them unchecked.

        Raises:
            RecordTooLargeError: a key + value is larger than ``max_record_bytes`` (nothing written).
            WriteError: the disk refused the write (nothing of the failed partition's batch stays).
        """
        if len(records) == 1 and not self._closed:
            key, value = records[0]
            if len(key) + (0 if value is None else len(value)) <= self._max_record_bytes:
                if on_appended is None:
                    p, offset, _ = self.append_one(key, value, msgpack_values=msgpack_values)
                    return [(p, offset)]
                then = on_appended

                def adapted(
                    key: bytes, value: bytes | None, p: int, offset: int, ends: dict[int, int]
                ) -> None:
                    then({**ends, p: offset}, [(p, offset)], dict(ends))

                p, offset, _ = self.append_one(key, value, adapted, msgpack_values=msgpack_values)
                return [(p, offset)]
        self._check_open()
        if not records:
            return []
        # The longest key plus the longest value bound every record's size (loops in C); only a
        # batch they do not clear is looked at record by record.
        # The two columns, taken once: for the size check, the routing and the frames.
        keys = list(map(_first, records))
        values = list(map(_second, records))
        longest = max(map(len, keys)) + max(map(len, filter(None, values)), default=0)
        if longest > self._max_record_bytes:
            oversize = oversize_record(records, self._max_record_bytes)
            if oversize is not None:
                raise self._too_large(oversize[1])
        with self._append_lock:
            self._check_open()
            fd = self._lock_fd
            assert fd is not None
            _flock(fd, _LOCK_EX)
            try:
                head = self._take_up_head()
                words = head.words
                before = dict(self._end) if on_appended is not None else None
                timestamp = time.time_ns() // 1_000_000
                result: list[tuple[int, int]] = []
                # Each key's crc32 routes it to its partition and feeds the dirt sample.
                crcs = list(map(crc32, keys))
                words[W_WRITING] = 1  # bytes past the published ends from here on: see _sync_locked
                if self._partitions == 1:
                    self._append_partition(0, keys, values, crcs, timestamp, None, result, msgpack_values)
                else:
                    result.extend(itertools.repeat((0, 0), len(records)))
                    by_partition: dict[int, list[int]] = {}
                    for i, crc in enumerate(crcs):
                        by_partition.setdefault(crc % self._partitions, []).append(i)
                    for p, indexes in by_partition.items():
                        self._append_partition(
                            p,
                            [keys[i] for i in indexes],
                            [values[i] for i in indexes],
                            [crcs[i] for i in indexes],
                            timestamp,
                            indexes,
                            result,
                            msgpack_values,
                        )
                words[W_WRITING] = 0
                if on_appended is not None:
                    assert before is not None
                    on_appended(before, result, dict(self._end))
                return result
            finally:
                _flock(fd, _LOCK_UN)

    def _too_large(self, size: int) -> RecordTooLargeError:
        return RecordTooLargeError(
            f"a record of {size} bytes (key + value) is larger than the log accepts "
            f"({self._max_record_bytes} bytes; LocalLog(max_record_bytes=...) raises it)"
        )

    def _take_up_head(self) -> Head:
        """With the write lock just taken: catch up with what other processes did; return the head."""
        head = self._head
        assert head is not None
        words = head.words
        if words[W_WRITING] or words[W_VERSION] != self._version:
            self._sync_locked()
        if words[W_CLEAN]:
            # From the first write on, a crash must not find the log vouched for.
            head.clean = False
            head.sync()
        return head

    def _write_frames(
        self,
        segment: Segment,
        fd: int,
        data: bytes,
        start_size: int,
        meanwhile: Callable[[], object] | None = None,
    ) -> None:
        """Write ``data`` at ``start_size`` of the active segment and sync it per the policy.

        ``meanwhile`` runs once the bytes are written, before the sync: with
        ``fsync="always"``, a large write's pages are already on their way to
        the disk while it runs (``sync_file_range``, where there is one), so
        the ``fdatasync`` after it has less to wait for. It must not raise.

        Raises:
            WriteError: the disk refused; the file is cut back to ``start_size``.
        """
        try:
            if self.fsync == "always" and start_size + len(data) > segment.allocated:
                # Never past where the segment rolls: space a roll would only cut again.
                ahead = min(PREALLOCATE_BYTES, self.segment_bytes - start_size)
                segment.allocated = _preallocate(fd, start_size, max(len(data), ahead))
            written = os.pwrite(fd, data, start_size)
            while written < len(data):
                written += os.pwrite(fd, data[written:], start_size + written)
            if self.fsync == "always":
                if meanwhile is not None:
                    if _start_writeback is not None and written >= _WRITEBACK_FROM_BYTES:
                        # Only a head start: its result does not matter, the fdatasync decides.
                        _start_writeback(fd, start_size, written, _WRITEBACK)
                    meanwhile()
                _datasync(fd)
            else:
                self._unsynced = True
                if meanwhile is not None:
                    meanwhile()
        except OSError as exc:
            # Leave nothing half-written: cut the file back to the last published record.
            # (If even that fails, the head's writing flag stays set: the next holder of
            # the write lock cuts it.)
            try:
                os.ftruncate(fd, start_size)
            except OSError:
                pass
            else:
                assert self._head is not None
                self._head.writing = False
            raise WriteError(f"cannot append to {segment.path}: {exc}") from exc

    def append_one(
        self,
        key: bytes,
        value: bytes | None,
        on_appended: Callable[[bytes, bytes | None, int, int, dict[int, int]], T] | None = None,
        *,
        msgpack_values: bool = False,
    ) -> tuple[int, int, T | None]:
        """:meth:`append` of one record: the single write, whose latency is mostly Python.

        ``on_appended(key, value, partition, offset, ends)``, if given, is
        called where :meth:`append` calls its own: under the write lock, once
        the record is written, synced and published. ``ends`` is the end
        offset of every partition just after this append (the log's own
        mapping: read it, do not keep it). No other append, in any process,
        comes in between. ``msgpack_values``: as :meth:`append`'s.

        Returns:
            ``(partition, offset, what on_appended returned)`` (``None`` without it).

        Raises:
            RecordTooLargeError, WriteError: as :meth:`append`.
        """
        if self._closed:
            self._check_open()
        size = len(key) + (0 if value is None else len(value))
        if size > self._max_record_bytes:
            raise self._too_large(size)
        # The steps and their order are those of append() and _append_partition(),
        # with the lists, the loops and the general cases left out.
        with self._append_lock:
            if self._closed:
                self._check_open()
            lock_fd = self._lock_fd
            assert lock_fd is not None
            _flock(lock_fd, _LOCK_EX)
            try:
                head = self._head
                assert head is not None
                words = head.words
                if words[W_WRITING] or words[W_VERSION] != self._version or words[W_CLEAN]:
                    self._take_up_head()
                p = 0 if self._partitions == 1 else self.partition_for(key)
                segment = self._segments[p][-1]
                start_size = segment.size
                offset = self._end[p]
                timestamp = time.time_ns() // 1_000_000
                frame = encode_frame(offset, timestamp, key, value, msgpack_values=msgpack_values)
                size = len(frame)
                words[W_WRITING] = 1  # bytes past the published ends from here on: see _sync_locked
                self._write_frames(segment, self._active_fd[p], frame, start_size)
                end = start_size + size
                with self._mutex:
                    indexed = segment.index_positions
                    if not indexed or start_size - indexed[-1] >= INDEX_INTERVAL:
                        segment.index_appended_frame(offset, start_size)
                    segment.size = end
                    self._end[p] = offset + 1
                    sample = self._cleaner.samples[p]
                    h = (crc32(key) * HASH_MIX) & HASH_MASK
                    if h < sample.threshold:
                        tombstone = -1 if value is not None else timestamp
                        sample.observe_appended(key, h, offset, size, tombstone, self._segments[p])
                    self._version = head.publish_one(p, offset + 1, segment.base, end)
                    if self._readers_waiting:
                        self._cond.notify_all()
                words[W_WRITING] = 0
                if end >= self.segment_bytes:
                    self._roll_after_append(p)
                if on_appended is None:
                    return p, offset, None
                return p, offset, on_appended(key, value, p, offset, self._end)
            finally:
                _flock(lock_fd, _LOCK_UN)

    def _append_partition(
        self,
        p: int,
        keys: Sequence[bytes],
        values: Sequence[bytes | None],
        crcs: Sequence[int],
        timestamp: int,
        indexes: Sequence[int] | None,
        result: list[tuple[int, int]],
        msgpack_values: bool = False,
    ) -> None:
        """Write the records ``keys[i]: values[i]`` (``crcs``: the keys' crc32) to partition ``p``.

        Their positions go to ``result``.

        ``indexes`` are the records' places in ``result`` (``None``: in order).
        """
        segment = self._segments[p][-1]
        fd = self._active_fd[p]
        start_size = segment.size
        offset = self._end[p]
        indexed = segment.index_positions
        data, index_entries = encode_columns(
            offset,
            keys,
            values,
            timestamp,
            start_size,
            indexed[-1] + INDEX_INTERVAL if indexed else 0,
            msgpack_values=msgpack_values,
        )
        end = offset + len(keys)
        sample = self._cleaner.samples[p]
        if indexes is None:
            result[:] = zip(itertools.repeat(p), range(offset, end))
        else:
            for i, at in zip(indexes, range(offset, end), strict=True):
                result[i] = (p, at)
        seen: list[SeenRecord] = []

        def find_followed() -> None:
            # The records of the keys the dirt sample follows (read without the
            # lock: its level only rises, and observe() checks again under it).
            # Found while the disk writes the frames.
            seen.extend(_followed(keys, values, crcs, offset, timestamp, sample.threshold))

        self._write_frames(segment, fd, data, start_size, find_followed)
        # Published only after the write succeeded: no reader sees the records of a write cut
        # back above. In this instance first, then in the head, under the condition: a reader
        # thread taking up the head can then never count these records twice.
        head = self._head
        assert head is not None
        position = start_size + len(data)
        with self._cond:
            for entry in index_entries:
                segment.index_appended_frame(*entry)
            segment.size = position
            self._end[p] = end
            if seen:
                sample.observe(seen, self._segments[p])
            self._version = head.publish_one(p, end, segment.base, position)
            self._cond.notify_all()
        if segment.size >= self.segment_bytes:
            self._roll_after_append(p)

    def _roll_after_append(self, p: int) -> None:
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
        """Close the active segment (synced) and start a new one at the end offset (under the write lock)."""
        fd = self._active_fd[p]
        old = self._segments[p][-1]
        if os.fstat(fd).st_size > old.size:
            os.ftruncate(fd, old.size)  # preallocated space: a closed segment ends at its last record
        if self.fsync != "never":
            _datasync(fd)  # closed segments are never scanned on open: they must be whole
        old.identify(os.fstat(fd))
        base = self._end[p]
        path = self.path / str(p) / segment_name(base)
        self._create_segment_file(path)
        try:
            new_fd = os.open(path, os.O_WRONLY)
            new = Segment(path, base, len(MAGIC)).identify(os.fstat(new_fd))
        except OSError:
            # Appends keep going to the old segment: this one must not look active to the next open.
            path.unlink()
            raise
        head = self._head
        assert head is not None
        with self._cond:
            self._segments[p].append(new)
            self._active_fd[p] = new_fd
            self._version = head.publish({p: Entry(base, base, len(MAGIC))}, generation_step=1)
            self._generation = head.snapshot().generation
        os.close(fd)
        self._cleaner.wake()

    def begin_offsets(self) -> dict[int, int]:
        """Return the first offset of every partition (the base of its first segment)."""
        self._check_open()
        self._refresh()
        with self._cond:
            return {p: segments[0].base for p, segments in self._segments.items()}

    def end_offsets(self, timeout: float | None = None) -> dict[int, int]:
        """Return the end offset (one past the last record) of every partition, as every process published it."""
        self._check_open()
        self._refresh()
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
            if active and self._head is not None:
                self._head.set_suspect(p)  # the next open that is alone scans it
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
        self._refresh()
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
                "records_counted": cleaner.records_counted,
                "samples_adopted": cleaner.samples_adopted,
            },
        }

    def close(self) -> None:
        """Sync (unless ``fsync="never"``), stop the background threads, release the files. Idempotent.

        The last instance to close, over every process, marks the head clean.
        """
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
        self._active_fd = {}
        if clean and synced and self.fsync != "never":
            try:
                self._close_clean()
            except OSError as exc:
                log.warning("could not mark %s closed cleanly (%s); the next open scans it", self.path, exc)
        if self._head is not None:
            self._head.close()
            self._head = None
        for name in ("_lock_fd", "_compact_fd", "_open_fd"):
            fd = getattr(self, name)
            if fd is not None:
                os.close(fd)  # closing the descriptor drops its flock
                setattr(self, name, None)

    def _close_clean(self) -> None:
        """If this is the last open instance: sync the active segments, then mark the head clean.

        The next open, even after an OS crash, then trusts the head's sizes.
        Only ``OPEN`` held exclusively tells that no other instance is open.
        """
        head, open_fd, lock_fd = self._head, self._open_fd, self._lock_fd
        if head is None or open_fd is None or lock_fd is None:
            return
        try:
            _flock(open_fd, _LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return  # another instance is open: the last one to close does this
        with self._append_lock:
            _flock(lock_fd, _LOCK_EX)
            try:
                if head.writing:
                    self._cut_unpublished_locked()
                for p, entry in enumerate(head.snapshot().entries):
                    fd = os.open(self.path / str(p) / segment_name(entry.base), os.O_RDWR)
                    try:
                        if os.fstat(fd).st_size > entry.size:
                            os.ftruncate(fd, entry.size)  # preallocated space: a log at rest has none
                        _datasync(fd)
                    finally:
                        os.close(fd)
                head.sync()  # the sizes first, then the flag that vouches for them
                head.clean = True
                head.sync()
            finally:
                _flock(lock_fd, _LOCK_UN)
