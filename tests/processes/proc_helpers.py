"""What the multi-process tests share: child processes on pipes, lock owners, and the on-disk checks.

A :class:`Child` runs ``_proc_child.py`` (or any command) with its stdout read
line by line on a thread of its own, so that the test waits for what a child
said with a deadline instead of sleeping. :func:`lock_holders` reads
``/proc/locks`` to tell which process holds one of kvlog's ``flock`` files
right now (the log's write lock, the cache's replay lock, the compaction
lock), without touching the lock. :func:`check_cache` compares the shared
cache with the log as tests/ondisk.py reads it, from one consistent snapshot
of the cache that other processes may be writing to.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import lmdb
import msgpack
import pytest
from ondisk import cache_env_dir

from kvlog.cache import Cache
from kvlog.log.local import LocalLog

HERE = Path(__file__).resolve().parent
CHILD = HERE / "_proc_child.py"

#: How often a wait on a lock looks at ``/proc/locks`` (fine enough to stop a child at a
#: chosen point inside a few milliseconds under a lock, without taking a CPU from it).
POLL_SECONDS = 0.0002

#: Seconds a child may take for something that must happen (generous: a loaded
#: CI machine is slow, and a failure here means "never happened", not "late").
PATIENCE = 60.0


class Child:
    """A child process whose stdout lines are collected as they come (``lines``)."""

    def __init__(
        self,
        argv: list[str],
        *,
        log_dir: Path,
        name: str,
        env: dict[str, str] | None = None,
        merge_stderr: bool = False,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.argv = argv
        self.stderr_path = log_dir / f"{name}-{time.monotonic_ns()}.stderr"
        self._stderr = open(self.stderr_path, "wb")
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT if merge_stderr else self._stderr,
            env=env,
            cwd=cwd,
            text=True,
            bufsize=1,
        )
        self.pid = self.proc.pid
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._eof = False
        self.cursor = 0
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def expect(
        self, match: Callable[[str], bool] | str, timeout: float = PATIENCE, *, start: int | None = None
    ) -> str:
        """Wait for a line from ``start`` (default: the cursor) on that ``match`` accepts; move the cursor past it.

        ``match`` is a predicate or a prefix. Fails the test if the child
        exits or the deadline passes first.
        """
        accept = match if callable(match) else (lambda line, prefix=match: line.startswith(prefix))
        index = self.cursor if start is None else start
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                while index < len(self.lines):
                    line = self.lines[index]
                    index += 1
                    if accept(line):
                        self.cursor = index
                        return line
                if self._eof:
                    pytest.fail(
                        f"{self.name} (pid {self.pid}) ended before printing {match!r}; "
                        f"exit {self.proc.poll()}; stderr:\n{self.stderr()}"
                    )
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    pytest.fail(
                        f"{self.name} (pid {self.pid}) printed no {match!r} within {timeout}s; "
                        f"last lines {self.lines[-5:]}; stderr:\n{self.stderr()}"
                    )
                self._cond.wait(remaining)

    def request(self, cmd: dict[str, Any], timeout: float = PATIENCE) -> Any:
        """A ``serve`` child: send one command, return its result (fails the test on an error answer)."""
        answer = self.ask(cmd, timeout)
        assert answer["ok"], f"{self.name}: {cmd} failed: {answer}; stderr:\n{self.stderr()}"
        return answer["result"]

    def ask(self, cmd: dict[str, Any], timeout: float = PATIENCE) -> dict[str, Any]:
        """A ``serve`` child: send one command, return its answer (``ok``, ``result`` or ``error``)."""
        return self.answer(self.begin(cmd), timeout)

    def begin(self, cmd: dict[str, Any]) -> int:
        """A ``serve`` child: send one command without waiting; pass the result to :meth:`answer`."""
        with self._cond:
            start = len(self.lines)
        self.send(json.dumps(cmd))
        return start

    def answer(self, start: int, timeout: float = PATIENCE) -> dict[str, Any]:
        """The answer to the command :meth:`begin` sent."""
        return json.loads(self.expect("{", timeout, start=start))  # type: ignore[no-any-return]

    def count(self, prefix: str) -> int:
        with self._cond:
            return sum(1 for line in self.lines if line.startswith(prefix))

    def snapshot(self) -> list[str]:
        with self._cond:
            return list(self.lines)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            os.kill(self.pid, sig)

    def reap(self, timeout: float = PATIENCE) -> int:
        code = self.proc.wait(timeout)
        self._thread.join(timeout)
        return code

    def close(self, timeout: float = 20.0) -> None:
        """Ask the child to exit (``exit``), kill it if it does not; release the pipes."""
        if self.proc.poll() is None:
            try:
                self.send(json.dumps({"op": "exit"}) if "serve" in self.argv else "exit")
                self.proc.wait(timeout)
            except (OSError, subprocess.TimeoutExpired, ValueError):
                self.kill()
                self.proc.wait(timeout)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass
        self._thread.join(timeout)
        self._stderr.close()


class Children:
    """Start children (``start``) and close every one of them at the end (a context manager)."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.all: list[Child] = []

    def start(self, mode: str, path: Path | str, *options: str, name: str | None = None) -> Child:
        child = Child(
            [sys.executable, str(CHILD), mode, str(path), *options],
            log_dir=self.log_dir,
            name=name or mode,
        )
        self.all.append(child)
        return child

    def command(self, argv: list[str], *, name: str, **options: Any) -> Child:
        child = Child(argv, log_dir=self.log_dir, name=name, **options)
        self.all.append(child)
        return child

    def __enter__(self) -> Children:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is not None:  # a failed test: no clean exits to wait for
            for child in self.all:
                child.kill()
        for child in self.all:
            child.close()


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without Kafka settings (they would point ``kvlog`` at a topic), plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in ("KVLOG_BOOTSTRAP_SERVERS", "KVLOG_TOPIC")}
    env.update(extra)
    return env


# -- locks ---------------------------------------------------------------------------------------


def lock_holders(path: Path) -> set[int]:
    """The pids that hold an ``flock`` of ``path`` now (waiters are not holders), from ``/proc/locks``."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return set()
    inode = f":{st.st_ino}"
    holders = set()
    with open("/proc/locks") as locks:
        for line in locks:
            fields = line.split()
            # "1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF"; a waiter has "->" after the number.
            # Matched on the inode alone: on an overlay file system the device shown is another one.
            if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5].endswith(inode):
                holders.add(int(fields[4]))
    return holders


def lock_waiters(path: Path) -> set[int]:
    """The pids blocked in ``flock`` on ``path`` now (the ``->`` lines of ``/proc/locks``)."""
    try:
        inode = f":{os.stat(path).st_ino}"
    except FileNotFoundError:
        return set()
    waiters = set()
    with open("/proc/locks") as locks:
        for line in locks:
            fields = line.split()
            # "1: -> FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF"
            if len(fields) >= 7 and fields[1] == "->" and fields[2] == "FLOCK" and fields[6].endswith(inode):
                waiters.add(int(fields[5]))
    return waiters


def wait_holding(
    path: Path, pid: int, timeout: float = PATIENCE, *, done: Callable[[], bool] | None = None
) -> bool:
    """Busy-poll ``/proc/locks`` until ``pid`` holds ``path``; False once ``done()`` or the deadline passed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pid in lock_holders(path):
            return True
        if done is not None and done():
            return pid in lock_holders(path)
        time.sleep(POLL_SECONDS)  # the polling interval of a deadline-bounded wait
    return False


# -- the shared cache against the log ------------------------------------------------------------


def cache_view(data: Path) -> tuple[dict[int, int], dict[bytes, bytes]]:
    """The shared cache's checkpoint and entries, read in ONE read transaction (others may be writing)."""
    cache = Cache(data / "cache")
    try:
        with cache.snapshot() as (checkpoint, items):
            return dict(checkpoint), {bytes(k): bytes(v) for k, v in items}
    finally:
        cache.close()


def replay_left_behind(data: Path) -> bool:
    """Whether the shared cache's checkpoint is behind the embedded log's end: records wait to be replayed.

    For a caller that stopped (SIGSTOP) the one process replaying, with no
    other writing: the cache is read read-only and without LMDB's locks,
    which the stopped process may hold (opening a :class:`Cache` would wait
    for its write transaction forever).
    """
    env = lmdb.open(str(cache_env_dir(data / "cache")), readonly=True, lock=False, max_dbs=4)
    try:
        with env.begin() as txn:
            raw = txn.get(b"checkpoint", db=env.open_db(b"meta", txn=txn, create=False))
    finally:
        env.close()
    checkpoint = msgpack.unpackb(raw, strict_map_key=False) if raw is not None else {}
    local = LocalLog(data / "log", background_compaction=False)
    try:
        end = local.end_offsets()
    finally:
        local.close()
    return any(checkpoint.get(p, 0) < offset for p, offset in end.items())


def fold(
    log_dir: Path, upto: dict[int, int] | None = None
) -> tuple[dict[bytes, bytes], dict[bytes, bytes], dict[int, int]]:
    """Read the log once (as tests/ondisk.py does): ``(fold below upto, fold of all, end offsets)``."""
    local = LocalLog(log_dir, background_compaction=False)
    try:
        end = local.end_offsets()
        reader = local.open_reader(local.begin_offsets())
        prefix: dict[bytes, bytes] = {}
        whole: dict[bytes, bytes] = {}
        deadline = time.monotonic() + PATIENCE
        while any(reader.positions()[p] < end[p] for p in end):
            assert time.monotonic() < deadline, "reading the log back did not finish"
            for record in reader.poll(1.0, 100_000):
                if record.offset >= end[record.partition]:
                    continue  # appended after the end was read
                folds = (
                    [whole]
                    if upto is not None and record.offset >= upto.get(record.partition, 0)
                    else [whole, prefix]
                )
                for state in folds:
                    if record.value is None:
                        state.pop(record.key, None)
                    else:
                        state[record.key] = record.value
        reader.close()
    finally:
        local.close()
    return prefix, whole, end


def _differences(expected: dict[bytes, bytes], actual: dict[bytes, bytes]) -> str:
    missing = sorted(set(expected) - set(actual))[:5]
    extra = sorted(set(actual) - set(expected))[:5]
    different = sorted(k for k in set(expected) & set(actual) if expected[k] != actual[k])[:5]
    return f"missing {missing}, extra {extra}, different {different}"


def check_cache_is_log_prefix(
    data: Path, label: str
) -> tuple[dict[int, int], dict[bytes, bytes], dict[int, int]]:
    """The cache equals the log folded up to its checkpoint (on a log nobody compacts meanwhile).

    Returns ``(checkpoint, the whole log folded, end offsets)``.
    """
    checkpoint, cached = cache_view(data)
    prefix, whole, end = fold(data / "log", upto=checkpoint)
    assert all(checkpoint.get(p, 0) <= end[p] for p in end), (
        f"{label}: checkpoint {checkpoint} past the end {end}"
    )
    if cached != prefix:
        pytest.fail(
            f"{label}: the cache is not the log folded up to its checkpoint {checkpoint} (end {end}): "
            + _differences(prefix, cached)
        )
    return checkpoint, whole, end


def check_cache_is(
    data: Path, whole: dict[bytes, bytes], end: dict[int, int], label: str
) -> dict[bytes, bytes]:
    """The cache is at ``end`` and holds exactly ``whole`` (the log folded to its end, read while nobody wrote)."""
    checkpoint, cached = cache_view(data)
    at = {p: checkpoint.get(p, 0) for p in end}  # a cache that never applied anything has no checkpoint
    assert at == end and set(checkpoint) <= set(end), (
        f"{label}: the cache's checkpoint {checkpoint} is not the log end {end}"
    )
    if cached != whole:
        pytest.fail(f"{label}: the cache is not the whole log folded: " + _differences(whole, cached))
    return cached


def check_cache_is_whole_log(data: Path, label: str) -> dict[bytes, bytes]:
    """The cache is at the log end and equals the whole log folded (call it after a sync(), writers paused)."""
    _, whole, end = fold(data / "log")
    return check_cache_is(data, whole, end, label)


def decode(raw: bytes) -> Any:
    return msgpack.unpackb(raw, raw=False)


# -- acknowledged writes -------------------------------------------------------------------------


class Acks:
    """Which writes a ``writer`` child began and which it saw return, from its output lines."""

    def __init__(self, prefix: str, keys: int) -> None:
        self.prefix = prefix
        self.keys = keys
        self.acked: dict[str, int] = {}  # key -> the highest seq whose call returned
        self.begun: dict[str, int] = {}  # key -> the highest seq whose call began
        self.calls_acked = 0

    def add(self, lines: Iterable[str]) -> None:
        calls: dict[int, list[str]] = {}
        for line in lines:
            words = line.split()
            if words[0] == "begin":
                seq, first, count = (int(w) for w in words[1:4])
                names = [f"{self.prefix}{(first + i) % self.keys}" for i in range(min(count, self.keys))]
                calls[seq] = names
                for key in names:
                    self.begun[key] = max(self.begun.get(key, 0), seq)
            elif words[0] == "ack":
                seq = int(words[1])
                self.calls_acked += 1
                for key in calls[seq]:
                    self.acked[key] = max(self.acked.get(key, 0), seq)

    def lost(self, contents: dict[bytes, bytes]) -> list[str]:
        """The acknowledged writes ``contents`` (raw cache or log fold) does not hold: key, acked, found."""
        lost = []
        for key, seq in sorted(self.acked.items()):
            raw = contents.get(key.encode())
            found = None if raw is None else decode(raw)["seq"]
            if found is None or found < seq or found > self.begun[key]:
                lost.append(f"{key}: acknowledged seq {seq}, found {found} (highest begun {self.begun[key]})")
        return lost
