"""Child processes for the crash tests (``tests/test_local_crash.py``), killed with SIGKILL.

Run as a script: ``python tests/_crash_child.py MODE PATH [options]``. Each
mode prints one line per event on stdout and flushes it at once, so that the
parent, reading the pipe, knows what happened before the kill:

``write``
    Opens ``KVLog(PATH)`` (the embedded log) and writes forever: single puts,
    deletes, small ``update()`` batches and large ones (megabytes, so that a
    kill can land inside the write of the frames). Before an operation it
    prints ``begin {json}`` (the operation: :func:`op_records` turns it into
    the records it writes) and after the call RETURNS ``ack SEQ``. Every value
    names the operation that wrote it (its ``seq``), so a value that is there
    tells which write put it there. Every operation is one ``LocalLog.append()``
    call (at most :data:`MAX_BIG_RECORDS` records, below ``KVLog.update()``'s
    batch size), that is one batch per partition, which a crash leaves whole
    or cuts whole.
``rewarm``
    Opens ``KVLog(PATH)``, prints ``ready PID`` and calls ``rewarm()``; prints
    ``progress {json}`` from the progress callback, ``done`` at the end.
``open``
    Opens ``KVLog(PATH)`` (a cold replay if the cache was deleted), printing
    ``progress`` lines from the opening replay, then ``done``.
``hold``
    Opens ``KVLog(PATH)``, prints ``ready PID`` and waits to be killed.

Every mode prints ``opening PID`` first.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import threading
from typing import Any

#: What :func:`op_records` returns as the value of a tombstone.
TOMBSTONE: Any = None

#: The keys single puts, deletes and small batches write (few, so they collide).
SMALL_KEYS = [f"k{i:02d}" for i in range(48)]

#: The most records a large batch has (one ``KVLog.update()`` sends it in one append).
MAX_BIG_RECORDS = 1499


def op_records(op: dict[str, Any]) -> list[tuple[str, Any]]:
    """The ``(key, value)`` records an operation writes, in order (``TOMBSTONE`` for a delete)."""
    seq, kind = op["seq"], op["kind"]
    if kind == "put":
        return [(op["key"], {"seq": seq, "key": op["key"], "pad": "p" * op["size"]})]
    if kind == "del":
        return [(op["key"], TOMBSTONE)]
    if kind == "update":
        return [(key, {"seq": seq, "key": key, "pad": "u" * op["size"]}) for key in op["keys"]]
    if kind == "big":
        # Large values, all different: a torn or mixed-up frame cannot pass for a good one.
        return [
            (f"b{j:05d}", {"seq": seq, "j": j, "pad": f"{seq}:{j}:".encode() * (op["size"] // 12)})
            for j in range(op["n"])
        ]
    raise ValueError(f"unknown operation {kind!r}")


def next_op(rng: random.Random, seq: int, big_share: float) -> dict[str, Any]:
    """Draw the operation ``seq``."""
    roll = rng.random()
    if roll < big_share:
        return {
            "seq": seq,
            "kind": "big",
            "n": rng.randrange(300, MAX_BIG_RECORDS + 1),
            "size": rng.randrange(1500, 3000),
        }
    roll = rng.random()
    if roll < 0.45:
        return {"seq": seq, "kind": "put", "key": rng.choice(SMALL_KEYS), "size": rng.randrange(0, 300)}
    if roll < 0.65:
        return {"seq": seq, "kind": "del", "key": rng.choice(SMALL_KEYS)}
    return {
        "seq": seq,
        "kind": "update",
        "keys": rng.sample(SMALL_KEYS, rng.randrange(2, 20)),
        "size": rng.randrange(0, 200),
    }


def emit(line: str) -> None:
    # One write() per line, flushed at once: what the parent reads was said before the kill.
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def open_store(args: argparse.Namespace, progress: Any = None) -> Any:
    from kvlog import KVLog
    from kvlog.log.local import LocalLog

    emit(f"opening {os.getpid()}")
    if args.segment_bytes:
        # The embedded default with small segments: rolls and background compaction happen often.
        log = LocalLog(
            os.path.join(args.path, "log"),
            partitions=args.partitions,
            fsync=args.fsync,
            segment_bytes=args.segment_bytes,
        )
        return KVLog(args.path, log=log, progress=progress)
    return KVLog(args.path, partitions=args.partitions, fsync=args.fsync, progress=progress)


def report_progress(applied: dict[int, int], targets: dict[int, int]) -> None:
    emit("progress " + json.dumps({"applied": applied, "targets": targets}))


def write(args: argparse.Namespace) -> None:
    kv = open_store(args)
    emit(f"ready {os.getpid()}")
    rng = random.Random(f"{args.seed}:{args.start}")
    seq = args.start
    while True:
        op = next_op(rng, seq, args.big_share)
        if op["kind"] == "del" and op["key"] not in kv:
            op["kind"] = "put"  # a delete of an absent key writes nothing; write something instead
            op["size"] = 10
        emit("begin " + json.dumps(op))
        if op["kind"] == "put":
            ((key, value),) = op_records(op)
            kv[key] = value
        elif op["kind"] == "del":
            del kv[op["key"]]
        else:
            kv.update(op_records(op))
        emit(f"ack {seq}")
        seq += 1


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["write", "rewarm", "open", "hold"])
    parser.add_argument("path")
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fsync", default="always")
    parser.add_argument("--partitions", type=int, default=1)
    parser.add_argument("--segment-bytes", type=int, default=0)
    parser.add_argument("--big-share", type=float, default=0.1)
    args = parser.parse_args(argv)
    if args.mode == "write":
        write(args)
    elif args.mode == "rewarm":
        kv = open_store(args)
        emit(f"ready {os.getpid()}")
        kv.rewarm(progress=report_progress)
        emit("done")
        kv.close()
    elif args.mode == "open":
        kv = open_store(args, progress=report_progress)
        emit("done")
        kv.close()
    else:
        kv = open_store(args)
        emit(f"ready {os.getpid()}")
        threading.Event().wait()  # until the parent kills this process


if __name__ == "__main__":
    main()
