"""Workload 6, "embedded log": writes and cold replay of ``KVLog(path)`` on local files.

No broker: kvlog's embedded compacted log (``path/log``) feeding the LMDB cache
(``path/cache``), under each durability policy (``fsync="always"``,
``"interval"``, ``"never"``). Every kvlog figure is compared with the floor
of the same work done by hand on the same disk, with the same means kvlog
uses (a floor that did more than kvlog does would flatter kvlog):

* batched writes: ``kv.update`` of 1,000 keys at a time vs writing the same
  msgpack-encoded keys and values to a plain file, one write per batch, with
  ``fdatasync`` per batch (the floor for ``fsync="always"``; like kvlog it
  writes inside space it preallocated, 1 MiB at a time, so that the sync has
  no new file size to journal) or appended without (the floor for
  ``"interval"`` and ``"never"``);
* single writes: the p50 and p99 latency of ``kv[k] = v`` vs one write
  (+ ``fdatasync``, into preallocated space) per record;
* cold replay: reopening a store whose cache was deleted (it replays the whole
  log into a new cache) vs reading every segment file of the log sequentially,
  and vs that read plus putting the same records, already decoded, into a
  fresh LMDB opened as kvlog opens its cache (``sync=False``: kvlog never
  syncs the cache it can rebuild from the log).

The batched writes and the cold replay are measured in rounds: every subject
takes one sample a round, in :func:`~benchmarks.harness.turns`, the first round
a warm-up, so that a busy moment of the machine lands on every subject of a
round and the ratios (per round, see ``Row.rounds``) compare like with like.
The cold replay of a round replays the log its ``fsync="always"`` sample
wrote. Each sample runs in a fresh data directory, deleted afterwards. Values
are generated outside the timed sections; encoding them is inside (kvlog
encodes too).
"""

from __future__ import annotations

import gc
import os
import shutil
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import msgpack

from benchmarks.data import encoded_values
from benchmarks.harness import Context, Row, percentile, repeat, settle, turns, value_of_size
from benchmarks.processes import Goal
from kvlog import KVLog
from kvlog.log.local.segments import PREALLOCATE_BYTES

__all__ = ["GOALS", "run"]

WORKLOAD = "embedded log"
POLICIES = ("always", "interval", "never")
BATCH = 1_000
VALUE_SIZE = 100
SINGLE_WRITES_MAX = 2_000
READ_CHUNK = 1 << 20
#: Records per LMDB transaction of the replay floor (kvlog's replay commits 50,000 at a time too).
LOAD_TRANSACTION = 50_000

CASE_BATCHED = f"batched writes (update, {BATCH:,} per batch)"
CASE_P50 = "single write latency p50"
CASE_P99 = "single write latency p99"
CASE_REPLAY = "cold replay (cache deleted)"

RAW_SYNC_BATCH = "raw append+fdatasync per batch"
RAW_SYNC_RECORD = "raw append+fdatasync per write"
RAW_NOSYNC = "raw append (no sync)"
RAW_READ = "raw read of the log files"
RAW_LOAD = "raw read + py-lmdb load"
#: The floors as they were before they did what kvlog does (no baseline; for comparison with older runs).
RAW_LOAD_SYNCED = "raw read + py-lmdb load, synced commits"
RAW_SYNC_BATCH_GROWING = "raw append+fdatasync per batch, growing the file"
KVLOG = "kvlog"


def _subject(policy: str) -> str:
    return f"fsync={policy}"


#: The goals ``--check`` judges whenever this workload ran (see benchmarks/__main__.py).
GOALS = (
    Goal(
        "cold replay vs raw read + py-lmdb load",
        WORKLOAD,
        (CASE_REPLAY,),
        KVLOG,
        0.5,
        explain="at least 0.5x the records/s of reading the log files and loading LMDB by hand",
    ),
    Goal(
        "batched writes fsync=always vs raw append+fdatasync per batch",
        WORKLOAD,
        (CASE_BATCHED,),
        _subject("always"),
        0.6,
        explain="update() of 1,000 records at least 0.6x the records/s of writing them by hand, "
        "one fdatasync per batch",
    ),
)


def _batches(ctx: Context) -> list[range]:
    return [range(start, min(ctx.keys, start + BATCH)) for start in range(0, ctx.keys, BATCH)]


def _progress(case: str, subject: str, samples: list[float], unit: str) -> None:
    median = sorted(samples)[len(samples) // 2]
    shown = f"{median:,.0f}" if median >= 100 else f"{median:,.3g}"
    print(f"  {WORKLOAD} | {case} | {subject}: {shown} {unit} (median of {len(samples)})", flush=True)


# -- the raw floors ----------------------------------------------------------------------


class _Appender:
    """Writes to the end of a file as kvlog's log does: synced, into space preallocated 1 MiB at a time.

    An ``fdatasync`` after a write that grows the file must also journal the
    file's new size; kvlog with ``fsync="always"`` therefore writes inside
    space it preallocated (``posix_fallocate``), and so does this floor
    (``preallocate=False``: the floor as it was before, for comparison).
    Without ``sync`` the file just grows, as kvlog's does.
    """

    def __init__(self, path: Path, sync: bool, preallocate: bool = True) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
        self.sync = sync
        self.preallocate = preallocate
        self.position = 0
        self.allocated = 0

    def write(self, data: bytes) -> None:
        if self.sync and self.preallocate and self.position + len(data) > self.allocated:
            length = max(len(data), PREALLOCATE_BYTES)
            os.posix_fallocate(self.fd, self.position, length)
            self.allocated = self.position + length
        os.pwrite(self.fd, data, self.position)
        self.position += len(data)
        if self.sync:
            os.fdatasync(self.fd)

    def close(self) -> None:
        os.close(self.fd)


def _raw_batched(ctx: Context, sync: bool, preallocate: bool = True) -> float:
    """Records/s writing msgpack key + value per record, one write (+ fdatasync) per batch."""
    directory = ctx.subdir("embedded-raw-batched")
    packb = msgpack.packb
    try:
        out = _Appender(directory / "append.log", sync, preallocate)
        try:
            elapsed = 0.0
            for batch in _batches(ctx):
                items = [(ctx.key(i), value_of_size(i, VALUE_SIZE)) for i in batch]
                started = time.perf_counter()
                out.write(b"".join(packb(k) + packb(v) for k, v in items))
                elapsed += time.perf_counter() - started
        finally:
            out.close()
        return ctx.keys / elapsed
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _raw_single(ctx: Context, sync: bool, count: int) -> list[float]:
    """Per-record latencies (µs) of one write (+ fdatasync) per record."""
    settle()
    directory = ctx.subdir("embedded-raw-single")
    packb = msgpack.packb
    items = [(ctx.key(i), value_of_size(i, VALUE_SIZE)) for i in range(count)]
    latencies = []
    try:
        out = _Appender(directory / "append.log", sync)
        try:
            clock = time.perf_counter_ns
            for k, v in items:
                started = clock()
                out.write(packb(k) + packb(v))
                latencies.append((clock() - started) / 1000)
        finally:
            out.close()
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return latencies


def _read_log_files(log_dir: Path) -> int:
    """Read every segment file under ``log_dir`` sequentially; return the bytes read."""
    total = 0
    for path in sorted(log_dir.rglob("*.log")):
        with open(path, "rb", buffering=0) as f:
            while chunk := f.read(READ_CHUNK):
                total += len(chunk)
    return total


def _lmdb_load_seconds(ctx: Context, sync: bool = False) -> float:
    """Seconds to put every key/value (already decoded from the log) into a fresh LMDB.

    Added to the time of reading the log files, this is the floor of a replay:
    the bytes come in and LMDB holds them, with no frame parsing, no checks and
    no checkpoints. The environment is opened as kvlog opens its cache
    (``metasync=False``, ``readahead=False`` and ``sync=False``: kvlog never
    syncs the cache, which the log can rebuild, so neither does its floor;
    ``sync=True`` gives the floor as it was before, for comparison), with
    transactions of :data:`LOAD_TRANSACTION` records.
    """
    import lmdb

    keys = (ctx.key(i).encode() for i in range(ctx.keys))
    pairs = list(zip(keys, encoded_values(ctx, VALUE_SIZE), strict=True))
    path = ctx.subdir("embedded-lmdb-floor")
    gc.collect()
    # Creating the environment is timed: a cold replay creates its cache too.
    started = time.perf_counter()
    try:
        env = lmdb.open(str(path), map_size=1 << 34, max_dbs=4, metasync=False, sync=sync, readahead=False)
        try:
            db = env.open_db(b"data")
            for start in range(0, len(pairs), LOAD_TRANSACTION):
                with env.begin(write=True, db=db) as txn:
                    txn.cursor().putmulti(pairs[start : start + LOAD_TRANSACTION])
            return time.perf_counter() - started
        finally:
            env.close()
    finally:
        shutil.rmtree(path, ignore_errors=True)


# -- kvlog -------------------------------------------------------------------------------


def _kvlog_batched(ctx: Context, policy: str, after: Callable[[Path], None] | None = None) -> float:
    """Records/s of ``kv.update`` in batches of ``BATCH``; ``after(data)`` runs on the closed store."""
    data = ctx.subdir(f"embedded-{policy}")
    try:
        kv = KVLog(data, fsync=policy)
        try:
            elapsed = 0.0
            for batch in _batches(ctx):
                mapping = {ctx.key(i): value_of_size(i, VALUE_SIZE) for i in batch}
                started = time.perf_counter()
                kv.update(mapping)
                elapsed += time.perf_counter() - started
        finally:
            kv.close()
        if after is not None:
            after(data)
        return ctx.keys / elapsed
    finally:
        shutil.rmtree(data, ignore_errors=True)


def _kvlog_single(ctx: Context, policy: str, count: int) -> list[float]:
    """Per-write latencies (µs) of ``kv[k] = v``."""
    settle()
    data = ctx.subdir(f"embedded-single-{policy}")
    items = [(ctx.key(i), value_of_size(i, VALUE_SIZE)) for i in range(count)]
    latencies = []
    try:
        kv = KVLog(data, fsync=policy)
        try:
            clock = time.perf_counter_ns
            for k, v in items:
                started = clock()
                kv[k] = v
                latencies.append((clock() - started) / 1000)
        finally:
            kv.close()
    finally:
        shutil.rmtree(data, ignore_errors=True)
    return latencies


class _ReplayProbe:
    """Run after a batched-write sample: time a cold reopen, then a raw read of the log files and its LMDB floor.

    The two take turns going first, round by round (``round_``, set by the
    caller); samples of round 0, the warm-up, are not kept.
    """

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.round_ = 0
        self.replay: list[float] = []
        self.raw_read: list[float] = []
        self.raw_load: list[float] = []
        self.raw_load_synced: list[float] = []
        self.problems: list[str] = []

    def __call__(self, data: Path) -> None:
        shutil.rmtree(data / "cache")
        measures = {KVLOG: partial(self._replay, data), RAW_LOAD: partial(self._floor, data)}
        for name in turns(list(measures), self.round_):
            settle()
            measures[name]()

    def _replay(self, data: Path) -> None:
        started = time.perf_counter()
        kv = KVLog(data)
        seconds = time.perf_counter() - started
        try:
            info: dict[str, Any] = dict(kv.open_replay)
            entries = len(kv)
        finally:
            kv.close()
        if info.get("mode") != "cold" or info.get("records") != self.ctx.keys or entries != self.ctx.keys:
            self.problems.append(
                f"cold replay replayed {info.get('records')} records ({info.get('mode')}), "
                f"{entries} entries, expected {self.ctx.keys}"
            )
        if self.round_:
            self.replay.append(self.ctx.keys / seconds)

    def _floor(self, data: Path) -> None:
        started = time.perf_counter()
        _read_log_files(data / "log")
        read_seconds = time.perf_counter() - started
        load_seconds = _lmdb_load_seconds(self.ctx)
        synced_seconds = _lmdb_load_seconds(self.ctx, sync=True)
        if self.round_:
            self.raw_read.append(self.ctx.keys / read_seconds)
            self.raw_load.append(self.ctx.keys / (read_seconds + load_seconds))
            self.raw_load_synced.append(self.ctx.keys / (read_seconds + synced_seconds))


# -- the workload ------------------------------------------------------------------------


def run(ctx: Context) -> list[Row]:
    rows: list[Row] = []
    count = min(ctx.keys, SINGLE_WRITES_MAX)
    rounds = list(range(1, ctx.runs + 1))

    def add(case: str, subject: str, unit: str, samples: list[float], higher: bool, **kw: Any) -> None:
        rows.append(Row(WORKLOAD, case, subject, unit, samples, higher, **kw))
        _progress(case, subject, samples, unit)

    # Batched writes in rounds; each fsync=always sample also feeds the cold replay case.
    probe = _ReplayProbe(ctx)
    writers: dict[str, Callable[[], float]] = {
        RAW_SYNC_BATCH: partial(_raw_batched, ctx, True),
        RAW_NOSYNC: partial(_raw_batched, ctx, False),
        RAW_SYNC_BATCH_GROWING: partial(_raw_batched, ctx, True, False),
    }
    for policy in POLICIES:
        writers[_subject(policy)] = partial(
            _kvlog_batched, ctx, policy, probe if policy == "always" else None
        )
    written: dict[str, list[float]] = {name: [] for name in writers}
    for round_ in range(ctx.runs + 1):  # round 0 warms up
        probe.round_ = round_
        for name in turns(list(writers), round_):
            settle()
            value = writers[name]()
            if round_:
                written[name].append(value)
    for name, samples in written.items():
        baseline, note = None, ""
        if name.startswith("fsync="):
            baseline = RAW_SYNC_BATCH if name == _subject("always") else RAW_NOSYNC
        elif name == RAW_SYNC_BATCH:
            note = "into space preallocated 1 MiB at a time, as kvlog writes with fsync=always"
        elif name == RAW_SYNC_BATCH_GROWING:
            note = (
                "the floor before it preallocated as kvlog does: each fdatasync also journals a new file size"
            )
        add(CASE_BATCHED, name, "records/s", samples, True, baseline=baseline, rounds=rounds, note=note)

    size_note = f"~{VALUE_SIZE} B values, page cache warm (the log was just written)"
    add(CASE_REPLAY, RAW_READ, "records/s", probe.raw_read, True, note=f"1 MiB reads; {size_note}")
    add(
        CASE_REPLAY,
        RAW_LOAD,
        "records/s",
        probe.raw_load,
        True,
        note="reading the log files plus putting the same records, already decoded, into a fresh LMDB "
        f"opened as kvlog opens its cache (sync=False; putmulti, {LOAD_TRANSACTION:,} a transaction): "
        "the floor of a replay",
        rounds=rounds,
    )
    add(
        CASE_REPLAY,
        RAW_LOAD_SYNCED,
        "records/s",
        probe.raw_load_synced,
        True,
        note="the floor before it opened LMDB as kvlog opens its cache: every commit synced",
        rounds=rounds,
    )
    add(
        CASE_REPLAY,
        KVLOG,
        "records/s",
        probe.replay,
        True,
        baseline=RAW_LOAD,
        note=f"KVLog(path) until it returns, fsync=always data; {size_note}",
        rounds=rounds,
    )
    for problem in probe.problems:
        ctx.notes.append(f"{WORKLOAD}: {problem}")
        print(f"  {WORKLOAD}: {problem}", flush=True)

    # Single writes: per-write latencies, reported as the p50 and p99 of each run.
    note = f"{count:,} writes per run"

    def latency_rows(subject: str, measure: Callable[[], list[float]], baseline: str | None) -> None:
        p99: list[float] = []

        def p50() -> float:
            latencies = measure()
            p99.append(percentile(latencies, 0.99))
            return percentile(latencies, 0.50)

        samples = repeat(ctx.runs, p50)
        add(CASE_P50, subject, "µs", samples, False, baseline=baseline, note=note)
        add(CASE_P99, subject, "µs", p99, False, baseline=baseline, note=note)

    for sync, subject in ((True, RAW_SYNC_RECORD), (False, RAW_NOSYNC)):
        latency_rows(subject, partial(_raw_single, ctx, sync, count), None)
    for policy in POLICIES:
        baseline = RAW_SYNC_RECORD if policy == "always" else RAW_NOSYNC
        latency_rows(_subject(policy), partial(_kvlog_single, ctx, policy, count), baseline)
    return rows
