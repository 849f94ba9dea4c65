"""A reader process for the footprint workload: load a topic, read every key once, report memory.

    python -m benchmarks._reader_child SUBJECT --bootstrap HOST:PORT --topic T --keys N [--cache DIR]

SUBJECT is ``kvlog`` (opens a KVLog on ``--cache``, warm or empty), ``dict``
(a kafka-python consumer folding the topic into a dict), ``ktables`` (a
``KafkaTable``) or ``baseline`` (only imports kvlog, kafka and aiokafka).
Prints one JSON line on stdout: resident memory now (``rss_mb``), its peak
(``hwm_mb``), the anonymous / file-backed split of the current figure, the
entries held, and the seconds to ready and to read every key. Every child,
whatever its subject, first imports the same clients (:func:`import_clients`),
so the ``baseline`` child's figure is exactly the floor the others share and
subtracting it leaves what holding the table costs.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.harness import Context

_MB = 1024 * 1024


def memory() -> dict[str, float]:
    """Resident memory of this process in MB: now, peak, anonymous and file-backed parts."""
    fields = {"VmRSS": "rss_mb", "VmHWM": "hwm_mb", "RssAnon": "anon_mb", "RssFile": "file_mb"}
    out: dict[str, float] = {}
    try:
        with open("/proc/self/status") as status:
            for line in status:
                name, _, rest = line.partition(":")
                if name in fields:
                    out[fields[name]] = int(rest.split()[0]) * 1024 / _MB  # reported in kB
    except OSError:
        pass
    if "rss_mb" not in out:  # not Linux
        import psutil

        out["rss_mb"] = psutil.Process().memory_info().rss / _MB
    return out


def read_all(get: Any, ctx: Context) -> float:
    """Read every key once (each must be present); return the seconds it took.

    The keys are made one at a time, not held in a list, so they add nothing to the figure.
    """
    started = time.perf_counter()
    for i in range(ctx.keys):
        key = ctx.key(i)
        if get(key) is None:
            raise SystemExit(f"key {key!r} missing")
    return time.perf_counter() - started


def run_kvlog(args: argparse.Namespace, ctx: Context) -> dict[str, Any]:
    from kvlog import KVLog

    started = time.perf_counter()
    kv = KVLog(args.cache, bootstrap_servers=args.bootstrap, topic=args.topic)
    ready = time.perf_counter() - started
    try:
        reading = read_all(kv.get, ctx)
        gc.collect()
        stats = kv.stats()
        return {
            **memory(),
            "entries": stats["entries"],
            "ready_seconds": ready,
            "read_seconds": reading,
            "mode": stats["open_replay"]["mode"],
            "records_replayed": stats["open_replay"]["records"],
            "bytes_on_disk": stats["bytes_on_disk"],
        }
    finally:
        kv.close()


def run_dict(args: argparse.Namespace, ctx: Context) -> dict[str, Any]:
    import msgpack
    from kafka import KafkaConsumer, TopicPartition

    started = time.perf_counter()
    consumer = KafkaConsumer(bootstrap_servers=args.bootstrap, group_id=None, enable_auto_commit=False)
    try:
        partitions = consumer.partitions_for_topic(args.topic)
        if not partitions:
            raise SystemExit(f"topic {args.topic!r} has no partitions")
        tps = [TopicPartition(args.topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        end = consumer.end_offsets(tps)
        table: dict[str, Any] = {}
        unpackb = msgpack.unpackb
        while any(consumer.position(tp) < end[tp] for tp in tps):
            for records in consumer.poll(timeout_ms=500).values():
                for record in records:
                    key = record.key.decode()
                    if record.value is None:
                        table.pop(key, None)
                    else:
                        table[key] = unpackb(record.value)
    finally:
        consumer.close(autocommit=False)
    ready = time.perf_counter() - started
    reading = read_all(table.get, ctx)
    gc.collect()
    return {**memory(), "entries": len(table), "ready_seconds": ready, "read_seconds": reading}


def run_ktables(args: argparse.Namespace, ctx: Context) -> dict[str, Any]:
    import asyncio

    from benchmarks.ktables_bench import CATCHUP_TIMEOUT, _decode, _ktables, _quiet_logs

    ktables = _ktables()

    async def main() -> dict[str, Any]:
        started = time.perf_counter()
        table = ktables.KafkaTable(
            connection=args.bootstrap,
            topic=args.topic,
            value_decoder=_decode,
            catchup_timeout=CATCHUP_TIMEOUT,
        )
        async with table:
            ready = time.perf_counter() - started
            if table.status != "caught_up":
                raise SystemExit(f"ktables came up {table.status!r}")
            reading = read_all(table.get, ctx)  # no await inside: the table cannot change meanwhile
            gc.collect()
            return {**memory(), "entries": len(table), "ready_seconds": ready, "read_seconds": reading}

    with _quiet_logs():
        return asyncio.run(main())


def import_clients() -> None:
    """Import every client a subject may use: the floor all children share (a few MB)."""
    import aiokafka  # noqa: F401
    import kafka  # noqa: F401

    import kvlog  # noqa: F401
    from kvlog.log import kafka as kvlog_kafka  # noqa: F401 - what KVLog(bootstrap_servers=...) imports

    try:
        import ktables  # noqa: F401
    except ImportError:
        pass


def run_baseline(args: argparse.Namespace, ctx: Context) -> dict[str, Any]:
    gc.collect()
    return {**memory(), "entries": 0, "ready_seconds": 0.0, "read_seconds": 0.0}


SUBJECTS = {"kvlog": run_kvlog, "dict": run_dict, "ktables": run_ktables, "baseline": run_baseline}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("subject", choices=sorted(SUBJECTS))
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--keys", type=int, required=True)
    parser.add_argument("--cache", type=Path, help="the kvlog cache directory (kvlog only)")
    args = parser.parse_args(argv)
    if args.subject == "kvlog" and args.cache is None:
        parser.error("kvlog needs --cache")
    # For ctx.key(): the same keys every other workload reads.
    ctx = Context(keys=args.keys, runs=1, workdir=Path("."), bootstrap_servers=args.bootstrap, reads=0)
    import_clients()
    result = SUBJECTS[args.subject](args, ctx)
    if args.subject != "baseline" and result["entries"] != args.keys:
        raise SystemExit(f"{args.subject} holds {result['entries']:,} entries, expected {args.keys:,}")
    print(json.dumps(result), flush=True)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
