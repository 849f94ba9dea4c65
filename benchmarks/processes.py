"""Workload 7, "processes": one embedded-log data directory opened by several processes at once.

``KVLog(path)`` on the embedded log may be opened by any number of processes
at once, like SQLite in WAL mode: writers take a cross-process lock per write,
the processes share one LMDB cache, and a writer puts its own record into that
cache before its write returns, so what one process wrote is readable in
every other one as soon as the write returned. Four parts, each its own
workload in the report:

* **single write** (one process): the p50 latency of ``kv[k] = v`` (~70 B
  msgpack values, fresh keys, a fresh data directory per sample) with
  ``fsync="never"`` and ``fsync="always"``, each against the raw floor of the
  same work done by hand: one frame (``kvlog.log.local.encode_frame``) written
  with ``os.pwrite``, then one py-lmdb transaction putting the record and a
  checkpoint into an environment opened like kvlog's cache (``metasync=False``,
  ``readahead=False``, ``sync=False``: kvlog syncs the log, never the cache it
  can rebuild). The ``never`` floor syncs nothing; the ``always`` floor
  ``fdatasync``\\ s the file, as kvlog does, and like kvlog writes inside space
  it preallocated (``posix_fallocate``, 1 MiB at a time). For
  context, SQLite in WAL mode (``synchronous=FULL`` and ``NORMAL``, one
  ``INSERT OR REPLACE`` autocommitted per write, the same msgpack bytes) and
  diskcache's ``Cache.set``; kvlog ``fsync="always"`` is compared with SQLite
  ``FULL`` (both sync every write), ``"never"`` with ``NORMAL``. Subjects take
  turns sample by sample, so drift of the machine hits them alike.
* **cross-process visibility**: process A (this one) writes a counter to a key;
  process B, told beforehand which value to expect, spins on ``kv.get(key)``
  until it sees it. The latency is B's ``time.perf_counter()`` when it saw the
  value minus A's when its write call returned (CLOCK_MONOTONIC on Linux: the
  same clock in both processes); it may be negative (visible before the call
  returned). B arms itself and A writes only after B said it is spinning; the
  processes synchronise through a pipe, never by sleeping. p50 and p99 of each
  run, against the same exchange on a raw py-lmdb environment (the floor's
  write, then B polling ``txn.get``).
* **mixed load** with 1, 2 and 4 processes: each process runs the same fixed
  number of operations, 90% point reads and 10% writes of ~70 B values, with
  zipfian keys (the same hot keys in every process) over a preloaded data set
  of ``--keys`` keys; the processes are started once and wait at a barrier, so
  they start together. The figure is every operation of every process divided
  by the time from the first start to the last finish (and the reads/s and
  writes/s in it). Subjects: kvlog ``fsync="never"`` (against SQLite WAL
  ``synchronous=NORMAL``) and ``"always"`` (against SQLite WAL ``FULL``), both
  SQLite modes (one connection per process, a 60 s busy timeout), diskcache.
  Reads decode the value (SQLite's subject unpacks the msgpack it stored).
* **read-only point reads** (one process, zipfian keys): ``kv.get`` against
  SQLite WAL's point ``SELECT``, on the same preloaded data, and against its
  floor: a py-lmdb environment holding the same keys and msgpack bytes, read
  with ``begin``/``get``/``abort`` and decoded with ``msgpack.unpackb``, which
  is the least any read that returns the value must do.

Sizes at the defaults (``--reads 200000``): 2,000 single writes per sample for
the subjects that do not sync every write and 1,000 for those that do; 1,000
visibility exchanges per run (200 synced); 1,000 operations per process and
sample in the mixed load; 50,000 read-only reads per sample. A smaller
``--reads`` shrinks them all in proportion (down to a floor), which is how the
tests run this workload in seconds. Every figure is the median of ``--runs``
samples after one warm-up (a quarter of a sample's work for the
visibility and mixed-load parts).
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import random
import shutil
import sqlite3
import statistics
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import lmdb
import msgpack

from benchmarks.harness import Context, Row, percentile, value_of_size, zipf_indices
from kvlog import KVLog
from kvlog.cache import DEFAULT_MAP_SIZE
from kvlog.log.local import encode_frame
from kvlog.log.local.segments import PREALLOCATE_BYTES

__all__ = ["GOALS", "Sizes", "run"]

# -- the names the report and the checks use ---------------------------------------------

W_SINGLE = "processes: single write"
W_VISIBLE = "processes: cross-process visibility"
W_MIXED = "processes: mixed load"
W_READS = "processes: read-only point reads"

KV_NEVER = "kvlog fsync=never"
KV_ALWAYS = "kvlog fsync=always"
KVLOG = "kvlog"
FLOOR_NEVER = "raw floor, no sync (pwrite + py-lmdb commit)"
FLOOR_ALWAYS = "raw floor, synced (pwrite in preallocated space + fdatasync + py-lmdb commit)"
SQLITE_FULL = "SQLite WAL synchronous=FULL"
SQLITE_NORMAL = "SQLite WAL synchronous=NORMAL"
SQLITE_SELECT = "SQLite WAL point SELECT"
DISKCACHE = "diskcache"
RAW_READ = "raw py-lmdb get + msgpack decode"
RAW_NEVER = "raw py-lmdb, no sync"
RAW_ALWAYS = "raw py-lmdb, synced"

CASE_NEVER = "p50, fsync=never vs its raw floor"
CASE_ALWAYS = "p50, fsync=always vs its raw floor"
CASE_OTHERS = "p50, vs SQLite WAL and diskcache"
CASE_READS = "1 process, zipfian keys"
CASE_READS_FLOOR = "1 process, zipfian keys, vs the floor"


def visibility_case(policy: str, q: str) -> str:
    return f"fsync={policy}, {q}"


def mixed_case(processes: int, part: str = "") -> str:
    """``"2 processes"`` (all operations), ``"2 processes, reads"``, ``"2 processes, writes"``."""
    case = f"{processes} process" + ("es" if processes != 1 else "")
    return f"{case}, {part}" if part else case


@dataclass(frozen=True)
class Goal:
    """A goal of ``--check``: kvlog's ratio to a baseline, or an absolute bound on a figure."""

    name: str
    workload: str
    cases: tuple[str, ...]
    subject: str
    goal: float  # a ratio ("speed relative to the baseline", at least) or, with unit, a maximum
    unit: str = ""  # set for an absolute goal: the figure must be at most ``goal`` in this unit
    explain: str = ""


#: The goals ``--check`` judges whenever this workload ran (see benchmarks/__main__.py).
GOALS = (
    Goal(
        "single write p50, fsync=never vs its raw floor",
        W_SINGLE,
        (CASE_NEVER,),
        KV_NEVER,
        0.5,
        explain="p50 at most 2.0x the floor's",
    ),
    Goal(
        "single write p50, fsync=always vs its raw floor",
        W_SINGLE,
        (CASE_ALWAYS,),
        KV_ALWAYS,
        1 / 1.2,
        explain="p50 at most 1.2x the floor's",
    ),
    Goal(
        "single write p50, fsync=always vs SQLite WAL synchronous=FULL",
        W_SINGLE,
        (CASE_OTHERS,),
        KV_ALWAYS,
        1.0,
        explain="p50 at most SQLite's",
    ),
    Goal(
        "cross-process visibility p50",
        W_VISIBLE,
        (visibility_case("never", "p50"), visibility_case("always", "p50")),
        KVLOG,
        50.0,
        unit="µs",
        explain="from the write call's return in A to B seeing the value",
    ),
    Goal(
        "read-only point reads vs SQLite WAL point SELECT",
        W_READS,
        (CASE_READS,),
        KVLOG,
        2.5,
        explain="at least 2.5x SQLite's reads/s (their floor reaches about 3.2x)",
    ),
    Goal(
        "read-only point reads vs their floor",
        W_READS,
        (CASE_READS_FLOOR,),
        KVLOG,
        0.75,
        explain="at least 0.75x the reads/s of raw py-lmdb get + msgpack decode",
    ),
)

# -- sizes -------------------------------------------------------------------------------

VALUE_SIZE = 70
DEFAULT_READS = 200_000
BUSY_TIMEOUT_MS = 60_000
#: The warm-up round of the visibility and mixed-load parts runs 1/WARMUP_SHARE of a round's work.
WARMUP_SHARE = 4
#: How long the parent waits for a worker's answer before it gives up on it.
ANSWER_TIMEOUT = 300.0


@dataclass(frozen=True)
class Sizes:
    """How much each part does per sample (see the module docstring)."""

    single_writes: int = 2_000  # per sample, subjects that do not sync every write
    single_writes_synced: int = 1_000  # per sample, subjects that sync every write (SQLite FULL's p50 drifts)
    visibility: int = 1_000  # exchanges per run, no sync
    visibility_synced: int = 200  # exchanges per run, synced
    mixed_ops: int = 1_000  # operations per process and sample
    read_only: int = 50_000  # point reads per sample
    process_counts: tuple[int, ...] = (1, 2, 4)

    @classmethod
    def for_reads(cls, reads: int) -> Sizes:
        """The default sizes, scaled down in proportion when ``--reads`` is below its default."""
        scale = min(1.0, reads / DEFAULT_READS)
        base = cls()

        def scaled(value: int, floor: int) -> int:
            return max(floor, int(value * scale))

        return cls(
            single_writes=scaled(base.single_writes, 50),
            single_writes_synced=scaled(base.single_writes_synced, 20),
            visibility=scaled(base.visibility, 50),
            visibility_synced=scaled(base.visibility_synced, 20),
            mixed_ops=scaled(base.mixed_ops, 100),
            read_only=min(reads, base.read_only),
        )


# -- the stores, as every process opens them ------------------------------------------------


def _sqlite_connect(path: str, synchronous: str) -> sqlite3.Connection:
    """A connection in autocommit mode to a WAL database with the ``kv`` table."""
    conn = sqlite3.connect(path, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000)
    conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={synchronous}")
    conn.execute("CREATE TABLE IF NOT EXISTS kv (k TEXT PRIMARY KEY, v BLOB NOT NULL) WITHOUT ROWID")
    return conn


_SELECT = "SELECT v FROM kv WHERE k = ?"
_UPSERT = "INSERT OR REPLACE INTO kv (k, v) VALUES (?, ?)"


class Store:
    """``get(key)`` (decoded value or ``None``), ``put(key, value)``, ``close()``, for one subject."""

    get: Callable[[str], Any]
    put: Callable[[str, Any], None]
    close: Callable[[], None]


def open_store(kind: str, option: str, path: str) -> Store:
    """Open ``kind`` (``kvlog``, ``sqlite``, ``diskcache``) at ``path``; ``option`` is its sync mode."""
    store = Store()
    if kind == "kvlog":
        kv = KVLog(path, fsync=option)
        store.get, store.put, store.close = kv.get, kv.__setitem__, kv.close
    elif kind == "sqlite":
        conn = _sqlite_connect(path, option)
        execute, packb, unpackb = conn.execute, msgpack.packb, msgpack.unpackb

        def get(key: str) -> Any:
            row = execute(_SELECT, (key,)).fetchone()
            return None if row is None else unpackb(row[0])

        def put(key: str, value: Any) -> None:
            execute(_UPSERT, (key, packb(value)))

        store.get, store.put, store.close = get, put, conn.close
    elif kind == "rawlmdb":
        env = lmdb.open(path, map_size=DEFAULT_MAP_SIZE, max_dbs=4, readahead=False, max_readers=2048)
        data = env.open_db(b"data")
        begin, unpackb = env.begin, msgpack.unpackb

        def get_raw(key: str) -> Any:
            txn = begin(data)
            raw = txn.get(key.encode())
            txn.abort()
            return None if raw is None else unpackb(raw, raw=False, strict_map_key=True)

        store.get, store.close = get_raw, env.close
    elif kind == "diskcache":
        import diskcache

        cache = diskcache.Cache(path)
        store.get, store.put, store.close = cache.get, cache.set, cache.close
    else:
        raise ValueError(f"unknown store kind {kind!r}")
    return store


#: Mixed-load subjects: (subject, kind, option, baseline).
MIXED_SUBJECTS = (
    (SQLITE_FULL, "sqlite", "FULL", None),
    (SQLITE_NORMAL, "sqlite", "NORMAL", None),
    (KV_ALWAYS, "kvlog", "always", SQLITE_FULL),
    (KV_NEVER, "kvlog", "never", SQLITE_NORMAL),
    (DISKCACHE, "diskcache", "", None),
)


def _diskcache_available() -> str | None:
    try:
        import diskcache  # noqa: F401
    except ImportError as exc:
        return f"diskcache is not installed ({exc})"
    return None


# -- the raw floor of a single write ------------------------------------------------------


class RawFloor:
    """kvlog's write done by hand: a frame pwritten to a file, then the record and a checkpoint into LMDB."""

    def __init__(self, directory: Path, sync: bool) -> None:
        self.sync = sync
        self.fd = os.open(directory / "00000000000000000000.log", os.O_RDWR | os.O_CREAT, 0o600)
        self.position = 0
        self.allocated = 0
        self.offset = 0
        (directory / "cache").mkdir(exist_ok=True)
        # Opened like kvlog's cache (kvlog/cache.py, Cache._open_env).
        self.env = lmdb.open(
            str(directory / "cache"),
            map_size=DEFAULT_MAP_SIZE,
            max_dbs=4,
            metasync=False,
            # Like kvlog's cache on the embedded log: the log is what is synced.
            sync=False,
            readahead=False,
            max_readers=2048,
        )
        self.data = self.env.open_db(b"data")
        self.meta = self.env.open_db(b"meta")

    def put(self, key: str, value: Any) -> None:
        packed = msgpack.packb(value)
        key_bytes = key.encode()
        frame = encode_frame(self.offset, time.time_ns() // 1_000_000, key_bytes, packed)
        if self.sync and self.position + len(frame) > self.allocated:
            # As kvlog does with fsync="always": the synced write lands inside the file's size.
            os.posix_fallocate(self.fd, self.position, PREALLOCATE_BYTES)
            self.allocated = self.position + PREALLOCATE_BYTES
        os.pwrite(self.fd, frame, self.position)
        if self.sync:
            os.fdatasync(self.fd)
        self.position += len(frame)
        self.offset += 1
        with self.env.begin(write=True) as txn:
            txn.put(key_bytes, packed, db=self.data)
            txn.put(b"checkpoint", msgpack.packb({0: self.offset}), db=self.meta)

    def close(self) -> None:
        self.env.close()
        os.close(self.fd)


def open_raw_reader(directory: Path) -> Callable[[str], bytes | None]:
    """A getter of the raw floor's LMDB environment, for a second process."""
    env = lmdb.open(
        str(directory / "cache"), map_size=DEFAULT_MAP_SIZE, max_dbs=4, readahead=False, max_readers=512
    )
    data = env.open_db(b"data")
    begin = env.begin

    def get(key: str) -> bytes | None:
        with begin(db=data) as txn:
            return txn.get(key.encode())  # type: ignore[no-any-return]

    get.close = env.close  # type: ignore[attr-defined]
    return get


# -- part 1: single writes -------------------------------------------------------------------


def _settle() -> None:
    """Flush what earlier samples left dirty, so its writeback does not land in this one."""
    os.sync()


def _timed_puts(put: Callable[[str, Any], None], items: Sequence[tuple[str, Any]]) -> list[float]:
    clock = time.perf_counter_ns
    latencies = []
    for key, value in items:
        started = clock()
        put(key, value)
        latencies.append((clock() - started) / 1000)
    return latencies


def _single_floor(directory: Path, items: Sequence[tuple[str, Any]], sync: bool) -> list[float]:
    floor = RawFloor(directory, sync)
    try:
        return _timed_puts(floor.put, items)
    finally:
        floor.close()


def _single_store(
    directory: Path, items: Sequence[tuple[str, Any]], kind: str, option: str, name: str
) -> list[float]:
    store = open_store(kind, option, str(directory / name))
    try:
        return _timed_puts(store.put, items)
    finally:
        store.close()


def _single_writes(ctx: Context, sizes: Sizes, add: Callable[..., None]) -> None:
    nosync = [(ctx.key(i), value_of_size(i, VALUE_SIZE)) for i in range(sizes.single_writes)]
    synced = nosync[: sizes.single_writes_synced]
    # (subject, measure(directory) -> per-write µs)
    subjects: list[tuple[str, Callable[[Path], list[float]]]] = [
        (FLOOR_NEVER, partial(_single_floor, items=nosync, sync=False)),
        (KV_NEVER, partial(_single_store, items=nosync, kind="kvlog", option="never", name="kv")),
        (FLOOR_ALWAYS, partial(_single_floor, items=synced, sync=True)),
        (KV_ALWAYS, partial(_single_store, items=synced, kind="kvlog", option="always", name="kv")),
        (SQLITE_FULL, partial(_single_store, items=synced, kind="sqlite", option="FULL", name="db.sqlite")),
        (
            SQLITE_NORMAL,
            partial(_single_store, items=nosync, kind="sqlite", option="NORMAL", name="db.sqlite"),
        ),
    ]
    why = _diskcache_available()
    if why is None:
        subjects.append(
            (DISKCACHE, partial(_single_store, items=nosync, kind="diskcache", option="", name="dc"))
        )
    else:
        ctx.skip(W_SINGLE, DISKCACHE, why)
    p50: dict[str, list[float]] = {subject: [] for subject, _ in subjects}
    for round_ in range(1 + ctx.runs):  # round 0 warms up
        for subject, measure in subjects:
            directory = ctx.subdir("processes-single")
            try:
                _settle()
                gc.collect()
                latencies = measure(directory)
            finally:
                shutil.rmtree(directory, ignore_errors=True)
            if round_:
                p50[subject].append(percentile(latencies, 0.5))

    counts = (
        f"{sizes.single_writes:,} writes per sample without sync, "
        f"{sizes.single_writes_synced:,} with; fresh keys, ~{VALUE_SIZE} B msgpack values"
    )
    add(W_SINGLE, CASE_NEVER, FLOOR_NEVER, "µs", p50[FLOOR_NEVER], False, note=counts)
    add(W_SINGLE, CASE_NEVER, KV_NEVER, "µs", p50[KV_NEVER], False, baseline=FLOOR_NEVER, note=counts)
    add(W_SINGLE, CASE_ALWAYS, FLOOR_ALWAYS, "µs", p50[FLOOR_ALWAYS], False, note=counts)
    add(W_SINGLE, CASE_ALWAYS, KV_ALWAYS, "µs", p50[KV_ALWAYS], False, baseline=FLOOR_ALWAYS, note=counts)
    others = (
        "SQLite: one INSERT OR REPLACE autocommitted per write; diskcache: Cache.set with its defaults "
        "(SQLite WAL, synchronous=NORMAL, pickled values); kvlog: the samples of the cases above"
    )
    add(W_SINGLE, CASE_OTHERS, SQLITE_FULL, "µs", p50[SQLITE_FULL], False, note=others)
    add(W_SINGLE, CASE_OTHERS, SQLITE_NORMAL, "µs", p50[SQLITE_NORMAL], False, note=others)
    if DISKCACHE in p50:
        add(W_SINGLE, CASE_OTHERS, DISKCACHE, "µs", p50[DISKCACHE], False, note=others)
    add(W_SINGLE, CASE_OTHERS, KV_ALWAYS, "µs", p50[KV_ALWAYS], False, baseline=SQLITE_FULL, note=others)
    add(W_SINGLE, CASE_OTHERS, KV_NEVER, "µs", p50[KV_NEVER], False, baseline=SQLITE_NORMAL, note=others)


# -- worker processes -------------------------------------------------------------------------


class WorkerError(Exception):
    """A worker process could not do what it was asked (the message has its traceback's last line)."""


def _answer(conn: Connection, work: Callable[[], Any]) -> None:
    try:
        result = work()
    except Exception as exc:  # noqa: BLE001 - sent to the parent, which reports it
        conn.send(("error", f"{type(exc).__name__}: {exc}", traceback.format_exc(limit=4)))
    else:
        conn.send(("ok", result))


def _mixed(
    store: Store,
    barrier: Any,
    keys: list[str],
    writes: list[bool],
    salt: int,
) -> tuple[float, float, int, int, int]:
    """Run the operations; return (start, end, reads, writes, reads that found nothing)."""
    ops = [
        (key, value_of_size(i + salt, VALUE_SIZE) if write else None)
        for i, (key, write) in enumerate(zip(keys, writes, strict=True))
    ]
    get, put = store.get, store.put
    misses = 0
    gc.collect()
    if barrier is not None:
        barrier.wait(timeout=ANSWER_TIMEOUT)
    started = time.perf_counter()
    for key, value in ops:
        if value is None:
            if get(key) is None:
                misses += 1
        else:
            put(key, value)
    ended = time.perf_counter()
    n_writes = sum(writes)
    return started, ended, len(ops) - n_writes, n_writes, misses


def _reads(store: Store, keys: list[str]) -> tuple[float, int]:
    """Read every key once; return (seconds, reads that found nothing)."""
    get = store.get
    misses = 0
    gc.collect()
    started = time.perf_counter()
    for key in keys:
        if get(key) is None:
            misses += 1
    return time.perf_counter() - started, misses


def _open_into(stores: dict[str, Store], handle: str, kind: str, option: str, path: str) -> None:
    stores[handle] = open_store(kind, option, path)


def worker_main(conn: Connection, barriers: dict[int, Any]) -> None:
    """A mixed-load process: opens stores, runs operations, on command, until told to exit.

    Commands (tuples): ``("open", handle, kind, option, path)``, ``("close", handle)``,
    ``("mixed", handle, parties, keys, writes, salt)``, ``("reads", handle, keys)``,
    ``("exit",)``. Each is answered with ``("ok", result)`` or ``("error", message, traceback)``.
    """
    stores: dict[str, Store] = {}
    conn.send(("ok", os.getpid()))
    try:
        while True:
            command = conn.recv()
            op, args = command[0], command[1:]
            if op == "exit":
                break
            if op == "open":
                _answer(conn, partial(_open_into, stores, *args))
            elif op == "close":
                (handle,) = args
                store = stores.pop(handle, None)
                _answer(conn, store.close if store is not None else lambda: None)
            elif op == "mixed":
                handle, parties, keys, writes, salt = args
                barrier = barriers.get(parties) if parties > 1 else None
                _answer(conn, partial(_mixed, stores[handle], barrier, keys, writes, salt))
            elif op == "reads":
                handle, keys = args
                _answer(conn, partial(_reads, stores[handle], keys))
            else:
                conn.send(("error", f"unknown command {op!r}", ""))
    finally:
        for store in stores.values():
            try:
                store.close()
            except Exception:  # noqa: BLE001 - exiting anyway; the parent saw the earlier error
                pass
        conn.close()


def watcher_main(conn: Connection) -> None:
    """Process B of the visibility part: opens a store, then spins on a key until it holds a value.

    Commands: ``("open", kind, policy, path)`` (kind ``kvlog`` or ``raw``),
    ``("watch", key, expected)`` (answered ``("armed", None)`` before spinning,
    then ``("ok", (seen_at, polls, seconds spinning))``), ``("close",)``, ``("exit",)``.
    """
    get: Callable[[str], Any] | None = None
    close: Callable[[], None] = lambda: None  # noqa: E731
    conn.send(("ok", os.getpid()))
    try:
        while True:
            command = conn.recv()
            op, args = command[0], command[1:]
            if op == "exit":
                break
            if op == "open":
                kind, policy, path = args
                try:
                    if kind == "kvlog":
                        kv = KVLog(path, fsync=policy)
                        get, close = kv.get, kv.close
                    else:
                        get = open_raw_reader(Path(path))
                        close = get.close  # type: ignore[attr-defined]
                except Exception as exc:  # noqa: BLE001 - sent to the parent, which reports it
                    conn.send(("error", f"{type(exc).__name__}: {exc}", traceback.format_exc(limit=4)))
                else:
                    conn.send(("ok", None))
            elif op == "close":
                close()
                get, close = None, lambda: None
                conn.send(("ok", None))
            elif op == "watch":
                key, expected = args
                assert get is not None
                polls = 0
                conn.send(("armed", None))
                clock = time.perf_counter
                armed = clock()
                deadline = armed + 30.0
                while get(key) != expected:
                    polls += 1
                    if not polls & 0x3FF and clock() > deadline:
                        conn.send(("error", f"{key!r} never showed {expected!r} in 30 s", ""))
                        break
                else:
                    seen = clock()
                    conn.send(("ok", (seen, polls + 1, seen - armed)))
    finally:
        close()
        conn.close()


def _receive(conn: Connection, what: str, timeout: float = ANSWER_TIMEOUT) -> Any:
    try:
        if not conn.poll(timeout):
            raise WorkerError(f"{what}: no answer in {timeout:.0f} s")
        answer = conn.recv()
    except (EOFError, OSError) as exc:
        raise WorkerError(f"{what}: the process is gone ({type(exc).__name__})") from exc
    if answer[0] == "error":
        raise WorkerError(answer[1])
    return answer[1]


@contextmanager
def _processes(target: Callable[..., None], count: int, *args: Any) -> Iterator[list[Connection]]:
    """``count`` spawned processes running ``target(conn, *args)``; their pipes."""
    context = multiprocessing.get_context("spawn")
    procs, conns = [], []
    try:
        for n in range(count):
            parent, child = context.Pipe()
            proc = context.Process(target=target, args=(child, *args), name=f"kvlog-bench-{n}", daemon=True)
            proc.start()
            child.close()
            procs.append(proc)
            conns.append(parent)
        for n, conn in enumerate(conns):
            _receive(conn, f"process {n} starting", timeout=120)
        yield conns
    finally:
        for conn in conns:
            try:
                conn.send(("exit",))
            except OSError:
                pass
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=10)
        for conn in conns:
            conn.close()


# -- part 2: cross-process visibility -----------------------------------------------------------


def _visibility(ctx: Context, sizes: Sizes, add: Callable[..., None]) -> None:
    # (subject, kind, policy, exchanges per run). No ratios here: the figures
    # straddle zero (B often sees the value before A's call returned), where a
    # ratio means nothing. The raw rows are the floor to read kvlog's against;
    # the goal is an absolute bound.
    subjects = (
        (RAW_NEVER, "raw", "never", sizes.visibility),
        (KVLOG, "kvlog", "never", sizes.visibility),
        (RAW_ALWAYS, "raw", "always", sizes.visibility_synced),
        (KVLOG, "kvlog", "always", sizes.visibility_synced),
    )
    with _processes(watcher_main, 1) as (watcher,):
        for subject, kind, policy, count in subjects:
            directory = ctx.subdir(f"processes-visibility-{kind}-{policy}")
            try:
                measured = _visibility_runs(ctx, watcher, directory, kind, policy, count)
            except WorkerError as exc:
                ctx.skip(W_VISIBLE, f"{subject} fsync={policy}", str(exc))
                continue
            finally:
                shutil.rmtree(directory, ignore_errors=True)
            p50, p99, poll = measured
            note = (
                f"fsync={policy}: {count:,} writes per run; B polls every ~{statistics.median(poll):.2g} µs; "
                "negative: B saw the value before A's write call returned"
            )
            for q, samples in (("p50", p50), ("p99", p99)):
                add(
                    W_VISIBLE,
                    visibility_case(policy, q),
                    subject,
                    "µs",
                    samples,
                    False,
                    note=note,
                )


def _visibility_runs(
    ctx: Context, watcher: Connection, directory: Path, kind: str, policy: str, count: int
) -> tuple[list[float], list[float], list[float]]:
    """Per run: p50 and p99 latency (µs) and B's mean poll interval (µs)."""
    key = "visible:counter"
    if kind == "kvlog":
        kv = KVLog(directory, fsync=policy)
        put: Callable[[str, Any], None] = kv.__setitem__
        close: Callable[[], None] = kv.close
    else:
        floor = RawFloor(directory, sync=policy == "always")
        put, close = floor.put, floor.close
    p50: list[float] = []
    p99: list[float] = []
    poll: list[float] = []
    try:
        put(key, 0)  # the key exists before B opens: B waits for changes, not for a first value
        watcher.send(("open", kind, policy, str(directory)))
        _receive(watcher, "opening the store in process B")
        try:
            counter = 0
            for round_ in range(1 + ctx.runs):
                latencies = []
                polls = 0
                spin = 0.0
                gc.collect()
                for _ in range(count if round_ else max(1, count // WARMUP_SHARE)):
                    counter += 1
                    expected: Any = counter if kind == "kvlog" else msgpack.packb(counter)
                    watcher.send(("watch", key, expected))
                    armed = watcher.recv()
                    if armed[0] != "armed":
                        raise WorkerError(str(armed[1]))
                    put(key, counter)
                    returned = time.perf_counter()
                    seen, n, spun = _receive(watcher, "watching the key in process B")
                    latencies.append((seen - returned) * 1e6)
                    polls += n
                    spin += spun
                if round_:
                    p50.append(percentile(latencies, 0.5))
                    p99.append(percentile(latencies, 0.99))
                    poll.append(spin / max(polls, 1) * 1e6)
        finally:
            watcher.send(("close",))
            _receive(watcher, "closing the store in process B")
    finally:
        close()
    return p50, p99, poll


# -- parts 3 and 4: mixed load and read-only reads ------------------------------------------------


def _preload(ctx: Context, kind: str, option: str, path: Path) -> None:
    """Write the data set (``--keys`` keys, ~70 B values) into a new store at ``path``."""
    batch = 10_000
    if kind == "kvlog":
        with KVLog(path, fsync="never") as kv:
            for start in range(0, ctx.keys, batch):
                end = min(ctx.keys, start + batch)
                kv.update({ctx.key(i): value_of_size(i, VALUE_SIZE) for i in range(start, end)})
    elif kind == "rawlmdb":
        env = lmdb.open(str(path), map_size=DEFAULT_MAP_SIZE, max_dbs=4, sync=False, metasync=False)
        try:
            data = env.open_db(b"data")
            with env.begin(write=True, db=data) as txn:
                for i in range(ctx.keys):
                    txn.put(ctx.key(i).encode(), msgpack.packb(value_of_size(i, VALUE_SIZE)))
            env.sync(True)
        finally:
            env.close()
    elif kind == "sqlite":
        conn = _sqlite_connect(str(path), option)
        try:
            conn.execute("BEGIN")
            conn.executemany(
                _UPSERT,
                ((ctx.key(i), msgpack.packb(value_of_size(i, VALUE_SIZE))) for i in range(ctx.keys)),
            )
            conn.execute("COMMIT")
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            conn.close()
    else:
        import diskcache

        with diskcache.Cache(str(path)) as cache:
            for start in range(0, ctx.keys, batch):
                with cache.transact():
                    for i in range(start, min(ctx.keys, start + batch)):
                        cache.set(ctx.key(i), value_of_size(i, VALUE_SIZE))


def _plan(ctx: Context, sizes: Sizes, rounds: int) -> list[list[tuple[list[str], list[bool]]]]:
    """Per round, per process: its keys (zipfian, the same hot keys for all) and which are writes."""
    most = max(sizes.process_counts)
    per_round = most * sizes.mixed_ops
    indices = zipf_indices(ctx.keys, rounds * per_round, seed=ctx.seed)
    rng = random.Random(ctx.seed + 1)
    plan = []
    for r in range(rounds):
        processes = []
        for p in range(most):
            start = r * per_round + p * sizes.mixed_ops
            keys = [ctx.key(i) for i in indices[start : start + sizes.mixed_ops]]
            writes = [False] * sizes.mixed_ops
            for position in rng.sample(range(sizes.mixed_ops), sizes.mixed_ops // 10):
                writes[position] = True
            processes.append((keys, writes))
        plan.append(processes)
    return plan


def _mixed_load(ctx: Context, sizes: Sizes, add: Callable[..., None]) -> None:
    subjects = list(MIXED_SUBJECTS)
    why = _diskcache_available()
    if why is not None:
        subjects = [s for s in subjects if s[1] != "diskcache"]
        ctx.skip(W_MIXED, DISKCACHE, why)
    paths: dict[str, Path] = {}
    print(f"  preloading {ctx.keys:,} keys into each store ...", flush=True)
    for subject, kind, option, _baseline in subjects:
        directory = ctx.subdir("processes-mixed")
        paths[subject] = directory / ("db.sqlite" if kind == "sqlite" else "store")
        _preload(ctx, kind, option, paths[subject])
    floor_path = ctx.subdir("processes-mixed") / "raw"
    _preload(ctx, "rawlmdb", "", floor_path)
    paths[RAW_READ] = floor_path
    rounds = 1 + ctx.runs
    plan = _plan(ctx, sizes, rounds)
    read_keys = [ctx.key(i) for i in zipf_indices(ctx.keys, sizes.read_only, seed=ctx.seed + 2)]
    most = max(sizes.process_counts)
    barriers_context = multiprocessing.get_context("spawn")
    barriers = {n: barriers_context.Barrier(n) for n in sizes.process_counts if n > 1}
    rates: dict[tuple[int, str], list[tuple[float, float, float]]] = {}
    read_rates: dict[str, list[float]] = {}
    problems: list[str] = []
    try:
        with _processes(worker_main, most, barriers) as workers:
            for n in sizes.process_counts:
                opened = _open_everywhere(ctx, workers[:n], subjects, paths, n)
                try:
                    if n == 1:
                        read_rates = _read_only(ctx, workers[0], opened, paths[RAW_READ], read_keys, problems)
                    for round_ in range(rounds):
                        for subject in opened:
                            result = _mixed_round(workers[:n], subject, plan[round_], round_)
                            if result is None:
                                continue
                            rate, misses = result
                            if misses:
                                problems.append(f"{subject}, {n} processes: {misses} reads found nothing")
                            if round_:
                                rates.setdefault((n, subject), []).append(rate)
                finally:
                    for subject in opened:
                        for worker in workers[:n]:
                            worker.send(("close", subject))
                            _receive(worker, f"closing {subject}")
    finally:
        for path in paths.values():
            shutil.rmtree(path.parent, ignore_errors=True)

    note = (
        f"{sizes.mixed_ops:,} operations per process and sample: 90% get, 10% writes of ~{VALUE_SIZE} B "
        f"values; zipfian keys over {ctx.keys:,}; rate = all operations / (last finish - first start)"
    )
    for n in sizes.process_counts:
        for subject, _kind, _option, baseline in subjects:
            samples = rates.get((n, subject))
            if not samples:
                continue
            for part, unit, index in (("", "ops/s", 0), ("reads", "reads/s", 1), ("writes", "writes/s", 2)):
                add(
                    W_MIXED,
                    mixed_case(n, part),
                    subject,
                    unit,
                    [s[index] for s in samples],
                    True,
                    # Reads and writes are fixed shares of the operations: compared once, on ops/s.
                    baseline=baseline if not part else None,
                    note=note,
                )
    read_note = f"{sizes.read_only:,} reads per sample, one process, values decoded"
    if read_rates:
        add(W_READS, CASE_READS, SQLITE_SELECT, "reads/s", read_rates[SQLITE_NORMAL], True, note=read_note)
        if KV_NEVER in read_rates:
            add(
                W_READS,
                CASE_READS,
                KVLOG,
                "reads/s",
                read_rates[KV_NEVER],
                True,
                baseline=SQLITE_SELECT,
                note=read_note,
            )
        add(
            W_READS,
            CASE_READS,
            RAW_READ,
            "reads/s",
            read_rates[RAW_READ],
            True,
            baseline=SQLITE_SELECT,
            note=read_note,
        )
        add(W_READS, CASE_READS_FLOOR, RAW_READ, "reads/s", read_rates[RAW_READ], True, note=read_note)
        if KV_NEVER in read_rates:
            add(
                W_READS,
                CASE_READS_FLOOR,
                KVLOG,
                "reads/s",
                read_rates[KV_NEVER],
                True,
                baseline=RAW_READ,
                note=read_note,
            )
    for problem in problems:
        ctx.notes.append(f"{W_MIXED}: {problem}")
        print(f"  {W_MIXED}: {problem}", flush=True)


def _open_everywhere(
    ctx: Context,
    workers: list[Connection],
    subjects: list[tuple[str, str, str, str | None]],
    paths: dict[str, Path],
    n: int,
) -> list[str]:
    """Open every subject's store in each of the ``n`` workers; return the subjects that opened everywhere."""
    opened = []
    for subject, kind, option, _baseline in subjects:
        for worker in workers:
            worker.send(("open", subject, kind, option, str(paths[subject])))
        errors = []
        for worker in workers:
            try:
                _receive(worker, f"opening {subject}")
            except WorkerError as exc:
                errors.append(str(exc))
        if errors:
            ctx.skip(W_MIXED, f"{subject}, {mixed_case(n)}", errors[0])
            for worker in workers:
                worker.send(("close", subject))
                _receive(worker, f"closing {subject}")
        else:
            opened.append(subject)
    return opened


def _mixed_round(
    workers: list[Connection],
    subject: str,
    plan: list[tuple[list[str], list[bool]]],
    round_: int,
) -> tuple[tuple[float, float, float], int] | None:
    """One sample: every worker runs its operations from the barrier; ((ops/s, reads/s, writes/s), misses)."""
    parties = len(workers)
    for p, worker in enumerate(workers):
        keys, writes = plan[p]
        if not round_:  # the warm-up round runs a share of the operations
            share = max(1, len(keys) // WARMUP_SHARE)
            keys, writes = keys[:share], writes[:share]
        worker.send(("mixed", subject, parties, keys, writes, 1_000_003 * (round_ + 1) + p))
    results = [_receive(worker, f"{subject}: mixed load") for worker in workers]
    started = min(r[0] for r in results)
    ended = max(r[1] for r in results)
    seconds = ended - started
    reads = sum(r[2] for r in results)
    writes = sum(r[3] for r in results)
    misses = sum(r[4] for r in results)
    return ((reads + writes) / seconds, reads / seconds, writes / seconds), misses


def _read_only(
    ctx: Context, worker: Connection, opened: list[str], floor: Path, keys: list[str], problems: list[str]
) -> dict[str, list[float]]:
    """Reads/s of kvlog, SQLite (its NORMAL connection: reads do not sync) and the floor, in one process."""
    worker.send(("open", RAW_READ, "rawlmdb", "", str(floor)))
    _receive(worker, f"opening {RAW_READ}")
    try:
        subjects = [s for s in (SQLITE_NORMAL, KV_NEVER) if s in opened] + [RAW_READ]
        rates: dict[str, list[float]] = {s: [] for s in subjects}
        for round_ in range(1 + ctx.runs):
            for subject in subjects:
                worker.send(("reads", subject, keys))
                seconds, misses = _receive(worker, f"{subject}: read-only reads")
                if misses:
                    problems.append(f"read-only, {subject}: {misses} reads found nothing")
                if round_:
                    rates[subject].append(len(keys) / seconds)
    finally:
        worker.send(("close", RAW_READ))
        _receive(worker, f"closing {RAW_READ}")
    return rates if SQLITE_NORMAL in rates else {}


# -- the workload -------------------------------------------------------------------------------


def _progress(workload: str, case: str, subject: str, samples: list[float], unit: str) -> None:
    median = statistics.median(samples)
    shown = f"{median:,.0f}" if abs(median) >= 100 else f"{median:,.3g}"
    print(f"  {workload} | {case} | {subject}: {shown} {unit} (median of {len(samples)})", flush=True)


def run(ctx: Context, sizes: Sizes | None = None) -> list[Row]:
    """Single writes, cross-process visibility, mixed load in 1/2/4 processes, read-only reads."""
    sizes = sizes or Sizes.for_reads(ctx.reads)
    rows: list[Row] = []

    def add(
        workload: str, case: str, subject: str, unit: str, samples: list[float], higher: bool, **kw: Any
    ) -> None:
        rows.append(Row(workload, case, subject, unit, samples, higher, **kw))
        _progress(workload, case, subject, samples, unit)

    for part in (_single_writes, _visibility, _mixed_load):
        began = time.perf_counter()
        part(ctx, sizes, add)
        print(
            f"  ({part.__name__.strip('_').replace('_', ' ')}: {time.perf_counter() - began:.0f} s)",
            flush=True,
        )
    return rows
