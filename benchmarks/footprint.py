"""Workload 5, footprint: the memory a reader process needs to hold the whole table, and kvlog's disk.

Each sample is a fresh interpreter (``python -m benchmarks._reader_child``)
that loads the ~100-byte-value topic, reads every key once and reports its
resident memory (RSS, MB) then; the peak (VmHWM) and, for kvlog, the split
between anonymous memory and file-backed pages go in the notes. Subjects:

* ``kvlog``: a KVLog opened on a cache the parent warmed once (a warm
  restart: the steady state of a service that restarts);
* ``kvlog (cold)``: a KVLog on an empty cache (replays the whole topic);
* ``dict (hand-rolled consumer)``: a kafka-python consumer folding the topic
  into a dict of decoded values, the baseline;
* ``ktables``: a ``KafkaTable`` with a msgpack decoder;
* ``python baseline``: an interpreter that only imported the clients (every
  child imports the same ones first), to subtract from the others.

kvlog's RSS counts the LMDB pages it touched, which are page-cache pages
mapped into the process (shared, reclaimable by the kernel, and not lost on
restart); the dict and ktables hold decoded Python objects on the heap. The
cache's size on disk is a row of its own; the dict and ktables keep nothing on
disk (they replay the whole topic at every start).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.data import topic_for
from benchmarks.harness import Context, Row, Skipped

__all__ = ["run"]

WORKLOAD = "footprint"
#: Each sample starts an interpreter and, for every subject but warm kvlog,
#: replays the whole topic: at 1M keys that is tens of seconds per sample and
#: subject, and memory figures barely vary between samples, so at most 3.
MAX_RUNS = 3
#: Seconds one child may take (a 1M-key replay takes well under a minute here).
CHILD_TIMEOUT = 1800.0
BASELINE = "dict (hand-rolled consumer)"

_ROOT = Path(__file__).resolve().parent.parent
_MB = 1024 * 1024


def _child(ctx: Context, subject: str, topic: str, cache: Path | None = None) -> dict[str, Any]:
    """Run one reader child and return its JSON report; raise with its stderr tail if it fails."""
    cmd = [
        sys.executable,
        "-m",
        "benchmarks._reader_child",
        subject,
        "--bootstrap",
        ctx.bootstrap_servers,
        "--topic",
        topic,
        "--keys",
        str(ctx.keys),
    ]
    if cache is not None:
        cmd += ["--cache", str(cache)]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_ROOT), env.get("PYTHONPATH")) if p)
    try:
        proc = subprocess.run(
            cmd, cwd=_ROOT, env=env, capture_output=True, text=True, timeout=CHILD_TIMEOUT, check=False
        )
    except subprocess.TimeoutExpired as exc:
        stderr = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else exc.stderr or ""
        raise RuntimeError(
            f"footprint child {subject!r} timed out after {CHILD_TIMEOUT:g}s; stderr tail:\n{stderr[-2000:]}"
        ) from exc
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise RuntimeError(
            f"footprint child {subject!r} exited with {proc.returncode}; stderr tail:\n{proc.stderr[-2000:]}"
        )
    try:
        result: dict[str, Any] = json.loads(lines[-1])
    except json.JSONDecodeError as exc:
        raise RuntimeError(
            f"footprint child {subject!r} printed no JSON report: {lines[-1][:200]!r}; "
            f"stderr tail:\n{proc.stderr[-2000:]}"
        ) from exc
    return result


def _median(reports: list[dict[str, Any]], field: str) -> float:
    return statistics.median(r[field] for r in reports if field in r)


def _memory_note(reports: list[dict[str, Any]]) -> str:
    note = f"peak {_median(reports, 'hwm_mb'):.0f} MB"
    if all("anon_mb" in r and "file_mb" in r for r in reports):
        note += (
            f"; now {_median(reports, 'anon_mb'):.0f} MB anonymous + "
            f"{_median(reports, 'file_mb'):.0f} MB file-backed"
        )
    return note


def _timing_note(reports: list[dict[str, Any]]) -> str:
    return (
        f"ready in {_median(reports, 'ready_seconds'):.2f} s, "
        f"every key read in {_median(reports, 'read_seconds'):.2f} s (medians)"
    )


def _measure(
    ctx: Context, label: str, runs: int, subject: str, topic: str, cache: Any = None
) -> list[dict[str, Any]]:
    """``runs`` children of ``subject``; ``cache`` is a path, or a callable making one per sample."""
    started = time.perf_counter()
    reports = []
    for _ in range(runs):
        path = cache() if callable(cache) else cache
        reports.append(_child(ctx, subject, topic, path))
    rss = _median(reports, "rss_mb")
    print(
        f"  {WORKLOAD}: {label}: {rss:.0f} MB RSS (median of {runs}, {time.perf_counter() - started:.0f} s)",
        flush=True,
    )
    return reports


def run(ctx: Context) -> list[Row]:
    case = f"{ctx.keys:,} keys, ~100 B values"
    runs = min(ctx.runs, MAX_RUNS)
    if runs < ctx.runs:
        ctx.notes.append(
            f"{WORKLOAD}: {runs} samples per subject, not {ctx.runs} (a fresh process per sample)"
        )
    topic = topic_for(ctx, 100)
    rows: list[Row] = []

    def row(subject: str, reports: list[dict[str, Any]], note: str, baseline: str | None = BASELINE) -> None:
        rows.append(
            Row(
                workload=WORKLOAD,
                case=case,
                subject=subject,
                unit="MB",
                samples=[r["rss_mb"] for r in reports],
                higher_is_better=False,
                baseline=baseline,
                note=note,
            )
        )

    base = _measure(ctx, "python baseline", runs, "baseline", topic)
    row(
        "python baseline",
        base,
        "an interpreter that imported kvlog, kafka-python, aiokafka and ktables and holds nothing; "
        "every other child imports the same first, so subtracting this leaves what the table costs",
        baseline=None,
    )

    hand = _measure(ctx, BASELINE, runs, "dict", topic)
    row(
        BASELINE,
        hand,
        f"kafka-python consumer into a dict of decoded values; {_memory_note(hand)}; {_timing_note(hand)}",
        baseline=None,
    )

    # The warm cache every "kvlog" sample restarts from, built once here. The
    # import stays local: the parent's own memory is never measured.
    from kvlog import KVLog

    warm_dir = ctx.subdir("footprint-kvlog")
    with KVLog(warm_dir, bootstrap_servers=ctx.bootstrap_servers, topic=topic, follow=False) as kv:
        if len(kv) != ctx.keys:
            raise RuntimeError(f"the warmed kvlog cache holds {len(kv):,} entries, expected {ctx.keys:,}")
    warm = _measure(ctx, "kvlog (warm restart)", runs, "kvlog", topic, warm_dir)
    if any(r["mode"] != "warm" or r["records_replayed"] for r in warm):
        raise RuntimeError(
            f"a kvlog warm restart was not warm: {[(r['mode'], r['records_replayed']) for r in warm]}"
        )
    row(
        "kvlog",
        warm,
        f"warm restart from a cache on disk (replays nothing); RSS counts the LMDB pages read, "
        f"mapped from the page cache; {_memory_note(warm)}; {_timing_note(warm)}",
    )

    cold_dirs: list[Path] = []

    def fresh_cache() -> Path:
        for old in cold_dirs:  # keep one cold cache on disk at a time (~130 MB at 1M keys)
            shutil.rmtree(old, ignore_errors=True)
        cold_dirs.append(ctx.subdir("footprint-kvlog-cold"))
        return cold_dirs[-1]

    cold = _measure(ctx, "kvlog (cold)", runs, "kvlog", topic, fresh_cache)
    for old in cold_dirs:
        shutil.rmtree(old, ignore_errors=True)
    if any(r["mode"] != "cold" for r in cold):
        raise RuntimeError(f"a kvlog cold open was not cold: {[r['mode'] for r in cold]}")
    row(
        "kvlog (cold)",
        cold,
        f"empty cache: replays the whole topic into LMDB; {_memory_note(cold)}; {_timing_note(cold)}",
    )

    try:
        from benchmarks.ktables_bench import _ktables

        _ktables()
    except Skipped as exc:
        ctx.skip(WORKLOAD, "ktables", str(exc))
    else:
        kt = _measure(ctx, "ktables", runs, "ktables", topic)
        row(
            "ktables",
            kt,
            f"KafkaTable with a msgpack decoder; {_memory_note(kt)}; {_timing_note(kt)}",
        )

    disk = [r["bytes_on_disk"] / _MB for r in cold]
    warm_disk = statistics.median(r["bytes_on_disk"] for r in warm) / _MB
    rows.append(
        Row(
            workload=WORKLOAD,
            case=case,
            subject="kvlog (LMDB cache on disk)",
            unit="MB on disk",
            samples=disk,
            higher_is_better=False,
            note=(
                f"data.mdb + lock.mdb of each cold-built cache (the warm one: {warm_disk:.0f} MB); "
                "the dict and ktables keep nothing on disk: they replay the whole topic at every start"
            ),
        )
    )
    return rows
