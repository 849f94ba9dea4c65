"""Child processes of the multi-process tests: each one a program that opens a data directory for real.

Run as a script: ``python tests/processes/_proc_child.py MODE PATH [options]``.
Every line a child prints is flushed at once (one ``write`` per line), so the
parent, reading the pipe, knows what happened before it kills the child.

``serve``
    A store driven line by line: each line on stdin is one JSON command, and
    each command is answered with exactly one JSON line, ``{"ok": true,
    "result": ...}`` or ``{"ok": false, "error": "KeyError", "message": ...}``.
    Commands (``op``): ``open`` (``path``, and ``kafka``: ``{"bootstrap",
    "topic"}`` for a Kafka store), ``close``, ``reopen``, ``put``, ``del``,
    ``get`` (``{"present", "value"}``), ``items``, ``update``, ``sync``,
    ``health`` (``stats()["replay_health"]``), ``exit``. PATH may be ``-``:
    nothing is opened until an ``open``.
``writer``
    Opens the store and writes forever. Call number SEQ (1, 2, ...) writes the
    ``COUNT`` keys ``PREFIX<(FIRST + i) % KEYS>`` with the value ``{"seq":
    SEQ, "pad": ...}``: one ``kv[k] = v`` when COUNT is 1, else one
    ``update()``. It prints ``begin SEQ FIRST COUNT`` before the call and
    ``ack SEQ`` once the call RETURNED, so the parent knows, at any kill,
    which writes were acknowledged.
``reader``
    Opens the store and reads the watched keys over and over. Values are
    ``{"seq": ...}`` and only grow per key; a read that returns a smaller seq
    than one this process read before prints ``violation backwards KEY OLD
    NEW``, a key that was there and is gone (or a ``--must-exist`` key that
    is absent) prints ``violation missing KEY``. Every pass prints ``tick N
    GENERATION`` (the cache generation it read, which a rewarm moves on).
``replayer``
    Opens the store (the tests pass ``--no-follow``: nothing replays in it
    unless asked). Command ``backlog ROUND N`` appends N records straight to
    the embedded log (appended, never applied: the way a writer killed
    between its append and its apply leaves them), prints ``appended
    ROUND``, then calls ``sync()`` (which replays them under the cache's
    replay lock, taken for each step of up to 10,000 records) and prints
    ``synced ROUND``. Command ``rewarm``
    re-warms the store, printing ``progress`` per step and ``rewarmed`` at
    the end.
``compactor``
    Opens the store and waits for commands (``compact``, below).

Every mode prints ``ready PID`` once the store is open (``serve``: once it
runs). The modes other than ``serve`` read commands from stdin: ``pause``
(a writer finishes its call and prints ``paused``; the others just print
it), ``resume``, ``get KEY`` (prints ``got KEY {json or null}``), ``sync``
(prints ``synced``), ``bulk N`` (a writer's next call is an ``update()`` of
N records over its keys; it prints ``bulked`` after its ``ack``),
``compact`` (prints ``compacting``, compacts the embedded log, prints
``compacted {report}``), ``exit``.

Options: ``--prefix``, ``--keys``, ``--batch``, ``--value-size`` and
``--seq-start`` shape a writer's writes; ``--watch PREFIX:N`` and
``--must-exist PREFIX:N`` name a reader's keys; ``--no-follow`` opens the
store without its follower thread; ``--segment-bytes N`` opens the embedded
log with segments of N bytes and ``--no-background-compaction`` without its
background compaction (both through ``KVLog(path, log=LocalLog(...))``).
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import msgpack

from kvlog import KVLog
from kvlog.log.local import LocalLog

_emit_lock = threading.Lock()


def emit(line: str) -> None:
    # One write() per line, flushed at once, never interleaved between threads.
    with _emit_lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def open_store(path: str | Path, args: argparse.Namespace, **kwargs: Any) -> KVLog:
    if args.segment_bytes or args.no_background_compaction:
        options: dict[str, Any] = {"background_compaction": not args.no_background_compaction}
        if args.segment_bytes:
            options["segment_bytes"] = args.segment_bytes
        return KVLog(path, log=LocalLog(Path(path) / "log", **options), **kwargs)
    return KVLog(path, **kwargs)


# -- serve: one JSON command, one JSON answer -------------------------------------------------


class Server:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.kv: KVLog | None = None
        self.opened_with: dict[str, Any] = {}

    def _open(self, path: str, kafka: dict[str, Any] | None) -> None:
        self.opened_with = {"path": path, "kafka": kafka}
        if kafka:
            self.kv = KVLog(
                path,
                bootstrap_servers=kafka["bootstrap"],
                topic=kafka["topic"],
                timeout=kafka.get("timeout", 20),
            )
        else:
            self.kv = open_store(path, self.args)

    def handle(self, cmd: dict[str, Any]) -> Any:
        op = cmd["op"]
        if op == "open":
            if self.kv is not None:
                self.kv.close()
            self._open(cmd["path"], cmd.get("kafka"))
            return os.getpid()
        if op == "exit":
            return None
        if op == "close":
            if self.kv is not None:
                self.kv.close()
                self.kv = None
            return None
        if op == "reopen":
            assert self.kv is not None, "no store open"
            self.kv.close()
            self._open(self.opened_with["path"], self.opened_with["kafka"])
            return None
        kv = self.kv
        if kv is None:
            raise RuntimeError("no store open")
        if op == "put":
            kv[cmd["key"]] = cmd["value"]
            return None
        if op == "del":
            del kv[cmd["key"]]
            return None
        if op == "get":
            missing = object()
            value = kv.get(cmd["key"], missing)
            return {"present": value is not missing, "value": None if value is missing else value}
        if op == "items":
            return dict(kv.items())
        if op == "update":
            kv.update([tuple(item) for item in cmd["items"]])
            return None
        if op == "sync":
            kv.sync(cmd.get("timeout", 30))
            return None
        if op == "health":
            return kv.stats()["replay_health"]
        raise ValueError(f"unknown op {op!r}")

    def run(self) -> None:
        for line in sys.stdin:
            if not line.strip():
                continue
            cmd = json.loads(line)
            try:
                result = self.handle(cmd)
            except BaseException as exc:  # noqa: BLE001 - every failure is an answer the parent checks
                emit(json.dumps({"ok": False, "error": type(exc).__name__, "message": str(exc)}))
            else:
                emit(json.dumps({"ok": True, "result": result}, default=repr))
            if cmd["op"] == "exit":
                break
        if self.kv is not None:
            self.kv.close()


# -- the looping modes -------------------------------------------------------------------------


class Loop:
    """What the looping modes share: the store, and commands read on a thread of their own."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.kv = open_store(args.path, args, follow=not args.no_follow)
        self.pause = threading.Event()
        self.resume = threading.Event()
        self.stop = threading.Event()
        self.seq = args.seq_start
        self.bulk: list[int] = []

    def keys(self) -> list[str]:
        return [f"{self.args.prefix}{i}" for i in range(self.args.keys)]

    def command(self, words: list[str]) -> None:
        name = words[0]
        if name == "pause":
            self.resume.clear()
            self.pause.set()
            if self.args.mode != "writer":
                emit("paused")
        elif name == "resume":
            self.pause.clear()
            self.resume.set()
        elif name == "get":
            value = self.kv.get(words[1])
            emit(f"got {words[1]} {json.dumps(value)}")
        elif name == "sync":
            self.kv.sync(30)
            emit("synced")
        elif name == "bulk":
            self.bulk.append(int(words[1]))  # the write loop makes it its next call
        elif name == "backlog":
            self.backlog(int(words[1]), int(words[2]))
        elif name == "rewarm":
            self.kv.rewarm(progress=lambda applied, targets: emit(f"progress {json.dumps(applied)}"))
            emit("rewarmed")
        elif name == "compact":
            emit("compacting")
            report = self.kv.log.compact()  # type: ignore[attr-defined]
            emit(f"compacted {json.dumps(report, default=str)}")
        elif name == "exit":
            self.stop.set()
            self.resume.set()
        else:
            raise ValueError(f"unknown command {words!r}")

    def backlog(self, round_: int, n: int) -> None:
        pack = msgpack.packb
        records = [
            (f"c-{i}".encode(), pack({"seq": round_, "pad": "c" * 40}, use_bin_type=True)) for i in range(n)
        ]
        self.kv.log.append(records)
        emit(f"appended {round_}")
        self.kv.sync(60)
        emit(f"synced {round_}")

    def commands(self) -> None:
        for line in sys.stdin:
            words = line.split()
            if words:
                self.command(words)
            if self.stop.is_set():
                return
        self.stop.set()  # stdin closed: the parent is gone
        self.resume.set()

    def run(self) -> None:
        emit(f"ready {os.getpid()}")
        if self.args.mode in ("writer", "reader"):
            threading.Thread(target=self.commands, daemon=True).start()
            (self.write_loop if self.args.mode == "writer" else self.read_loop)()
        else:
            self.commands()
        self.kv.close()

    def write_loop(self) -> None:
        keys, count = self.keys(), self.args.batch
        pad = "p" * self.args.value_size
        first = 0
        while not self.stop.is_set():
            if self.pause.is_set():
                emit("paused")
                self.resume.wait()
                continue
            n = self.bulk.pop(0) if self.bulk else count
            self.seq += 1
            value = {"seq": self.seq, "pad": pad}
            emit(f"begin {self.seq} {first} {n}")
            if n == 1:
                self.kv[keys[first]] = value
            else:
                self.kv.update((keys[(first + i) % len(keys)], value) for i in range(n))
            emit(f"ack {self.seq}")
            if n != count:
                emit("bulked")
            first = (first + n) % len(keys)

    def read_loop(self) -> None:
        watched = []
        for spec in self.args.watch:
            prefix, _, n = spec.rpartition(":")
            watched.extend(f"{prefix}{i}" for i in range(int(n)))
        must = set()
        for spec in self.args.must_exist:
            prefix, _, n = spec.rpartition(":")
            must.update(f"{prefix}{i}" for i in range(int(n)))
        watched.extend(sorted(must - set(watched)))
        seen: dict[str, int] = {}
        get, ticks = self.kv.get, 0
        cache = self.kv._cache  # the generation it reads: diagnostics only
        while not self.stop.is_set():
            if self.pause.is_set():
                self.resume.wait()
                continue
            for key in watched:
                value = get(key)
                if value is None:
                    if key in seen or key in must:
                        emit(f"violation missing {key}")
                    continue
                old = seen.get(key, -1)
                if value["seq"] < old:
                    emit(f"violation backwards {key} {old} {value['seq']}")
                seen[key] = value["seq"]
            ticks += 1
            emit(f"tick {ticks} {getattr(cache, 'generation', -1)}")
            time.sleep(0.002)  # not a synchronisation: leaves the CPU to the others between passes (2 cores)


def main() -> None:
    # `kill -USR1 PID` prints every thread's stack to stderr: where a child that seems stuck waits.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["serve", "writer", "reader", "replayer", "compactor"])
    parser.add_argument("path")
    parser.add_argument("--prefix", default="k")
    parser.add_argument("--keys", type=int, default=10)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--value-size", type=int, default=20)
    parser.add_argument("--seq-start", type=int, default=0)
    parser.add_argument(
        "--watch", action="append", default=[], help="PREFIX:N, the keys PREFIX0..PREFIX<N-1>"
    )
    parser.add_argument(
        "--must-exist", action="append", default=[], help="PREFIX:N keys that are never absent"
    )
    parser.add_argument("--no-follow", action="store_true")
    parser.add_argument("--segment-bytes", type=int, default=0)
    parser.add_argument("--no-background-compaction", action="store_true")
    args = parser.parse_args()
    if args.mode == "serve":
        server = Server(args)
        if args.path != "-":
            server._open(args.path, None)
        emit(f"ready {os.getpid()}")
        server.run()
    else:
        Loop(args).run()


if __name__ == "__main__":
    main()
