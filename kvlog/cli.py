"""The ``kvlog`` command: inspect, query and re-warm a cache from a terminal.

Usage (also ``python -m kvlog``)::

    kvlog broker [--port 9092]                  # a local dev Kafka broker (Ctrl-C stops it)
    kvlog --cache ./cache --bootstrap-servers localhost:9092 --topic orders stats [--json]
    kvlog ... get KEY
    kvlog ... put KEY JSON_VALUE
    kvlog ... del KEY
    kvlog ... scan [--prefix P] [--limit N]     # JSON lines
    kvlog ... rewarm                             # progress bar, then a summary

``--bootstrap-servers`` and ``--topic`` may also come from
``KVLOG_BOOTSTRAP_SERVERS`` and ``KVLOG_TOPIC``.

Exit codes: 0 success, 1 key not found, 2 usage error or failure (one line on
stderr, no traceback).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from .errors import KVLogError

__all__ = ["main"]

EXIT_OK, EXIT_NOT_FOUND, EXIT_ERROR = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvlog", description="Inspect, query and re-warm a kvlog cache.")
    parser.add_argument("--cache", default="./cache", help="cache directory (default: ./cache)")
    parser.add_argument(
        "--bootstrap-servers",
        default=os.environ.get("KVLOG_BOOTSTRAP_SERVERS"),
        help="Kafka brokers, host:port[,host:port] (env KVLOG_BOOTSTRAP_SERVERS)",
    )
    parser.add_argument(
        "--topic", default=os.environ.get("KVLOG_TOPIC"), help="compacted topic (env KVLOG_TOPIC)"
    )
    parser.add_argument("--codec", default="msgpack", help="value codec: msgpack, json, str, bytes")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the broker")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    broker = sub.add_parser("broker", help="run a local single-node Kafka broker for development")
    broker.add_argument("--port", type=int, default=9092)
    broker.add_argument("--dir", default=None, help="data directory (default: a temporary one)")

    stats = sub.add_parser("stats", help="entries, checkpoint vs end offsets, lag, identity")
    stats.add_argument("--json", action="store_true", help="print one JSON object")

    get = sub.add_parser("get", help="print the value of KEY as JSON")
    get.add_argument("key")

    put = sub.add_parser("put", help="write KEY = VALUE (VALUE is JSON)")
    put.add_argument("key")
    put.add_argument("value", help='a JSON value, e.g. \'{"status": "paid"}\'')

    delete = sub.add_parser("del", help="write a tombstone for KEY")
    delete.add_argument("key")

    scan = sub.add_parser("scan", help="print entries in key order as JSON lines")
    scan.add_argument("--prefix", default=None)
    scan.add_argument("--limit", type=int, default=None)

    sub.add_parser("rewarm", help="drop the cache and rebuild it by replaying the topic")
    return parser


def _jsonable(value: Any) -> Any:
    """Make msgpack values printable as JSON (bytes become str where they decode)."""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return value.hex()
    if isinstance(value, dict):
        return {str(_jsonable(k)): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _open(args: argparse.Namespace, **kwargs: Any) -> Any:
    from .store import KVLog

    if not args.bootstrap_servers or not args.topic:
        raise _UsageError(
            "--bootstrap-servers and --topic are required (or KVLOG_BOOTSTRAP_SERVERS and KVLOG_TOPIC)"
        )
    return KVLog(
        args.cache,
        bootstrap_servers=args.bootstrap_servers,
        topic=args.topic,
        codec=args.codec,
        timeout=args.timeout,
        create_topic=False,
        **kwargs,
    )


class _UsageError(Exception):
    pass


def _print_stats(stats: dict[str, Any]) -> None:
    ident = stats["log"]
    print(f"cache        {stats['path']}")
    print(f"mirrors      {ident['kind']} topic {ident.get('topic')!r} (cluster {ident.get('cluster_id')})")
    print(f"codec        {stats['codec']}")
    print(f"entries      {stats['entries']:,}")
    print(f"on disk      {stats['bytes_on_disk'] / 1e6:,.1f} MB")
    lag = stats["lag"]
    print("partition    checkpoint    end offset    lag")
    for p, position in sorted(stats["checkpoint"].items()):
        end = "?" if stats["end_offsets"] is None else f"{stats['end_offsets'][p]:,}"
        behind = "?" if lag is None else f"{lag[p]:,}"
        print(f"{p:>9}    {position:>10,}    {end:>10}    {behind}")
    opened = stats["open_replay"]
    print(f"last open    {opened['mode']}, replayed {opened['records']:,} records in {opened['seconds']}s")


def _rewarm(kv: Any) -> dict[str, Any]:
    from tqdm import tqdm

    total = sum(kv.stats()["end_offsets"].values())
    with tqdm(total=total, unit="rec", unit_scale=True, desc="rewarm", file=sys.stderr) as bar:

        def progress(positions: dict[int, int]) -> None:
            bar.update(sum(positions.values()) - bar.n)

        result: dict[str, Any] = kv.rewarm(progress=progress)
        bar.update(total - bar.n)
    return result


def _run(args: argparse.Namespace) -> int:
    if args.command == "broker":
        from . import devbroker

        argv = ["--port", str(args.port)] + (["--dir", args.dir] if args.dir else [])
        return devbroker.main(argv)
    from .codec import get_codec

    get_codec(args.codec)  # a bad name is a usage error before any connection
    with _open(args, follow=False) as kv:
        if args.command == "stats":
            stats = kv.stats()
            if args.json:
                print(json.dumps(stats, default=str))
            else:
                _print_stats(stats)
        elif args.command == "get":
            if args.key not in kv:
                print(f"kvlog: key not found: {args.key}", file=sys.stderr)
                return EXIT_NOT_FOUND
            print(json.dumps(_jsonable(kv[args.key]), ensure_ascii=False))
        elif args.command == "put":
            try:
                value = json.loads(args.value)
            except json.JSONDecodeError as exc:
                raise _UsageError(f"VALUE is not valid JSON: {exc}") from None
            kv[args.key] = value
        elif args.command == "del":
            if args.key not in kv:
                print(f"kvlog: key not found: {args.key}", file=sys.stderr)
                return EXIT_NOT_FOUND
            del kv[args.key]
        elif args.command == "scan":
            for n, (key, value) in enumerate(kv.scan(prefix=args.prefix)):
                if args.limit is not None and n >= args.limit:
                    break
                print(json.dumps({"key": _jsonable(key), "value": _jsonable(value)}, ensure_ascii=False))
        elif args.command == "rewarm":
            result = _rewarm(kv)
            rate = result["records"] / result["seconds"] if result["seconds"] else float("inf")
            print(
                f"rewarmed {kv.stats()['entries']:,} entries from {result['records']:,} records "
                f"in {result['seconds']:.2f}s ({rate:,.0f} records/s)"
            )
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``kvlog`` command; return its exit code."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on usage errors, 0 on --help
        return int(exc.code or 0)
    try:
        return _run(args)
    except _UsageError as exc:
        print(f"kvlog: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except (KVLogError, ValueError, TypeError) as exc:
        print(f"kvlog: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("kvlog: interrupted", file=sys.stderr)
        return 130
