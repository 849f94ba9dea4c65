"""The LMDB cache: the log folded up to a checkpoint, shared by every process on the machine.

:class:`Cache` keeps key and value bytes, as the log holds them, in an LMDB
table ``data``, and in a table ``meta`` the checkpoint they reach and the
identity of the log they mirror. A batch and its checkpoint commit in one
transaction, so the cache is always the log folded up to its checkpoint. Any
number of processes open one cache directory at once: a write transaction
commits a batch only if the checkpoint is still the one its records follow
(:class:`CheckpointMoved` otherwise), so replay stays in log order whoever
runs it. The LMDB environment lives in a *generation* directory named by the
``HEAD`` file; a rebuild beside the live cache (:meth:`Cache.new_generation`,
:meth:`Cache.switch_to`) flips ``HEAD`` and every process follows it at its
next read. A damaged cache is found before LMDB opens it
(:mod:`kvlog.cachecheck`) and set aside. See docs/design.md, "The cache".
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import mmap
import os
import shutil
import struct
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from functools import partial
from operator import is_not, itemgetter
from pathlib import Path
from typing import Any, Protocol

import lmdb
import msgpack

from . import _fork
from ._files import DEFAULT_FILE_MODE, check_file_mode, fsync_dir, make_dirs, open_file, write_file_atomically
from .cachecheck import check_meta_pages, check_structure, file_signature
from .codec import MAX_KEY_SIZE
from .errors import BadRecordError, CacheError, ClosedError, CodecError
from .log.base import Record

__all__ = ["DEFAULT_MAP_SIZE", "MAX_READERS", "Cache", "CheckpointMoved", "RecordColumns"]

log = logging.getLogger(__name__)

#: Initial map size. Address space, not disk: LMDB files grow as data is
#: written. The map doubles whenever a replay batch does not fit.
DEFAULT_MAP_SIZE = 1 << 30

_FORMAT = 1
_META_FORMAT = b"format"
_META_IDENTITY = b"identity"
_META_CHECKPOINT = b"checkpoint"
_META_CURRENT_AT = b"current_at"
#: Set in a generation's meta table when HEAD moved past it: nothing may be applied to it any more.
_META_SUPERSEDED = b"superseded"

#: Reader slots of the LMDB environment: one per read transaction open at a
#: time, over all the processes sharing the cache (kvlog's reads are short).
MAX_READERS = 2048

#: The cache directory's files (see docs/design.md, "The cache"): HEAD names
#: the live generation; LOCK is held while the directory changes (an open, a
#: switch, a close); every process with the cache open holds USERS shared.
_HEAD = "HEAD"
_HEAD_MAGIC = b"KVLCACH1"
_HEAD_LAYOUT = struct.Struct("<8sQ")
_ADMIN_LOCK = "LOCK"
_USERS_LOCK = "USERS"
_GENERATION_PREFIX = "gen-"

#: Present while the cache is written without fsync: the boot it is written in.
_UNSYNCED = "UNSYNCED"
#: Written at a clean close: what data.mdb looked like then (see cachecheck.file_signature).
_CLOSED = "CLOSED"
#: Written when LMDB reported damage at run time: the reason. The next open sets the cache aside.
_DAMAGED = "DAMAGED"
_LMDB_FILES = ("data.mdb", "lock.mdb")

#: LMDB errors that mean the files are damaged (not a full disk or a full reader table).
_DAMAGE_ERRORS: tuple[type[lmdb.Error], ...] = (
    lmdb.CorruptedError,
    lmdb.PageNotFoundError,
    lmdb.InvalidError,
    lmdb.VersionMismatchError,
    lmdb.BadTxnError,
    lmdb.CursorFullError,
    lmdb.BadValsizeError,
)
_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


def _boot_id() -> str | None:
    """An id of the running boot of the OS, or ``None`` where there is none to read."""
    try:
        return _BOOT_ID.read_text().strip() or None
    except OSError:
        return None


#: apply_appended checks the map's headroom once every this many commits
#: (small batches; a batch that does not fit is written again after growing).
_HEADROOM_CHECK_EVERY = 64

#: Keys read per read transaction while iterating, so that a slow consumer of
#: an iterator never pins an old snapshot (nor blocks a map resize) for long.
_SCAN_CHUNK = 512


def _key_problem(key: bytes | None) -> str:
    if key is None:
        return "null key (kvlog keys are non-empty)"
    if not key:
        return "empty key (kvlog keys are non-empty)"
    return f"key of {len(key)} bytes (the cache holds keys of at most 511 bytes)"


def _value_problem(exc: Exception) -> str:
    return (
        str(exc)
        if isinstance(exc, CodecError)
        else f"value rejected by the codec ({type(exc).__name__}: {exc})"
    )


def _bad_record(record: Any, reason: str) -> BadRecordError:
    partition, offset = record.partition, record.offset
    return BadRecordError(
        f"record at offset {offset} of partition {partition} cannot go into the cache: {reason}",
        partition=partition,
        offset=offset,
        reason=reason,
    )


class RecordColumns(Protocol):
    """Records of one partition held column by column, in log order (the logs' readers make them).

    ``offsets[i]``, ``keys[i]``, ``values[i]`` are the i-th record's (a value
    of ``None`` is a tombstone; a key of ``None``, which a Kafka topic may
    hold, is a bad record) and ``tombstones`` the indexes of the tombstones,
    ascending. See :meth:`Cache.apply_columns`.
    """

    @property
    def partition(self) -> int: ...
    @property
    def offsets(self) -> Sequence[int]: ...
    @property
    def keys(self) -> Sequence[bytes | None]: ...
    @property
    def values(self) -> Sequence[bytes | None]: ...
    @property
    def tombstones(self) -> list[int]: ...

    def records(self) -> list[Record]:
        """Every record, in log order."""
        ...


_not_none = partial(is_not, None)


def _columns_pass(columns: RecordColumns, check: Callable[[bytes], object] | None) -> bool:
    """Whether every key of ``columns`` is one the cache holds and every value passes ``check``.

    Whole columns at a time, in C loops (``check`` is still called once per
    value, but by ``map``, not by a Python loop). ``False`` sends the columns
    through the record-by-record pass, which finds the bad records, in log
    order, and says why.
    """
    keys = columns.keys
    # not all(keys): a None or empty key, in one pass (None is falsy too).
    if not all(keys) or max(map(len, keys)) > MAX_KEY_SIZE:  # type: ignore[arg-type]  # None is out
        return False
    if check is not None:
        values: Iterable[Any] = filter(_not_none, columns.values) if columns.tombstones else columns.values
        try:
            deque(map(check, values), maxlen=0)
        except Exception:  # noqa: BLE001 - any failure of a user codec means a bad value, found again below
            return False
    return True


def _put_runs(
    txn: lmdb.Transaction[Any],
    db: lmdb._Database,
    keys: Sequence[bytes | None],
    values: Sequence[bytes | None],
    tombstones: list[int],
) -> None:
    """Put ``keys[i]: values[i]`` in order, deleting at the ``tombstones`` (the indexes of the ``None`` values).

    The records between two tombstones go to LMDB in one ``putmulti`` (a loop
    in C, which takes no ``None``).
    """
    putmulti = txn.cursor(db).putmulti
    if not tombstones:
        putmulti(zip(keys, values, strict=True))  # type: ignore[arg-type]  # no tombstone, so no None
        return
    start = 0
    for tombstone in tombstones:
        if tombstone > start:
            putmulti(zip(keys[start:tombstone], values[start:tombstone], strict=True))  # type: ignore[arg-type]
        txn.delete(keys[tombstone], db=db)  # type: ignore[arg-type]  # the keys passed their check
        start = tombstone + 1
    if start < len(keys):
        putmulti(zip(keys[start:], values[start:], strict=True))  # type: ignore[arg-type]


def _tombstones_of(values: list[bytes | None]) -> list[int]:
    """The indexes of the ``None`` values, ascending (found by ``list.index``, a loop in C)."""
    found: list[int] = []
    at = -1
    with contextlib.suppress(ValueError):
        while True:
            at = values.index(None, at + 1)
            found.append(at)
    return found


_first, _second = itemgetter(0), itemgetter(1)


class CheckpointMoved(Exception):
    """:meth:`Cache.apply` found another checkpoint than the one its records follow (nothing was written).

    Another process (or thread) applied records meanwhile, or the cache was
    rebuilt or replaced by a new generation: the caller reads the checkpoint
    again and replays from there.
    """


#: Cache._head_words before HEAD is mapped and after close: generation -1 is nobody's.
_NO_HEAD = (0, -1)


def generation_name(generation: int) -> str:
    """The directory name of a cache generation."""
    return f"{_GENERATION_PREFIX}{generation:06d}"


def _generations(path: Path) -> list[int]:
    found = []
    for entry in path.glob(_GENERATION_PREFIX + "*"):
        suffix = entry.name[len(_GENERATION_PREFIX) :]
        if suffix.isdigit() and entry.is_dir():
            found.append(int(suffix))
    return sorted(found)


def _is_checkpoint(value: Any) -> bool:
    return isinstance(value, dict) and all(
        type(p) is int and type(o) is int and p >= 0 and o >= 0 for p, o in value.items()
    )


packb = msgpack.packb


def _pack(obj: Any) -> bytes:
    return packb(obj, use_bin_type=True)  # type: ignore[no-any-return]


def _as_stored(data: bytes) -> bytes:
    return data


#: What a point read that must be retried the slow way holds instead of a value.
_RETRY_READ: Any = object()

#: Packs an int (which runs no Python code, so one packer serves every thread).
_pack_int = msgpack.Packer(use_bin_type=True).pack


def _unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


class Cache:
    """The LMDB cache of a data directory, shared by every process that opens it.

    Any number of threads read; writes (replay) are serialised by LMDB's
    writer lock across processes and keep log order through the checkpoint
    check of :meth:`apply`.

    Args:
        path: the cache directory; created if missing. The LMDB environment
            is in its live generation directory (:attr:`env_path`).
        map_size: initial LMDB map size in bytes; it grows on demand (and a
            process adopts the size another process grew it to).
        sync: fsync every commit. ``False`` suits a log that is not synced
            on every write either: a killed process loses nothing, and a cache
            an OS crash may have torn is deleted at the next open
            (:attr:`discarded` says so). Where the boot cannot be identified,
            the cache is synced anyway.
        file_mode: permission bits of the files the cache creates (0o600;
            directories get the matching search bits), whatever the umask.
        move_damaged: set a damaged cache aside (``<path>.corrupt-<time>``)
            and start an empty one, instead of raising :class:`CacheError`.

    Raises:
        CacheError: the environment cannot be opened (permissions, not an
            LMDB environment, damaged and not to be moved, or not movable).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        map_size: int = DEFAULT_MAP_SIZE,
        sync: bool = True,
        file_mode: int = DEFAULT_FILE_MODE,
        move_damaged: bool = False,
        _builds: int | None = None,
    ) -> None:
        self.path = Path(path)
        self.file_mode = check_file_mode(file_mode)
        #: Why the files found at ``path`` were not used (deleted or set aside), if they were not.
        self.discarded: str | None = None
        #: Where a damaged cache was set aside (``move_damaged=True``), if one was.
        self.moved_to: Path | None = None
        #: Seconds the structure check (:func:`~kvlog.cachecheck.check_structure`) took
        #: at open; ``None`` when none was needed (a new cache, one closed cleanly
        #: and unchanged since, or one other processes have open).
        self.structure_check_seconds: float | None = None
        #: Whether this open found no other process using the cache (it checked the files).
        self.first_user = False
        self._map_size = map_size
        self._move_damaged = move_damaged
        # Why LMDB said the files are damaged at run time (see _damaged).
        self._damage: str | None = None
        self._forked = False
        boot = _boot_id()
        self._boot = boot
        #: Whether every commit is synced to disk (``False`` only where the boot can be identified).
        self.sync = sync or boot is None
        # Growing or replacing the map (mdb_env_set_mapsize, a generation
        # switch) needs every read transaction of this process closed. Readers
        # register without a lock, on the hot path: a reader appends to
        # _active_readers and then checks _readers_blocked; a resizer (or
        # close) sets _readers_blocked and then checks _active_readers. Both
        # list operations and attribute accesses are atomic and ordered under
        # the GIL, so at least one side sees the other (Dekker): the reader
        # backs off and waits at _readers_gate, or the resizer waits there for
        # it. Unregistering readers wake a waiting resizer.
        self._readers_gate = threading.Condition(threading.Lock())
        self._active_readers: list[None] = []
        self._readers_blocked = False
        self._resize_lock = threading.Lock()
        # get(): the point read of value_reader, returning the stored bytes.
        self._read_stored = self.value_reader(_as_stored)
        # One write transaction of this process at a time (LMDB allows one per
        # thread, but a resize or switch must not run under another thread's).
        self._write_lock = threading.RLock()
        self._admin_mutex = threading.RLock()
        self._admin_depth = 0
        # The writers' fast path checks the map's headroom every so many commits.
        self._appended_commits = 0
        self._pages_at_last_check = 0
        self._last_appended: tuple[Mapping[int, int] | None, bytes] = (None, b"")
        self._last_appended_one: tuple[int, bytes] = (-1, b"")  # (end offset, packed) of a one-partition log
        self._closed = False
        self._admin_fd: int | None = None
        self._users_fd: int | None = None
        self._head_map: mmap.mmap | None = None
        # HEAD's words once mapped; until then (and after close) a stand-in
        # whose generation matches none, so that get() takes its slow path.
        self._head_words: memoryview | tuple[int, int] = _NO_HEAD
        #: A builder (see new_generation) writes its own generation and never follows HEAD.
        self._detached = _builds is not None
        self._generation = 0
        try:
            make_dirs(self.path, self.file_mode)
            self._admin_fd = open_file(self.path / _ADMIN_LOCK, os.O_RDWR, self.file_mode)
            self._users_fd = open_file(self.path / _USERS_LOCK, os.O_RDWR, self.file_mode)
            with self._admin():
                # The first process to open the cache checks its files; the
                # others found it in use, checked by whoever opened it first.
                self.first_user = self._try_lock(self._users_fd, fcntl.LOCK_EX)
                fcntl.flock(self._users_fd, fcntl.LOCK_SH)
                self._open_head()
                if _builds is not None:
                    self._generation = _builds
                    make_dirs(self.env_path, self.file_mode)
                    created = list(_LMDB_FILES)
                else:
                    if self.first_user:
                        self._remove_stale_generations()
                    self._generation = self._head_generation()
                    created = self._prepare_live_generation(boot)
                if not self.sync:
                    self._mark_unsynced(boot)
                try:
                    self._open_env(created)
                except _DAMAGE_ERRORS as exc:
                    # LMDB refused what the checks let through (or the files changed meanwhile).
                    created = self._set_aside(f"LMDB cannot open it: {exc}", move_damaged)
                    if not self.sync:
                        self._mark_unsynced(boot)
                    self._open_env(created)
        except BaseException as exc:
            self._release_files()
            if isinstance(exc, CacheError):
                raise
            if isinstance(exc, lmdb.Error | OSError):
                raise CacheError(f"cannot open the cache at {self.path}: {exc}") from exc
            raise
        _fork.register(self)
        self._suspended = False
        _open_caches.add(self)

    # -- the cache directory -------------------------------------------------

    @property
    def env_path(self) -> Path:
        """The directory of the LMDB environment this process reads (the live generation)."""
        return self.path / generation_name(self._generation)

    @property
    def generation(self) -> int:
        """The generation this process reads (see :meth:`new_generation`)."""
        return self._generation

    @contextlib.contextmanager
    def _admin(self) -> Iterator[None]:
        """Hold the cache directory's LOCK: one process at a time opens, switches or closes.

        Re-entrant within this process. Taken before _write_lock and before
        any LMDB write transaction, never after (one lock order for all).
        """
        with self._admin_mutex:
            if self._admin_depth == 0:
                if self._admin_fd is None:
                    raise self._closed_error()
                fcntl.flock(self._admin_fd, fcntl.LOCK_EX)
            self._admin_depth += 1
            try:
                yield
            finally:
                self._admin_depth -= 1
                if self._admin_depth == 0 and self._admin_fd is not None:
                    fcntl.flock(self._admin_fd, fcntl.LOCK_UN)

    def directory_lock(self) -> contextlib.AbstractContextManager[None]:
        """Hold the cache directory's lock: no other process opens, switches or closes the cache meanwhile.

        For a decision that must not race another process's, such as
        whether to rebuild a stale cache at open.
        """
        return self._admin()

    @staticmethod
    def _try_lock(fd: int, kind: int) -> bool:
        try:
            fcntl.flock(fd, kind | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return False
            raise
        return True

    def _open_head(self) -> None:
        """Map HEAD (creating it, or moving a cache of the one-directory layout into generation 1)."""
        head = self.path / _HEAD
        if not head.exists():
            if (self.path / "data.mdb").exists() and self.first_user:
                # A cache written before generations: its environment becomes generation 1.
                target = self.path / generation_name(1)
                make_dirs(target, self.file_mode)
                for name in (*_LMDB_FILES, _UNSYNCED, _CLOSED, _DAMAGED):
                    with contextlib.suppress(FileNotFoundError):
                        os.rename(self.path / name, target / name)
                fsync_dir(self.path)
            self._write_head(1)
        fd = os.open(head, os.O_RDWR)
        try:
            self._head_map = mmap.mmap(fd, _HEAD_LAYOUT.size)
        finally:
            os.close(fd)
        magic, _ = _HEAD_LAYOUT.unpack_from(self._head_map, 0)
        if magic != _HEAD_MAGIC:
            raise CacheError(f"{head} is not a kvlog cache head (delete the cache directory: it is rebuilt)")
        # Word 1 is the generation: a read compares it with its own, a memory read, no system call.
        self._head_words = memoryview(self._head_map).cast("Q")

    def _write_head(self, generation: int) -> None:
        """Point HEAD at ``generation`` (callers hold LOCK); durable before it returns."""
        data = _HEAD_LAYOUT.pack(_HEAD_MAGIC, generation)
        if self._head_map is None:
            write_file_atomically(self.path / _HEAD, data, sync=True, file_mode=self.file_mode)
            return
        # Rewritten in place (not renamed): every process has this file mapped.
        self._head_map[:] = data
        self._head_map.flush()

    def _head_generation(self) -> int:
        return int(self._head_words[1])

    def _remove_stale_generations(self) -> None:
        """Delete generations other than HEAD's: rebuilds a process died in, or ones a switch left."""
        live = self._head_generation()
        for generation in _generations(self.path):
            if generation != live:
                shutil.rmtree(self.path / generation_name(generation), ignore_errors=True)

    def _prepare_live_generation(self, boot: str | None) -> list[str]:
        """Check HEAD's generation before LMDB opens it (first user only); return the files LMDB creates."""
        make_dirs(self.env_path, self.file_mode)
        created = [name for name in _LMDB_FILES if not (self.env_path / name).exists()]
        if not self.first_user:
            return created
        self._discard_if_torn(boot)
        created = [name for name in _LMDB_FILES if not (self.env_path / name).exists()]
        damage = self._inspect()
        if damage is not None:
            created = self._set_aside(damage, self._move_damaged)
        return created

    def _open_env(self, created: list[str]) -> None:
        self._env = lmdb.open(
            str(self.env_path),
            map_size=self._map_size,
            max_dbs=4,
            # A cache is rebuildable, so it trades the last transaction's
            # durability on an OS crash for one fsync per commit instead of
            # two; integrity is kept either way (LMDB keeps two meta pages).
            metasync=False,
            # Unsynced only where a reboot can be told: a cache an OS crash may
            # have torn is found by its UNSYNCED file and rebuilt, never read.
            sync=self.sync,
            readahead=False,
            max_readers=MAX_READERS,
            mode=self.file_mode,
        )
        try:
            for name in created:
                with contextlib.suppress(FileNotFoundError):
                    os.chmod(self.env_path / name, self.file_mode)  # LMDB created them through the umask
            # A reader process killed by SIGKILL leaves its slot in lock.mdb taken.
            self._env.reader_check()
            self._page_size = int(self._env.stat()["psize"])
            self._data = self._env.open_db(b"data")
            self._meta = self._env.open_db(b"meta")
            self._begin = self._env.begin
        except BaseException:
            self._env.close()
            raise

    def _inspect(self) -> str | None:
        """Why the files of the live generation must not be opened, or ``None``.

        In order: LMDB reported damage before (a ``DAMAGED`` file); the meta
        pages (always, plain reads); unless ``data.mdb`` is exactly as a clean
        close left it, the structure check in a child process.
        """
        try:
            reason = (self.env_path / _DAMAGED).read_text(errors="replace").strip()
        except FileNotFoundError:
            reason = None
        if reason is not None:
            return reason or "LMDB reported damage"
        data_file = self.env_path / "data.mdb"
        try:
            size = data_file.stat().st_size
        except FileNotFoundError:
            return None
        if size == 0:
            return None  # LMDB creates a new environment in an empty file
        reason = check_meta_pages(data_file, size)
        if reason is not None or self._unchanged_since_closed(data_file):
            return reason
        started = time.monotonic()
        reason = check_structure(self.env_path, size, self.file_mode)
        self.structure_check_seconds = round(time.monotonic() - started, 3)
        return reason

    def _unchanged_since_closed(self, data_file: Path) -> bool:
        """Whether data.mdb is exactly as the last clean close left it."""
        try:
            closed = json.loads((self.env_path / _CLOSED).read_bytes())
            return bool(closed == file_signature(data_file))
        except (OSError, ValueError):
            return False

    def _set_aside(self, reason: str, move: bool) -> list[str]:
        """Move the damaged generation out of the way; the next generation, empty, becomes HEAD's.

        Callers hold LOCK. Returns the LMDB files the next open creates (all of them).

        Raises:
            CacheError: ``move`` is false, or the directory cannot be moved.
        """
        if not move:
            raise CacheError(
                f"the cache at {self.path} is damaged: {reason}; KVLog sets a damaged cache aside and "
                "rebuilds it from the log when it opens it (or delete the cache directory)"
            )
        target = self._corrupt_target()
        try:
            os.rename(self.env_path, target)
            generation = max([self._generation, *_generations(self.path)]) + 1
            make_dirs(self.path / generation_name(generation), self.file_mode)
            self._write_head(generation)
            self._generation = generation
            fsync_dir(self.path)
            fsync_dir(self.path.parent)
        except OSError as exc:
            raise CacheError(
                f"the cache at {self.path} is damaged ({reason}) and cannot be moved aside ({exc}); "
                "move or delete it: kvlog rebuilds it from the log"
            ) from exc
        self.moved_to = target
        self.discarded = f"the cache was damaged ({reason}); it was moved aside to {target}"
        return list(_LMDB_FILES)

    def _corrupt_target(self) -> Path:
        """Where a damaged generation is set aside: ``<cache dir>.corrupt-<UTC time>[-n]``, beside the cache."""
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        target = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        n = 1
        while target.exists():
            n += 1
            target = self.path.with_name(f"{self.path.name}.corrupt-{stamp}-{n}")
        return target

    def _discard_if_torn(self, boot: str | None) -> None:
        marker = self.env_path / _UNSYNCED
        try:
            written_in = marker.read_text().strip()
        except FileNotFoundError:
            return
        if boot is not None and written_in == boot:
            return  # the process died, not the OS: every commit is in the page cache
        self.discarded = (
            "the cache was written without fsync and the machine restarted before it was closed "
            "(an OS crash can tear unsynced LMDB pages)"
        )
        for name in ("data.mdb", "lock.mdb", _UNSYNCED, _CLOSED):
            (self.env_path / name).unlink(missing_ok=True)

    def _mark_unsynced(self, boot: str | None) -> None:
        marker = self.env_path / _UNSYNCED
        if marker.exists():
            return
        write_file_atomically(marker, f"{boot}\n".encode(), sync=True, file_mode=self.file_mode)

    def _damaged(self, exc: lmdb.Error, doing: str = "read") -> CacheError:
        """The error for an LMDB failure; if it means damage, also mark the cache for setting aside."""
        if not isinstance(exc, _DAMAGE_ERRORS):
            return CacheError(f"cannot {doing} the cache at {self.path}: {exc}")
        self._mark_damaged(f"LMDB reported {exc}")
        return CacheError(
            f"the cache at {self.path} is damaged ({exc}); rebuild it from the log: run `kvlog rewarm` "
            "(or call rewarm(), or close the store and open it again: a damaged cache is set aside)"
        )

    def _mark_damaged(self, reason: str) -> None:
        if self._damage is not None:
            return
        self._damage = reason
        log.error("the cache at %s is damaged: %s", self.path, reason)
        try:
            # Without CLOSED the next open checks the structure even if DAMAGED cannot be written.
            (self.env_path / _CLOSED).unlink(missing_ok=True)
            write_file_atomically(
                self.env_path / _DAMAGED, reason.encode(), sync=True, file_mode=self.file_mode
            )
        except OSError as exc:
            log.warning("cannot mark the cache at %s as damaged: %s", self.path, exc)

    @property
    def damaged(self) -> bool:
        """Whether LMDB reported damage since this cache was opened (see :meth:`reset`)."""
        return self._damage is not None

    def _closed_error(self) -> ClosedError:
        if self._forked:
            return ClosedError(_fork.after_fork_message(f"the cache at {self.path}"))
        return ClosedError(f"the cache at {self.path} is closed")

    def _suspend_for_fork(self) -> None:
        """Before fork(): hold off this process's writer and readers, and close the environment."""
        self._write_lock.acquire()
        self._resize_lock.acquire()
        with self._readers_gate:
            self._suspended = not self._closed
            self._readers_blocked = True
            while self._active_readers:
                self._readers_gate.wait()
        if self._suspended:
            self._env.close()

    def _resume_after_fork(self) -> None:
        """After fork(), in the parent: open the environment again and let readers and the writer in."""
        try:
            if self._suspended:
                self._suspended = False
                try:
                    self._open_env([])
                except lmdb.Error as exc:
                    log.error("cannot open the cache at %s again after fork(): %s", self.path, exc)
                    self._closed = True
        finally:
            with self._readers_gate:
                self._readers_blocked = self._closed
                self._readers_gate.notify_all()
            self._resize_lock.release()
            self._write_lock.release()

    def _abandon_after_fork(self) -> None:
        """In a forked child: refuse every use; close() leaves the parent's files alone."""
        self._forked = True
        self._closed = True
        self._readers_blocked = True
        # Locks another thread of the parent held at the fork stay held forever in the child.
        self._readers_gate = threading.Condition(threading.Lock())
        self._resize_lock = threading.Lock()
        self._write_lock = threading.RLock()
        self._admin_mutex = threading.RLock()
        self._admin_depth = 0
        self._active_readers = []
        # The lock files' descriptors share their flock with the parent's: kept
        # open here, they would keep a lock of a parent that died holding it.
        # Closing them does not unlock the parent's.
        for fd in (self._admin_fd, self._users_fd):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._admin_fd = self._users_fd = None

    # -- following HEAD -----------------------------------------------------

    def _follow_head(self) -> None:
        """Switch to the generation HEAD names now (another process rebuilt the cache beside it).

        Readers of this process are shut out meanwhile; the old environment's
        files stay readable until every process has let go of them.
        """
        with self._write_lock, self._readers_shut_out():
            while not self._closed:
                generation = self._head_generation()
                if generation == self._generation:
                    return
                old = self._env
                self._generation = generation
                try:
                    self._open_env([])
                except lmdb.Error as exc:
                    if not (self.env_path / "data.mdb").exists():
                        continue  # replaced again meanwhile: HEAD names a newer one
                    self._env = old
                    raise CacheError(
                        f"cannot open generation {generation} of the cache at {self.path}: {exc}"
                    ) from exc
                old.close()
                log.info("the cache at %s moved to generation %d", self.path, generation)

    def _adopt_map_size(self) -> None:
        """Another process grew the map: map the larger size here too."""
        with self._write_lock, self._readers_shut_out():
            self._env.set_mapsize(0)

    def _begin_read(self, **kwargs: Any) -> lmdb.Transaction[Any]:
        """Begin a read transaction (callers registered as readers).

        If the reader table is full, clear dead readers' slots and retry once.
        """
        try:
            return self._env.begin(**kwargs)
        except lmdb.ReadersFullError:
            self._env.reader_check()
            try:
                return self._env.begin(**kwargs)
            except lmdb.ReadersFullError as exc:
                raise CacheError(
                    f"every reader slot of the cache at {self.path} is taken by a live reader "
                    f"({self._env.max_readers()} slots: read transactions of all processes using it): {exc}"
                ) from exc

    @contextlib.contextmanager
    def _reading(self, table: str | None = None, **kwargs: Any) -> Iterator[lmdb.Transaction[Any]]:
        """A registered read transaction on the live generation, at the map size of the data.

        ``table`` (``"data"`` or ``"meta"``) is the transaction's default
        table, looked up once the generation is settled: following HEAD
        replaces the environment and its table handles.
        """
        if self._closed:
            raise self._closed_error()
        for _ in range(3):
            if not self._detached and self._head_generation() != self._generation:
                self._follow_head()
            self._register_reader()
            try:
                if table is not None:
                    kwargs["db"] = self._data if table == "data" else self._meta
                try:
                    txn = self._begin_read(**kwargs)
                except lmdb.MapResizedError:
                    txn = None
                if txn is not None:
                    with txn:
                        yield txn
                    return
            finally:
                self._unregister_reader()
            self._adopt_map_size()
        raise CacheError(f"the cache at {self.path} keeps being resized under this process")

    # -- reading ------------------------------------------------------------

    def _register_reader(self) -> None:
        """Count a read in before it begins a transaction; wait while the map is being resized.

        Raises:
            ClosedError: the cache is closed (or this is a forked child).
        """
        active = self._active_readers
        active.append(None)
        if self._readers_blocked:
            active.pop()
            self._wait_and_register_reader()

    def _wait_and_register_reader(self) -> None:
        """The slow path of :meth:`_register_reader`: wait until readers are let in, then count this one."""
        with self._readers_gate:
            # A resizer may be waiting for the entry just removed.
            self._readers_gate.notify_all()
            while True:
                if self._closed:
                    raise self._closed_error()
                if not self._readers_blocked:
                    self._active_readers.append(None)
                    if not self._readers_blocked:
                        return
                    self._active_readers.pop()
                    self._readers_gate.notify_all()
                self._readers_gate.wait()

    def _unregister_reader(self) -> None:
        """Count a read out once its transaction ended; wake a resizer (or close) waiting for it."""
        self._active_readers.pop()
        if self._readers_blocked:
            with self._readers_gate:
                self._readers_gate.notify_all()

    def get(self, key: bytes) -> bytes | None:
        """Return the stored value bytes of ``key``, or ``None`` if absent."""
        return self._read_stored(key, None)  # type: ignore[no-any-return]

    def value_reader(
        self, decode: Callable[[bytes], Any], unpack_msgpack: bool = False
    ) -> Callable[[bytes, Any], Any]:
        """Return ``read(key, default)``: ``decode`` of the value of ``key``, or ``default`` if it is absent.

        The store's point read: the steps of :meth:`get`, then ``decode``, in
        one call. With ``unpack_msgpack`` the value is first unpacked by
        msgpack's C function directly (strict map keys, str for strings);
        ``decode`` runs only if that raised, to raise its own error.
        """
        cache = self
        unpackb = msgpack.unpackb

        def read(key: bytes, default: Any) -> Any:
            # The point-read hot path: one comparison with HEAD (a memory read
            # of a mapped file) and _register_reader / _unregister_reader inlined.
            raw: bytes | None
            if cache._head_words[1] != cache._generation:
                raw = cache._get_slowly(key)
            else:
                active = cache._active_readers
                active.append(None)
                if cache._readers_blocked:
                    active.pop()
                    cache._wait_and_register_reader()
                try:
                    # begin/get/abort without the context manager and with a positional
                    # db: half the cost of the idiomatic form; a read transaction that
                    # raised is aborted when it is collected.
                    txn = cache._begin(cache._data)
                    raw = txn.get(key)
                    txn.abort()
                except (lmdb.ReadersFullError, lmdb.MapResizedError):
                    raw = _RETRY_READ
                except lmdb.Error as exc:
                    raise cache._damaged(exc) from exc
                finally:
                    active.pop()
                    if cache._readers_blocked:
                        with cache._readers_gate:
                            cache._readers_gate.notify_all()
                if raw is _RETRY_READ:
                    raw = cache._get_slowly(key)
            if raw is None:
                return default
            if unpack_msgpack:
                try:
                    return unpackb(raw, raw=False, strict_map_key=True)
                except Exception:  # noqa: BLE001 - decode raises the codec's error for these bytes
                    pass
            return decode(raw)

        return read

    def _get_slowly(self, key: bytes) -> bytes | None:
        """:meth:`get` after HEAD moved, the map grew elsewhere, or the reader table was full."""
        if self._closed:
            raise self._closed_error()
        try:
            with self._reading("data") as txn:
                value: bytes | None = txn.get(key)
                return value
        except lmdb.Error as exc:
            raise self._damaged(exc) from exc

    def version(self) -> tuple[int, int]:
        """A pair that changes whenever the cache may have changed, in this process or any other.

        ``(generation HEAD names, last committed transaction id of this
        process's environment)``: two memory reads of mapped pages (HEAD and
        LMDB's meta page, through ``mdb_env_info``), no transaction and no
        lock, so it can be polled every millisecond. Every commit moves it (a
        replay batch, a writer's own apply, a ``mark_current``), and so does a
        switch to a rebuilt generation, even before this process follows it.
        Equal pairs mean nothing was committed in between; a different pair
        may come from a commit that changed no value.
        """
        if self._closed:
            raise self._closed_error()
        return int(self._head_words[1]), int(self._env.info()["last_txnid"])

    def __len__(self) -> int:
        try:
            with self._reading() as txn:
                return int(txn.stat(self._data)["entries"])
        except lmdb.Error as exc:
            raise self._damaged(exc) from exc

    def items(
        self, *, start: bytes | None = None, stop: bytes | None = None, prefix: bytes | None = None
    ) -> Iterator[tuple[bytes, bytes]]:
        """Yield ``(key, value)`` in key order, for ``start <= key < stop`` and keys under ``prefix``.

        Each chunk of keys is read in its own short read transaction: the
        iteration sees writes made while it runs, like iterating a dict that
        changes, but never fails because of them.
        """
        lower = start
        if prefix is not None and (lower is None or lower < prefix):
            lower = prefix
        inclusive = True
        while True:
            chunk: list[tuple[bytes, bytes]] = []
            try:
                with self._reading("data", buffers=False) as txn:
                    cursor = txn.cursor()
                    positioned = cursor.set_range(lower) if lower is not None else cursor.first()
                    if positioned and not inclusive and cursor.key() == lower:
                        positioned = cursor.next()
                    while positioned and len(chunk) < _SCAN_CHUNK:
                        chunk.append((cursor.key(), cursor.value()))
                        positioned = cursor.next()
            except lmdb.Error as exc:
                raise self._damaged(exc) from exc
            for key, value in chunk:
                if stop is not None and key >= stop:
                    return
                if prefix is not None and not key.startswith(prefix):
                    return
                yield key, value
            if len(chunk) < _SCAN_CHUNK:
                return
            lower, inclusive = chunk[-1][0], False

    def keys(self) -> Iterator[bytes]:
        """Yield every key in order."""
        for key, _ in self.items():
            yield key

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[tuple[dict[int, int], Iterator[tuple[bytes, bytes]]]]:
        """The checkpoint and an iterator of every entry, read in ONE transaction (a context manager).

        For a consistent view of a cache others keep writing (``kvlog verify``):
        the entries are exactly the log folded up to that checkpoint. The
        transaction stays open while the caller iterates; keep it short.
        """
        with self._reading(buffers=False) as txn:
            raw = txn.get(_META_CHECKPOINT, db=self._meta)
            checkpoint = dict(_unpack(raw)) if raw is not None else {}
            yield checkpoint, iter(txn.cursor(db=self._data))

    # -- meta ---------------------------------------------------------------

    def _meta_get(self, name: bytes, valid: Callable[[Any], bool]) -> Any:
        try:
            with self._reading("meta") as txn:
                raw = txn.get(name)
        except lmdb.Error as exc:
            raise self._damaged(exc) from exc
        if raw is None:
            return None
        try:
            value = _unpack(raw)
        except Exception as exc:  # msgpack raises several kinds on garbage
            raise self._damaged_meta(name, f"it is not msgpack ({exc})") from exc
        if not valid(value):
            raise self._damaged_meta(name, f"{value!r:.80} is not what kvlog stores there")
        return value

    def _damaged_meta(self, name: bytes, problem: str) -> CacheError:
        reason = f"the {name.decode()} in its meta table is garbled: {problem}"
        self._mark_damaged(reason)
        return CacheError(
            f"the cache at {self.path} is damaged ({reason}); rebuild it from the log: run `kvlog rewarm` "
            "(or close the store and open it again: a damaged cache is set aside)"
        )

    def identity(self) -> dict[str, Any] | None:
        """Return the identity of the log this cache mirrors, or ``None`` for a new cache."""
        fmt = self._meta_get(_META_FORMAT, lambda v: isinstance(v, int))
        if fmt is not None and fmt != _FORMAT:
            return {"format": fmt}
        return self._meta_get(_META_IDENTITY, lambda v: isinstance(v, dict))  # type: ignore[no-any-return]

    def checkpoint(self) -> dict[int, int]:
        """Return partition -> next offset to replay (empty for a new or reset cache)."""
        return dict(self._meta_get(_META_CHECKPOINT, _is_checkpoint) or {})

    def current_at(self) -> float | None:
        """Wall-clock time (epoch seconds) when the cache last stood at the end of the log, if known."""
        value = self._meta_get(_META_CURRENT_AT, lambda v: isinstance(v, int | float))
        return None if value is None else float(value)

    # -- writing (replay only) ----------------------------------------------

    @contextlib.contextmanager
    def _writing(self) -> Iterator[lmdb.Transaction[Any]]:
        """A write transaction on the live generation, which the caller may abort by raising.

        Raises :class:`CheckpointMoved` (nothing written) if the generation
        was superseded: this process then follows HEAD.
        """
        if self._closed:
            raise self._closed_error()
        with self._write_lock:
            if not self._detached and self._head_generation() != self._generation:
                self._follow_head()
            for _ in range(3):
                try:
                    txn = self._env.begin(write=True)
                    break
                except lmdb.MapResizedError:
                    self._adopt_map_size()
            else:
                raise CacheError(f"the cache at {self.path} keeps being resized under this process")
            try:
                if txn.get(_META_SUPERSEDED, db=self._meta) is not None:
                    raise CheckpointMoved("the cache moved to a new generation")
                yield txn
            except BaseException:
                txn.abort()
                raise
            txn.commit()

    def mark_current(self, when: float) -> None:
        """Record that at ``when`` the checkpoint was at the end of the log (never moves it back).

        A reopened cache that is behind asks the log whether compaction dropped
        tombstones past its checkpoint since then (or, where the log cannot
        tell, compares the time away with the tombstone retention).
        """
        try:
            with self._writing() as txn:
                raw = txn.get(_META_CURRENT_AT, db=self._meta)
                if raw is None or float(_unpack(raw)) < when:
                    txn.put(_META_CURRENT_AT, _pack(when), db=self._meta)
        except CheckpointMoved:
            return  # the next generation keeps its own mark
        except lmdb.Error as exc:
            raise self._damaged(exc, "write to") from exc

    def apply(
        self,
        records: Iterable[Any],
        checkpoint: Mapping[int, int],
        *,
        expect: Mapping[int, int] | None = None,
        check: Callable[[bytes], object] | None = None,
        on_bad: Callable[[Any, str], object] | None = None,
        strict: bool = False,
    ) -> tuple[int, int]:
        """Apply records in order and store ``checkpoint``, in ONE write transaction.

        Each record has ``partition``, ``offset``, ``key`` and ``value``
        attributes; ``value=None`` is a tombstone. A record the cache must not
        take is skipped (the key keeps its previous value) and counted: a key
        the cache cannot hold (null, empty or longer than 511 bytes), or a
        value that ``check`` raises on (the codec's validation). Both are
        possible only from foreign producers.

        Args:
            records: the records, in log order.
            checkpoint: the positions that follow them, stored with them.
            expect: the positions the records follow: the batch is written
                only if the stored checkpoint is still exactly this.
            check: run on every value; an exception means the value is bad.
            on_bad: called as ``on_bad(record, reason)`` for each skipped
                record, after the transaction committed.
            strict: raise on the first bad record instead of skipping it.

        Returns:
            ``(applied, skipped)`` record counts.

        Raises:
            CheckpointMoved: the stored checkpoint is not ``expect``, or the
                cache moved to a new generation; nothing was written.
            BadRecordError: ``strict`` and a record is bad; nothing of this
                batch was written.
            CacheError: LMDB failed (e.g. the disk is full); nothing of this
                batch was written.
            ClosedError: the cache is closed.
        """
        batch = records if isinstance(records, list) else list(records)

        def fill(txn: lmdb.Transaction[Any], bad: list[tuple[Any, str]]) -> int:
            self._put_records(txn, batch, check, bad, strict)
            return len(batch) - len(bad)

        return self._apply_batch(fill, checkpoint, expect, on_bad)

    def apply_columns(
        self,
        columns: Sequence[RecordColumns],
        checkpoint: Mapping[int, int],
        *,
        expect: Mapping[int, int] | None = None,
        check: Callable[[bytes], object] | None = None,
        checked_codec: str | None = None,
        on_bad: Callable[[Any, str], object] | None = None,
        strict: bool = False,
    ) -> tuple[int, int]:
        """:meth:`apply` of records held column by column (``columns``, in log order per partition).

        The same transaction, checks and outcome as :meth:`apply` of the same
        records, for a fraction of the Python work per record: the keys and
        values of each :class:`RecordColumns` are checked a column at a time
        and handed to LMDB with ``putmulti``; only columns holding a bad
        record are applied record by record, which skips (or, ``strict``,
        raises at) exactly the records :meth:`apply` would.

        ``checked_codec`` names the codec ``check`` belongs to, if it is
        kvlog's msgpack codec: the values of columns whose ``values_codec``
        (an attribute the embedded log's columns have) is that name were
        encoded, and so checked, by it when written, and are not checked again.
        """

        def fill(txn: lmdb.Transaction[Any], bad: list[tuple[Any, str]]) -> int:
            total = 0
            for part in columns:
                total += len(part.keys)
                checked = checked_codec is not None and getattr(part, "values_codec", None) == checked_codec
                self._put_columns(txn, part, None if checked else check, bad, strict)
            return total - len(bad)

        return self._apply_batch(fill, checkpoint, expect, on_bad)

    def _apply_batch(
        self,
        fill: Callable[[lmdb.Transaction[Any], list[tuple[Any, str]]], int],
        checkpoint: Mapping[int, int],
        expect: Mapping[int, int] | None,
        on_bad: Callable[[Any, str], object] | None,
    ) -> tuple[int, int]:
        """One write transaction: check ``expect``, ``fill`` it with records, store ``checkpoint``, commit.

        ``fill(txn, bad)`` writes the records, appends the ones it skipped to
        ``bad`` as ``(record, reason)`` and returns how many it applied; on a
        full map it runs again, from the start, in a new transaction.
        """
        packed_checkpoint = _pack(dict(checkpoint))
        packed_expect = None if expect is None else _pack(dict(expect))
        # The writer does not pass the reader gate: resizes happen only
        # between this process's write transactions (under _write_lock), so
        # readers are the only transactions a resize must wait for. (Passing
        # the gate here would let busy readers starve replay of the gate's lock.)
        with self._write_lock:
            pages_before = self._env.info()["last_pgno"]
            while True:
                bad: list[tuple[Any, str]] = []  # of the attempt that commits: a retry starts again
                try:
                    with self._writing() as txn:
                        if packed_expect is not None:
                            self._check_expected(txn, packed_expect, expect)
                        applied = fill(txn, bad)
                        txn.put(_META_CHECKPOINT, packed_checkpoint, db=self._meta)
                    break
                except lmdb.MapFullError:
                    pass  # grow, then write the whole batch again: the failed txn was aborted
                except lmdb.Error as exc:
                    raise CacheError(f"cannot write to the cache at {self.path}: {exc}") from exc
                self._grow()
            self._keep_headroom(pages_before)
        if on_bad is not None:
            for record, reason in bad:
                on_bad(record, reason)
        return applied, len(bad)

    def apply_appended(
        self,
        records: Sequence[tuple[bytes, bytes | None]],
        before: Mapping[int, int],
        after: Mapping[int, int],
    ) -> bool:
        """A writer's own ``(key, value)`` records, just appended: apply them if the checkpoint is ``before``.

        The write path of the embedded log (see docs/design.md, "The store"):
        the same transaction :meth:`apply` writes (the records, then
        ``after`` as the checkpoint, only if the stored checkpoint is
        ``before``), without the value checks (the store's own codec encoded
        the values) and with less bookkeeping per call.

        Returns:
            Whether the records were applied. ``False`` (nothing written) if
            the checkpoint is elsewhere, or the cache moved to a new generation.
        """
        if self._closed:
            raise self._closed_error()
        # Writes of one process follow each other: its last checkpoint is
        # usually this one's "before", already packed.
        last = self._last_appended
        packed_before = last[1] if last[0] == before else _pack(before)
        packed_after = packb(after, use_bin_type=True)
        if not self._commit_appended(records, packed_before, packed_after):
            return False
        self._last_appended = (after, packed_after)
        return True

    def apply_appended_one(
        self, key: bytes, value: bytes | None, p: int, offset: int, ends: Mapping[int, int]
    ) -> bool:
        """:meth:`apply_appended` of the one record at ``offset`` of partition ``p``; ``ends`` is the log's after it.

        The single write's path: on a log of one partition the two
        checkpoints are packed from their integers, without building them.
        """
        if self._closed:
            raise self._closed_error()
        if len(ends) == 1:
            # Exactly the bytes _pack({p: n}) gives: a map of one entry, then two integers.
            # This process's last single write usually ended where this one begins.
            last = self._last_appended_one
            packed_before = last[1] if last[0] == offset else b"\x81" + _pack_int(p) + _pack_int(offset)
            packed_after = b"\x81" + _pack_int(p) + _pack_int(offset + 1)
            if not self._commit_appended(((key, value),), packed_before, packed_after):
                return False
            self._last_appended_one = (offset + 1, packed_after)
            return True
        return self.apply_appended(((key, value),), {**ends, p: offset}, dict(ends))

    def _commit_appended(
        self, records: Sequence[tuple[bytes, bytes | None]], packed_before: bytes, packed_after: bytes
    ) -> bool:
        """Commit ``records`` and ``packed_after`` as the checkpoint if the stored checkpoint is ``packed_before``."""
        with self._write_lock:
            words = self._head_words
            if words[1] != self._generation and not self._detached:
                self._follow_head()
            try:
                txn = self._env.begin(write=True)
            except lmdb.MapResizedError:
                return self._apply_appended_slowly(records, packed_before, packed_after)
            try:
                # Begun after any switch committed, so HEAD already names the
                # next generation if this one was superseded (switch_to writes
                # HEAD inside its transaction).
                if words[1] != self._generation and not self._detached:
                    txn.abort()
                    return False
                # The checkpoint is swapped for the new one in one call; the
                # old one decides whether the transaction commits at all.
                stored = txn.replace(_META_CHECKPOINT, packed_after, db=self._meta)
                if stored != packed_before and (stored is None or _unpack(stored) != _unpack(packed_before)):
                    txn.abort()
                    return False
                data = self._data
                if len(records) > 1:
                    # A batch (update()): putmulti is a loop in C, about a third of the cost of put() calls.
                    values = list(map(_second, records))
                    if all(values):  # no tombstone (None is false; so is an empty value, looked at below)
                        txn.cursor(data).putmulti(records)  # type: ignore[arg-type]  # no None: all(values)
                    else:
                        _put_runs(txn, data, list(map(_first, records)), values, _tombstones_of(values))
                else:
                    for key, value in records:
                        if value is None:
                            txn.delete(key, db=data)
                        else:
                            txn.put(key, value, db=data)
                txn.commit()
            except lmdb.MapFullError:
                txn.abort()
                return self._apply_appended_slowly(records, packed_before, packed_after)
            except BaseException as exc:
                txn.abort()
                if isinstance(exc, lmdb.Error):
                    raise CacheError(f"cannot write to the cache at {self.path}: {exc}") from exc
                raise
            self._appended_commits += 1
            if self._appended_commits % _HEADROOM_CHECK_EVERY == 0:
                self._keep_headroom(self._pages_at_last_check)
                self._pages_at_last_check = self._env.info()["last_pgno"]
        return True

    def _apply_appended_slowly(
        self, records: Sequence[tuple[bytes, bytes | None]], packed_before: bytes, packed_after: bytes
    ) -> bool:
        # apply() wants record objects; their partitions and offsets do not matter here.
        batch = [Record(0, 0, key, value) for key, value in records]
        try:
            self.apply(batch, _unpack(packed_after), expect=_unpack(packed_before))
        except CheckpointMoved:
            return False
        return True

    def _check_expected(
        self, txn: lmdb.Transaction[Any], packed_expect: bytes, expect: Mapping[int, int] | None
    ) -> None:
        stored = txn.get(_META_CHECKPOINT, db=self._meta)
        if stored == packed_expect:
            return
        # The same positions may be packed in another key order.
        if stored is not None and expect is not None and _unpack(stored) == dict(expect):
            return
        raise CheckpointMoved("the checkpoint moved")

    def _put_records(
        self,
        txn: lmdb.Transaction[Any],
        records: Iterable[Any],
        check: Callable[[bytes], object] | None,
        bad: list[tuple[Any, str]],
        strict: bool,
    ) -> None:
        # The one pass over the batch: the key check and the value check sit
        # in it, rather than in a pass of their own, because replay speed is
        # this loop's speed (a try block costs nothing until it catches).
        cursor = txn.cursor(self._data)
        put = cursor.put
        delete = txn.delete
        data = self._data
        for record in records:
            key = record.key
            if not key or len(key) > 511:
                bad.append((record, _key_problem(key)))
                if strict:
                    raise _bad_record(record, bad[-1][1])  # aborts the transaction
                continue
            value = record.value
            if value is None:
                delete(key, db=data)
                continue
            if check is not None:
                try:
                    check(value)
                except Exception as exc:  # any failure of a user codec means a bad value
                    bad.append((record, _value_problem(exc)))
                    if strict:
                        raise _bad_record(record, bad[-1][1]) from exc
                    continue
            put(key, value)

    def _put_columns(
        self,
        txn: lmdb.Transaction[Any],
        columns: RecordColumns,
        check: Callable[[bytes], object] | None,
        bad: list[tuple[Any, str]],
        strict: bool,
    ) -> None:
        keys, values = columns.keys, columns.values
        if not keys:
            return
        if not _columns_pass(columns, check):
            self._put_records(txn, columns.records(), check, bad, strict)
            return
        _put_runs(txn, self._data, keys, values, columns.tombstones)

    def reset(self, identity: Mapping[str, Any], checkpoint: Mapping[int, int] | None = None) -> None:
        """Drop every entry and bind the cache to ``identity``, in one transaction.

        Every process sees the empty cache fill again as replay proceeds
        (:meth:`new_generation` rebuilds beside the live cache instead). A
        crash during a reset leaves either the old cache or an empty cache
        bound to the new identity; both are consistent. A cache LMDB reported
        damaged (:attr:`damaged`) is first set aside and replaced by an empty
        generation: dropping the entries of a damaged tree walks its bad pages.

        Raises:
            CacheError: LMDB failed, or a damaged cache cannot be set aside.
        """
        if self._closed:
            raise self._closed_error()
        while True:
            if self._damage is not None:
                self._replace_damaged()
            try:
                with self._write_lock:
                    try:
                        with self._writing() as txn:
                            self._reset_in(txn, identity, checkpoint)
                    except CheckpointMoved:
                        continue  # a new generation: reset that one
                return
            except lmdb.Error as exc:
                fresh = self.moved_to is not None and self._damage is None
                error = self._damaged(exc, "reset")
                if self._damage is None or fresh:
                    raise error from exc
                # The drop found the damage: set the cache aside and reset the new one (once).

    def _reset_in(
        self, txn: lmdb.Transaction[Any], identity: Mapping[str, Any], checkpoint: Mapping[int, int] | None
    ) -> None:
        txn.drop(self._data, delete=False)
        txn.put(_META_FORMAT, _pack(_FORMAT), db=self._meta)
        txn.put(_META_IDENTITY, _pack(dict(identity)), db=self._meta)
        txn.put(_META_CHECKPOINT, _pack(dict(checkpoint or {})), db=self._meta)
        # A replay from the log start that begins now misses no delete
        # unless the log drops tombstones before the replay reaches
        # them: the same bound as a cache that was current now.
        txn.put(_META_CURRENT_AT, _pack(time.time()), db=self._meta)

    def _replace_damaged(self) -> None:
        """Set the damaged generation aside and open an empty one in its place (HEAD follows)."""
        assert self._damage is not None
        with self._admin(), self._write_lock, self._readers_shut_out():
            self._env.close()
            try:
                created = self._set_aside(self._damage, move=True)
                if not self.sync:
                    self._mark_unsynced(_boot_id())
                self._open_env(created)
            except BaseException as exc:
                self._closed = True  # the environment is gone: nothing can be read or written
                if isinstance(exc, lmdb.Error | OSError):
                    raise CacheError(f"cannot open a new cache at {self.path}: {exc}") from exc
                raise
            self._damage = None
        log.warning("%s; it is rebuilt from the log", self.discarded)

    # -- rebuilding beside the live cache -------------------------------------

    def new_generation(self, identity: Mapping[str, Any]) -> Cache:
        """Start a new, empty generation bound to ``identity``, beside the live one.

        Replay fills it (it is a :class:`Cache` of its own, which never
        follows HEAD) while every process keeps reading the live generation;
        :meth:`switch_to` then makes it the live one for all of them. A
        process that dies meanwhile leaves a directory the next first user
        deletes.
        """
        if self._closed:
            raise self._closed_error()
        with self._admin():
            generation = max([self._head_generation(), *_generations(self.path)]) + 1
            make_dirs(self.path / generation_name(generation), self.file_mode)
        builder = Cache(
            self.path,
            map_size=self._map_size,
            sync=self.sync,
            file_mode=self.file_mode,
            _builds=generation,
        )
        try:
            builder.reset(identity)
        except BaseException:
            builder.discard()
            raise
        return builder

    def switch_to(self, builder: Cache) -> bool:
        """Make ``builder``'s generation the live one, if it holds at least what the live one holds.

        In one write transaction of the live generation (so no replay can
        move it meanwhile): if ``builder``'s checkpoint is at or past the live
        checkpoint in every partition, HEAD is pointed at the builder's
        generation and the live one is marked superseded. Every process reads
        the new one from its next read on; none sees an older value than it
        saw before. This process takes over the builder's environment (the
        builder is closed).

        Returns:
            ``False`` (nothing changed) if the live generation is ahead of the
            builder in some partition: replay the builder further and try again.
        """
        if self._closed:
            raise self._closed_error()
        if self._damage is not None or (self.env_path / _DAMAGED).exists():
            # Nothing of a damaged generation can be trusted, so nothing of it
            # is compared or written: it is set aside, and the builder's
            # generation, complete as of now, becomes the live one.
            self._switch_from_damaged(builder)
            return True
        built = builder.checkpoint()
        with self._admin(), self._write_lock:
            try:
                with self._writing() as txn:
                    raw = txn.get(_META_CHECKPOINT, db=self._meta)
                    live = dict(_unpack(raw)) if raw is not None else {}
                    if any(built.get(p, 0) < offset for p, offset in live.items()):
                        raise _NotReady
                    txn.put(_META_SUPERSEDED, _pack(builder.generation), db=self._meta)
                    self._write_head(builder.generation)
            except _NotReady:
                return False
            except CheckpointMoved:
                return False  # another process switched first: this process now reads its generation
            old_path = self.env_path
            # The builder's handle closes before this process opens the
            # generation again: LMDB forbids two handles on one environment
            # in a process (closing one drops the other's file locks).
            builder.close()
            self._follow_head()
        shutil.rmtree(old_path, ignore_errors=True)  # other processes keep their open files until they switch
        return True

    def _switch_from_damaged(self, builder: Cache) -> None:
        with self._admin(), self._write_lock, self._readers_shut_out():
            self._env.close()
            reason = self._damage or (self.env_path / _DAMAGED).read_text(errors="replace").strip()
            target = self._corrupt_target()
            self._write_head(builder.generation)
            builder.close()
            try:
                os.rename(self.env_path, target)
                fsync_dir(self.path.parent)
            except OSError as exc:
                log.warning("cannot move the damaged cache %s aside (%s); deleting it", self.env_path, exc)
                shutil.rmtree(self.env_path, ignore_errors=True)
            else:
                self.moved_to = target
                self.discarded = f"the cache was damaged ({reason}); it was moved aside to {target}"
            self._generation = builder.generation
            self._open_env([])
            self._damage = None
        log.warning(
            "%s; the cache rebuilt from the log replaces it",
            self.discarded or "the damaged cache was deleted",
        )

    def discard(self) -> None:
        """Close a builder that will not be switched to, and delete its generation."""
        path = self.env_path
        self.close()
        shutil.rmtree(path, ignore_errors=True)

    # -- growing the map ---------------------------------------------------------

    def _keep_headroom(self, pages_before: int) -> None:
        """Grow the map after a batch if the next one like it might not fit twice over.

        LMDB gets very slow close to a full map while readers pin old pages
        (each page allocation rescans the free list), so kvlog keeps the map at
        least twice as large as the data plus two batches like the last one.
        The last batch's size is the pages it added, which costs nothing to
        learn (summing the records' sizes before each batch cost a pass over
        the batch, ~5% of a cold replay). A batch much larger than the one
        before it may still fill the map: it is then written again after
        growing.
        """
        info = self._env.info()
        used = (info["last_pgno"] + 1) * self._page_size
        added = max(0, info["last_pgno"] - pages_before) * self._page_size
        while 2 * (used + 2 * added) > self._env.info()["map_size"]:
            self._grow()

    def _grow(self) -> None:
        with self._write_lock, self._readers_shut_out():
            new_size = self._env.info()["map_size"] * 2
            try:
                self._env.set_mapsize(new_size)
            except lmdb.Error as exc:
                raise CacheError(
                    f"the cache at {self.path} is full and cannot grow to {new_size} bytes: {exc}"
                ) from exc

    @contextlib.contextmanager
    def _readers_shut_out(self) -> Iterator[None]:
        """Keep readers out while the writer replaces the map: block new ones, wait for those inside.

        Readers are let in again afterwards, unless the cache was closed meanwhile.
        """
        with self._resize_lock, self._readers_gate:
            self._readers_blocked = True
            try:
                while self._active_readers:
                    self._readers_gate.wait()
                yield
            finally:
                self._readers_blocked = self._closed
                self._readers_gate.notify_all()

    # -- housekeeping -------------------------------------------------------

    @property
    def map_size(self) -> int:
        """The current LMDB map size in bytes."""
        return int(self._env.info()["map_size"])

    @property
    def env(self) -> lmdb.Environment:
        """The LMDB environment, for tools and tests that inspect it (its reader table, its stat).

        Read and write through the cache's methods instead: a transaction
        begun on the environment is not a registered reader, so the map may be
        resized under it, and a write there bypasses the checkpoint.
        """
        return self._env

    def disk_bytes(self) -> int:
        """Bytes the live generation's files take on disk."""
        total = 0
        for name in _LMDB_FILES:
            try:
                total += (self.env_path / name).stat().st_blocks * 512
            except OSError:
                pass
        return total

    def close(self) -> None:
        """Close the environment once no reader is inside. Idempotent.

        The last process to close the cache syncs it (if it was written
        without fsync) and records what its file looks like, so that the next
        first open skips the structure check.
        """
        with self._readers_gate:
            if self._closed:
                return
            self._closed = True
            self._readers_blocked = True
            while self._active_readers:
                self._readers_gate.wait()
        _fork.unregister(self)
        _open_caches.discard(self)
        if self._detached:
            # A builder: never the last user of the directory (its opener still
            # holds the cache), and closed by switch_to under the directory lock.
            try:
                with self._write_lock:
                    self._env.close()
            finally:
                self._release_files()
            return
        try:
            with self._admin(), self._write_lock:
                last = self._users_fd is not None and self._try_lock(self._users_fd, fcntl.LOCK_EX)
                try:
                    if last:
                        self._close_last()
                finally:
                    self._env.close()
                    if last and self._damage is None:
                        self._note_clean_close()
        finally:
            self._release_files()

    def _close_last(self) -> None:
        marker = self.env_path / _UNSYNCED
        if marker.exists():
            # Everything is on disk now: the cache survives a reboot.
            self._env.sync(True)
            marker.unlink()
            fsync_dir(self.env_path)

    def _release_files(self) -> None:
        if isinstance(self._head_words, memoryview):
            self._head_words.release()
        self._head_words = _NO_HEAD
        if self._head_map is not None:
            with contextlib.suppress(BufferError, ValueError):
                self._head_map.close()
            self._head_map = None
        for fd in (self._users_fd, self._admin_fd):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)  # drops this process's flocks
        self._users_fd = self._admin_fd = None

    def _note_clean_close(self) -> None:
        """Record what data.mdb looks like now, so that the next open can skip the structure check."""
        try:
            data = json.dumps(file_signature(self.env_path / "data.mdb")).encode()
            write_file_atomically(self.env_path / _CLOSED, data, sync=False, file_mode=self.file_mode)
        except OSError as exc:  # a full disk: the next open checks the structure instead
            log.debug("cannot record the clean close of the cache at %s: %s", self.path, exc)

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def __repr__(self) -> str:
        state = " (unusable after fork)" if self._forked else " closed" if self._closed else ""
        return f"<Cache {str(self.path)!r}{state}>"


class _NotReady(Exception):
    """switch_to: the builder is behind the live generation."""


# -- fork() -------------------------------------------------------------------------
#
# A child cannot use an LMDB environment its parent opened, nor close it (that
# would abort the parent's transactions it inherited, freeing their slots in the
# shared reader table), and py-lmdb refuses to open the same files again while
# the inherited handle is open. So around a fork every open cache of the process
# closes its environment, with its readers and writer held off, and the parent
# opens it again right after: the child starts with no handle, free to open the
# cache anew (a KVLog reopens itself there at its first use).

_open_caches: weakref.WeakSet[Cache] = weakref.WeakSet()


def _before_fork() -> None:
    for cache in list(_open_caches):
        cache._suspend_for_fork()


def _after_fork_in_parent() -> None:
    for cache in list(_open_caches):
        cache._resume_after_fork()


def _after_fork_in_child() -> None:
    _open_caches.clear()


os.register_at_fork(
    before=_before_fork, after_in_parent=_after_fork_in_parent, after_in_child=_after_fork_in_child
)
