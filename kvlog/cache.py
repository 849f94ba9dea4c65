"""The LMDB cache: the log folded up to a checkpoint.

On disk, an LMDB environment (``data.mdb``, ``lock.mdb``) with two tables:

``data``
    key bytes -> value bytes, exactly as they are in the log (never decoded
    here). A tombstone deletes the key.
``meta``
    ``format`` (an int), ``identity`` (msgpack map: what log this cache
    mirrors, and with which codec) and ``checkpoint`` (msgpack map:
    partition -> position, the next offset to replay).

Crash safety rests on one rule: a batch of records and the checkpoint that
follows it are written in ONE write transaction (:meth:`Cache.apply`). LMDB
commits a transaction atomically, so a crash at any point leaves the cache
equal to the log folded up to the stored checkpoint: some prefix of the log,
never a torn mixture. :meth:`Cache.reset` likewise clears the data and writes
the new identity and an empty checkpoint in one transaction.

Only the replayer writes (from one thread at a time); any number of threads
read. LMDB can only grow its memory map while no transaction of this process
is open, so readers announce themselves (without a lock: see ``Cache.__init__``)
and the writer, between its own transactions, closes the way in and waits for
the readers inside before it resizes.

``Cache(path, sync=False)`` skips the fsync of every commit (LMDB's
``MDB_NOSYNC``): the store uses it when the log itself is not synced on every
write (the embedded log with ``fsync="interval"`` or ``"never"``). A killed
process loses nothing that way (the OS page cache has every commit), but an
OS crash or power loss can leave LMDB pages torn, and LMDB has no checksums to
notice. So an unsynced cache carries an ``UNSYNCED`` file naming the boot it
was written in (Linux's ``/proc/sys/kernel/random/boot_id``); a clean close
syncs and removes it. A cache found with the file of another boot is deleted
before LMDB opens it, and the store rebuilds it from the log
(:attr:`Cache.discarded` says why). Where the boot cannot be identified, the
cache is always synced.

A damaged cache is never trusted, and LMDB is never run over a file that may
be garbage inside the user's process: LMDB keeps no checksums and trusts its
page pointers, so a bad one can crash the process (SIGSEGV, SIGBUS, or an
assertion's SIGABRT) instead of raising. Opening checks, in this order:

1. always, with plain reads: both meta pages (magic, version, page size, root
   pages within the file, the file at least as long as the pages the newest
   meta page claims). This catches zeroed meta pages and truncation, and
   costs two small reads;
2. unless the cache was closed cleanly and ``data.mdb`` is exactly as that
   close left it (size, mtime, ctime and inode, written to ``CLOSED`` at the
   close): a probe in a child process opens the environment read-only and
   walks every table, reading every key and value and checking key order. A
   probe that dies of a signal, gets an LMDB error or finds keys out of order
   means the cache is damaged. A clean warm restart skips the probe; after a
   crash (or any change to the file kvlog did not make) it costs one pass
   over the file (about 0.07s for 100k keys).

A damaged cache raises :class:`~kvlog.CacheError`, or, with
``move_damaged=True`` (what :class:`~kvlog.KVLog` passes), is moved aside to
``cache.corrupt-<UTC time>/`` next to it, kept for inspection, and a new empty
cache takes its place (:attr:`Cache.discarded` names both), which the store
rebuilds from the log. LMDB errors at run time that mean damage
(``MDB_CORRUPTED``, ``MDB_PAGE_NOTFOUND``, ...) raise ``CacheError`` and leave
a ``DAMAGED`` file, so that the next open (or :meth:`Cache.reset`, which
``rewarm()`` calls) sets the cache aside. A flipped bit inside a stored value
cannot be detected without checksums: the value is still well-formed LMDB.
``kvlog.verify`` finds it, by comparing the cache with a replay of the log.

Reader slots: a process killed while it read leaves its slot in ``lock.mdb``
taken. Opening clears the slots of dead processes (``reader_check``), and a
read that finds the table full clears them and tries once more.

Every file and directory the cache creates gets ``file_mode`` (0600, so 0700
for directories) whatever the umask. A cache is unusable in a child forked
after it was opened (see :mod:`kvlog._fork`).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import lmdb
import msgpack

from . import _fork
from ._files import DEFAULT_FILE_MODE, check_file_mode, fsync_dir, make_dirs, write_file_atomically
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

_UNSYNCED = "UNSYNCED"
#: Written at a clean close: what data.mdb looked like then (see _signature).
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


# -- checking a cache before LMDB opens it ---------------------------------------

_MDB_MAGIC = 0xBEEFC0DE
_P_META = 0x08
_P_INVALID = (1 << 64) - 1
#: LMDB's two on-disk formats, by page header size: 0.9 (data version 1) and 1.0 (data version 3).
_DATA_VERSION_BY_HEADER = {16: 1, 24: 3}
#: The meta record after the page header: magic, version, address, map size,
#: the free and main table records (48 bytes each), last page, txnid.
_META = struct.Struct("=IIQQ48s48sQQ")
#: A table record: page size (in the free table's record), flags, depth,
#: branch, leaf and overflow pages, entries, root page.
_DB = struct.Struct("=IHHQQQQQ")
_MAX_DEPTH = 32  # LMDB's cursor stack: a deeper tree cannot be read


def _meta_page(data: bytes, header: int) -> tuple[str | None, dict[str, int]]:
    """Parse one meta page; return ``(problem or None, fields)``."""
    if len(data) < header + _META.size:
        return "it is cut short", {}
    (flags,) = struct.unpack_from("=H", data, header - 6)
    magic, version, _address, _mapsize, free, main, last_pg, txnid = _META.unpack_from(data, header)
    if not flags & _P_META or magic != _MDB_MAGIC:
        return "it is not an LMDB meta page (zeroed or overwritten)", {}
    if version != _DATA_VERSION_BY_HEADER[header]:
        return f"data version {version}", {}
    psize = _DB.unpack(free)[0]
    fields = {"psize": psize, "last_pg": last_pg, "txnid": txnid}
    if psize < 512 or psize > 65536 or psize & (psize - 1):
        return f"page size {psize}", fields
    if last_pg < 1:
        return f"last page {last_pg}", fields
    for name, record in (("free", free), ("main", main)):
        depth, root = _DB.unpack(record)[2], _DB.unpack(record)[7]
        if depth > _MAX_DEPTH or (root != _P_INVALID and not 2 <= root <= last_pg):
            return f"its {name} table has root page {root} and depth {depth} (last page {last_pg})", fields
    return None, fields


def _check_meta_pages(data_file: Path, size: int) -> str | None:
    """Why the meta pages of ``data_file`` are not sound, or ``None``. Plain reads only.

    LMDB reads both meta pages at open and uses the one with the higher
    transaction id; a zeroed one makes it refuse the file, a root page beyond
    the file or a file shorter than its pages makes it read unmapped memory.
    """
    with open(data_file, "rb") as f:
        first = f.read(4096)
        header = next(
            (h for h in _DATA_VERSION_BY_HEADER if first[h : h + 4] == _MDB_MAGIC.to_bytes(4, sys.byteorder)),
            16,
        )
        problem0, meta0 = _meta_page(first, header)
        # Meta page 1 starts one page in: at the page size meta 0 names, else the usual one.
        psize = meta0.get("psize") or 4096
        f.seek(psize)
        problem1, meta1 = _meta_page(f.read(header + _META.size), header)
    if problem0 or problem1:
        damaged = [f"meta page {i} ({problem})" for i, problem in ((0, problem0), (1, problem1)) if problem]
        return "data.mdb has a damaged " + " and a damaged ".join(damaged)
    if meta0["psize"] != meta1["psize"]:
        return f"the meta pages of data.mdb disagree on the page size ({meta0['psize']}, {meta1['psize']})"
    newest = max(meta0, meta1, key=lambda m: m["txnid"])
    needed = (newest["last_pg"] + 1) * newest["psize"]
    if size < needed:
        return f"data.mdb is truncated: it has {size} bytes but its pages need {needed}"
    return None


def _signature(path: Path) -> dict[str, int]:
    """What changes whenever anyone writes or replaces the file (ctime cannot be set back)."""
    st = path.stat()
    return {
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "ctime_ns": st.st_ctime_ns,
        "inode": st.st_ino,
        "device": st.st_dev,
    }


# Run by ``python -c`` in a child process, so that a crash of LMDB over a damaged
# file kills the child, not the user's process. Imports only lmdb (fast to start).
# Prints "ok" and exits 0 if every table can be walked in key order.
_PROBE = """
import sys
import lmdb

path, mode = sys.argv[1], int(sys.argv[2], 8)
env = lmdb.open(path, readonly=True, max_dbs=16, max_readers=512, mode=mode, readahead=False)
with env.begin(buffers=False) as txn:
    names = [bytes(name) for name, _ in txn.cursor()]
    for name in [None, *names]:
        db = None if name is None else env.open_db(name, txn=txn, create=False)
        count, previous = 0, None
        # Values are copied (buffers=False): a value's page pointer that leads
        # outside the file faults here, in the child.
        for key, value in txn.cursor() if db is None else txn.cursor(db):
            if previous is not None and key <= previous:
                print(f"table {name!r}: key {key[:40]!r} after {previous[:40]!r}: keys out of order")
                sys.exit(3)
            previous, count = key, count + 1
        entries = env.stat()["entries"] if db is None else txn.stat(db)["entries"]
        if count != entries:
            print(f"table {name!r} says it has {entries} entries, a walk found {count}")
            sys.exit(3)
print("ok")
"""

#: Seconds a probe may take: this much plus one per _PROBE_BYTES_PER_SECOND of data.mdb.
_PROBE_TIMEOUT = 60.0
_PROBE_BYTES_PER_SECOND = 20 * 1024 * 1024


def _probe(path: Path, size: int, file_mode: int) -> str | None:
    """Walk the environment in a child process; return why it is damaged, or ``None``."""
    timeout = _PROBE_TIMEOUT + size / _PROBE_BYTES_PER_SECOND
    try:
        done = subprocess.run(
            [sys.executable, "-c", _PROBE, str(path), oct(file_mode)],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return f"a check of its structure did not finish within {timeout:.0f}s"
    except OSError as exc:
        return f"its structure could not be checked (cannot run {sys.executable}: {exc})"
    if done.returncode == 0 and done.stdout.strip() == "ok":
        return None
    if done.returncode < 0:
        try:
            name = signal.Signals(-done.returncode).name
        except ValueError:
            name = f"signal {-done.returncode}"
        return f"reading it crashed a check process with {name}"
    said = (done.stdout.strip() or done.stderr.strip() or f"exit status {done.returncode}").splitlines()[-1]
    return f"a check of its structure failed: {said}"


class Cache:
    """An LMDB environment holding the folded log and its checkpoint.

    Args:
        path: directory of the LMDB environment; created if missing.
        map_size: initial LMDB map size in bytes; it grows on demand.
        sync: fsync every commit (see the module docstring for ``False``).
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
        #: Seconds the structure probe took at open; ``None`` when none was needed
        #: (a new cache, or one closed cleanly and unchanged since).
        self.probe_seconds: float | None = None
        self._map_size = map_size
        # Why LMDB said the files are damaged at run time (see _damaged).
        self._damage: str | None = None
        self._forked = False
        boot = _boot_id()
        #: Whether every commit is synced to disk (``False`` only where the boot can be identified).
        self.sync = sync or boot is None
        # Growing the map (mdb_env_set_mapsize) needs every read transaction of
        # this process closed. Readers announce themselves without a lock, on the
        # hot path: a reader appends to _active and then checks _blocked; a
        # resizer (or close) sets _blocked and then checks _active. Both list
        # operations and attribute accesses are atomic and ordered under the GIL,
        # so at least one side sees the other (Dekker): the reader backs off, or
        # the resizer waits for it. Leaving readers wake a waiting resizer.
        self._gate = threading.Condition(threading.Lock())
        self._active: list[None] = []
        self._blocked = False
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
            # Unsynced: see the module docstring (a torn cache is detected
            # by its UNSYNCED file and rebuilt, never read).
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
        """Why the files at ``path`` must not be opened, or ``None`` (see the module docstring)."""
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
        reason = _check_meta_pages(data_file, size)
        if reason is not None or self._unchanged_since_closed(data_file):
            return reason
        started = time.monotonic()
        reason = _probe(self.path, size, self.file_mode)
        self.probe_seconds = round(time.monotonic() - started, 3)
        return reason

    def _unchanged_since_closed(self, data_file: Path) -> bool:
        """Whether data.mdb is exactly as the last clean close left it."""
        try:
            closed = json.loads((self.path / _CLOSED).read_bytes())
            return bool(closed == _signature(data_file))
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
            # Without CLOSED the next open probes the cache even if DAMAGED cannot be written.
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
        self._blocked = True
        # Locks another thread of the parent held at the fork stay held forever in the child.
        self._gate = threading.Condition(threading.Lock())
        self._resize_lock = threading.Lock()
        self._active = []

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

    def _enter(self) -> None:
        active = self._active
        active.append(None)
        if self._blocked:
            active.pop()
            self._enter_slow()

    def _enter_slow(self) -> None:
        with self._gate:
            # A resizer may be waiting for the entry just removed.
            self._gate.notify_all()
            while True:
                if self._closed:
                    raise self._closed_error()
                if not self._blocked:
                    self._active.append(None)
                    if not self._blocked:
                        return
                    self._active.pop()
                    self._gate.notify_all()
                self._gate.wait()

    def _leave(self) -> None:
        self._active.pop()
        if self._blocked:
            with self._gate:
                self._gate.notify_all()

    def get(self, key: bytes) -> bytes | None:
        """Return the stored value bytes of ``key``, or ``None`` if absent."""
        # _enter and _leave inlined: this is the point-read hot path.
        active = self._active
        active.append(None)
        if self._blocked:
            active.pop()
            self._enter_slow()
        try:
            # begin/get/abort without the context manager and with a positional
            # db: half the cost of the idiomatic form; a read transaction that
            # raised is aborted when it is collected.
            txn = self._env.begin(self._data)
            value = txn.get(key)
            txn.abort()
            return value  # type: ignore[no-any-return]
        except lmdb.ReadersFullError:
            return self._get_after_reader_check(key)
        except lmdb.Error as exc:
            raise self._damaged(exc) from exc
        finally:
            active.pop()
            if self._blocked:
                with self._gate:
                    self._gate.notify_all()

    def _get_after_reader_check(self, key: bytes) -> bytes | None:
        try:
            with self._begin_read(db=self._data) as txn:
                return txn.get(key)  # type: ignore[no-any-return]
        except lmdb.Error as exc:
            raise self._damaged(exc) from exc

    def __len__(self) -> int:
        self._enter()
        try:
            with self._begin_read() as txn:
                return int(txn.stat(self._data)["entries"])
        except lmdb.Error as exc:
            raise self._damaged(exc) from exc
        finally:
            self._leave()

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
            self._enter()
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
                self._leave()
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
        self._enter()
        try:
            with self._begin_read(db=self._meta) as txn:
                raw = txn.get(name)
        except lmdb.Error as exc:
            raise self._damaged(exc) from exc
        finally:
            self._leave()
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
        with self._resize_lock, self._gate:
            self._blocked = True
            try:
                while self._active:
                    self._gate.wait()
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
            finally:
                self._blocked = self._closed
                self._gate.notify_all()
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
        with self._resize_lock, self._gate:
            self._blocked = True
            try:
                while self._active:
                    self._gate.wait()
                new_size = self._env.info()["map_size"] * 2
                try:
                    self._env.set_mapsize(new_size)
                except lmdb.Error as exc:
                    raise CacheError(
                        f"the cache at {self.path} is full and cannot grow to {new_size} bytes: {exc}"
                    ) from exc
            finally:
                self._blocked = self._closed
                self._gate.notify_all()

    # -- housekeeping -------------------------------------------------------

    @property
    def map_size(self) -> int:
        """The current LMDB map size in bytes."""
        return int(self._env.info()["map_size"])

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
        with self._gate:
            if self._closed:
                return
            self._closed = True
            self._blocked = True
            while self._active:
                self._gate.wait()
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
        """Record what data.mdb looks like now, so that the next open can skip the probe."""
        try:
            data = json.dumps(_signature(self.path / "data.mdb")).encode()
            write_file_atomically(self.path / _CLOSED, data, sync=False, file_mode=self.file_mode)
        except OSError as exc:  # a full disk: the next open probes the cache instead
            log.debug("cannot record the clean close of the cache at %s: %s", self.path, exc)

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def __repr__(self) -> str:
        state = " (unusable after fork)" if self._forked else " closed" if self._closed else ""
        return f"<Cache {str(self.path)!r}{state}>"
