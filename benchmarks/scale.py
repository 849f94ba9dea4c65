"""Scale: cold replay at this run's size against the same replay at 100,000 keys, its memory, its floor.

Part of the replay workload (:func:`run`, after the comparison with the raw
consumer). Every figure a scale claim rests on is a ratio or a bound within
one run:

* **Cold replay at N keys vs 100,000 keys**, for Kafka and for the embedded
  log: ``KVLog(...)`` from an empty cache of a topic (a log) of N keys with
  ~100 B values, against the same replay of a topic (a log) of
  :data:`SCALE_BASE` keys of the same shape (the same keys and values, the
  first 100,000 of them), measured in the same rounds, in turns. A run of
  100,000 keys or fewer compares with a tenth of its keys, so the code path is
  the same at every size. ``--check`` wants at least :data:`SCALE_GOAL`x.
* **Peak anonymous memory of the replaying process**: each replay runs in a
  child process (``benchmarks/_scale_child.py``) whose ``RssAnon`` (from
  ``/proc/<pid>/status``: the process's heap and stacks, not LMDB's mapped
  file pages, which the kernel can drop) this process samples every
  :data:`SAMPLE_INTERVAL` s from a thread; a sample's figure is its peak.
  ``--check`` wants every sample's peak under :data:`MEMORY_GOAL_MB` MB.
* **The physical floor**: what one core does with the same data with no
  kvlog in between: py-lmdb ``putmulti`` of the same keys and values into a
  fresh LMDB opened as kvlog opens its cache, :data:`LOAD_TRANSACTION` records
  a transaction (as kvlog's replay commits); the topic fetched over loopback
  with kvlog's consumer settings but no decoding at all (kafka-python's
  fetcher hands over each fetched record set, whose batch headers are stepped
  over to find the next offset: :func:`fetch_seconds`); and a sequential
  read of the embedded log's segment files. The report states kvlog's replay
  as a fraction of each.

The warm restart's bound (:data:`RESTART_GOAL_S`) is judged on the restart
workload's rows. Above :data:`LARGE` keys the replay and restart workloads
measure less (the ~1 KB values case, and subjects that take minutes a
sample at that size, are skipped and say why), and the N-key subjects take no
warm-up round.

Each size is a separate run; :func:`update_readme` builds the README's scale
table and chart from the latest saved result (``benchmarks/results/*.json``)
of each size, whichever run ``--readme`` is given to.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import statistics
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from benchmarks.data import packed_value, topic_for
from benchmarks.harness import Context, Row, Skipped, settle, spread, turns, value_of_size

__all__ = [
    "LARGE",
    "SCALE_BASE",
    "RssAnonSampler",
    "base_keys",
    "checks",
    "is_large",
    "report_lines",
    "run",
    "update_readme",
]

TIMES = "\u00d7"
NONE = "\u2013"  # an empty cell
WORKLOAD = "replay at scale"
FLOOR = "physical floor"
SCALE_BASE = 100_000
#: Above this many keys the replay and restart workloads skip what takes minutes a sample.
LARGE = 1_000_000
VALUE_SIZE = 100
SCALE_GOAL = 0.85
MEMORY_GOAL_MB = 250.0
RESTART_GOAL_S = 0.5
SAMPLE_INTERVAL = 0.002
LOAD_TRANSACTION = 50_000
WRITE_BATCH = 10_000
#: A child replay that takes longer than this is stuck.
CHILD_TIMEOUT = 3600

CASE_KAFKA = "Kafka, ~100 B values"
CASE_EMBEDDED = "embedded log, ~100 B values"
CASE_MEMORY_KAFKA = "peak RssAnon, Kafka replay"
CASE_MEMORY_EMBEDDED = "peak RssAnon, embedded-log replay"
CASE_FLOOR = "~100 B values"
KVLOG = "kvlog"
FLOOR_LMDB = "py-lmdb putmulti (same keys and values)"
FLOOR_FETCH = "loopback fetch of the topic, no decoding"
FLOOR_SEGMENTS = "read of the embedded log's segment files"
RESTART_WORKLOAD = "restart (time to ready)"
RESTART_CASE = "0% new records"
RESTART_SUBJECT = "kvlog warm restart"


def base_keys(keys: int) -> int:
    """The size of the baseline replay: :data:`SCALE_BASE` keys, or a tenth of a run that small or smaller."""
    return SCALE_BASE if keys > SCALE_BASE else max(100, keys // 10)


def is_large(keys: int) -> bool:
    return keys > LARGE


def base_subject(keys: int) -> str:
    return f"kvlog at {base_keys(keys):,} keys"


# -- memory of a child process -----------------------------------------------------------


def rss_anon_bytes(pid: int) -> int | None:
    """``RssAnon`` of process ``pid`` in bytes (``/proc/<pid>/status``), or None once it is gone."""
    try:
        with open(f"/proc/{pid}/status", "rb") as status:
            for line in status:
                if line.startswith(b"RssAnon:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


class RssAnonSampler:
    """Samples a process's ``RssAnon`` every ``interval`` s from a thread until the block ends; keeps the peak."""

    def __init__(self, pid: int, interval: float = SAMPLE_INTERVAL) -> None:
        self.pid = pid
        self.interval = interval
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"rss-anon-{pid}", daemon=True)

    def _sample(self) -> None:
        value = rss_anon_bytes(self.pid)
        if value is not None:
            self.samples += 1
            self.peak = max(self.peak, value)

    def _run(self) -> None:
        self._sample()
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> RssAnonSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak_mb(self) -> float:
        return self.peak / 1e6


def replay_in_child(
    spec: Mapping[str, Any], interval: float = SAMPLE_INTERVAL
) -> tuple[dict[str, Any], float]:
    """Run ``benchmarks._scale_child`` with ``spec``; its JSON line, and its peak RssAnon in MB.

    The sampler reads the child's memory from the moment it exists to the
    moment it has exited (its last readings come before the exit, while it closes).
    """
    command = [sys.executable, "-m", "benchmarks._scale_child", json.dumps(dict(spec))]
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.Popen(command, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with RssAnonSampler(proc.pid, interval) as sampler:
        out, err = proc.communicate(timeout=CHILD_TIMEOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"the replay child failed ({proc.returncode}): {err[-2000:]}")
    if not sampler.samples:
        raise RuntimeError("the replay child's memory was never sampled")
    return json.loads(out.strip().splitlines()[-1]), sampler.peak_mb


# -- the data ----------------------------------------------------------------------------


def _embedded_log(ctx: Context, keys: int) -> Path:
    """An embedded-log data directory holding ``keys`` keys (ctx.key(i), ~100 B values), written with update()."""
    from kvlog import KVLog

    data = ctx.subdir(f"scale-embedded-{keys}")
    print(f"  writing an embedded log: {keys:,} keys, ~{VALUE_SIZE} B values", flush=True)
    kv = KVLog(data, fsync="never")
    try:
        for start in range(0, keys, WRITE_BATCH):
            kv.update(
                {
                    ctx.key(i): value_of_size(i, VALUE_SIZE)
                    for i in range(start, min(keys, start + WRITE_BATCH))
                }
            )
    finally:
        kv.close()
    return data


def _pairs(ctx: Context) -> list[tuple[bytes, bytes]]:
    return [(ctx.key(i).encode(), packed_value(i, VALUE_SIZE)) for i in range(ctx.keys)]


# -- the floors --------------------------------------------------------------------------


def lmdb_load_seconds(pairs: list[tuple[bytes, bytes]], path: Path) -> float:
    """Seconds to ``putmulti`` ``pairs`` into a fresh LMDB at ``path``, :data:`LOAD_TRANSACTION` a transaction.

    Opened as kvlog opens its cache (``metasync=False``, ``sync=False``,
    ``readahead=False``); the directory is removed afterwards.
    """
    import lmdb

    path.mkdir(parents=True, exist_ok=True)
    try:
        env = lmdb.open(str(path), map_size=1 << 36, max_dbs=4, metasync=False, sync=False, readahead=False)
        try:
            db = env.open_db(b"data")
            started = time.perf_counter()
            for start in range(0, len(pairs), LOAD_TRANSACTION):
                with env.begin(write=True, db=db) as txn:
                    txn.cursor().putmulti(pairs[start : start + LOAD_TRANSACTION])
            return time.perf_counter() - started
        finally:
            env.close()
    finally:
        shutil.rmtree(path, ignore_errors=True)


_BATCH_START = struct.Struct(">qi")  # baseOffset, batchLength (the bytes after this field)
_EPOCH = struct.Struct(">i")
_LAST_OFFSET_DELTA = struct.Struct(">i")


def walk_batches(buffer: bytes | bytearray | memoryview) -> tuple[int | None, int, int]:
    """The offset after the last complete record batch of ``buffer``, that batch's leader epoch, and its end.

    Only the batch headers are read (v2 layout: baseOffset at 0, batchLength
    at 8, partitionLeaderEpoch at 12, lastOffsetDelta at 23); records are not.
    """
    size = len(buffer)
    position = 0
    next_offset: int | None = None
    epoch = -1
    while position + 12 <= size:
        base, length = _BATCH_START.unpack_from(buffer, position)
        end = position + 12 + length
        if end > size:
            break
        epoch = _EPOCH.unpack_from(buffer, position + 12)[0]
        next_offset = base + _LAST_OFFSET_DELTA.unpack_from(buffer, position + 23)[0] + 1
        position = end
    return next_offset, epoch, position


class _RawFetch:
    """A stand-in for kafka-python's ``Fetcher.PartitionRecords`` that decodes nothing.

    Each fetched record set moves the position past its last complete batch
    and counts its bytes; ``take`` hands back one placeholder, so that
    ``poll`` returns after each fetch rather than at its timeout.
    """

    def __init__(self, fetch_offset: int, tp: Any, records: Any, counter: list[int], **kwargs: Any) -> None:
        self.fetch_offset = fetch_offset
        self.topic_partition = tp
        self.next_fetch_offset = fetch_offset
        self.leader_epoch = -1
        self._on_drain = kwargs.get("on_drain") or (lambda _: None)
        buffer = getattr(records, "_buffer", None)
        if not isinstance(buffer, (bytes, bytearray, memoryview)):
            raise Skipped("this kafka-python's fetched records hold no raw buffer")
        self._next, self._epoch, used = walk_batches(buffer)
        counter[0] += used
        self.bytes_read = used
        self.records_read = 0
        self._pending = True

    def __bool__(self) -> bool:
        return self._pending

    def drain(self) -> None:
        if self._pending:
            self._pending = False
            self._on_drain(self)

    def take(self, n: int | None = None) -> list[Any]:
        if not self._pending:
            return []
        if self._next is not None:
            self.next_fetch_offset, self.leader_epoch = self._next, self._epoch
        self.drain()
        return [None]


def fetch_seconds(bootstrap: str, topic: str, end: int) -> tuple[float, int]:
    """Seconds to fetch offsets [0, end) of ``topic`` over the network without decoding, and the bytes fetched.

    A kafka-python consumer with kvlog's reader settings (the fetch sizes,
    ``read_committed``), from its creation to the last fetch.
    """
    from kafka import KafkaConsumer, TopicPartition

    from benchmarks.replay import KVLOG_READER_SETTINGS
    from kvlog.log.kafka import _decoder_hook_fits, _shorten_startup_backoff

    counter = [0]
    started = time.perf_counter()
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False, **KVLOG_READER_SETTINGS
    )
    _shorten_startup_backoff(consumer)
    try:
        fetcher = consumer._fetcher
        if not _decoder_hook_fits(type(fetcher)):
            raise Skipped("this kafka-python's fetcher cannot be handed raw record sets")

        def partition_records(fetch_offset: int, tp: Any, records: Any, **kwargs: Any) -> _RawFetch:
            return _RawFetch(fetch_offset, tp, records, counter, **kwargs)

        fetcher.PartitionRecords = partition_records
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        consumer.seek(tp, 0)
        while consumer.position(tp) < end:
            consumer.poll(timeout_ms=1000)
        return time.perf_counter() - started, counter[0]
    finally:
        consumer.close()


def _read_segments(log_dir: Path) -> int:
    from benchmarks.embedded import _read_log_files

    return _read_log_files(log_dir)


# -- the workload ------------------------------------------------------------------------


def run(ctx: Context) -> list[Row]:
    """Cold replay at ``ctx.keys`` vs :func:`base_keys`, for Kafka and the embedded log; memory; the floors."""
    from benchmarks.replay import _end_offset

    base = base_keys(ctx.keys)
    base_ctx = dataclasses.replace(ctx, keys=base)
    base_name = base_subject(ctx.keys)
    large = is_large(ctx.keys)
    bs = ctx.bootstrap_servers
    topics = {KVLOG: topic_for(ctx, VALUE_SIZE), base_name: topic_for(base_ctx, VALUE_SIZE)}
    logs = {KVLOG: _embedded_log(ctx, ctx.keys), base_name: _embedded_log(base_ctx, base)}
    sizes = {KVLOG: ctx.keys, base_name: base}
    end = _end_offset(bs, topics[KVLOG])
    print(f"  building the {ctx.keys:,} keys and values of the LMDB floor", flush=True)
    pairs = _pairs(ctx)

    problems: list[str] = []

    def kafka(name: str) -> tuple[float, float]:
        path = ctx.subdir("scale-kafka")
        try:
            out, peak = replay_in_child({"path": str(path), "bootstrap_servers": bs, "topic": topics[name]})
        finally:
            shutil.rmtree(path, ignore_errors=True)
        if out["entries"] != sizes[name]:
            problems.append(f"Kafka replay of {name}: {out['entries']} keys, expected {sizes[name]}")
        return sizes[name] / out["seconds"], peak

    def embedded(name: str) -> tuple[float, float]:
        shutil.rmtree(logs[name] / "cache", ignore_errors=True)
        out, peak = replay_in_child({"path": str(logs[name])})
        info = out["open_replay"]
        if out["entries"] != sizes[name] or info.get("mode") != "cold":
            problems.append(
                f"embedded replay of {name}: {out['entries']} keys ({info}), expected {sizes[name]}"
            )
        return sizes[name] / out["seconds"], peak

    floor_bytes: dict[str, int] = {}

    def lmdb_floor() -> tuple[float, float]:
        return ctx.keys / lmdb_load_seconds(pairs, ctx.workdir / "scale-lmdb-floor"), 0.0

    def fetch_floor() -> tuple[float, float]:
        seconds, fetched = fetch_seconds(bs, topics[KVLOG], end)
        floor_bytes[FLOOR_FETCH] = fetched
        return end / seconds, fetched / seconds / 1e6

    def segments_floor() -> tuple[float, float]:
        started = time.perf_counter()
        read = _read_segments(logs[KVLOG] / "log")
        seconds = time.perf_counter() - started
        floor_bytes[FLOOR_SEGMENTS] = read
        return ctx.keys / seconds, read / seconds / 1e6

    measures: dict[tuple[str, str], Callable[[], tuple[float, float]]] = {
        (CASE_KAFKA, KVLOG): lambda: kafka(KVLOG),
        (CASE_KAFKA, base_name): lambda: kafka(base_name),
        (CASE_EMBEDDED, KVLOG): lambda: embedded(KVLOG),
        (CASE_EMBEDDED, base_name): lambda: embedded(base_name),
        (CASE_FLOOR, FLOOR_LMDB): lmdb_floor,
        (CASE_FLOOR, FLOOR_FETCH): fetch_floor,
        (CASE_FLOOR, FLOOR_SEGMENTS): segments_floor,
    }
    taken: dict[tuple[str, str], list[tuple[int, float, float]]] = {name: [] for name in measures}
    for round_ in range(ctx.runs + 1):
        # Round 0 warms up; above LARGE, only what is cheap takes part in it.
        due = {f"{case}: {subject}": (case, subject) for case, subject in measures}
        for label in turns([k for k, m in due.items() if round_ or not large or m[1] == base_name], round_):
            measure = due[label]
            settle()
            try:
                rate, extra = measures[measure]()
            except Skipped as exc:
                ctx.skip(FLOOR, measure[1], str(exc))
                del measures[measure]
                continue
            if round_:
                taken[measure].append((round_, rate, extra))
    shutil.rmtree(logs[KVLOG], ignore_errors=True)
    shutil.rmtree(logs[base_name], ignore_errors=True)
    for problem in problems:
        ctx.notes.append(f"{WORKLOAD}: {problem}")
        print(f"  {WORKLOAD}: {problem}", flush=True)

    rows: list[Row] = []
    shape = f"{VALUE_SIZE} B values"
    for case, what in ((CASE_KAFKA, "a Kafka topic"), (CASE_EMBEDDED, "an embedded log")):
        memory_case = CASE_MEMORY_KAFKA if case == CASE_KAFKA else CASE_MEMORY_EMBEDDED
        for name in (KVLOG, base_name):
            samples = taken[(case, name)]
            rounds = [r for r, _, _ in samples]
            note = f"KVLog(...) of {what} of {sizes[name]:,} keys (~{shape}) in a child process"
            rows.append(
                Row(
                    WORKLOAD,
                    case,
                    name,
                    "records/s",
                    [rate for _, rate, _ in samples],
                    True,
                    baseline=base_name if name == KVLOG else None,
                    rounds=rounds,
                    note=note,
                )
            )
            rows.append(
                Row(
                    WORKLOAD,
                    memory_case,
                    name,
                    "MB",
                    [peak for _, _, peak in samples],
                    False,
                    note=f"the replaying process's peak RssAnon, sampled every {SAMPLE_INTERVAL * 1000:.0f} ms",
                )
            )
    for name in (FLOOR_LMDB, FLOOR_FETCH, FLOOR_SEGMENTS):
        samples = taken.get((CASE_FLOOR, name)) or []
        if not samples:
            continue
        note = ""
        if name in floor_bytes:
            mb_s = statistics.median(extra for _, _, extra in samples)
            megabytes = floor_bytes[name] / 1e6
            note = f"{megabytes:,.0f} MB" if megabytes >= 10 else f"{megabytes:.3g} MB"
            note += f", {mb_s:,.0f} MB/s"
        if name == FLOOR_LMDB:
            note = f"{LOAD_TRANSACTION:,} records a transaction, sync=False"
        rows.append(
            Row(FLOOR, CASE_FLOOR, name, "records/s", [rate for _, rate, _ in samples], True, note=note)
        )
    for row in rows:
        print(f"  {row.workload}: {row.case}: {row.subject}: {row.median:,.1f} {row.unit}", flush=True)
    return rows


# -- checks ------------------------------------------------------------------------------


def checks(rows: list[Row], workloads: set[str] | frozenset[str]) -> list[dict[str, Any]]:
    """The scale goals of the replay and restart workloads, as ``--check`` dicts (see benchmarks/__main__.py)."""
    from benchmarks.__main__ import _goal_checks, _rounded
    from benchmarks.processes import Goal

    found: list[dict[str, Any]] = []
    if "replay" in workloads:
        base = next((r.baseline for r in rows if r.workload == WORKLOAD and r.baseline), None)
        found.extend(
            _goal_checks(
                rows,
                [
                    Goal(
                        f"cold replay from {kind} at this run's keys vs {base or 'the baseline size'}",
                        WORKLOAD,
                        (case,),
                        KVLOG,
                        SCALE_GOAL,
                        explain=f"records/s at least {SCALE_GOAL}x those of the smaller replay, same run",
                    )
                    for kind, case in (("Kafka", CASE_KAFKA), ("the embedded log", CASE_EMBEDDED))
                ],
                "scale",
            )
        )
        memory = [
            r
            for r in rows
            if r.workload == WORKLOAD
            and r.case in (CASE_MEMORY_KAFKA, CASE_MEMORY_EMBEDDED)
            and r.subject == KVLOG
        ]
        peaks = [s for r in memory for s in r.samples]
        worst = max(memory, key=lambda r: r.max) if memory else None
        found.append(
            {
                "name": "scale: peak RssAnon of the replaying process",
                "goal": MEMORY_GOAL_MB,
                "unit": "MB",
                "measured": round(max(peaks), 1) if peaks else None,
                "ratio": None,
                "spread": _rounded(spread(peaks)) if peaks else None,
                "passed": bool(peaks) and max(peaks) < MEMORY_GOAL_MB,
                "detail": (
                    f"the highest peak of any sample (worst case: {worst.case}; cases: "
                    + ", ".join(f"{r.case} {r.max:.1f} MB" for r in memory)
                    + ")"
                    if worst
                    else "not measured"
                ),
                "rows": [[r.workload, r.case, r.subject] for r in memory],
            }
        )
    if "restart" in workloads:
        found.extend(
            _goal_checks(
                rows,
                [
                    Goal(
                        "warm restart",
                        RESTART_WORKLOAD,
                        (RESTART_CASE,),
                        RESTART_SUBJECT,
                        RESTART_GOAL_S,
                        unit="s",
                        explain=f"reopening a cache already caught up takes at most {RESTART_GOAL_S} s (median)",
                    )
                ],
                "scale",
            )
        )
    return found


# -- the report and the README -----------------------------------------------------------


def _median(row: Mapping[str, Any] | None) -> float | None:
    if not row:
        return None
    if row.get("median") is not None:
        return float(row["median"])
    samples = row.get("samples") or []
    return statistics.median(samples) if samples else None


def _find(results: Mapping[str, Any], workload: str, case: str, subject: str) -> dict[str, Any] | None:
    for row in results.get("rows") or []:
        if (row.get("workload"), row.get("case"), row.get("subject")) == (workload, case, subject):
            return dict(row)
    return None


def _rate(value: float | None) -> str:
    if value is None:
        return NONE
    return f"{value / 1e6:.2f} M/s" if value >= 1e6 else f"{value / 1e3:,.0f} k/s"


def _ratio(value: float | None) -> str:
    return NONE if value is None else f"{value:.2f}{TIMES}"


def floor_lines(results: Mapping[str, Any]) -> list[str]:
    """ "The physical floor" of a run: each floor's rate and kvlog's replay rates as fractions of it."""
    keys = int((results.get("args") or {}).get("keys") or 0)
    kafka = _median(_find(results, WORKLOAD, CASE_KAFKA, KVLOG))
    local = _median(_find(results, WORKLOAD, CASE_EMBEDDED, KVLOG))
    floors = [
        (name, _find(results, FLOOR, CASE_FLOOR, name)) for name in (FLOOR_LMDB, FLOOR_FETCH, FLOOR_SEGMENTS)
    ]
    if not any(row for _, row in floors):
        return []
    lines = [
        "## The physical floor",
        "",
        f"What one core does with the same {keys:,} keys and ~{VALUE_SIZE} B values with nothing of kvlog's "
        "in between, and where kvlog's cold replay (Kafka; embedded log) stands against it: "
        "the floor of each step of a replay, measured in the same run.",
        "",
        "| floor | records/s | detail | kvlog's Kafka replay | kvlog's embedded-log replay |",
        "|---|--:|---|--:|--:|",
    ]
    for name, row in floors:
        rate = _median(row)
        if rate is None:
            continue
        cells = [
            name,
            f"{rate:,.0f}",
            str((row or {}).get("note") or ""),
            _ratio(kafka / rate if kafka else None),
            _ratio(local / rate if local else None),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        f"kvlog's cold replay here: {_rate(kafka)} from Kafka, {_rate(local)} from the embedded log. Its "
        "floor is the slowest step it cannot skip: every record is fetched (or read) and put into LMDB.",
        "",
    ]
    return lines


def report_lines(results: Mapping[str, Any]) -> list[str]:
    """The run report's floor section (nothing if the run has no scale rows)."""
    return floor_lines(results)


def summary(results: Mapping[str, Any]) -> dict[str, Any]:
    """What the scale table shows of one run."""
    keys = int((results.get("args") or {}).get("keys") or 0)
    kafka = _find(results, WORKLOAD, CASE_KAFKA, KVLOG) or {}
    local = _find(results, WORKLOAD, CASE_EMBEDDED, KVLOG) or {}
    memory = [
        max(row.get("samples") or [0.0])
        for case in (CASE_MEMORY_KAFKA, CASE_MEMORY_EMBEDDED)
        if (row := _find(results, WORKLOAD, case, KVLOG))
    ]
    return {
        "keys": keys,
        "started": results.get("started"),
        "command": results.get("command"),
        "kafka": _median(kafka),
        "kafka_ratio": kafka.get("ratio"),
        "embedded": _median(local),
        "embedded_ratio": local.get("ratio"),
        "base": kafka.get("baseline"),
        "restart": _median(_find(results, RESTART_WORKLOAD, RESTART_CASE, RESTART_SUBJECT)),
        "memory_mb": max(memory) if memory else None,
    }


def latest_per_size(results_dir: Path) -> dict[int, tuple[Path, dict[str, Any]]]:
    """The latest saved run (by its start time) of each size that measured replay at scale."""
    found: dict[int, tuple[Path, dict[str, Any]]] = {}
    for path in sorted(Path(results_dir).glob("*.json")):
        try:
            results = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(results, dict) or not _find(results, WORKLOAD, CASE_KAFKA, KVLOG):
            continue
        keys = int((results.get("args") or {}).get("keys") or 0)
        current = found.get(keys)
        if current is None or str(results.get("started")) >= str(current[1].get("started")):
            found[keys] = (path, results)
    return dict(sorted(found.items()))


def _tick(value: float, _pos: Any = None) -> str:
    if value >= 1e6:
        return f"{value / 1e6:g} M/s"
    return f"{value / 1e3:g} k/s" if value else "0"


def scale_chart(entries: Mapping[int, Mapping[str, Any]], path: Path) -> Path:
    """Replay rate (records/s) against keys, one line per log kind, log-scaled keys."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    from benchmarks.report import DPI, KVLOG_SHADES, _style

    with plt.rc_context(_style()):
        fig, ax = plt.subplots(figsize=(9, 5.2), dpi=DPI)
        sizes = sorted(entries)
        for field, label, color in (
            ("kafka", "kvlog cold replay from Kafka", KVLOG_SHADES[0]),
            ("embedded", "kvlog cold replay from the embedded log", KVLOG_SHADES[2]),
        ):
            points = [(k, entries[k][field]) for k in sizes if entries[k].get(field)]
            if points:
                ax.plot([k for k, _ in points], [v for _, v in points], marker="o", color=color, label=label)
                for k, v in points:
                    ax.annotate(
                        _rate(v), (k, v), textcoords="offset points", xytext=(0, 7), ha="center", fontsize=9
                    )
        ax.set_xscale("log")
        ax.set_xticks(sizes)
        ax.set_xticklabels([f"{k:,}" for k in sizes])
        ax.xaxis.set_minor_locator(ticker.NullLocator())
        ax.set_xlim(min(sizes) / 2, max(sizes) * 2)
        ax.set_xlabel("keys (~100 B values), one run per size")
        ax.set_ylabel("records/s (median)")
        ax.set_ylim(bottom=0, top=ax.get_ylim()[1] * 1.15)
        ax.yaxis.set_major_formatter(ticker.FuncFormatter(_tick))
        ax.grid(True, axis="y")
        ax.set_title("Cold replay rate by size")
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, frameon=False)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
        plt.close(fig)
    return path


SCALE_START = (
    "<!-- scale:start (written by python -m benchmarks --readme, from the latest run of each size) -->"
)
SCALE_END = "<!-- scale:end -->"
CHART_NAME = "scale-replay-rate.png"


def scale_block(readme: Path, results_dir: Path) -> list[str]:
    """The README's scale section: a row per size from that size's latest saved run, the chart, the floor."""
    latest = latest_per_size(results_dir)
    if not latest:
        return [SCALE_START, "", "No saved run has measured replay at scale yet.", "", SCALE_END]

    def rel(path: Path) -> str:
        return Path(os.path.relpath(path.resolve(), readme.resolve().parent)).as_posix()

    entries = {keys: summary(results) for keys, (_, results) in latest.items()}
    chart = scale_chart(entries, Path(results_dir) / CHART_NAME)
    lines = [
        SCALE_START,
        "",
        f"![cold replay rate by size]({rel(chart)})",
        "",
        "Each row is the latest saved run of that size (the *run* column links its report). The ratio in "
        "brackets is the replay rate relative to the same replay of the smaller data set named in *vs*, "
        f"measured in the same run (goal ≥ {SCALE_GOAL}{TIMES}); *peak RssAnon* is the highest anonymous "
        "memory of the replaying process over every sample (goal < "
        f"{MEMORY_GOAL_MB:.0f} MB), *warm restart* the median time to reopen a cache already caught up "
        f"(goal ≤ {RESTART_GOAL_S} s). From row to row the rates compare different runs, made under "
        "whatever load the machine had (each report records it): the ratios, paired within a run, are "
        "what the goals judge.",
        "",
        "| keys | Kafka replay | embedded-log replay | vs | warm restart | peak RssAnon | run |",
        "|--:|--:|--:|---|--:|--:|---|",
    ]
    for keys, (path, _) in latest.items():
        e = entries[keys]
        report_path = path.with_suffix(".md")
        run = f"[{path.stem}]({rel(report_path)})" if report_path.exists() else path.stem
        cells = [
            f"{keys:,}",
            f"{_rate(e['kafka'])} ({_ratio(e['kafka_ratio'])})",
            f"{_rate(e['embedded'])} ({_ratio(e['embedded_ratio'])})",
            str(e["base"] or NONE),
            NONE if e["restart"] is None else f"{e['restart']:.3f} s",
            NONE if e["memory_mb"] is None else f"{e['memory_mb']:.0f} MB",
            f"{run}: `{e['command']}`",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    largest_path, largest = latest[max(latest)]
    floor = [line.replace("## ", "#### ", 1) for line in floor_lines(largest)]
    if floor:
        lines += ["", *floor[:2], f"From the {max(latest):,}-key run ({largest_path.stem}).", "", *floor[2:]]
    while lines[-1] == "":
        lines.pop()
    lines += ["", SCALE_END]
    return lines


def update_readme(readme: Path, results_dir: Path) -> None:
    """Rewrite the README's scale block (between :data:`SCALE_START` and :data:`SCALE_END`) from the saved runs."""
    text = readme.read_text()
    if SCALE_START not in text or SCALE_END not in text:
        raise ValueError(f"{readme} has no scale block ({SCALE_START} ... {SCALE_END})")
    start = text.index(SCALE_START)
    end = text.index(SCALE_END) + len(SCALE_END)
    readme.write_text(text[:start] + "\n".join(scale_block(readme, results_dir)) + text[end:])
