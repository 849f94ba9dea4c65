"""Many processes on one embedded log at once, like SQLite in WAL mode: real child processes, real SIGKILLs.

The children (``tests/log/_process_child.py``) each open their own
``LocalLog`` on a shared directory; this process often has one open too. They
show that:

- concurrent appenders each get dense, increasing offsets, every
  acknowledged append is in the log exactly once, and every process's reader
  sees every other's records, across segment rolls;
- a process SIGKILLed while it holds the write lock (at random points of an
  append loop, or stopped inside the lock and then killed) blocks nobody, loses
  no acknowledged record, and leaves no torn record readable;
- a process killed mid-compaction leaves a log another live process keeps
  reading and writing, and the next compaction finishes (or the next reload
  completes) the swap;
- compaction in one process while another appends and reads never shows the
  reader a missing or wrong record;
- a reopen after every process exited uses the head (no scan), and a
  directory of the layout before the head still opens;
- processes opening a log that others wrote do not each read it to count its
  dirt: one counts, the others take up the sample it saved; and background
  compaction keeps the log small while several processes overwrite keys.

No sleeps synchronise anything: the parent waits on what the children print,
with deadlines.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from _head import read_head, to_old_layout
from _process_child import check_value, value_of
from conftest import wait_until

from kvlog.log.local import LocalLog

CHILD = Path(__file__).resolve().parent / "_process_child.py"


class Child:
    """A child process whose stdout lines are collected as they come."""

    def __init__(self, tmp: Path, mode: str, path: Path, *args: str, script: str | None = None) -> None:
        """Run ``_process_child.py`` in ``mode``, or ``script`` (Python source) with the same arguments."""
        self._stderr = tmp / f"child-{time.monotonic_ns()}.stderr"
        program = [str(CHILD)] if script is None else ["-c", script]
        with open(self._stderr, "wb") as stderr:
            self.proc = subprocess.Popen(
                [sys.executable, *program, mode, str(path), *args],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
                start_new_session=True,
            )
        self.cond = threading.Condition()
        self.lines: list[tuple[str, str]] = []
        self.eof = False
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            word, _, rest = raw.rstrip("\n").partition(" ")
            with self.cond:
                self.lines.append((word, rest))
                self.cond.notify_all()
        with self.cond:
            self.eof = True
            self.cond.notify_all()

    def tell(self, line: str) -> None:
        """Write a line to the child's stdin."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def said(self, word: str) -> list[str]:
        with self.cond:
            return [rest for w, rest in self.lines if w == word]

    def wait_for(self, predicate: Callable[[Child], bool], what: str, timeout: float = 60.0) -> None:
        with self.cond:
            self.cond.wait_for(lambda: predicate(self) or self.eof, timeout)
        if not predicate(self):
            state = "exited" if self.eof else f"still running after {timeout}s"
            pytest.fail(f"child {state} before {what}; stderr:\n{self._stderr.read_text()[-3000:]}")

    def acked(self) -> dict[int, list[tuple[int, int]]]:
        out = {}
        for rest in self.said("ack"):
            n, _, positions = rest.partition(" ")
            out[int(n)] = [tuple(x) for x in json.loads(positions)]
        return out  # type: ignore[return-value]

    def kill(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=60)
        self._reader.join(timeout=60)
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()

    def join(self, timeout: float = 120.0) -> None:
        self.proc.wait(timeout=timeout)
        self._reader.join(timeout=60)
        assert self.proc.returncode == 0, f"child failed: {self._stderr.read_text()[-3000:]}"


@contextlib.contextmanager
def children(tmp: Path) -> Iterator[Callable[..., Child]]:
    started: list[Child] = []

    def start(mode: str, path: Path, *args: str, script: str | None = None) -> Child:
        child = Child(tmp, mode, path, *args, script=script)
        started.append(child)
        return child

    try:
        yield start
    finally:
        for child in started:
            child.kill()


def read_everything(log: LocalLog) -> list[tuple[int, int, bytes, bytes | None]]:
    """Every record of ``log`` up to its end offsets now: (partition, offset, key, value)."""
    end = log.end_offsets()
    reader = log.open_reader(log.begin_offsets())
    out: list[tuple[int, int, bytes, bytes | None]] = []
    deadline = time.monotonic() + 120
    try:
        while any(reader.positions()[p] < end[p] for p in end):
            assert time.monotonic() < deadline, "reading the log back did not finish"
            for r in reader.poll(1.0, 100_000):
                assert r.key is not None
                out.append((r.partition, r.offset, r.key, r.value))
    finally:
        reader.close()
    return out


def records_of(n: int, count: int, writer: int) -> int:
    """How many records writer ``writer`` of ``append`` mode appends in ``count`` appends."""
    rng = random.Random(writer)
    total = 0
    for _ in range(count):
        k = rng.randint(1, 5)
        for _ in range(k):
            rng.randrange(0, 200)
        total += k
    return total


# -- concurrent appenders ---------------------------------------------------------------------


@pytest.mark.parametrize("partitions", [1, 3])
def test_concurrent_appenders_get_dense_offsets_and_see_each_other(tmp_path: Path, partitions: int) -> None:
    """Three processes and this one append at once (segments of 4 KiB: rolls by every process).

    Every acknowledged append is in the log exactly once, at the positions it
    was given; offsets are dense and increasing per partition; each child's
    reader read every other writer's records.
    """
    path = tmp_path / "log"
    opts = [f"--partitions={partitions}", "--segment-bytes=4096"]
    writers, count = 3, 150
    mine = 100
    expect = sum(records_of(w, count, w) for w in range(1, writers + 1)) + mine
    log = LocalLog(path, partitions=partitions, segment_bytes=4096, background_compaction=False)
    try:
        with children(tmp_path) as start:
            procs = [
                start("append", path, f"--id={w}", f"--count={count}", f"--expect={expect}", *opts)
                for w in range(1, writers + 1)
            ]
            acked_here = []
            for i in range(mine):
                key = b"w0:%d:0" % i
                acked_here.append((key, log.append([(key, value_of(key))])[0]))
            for child in procs:
                child.join()
            assert all(not child.said("bad") for child in procs), [c.said("bad") for c in procs]
            for child in procs:
                (read,) = child.said("read")
                assert sum(json.loads(read).values()) == expect, f"a reader missed records: {read}"
                assert set(json.loads(read)) == {f"w{w}" for w in range(writers + 1)}
            records = read_everything(log)
            assert len({s.base for s in log._segments[0]}) > 3, "the test meant segments to roll"
            by_position = {(p, o): (k, v) for p, o, k, v in records}
            assert len(by_position) == len(records) == expect
            for p in range(partitions):
                offsets = sorted(o for q, o in by_position if q == p)
                assert offsets == list(range(len(offsets))), f"partition {p}: offsets are not dense"
            for w, child in enumerate(procs, start=1):
                acked = child.acked()
                assert len(acked) == count
                rng = random.Random(w)
                for n in range(count):
                    k = rng.randint(1, 5)
                    for j in range(k):
                        rng.randrange(0, 200)
                        key = f"w{w}:{n}:{j}".encode()
                        assert by_position[acked[n][j]][0] == key, f"{key!r} is not where its append said"
            for key, position in acked_here:
                assert by_position[position] == (key, value_of(key))
            assert all(check_value(k, v) is None for _, _, k, v in records)
    finally:
        log.close()


# -- SIGKILL inside the write lock ---------------------------------------------------------------


def _check_log_after_kills(
    records: list[tuple[int, int, bytes, bytes | None]],
    acked: dict[bytes, tuple[int, int]],
    in_flight: list[set[bytes]],
) -> None:
    """Acknowledged records are there once, at their positions; the rest are whole in-flight batches."""
    seen: dict[bytes, tuple[int, int]] = {}
    for p, o, k, v in records:
        assert check_value(k, v) is None, f"a torn or wrong record was read: {check_value(k, v)}"
        assert k not in seen, f"{k!r} is in the log twice"
        seen[k] = (p, o)
    for key, position in acked.items():
        assert seen.get(key) == position, f"acknowledged {key!r} at {position} is at {seen.get(key)}"
    extra = set(seen) - set(acked)
    for keys in in_flight:
        # A batch the kill interrupted is there whole or not at all, per partition.
        there = extra & keys
        by_partition: dict[int, set[bytes]] = {}
        for key in keys:
            if key in seen:
                by_partition.setdefault(seen[key][0], set()).add(key)
        extra -= there
    assert not extra, f"records that no append wrote: {sorted(extra)[:5]}"


@pytest.mark.parametrize("fsync", ["never", "always"])
def test_sigkill_while_holding_the_write_lock_blocks_nobody(tmp_path: Path, fsync: str) -> None:
    """A child appending in a loop is SIGKILLed at random points, 20 times; this process keeps appending.

    Most kills land inside an append (which holds the write lock), many of
    them inside the write of a large batch. After each, this process's next
    append goes through, and the whole log holds every acknowledged record
    once and nothing torn; an interrupted batch is there whole or not at all.
    """
    path = tmp_path / "log"
    rng = random.Random(fsync)
    log = LocalLog(path, partitions=2, segment_bytes=256 * 1024, fsync=fsync, background_compaction=False)
    acked: dict[bytes, tuple[int, int]] = {}
    in_flight: list[set[bytes]] = []
    mid_append = 0
    try:
        with children(tmp_path) as start:
            for kill in range(20):
                child = start(
                    "loop",
                    path,
                    f"--id={kill + 1}",
                    "--partitions=2",
                    f"--fsync={fsync}",
                    "--segment-bytes=262144",
                )
                wanted = rng.randint(1, 40)
                child.wait_for(lambda c, n=wanted: len(c.said("ack")) >= n, f"{wanted} acks")
                # Kill at once, or after a random spin: anywhere in the loop, mostly inside an append.
                spin_until = time.monotonic() + rng.uniform(0, 0.02)
                while time.monotonic() < spin_until:
                    pass
                child.kill()
                begun = {int(r.split()[0]): int(r.split()[1]) for r in child.said("begin")}
                done = child.acked()
                for n, positions in done.items():
                    for j, position in enumerate(positions):
                        acked[f"w{kill + 1}:{n}:{j}".encode()] = position
                for n in set(begun) - set(done):
                    in_flight.append({f"w{kill + 1}:{n}:{j}".encode() for j in range(begun[n])})
                    mid_append += 1
                # The next append in another process goes through (the lock died with the child).
                key = b"parent:%d" % kill
                result: list[Any] = []
                appender = threading.Thread(
                    target=lambda k=key, out=result: out.append(log.append([(k, value_of(k))]))
                )
                appender.start()
                appender.join(timeout=30)
                assert not appender.is_alive(), "an append waited for the write lock of a dead process"
                acked[key] = result[0][0]
                # What the dead writer left past the published end was cut before that append
                # wrote: past what the head published lie only zeros the append preallocated
                # (fsync="always"), never a record a later scan could find.
                for q, (_end, base, size) in enumerate(read_head(path).entries):
                    data = (path / str(q) / f"{base:020d}.log").read_bytes()
                    assert data.count(0, size) == len(data) - size
                _check_log_after_kills(read_everything(log), acked, in_flight)
        assert mid_append >= 5, f"only {mid_append} of 20 kills landed inside an append"
    finally:
        log.close()
    reopened = LocalLog(path, background_compaction=False)
    try:
        _check_log_after_kills(read_everything(reopened), acked, in_flight)
    finally:
        reopened.close()


def test_a_process_stopped_inside_the_lock_then_killed(tmp_path: Path) -> None:
    """A child stopped (SIGSTOP) inside the write lock holds up appends until it is killed, not after.

    Its record was published before its hook ran, so it stays.
    """
    path = tmp_path / "log"
    log = LocalLog(path, background_compaction=False)
    try:
        with children(tmp_path) as start:
            child = start("stop-in-lock", path)
            child.wait_for(lambda c: bool(c.said("in-lock")), "the child is inside the lock")
            stat = Path(f"/proc/{child.proc.pid}/stat")
            wait_until(lambda: stat.read_text().split()[2] == "T", what="the child to stop")
            result: list[Any] = []
            appender = threading.Thread(target=lambda: result.append(log.append([(b"k", value_of(b"k"))])))
            appender.start()
            appender.join(timeout=0.5)
            assert appender.is_alive(), "an append went through while another process held the write lock"
            child.kill()
            appender.join(timeout=30)
            assert not appender.is_alive(), "the append still waits after the holder was killed"
        assert result == [[(0, 1)]]
        assert [(k, v) for _, _, k, v in read_everything(log)] == [
            (b"stopped:0", value_of(b"stopped:0")),
            (b"k", value_of(b"k")),
        ]
    finally:
        log.close()


# -- compaction across processes -----------------------------------------------------------------


def _build_dirty_log(path: Path, rounds: int = 40) -> dict[bytes, bytes]:
    """A log of overwritten keys over many small segments; returns the latest value per key."""
    log = LocalLog(path, segment_bytes=2048, background_compaction=False)
    latest: dict[bytes, bytes] = {}
    try:
        for r in range(rounds):
            batch = [(b"key%02d" % i, value_of(b"key%02d" % i, r)) for i in range(12)]
            log.append(batch)
            latest.update(batch)
    finally:
        log.close()
    return latest


def _fold(records: list[tuple[int, int, bytes, bytes | None]]) -> dict[bytes, bytes]:
    state: dict[bytes, bytes] = {}
    for _, _, k, v in records:
        if v is None:
            state.pop(k, None)
        else:
            state[k] = v
    return state


def test_a_process_killed_mid_compaction_leaves_a_working_log(tmp_path: Path) -> None:
    """A compacting child is SIGKILLed at points through its passes; this process reads and writes throughout.

    The next compaction (here) finishes: every key keeps its latest value,
    no ``.cleaned`` or ``.swap`` file is left.
    """
    path = tmp_path / "log"
    latest = _build_dirty_log(path)
    log = LocalLog(path, segment_bytes=2048, background_compaction=False)
    rng = random.Random(7)
    try:
        with children(tmp_path) as start:
            for round_ in range(6):
                child = start("compact", path, "--segment-bytes=2048")
                child.wait_for(lambda c: bool(c.said("ready")), "the compactor is ready")
                deadline = time.monotonic() + rng.uniform(0.0, 0.05)
                # Kill when compaction output appears, or after a short random time.
                directory = path / "0"
                while time.monotonic() < deadline:
                    if any(f.suffix in (".cleaned", ".swap") for f in directory.iterdir()):
                        break
                child.kill()
                assert _fold(read_everything(log)) == latest, f"round {round_}: a live reader saw a wrong log"
                batch = [(b"key%02d" % i, value_of(b"key%02d" % i, 100 + round_)) for i in range(0, 12, 3)]
                log.append(batch)
                latest.update(batch)
                assert _fold(read_everything(log)) == latest
        report = log.compact()
        assert report["segments_after"] <= report["segments_before"]
        assert _fold(read_everything(log)) == latest
        assert not [f for f in (path / "0").iterdir() if f.suffix in (".cleaned", ".swap")]
    finally:
        log.close()
    reopened = LocalLog(path, background_compaction=False)
    try:
        assert _fold(read_everything(reopened)) == latest
    finally:
        reopened.close()


def test_compaction_in_one_process_while_another_appends_and_reads(tmp_path: Path) -> None:
    """Background compaction here, a writer child and a reader child: the reader never sees a wrong record.

    The writer overwrites few keys (so every roll makes the log dirty); the
    reader checks every record it reads. The compactions happen in this
    process, and the log ends with every key's latest value.
    """
    path = tmp_path / "log"
    log = LocalLog(path, segment_bytes=4096, background_compaction=True, min_cleanable_dirty_ratio=0.3)
    try:
        with children(tmp_path) as start:
            reader = start("readcheck", path, "--segment-bytes=4096")
            writer = start("append", path, "--id=1", "--count=1500", "--expect=0", "--segment-bytes=4096")
            # Overwrites from here too, so that the log gets dirty: as many as it
            # takes for a roll here to find it dirty enough (the writer's
            # records are all live, so the share of dirt grows only with these).
            for i in range(20_000):
                key = b"hot%d" % (i % 5)
                log.append([(key, value_of(key, i % 50))])
                if log.last_compaction is not None:
                    break
            writer.join()
            assert log.last_compaction is not None, (
                "20,000 overwrites of 5 keys never made the log dirty enough"
            )
            total = log.end_offsets()[0]
            reader.wait_for(lambda c: bool(c.said("bad")) or len(c.said("seen")) >= total // 500 - 1, "reads")
            assert not reader.said("bad"), reader.said("bad")
        assert log.last_compaction is not None and log.last_compaction["segments_rewritten"] > 0
        records = read_everything(log)
        assert all(check_value(k, v) is None for _, _, k, v in records)
        keys = {k for _, _, k, _ in records}
        assert {b"hot%d" % i for i in range(5)} <= keys
        assert sum(1 for k in keys if k.startswith(b"w1:")) == records_of(0, 1500, 1)
    finally:
        log.close()


# -- counting the dirt once ----------------------------------------------------------------------

#: A child for the tests below: ``MODE PATH SEGMENT_BYTES``, with background compaction.
#: ``count`` opens the log, waits for its cleaner to be idle, prints ``opened <cleaner stats>``,
#: then on a ``count`` line from the parent prints ``counted {"ratios", "cleaner"}`` (after
#: ``dirty_ratio`` of every partition), and on a ``close`` line closes. ``overwrite`` appends
#: records to 20 keys (``hot<i>``, shared by every child), about 400 a second, until the parent
#: sends a line, printing ``wrote <records> <bytes>`` every 50 records; then waits for its cleaner to be
#: idle, prints ``done {"cleaner", "compacted", "records", "bytes"}`` and closes.
_CLEANER_CHILD = f"""
import json, sys, threading, time
sys.path.insert(0, {str(CHILD.parent)!r})
from _process_child import emit, value_of
from kvlog.log.local import FRAME_OVERHEAD, LocalLog

mode, path, segment_bytes = sys.argv[1], sys.argv[2], int(sys.argv[3])
log = LocalLog(
    path, segment_bytes=segment_bytes, fsync="never", background_compaction=True, min_cleanable_dirty_ratio=0.3
)

def wait_idle():
    deadline = time.monotonic() + 60
    while True:
        cleaner = log.stats()["cleaner"]
        if cleaner["handled"] == cleaner["wakeups"] or time.monotonic() > deadline:
            return cleaner
        time.sleep(0.005)  # the polling interval of this deadline-bounded wait (a child cannot import wait_until)

if mode == "count":
    emit("opened " + json.dumps(wait_idle()))
    assert sys.stdin.readline().strip() == "count"
    ratios = [log.dirty_ratio(p) for p in range(log.partitions)]
    emit("counted " + json.dumps({{"ratios": ratios, "cleaner": log.stats()["cleaner"]}}))
    assert sys.stdin.readline().strip() == "close"
else:
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.readline(), stop.set()), daemon=True).start()
    records = appended = 0
    while not stop.is_set():
        key = b"hot%d" % (records % 20)
        value = value_of(key, 40 + records % 7)
        log.append([(key, value)])
        records += 1
        appended += FRAME_OVERHEAD + len(key) + len(value)
        if records % 50 == 0:
            emit(f"wrote {{records}} {{appended}}")
        time.sleep(0.002)  # a steady writer: three flat-out ones would outrun any compaction on two cores
    done = {{"cleaner": wait_idle(), "compacted": log.last_compaction, "records": records, "bytes": appended}}
    emit("done " + json.dumps(done))
log.close()
emit("closed")
"""


def _uncounted(path: Path) -> int:
    """Records the samples saved in ``cleaner-sample.json`` have not counted, over every partition."""
    state = json.loads((path / "cleaner-sample.json").read_bytes())
    end = read_head(path).entries
    total = 0
    for p, entry in state["partitions"].items():
        total += sum(high - low for low, high in entry["pending"])
        total += end[int(p)][0] - entry["through"]
    return total


def test_processes_opening_a_log_others_wrote_count_its_dirt_once(tmp_path: Path) -> None:
    """Four processes open a log whose saved dirt sample lacks records other processes wrote.

    None of them reads the log at open (its cleaner is not woken for what a
    sample lacks). Asked for the dirty ratio at once, one of them counts the
    records the saved sample lacks, exactly those, and saves its sample; the
    others take that one up and count nothing. All give the same ratio, the
    one an instance that counts everything itself finds.
    """
    path = tmp_path / "log"
    segment_bytes = 4096
    here = LocalLog(path, partitions=2, segment_bytes=segment_bytes, background_compaction=False)
    try:
        with children(tmp_path) as start:
            # A writer that stays open (reading) until this process wrote too: its sample,
            # which it saves when it closes, has not counted what this process appended.
            records = records_of(0, 150, 1)
            writer = start(
                "append",
                path,
                "--id=1",
                "--count=150",
                f"--expect={records + 200}",
                "--partitions=2",
                f"--segment-bytes={segment_bytes}",
            )
            writer.wait_for(lambda c: bool(c.said("appended")), "the writer's appends")
            for i in range(200):  # 20 keys overwritten: some dirt
                key = b"mine%d" % (i % 20)
                here.append([(key, value_of(key, i % 30))])
            writer.join()
        # This close does not save over the writer's sample (the writer saved since this
        # instance read the file): that one lacks only the 200 records appended here, this
        # one's all the writer's.
        here.close()
        backlog = _uncounted(path)
        assert backlog == 200, "a close saved a sample over one that had counted more"
        with children(tmp_path) as start:
            openers = [start("count", path, str(segment_bytes), script=_CLEANER_CHILD) for _ in range(4)]
            for child in openers:
                child.wait_for(lambda c: bool(c.said("opened")), "the open")
            for child in openers:
                opened = json.loads(child.said("opened")[0])
                assert opened["records_counted"] == 0, f"an open read the log to count its dirt: {opened}"
                assert opened["wakeups"] == 0, (
                    f"an open woke the cleaner of a log that is not dirty: {opened}"
                )
            for child in openers:
                child.tell("count")
            for child in openers:
                child.wait_for(lambda c: bool(c.said("counted")), "the dirty ratio")
            counted = [json.loads(child.said("counted")[0]) for child in openers]
            for child in openers:
                child.tell("close")
            for child in openers:
                child.join()
    finally:
        here.close()
    # Each partition is counted by the first process to ask for its ratio, and by no other:
    # one or two processes count (the one that counted partition 0 may not be first for 1).
    counts = sorted(c["cleaner"]["records_counted"] for c in counted)
    assert sum(counts) == backlog, f"records counted more than once (or not at all): {counts} for {backlog}"
    assert counts[:2] == [0, 0], f"more processes counted than partitions need: {counts}"
    for c in counted:
        assert c["cleaner"]["records_counted"] > 0 or c["cleaner"]["samples_adopted"] == 2, c
    ratios = {tuple(c["ratios"]) for c in counted}
    assert len(ratios) == 1, f"the processes disagree on the dirty ratio: {ratios}"
    (path / "cleaner-sample.json").unlink()
    alone = LocalLog(path, background_compaction=False)
    try:
        exact = [alone.dirty_ratio(p) for p in range(2)]
        assert alone.stats()["cleaner"]["records_counted"] == sum(alone.end_offsets().values())
    finally:
        alone.close()
    assert max(exact) > 0
    assert list(ratios.pop()) == pytest.approx(exact, abs=1e-9)


def test_background_compaction_keeps_the_log_small_while_several_processes_overwrite(tmp_path: Path) -> None:
    """Three processes overwrite the same 20 keys with background compaction on; the log stays small.

    The cleaner of whichever process rolls a segment counts the dirt (taking
    up what another process counted before) and compacts. The log shrinks to
    a small part of what was appended while they write, it holds every key's
    latest value, and about one process counted each record, not each.
    """
    path = tmp_path / "log"
    segment_bytes = 4096
    LocalLog(path, segment_bytes=segment_bytes, background_compaction=False).close()

    def log_bytes() -> int:
        total = 0
        for f in (path / "0").iterdir():
            with contextlib.suppress(FileNotFoundError):  # (compaction removes segments meanwhile)
                total += f.stat().st_size if f.suffix == ".log" else 0
        return total

    with children(tmp_path) as start:
        writers = [start("overwrite", path, str(segment_bytes), script=_CLEANER_CHILD) for _ in range(3)]

        def shrunk() -> bool:
            wrote = [
                [int(x) for x in child.said("wrote")[-1].split()] for child in writers if child.said("wrote")
            ]
            # Every writer wrote a while (dozens of rolls each), and the log is a small part of it.
            return (
                len(wrote) == len(writers)
                and min(records for records, _ in wrote) >= 1000
                and log_bytes() < sum(appended for _, appended in wrote) / 4
            )

        wait_until(shrunk, timeout=60, interval=0.01, what="background compaction to shrink the log")
        for child in writers:
            child.tell("stop")
        for child in writers:
            child.join()
    done = [json.loads(child.said("done")[0]) for child in writers]
    compacted = [d["compacted"] for d in done if d["compacted"] is not None]
    assert compacted and sum(c["segments_rewritten"] for c in compacted) > 0
    records = sum(d["records"] for d in done)
    # A process counts what the others appended since the sample it took up was saved.
    # Each process counting them itself would count each record about twice.
    counted = sum(d["cleaner"]["records_counted"] for d in done)
    assert counted <= records, f"{counted} records counted for {records} appended"
    log = LocalLog(path, background_compaction=False)
    try:
        rows = read_everything(log)
    finally:
        log.close()
    assert all(check_value(k, v) is None for _, _, k, v in rows)
    assert {k for _, _, k, _ in rows} == {b"hot%d" % i for i in range(20)}
    assert len(rows) < records / 4


# -- reopening ------------------------------------------------------------------------------


def test_reopen_after_every_process_exited_uses_the_head(tmp_path: Path) -> None:
    """The last close marks the head clean; the reopen scans nothing; the layout before the head opens too."""
    path = tmp_path / "log"
    with children(tmp_path) as start:
        procs = [
            start("append", path, f"--id={w}", "--count=50", "--partitions=2", "--fsync=always")
            for w in (1, 2)
        ]
        for child in procs:
            child.join()
    head = read_head(path)
    assert head.clean and not head.writing
    log = LocalLog(path, background_compaction=False)
    try:
        assert log.recovery == {0: [], 1: []}
        # No scan: a scan indexes the active segment as it reads it; a trusted open indexes lazily.
        assert all(log._segments[p][-1].index_offsets == [] for p in (0, 1))
        before = read_everything(log)
        assert len(before) == records_of(0, 50, 1) + records_of(0, 50, 2)
    finally:
        log.close()
    # The layout before the head: a clean-shutdown marker and no head.
    to_old_layout(path)
    log = LocalLog(path, background_compaction=False)
    try:
        assert log.recovery == {0: [], 1: []}
        assert all(log._segments[p][-1].index_offsets == [] for p in (0, 1))  # the marker was trusted
        assert not (path / "clean-shutdown.json").exists()
        assert read_everything(log) == before
        log.append([(b"after", value_of(b"after"))])
    finally:
        log.close()
    assert read_head(path).clean
    # ... and without the marker (a crash of the old code): a scan, which finds nothing to cut.
    to_old_layout(path, marker=False)
    log = LocalLog(path, background_compaction=False)
    try:
        assert log.recovery == {0: [], 1: []}
        assert len(read_everything(log)) == len(before) + 1
    finally:
        log.close()


def test_fork_child_does_not_keep_the_write_lock(tmp_path: Path) -> None:
    """A child forked while the parent holds the write lock does not keep it after the parent dies.

    The parent here is itself a child process that forks (in its append hook,
    so inside the lock), and is then SIGKILLed; its forked child lives on.
    """
    path = tmp_path / "log"
    LocalLog(path, background_compaction=False).close()
    script = f"""
import os, sys, time, signal
sys.path.insert(0, {str(CHILD.parent)!r})
from kvlog.log.local import LocalLog
log = LocalLog({str(path)!r}, background_compaction=False)
def hook(before, positions, after):
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(ready_r)
        os.write(ready_w, b"x")  # alive, and past the at-fork handlers
        signal.pause()
        os._exit(0)
    os.close(ready_w)
    os.read(ready_r, 1)
    # One line from one process: the child never writes to stdout.
    print(os.getpid(), pid, flush=True)
    signal.pause()
log.append([(b"k", b"v")], on_appended=hook)
"""
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    parent_pid, forked_pid = map(int, line.split())
    pids = {"parent": parent_pid, "forked": forked_pid}
    try:
        os.kill(pids["parent"], signal.SIGKILL)
        proc.wait(timeout=30)
        log = LocalLog(path, background_compaction=False)
        try:
            result: list[Any] = []
            appender = threading.Thread(target=lambda: result.append(log.append([(b"k2", b"v2")])))
            appender.start()
            appender.join(timeout=30)
            assert not appender.is_alive(), "the forked child kept the dead parent's write lock"
            assert result == [[(0, 1)]]
        finally:
            log.close()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pids["forked"], signal.SIGKILL)
        proc.stdout.close()
        proc.wait(timeout=30)
