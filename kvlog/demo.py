"""``kvlog demo``: a one-minute tour of kvlog on the embedded log, with no broker.

It writes a sample data set of orders, reads every key back, deletes the
cache, rebuilds it by replaying the log, checks the rebuilt cache, and prints
what each step took and the store's stats.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .cli import DEFAULT_CODEC, EXIT_NOT_FOUND, EXIT_OK, LOAD_BATCH, Target, UsageError, log_stats
from .terminal import ReplayBar, count_bar, offsets, rate

__all__ = ["cmd_demo", "demo_orders"]

_STATUSES = ("pending", "paid", "shipped", "delivered", "cancelled")


def demo_orders(count: int) -> Iterator[tuple[str, dict[str, Any]]]:
    """The demo's data set, the same every time: ``order:000042 -> {customer, status, total, items}``."""
    rng = random.Random(42)
    customers = max(1, count // 10)
    for i in range(count):
        yield (
            f"order:{i:06d}",
            {
                "customer": f"customer:{rng.randrange(customers):05d}",
                "status": rng.choice(_STATUSES),
                "total": round(rng.uniform(5, 500), 2),
                "items": rng.randint(1, 9),
            },
        )


def _step(number: int, what: str, seconds: float, extra: str = "") -> None:
    print(f"{number}. {what:<64} {seconds:6.2f}s{('  ' + extra) if extra else ''}", flush=True)


def cmd_demo(args: argparse.Namespace) -> int:
    """Run ``kvlog demo`` in ``--dir`` (kept) or a temporary directory (removed unless ``--keep``)."""
    if args.data is not None or args.cache is not None or args.bootstrap_servers or args.topic:
        raise UsageError("demo runs on its own embedded data directory; choose it with demo --dir DIR")
    if args.dir is not None:
        path = Path(args.dir)
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise UsageError(f"demo --dir needs a new or empty directory; {path} is not empty")
        keep = True
    else:
        path = Path(tempfile.mkdtemp(prefix="kvlog-demo-"))
        keep = args.keep
    try:
        return _demo(args, path, args.records, keep)
    finally:
        if not keep:
            shutil.rmtree(path, ignore_errors=True)


def _demo(args: argparse.Namespace, path: Path, count: int, keep: bool) -> int:
    from .store import KVLog

    target = Target("local", path)
    begun = time.monotonic()
    print(f"kvlog demo: {count:,} orders in an embedded kvlog database at {path} (no broker)")
    example = f"order:{min(42, count - 1):06d}"
    sample = dict(demo_orders(min(count, 43)))[example]
    print(f"   e.g. {example} -> {json.dumps(sample)}")

    started = time.monotonic()
    codec = args.codec or DEFAULT_CODEC
    with KVLog(path, codec=codec, follow=False, timeout=args.timeout) as kv:
        with count_bar("write", count) as bar:
            batch: list[tuple[str, Any]] = []
            for item in demo_orders(count):
                batch.append(item)
                if len(batch) == LOAD_BATCH:
                    kv.update(batch)
                    bar.update(len(batch))
                    batch = []
            if batch:
                kv.update(batch)
                bar.update(len(batch))
        seconds = time.monotonic() - started
        _step(
            1,
            f"write {count:,} orders through the log (kv.update)",
            seconds,
            f"{rate(count, seconds)} records/s",
        )

        started = time.monotonic()
        for key, expected in demo_orders(count):
            if kv[key] != expected:
                print(f"kvlog: demo: {key} reads back {kv[key]!r}, expected {expected!r}", file=sys.stderr)
                return EXIT_NOT_FOUND
        seconds = time.monotonic() - started
        _step(
            2,
            f"read all {count:,} keys back from the cache, each checked",
            seconds,
            f"{rate(count, seconds)} reads/s",
        )

    started = time.monotonic()
    shutil.rmtree(target.cache_dir)
    _step(3, f"delete the cache directory {target.cache_dir}", time.monotonic() - started, "(the log stays)")

    started = time.monotonic()
    replay_bar = ReplayBar("replay")
    try:
        kv = KVLog(path, codec=codec, follow=False, timeout=args.timeout, progress=replay_bar)
        replay_bar.finish()
    finally:
        replay_bar.close()
    with kv:
        seconds = time.monotonic() - started
        replayed = kv.open_replay["records"]
        _step(
            4,
            f"reopen: cold rebuild of the cache by replaying {replayed:,} records",
            seconds,
            f"{rate(replayed, seconds)} records/s",
        )

        started = time.monotonic()
        if len(kv) != count:
            print(f"kvlog: demo: {len(kv):,} entries after the rebuild, expected {count:,}", file=sys.stderr)
            return EXIT_NOT_FOUND
        for (key, value), (expected_key, expected) in zip(
            kv.scan(prefix="order:"), demo_orders(count), strict=True
        ):
            if key != expected_key or value != expected:
                print(f"kvlog: demo: {key} differs after the rebuild", file=sys.stderr)
                return EXIT_NOT_FOUND
        _step(5, f"check the rebuilt cache: all {count:,} orders identical", time.monotonic() - started)

        stats = kv.stats()
        log = log_stats(kv)
    print()
    print(f"entries      {stats['entries']:,}")
    print(f"checkpoint   {offsets(stats['checkpoint'])}")
    print(f"cache size   {stats['bytes_on_disk'] / 1e6:,.1f} MB on disk ({target.cache_dir})")
    if log:
        partitions = log.get("partitions") or {}
        segments = sum(info.get("segments", 0) for info in partitions.values())
        size = sum(info.get("bytes", 0) for info in partitions.values())
        print(f"log          {segments:,} segment(s), {size / 1e6:,.1f} MB ({log.get('path')})")
    print(f"done in {time.monotonic() - begun:.1f}s")
    if keep:
        print(f"try: kvlog {target.argv()} get {example}")
    return EXIT_OK
