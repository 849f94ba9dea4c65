"""The LMDB cache: the log folded up to a checkpoint.

:class:`Cache` keeps key and value bytes, as the log holds them, in an LMDB
table ``data``, and in a table ``meta`` the checkpoint they reach and the
identity of the log they mirror. A batch and its checkpoint commit in one
transaction, so the cache is always the log folded up to its checkpoint. A
damaged cache is found before LMDB opens it (:mod:`kvlog.cachecheck`) and set
aside. See docs/design.md, "The cache".
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import lmdb
import msgpack

from . import _fork
from ._files import DEFAULT_FILE_MODE, check_file_mode, fsync_dir, make_dirs, write_file_atomically
from .cachecheck import check_meta_pages, check_structure, file_signature
from .errors import BadRecordError, CacheError, ClosedError, CodecError

__all__ = ["DEFAULT_MAP_SIZE", "Cache"]

log = logging.getLogger(__name__)

#: Initial map size. Address space, not disk: LMDB files grow as data is
#: written. The map doubles whenever a replay batch does not fit.
DEFAULT_MAP_SIZE = 1 << 30

_FORMAT = 1
_META_FORMAT = b"format"
_META_IDENTITY = b"identity"
_META_CHECKPOINT = b"checkpoint"
_META_CURRENT_AT = b"current_at"

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


def _is_checkpoint(value: Any) -> bool:
    return isinstance(value, dict) and all(
        type(p) is int and type(o) is int and p >= 0 and o >= 0 for p, o in value.items()
    )


def _pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)  # type: ignore[no-any-return]


def _unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


class Cache:
    """An LMDB environment holding the folded log and its checkpoint.

    One thread at a time writes (the replayer); any number of threads read.

    Args:
        path: directory of the LMDB environment; created if missing.
        map_size: initial LMDB map size in bytes; it grows on demand.
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
    ) -> None:
        self.path = Path(path)
        self.file_mode = check_file_mode(file_mode)
        #: Why the files found at ``path`` were not used (deleted or set aside), if they were not.
        self.discarded: str | None = None
        #: Where a damaged cache was set aside (``move_damaged=True``), if one was.
        self.moved_to: Path | None = None
        #: Seconds the structure check (:func:`~kvlog.cachecheck.check_structure`) took
        #: at open; ``None`` when none was needed (a new cache, or one closed cleanly
        #: and unchanged since).
        self.structure_check_seconds: float | None = None
        self._map_size = map_size
        # Why LMDB said the files are damaged at run time (see _damaged).
        self._damage: str | None = None
        self._forked = False
        boot = _boot_id()
        #: Whether every commit is synced to disk (``False`` only where the boot can be identified).
        self.sync = sync or boot is None
        # Growing the map (mdb_env_set_mapsize) needs every read transaction of
        # this process closed. Readers register without a lock, on the hot path:
        # a reader appends to _active_readers and then checks _readers_blocked; a
        # resizer (or close) sets _readers_blocked and then checks _active_readers.
        # Both list operations and attribute accesses are atomic and ordered under
        # the GIL, so at least one side sees the other (Dekker): the reader backs
        # off and waits at _readers_gate, or the resizer waits there for it.
        # Unregistering readers wake a waiting resizer.
        self._readers_gate = threading.Condition(threading.Lock())
        self._active_readers: list[None] = []
        self._readers_blocked = False
        self._resize_lock = threading.Lock()
        self._closed = False
        try:
            make_dirs(self.path, self.file_mode)
            self._discard_if_torn(boot)
            created = [name for name in _LMDB_FILES if not (self.path / name).exists()]
            damage = self._inspect()
            if damage is not None:
                created = self._set_aside(damage, move_damaged)
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
        except CacheError:
            raise
        except lmdb.Error as exc:
            raise CacheError(f"cannot open the cache at {self.path}: {exc}") from exc
        except OSError as exc:
            raise CacheError(f"cannot open the cache at {self.path}: {exc}") from exc
        _fork.register(self)

    def _open_env(self, created: list[str]) -> None:
        self._env = lmdb.open(
            str(self.path),
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
            max_readers=512,
            mode=self.file_mode,
        )
        try:
            for name in created:
                os.chmod(self.path / name, self.file_mode)  # LMDB created them through the umask
            # A reader process killed by SIGKILL leaves its slot in lock.mdb taken.
            self._env.reader_check()
            self._page_size = int(self._env.stat()["psize"])
            self._data = self._env.open_db(b"data")
            self._meta = self._env.open_db(b"meta")
        except BaseException:
            self._env.close()
            raise

    def _inspect(self) -> str | None:
        """Why the files at ``path`` must not be opened, or ``None``.

        In order: LMDB reported damage before (a ``DAMAGED`` file); the meta
        pages (always, plain reads); unless ``data.mdb`` is exactly as a clean
        close left it, the structure check in a child process.
        """
        try:
            reason = (self.path / _DAMAGED).read_text(errors="replace").strip()
        except FileNotFoundError:
            reason = None
        if reason is not None:
            return reason or "LMDB reported damage"
        data_file = self.path / "data.mdb"
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
        reason = check_structure(self.path, size, self.file_mode)
        self.structure_check_seconds = round(time.monotonic() - started, 3)
        return reason

    def _unchanged_since_closed(self, data_file: Path) -> bool:
        """Whether data.mdb is exactly as the last clean close left it."""
        try:
            closed = json.loads((self.path / _CLOSED).read_bytes())
            return bool(closed == file_signature(data_file))
        except (OSError, ValueError):
            return False

    def _set_aside(self, reason: str, move: bool) -> list[str]:
        """Move the damaged cache out of the way and make an empty directory in its place.

        Returns:
            The LMDB files the next open creates (all of them).

        Raises:
            CacheError: ``move`` is false, or the directory cannot be moved.
        """
        if not move:
            raise CacheError(
                f"the cache at {self.path} is damaged: {reason}; KVLog sets a damaged cache aside and "
                "rebuilds it from the log when it opens it (or delete the cache directory)"
            )
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        target = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        n = 1
        while target.exists():
            n += 1
            target = self.path.with_name(f"{self.path.name}.corrupt-{stamp}-{n}")
        try:
            os.rename(self.path, target)
            make_dirs(self.path, self.file_mode)
            fsync_dir(self.path.parent)
        except OSError as exc:
            raise CacheError(
                f"the cache at {self.path} is damaged ({reason}) and cannot be moved aside ({exc}); "
                "move or delete it: kvlog rebuilds it from the log"
            ) from exc
        self.moved_to = target
        self.discarded = f"the cache was damaged ({reason}); it was moved aside to {target}"
        return list(_LMDB_FILES)

    def _discard_if_torn(self, boot: str | None) -> None:
        marker = self.path / _UNSYNCED
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
            (self.path / name).unlink(missing_ok=True)

    def _mark_unsynced(self, boot: str | None) -> None:
        marker = self.path / _UNSYNCED
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
            (self.path / _CLOSED).unlink(missing_ok=True)
            write_file_atomically(self.path / _DAMAGED, reason.encode(), sync=True, file_mode=self.file_mode)
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

    def _abandon_after_fork(self) -> None:
        """In a forked child: refuse every use; close() leaves the parent's environment alone."""
        self._forked = True
        self._closed = True
        self._readers_blocked = True
        # Locks another thread of the parent held at the fork stay held forever in the child.
        self._readers_gate = threading.Condition(threading.Lock())
        self._resize_lock = threading.Lock()
        self._active_readers = []

    def _begin_read(self, **kwargs: Any) -> lmdb.Transaction[Any]:
        """Begin a read transaction; if the reader table is full, clear dead readers' slots and retry once."""
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
        # _register_reader and _unregister_reader inlined: this is the point-read hot path.
        active = self._active_readers
        active.append(None)
        if self._readers_blocked:
            active.pop()
            self._wait_and_register_reader()
        try:
            # begin/get/abort without the context manager and with a positional
            # db: half the cost of the idiomatic form; a read transaction that
            # raised is aborted when it is collected.
            txn = self._env.begin(self._data)
            value: bytes | None = txn.get(key)
            txn.abort()
            return value
        except lmdb.ReadersFullError:
            return self._get_after_reader_check(key)
        except lmdb.Error as exc:
            raise self._damaged(exc) from exc
        finally:
            active.pop()
            if self._readers_blocked:
                with self._readers_gate:
                    self._readers_gate.notify_all()

    def _get_after_reader_check(self, key: bytes) -> bytes | None:
        try:
            with self._begin_read(db=self._data) as txn:
                value: bytes | None = txn.get(key)
                return value
        except lmdb.Error as exc:
            raise self._damaged(exc) from exc

    def __len__(self) -> int:
        self._register_reader()
        try:
            with self._begin_read() as txn:
                return int(txn.stat(self._data)["entries"])
        except lmdb.Error as exc:
            raise self._damaged(exc) from exc
        finally:
            self._unregister_reader()

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
            self._register_reader()
            try:
                with self._begin_read(db=self._data, buffers=False) as txn:
                    cursor = txn.cursor()
                    positioned = cursor.set_range(lower) if lower is not None else cursor.first()
                    if positioned and not inclusive and cursor.key() == lower:
                        positioned = cursor.next()
                    while positioned and len(chunk) < _SCAN_CHUNK:
                        chunk.append((cursor.key(), cursor.value()))
                        positioned = cursor.next()
            except lmdb.Error as exc:
                raise self._damaged(exc) from exc
            finally:
                self._unregister_reader()
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

    # -- meta ---------------------------------------------------------------

    def _meta_get(self, name: bytes, valid: Callable[[Any], bool]) -> Any:
        self._register_reader()
        try:
            with self._begin_read(db=self._meta) as txn:
                raw = txn.get(name)
        except lmdb.Error as exc:
            raise self._damaged(exc) from exc
        finally:
            self._unregister_reader()
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

    # -- writing (the replayer only) ----------------------------------------

    def mark_current(self, when: float) -> None:
        """Record that at ``when`` the checkpoint was at the end of the log.

        A reopened cache that is behind asks the log whether compaction dropped
        tombstones past its checkpoint since then (or, where the log cannot
        tell, compares the time away with the tombstone retention).
        """
        if self._closed:
            raise self._closed_error()
        try:
            with self._env.begin(write=True, db=self._meta) as txn:
                txn.put(_META_CURRENT_AT, _pack(when))
        except lmdb.Error as exc:
            raise self._damaged(exc, "write to") from exc

    def apply(
        self,
        records: Iterable[Any],
        checkpoint: Mapping[int, int],
        *,
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
            check: run on every value; an exception means the value is bad.
            on_bad: called as ``on_bad(record, reason)`` for each skipped
                record, after the transaction committed.
            strict: raise on the first bad record instead of skipping it.

        Returns:
            ``(applied, skipped)`` record counts.

        Raises:
            BadRecordError: ``strict`` and a record is bad; nothing of this
                batch was written.
            CacheError: LMDB failed (e.g. the disk is full); nothing of this
                batch was written.
            ClosedError: the cache is closed.
        """
        if self._closed:
            raise ClosedError(f"the cache at {self.path} is closed")
        records = records if isinstance(records, list) else list(records)
        packed_checkpoint = _pack(dict(checkpoint))
        # The writer does not pass the reader gate: only the writer ever
        # resizes, and only between its own transactions, so readers are the
        # only transactions a resize must wait for. (Passing the gate here
        # would let busy readers starve replay of the gate's lock.)
        pages_before = self._env.info()["last_pgno"]
        while True:
            bad: list[tuple[Any, str]] = []  # of the attempt that commits: a retry starts again
            try:
                applied = self._apply_once(records, packed_checkpoint, check, bad, strict)
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

    def _apply_once(
        self,
        records: list[Any],
        packed_checkpoint: bytes,
        check: Callable[[bytes], object] | None,
        bad: list[tuple[Any, str]],
        strict: bool,
    ) -> int:
        # The one pass over the batch: the key check and the value check sit
        # in it, rather than in a pass of their own, because replay speed is
        # this loop's speed (a try block costs nothing until it catches).
        with self._env.begin(write=True) as txn:
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
            txn.put(_META_CHECKPOINT, packed_checkpoint, db=self._meta)
        return len(records) - len(bad)

    def reset(self, identity: Mapping[str, Any], checkpoint: Mapping[int, int] | None = None) -> None:
        """Drop every entry and bind the cache to ``identity``, in one transaction.

        A crash during a reset leaves either the old cache or an empty cache
        bound to the new identity; both are consistent. A cache LMDB reported
        damaged (:attr:`damaged`) is first set aside and replaced by an empty
        environment: dropping the entries of a damaged tree walks its bad pages.

        Raises:
            CacheError: LMDB failed, or a damaged cache cannot be set aside.
        """
        if self._closed:
            raise self._closed_error()
        while True:
            if self._damage is not None:
                self._replace_damaged()
            try:
                with self._env.begin(write=True) as txn:
                    txn.drop(self._data, delete=False)
                    txn.put(_META_FORMAT, _pack(_FORMAT), db=self._meta)
                    txn.put(_META_IDENTITY, _pack(dict(identity)), db=self._meta)
                    txn.put(_META_CHECKPOINT, _pack(dict(checkpoint or {})), db=self._meta)
                    # A replay from the log start that begins now misses no delete
                    # unless the log drops tombstones before the replay reaches
                    # them: the same bound as a cache that was current now.
                    txn.put(_META_CURRENT_AT, _pack(time.time()), db=self._meta)
                return
            except lmdb.Error as exc:
                fresh = self.moved_to is not None and self._damage is None
                error = self._damaged(exc, "reset")
                if self._damage is None or fresh:
                    raise error from exc
                # The drop found the damage: set the cache aside and reset the new one (once).

    def _replace_damaged(self) -> None:
        """Close the environment, set its damaged files aside and open an empty one in their place."""
        assert self._damage is not None
        with self._readers_shut_out():
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
        with self._readers_shut_out():
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
        """Bytes the cache files take on disk."""
        total = 0
        for name in ("data.mdb", "lock.mdb"):
            try:
                total += (self.path / name).stat().st_blocks * 512
            except OSError:
                pass
        return total

    def close(self) -> None:
        """Close the environment once no reader is inside. Idempotent."""
        with self._readers_gate:
            if self._closed:
                return
            self._closed = True
            self._readers_blocked = True
            while self._active_readers:
                self._readers_gate.wait()
        _fork.unregister(self)
        try:
            marker = self.path / _UNSYNCED
            if marker.exists():
                # Everything is on disk now: the cache survives a reboot.
                self._env.sync(True)
                marker.unlink()
                fsync_dir(self.path)
        finally:
            self._env.close()
        if self._damage is None:
            self._note_clean_close()

    def _note_clean_close(self) -> None:
        """Record what data.mdb looks like now, so that the next open can skip the structure check."""
        try:
            data = json.dumps(file_signature(self.path / "data.mdb")).encode()
            write_file_atomically(self.path / _CLOSED, data, sync=False, file_mode=self.file_mode)
        except OSError as exc:  # a full disk: the next open checks the structure instead
            log.debug("cannot record the clean close of the cache at %s: %s", self.path, exc)

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def __repr__(self) -> str:
        state = " (unusable after fork)" if self._forked else " closed" if self._closed else ""
        return f"<Cache {str(self.path)!r}{state}>"
