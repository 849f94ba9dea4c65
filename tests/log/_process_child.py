"""Child processes for tests/log/test_local_processes.py: each opens its own LocalLog on a shared directory.

Run as ``python tests/log/_process_child.py MODE PATH [options]``. Every line
printed is flushed at once, so that the parent knows what happened before a kill.

``append``
    ``--count`` appends of 1-5 records (keys ``w<id>:<n>``), printing
    ``ack <n> <json [[partition, offset], ...]>`` after each returns; then
    ``appended``; then reads the whole log from its start until it has read
    ``--expect`` records and prints ``read <json {writer id: records read}>``.
``loop``
    Appends forever: ``begin <n> <records>`` before an append,
    ``ack <n> <json positions>`` after. Some appends are large (hundreds of
    KiB), so that a kill lands inside the write of their frames.
``stop-in-lock``
    Appends one record with an ``on_appended`` hook that prints ``in-lock``
    and stops the process (SIGSTOP) while it holds the write lock.
``compact``
    Prints ``ready``, then compacts in a loop, printing ``compacted <json report>``.
``readcheck``
    Reads the log from its start forever, checking each record (see
    :func:`check_value`); prints ``seen <n>`` every 500 records, ``bad <why>`` on a wrong one.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import time
from typing import Any


def emit(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def value_of(key: bytes, size: int = 0) -> bytes:
    """The value written under ``key``: names the key, so a mixed-up record cannot pass for a good one."""
    return b"value-of:" + key + b":" + b"x" * size


def check_value(key: bytes | None, value: bytes | None) -> str | None:
    """Why a record read is not one this suite writes (None if it is)."""
    if key is None:
        return "a record without a key"
    if value is None:
        return None  # a tombstone
    head = b"value-of:" + key + b":"
    if not value.startswith(head) or value[len(head) :].strip(b"x"):
        return f"key {key!r} holds {value[:60]!r}"
    return None


def open_log(args: argparse.Namespace) -> Any:
    from kvlog.log.local import LocalLog

    return LocalLog(
        args.path,
        partitions=args.partitions,
        segment_bytes=args.segment_bytes,
        fsync=args.fsync,
        background_compaction=args.background,
    )


def append_mode(args: argparse.Namespace) -> None:
    log = open_log(args)
    rng = random.Random(args.id)
    for n in range(args.count):
        batch = [f"w{args.id}:{n}:{j}".encode() for j in range(rng.randint(1, 5))]
        positions = log.append([(key, value_of(key, rng.randrange(0, 200))) for key in batch])
        emit(f"ack {n} {json.dumps(positions)}")
    emit("appended")
    reader = log.open_reader(log.begin_offsets())
    counts: dict[str, int] = {}
    total = 0
    deadline = time.monotonic() + 120
    while total < args.expect and time.monotonic() < deadline:
        for record in reader.poll(0.5, 10_000):
            why = check_value(record.key, record.value)
            if why is not None:
                emit(f"bad {why}")
            writer = record.key.split(b":")[0].decode()
            counts[writer] = counts.get(writer, 0) + 1
            total += 1
    emit(f"read {json.dumps(counts)}")
    reader.close()
    log.close()


def loop_mode(args: argparse.Namespace) -> None:
    log = open_log(args)
    rng = random.Random(args.id)
    n = 0
    while True:
        if rng.random() < 0.2:
            keys = [f"w{args.id}:{n}:{j}".encode() for j in range(rng.randint(50, 150))]
            size = rng.randrange(2000, 6000)
        else:
            keys = [f"w{args.id}:{n}:{j}".encode() for j in range(rng.randint(1, 8))]
            size = rng.randrange(0, 100)
        emit(f"begin {n} {len(keys)}")
        positions = log.append([(key, value_of(key, size)) for key in keys])
        emit(f"ack {n} {json.dumps(positions)}")
        n += 1


def stop_in_lock_mode(args: argparse.Namespace) -> None:
    log = open_log(args)

    def hook(before: Any, positions: Any, after: Any) -> None:
        emit(f"in-lock {json.dumps(positions)}")
        os.kill(os.getpid(), signal.SIGSTOP)

    log.append([(b"stopped:0", value_of(b"stopped:0"))], on_appended=hook)
    emit("released")


def compact_mode(args: argparse.Namespace) -> None:
    log = open_log(args)
    emit("ready")
    while True:
        report = log.compact()
        emit(f"compacted {json.dumps(report)}")


def readcheck_mode(args: argparse.Namespace) -> None:
    log = open_log(args)
    reader = log.open_reader(log.begin_offsets())
    seen = 0
    last: dict[int, int] = {}
    while True:
        for record in reader.poll(0.5, 10_000):
            why = check_value(record.key, record.value)
            if why is None and record.offset <= last.get(record.partition, -1):
                why = f"offset {record.offset} of partition {record.partition} read after {last[record.partition]}"
            if why is not None:
                emit(f"bad {why}")
            last[record.partition] = record.offset
            seen += 1
            if seen % 500 == 0:
                emit(f"seen {seen}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["append", "loop", "stop-in-lock", "compact", "readcheck"])
    parser.add_argument("path")
    parser.add_argument("--id", type=int, default=0)
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--expect", type=int, default=0)
    parser.add_argument("--partitions", type=int, default=1)
    parser.add_argument("--segment-bytes", type=int, default=16 * 1024 * 1024)
    parser.add_argument("--fsync", default="never")
    parser.add_argument("--background", action="store_true")
    args = parser.parse_args()
    {
        "append": append_mode,
        "loop": loop_mode,
        "stop-in-lock": stop_in_lock_mode,
        "compact": compact_mode,
        "readcheck": readcheck_mode,
    }[args.mode](args)


if __name__ == "__main__":
    main()
