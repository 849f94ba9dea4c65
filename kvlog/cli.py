"""The ``kvlog`` command: query, load, re-warm, verify and compact a kvlog database from a terminal.

This module holds the argument parser, the target (which log, which cache),
one function per command, and ``main``. The dump format is
:mod:`kvlog.dumpfile`, the demo :mod:`kvlog.demo`, signal handling and
progress bars :mod:`kvlog.terminal`.

Usage (also ``python -m kvlog``)::

    kvlog demo [--records N] [--dir DIR] [--keep]   # write, read, lose the cache, rebuild it, verify
    kvlog [--data ./data] COMMAND ...               # the embedded log (the default: --data ./data)
    kvlog --cache ./cache --bootstrap-servers HOST:9092 --topic orders COMMAND ...   # a Kafka topic

    kvlog ... get KEY [--raw]                       # the value as JSON (--raw: its bytes); exit 1 if absent
    kvlog ... put KEY JSON_VALUE                    # or: put --raw KEY < file (the value is stdin's bytes)
    kvlog ... del KEY                               # a tombstone; exit 1 if absent
    kvlog ... scan [--prefix P] [--limit N]         # JSON lines, in key order (the dump format)
    kvlog ... stats [--json]                        # entries, offsets, lag, identity, log segments
    kvlog ... dump [--prefix P] [-o FILE]           # JSON lines export
    kvlog ... load FILE|-                           # JSON lines import through the log, all or nothing on bad input
    kvlog ... rewarm [--resume]                     # rebuild the cache by replay; Ctrl-C is safe
    kvlog ... verify [--show N]                     # replay into a scratch cache and compare; exit 1 on differences
    kvlog ... compact [--json]                      # compact the embedded log now
    kvlog ... serve [--host H] [--port P] [--writable] [--token T] [--max-lag N]   # HTTP (kvlog[server])
    kvlog broker [--port 9092] [--dir DIR]          # a local Kafka broker for development (source checkout)

Values are decoded with the codec the cache records (the one the store was
built with; ``msgpack`` for a new store). ``--codec`` picks the codec of a
new store; on an existing one it must match the recorded codec, except for
``rewarm``, which rebuilds the cache for the codec given.

A KEY (and ``--prefix``) is text; bytes that are not UTF-8 (a key that dump
shows as ``"key_b64"``) are taken as they are.

``--bootstrap-servers`` and ``--topic`` may also come from
``KVLOG_BOOTSTRAP_SERVERS`` and ``KVLOG_TOPIC``; an explicit ``--data`` wins
over those variables, and ``--data`` together with ``--bootstrap-servers`` or
``--topic`` is a usage error. Global options go before the command.

The dump format (``dump``, ``scan``, ``load``) is JSON lines, one object per
entry, described in :mod:`kvlog.dumpfile`: ``dump`` then ``load`` reproduces
every key and value.

Exit codes (also in ``kvlog --help``): 0 success, 1 key not found or
differences found, 2 usage error or failure (one line on stderr, no
traceback: bad input, an unreachable broker, a directory that cannot be
written, ...), 130 interrupted (Ctrl-C or SIGTERM; the store is closed
cleanly first), 141 stdout closed early (a pipe into ``head``).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import logging
import math
import os
import shlex
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import IO, Any, NoReturn

from .codec import encode_key, get_codec
from .dumpfile import DumpLineError, dump_line, read_dump
from .dumpfile import jsonable as _jsonable
from .errors import CacheError, KVLogError
from .terminal import ReplayBar, count_bar, interruptible, offsets, rate, signals_ignored

__all__ = ["main"]

EXIT_OK, EXIT_NOT_FOUND, EXIT_ERROR = 0, 1, 2
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for a process a closed pipe killed

_EXIT_CODES_HELP = (
    "Exit codes: 0 success, 1 key not found or differences found, 2 usage error or failure "
    "(one line on stderr), 130 interrupted, 141 stdout closed early"
)
#: The codec of a new store when --codec is not given.
DEFAULT_CODEC = "msgpack"
_BUILTIN_CODECS = ("msgpack", "json", "str", "bytes")

#: Records per ``kv.update`` call in ``load`` and ``demo`` (one log append and one wait each).
LOAD_BATCH = 10_000
#: Where ``kvlog serve`` listens unless told otherwise: this machine only.
DEFAULT_SERVE_HOST = "127.0.0.1"
DEFAULT_SERVE_PORT = 8765
#: The command that installs what ``kvlog serve`` needs.
SERVER_EXTRA = "pip install 'kvlog[server]'"
#: Seconds ``kvlog serve`` gives open requests (long-polls) to finish when asked to stop.
SERVE_GRACE = 3
#: Seconds an opening replay runs before its progress bar appears (fast opens show none).
OPEN_BAR_DELAY = 1.0


class UsageError(Exception):
    """A mistake in the command line: reported in one line, exit 2."""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line (argparse prints the usage block too)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see {self.prog} --help)")


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError(text)
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


def _seconds(text: str) -> float:
    value = float(text)
    if not (0 < value < math.inf):  # also refuses nan
        raise ValueError(text)
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise ValueError(text)
    return value


_port.__name__ = "port number"
_non_negative.__name__ = "non-negative integer"  # argparse names the type in its message
_positive.__name__ = "positive integer"
_seconds.__name__ = "positive number of seconds"


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="kvlog",
        description="Query, load, re-warm, verify and compact a kvlog database.",
        epilog=f"Run 'kvlog demo' for a one-minute tour on the embedded log. {_EXIT_CODES_HELP}.",
    )
    target = parser.add_argument_group("target (the embedded log by default, or a Kafka topic)")
    target.add_argument(
        "--data", default=None, metavar="DIR", help="data directory of the embedded log (default: ./data)"
    )
    target.add_argument(
        "--cache", default=None, metavar="DIR", help="cache directory for a Kafka topic (default: ./cache)"
    )
    target.add_argument(
        "--bootstrap-servers",
        default=None,
        metavar="HOSTS",
        help="Kafka brokers, host:port[,host:port] (env KVLOG_BOOTSTRAP_SERVERS)",
    )
    target.add_argument("--topic", default=None, help="the compacted Kafka topic (env KVLOG_TOPIC)")
    parser.add_argument(
        "--codec",
        default=None,
        help="value codec of a new store: msgpack (default), json, str, bytes (an existing store's is recorded)",
    )
    parser.add_argument(
        "--timeout",
        type=_seconds,
        default=30.0,
        help="seconds to wait for the log per operation (default: 30)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    broker = sub.add_parser(
        "broker",
        help="run a local single-node Kafka broker for development (from kvlog's source checkout)",
        description="Run a local single-node Kafka broker for development: the devbroker package of "
        "kvlog's source repository (python -m devbroker there), which is not installed with kvlog.",
    )
    broker.add_argument("--port", type=int, default=9092)
    broker.add_argument("--dir", default=None, help="data directory (default: a temporary one)")

    demo = sub.add_parser(
        "demo", help="write a sample data set, read it back, lose the cache, rebuild it by replay, verify"
    )
    demo.add_argument(
        "--records", type=_positive, default=100_000, help="how many orders to write (default: 100000)"
    )
    demo.add_argument("--dir", default=None, help="a new or empty directory to use (kept afterwards)")
    demo.add_argument("--keep", action="store_true", help="keep the temporary data directory")

    get = sub.add_parser("get", help="print the value of KEY as JSON (exit 1 if absent)")
    get.add_argument("key")
    get.add_argument("--raw", action="store_true", help="write a bytes or str value's bytes as they are")

    put = sub.add_parser("put", help="write KEY = VALUE (VALUE is JSON)")
    put.add_argument("key")
    put.add_argument("value", nargs="?", help='a JSON value, e.g. \'{"status": "paid"}\'')
    put.add_argument("--raw", action="store_true", help="read the value as bytes from stdin instead")

    delete = sub.add_parser("del", help="write a tombstone for KEY (exit 1 if absent)")
    delete.add_argument("key")

    scan = sub.add_parser("scan", help="print entries in key order as JSON lines")
    scan.add_argument("--prefix", default=None)
    scan.add_argument("--limit", type=_non_negative, default=None)

    stats = sub.add_parser("stats", help="entries, checkpoint vs end offsets, lag, identity, log segments")
    stats.add_argument("--json", action="store_true", help="print one JSON object")

    dump = sub.add_parser("dump", help="export entries as JSON lines (the format load reads)")
    dump.add_argument("--prefix", default=None)
    dump.add_argument("-o", "--output", default="-", metavar="FILE", help="output file (default: stdout)")

    load = sub.add_parser("load", help="import JSON lines through the log (validated first: all or nothing)")
    load.add_argument("file", metavar="FILE", help="a dump file, or - for stdin")

    rewarm = sub.add_parser("rewarm", help="rebuild the cache by replaying the log from the start")
    rewarm.add_argument(
        "--resume", action="store_true", help="continue an interrupted rewarm from the cache's checkpoint"
    )

    verify = sub.add_parser(
        "verify", help="replay the log into a scratch cache and compare (exit 1 if differ)"
    )
    verify.add_argument("--show", type=_non_negative, default=20, help="differences to print (default: 20)")
    verify.add_argument(
        "--scratch", default=None, metavar="DIR", help="where to put the scratch cache (default: $TMPDIR)"
    )

    serve = sub.add_parser(
        "serve",
        help="serve the database over HTTP: keys, scans, stats, long-polls, metrics, a console",
        description="Serve the database over HTTP (Starlette on uvicorn; pip install 'kvlog[server]'). "
        "Routes: GET/PUT/DELETE /v1/keys/KEY, POST /v1/batch, GET /v1/scan, GET /v1/stats, "
        "/healthz, /readyz, /metrics, and the operator console at /.",
    )
    serve.add_argument(
        "--host",
        default=None,
        help=f"address to listen on (default: {DEFAULT_SERVE_HOST}, this machine only)",
    )
    serve.add_argument(
        "--port",
        type=_port,
        default=DEFAULT_SERVE_PORT,
        help=f"default: {DEFAULT_SERVE_PORT}; 0 picks a free one",
    )
    serve.add_argument("--writable", action="store_true", help="accept PUT, DELETE and POST /v1/batch")
    serve.add_argument(
        "--token",
        default=None,
        help="require Authorization: Bearer TOKEN on every route but /healthz and /readyz (env KVLOG_TOKEN)",
    )
    serve.add_argument(
        "--max-lag",
        type=_non_negative,
        default=None,
        help="/readyz answers 200 while the cache is at most this many records behind the log end "
        "(default: 1000)",
    )

    compact = sub.add_parser("compact", help="compact the embedded log now (Kafka compacts by itself)")
    compact.add_argument("--json", action="store_true", help="print the report as one JSON object")
    return parser


# -- the target: which log, which cache ----------------------------------------


@dataclass(frozen=True)
class Target:
    """What the command works on: an embedded data directory or a Kafka topic with its cache."""

    kind: str  # "local" or "kafka"
    path: Path  # the directory KVLog is opened at; the LMDB cache is path/"cache"
    bootstrap_servers: str | None = None
    topic: str | None = None

    @property
    def cache_dir(self) -> Path:
        """The LMDB cache's directory."""
        return self.path / "cache"

    def argv(self) -> str:
        """The global options that name this target, for messages that suggest a command."""
        if self.kind == "local":
            return f"--data {shlex.quote(str(self.path))}"
        return (
            f"--cache {shlex.quote(str(self.path))} --bootstrap-servers "
            f"{shlex.quote(str(self.bootstrap_servers))} --topic {shlex.quote(str(self.topic))}"
        )


def _target(args: argparse.Namespace) -> Target:
    if args.data is not None:
        if args.bootstrap_servers or args.topic:
            raise UsageError(
                "--data (the embedded log) cannot be combined with --bootstrap-servers or --topic (a Kafka topic)"
            )
        if args.cache is not None:
            raise UsageError("--cache is for a Kafka topic; the embedded log keeps its cache in DATA/cache")
        return Target("local", Path(args.data))
    servers = args.bootstrap_servers or os.environ.get("KVLOG_BOOTSTRAP_SERVERS") or None
    topic = args.topic or os.environ.get("KVLOG_TOPIC") or None
    if servers or topic:
        if not (servers and topic):
            raise UsageError(
                "a Kafka topic needs both --bootstrap-servers and --topic "
                "(or KVLOG_BOOTSTRAP_SERVERS and KVLOG_TOPIC)"
            )
        return Target("kafka", Path(args.cache or "./cache"), servers, topic)
    if args.cache is not None:
        raise UsageError(
            "--cache needs --bootstrap-servers and --topic (a Kafka topic); the embedded log is --data DIR"
        )
    return Target("local", Path("./data"))


def _open(
    args: argparse.Namespace,
    target: Target,
    *,
    progress: Any = None,
    background_compaction: bool = False,
    **kwargs: Any,
) -> Any:
    """Open the store for a command: no follower thread (the cache moves only when asked), no topic creation.

    ``kvlog serve``, which runs for long, asks for the follower (``follow=True``)
    and the embedded log's background compaction.
    """
    from .store import KVLog

    _check_not_a_file(target)
    own_bar = ReplayBar("replay", delay=OPEN_BAR_DELAY) if progress is None else None
    if own_bar is not None:
        progress = own_bar
    options: dict[str, Any] = {
        "timeout": args.timeout,
        "follow": False,
        "progress": progress,
        **kwargs,
    }
    try:
        if target.kind == "kafka":
            kv = KVLog(
                target.path,
                bootstrap_servers=target.bootstrap_servers,
                topic=target.topic,
                create_topic=False,
                codec=_codec(args, target),
                **options,
            )
        else:
            from .log.local import LocalLog

            # No background compaction in a short-lived command: it would make
            # `kvlog get` wait for a pass at close. `kvlog compact` runs one.
            log = LocalLog(target.path / "log", background_compaction=background_compaction)
            try:
                codec = _codec(args, target)
            except BaseException:
                log.close()
                raise
            kv = KVLog(target.path, log=log, codec=codec, **options)  # it closes the log if it fails
    finally:
        if own_bar is not None:
            own_bar.close()
    return kv


@contextlib.contextmanager
def _opened(args: argparse.Namespace, target: Target, **kwargs: Any) -> Iterator[Any]:
    """``_open`` as a context manager whose close is shielded from a second Ctrl-C."""
    kv = _open(args, target, **kwargs)
    try:
        yield kv
    finally:
        with signals_ignored():
            kv.close()


def _require_data_dir(target: Target) -> None:
    """Commands that only read refuse a missing data directory instead of creating an empty database."""
    _check_not_a_file(target)
    if target.kind == "local" and not target.path.is_dir():
        raise UsageError(
            f"no kvlog data directory at {target.path} (kvlog put or kvlog load creates one; "
            "--data DIR picks another)"
        )


def _check_not_a_file(target: Target) -> None:
    """A data or cache path that names something other than a directory is a usage error, said plainly."""
    if target.path.exists() and not target.path.is_dir():
        option = "--data" if target.kind == "local" else "--cache"
        raise UsageError(f"{option} {target.path} is not a directory")


def _recorded_codec(cache_dir: Path) -> str | None:
    """The codec an existing cache was built with, or ``None`` (no cache yet, or one that cannot be read).

    A cache that cannot be opened is left to the store's own open, which
    reports it (or, for rewarm, rebuilds it).
    """
    from .cache import Cache

    if not (cache_dir / "HEAD").is_file() and not (cache_dir / "data.mdb").is_file():
        return None
    try:
        cache = Cache(cache_dir)
    except CacheError:
        return None
    try:
        identity = cache.identity()
    except CacheError:
        return None
    finally:
        cache.close()
    codec = (identity or {}).get("codec")
    return codec if isinstance(codec, str) else None


def _codec(args: argparse.Namespace, target: Target) -> str:
    """The codec to open the store with: the recorded one; ``--codec`` for a new store or a rewarm.

    A store opened with another codec than its cache's rebuilds the whole
    cache and then misreads every value (JSON ``1`` is msgpack 49), so a
    different ``--codec`` is refused, except by rewarm, which rebuilds anyway.
    """
    recorded = _recorded_codec(target.cache_dir)
    if recorded is None:
        return args.codec or DEFAULT_CODEC
    if args.codec is None or args.codec == recorded:
        if recorded not in _BUILTIN_CODECS:
            raise UsageError(
                f"the cache at {target.cache_dir} was built with the codec {recorded!r}, which the kvlog "
                f"command does not have (it has {', '.join(_BUILTIN_CODECS)})"
            )
        return recorded
    if args.command == "rewarm":
        return str(args.codec)
    raise UsageError(
        f"the store at {target.path} holds {recorded} values; --codec {args.codec} would rebuild its "
        f"cache and misread them (leave --codec out, or rebuild the cache for {args.codec} with "
        f"kvlog --codec {args.codec} {target.argv()} rewarm)"
    )


# -- printing values and keys ---------------------------------------------------


def _show_key(key: bytes) -> str:
    try:
        return key.decode("utf-8")
    except UnicodeDecodeError:
        return repr(key)


# -- commands ---------------------------------------------------------------------


def _argv_key(text: str) -> str | bytes:
    """KEY as given on the command line: text, or its bytes where they are not UTF-8.

    Python decodes such argv bytes to lone surrogates (surrogateescape);
    ``os.fsencode`` gives the bytes back, so a key that dump shows as
    ``key_b64`` can be named. Checked before anything is opened.
    """
    try:
        text.encode("utf-8")
        key: str | bytes = text
    except UnicodeEncodeError:
        try:
            key = os.fsencode(text)
        except UnicodeEncodeError:
            key = text  # a surrogate no bytes stand for: encode_key says so
    try:
        encode_key(key)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"bad KEY: {exc}") from None
    return key


def _cmd_get(args: argparse.Namespace, target: Target) -> int:
    key = _argv_key(args.key)
    _require_data_dir(target)
    missing = object()
    with _opened(args, target) as kv:
        value = kv.get(key, missing)
    if value is missing:
        print(f"kvlog: key not found: {_show_key(encode_key(key))}", file=sys.stderr)
        return EXIT_NOT_FOUND
    if args.raw:
        if isinstance(value, str):
            value = value.encode("utf-8")
        if not isinstance(value, bytes):
            raise UsageError(
                f"--raw prints bytes or str values; the value of {args.key} is {type(value).__name__}"
            )
        sys.stdout.flush()
        sys.stdout.buffer.write(value)
        sys.stdout.buffer.flush()
    else:
        try:
            text = json.dumps(_jsonable(value), ensure_ascii=False)
        except RecursionError:
            raise ValueError(
                f"the value of {args.key} nests too deeply to print as JSON; "
                "kvlog dump exports it (as value_msgpack_b64)"
            ) from None
        print(text)
    return EXIT_OK


def _cmd_put(args: argparse.Namespace, target: Target) -> int:
    key = _argv_key(args.key)
    value: Any
    if args.raw:
        if args.value is not None:
            raise UsageError("with --raw the value is read from stdin; do not pass VALUE")
    elif args.value is None:
        raise UsageError("put needs KEY and VALUE (a JSON value), or --raw to read the value from stdin")
    codec = get_codec(_codec(args, target))
    if args.raw:
        value = sys.stdin.buffer.read()
        if codec.name == "str":
            try:
                value = value.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ValueError(f"the str codec stores UTF-8 text; stdin is not: {exc}") from None
    else:
        value = _parse_json(str(args.value), "VALUE")
    # Checked before the store is opened: a value the codec refuses creates
    # no data directory and writes nothing.
    codec.encode(value)
    with _opened(args, target) as kv:
        kv[key] = value
    return EXIT_OK


def _parse_json(text: str, what: str) -> Any:
    """``json.loads(text)``; a usage error naming ``what`` if it is not JSON or nests too deeply to parse."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{what} is not valid JSON: {exc}") from None
    except RecursionError:
        raise UsageError(f"{what} nests too deeply for Python's JSON parser") from None


def _cmd_del(args: argparse.Namespace, target: Target) -> int:
    key = _argv_key(args.key)
    _require_data_dir(target)
    with _opened(args, target) as kv:
        if key not in kv:
            print(f"kvlog: key not found: {_show_key(encode_key(key))}", file=sys.stderr)
            return EXIT_NOT_FOUND
        del kv[key]
    return EXIT_OK


def _argv_prefix(text: str | None) -> str | bytes | None:
    """--prefix as given: text, or its bytes where they are not UTF-8 (see ``_argv_key``)."""
    if text is None:
        return None
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        try:
            return os.fsencode(text)
        except UnicodeEncodeError:
            raise UsageError(
                f"bad --prefix {text!r}: not UTF-8 and not bytes from the command line"
            ) from None


def _cmd_scan(args: argparse.Namespace, target: Target) -> int:
    prefix = _argv_prefix(args.prefix)
    _require_data_dir(target)
    if args.limit == 0:
        return EXIT_OK
    with _opened(args, target, key_type=bytes) as kv:
        for n, (key, value) in enumerate(kv.scan(prefix=prefix), 1):
            print(dump_line(key, value))
            if args.limit is not None and n >= args.limit:
                break
    return EXIT_OK


def log_stats(kv: Any) -> dict[str, Any] | None:
    """The log's own stats (segments, bytes, recovery, compaction), if the log keeps any: the embedded one does."""
    stats = getattr(kv.log, "stats", None)
    return dict(stats()) if callable(stats) else None


def _cmd_stats(args: argparse.Namespace, target: Target) -> int:
    _require_data_dir(target)
    with _opened(args, target) as kv:
        stats = kv.stats()
        if "log_stats" not in stats:
            log = log_stats(kv)
            if log is not None:
                stats["log_stats"] = log
        description = kv.log.describe()
    if args.json:
        print(json.dumps(stats, default=str))
    else:
        _print_stats(stats, description, target)
    return EXIT_OK


def _human(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.3f}".rstrip("0").rstrip(".") if value else "0"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_human(v)}" for k, v in value.items())
    return str(value)


def _print_stats(stats: dict[str, Any], description: str, target: Target) -> None:
    label = "data" if target.kind == "local" else "cache"
    print(f"{label:<12} {stats['path']}")
    print(f"mirrors      {description}")
    ident = ", ".join(f"{k}={v}" for k, v in stats["log"].items())
    print(f"identity     {ident}")
    print(f"codec        {stats['codec']}")
    print(f"entries      {stats['entries']:,}")
    print(f"cache size   {stats['bytes_on_disk'] / 1e6:,.1f} MB on disk")
    lag = stats["lag"]
    end_offsets = stats["end_offsets"]
    print("partition    checkpoint    end offset    lag")
    for p, position in sorted(stats["checkpoint"].items()):
        end = "?" if end_offsets is None else f"{end_offsets[p]:,}"
        behind = "?" if lag is None else f"{lag[p]:,}"
        print(f"{p:>9}    {position:>10,}    {end:>10}    {behind}")
    opened = stats["open_replay"]
    reason = f" ({opened['rebuild_reason']})" if opened.get("rebuild_reason") else ""
    print(
        f"last open    {opened['mode']}, replayed {opened['records']:,} records in {opened['seconds']}s{reason}"
    )
    log_stats = stats.get("log_stats")
    if log_stats:
        _print_log_stats(log_stats)


def _print_log_stats(log_stats: dict[str, Any]) -> None:
    """The embedded log's own stats: segments, bytes, dirty ratio per partition; recovery; compaction."""
    partitions = log_stats.get("partitions")
    rest = {k: v for k, v in log_stats.items() if k not in ("partitions", "recovery", "last_compaction")}
    print("log          " + ", ".join(f"{k} {_human(v)}" for k, v in rest.items()))
    if isinstance(partitions, dict):
        print("partition    segments         bytes    begin offset    dirty ratio")
        for p, info in sorted(partitions.items()):
            print(
                f"{p:>9}    {_human(info.get('segments')):>8}    {_human(info.get('bytes')):>10}    "
                f"{_human(info.get('begin_offset')):>12}    {_human(info.get('dirty_ratio')):>11}"
            )
    recovery = log_stats.get("recovery")
    if isinstance(recovery, dict):
        cut = [(p, entry) for p, entries in sorted(recovery.items()) for entry in entries or ()]
        if not cut:
            print("recovery     clean (nothing cut at the last open)")
        for p, entry in cut:
            print(f"recovery     partition {p}: {_human(entry)}")
    if "last_compaction" in log_stats:
        last = log_stats["last_compaction"]
        print(f"compaction   {'none since the log was opened' if not last else _human(last)}")


def _cmd_dump(args: argparse.Namespace, target: Target) -> int:
    _require_data_dir(target)
    started = time.monotonic()
    prefix = _argv_prefix(args.prefix)
    with _opened(args, target, key_type=bytes) as kv:
        total = len(kv) if prefix is None else None
        with contextlib.ExitStack() as stack:
            if args.output == "-":
                out: IO[str] = sys.stdout
                partial = None
            else:
                # Written beside the target and renamed at the end: an
                # interrupted dump never leaves a truncated file that looks whole.
                final = Path(args.output)
                partial = final.with_name(final.name + ".partial")
                out = stack.enter_context(open(partial, "w", encoding="utf-8"))
            bar = stack.enter_context(count_bar("dump", total, delay=0.5))
            count = 0
            try:
                for key, value in kv.scan(prefix=prefix):
                    out.write(dump_line(key, value))
                    out.write("\n")
                    count += 1
                    if count % 1000 == 0:
                        bar.update(1000)
                bar.update(count - bar.n)
            except BaseException:
                if partial is not None:
                    out.close()
                    partial.unlink(missing_ok=True)
                raise
        if partial is not None:
            os.replace(partial, args.output)
    where = "stdout" if args.output == "-" else args.output
    seconds = time.monotonic() - started
    print(f"kvlog: dumped {count:,} entries to {where} in {seconds:.2f}s", file=sys.stderr)
    return EXIT_OK


def _cmd_load(args: argparse.Namespace, target: Target) -> int:
    _check_not_a_file(target)
    encode = get_codec(_codec(args, target)).encode
    started = time.monotonic()
    # The whole input is parsed and checked before the store is even opened:
    # a bad line anywhere writes nothing.
    try:
        if args.file == "-":
            stdin = sys.stdin
            if hasattr(stdin, "buffer"):
                stdin = io.TextIOWrapper(stdin.buffer, encoding="utf-8", errors="surrogateescape")
            items = read_dump(stdin, encode)
        else:
            with open(args.file, encoding="utf-8", errors="surrogateescape") as stream:
                items = read_dump(stream, encode)
    except DumpLineError as exc:
        raise ValueError(f"{exc}; nothing was written") from None
    with _opened(args, target) as kv:
        written = 0
        try:
            with count_bar("load", len(items)) as bar:
                for start in range(0, len(items), LOAD_BATCH):
                    batch = items[start : start + LOAD_BATCH]
                    kv.update(batch)
                    written += len(batch)
                    bar.update(len(batch))
        except KeyboardInterrupt:
            print(f"kvlog: load interrupted after {written:,} of {len(items):,} records", file=sys.stderr)
            raise
        entries = len(kv)
    seconds = time.monotonic() - started
    print(
        f"loaded {written:,} records in {seconds:.2f}s ({rate(written, seconds)} records/s); "
        f"the store holds {entries:,} entries"
    )
    return EXIT_OK


def _is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine only (127.0.0.0/8, ::1, localhost)."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _serve_host(args: argparse.Namespace, token: str | None) -> str:
    """The address to bind: loopback unless ``--host`` names another, which needs a token or says so."""
    if args.host is None:
        return DEFAULT_SERVE_HOST
    host = str(args.host)
    if not _is_loopback(host) and token is None:
        # Asked for in so many words: allowed (behind a proxy that checks
        # clients, say), but never by default and never silently.
        print(
            f"kvlog: warning: serving on {host} without --token: anyone who reaches this address "
            "can read" + (" and write" if args.writable else "") + " the database",
            file=sys.stderr,
        )
    return host


def _cmd_serve(args: argparse.Namespace, target: Target) -> int:
    try:
        import uvicorn

        from . import http as kvlog_http
    except ImportError as exc:
        raise UsageError(f"kvlog serve needs the server extra ({exc}): {SERVER_EXTRA}") from None
    import socket

    token = args.token if args.token is not None else os.environ.get("KVLOG_TOKEN") or None
    if token is not None and not token.strip():
        raise UsageError("--token is empty")
    host = _serve_host(args, token)
    # Bound before the store opens: a port in use fails at once, and --port 0
    # is resolved to the port printed below.
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        info = socket.getaddrinfo(host, args.port, family, socket.SOCK_STREAM)[0]
        # proto=IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets
        # that say they are TCP, and without it every keep-alive answer (head and
        # body written apart) waits out a delayed ACK: ~40 ms a request.
        sock = socket.socket(info[0], socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(info[4])
    except OSError as exc:
        raise UsageError(f"cannot listen on {host}:{args.port}: {exc}") from None
    sock.set_inheritable(True)
    port = sock.getsockname()[1]
    kv = _open(args, target, follow=True, background_compaction=True)
    try:
        application = kvlog_http.app(
            kv,
            writable=args.writable,
            token=token,
            max_lag=kvlog_http.DEFAULT_MAX_LAG if args.max_lag is None else args.max_lag,
        )
        config = uvicorn.Config(
            application,
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=SERVE_GRACE,
            lifespan="on",
        )
        server = uvicorn.Server(config)
        shown = f"[{host}]" if ":" in host else host
        mode = "read-write" if args.writable else "read-only"
        print(
            f"kvlog: serving {kv.log.describe()} at http://{shown}:{port}/ ({mode}"
            f"{', token required' if token else ''})",
            flush=True,
        )
        try:
            server.run(sockets=[sock])
        except KeyboardInterrupt:
            pass  # uvicorn stopped on SIGINT or SIGTERM and passed the signal on: a clean stop
    finally:
        sock.close()
        with signals_ignored():
            kv.close()
    return EXIT_OK


def _cmd_compact(args: argparse.Namespace, target: Target) -> int:
    if target.kind == "kafka":
        raise UsageError(
            "compact works on the embedded log only; the broker's log cleaner compacts a Kafka topic"
        )
    _require_data_dir(target)
    from .log.local import LocalLog

    with _opened(args, target) as kv:
        if not isinstance(kv.log, LocalLog):
            raise UsageError("compact works on the embedded log only")
        report = dict(kv.log.compact())
    if args.json:
        print(json.dumps(report, default=str))
    else:
        print("compacted the log")
        for name, value in report.items():
            print(f"  {name:<22} {_human(value)}")
    return EXIT_OK


def _cmd_verify(args: argparse.Namespace, target: Target) -> int:
    from .verify import verify

    _require_data_dir(target)
    with _opened(args, target) as kv:
        bar = ReplayBar("verify", delay=0.5)
        try:
            report = verify(kv, progress=bar, limit=args.show, scratch_dir=args.scratch)
            bar.finish()
        finally:
            bar.close()
    where = offsets(report.checkpoint) if report.checkpoint else "the log start"
    if report.ok:
        print(
            f"verified {report.checked:,} keys at {where} ({report.records:,} records replayed "
            f"in {report.seconds:.2f}s): the cache matches the log"
        )
        return EXIT_OK
    print(
        f"verified {report.checked:,} keys at {where}: {report.missing:,} missing in the cache, "
        f"{report.extra:,} extra in the cache, {report.different:,} with a different value"
    )
    labels = {"missing": "missing in cache", "extra": "extra in cache", "different": "different value"}
    for diff in report.differences:
        detail = {
            "missing": f"the log has {len(diff.expected or b'')} bytes",
            "extra": f"the cache has {len(diff.actual or b'')} bytes",
            "different": f"the cache has {len(diff.actual or b'')} bytes, the log {len(diff.expected or b'')}",
        }[diff.kind]
        print(f"  {labels[diff.kind]:<17} {_show_key(diff.key)}  ({detail})")
    shown = len(report.differences)
    total = report.missing + report.extra + report.different
    if shown < total:
        print(f"  ... and {total - shown:,} more (--show N prints more)")
    print(f"kvlog rewarm rebuilds the cache from the log: kvlog {target.argv()} rewarm")
    return EXIT_NOT_FOUND


def _cmd_rewarm(args: argparse.Namespace, target: Target) -> int:
    _require_data_dir(target)
    bar = ReplayBar("rewarm")
    kv = None
    resumed = ""
    beside = False  # a rebuild beside the live cache, which an interrupt abandons
    try:
        if args.resume:
            # An interrupted rewarm left a consistent partial cache: opening the
            # store replays the rest, from its checkpoint, through this bar.
            started = time.monotonic()
            kv = _open(args, target, progress=bar)
            bar.finish()
            records, seconds = kv.open_replay["records"], time.monotonic() - started
            reason = kv.open_replay.get("rebuild_reason")
            if reason and reason != "new cache":
                # The store logged why (a "kvlog: warning:" line); say what it means here.
                resumed = ", rebuilt from the log start: the checkpoint could not be trusted"
            elif bar.first is None or all(bar.first.get(p, 0) >= t for p, t in bar.target.items()):
                print(f"the cache is already at the end of the log ({offsets(kv.stats()['checkpoint'])})")
                return EXIT_OK
            elif any(bar.first.values()):
                resumed = f", resumed from {offsets(bar.first)}"
        else:
            try:
                kv = _open(args, target)
            except CacheError as exc:
                # Rebuilding the cache is what rewarm is for, so a damaged one is
                # no reason to stop: the log holds everything it held.
                print(f"kvlog: warning: {exc}", file=sys.stderr)
                print(
                    f"kvlog: warning: deleting {target.cache_dir} and rebuilding it from the log",
                    file=sys.stderr,
                )
                shutil.rmtree(target.cache_dir)
                started = time.monotonic()
                kv = _open(args, target, progress=bar)
                bar.finish()
                records, seconds = kv.open_replay["records"], time.monotonic() - started
            else:
                beside = True
                result = kv.rewarm(progress=bar)
                bar.finish()
                records, seconds = result["records"], result["seconds"]
        entries = len(kv)
    except KeyboardInterrupt:
        with signals_ignored():  # a second Ctrl-C must not cut the clean-up short
            bar.close()
            if kv is not None:
                kv.close()
            # The replayer commits every batch with its checkpoint in one LMDB
            # transaction, so whatever the interrupt cut short was rolled back:
            # the cache on disk is the log folded up to this checkpoint.
            checkpoint = _committed_checkpoint(target.cache_dir)
            where = offsets(checkpoint, bar.target or None) if checkpoint else "the log start"
            if beside:
                # The new cache was being built beside the live one, which no
                # process stopped reading: it is as it was, and the partial
                # one is deleted.
                print(
                    f"kvlog: interrupted; the rewarm was abandoned and the live cache is unchanged "
                    f"(consistent at {where}); kvlog {target.argv()} rewarm starts it again",
                    file=sys.stderr,
                )
            else:
                print(
                    f"kvlog: interrupted; the cache is consistent at {where}; "
                    f"kvlog {target.argv()} rewarm --resume continues from there",
                    file=sys.stderr,
                )
        return EXIT_INTERRUPTED
    finally:
        bar.close()
        if kv is not None:
            with signals_ignored():
                kv.close()
    print(
        f"rewarmed {entries:,} entries from {records:,} records in {seconds:.2f}s "
        f"({rate(records, seconds)} records/s){resumed}"
    )
    return EXIT_OK


def _committed_checkpoint(cache_dir: Path) -> dict[int, int]:
    """The checkpoint the cache on disk holds (read after the store closed)."""
    from .cache import Cache

    if not cache_dir.is_dir():
        return {}
    cache = Cache(cache_dir)
    try:
        return cache.checkpoint()
    finally:
        cache.close()


def _cmd_demo(args: argparse.Namespace) -> int:
    # Imported here: kvlog.demo imports this module (the target, the exit codes).
    from .demo import cmd_demo

    return cmd_demo(args)


def _cmd_broker(args: argparse.Namespace) -> int:
    try:
        devbroker = _import_devbroker()
    except ImportError as exc:
        return _fail(str(exc))
    argv = ["--port", str(args.port)] + (["--dir", args.dir] if args.dir else [])
    code: int = devbroker.main(argv)
    return code


def _import_devbroker() -> ModuleType:
    """The development broker: importable as it is, or from the source checkout this kvlog runs from.

    It lives next to the kvlog package in the source repository and is not
    installed with kvlog, so an installed ``kvlog`` (whose script does not
    start in the checkout) finds it only through the checkout's directory.

    Raises:
        ImportError: with the one-line message to print.
    """
    try:
        return importlib.import_module("devbroker")
    except ModuleNotFoundError as exc:
        if exc.name != "devbroker":
            raise ImportError(f"kvlog broker cannot import the development broker: {exc}") from None
    checkout = Path(__file__).resolve().parent.parent
    if (checkout / "devbroker" / "__init__.py").is_file():
        sys.path.append(str(checkout))
        try:
            return importlib.import_module("devbroker")
        except ModuleNotFoundError as exc:
            if exc.name != "devbroker":
                raise ImportError(
                    f"kvlog broker cannot import the development broker from {checkout}: {exc}"
                ) from None
    raise ImportError(
        "kvlog broker needs the development broker, which ships in kvlog's source repository "
        "(devbroker/): run it from a checkout with python -m devbroker"
    )


# -- main -----------------------------------------------------------------------------

_COMMANDS: dict[str, Callable[[argparse.Namespace, Target], int]] = {
    "get": _cmd_get,
    "put": _cmd_put,
    "del": _cmd_del,
    "scan": _cmd_scan,
    "stats": _cmd_stats,
    "dump": _cmd_dump,
    "load": _cmd_load,
    "compact": _cmd_compact,
    "serve": _cmd_serve,
    "verify": _cmd_verify,
    "rewarm": _cmd_rewarm,
}


def _run(args: argparse.Namespace) -> int:
    if args.command == "broker":
        return _cmd_broker(args)
    if args.codec is not None:
        get_codec(args.codec)  # a bad name is a usage error before anything is opened
    with interruptible():
        if args.command == "demo":
            return _cmd_demo(args)
        return _COMMANDS[args.command](args, _target(args))


def _fail(message: str) -> int:
    print(f"kvlog: error: {' '.join(message.split())}", file=sys.stderr)
    return EXIT_ERROR


class _OneLineFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"kvlog: {record.levelname.lower()}: {' '.join(record.getMessage().split())}"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``kvlog`` command; return its exit code."""
    # kvlog's own warnings (a rebuilt cache, a recovered log tail) as one
    # "kvlog: warning:" line each, on the stderr of this call.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_OneLineFormatter())
    handler.setLevel(logging.WARNING)
    package_logger = logging.getLogger("kvlog")
    package_logger.addHandler(handler)
    try:
        return _main(argv)
    finally:
        package_logger.removeHandler(handler)


def _main(argv: Sequence[str] | None) -> int:
    try:
        args = _parser().parse_args(argv)
    except UsageError as exc:
        return _fail(str(exc))
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    try:
        return _run(args)
    except UsageError as exc:
        return _fail(str(exc))
    except BrokenPipeError:
        # The reader of stdout went away (kvlog scan | head). Point stdout at
        # /dev/null so the interpreter's final flush does not fail again.
        with contextlib.suppress(OSError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except (KVLogError, OSError, ValueError, TypeError) as exc:
        return _fail(str(exc) or type(exc).__name__)
    except KeyboardInterrupt:
        print("kvlog: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
