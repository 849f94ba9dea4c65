"""Crash tests of the embedded log: real child processes, killed with SIGKILL at many points.

The children are ``tests/_crash_child.py``. A writer reports every write it
starts (``begin``) and every write that returned (``ack``) on a pipe; the
parent kills it after a number of acknowledgements, while it opens, or while
the frames of a multi-megabyte batch are being written (the parent watches the
segment file grow), reopens the data directory and checks:

- every acknowledged write is there, and nothing else except the one write
  that was in flight, which is, per partition, wholly there or wholly absent:
  ``LocalLog.append()`` writes one batch per partition, whose last frame has
  the batch-end flag, and recovery cuts a batch a crash tore back to its start,
  so a batch is never partly there (a prefix of it fails the test), a record
  never half there, a value never garbled. Atomicity is per partition only: an
  ``update()`` spanning partitions may be there in some and absent in others;
- ``LocalLog.recovery`` reports exactly the cut the kill calls for: the
  head (read here with this suite's own parser of its documented layout)
  published sizes that end at a whole batch; a kill outside an append leaves
  nothing past them, and a kill inside one (the head's writing flag is set)
  leaves bytes past them, which the reopen cuts whole, and the log is
  appendable;
- the cache equals the log folded (read back with a ``LocalReader``), and a
  cache rebuilt from scratch equals the model.

A re-warming child is killed at several points of the replay: a cold open's
cache is then the log folded up to its checkpoint, and reopening resumes from
it; a ``rewarm()`` builds beside the live cache, which the kill leaves whole.

The crash summary is printed to the terminal at the end of the module (even
without ``-s``) and appended to the file named by ``KVLOG_CRASH_SUMMARY``.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lmdb
import msgpack
import pytest
from _crash_child import MAX_BIG_RECORDS, TOMBSTONE, op_records
from _head import read_head
from conftest import TESTS
from ondisk import active_segments, cache_contents, cache_env_dir, expected_reason, fold_log, torn_tail

from kvlog import KVLog
from kvlog.codec import encode_key, get_codec
from kvlog.log.local import LocalLog
from kvlog.log.local.recovery import UNPUBLISHED_REASON
from kvlog.store import UPDATE_BATCH

CHILD_SCRIPT = TESTS / "_crash_child.py"
MSGPACK = get_codec("msgpack")

#: What the crash tests saw, for the summary printed at the end of the module.
SUMMARY: Counter[str] = Counter()


@pytest.fixture(scope="module", autouse=True)
def crash_summary(request: pytest.FixtureRequest) -> Iterator[None]:
    """Print the crash summary once the module's tests ran (to the terminal, bypassing capture)."""
    yield
    if not SUMMARY:
        return
    s = SUMMARY
    line = (
        f"kvlog crash summary: writers: {s['write_rounds']} rounds, {s['write_kills']} SIGKILLs "
        f"({s['kills_after_acks']} after N acks, {s['kills_mid_write']} mid-batch, "
        f"{s['kills_while_opening']} while opening), {s['acked_ops']} acknowledged writes "
        f"({s['acked_records']} records) checked after the kills; in-flight write wholly there "
        f"{s['inflight_present']}, wholly absent {s['inflight_absent']}, there in some partitions and "
        f"absent in others {s['inflight_split']} (per partition: {s['inflight_batches_present']} batches "
        f"whole, {s['inflight_batches_absent']} absent, a partial batch fails the test); "
        f"{s['torn_tails']} tails cut at the reopen ({s['torn_bytes']} bytes past the published end), "
        f"{s['compactions_interrupted']} interrupted compactions finished | "
        f"re-warm: {s['rewarm_kills']} SIGKILLs mid-replay, {s['rewarm_prefixes']} caches checked to be "
        f"the log folded up to their checkpoint, {s['rewarm_resumed']} resumed from the checkpoint "
        f"(of {s['rewarm_resumable']} resumable) | "
        f"processes: {s['lock_holders_killed']} holder SIGKILLed, opened after it {s['lock_taken_over']}"
    )
    print(line)
    capture = request.config.pluginmanager.getplugin("capturemanager")
    reporter = request.config.pluginmanager.getplugin("terminalreporter")
    if reporter is not None:
        with capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext():
            reporter.write("\n")
            reporter.write_line(line)
    target = os.environ.get("KVLOG_CRASH_SUMMARY")
    if target:
        with open(target, "a", encoding="utf-8") as f:
            f.write(line + "\n")


# -- child processes ---------------------------------------------------------------


class Child:
    """A ``_crash_child.py`` process in its own process group; its stdout lines are parsed as they come."""

    def __init__(self, tmp: Path, mode: str, path: Path, *args: str) -> None:
        self._stderr_path = tmp / f"child-{time.monotonic_ns()}.stderr"
        with open(self._stderr_path, "wb") as stderr:
            self.proc = subprocess.Popen(
                [sys.executable, str(CHILD_SCRIPT), mode, str(path), *args],
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
                start_new_session=True,  # its own group: the kill takes any helper with it
            )
        self.cond = threading.Condition()
        self.lines = 0
        self.eof = False
        self.opening = False
        self.ready_pid: int | None = None
        self.ops: dict[int, dict[str, Any]] = {}
        self.acked: list[int] = []
        self.last_begin: dict[str, Any] | None = None
        self.progress: list[dict[str, Any]] = []
        self.done = False
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            word, _, rest = raw.rstrip("\n").partition(" ")
            with self.cond:
                self.lines += 1
                if word == "opening":
                    self.opening = True
                elif word == "ready":
                    self.ready_pid = int(rest)
                elif word == "begin":
                    op = json.loads(rest)
                    self.ops[op["seq"]] = op
                    self.last_begin = op
                elif word == "ack":
                    self.acked.append(int(rest))
                elif word == "progress":
                    self.progress.append(json.loads(rest))
                elif word == "done":
                    self.done = True
                self.cond.notify_all()
        with self.cond:
            self.eof = True
            self.cond.notify_all()

    def stderr(self) -> str:
        return self._stderr_path.read_text(errors="replace")[-3000:]

    def wait_for(self, predicate: Callable[[Child], bool], what: str, timeout: float = 60.0) -> None:
        """Wait (with a deadline) until ``predicate(self)`` holds; fail if the child exits first."""
        with self.cond:
            self.cond.wait_for(lambda: predicate(self) or self.eof, timeout)
            if predicate(self):
                return
            state = "exited" if self.eof else f"still running after {timeout}s"
        pytest.fail(f"child {state} before {what}; its stderr:\n{self.stderr()}")

    def kill(self) -> None:
        """SIGKILL the child's process group and collect everything it said before dying."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=60)
        self._reader.join(timeout=60)
        assert self.proc.stdout is not None
        self.proc.stdout.close()


@contextlib.contextmanager
def child_process(tmp: Path, mode: str, path: Path, *args: str) -> Iterator[Child]:
    child = Child(tmp, mode, path, *args)
    try:
        yield child
    finally:
        child.kill()


# -- writers killed at many points ----------------------------------------------------


@dataclass(frozen=True)
class WriteRound:
    fsync: str
    partitions: int
    segment_bytes: int  # 0: the embedded default (16 MiB)
    kills: int
    seed: int

    def __str__(self) -> str:
        return f"fsync={self.fsync}-p{self.partitions}-seg{self.segment_bytes or 'default'}-{self.kills}kills"

    def open_store(self, path: Path) -> KVLog:
        if self.segment_bytes:
            log = LocalLog(path / "log", fsync=self.fsync, segment_bytes=self.segment_bytes)
            return KVLog(path, log=log, follow=False)
        return KVLog(path, fsync=self.fsync, follow=False)

    def child_args(self, start: int) -> list[str]:
        return [
            f"--start={start}",
            f"--seed={self.seed}",
            f"--fsync={self.fsync}",
            f"--partitions={self.partitions}",
            f"--segment-bytes={self.segment_bytes}",
            "--big-share=0.12",
        ]

    def kill_plan(self) -> list[tuple[str, float]]:
        """Where to kill each child: after N acks (N different each time), mid-batch, or while opening."""
        rng = random.Random(self.seed)
        plan: list[tuple[str, float]] = [("acks", 0), ("mid-write", rng.uniform(0.05, 0.95))]
        ranges = [(1, 3), (4, 15), (16, 60), (61, 150)]
        while len(plan) < self.kills:
            kind = rng.choice(["acks", "acks", "mid-write", "mid-write", "opening"])
            if kind == "acks":
                low, high = ranges[len(plan) % len(ranges)]
                plan.append(("acks", rng.randint(low, high)))
            elif kind == "mid-write":
                plan.append(("mid-write", rng.uniform(0.02, 0.98)))
            else:
                plan.append(("opening", 0))
        return plan[: self.kills]


def segment_bytes_now(log_dir: Path, segments: dict[int, Path]) -> int:
    total = 0
    for path in segments.values():
        with contextlib.suppress(FileNotFoundError):
            total += path.stat().st_size
    return total


def frame_bytes(op: dict[str, Any]) -> int:
    """The bytes the frames of an operation take in the log."""
    total = 0
    for key, value in op_records(op):
        total += 29 + len(encode_key(key)) + (0 if value is TOMBSTONE else len(MSGPACK.encode(value)))
    return total


def kill_mid_write(child: Child, log_dir: Path, fraction: float) -> bool:
    """Kill the child while it writes the frames of its next large batch.

    Waits for the ``begin`` of a large batch, then watches the active segments
    grow and kills once ``fraction`` of the batch's bytes reached the file.
    Returns whether the kill came before the batch was acknowledged.
    """
    child.wait_for(
        lambda c: (
            c.last_begin is not None and c.last_begin["kind"] == "big" and c.last_begin["seq"] not in c.acked
        ),
        "a large batch",
    )
    with child.cond:
        assert child.last_begin is not None
        op = child.last_begin
    segments = active_segments(log_dir)
    start = segment_bytes_now(log_dir, segments)
    threshold = start + fraction * frame_bytes(op)
    deadline = time.monotonic() + 60
    # A deadline-bounded busy wait: the frames of a batch reach the file within milliseconds.
    while segment_bytes_now(log_dir, segments) < threshold:
        if op["seq"] in child.acked or child.eof:
            break
        if time.monotonic() > deadline:
            pytest.fail(f"the segments did not grow past {threshold} bytes; child stderr:\n{child.stderr()}")
    child.kill()
    return op["seq"] not in child.acked


def apply_records(model: dict[str, Any], records: list[tuple[str, Any]]) -> None:
    for key, value in records:
        if value is TOMBSTONE:
            model.pop(key, None)
        else:
            model[key] = value


def in_flight_outcome(
    actual: dict[str, Any], model: dict[str, Any], op: dict[str, Any], partition_for: Callable[[bytes], int]
) -> tuple[dict[int, str], dict[str, Any]]:
    """Which part of the in-flight write is there: per partition, all of its records or none.

    ``LocalLog.append()`` writes one batch per partition, and recovery cuts a
    batch a crash tore back to its start: per partition, the write is wholly
    there or wholly absent, and a prefix of a batch (some of its records there,
    the rest not) fails the test. Atomicity is per partition only: an
    ``update()`` whose records span several partitions is several batches,
    written one partition after the other, so a kill between them leaves the
    write there in some partitions and absent in others (as with Kafka, whose
    producer batches are per partition too).

    Returns:
        ``({partition: "present" | "absent"}, the model with the present batches applied)``.
    """
    by_partition: dict[int, list[tuple[str, Any]]] = {}
    for key, value in op_records(op):
        by_partition.setdefault(partition_for(encode_key(key)), []).append((key, value))
    expected = dict(model)
    outcomes: dict[int, str] = {}
    for p, records in sorted(by_partition.items()):
        # Every value names its write (and a delete is only written for a key that is there),
        # so a record cannot be both there and absent.
        there = [
            key not in actual if value is TOMBSTONE else actual.get(key, TOMBSTONE) == value
            for key, value in records
        ]
        absent = [actual.get(key, TOMBSTONE) == model.get(key, TOMBSTONE) for key, _ in records]
        if all(there):
            outcomes[p] = "present"
            apply_records(expected, records)
        elif all(absent):
            outcomes[p] = "absent"
        else:
            not_there = [key for (key, _), t in zip(records, there, strict=True) if not t]
            neither = [key for (key, _), t, a in zip(records, there, absent, strict=True) if not (t or a)]
            pytest.fail(
                f"write {op['seq']} ({op['kind']}) was in flight at the kill and partition {p} holds "
                f"{sum(there)} of the {len(records)} records of its batch: a torn batch was not cut whole "
                f"(not there: {not_there[:5]}; neither written nor as before: {neither[:5]})"
            )
    return outcomes, expected


def expected_recovery(tmp: Path, log_dir: Path) -> dict[int, list[dict[str, Any]]]:
    """What the reopen after a kill must report, per partition, from the files the kill left.

    With a head (every kill after the first open created it): the head's sizes
    are trusted (same boot), so a kill outside an append leaves nothing to
    cut (zeros preallocated past the published size are not records), and
    one inside an append (the head's writing flag is set) leaves
    bytes past the published size, which are cut whole, whatever they hold
    (a torn frame, or a whole batch never acknowledged). What the head
    published always ends at a whole batch. A kill during a roll, after the
    new segment file was created but before its magic was written, leaves a
    segment past the head's shorter than the magic: inside an append the
    reopen removes it with the rest of what the append left; after one it
    writes the magic and reports it. Without a head (a kill while the very first open
    created the log), the active segments are scanned.
    """
    if not (log_dir / "head").exists():
        wanted: dict[int, list[dict[str, Any]]] = {}
        for p, segment in active_segments(log_dir).items():
            tail = torn_tail(segment)
            if tail.cut or tail.torn_magic:
                wanted[p] = [
                    {
                        "segment": str(segment),
                        "truncated_bytes": tail.cut,
                        "reason": expected_reason(tail),
                        "last_good_offset": tail.last,
                    }
                ]
                SUMMARY["torn_tails"] += 1
                SUMMARY["torn_bytes"] += tail.cut
            else:
                wanted[p] = []
        return wanted
    head = read_head(log_dir)
    wanted = {}
    for p, (end, base, size) in enumerate(head.entries):
        segment = log_dir / str(p) / f"{base:020d}.log"
        data = segment.read_bytes()
        published = tmp / "published-prefix.log"
        published.write_bytes(data[:size])
        whole = torn_tail(published)
        assert whole.cut == 0 and not whole.torn_magic, (
            f"the head published a torn tail of {segment}: {whole}"
        )
        assert (whole.last if whole.last is not None else base - 1) == end - 1, (
            f"the head's end offset {end} is not past the last record of {segment}"
        )
        if len(data) > size and not head.writing:
            # Space preallocated for appends (fsync="always"): zeros, never records, and trusted as such.
            assert data.count(0, size) == len(data) - size, (
                f"{segment} holds bytes other than zeros past the published size, yet no append was in flight"
            )
            wanted[p] = []
        elif len(data) > size:
            wanted[p] = [
                {
                    "segment": str(segment),
                    "truncated_bytes": len(data) - size,
                    "reason": UNPUBLISHED_REASON,
                    "last_good_offset": end - 1 if end > base else None,
                }
            ]
            SUMMARY["torn_tails"] += 1
            SUMMARY["torn_bytes"] += len(data) - size
        else:
            assert len(data) == size, f"{segment} is shorter than the head published"
            wanted[p] = []
        newer = sorted(
            f for f in segment.parent.glob("*.log") if f.name[:-4].isdigit() and int(f.name[:-4]) > base
        )
        assert len(newer) <= 1, f"more than one segment past the head's in partition {p}: {newer}"
        for rolled_to in newer:  # a roll the kill interrupted: the head does not name it yet
            tail = torn_tail(rolled_to)
            # Inside an append (the writing flag set), the reopen removes it unreported, with
            # what else the append left unpublished; after one (append_one rolls after it
            # cleared the flag) it is the active segment, and a torn one is reported.
            if tail.torn_magic and not head.writing:
                assert wanted[p] == [], f"a torn roll beside a torn tail in partition {p}"
                wanted[p] = [
                    {
                        "segment": str(rolled_to),
                        "truncated_bytes": tail.cut,
                        "reason": expected_reason(tail),
                        "last_good_offset": None,
                    }
                ]
                SUMMARY["torn_tails"] += 1
    return wanted


def check_after_kill(
    rnd: WriteRound, path: Path, child: Child, model: dict[str, Any], kill_no: int, seq: int
) -> tuple[dict[str, Any], int]:
    """Reopen after a kill and check everything the module docstring promises.

    Returns:
        The new model and the next sequence number to write.
    """
    log_dir = path / "log"
    with child.cond:
        ops, acked = dict(child.ops), list(child.acked)
    in_flight = sorted(set(ops) - set(acked))
    assert len(in_flight) <= 1, f"more than one write in flight: {in_flight}"
    for done in acked:
        apply_records(model, op_records(ops[done]))
    SUMMARY["acked_ops"] += len(acked)
    SUMMARY["acked_records"] += sum(len(op_records(ops[done])) for done in acked)

    leftovers = [f for d in log_dir.glob("[0-9]*") for f in [*d.glob("*.swap"), *d.glob("*.cleaned")]]
    SUMMARY["compactions_interrupted"] += bool(leftovers)
    wanted = expected_recovery(path.parent, log_dir)

    kv = rnd.open_store(path)
    try:
        recovery = kv.log.recovery  # type: ignore[attr-defined]
        for p, entries in wanted.items():
            assert recovery[p] == entries, (
                f"partition {p}: expected the recovery {entries}, got {recovery[p]}"
            )
        actual = dict(kv.scan())
        if in_flight:
            outcomes, expected = in_flight_outcome(actual, model, ops[in_flight[0]], kv.log.partition_for)  # type: ignore[attr-defined]
            kinds = set(outcomes.values())
            SUMMARY[f"inflight_{kinds.pop() if len(kinds) == 1 else 'split'}"] += 1
            for outcome in outcomes.values():
                SUMMARY[f"inflight_batches_{outcome}"] += 1
        else:
            expected = model
        missing = sorted(k for k in expected if k not in actual)[:5]
        extra = sorted(k for k in actual if k not in expected)[:5]
        wrong = sorted(k for k in expected if k in actual and actual[k] != expected[k])[:5]
        assert actual == expected, (
            f"kill {kill_no} of round {rnd}: missing {missing}, unexpected {extra}, wrong values {wrong}; "
            f"{len(acked)} acks, in flight {in_flight}"
        )
        model = expected
        # The log is appendable after the recovery, and the append is read back.
        end_before = kv.log.end_offsets()
        key = f"parent:{kill_no}"
        kv[key] = {"kill": kill_no}
        model[key] = {"kill": kill_no}
        assert kv[key] == {"kill": kill_no}
        assert sum(kv.log.end_offsets().values()) == sum(end_before.values()) + 1
    finally:
        kv.close()

    for segment in active_segments(log_dir).values():
        tail = torn_tail(segment)
        assert tail.cut == 0 and not tail.torn_magic, (
            f"{segment} still has a torn tail after the repair and a clean close: {tail}"
        )
    folded, end, _ = fold_log(log_dir)
    cached, checkpoint, _ = cache_contents(path / "cache")
    assert checkpoint == end
    assert cached == folded, "the cache is not the log folded"
    assert {k.decode(): MSGPACK.decode(v) for k, v in folded.items()} == model
    return model, max([seq - 1, *ops]) + 1


WRITE_ROUNDS = [
    pytest.param(WriteRound("always", 1, 0, kills=12, seed=11), id="always-1p"),
    pytest.param(WriteRound("always", 2, 64 * 1024, kills=12, seed=12), id="always-2p-small-segments"),
    pytest.param(WriteRound("never", 1, 0, kills=10, seed=13), id="never-1p"),
    pytest.param(
        WriteRound("always", 3, 256 * 1024, kills=40, seed=14), id="always-3p-many", marks=pytest.mark.slow
    ),
    pytest.param(
        WriteRound("never", 2, 64 * 1024, kills=40, seed=15), id="never-2p-many", marks=pytest.mark.slow
    ),
    pytest.param(WriteRound("interval", 1, 0, kills=25, seed=16), id="interval-1p", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("rnd", WRITE_ROUNDS)
def test_sigkilled_writer_loses_no_acknowledged_write(tmp_path: Path, rnd: WriteRound) -> None:
    """Every write that returned survives a SIGKILL; the one in flight is whole or absent, per partition."""
    # Each write of the child is one LocalLog.append() call (KVLog.update() splits only above
    # UPDATE_BATCH records), so it is one batch per partition.
    assert MAX_BIG_RECORDS <= UPDATE_BATCH
    path = tmp_path / "data"
    model: dict[str, Any] = {}
    seq = 0
    SUMMARY["write_rounds"] += 1
    for kill_no, (how, amount) in enumerate(rnd.kill_plan()):
        with child_process(tmp_path, "write", path, *rnd.child_args(seq)) as child:
            if how == "opening":
                child.wait_for(lambda c: c.opening, "it starts opening the store")
                child.kill()
                SUMMARY["kills_while_opening"] += 1
            elif how == "acks":
                child.wait_for(
                    lambda c, n=int(amount): len(c.acked) >= n and c.ready_pid is not None, f"{amount} acks"
                )
                child.kill()
                SUMMARY["kills_after_acks"] += 1
            else:
                child.wait_for(lambda c: c.ready_pid is not None, "it is ready")
                mid = kill_mid_write(child, path / "log", amount)
                SUMMARY["kills_mid_write" if mid else "kills_after_acks"] += 1
        SUMMARY["write_kills"] += 1
        model, seq = check_after_kill(rnd, path, child, model, kill_no, seq)
    # Finally the cache is thrown away: a replay of the log from scratch gives the same store.
    shutil.rmtree(path / "cache")
    kv = rnd.open_store(path)
    try:
        assert kv.stats()["open_replay"]["mode"] == "cold"
        assert dict(kv.scan()) == model
    finally:
        kv.close()


# -- re-warming killed mid-replay --------------------------------------------------------

REWARM_RECORDS = 200_000


@pytest.fixture(scope="module")
def rewarm_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data directory with 200k keys (plus overwrites and deletes) over 2 partitions, compacted, cache warm."""
    path = tmp_path_factory.mktemp("rewarm") / "data"
    local = LocalLog(path / "log", partitions=2, segment_bytes=4 * 1024 * 1024, background_compaction=False)
    encode = MSGPACK.encode
    batch: list[tuple[bytes, bytes | None]] = []
    for i in range(REWARM_RECORDS):
        batch.append((b"r%06d" % i, encode([i, "x" * (i % 50)])))
        if i % 10 == 0:
            batch.append((b"r%06d" % (i // 2), encode([i, "overwritten"])))
        if i % 25 == 0 and i:
            batch.append((b"r%06d" % (i - 7), None))
        if len(batch) >= 10_000:
            local.append(batch)
            batch = []
    local.append(batch)
    local.compact()  # so that no background compaction runs in the tests (dirty ratio 0)
    local.close()
    kv = KVLog(path, follow=False)  # the first, cold replay builds the cache
    kv.close()
    return path


def kill_when_written(child: Child, path: Path) -> None:
    """Wait (busily, with a deadline) until ``path`` is written to, then kill the child at once."""

    def signature() -> tuple[int, int]:
        st = path.stat()
        return st.st_size, st.st_mtime_ns

    before = signature()
    deadline = time.monotonic() + 60
    while signature() == before and not child.eof:
        if time.monotonic() > deadline:
            pytest.fail(f"{path} was not written to; child stderr:\n{child.stderr()}")
    child.kill()


def replayed_env_dir(cache_dir: Path) -> Path:
    """The LMDB environment a replay writes: the newest generation (a rewarm's, beside the live one)."""
    return max(cache_dir.glob("gen-*"))


def replayed_checkpoint(env_dir: Path) -> dict[int, int]:
    """The checkpoint of the LMDB environment at ``env_dir``, read in this process (LMDB allows it)."""
    for _ in range(10):
        try:
            env = lmdb.open(str(env_dir), max_dbs=4, readonly=True)
            try:
                with env.begin(db=env.open_db(b"meta")) as txn:
                    raw = txn.get(b"checkpoint")
            finally:
                env.close()
        except lmdb.MapResizedError:
            continue  # the replaying process grew the map meanwhile: open it again at the new size
        return {} if raw is None else dict(msgpack.unpackb(raw, strict_map_key=False))
    pytest.fail(f"the map of {env_dir} kept growing under every read")


def kill_when_checkpoint_moves(child: Child, cache_dir: Path) -> None:
    """Read the replayed generation's checkpoint from this process and kill the child once it moves."""
    env_dir = replayed_env_dir(cache_dir)
    before = replayed_checkpoint(env_dir)
    deadline = time.monotonic() + 60
    while replayed_checkpoint(env_dir) == before and not child.eof:
        if time.monotonic() > deadline:
            pytest.fail(f"the checkpoint did not move from {before}; child stderr:\n{child.stderr()}")
    child.kill()


def check_replay_kill(
    path: Path, full: dict[bytes, bytes], resume_problems: list[str], label: str, how: str
) -> None:
    """After a kill mid-replay: the cache is a prefix of the log, and reopening resumes from it.

    A killed ``rewarm()`` leaves the live cache whole (the old generation, or
    the new one if it was switched to), and the next open deletes the partial
    generation it was building.
    """
    cached, checkpoint, identity = cache_contents(path / "cache")
    assert sorted((path / "cache").glob("gen-*")) == [cache_env_dir(path / "cache")], (
        f"{label}: a generation other than the live one is left after an open"
    )
    if how == "rewarm":
        assert cached == full, f"{label}: the live cache is not whole after a rewarm was killed"
    prefix, end, after = fold_log(path / "log", upto=checkpoint)
    SUMMARY["rewarm_prefixes"] += 1
    assert cached == prefix, (
        f"{label}: the cache is not the log folded up to its checkpoint {checkpoint} "
        f"({len(cached)} entries, the prefix has {len(prefix)})"
    )
    if checkpoint:
        assert identity is not None and identity["kind"] == "local"
    kv = KVLog(path, follow=False)
    try:
        opened = kv.stats()["open_replay"]
        assert kv.stats()["checkpoint"] == end
    finally:
        kv.close()
    cached_after, checkpoint_after, _ = cache_contents(path / "cache")
    assert checkpoint_after == end
    assert cached_after == full, f"{label}: the reopened cache is not the whole log folded"
    if checkpoint:
        SUMMARY["rewarm_resumable"] += 1
        wanted = {"mode": "warm", "rebuild_reason": None, "records": sum(after.values())}
        got = {k: opened[k] for k in wanted}
        if got == wanted:
            SUMMARY["rewarm_resumed"] += 1
        else:
            resume_problems.append(
                f"{label}: checkpoint {checkpoint} of end {end}: reopening should resume ({wanted}), got {got}"
            )


@pytest.mark.parametrize("how", ["rewarm", "cold-open"])
def test_sigkilled_replay_leaves_a_prefix_that_the_next_open_resumes(
    tmp_path: Path, rewarm_source: Path, how: str
) -> None:
    """A re-warm (``kv.rewarm()``, or an open after the cache was deleted) killed at several points."""
    path = tmp_path / "data"
    shutil.copytree(rewarm_source, path)
    full, end, _ = fold_log(path / "log")
    assert sum(end.values()) > REWARM_RECORDS
    resume_problems: list[str] = []
    # After the k-th progress report, kill at once (the replay is reading its k-th batch), as
    # soon as data.mdb is written to (the batch is being committed), or as soon as another
    # process sees the checkpoint move (the batch was just committed).
    plan = [
        ("report", 1),
        ("write", 1),
        ("checkpoint", 1),
        ("report", 2),
        ("write", 2),
        ("checkpoint", 3),
        ("write", 3),
    ]
    for how_kill, k in plan:
        if how == "cold-open":
            shutil.rmtree(path / "cache")
        mode = "rewarm" if how == "rewarm" else "open"
        with child_process(tmp_path, mode, path) as child:
            child.wait_for(lambda c, k=k: len(c.progress) >= k or c.done, f"progress report {k}")
            if how_kill == "write":
                kill_when_written(child, replayed_env_dir(path / "cache") / "data.mdb")
            elif how_kill == "checkpoint":
                kill_when_checkpoint_moves(child, path / "cache")
            child.kill()
            finished = child.done
        SUMMARY["rewarm_kills"] += not finished
        check_replay_kill(path, full, resume_problems, f"{how} killed at the {how_kill} of batch {k}", how)
    assert not resume_problems, "an interrupted replay was not resumed:\n" + "\n".join(resume_problems)


# -- many processes --------------------------------------------------------------------


def test_a_second_process_opens_beside_a_holder_and_a_sigkill_blocks_nothing(tmp_path: Path) -> None:
    """A log held open by another process opens here too (no lock is held for the life of a log).

    Records appended here while the holder is open are there after the
    holder is SIGKILLed, and the store opens and writes after it.
    """
    path = tmp_path / "data"
    with child_process(tmp_path, "hold", path) as holder:
        holder.wait_for(lambda c: c.ready_pid is not None, "the holder is ready")
        local = LocalLog(path / "log", background_compaction=False)
        try:
            assert local.append([(b"beside", b"the holder")]) == [(0, 0)]
        finally:
            local.close()
        holder.kill()
    SUMMARY["lock_holders_killed"] += 1
    kv = KVLog(path)
    try:
        assert kv.log.recovery == {0: []}  # type: ignore[attr-defined]
        kv["after"] = "the holder died"
        assert kv.log.end_offsets() == {0: 2}
    finally:
        kv.close()
    SUMMARY["lock_taken_over"] += 1
