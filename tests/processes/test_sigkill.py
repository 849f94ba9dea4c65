"""SIGKILL one of several processes sharing a data directory, over and over; the others never notice.

Every scenario runs the same company of survivors on one data directory: two
writer processes (``w1-`` single puts, ``w2-`` batches of five) and a reader
that reads every key over and over and reports any value that went back in
time or any key that vanished. Each round starts a victim process, lets it
get somewhere, and SIGKILLs it:

(a) while it writes in a loop, at random points, half of them while it holds
    the log's write lock (stopped with SIGSTOP first, so that the lock is
    known to be held at the kill);
(b) stopped (SIGSTOP) in the middle of a large ``update()`` batch or of a
    ``kvlog load`` of a big file, holding the write lock; the reader must keep
    reading while it is stopped;
(c) while it holds the cache's replay lock, replaying thousands of records
    that were appended but never applied, or in the middle of a rewarm;
(d) in the middle of a compaction of a log with many superseded records:
    anywhere in the pass, while it writes a rewritten segment, or between
    the commit of a rewritten segment and its move into place.

After every kill: the survivors write and read again within a bound (no
process waits on the dead one); the cache equals the log folded up to its
checkpoint; after a ``sync()`` it equals the whole log folded; and every
write any process saw return (victims included) is in it. The survivors
report each write as ``begin``/``ack`` lines (see _proc_child.py), so what
was acknowledged before a kill is known exactly.

A last test pins what the survivors of (c) should see: writes queued behind
a process killed while it held the replay lock all return within half a
second of the kill.

``pytest tests/processes/test_sigkill.py -v -s`` prints one summary line per
scenario (``sigkill <scenario>: N kills, M acknowledged writes checked, 0
lost``).
"""

from __future__ import annotations

import json
import os
import random
import signal
import struct
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from proc_helpers import (
    PATIENCE,
    POLL_SECONDS,
    Acks,
    Child,
    Children,
    check_cache_is,
    check_cache_is_log_prefix,
    clean_env,
    fold,
    lock_holders,
    lock_waiters,
    replay_left_behind,
    wait_holding,
)

#: Rounds (kills) per scenario.
ROUNDS = 20
#: Tries per round to land the kill where the scenario wants it (the victim may finish first).
ATTEMPTS = 10
#: Seconds within which every survivor must have written and read again after a
#: kill. A survivor that waited on the dead process would wait forever; the time
#: it really takes is in the summary line (tens of milliseconds, when no process
#: holds the replay lock while it waits for records: see the last test here,
#: which bounds that case tightly).
RECOVERY_BOUND = 30.0
#: Keys of the survivors' writers and of the victims' writes.
SURVIVOR_KEYS = 40
VICTIM_KEYS = 30
#: Scenario (b): one update() of this many ~300-byte records (about 1 MB, several ms under the write lock).
BIG_BATCH = 3000
#: Scenario (c): records appended without being applied, replayed in one step under the replay lock
#: (about 10 ms: long enough to stop the victim at a random point inside it).
BACKLOG = 15_000
#: Writes queued behind a killed holder of the replay lock return within this many seconds of
#: the kill: the first to get the lock replays what the dead one left (a few milliseconds for
#: BACKLOG records), the others find their records applied already.
QUEUED_WRITES_BOUND = 0.5
#: Scenario (d): segments this small make compaction rewrite and merge many of them.
SEGMENT_BYTES = 64 * 1024
#: Scenario (d): keys written once at the start, whose only record compaction must keep.
KEPT_KEYS = 2000
#: Scenarios (b) and (c) write megabytes a round: segments of 1 MiB, compacted between
#: rounds, keep the log that every check reads back short.
ROUND_SEGMENT_BYTES = 1024 * 1024
COMPACTED_BETWEEN_ROUNDS = ["--segment-bytes", str(ROUND_SEGMENT_BYTES), "--no-background-compaction"]

pytestmark = pytest.mark.slow


class Company:
    """The survivors (two writers and a reader) on one data directory, the victims, and what they acknowledged."""

    def __init__(
        self, tmp_path: Path, children: Children, options: list[str], watch: list[str], must: list[str]
    ):
        self.data = tmp_path / "data"
        self.children = children
        self.options = options
        self.rng = random.Random(int.from_bytes(os.urandom(4)))
        self.acks = {
            "w1-": Acks("w1-", SURVIVOR_KEYS),
            "w2-": Acks("w2-", SURVIVOR_KEYS),
            "v-": Acks("v-", VICTIM_KEYS),
            "b-": Acks("b-", BIG_BATCH),
        }
        self._fed: dict[int, int] = {}
        self.writers = [
            children.start(
                "writer",
                self.data,
                "--prefix",
                "w1-",
                "--keys",
                str(SURVIVOR_KEYS),
                *options,
                name="writer-1",
            ),
            children.start(
                "writer",
                self.data,
                *("--prefix", "w2-", "--keys", str(SURVIVOR_KEYS), "--batch", "5"),
                *options,
                name="writer-2",
            ),
        ]
        for writer in self.writers:
            writer.expect("ready")
        watch_args = [
            arg
            for spec in [f"w1-:{SURVIVOR_KEYS}", f"w2-:{SURVIVOR_KEYS}", *watch]
            for arg in ("--watch", spec)
        ]
        must_args = [arg for spec in must for arg in ("--must-exist", spec)]
        self.reader = children.start("reader", self.data, *watch_args, *must_args, *options, name="reader")
        self.reader.expect("ready")
        self.kills = 0
        self.recovery_seconds: list[float] = []
        self.recovery_labels: list[str] = []
        self.summary_extra: list[str] = []

    # -- victims ------------------------------------------------------------------------------

    def victim(self, mode: str, *args: str, name: str = "victim") -> Child:
        child = self.children.start(mode, self.data, *args, *self.options, name=name)
        child.expect("ready")
        return child

    def kill(self, child: Child, label: str) -> None:
        child.kill(signal.SIGKILL)
        code = child.reap()
        assert code == -signal.SIGKILL, f"{label}: the victim was not killed by the SIGKILL (exit {code})"
        self.kills += 1

    def stop_holding(self, child: Child, lock: Path, within: float) -> bool:
        """:func:`stop_holding` with this company's random source."""
        return stop_holding(child, lock, within, self.rng)

    # -- after a kill -------------------------------------------------------------------------

    def survivors_go_on(self, label: str) -> None:
        """Every survivor writes (three more acknowledged calls each) and reads (two more passes) within the bound."""
        started = time.monotonic()
        marks = [len(child.snapshot()) for child in (*self.writers, self.reader)]
        slowest = ""
        for child, mark in zip((*self.writers, self.reader), marks, strict=True):
            what = "tick" if child is self.reader else "ack"
            for _ in range(3 if what == "ack" else 2):
                remaining = RECOVERY_BOUND - (time.monotonic() - started)
                if remaining <= 0:
                    pytest.fail(
                        f"{label}: {child.name} did not {what} within {RECOVERY_BOUND}s after the kill"
                    )
                before = time.monotonic()
                child.expect(what, remaining, start=mark)
                if time.monotonic() - before > 0.5:
                    slowest = f", {child.name} waited {time.monotonic() - before:.2f}s for an {what}"
                mark = child.cursor
        self.recovery_seconds.append(time.monotonic() - started)
        self.recovery_labels.append(label + slowest)

    def feed_acks(self, child: Child, prefix: str) -> None:
        lines = child.snapshot()
        start = self._fed.get(child.pid, 0)
        self.acks[prefix].add(line for line in lines[start:] if line.startswith(("begin ", "ack ")))
        self._fed[child.pid] = len(lines)

    def settle_and_check(self, label: str, *, prefix_check: bool = True, compact: bool = False) -> None:
        """Pause the writers; the cache is a prefix of the log, then (after sync) the whole log, losing no ack.

        With ``compact``, a writer then compacts the log while nothing writes
        (so that the next round reads a short log back; records it removes
        are superseded below the log end, where every later checkpoint is).
        """
        self.pause_writers()
        if prefix_check:
            _, whole, end = check_cache_is_log_prefix(self.data, label)
        else:  # a compaction ran: records below the checkpoint may be gone, superseded by later ones
            _, whole, end = fold(self.data / "log")
        self.writers[0].send("sync")
        self.writers[0].expect("synced")
        cached = check_cache_is(self.data, whole, end, f"{label}, after sync()")
        for writer, prefix in zip(self.writers, ("w1-", "w2-"), strict=True):
            self.feed_acks(writer, prefix)
        lost = [entry for acks in self.acks.values() for entry in acks.lost(cached)]
        assert not lost, f"{label}: acknowledged writes lost: {lost[:10]}"
        self.check_reader(label)
        if compact:
            self.writers[0].send("compact")
            self.writers[0].expect("compacted")
        self.resume_writers()

    def pause_writers(self) -> None:
        for writer in self.writers:
            writer.send("pause")
        for writer in self.writers:
            writer.expect("paused")

    def resume_writers(self) -> None:
        for writer in self.writers:
            writer.send("resume")

    def check_reader(self, label: str) -> None:
        violations = [line for line in self.reader.snapshot() if line.startswith("violation")]
        assert not violations, f"{label}: the reader saw {violations[:10]}"

    def acknowledged(self) -> int:
        return sum(acks.calls_acked for acks in self.acks.values())

    def summary(self, scenario: str) -> str:
        worst = max(range(len(self.recovery_seconds)), key=self.recovery_seconds.__getitem__, default=None)
        slowest = (
            ""
            if worst is None
            else f"{self.recovery_seconds[worst]:.2f}s at worst ({self.recovery_labels[worst]})"
        )
        extra = "".join(f", {item}" for item in self.summary_extra)
        line = (
            f"sigkill {scenario}: {self.kills} kills, {self.acknowledged()} acknowledged writes checked, 0 lost "
            f"(survivors wrote and read again within {slowest}{extra})"
        )
        print(f"\n{line}")
        return line


def stop_holding(child: Child, lock: Path, within: float, rng: random.Random) -> bool:
    """SIGSTOP ``child`` at a moment it holds ``lock``; False if it finished (or exited) without.

    Once it is seen holding the lock, a random share of ``within``
    seconds goes by before the stop if it still holds it then: a random
    point inside what it does under the lock, not always its start.
    """
    deadline = time.monotonic() + PATIENCE

    def done() -> bool:
        # Exited, or said it finished what it does under the lock (the write loops never finish).
        if child.proc.poll() is not None:
            return True
        return any(line.split()[0] in ("synced", "compacted") for line in child.lines[child.cursor :])

    while time.monotonic() < deadline:
        if not wait_holding(lock, child.pid, max(0.0, deadline - time.monotonic()), done=done):
            return False
        stop_at = time.monotonic() + rng.uniform(0.0, within)
        while time.monotonic() < stop_at and child.pid in lock_holders(lock):
            time.sleep(POLL_SECONDS)  # the polling interval of a deadline-bounded wait
        os.kill(child.pid, signal.SIGSTOP)
        if child.pid in lock_holders(lock):
            return True
        os.kill(child.pid, signal.SIGCONT)  # it let go meanwhile: catch it the next time
    return False


@pytest.fixture
def children(tmp_path: Path) -> Iterator[Children]:
    with Children(tmp_path) as started:
        yield started


NO_COMPACTION = ["--no-background-compaction"]


def test_sigkill_while_writing(tmp_path: Path, children: Children) -> None:
    """(a) A writer killed at random points of its write loop, half the time holding the log's write lock."""
    company = Company(tmp_path, children, NO_COMPACTION, watch=[f"v-:{VICTIM_KEYS}"], must=[])
    lock = company.data / "log" / "LOCK"
    in_lock = 0
    for round_ in range(ROUNDS):
        label = f"round {round_}"
        batch = company.rng.choice([1, 1, 7, 30])
        victim = company.victim(
            "writer",
            *("--prefix", "v-", "--keys", str(VICTIM_KEYS), "--batch", str(batch)),
            *("--seq-start", str((round_ + 1) * 1_000_000)),
        )
        for _ in range(company.rng.randint(1, 20)):
            victim.expect("ack")
        if round_ % 2 == 0:
            assert company.stop_holding(victim, lock, 0.002), f"{label}: never held the lock"
            in_lock += 1
        company.kill(victim, label)
        company.feed_acks(victim, "v-")
        check_cache_is_log_prefix(company.data, f"{label}, right after the kill")
        company.survivors_go_on(label)
        company.settle_and_check(label)
    company.summary_extra.append(f"{in_lock} of them holding the write lock")
    company.summary("while writing")


def test_sigkill_stopped_inside_a_big_write(tmp_path: Path, children: Children) -> None:
    """(b) A process stopped with SIGSTOP inside a ~1 MB update() or a kvlog load, holding the write lock, then killed.

    While it is stopped, the reader keeps reading (reads take no lock); the
    writers wait for the lock, as in SQLite, and go on as soon as it is dead.
    """
    company = Company(tmp_path, children, COMPACTED_BETWEEN_ROUNDS, watch=[f"b-:{BIG_BATCH}"], must=[])
    lock = company.data / "log" / "LOCK"
    load_file = tmp_path / "big.jsonl"
    load_file.write_text(
        "".join(
            f'{{"key": "load-{i}", "value": {{"seq": {i}, "pad": "{"l" * 200}"}}}}\n' for i in range(15_000)
        )
    )
    loads = 0
    for round_ in range(ROUNDS):
        label = f"round {round_}"
        if round_ % 4 == 3:
            victim = children.command(
                [sys.executable, "-m", "kvlog", "--data", str(company.data), "load", str(load_file)],
                name="load",
                env=clean_env(),
            )
            loads += 1
        else:
            victim = company.victim(
                "writer",
                *(
                    "--prefix",
                    "b-",
                    "--keys",
                    str(BIG_BATCH),
                    "--batch",
                    str(BIG_BATCH),
                    "--value-size",
                    "300",
                ),
                *("--seq-start", str((round_ + 1) * 1_000_000)),
            )
            for _ in range(company.rng.randint(0, 2)):
                victim.expect("ack")
        assert company.stop_holding(victim, lock, 0.02), (
            f"{label}: {victim.name} never held the write lock; stderr: {victim.stderr()}"
        )
        ticks = len(company.reader.snapshot())
        for _ in range(3):
            company.reader.expect("tick", RECOVERY_BOUND, start=ticks)
            ticks = company.reader.cursor
        company.kill(victim, label)
        if victim.name != "load":
            company.feed_acks(victim, "b-")
        check_cache_is_log_prefix(company.data, f"{label}, right after the kill")
        company.survivors_go_on(label)
        company.settle_and_check(label, compact=True)
    company.summary_extra.append(f"{loads} of them kvlog load")
    company.summary("stopped inside a big write")


def test_sigkill_while_replaying(tmp_path: Path, children: Children) -> None:
    """(c) Killed holding the replay lock (a sync() replaying thousands of unapplied records) or mid-rewarm.

    Backlog rounds: a victim appends records straight to the log (as a
    writer killed between its append and its apply leaves them) and replays
    them with ``sync()``; it is stopped while it holds the cache's replay
    lock, the writers resume (and queue behind it for the lock), and it is
    killed. Rewarm rounds: a victim rebuilds the cache beside the live one
    and is killed once the new generation reached a random share of the
    live one's size. The backlog's keys ``c-*`` are never deleted: a second
    reader checks that none of them is ever missing, through every killed
    rewarm, and that none goes back in time.
    """
    company = Company(tmp_path, children, COMPACTED_BETWEEN_ROUNDS, watch=[], must=[])
    replay_lock = company.data / "cache" / "REPLAY"
    first = company.victim("replayer", "--no-follow", name="preloader")
    first.send(f"backlog 0 {BACKLOG}")
    first.expect("synced 0")
    first.close()
    company.acks["c-"] = Acks("c-", BACKLOG)
    company.acks["c-"].add([f"begin 0 0 {BACKLOG}", "ack 0"])
    reader = company.children.start(
        "reader", company.data, "--must-exist", f"c-:{BACKLOG}", *company.options, name="backlog-reader"
    )
    reader.expect("tick")
    mid_rewarm = held_replay = tries = 0
    seq = 0
    for round_ in range(ROUNDS):
        label = f"round {round_}"
        victim = company.victim("replayer", "--no-follow")
        for _ in range(ATTEMPTS):  # the same victim again, until the kill lands where it should
            tries += 1
            if round_ % 2 == 0:
                seq += 1
                # The writers would replay the backlog at their next write: they wait until the victim holds
                # the replay lock, then queue behind it.
                company.pause_writers()
                victim.send(f"backlog {seq} {BACKLOG}")
                # Watch the replay lock from the moment the command is sent: the
                # victim replays the backlog right after appending it, in ~10 ms,
                # less than this process may take to notice "appended".
                held = company.stop_holding(victim, replay_lock, 0.008)
                victim.expect(f"appended {seq}")
                company.acks["c-"].add([f"begin {seq} 0 {BACKLOG}", f"ack {seq}"])
                company.resume_writers()
                if held:
                    ticks = len(reader.snapshot())
                    reader.expect(
                        "tick", RECOVERY_BOUND, start=ticks
                    )  # reads do not wait for the replay lock
                    held_replay += 1
                    break
                victim.expect(f"synced {seq}")  # another process replayed it first: not this kill point
            else:
                if kill_point_in_rewarm(company, victim):
                    mid_rewarm += 1
                    break
                victim.expect("rewarmed")  # done before the chosen point: not a kill mid-rewarm
        else:
            pytest.fail(f"{label}: the kill did not land where it should in {ATTEMPTS} tries")
        label += " holding the replay lock" if round_ % 2 == 0 else " mid-rewarm"
        company.kill(victim, label)
        check_cache_is_log_prefix(company.data, f"{label}, right after the kill")
        company.survivors_go_on(label)
        ticks = len(reader.snapshot())
        reader.expect("tick", RECOVERY_BOUND, start=ticks)
        company.settle_and_check(label, compact=round_ % 4 == 3)
        violations = [line for line in reader.snapshot() if line.startswith("violation")]
        assert not violations, f"{label}: a key the log held went missing or back in time: {violations[:10]}"
    # A rewarm that is not killed completes, and every process reads the new generation.
    victim = company.victim("replayer", "--no-follow", name="last-rewarm")
    victim.send("rewarm")
    victim.expect("rewarmed")
    company.settle_and_check("after a whole rewarm")
    generation = read_head(company.data)
    for child in (company.reader, reader):
        child.expect(lambda line, g=generation: line.startswith("tick") and int(line.split()[2]) == g)
    company.summary_extra.append(
        f"{held_replay} holding the replay lock, {mid_rewarm} mid-rewarm, in {tries} tries"
    )
    company.summary("while replaying")


def read_head(data: Path) -> int:
    """The live cache generation HEAD names (docs/design.md, "The cache": 8 bytes of magic, then a u64)."""
    return int(struct.unpack_from("<8sQ", (data / "cache" / "HEAD").read_bytes())[1])


def kill_point_in_rewarm(company: Company, victim: Child) -> bool:
    """Start a rewarm in ``victim``; SIGSTOP it once its new generation reached a random share of the live one's size.

    False if it finished first.
    """
    cache = company.data / "cache"
    generation = read_head(company.data)
    live = cache / f"gen-{generation:06d}" / "data.mdb"
    earlier = set(cache.glob("gen-*"))  # the live one, and what killed rewarms left
    share = company.rng.uniform(0.05, 0.95)
    target = live.stat().st_size * share
    victim.send("rewarm")
    deadline = time.monotonic() + PATIENCE
    while time.monotonic() < deadline:
        if any(line.startswith("rewarmed") for line in victim.lines[victim.cursor :]):
            return False
        size = 0
        for building in set(cache.glob("gen-*")) - earlier:
            try:
                size = (building / "data.mdb").stat().st_size
            except FileNotFoundError:
                pass
        if size >= target:
            os.kill(victim.pid, signal.SIGSTOP)
            if read_head(company.data) != generation:  # it switched to the new generation: finished
                os.kill(victim.pid, signal.SIGCONT)
                return False
            return True
        time.sleep(POLL_SECONDS)  # the polling interval of a deadline-bounded wait
    pytest.fail(f"the rewarm never reached {share:.0%} of the live cache's size")


def stop_while_present(victim: Child, log_dir: Path, pattern: str, lock: Path) -> bool:
    """SIGSTOP a compacting ``victim`` while a file matching ``pattern`` is in a partition directory.

    ``*.cleaned``: a segment being rewritten (not committed); ``*.swap``: a
    rewritten segment committed but not yet in place. False if the pass
    finished without the victim being caught in that state.
    """
    deadline = time.monotonic() + PATIENCE
    while time.monotonic() < deadline:
        if any(line.startswith("compacted") for line in victim.lines[victim.cursor :]):
            return False
        if any(log_dir.glob(f"*/{pattern}")):
            os.kill(victim.pid, signal.SIGSTOP)
            if any(log_dir.glob(f"*/{pattern}")) and victim.pid in lock_holders(lock):
                return True
            os.kill(victim.pid, signal.SIGCONT)
        time.sleep(POLL_SECONDS)  # the polling interval of a deadline-bounded wait
    pytest.fail(f"the compaction never finished nor left a {pattern} file")


def test_sigkill_mid_compaction(tmp_path: Path, children: Children) -> None:
    """(d) A compaction of a log full of superseded records (64 KiB segments), killed in the middle.

    The survivors keep writing throughout; the next compaction (and the
    next open) finishes or discards what the killed one left, and the log
    still folds to every acknowledged write, including 2,000 keys written
    once at the start between the survivors' overwrites, whose only records
    sit in the segments that compaction rewrites.
    """
    options = ["--segment-bytes", str(SEGMENT_BYTES), "--no-background-compaction"]
    # Keys written once, in small batches between the survivors' overwrites: their only records
    # sit in segments that every compaction rewrites, and must survive each of them.
    company = Company(tmp_path, children, options, watch=[f"keep-:{KEPT_KEYS}"], must=[])
    keeper = company.victim(
        "writer", *("--prefix", "keep-", "--keys", str(KEPT_KEYS), "--batch", "20"), name="keep-writer"
    )
    for _ in range(KEPT_KEYS // 20):
        keeper.expect("ack")
    keeper.send("pause")
    keeper.expect("paused")
    company.acks["keep-"] = Acks("keep-", KEPT_KEYS)
    company.feed_acks(keeper, "keep-")
    keeper.close()
    compact_lock = company.data / "log" / "COMPACT"
    writer = company.writers[0]
    writer.send("bulk 20000")
    writer.expect("bulked")
    tries = 0
    phases = {"anywhere": 0, "rewriting": 0, "swapping": 0}
    for round_ in range(ROUNDS):
        label = f"round {round_}"
        phase = list(phases)[round_ % len(phases)]
        victim = company.victim("compactor")
        for _ in range(ATTEMPTS):  # the same victim again, until the kill lands where it should
            tries += 1
            writer.send("bulk 5000")  # superseded records for this compaction to remove
            writer.expect("bulked")
            victim.send("compact")
            victim.expect("compacting")
            if phase == "anywhere":
                landed = company.stop_holding(victim, compact_lock, 0.1)
            else:
                pattern = "*.cleaned" if phase == "rewriting" else "*.swap"
                landed = stop_while_present(victim, company.data / "log", pattern, compact_lock)
            if landed:
                break
            victim.expect("compacted")  # finished before the chosen point
        else:
            pytest.fail(f"{label}: no kill landed {phase} in {ATTEMPTS} tries")
        phases[phase] += 1
        company.kill(victim, f"{label} ({phase})")
        company.survivors_go_on(label)
        company.settle_and_check(label, prefix_check=False)
    last = company.victim("compactor", name="last-compaction")
    last.send("compact")
    report = last.expect("compacted")
    company.settle_and_check("after a whole compaction", prefix_check=False)
    report_fields = json.loads(report.split(" ", 1)[1])
    company.summary_extra.append(
        f"{phases['anywhere']} anywhere in the pass, {phases['rewriting']} while writing a .cleaned segment, "
        f"{phases['swapping']} between the .swap commit and its rename, in {tries} tries; then a whole "
        f"compaction kept {report_fields['records_after']} of {report_fields['records_before']} records"
    )
    company.summary("mid-compaction")


def test_writes_queued_behind_a_killed_replayer_return_promptly(tmp_path: Path, children: Children) -> None:
    """Writes from three processes, queued behind a process killed while it held the replay lock, all return at once.

    A victim appends records without applying them and is stopped while it
    replays them under the cache's replay lock. Three processes then write:
    each write's records follow the victim's, so each waits for the lock.
    Once the victim is SIGKILLed, the first process to get the lock replays
    everything (the backlog and all three writes); the others find their
    writes applied already and must return straight away, not hold the lock
    waiting for records that are not coming.
    """
    data = tmp_path / "data"
    writers = [children.start("serve", data, *NO_COMPACTION, name=f"writer-{i}") for i in range(3)]
    for writer in writers:
        writer.expect("ready")
        writer.request({"op": "put", "key": "warm", "value": 0})
    replay_lock = data / "cache" / "REPLAY"
    victim = children.start("replayer", data, "--no-follow", *NO_COMPACTION, name="victim")
    victim.expect("ready")
    for attempt in range(1, ATTEMPTS + 1):
        victim.send(f"backlog {attempt} {BACKLOG}")
        victim.expect(f"appended {attempt}")
        if stop_holding(victim, replay_lock, 0.0, random.Random()):
            if replay_left_behind(data):
                break
            # Stopped after its last commit (a replay takes several steps, each under
            # the lock): the writers would find their records next and not wait.
            os.kill(victim.pid, signal.SIGCONT)
        victim.expect(f"synced {attempt}")  # replayed before it was caught holding the lock: again
    else:
        pytest.fail(f"the victim was never caught holding the replay lock in {ATTEMPTS} tries")
    pending = [(w, w.begin({"op": "put", "key": f"after-{i}", "value": i})) for i, w in enumerate(writers)]
    wanted = {w.pid for w in writers}
    deadline = time.monotonic() + PATIENCE
    while not wanted <= lock_waiters(replay_lock):  # every writer waits for the dead-to-be process
        assert time.monotonic() < deadline, (
            f"not every writer queued for the replay lock: {lock_waiters(replay_lock)}"
        )
        time.sleep(POLL_SECONDS)  # the polling interval of a deadline-bounded wait
    killed_at = time.monotonic()
    victim.kill()
    assert victim.reap() == -signal.SIGKILL
    returned = {}
    for writer, start in pending:
        answer = writer.answer(start)
        returned[writer.name] = round(time.monotonic() - killed_at, 3)
        assert answer["ok"], answer
    slow = {name: seconds for name, seconds in returned.items() if seconds > QUEUED_WRITES_BOUND}
    assert not slow, (
        f"writes returned {returned} seconds after the kill; all were applied by the first process to get "
        f"the replay lock, yet these took longer than {QUEUED_WRITES_BOUND}s"
    )
    for writer in writers:
        assert writer.request({"op": "items"})["after-2"] == 2
    print(f"\nsigkill holding the replay lock, writes queued behind it: returned {returned}s after the kill")
