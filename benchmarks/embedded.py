"""Workload 6, "embedded log": writes and cold replay of ``KVLog(path)`` on local files.

No broker: kvlog's embedded compacted log (``path/log``) feeding the LMDB cache
(``path/cache``), under each durability policy (``fsync="always"``,
``"interval"``, ``"never"``). Every kvlog figure is compared with the floor
of the same work done by hand on the same disk:

* batched writes: ``kv.update`` of 1,000 keys at a time vs appending the same
  msgpack-encoded keys and values to a plain file, one ``os.write`` per batch,
  with ``fdatasync`` per batch (the floor for ``fsync="always"``) or without
  (the floor for ``"interval"`` and ``"never"``);
* single writes: the p50 and p99 latency of ``kv[k] = v`` vs one ``os.write``
  (+ ``fdatasync``) per record;
* cold replay: reopening a store whose cache was deleted (it replays the whole
  log into a new cache) vs reading every segment file of the log sequentially.

Each sample runs in a fresh data directory, deleted afterwards. Values are
generated outside the timed sections; encoding them is inside (kvlog encodes
too).
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
from benchmarks.harness import Context, Row, percentile, repeat, value_of_size
from kvlog import KVLog

__all__ = ["run"]

WORKLOAD = "embedded log"
POLICIES = ("always", "interval", "never")
BATCH = 1_000
VALUE_SIZE = 100
SINGLE_WRITES_MAX = 2_000
READ_CHUNK = 1 << 20

CASE_BATCHED = f"batched writes (update, {BATCH:,} per batch)"
CASE_P50 = "single write latency p50"
CASE_P99 = "single write latency p99"
CASE_REPLAY = "cold replay (cache deleted)"

RAW_SYNC_BATCH = "raw append+fdatasync per batch"
RAW_SYNC_RECORD = "raw append+fdatasync per write"
RAW_NOSYNC = "raw append (no sync)"
RAW_READ = "raw read of the log files"
RAW_LOAD = "raw read + py-lmdb load"


def _subject(policy: str) -> str:
    return f"fsync={policy}"


def _batches(ctx: Context) -> list[range]:
    return [range(start, min(ctx.keys, start + BATCH)) for start in range(0, ctx.keys, BATCH)]


def _progress(case: str, subject: str, samples: list[float], unit: str) -> None:
    median = sorted(samples)[len(samples) // 2]
    shown = f"{median:,.0f}" if median >= 100 else f"{median:,.3g}"
    print(f"  {WORKLOAD} | {case} | {subject}: {shown} {unit} (median of {len(samples)})", flush=True)


# -- the raw floors ----------------------------------------------------------------------


def _settle() -> None:
    """Flush what earlier samples left dirty, so its writeback does not land in this one."""
    os.sync()


def _open_append(path: Path) -> int:
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)


def _raw_batched(ctx: Context, sync: bool) -> float:
    """Records/s appending msgpack key + value per record, one write (+ fdatasync) per batch."""
    _settle()
    directory = ctx.subdir("embedded-raw-batched")
    packb = msgpack.packb
    try:
        fd = _open_append(directory / "append.log")
        try:
            elapsed = 0.0
            for batch in _batches(ctx):
                items = [(ctx.key(i), value_of_size(i, VALUE_SIZE)) for i in batch]
                started = time.perf_counter()
                data = b"".join(packb(k) + packb(v) for k, v in items)
                os.write(fd, data)
                if sync:
                    os.fdatasync(fd)
                elapsed += time.perf_counter() - started
        finally:
            os.close(fd)
        return ctx.keys / elapsed
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _raw_single(ctx: Context, sync: bool, count: int) -> list[float]:
    """Per-record latencies (µs) of one write (+ fdatasync) per record."""
    _settle()
    directory = ctx.subdir("embedded-raw-single")
    packb = msgpack.packb
    items = [(ctx.key(i), value_of_size(i, VALUE_SIZE)) for i in range(count)]
    latencies = []
    try:
        fd = _open_append(directory / "append.log")
        try:
            clock = time.perf_counter_ns
            for k, v in items:
                started = clock()
                os.write(fd, packb(k) + packb(v))
                if sync:
                    os.fdatasync(fd)
                latencies.append((clock() - started) / 1000)
        finally:
            os.close(fd)
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


def _lmdb_load_seconds(ctx: Context) -> float:
    """Seconds to put every key/value (already decoded from the log) into a fresh LMDB.

    Added to the time of reading the log files, this is the floor of a replay:
    the bytes come in and LMDB holds them, with no frame parsing, no checks and
    no checkpoints. Same LMDB flags as kvlog's cache, transactions of 50,000.
    """
    import lmdb

    keys = (ctx.key(i).encode() for i in range(ctx.keys))
    pairs = list(zip(keys, encoded_values(ctx, VALUE_SIZE), strict=True))
    path = ctx.subdir("embedded-lmdb-floor")
    try:
        env = lmdb.open(str(path), map_size=1 << 34, max_dbs=4, metasync=False, readahead=False)
        try:
            db = env.open_db(b"data")
            gc.collect()
            started = time.perf_counter()
            for start in range(0, len(pairs), 50_000):
                with env.begin(write=True, db=db) as txn:
                    txn.cursor().putmulti(pairs[start : start + 50_000])
            return time.perf_counter() - started
        finally:
            env.close()
    finally:
        shutil.rmtree(path, ignore_errors=True)


# -- kvlog -------------------------------------------------------------------------------


def _kvlog_batched(ctx: Context, policy: str, after: Callable[[Path], None] | None = None) -> float:
    """Records/s of ``kv.update`` in batches of ``BATCH``; ``after(data)`` runs on the closed store."""
    _settle()
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
    _settle()
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
    """Run after a batched-write sample: time a cold reopen, then a raw read of the log files."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.replay: list[float] = []
        self.raw_read: list[float] = []
        self.raw_load: list[float] = []
        self.problems: list[str] = []

    def __call__(self, data: Path) -> None:
        shutil.rmtree(data / "cache")
        _settle()
        gc.collect()
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
        self.replay.append(self.ctx.keys / seconds)
        gc.collect()
        started = time.perf_counter()
        _read_log_files(data / "log")
        read_seconds = time.perf_counter() - started
        self.raw_read.append(self.ctx.keys / read_seconds)
        self.raw_load.append(self.ctx.keys / (read_seconds + _lmdb_load_seconds(self.ctx)))


# -- the workload ------------------------------------------------------------------------


def run(ctx: Context) -> list[Row]:
    rows: list[Row] = []
    count = min(ctx.keys, SINGLE_WRITES_MAX)

    def add(case: str, subject: str, unit: str, samples: list[float], higher: bool, **kw: Any) -> None:
        rows.append(Row(WORKLOAD, case, subject, unit, samples, higher, **kw))
        _progress(case, subject, samples, unit)

    # Batched writes; the fsync=always samples also feed the cold replay case.
    for sync, subject in ((True, RAW_SYNC_BATCH), (False, RAW_NOSYNC)):
        add(CASE_BATCHED, subject, "records/s", repeat(ctx.runs, partial(_raw_batched, ctx, sync)), True)
    probe = _ReplayProbe(ctx)
    for policy in POLICIES:
        after = probe if policy == "always" else None
        samples = repeat(ctx.runs, partial(_kvlog_batched, ctx, policy, after))
        baseline = RAW_SYNC_BATCH if policy == "always" else RAW_NOSYNC
        add(CASE_BATCHED, _subject(policy), "records/s", samples, True, baseline=baseline)

    size_note = f"~{VALUE_SIZE} B values, page cache warm (the log was just written)"
    add(CASE_REPLAY, RAW_READ, "records/s", probe.raw_read, True, note=f"1 MiB reads; {size_note}")
    add(
        CASE_REPLAY,
        RAW_LOAD,
        "records/s",
        probe.raw_load,
        True,
        note="reading the log files plus putting the same records, already decoded, into a fresh LMDB "
        "(putmulti, 50,000 a transaction): the floor of a replay",
    )
    add(
        CASE_REPLAY,
        "kvlog",
        "records/s",
        probe.replay,
        True,
        baseline=RAW_LOAD,
        note=f"KVLog(path) until it returns, fsync=always data; {size_note}",
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
