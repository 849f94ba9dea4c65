"""The ``kvlog`` command: query, load, re-warm, verify and compact a kvlog database from a terminal.

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
    kvlog broker [--port 9092] [--dir DIR]          # a local single-node Kafka broker for development

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

The dump format (``dump``, ``scan``, ``load``) is one JSON object per line:
``"key"`` holds a key that is valid UTF-8 (str and bytes keys are the same
bytes in the log), ``"key_b64"`` any other key, base64-encoded. ``"value"``
holds a value that JSON represents exactly; a ``bytes`` value is
``"value_b64"`` (base64) and anything else JSON cannot hold (bytes inside a
container, a dict with bytes keys, msgpack extension types, NaN, a value
nested too deeply for JSON) is ``"value_msgpack_b64"`` (the value packed with
msgpack, base64-encoded).
``load`` decodes all three, so ``dump`` then ``load`` reproduces every value
(tuples come back as lists, as they do from msgpack).

Exit codes (also in ``kvlog --help``): 0 success, 1 key not found or
differences found, 2 usage error or failure (one line on stderr, no
traceback: bad input, an unreachable broker, a directory that cannot be
written, ...), 130 interrupted (Ctrl-C or SIGTERM; the store is closed
cleanly first), 141 stdout closed early (a pipe into ``head``).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import logging
import math
import os
import random
import shlex
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import msgpack

from .codec import encode_key, get_codec
from .errors import CacheError, KVLogError

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
#: Seconds an opening replay runs before its progress bar appears (fast opens show none).
OPEN_BAR_DELAY = 1.0


class _UsageError(Exception):
    """A mistake in the command line: reported in one line, exit 2."""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line (argparse prints the usage block too)."""

    def error(self, message: str) -> Any:  # type: ignore[override]
        raise _UsageError(f"{message} (see {self.prog} --help)")


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

    broker = sub.add_parser("broker", help="run a local single-node Kafka broker for development")
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

    compact = sub.add_parser("compact", help="compact the embedded log now (Kafka compacts by itself)")
    compact.add_argument("--json", action="store_true", help="print the report as one JSON object")
    return parser


# -- the target: which log, which cache ----------------------------------------


@dataclass(frozen=True)
class _Target:
    """What the command works on: an embedded data directory or a Kafka topic with its cache."""

    kind: str  # "local" or "kafka"
    path: Path  # the directory KVLog is opened at; the LMDB cache is path/"cache"
    bootstrap_servers: str | None = None
    topic: str | None = None

    @property
    def cache_dir(self) -> Path:
        return self.path / "cache"

    def argv(self) -> str:
        """The global options that name this target, for messages that suggest a command."""
        if self.kind == "local":
            return f"--data {shlex.quote(str(self.path))}"
        return (
            f"--cache {shlex.quote(str(self.path))} --bootstrap-servers "
            f"{shlex.quote(str(self.bootstrap_servers))} --topic {shlex.quote(str(self.topic))}"
        )


def _target(args: argparse.Namespace) -> _Target:
    if args.data is not None:
        if args.bootstrap_servers or args.topic:
            raise _UsageError(
                "--data (the embedded log) cannot be combined with --bootstrap-servers or --topic (a Kafka topic)"
            )
        if args.cache is not None:
            raise _UsageError("--cache is for a Kafka topic; the embedded log keeps its cache in DATA/cache")
        return _Target("local", Path(args.data))
    servers = args.bootstrap_servers or os.environ.get("KVLOG_BOOTSTRAP_SERVERS") or None
    topic = args.topic or os.environ.get("KVLOG_TOPIC") or None
    if servers or topic:
        if not (servers and topic):
            raise _UsageError(
                "a Kafka topic needs both --bootstrap-servers and --topic "
                "(or KVLOG_BOOTSTRAP_SERVERS and KVLOG_TOPIC)"
            )
        return _Target("kafka", Path(args.cache or "./cache"), servers, topic)
    if args.cache is not None:
        raise _UsageError(
            "--cache needs --bootstrap-servers and --topic (a Kafka topic); the embedded log is --data DIR"
        )
    return _Target("local", Path("./data"))


def _open(args: argparse.Namespace, target: _Target, *, progress: Any = None, **kwargs: Any) -> Any:
    """Open the store for a command: no follower thread (the cache moves only when asked), no topic creation."""
    from .store import KVLog

    _check_not_a_file(target)
    own_bar = _ReplayBar("replay", delay=OPEN_BAR_DELAY) if progress is None else None
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
            log = LocalLog(target.path / "log", background_compaction=False)
            try:
                # Read under the log's lock: no other writer can rebind the cache meanwhile.
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
def _opened(args: argparse.Namespace, target: _Target, **kwargs: Any) -> Iterator[Any]:
    """``_open`` as a context manager whose close is shielded from a second Ctrl-C."""
    kv = _open(args, target, **kwargs)
    try:
        yield kv
    finally:
        with _signals_ignored():
            kv.close()


def _require_data_dir(target: _Target) -> None:
    """Commands that only read refuse a missing data directory instead of creating an empty database."""
    _check_not_a_file(target)
    if target.kind == "local" and not target.path.is_dir():
        raise _UsageError(
            f"no kvlog data directory at {target.path} (kvlog put or kvlog load creates one; "
            "--data DIR picks another)"
        )


def _check_not_a_file(target: _Target) -> None:
    """A data or cache path that names something other than a directory is a usage error, said plainly."""
    if target.path.exists() and not target.path.is_dir():
        option = "--data" if target.kind == "local" else "--cache"
        raise _UsageError(f"{option} {target.path} is not a directory")


def _recorded_codec(cache_dir: Path) -> str | None:
    """The codec an existing cache was built with, or ``None`` (no cache yet, or one that cannot be read).

    A cache that cannot be opened is left to the store's own open, which
    reports it (or, for rewarm, rebuilds it).
    """
    from .cache import Cache

    if not (cache_dir / "data.mdb").is_file():
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


def _codec(args: argparse.Namespace, target: _Target) -> str:
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
            raise _UsageError(
                f"the cache at {target.cache_dir} was built with the codec {recorded!r}, which the kvlog "
                f"command does not have (it has {', '.join(_BUILTIN_CODECS)})"
            )
        return recorded
    if args.command == "rewarm":
        return str(args.codec)
    raise _UsageError(
        f"the store at {target.path} holds {recorded} values; --codec {args.codec} would rebuild its "
        f"cache and misread them (leave --codec out, or rebuild the cache for {args.codec} with "
        f"kvlog --codec {args.codec} {target.argv()} rewarm)"
    )


# -- signals --------------------------------------------------------------------


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def _signal_handlers(handler: Any) -> Iterator[None]:
    """Install ``handler`` for SIGINT and SIGTERM while inside; restore the previous ones after.

    A signal the process was started with ignored (SIGINT of a background job
    in a non-interactive shell) stays ignored.
    """
    if not _in_main_thread():  # signal.signal works only there
        yield
        return
    previous: dict[signal.Signals, Any] = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(signum) is signal.SIG_IGN:
            continue
        previous[signum] = signal.signal(signum, handler)
    try:
        yield
    finally:
        for restored, old in previous.items():
            signal.signal(restored, signal.SIG_DFL if old is None else old)


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _interruptible() -> contextlib.AbstractContextManager[None]:
    """SIGTERM, like Ctrl-C, raises KeyboardInterrupt: the command unwinds and closes its store."""
    return _signal_handlers(_raise_interrupt)


def _signals_ignored() -> contextlib.AbstractContextManager[None]:
    """Closing a store is not interrupted by a second Ctrl-C (it would leave the log lock behind)."""
    return _signal_handlers(signal.SIG_IGN)


# -- progress -------------------------------------------------------------------


class _ReplayBar:
    """A tqdm bar on stderr over log offsets, fed by the store's ``progress(applied, target)`` callbacks.

    Offsets have gaps after compaction, so the bar counts offsets, not records:
    its total is the distance from the first positions seen to the target,
    which is what makes the rate and the ETA honest.
    """

    def __init__(self, desc: str, *, delay: float = 0.0) -> None:
        self.desc = desc
        self.delay = delay
        self.first: dict[int, int] | None = None
        self.applied: dict[int, int] = {}
        self.target: dict[int, int] = {}
        self._bar: Any = None
        self._base = 0

    def __call__(self, applied: dict[int, int], target: dict[int, int]) -> None:
        self.applied, self.target = dict(applied), dict(target)
        if self.first is None:
            self.first = dict(applied)
            self._base = sum(applied.get(p, 0) for p in target)
            self._bar = _count_bar(self.desc, self._total(), delay=self.delay)
        total = self._total()
        if total != self._bar.total:
            self._bar.total = total
        done = min(total, sum(applied.get(p, 0) for p in target) - self._base)
        self._bar.update(done - self._bar.n)

    def _total(self) -> int:
        return max(0, sum(self.target.values()) - self._base)

    def finish(self) -> None:
        """Fill the bar (the last callback comes before the last batch) and close it."""
        if self._bar is not None:
            self.applied = dict(self.target)
            self._bar.update(self._total() - self._bar.n)
        self.close()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _count_bar(desc: str, total: int | None, *, delay: float = 0.0) -> Any:
    from tqdm import tqdm

    return tqdm(
        total=total,
        desc=desc,
        unit="rec",
        # 1.2M rather than 1234567; but 12, not 12.0
        unit_scale=total is None or total >= 1000,
        file=sys.stderr,
        delay=delay,
        dynamic_ncols=True,
    )


def _rate(count: float, seconds: float) -> str:
    return f"{count / seconds:,.0f}" if seconds > 0 else "-"


def _offsets(positions: dict[int, int], target: dict[int, int] | None = None) -> str:
    """``offset 5 of 9`` for one partition, ``offsets 0:5/9, 1:3/4`` for several."""
    if len(positions) == 1 and (target is None or len(target) == 1):
        ((p, position),) = positions.items()
        return f"offset {position}" + ("" if target is None else f" of {target.get(p, position)}")
    parts = [
        f"{p}:{position}" + ("" if target is None else f"/{target.get(p, position)}")
        for p, position in sorted(positions.items())
    ]
    return "offsets " + ", ".join(parts)


# -- the dump format ------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _json_exact(value: Any) -> bool:
    """Whether JSON holds ``value`` exactly (tuples become lists, as they do in msgpack)."""
    if value is None or isinstance(value, (str, bool, int)):
        return True
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, (list, tuple)):
        return all(_json_exact(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _json_exact(v) for k, v in value.items())
    return False


def _dump_record(key: bytes, value: Any) -> dict[str, Any]:
    """One line of the dump format (see the module docstring)."""
    record: dict[str, Any] = {}
    try:
        record["key"] = key.decode("utf-8")
    except UnicodeDecodeError:
        record["key_b64"] = _b64(key)
    if isinstance(value, bytes):
        record["value_b64"] = _b64(value)
    elif _json_exact_within_recursion_limit(value):
        record["value"] = value
    else:
        record["value_msgpack_b64"] = _b64(msgpack.packb(value, use_bin_type=True))
    return record


def _json_exact_within_recursion_limit(value: Any) -> bool:
    # A value nested about a thousand levels deep (msgpack holds 1024) is past
    # what Python's recursion, and so its json module, reaches: it goes to
    # value_msgpack_b64 like anything else JSON cannot hold.
    try:
        return _json_exact(value)
    except RecursionError:
        return False


def _dump_line(key: bytes, value: Any) -> str:
    record = _dump_record(key, value)
    try:
        return json.dumps(record, ensure_ascii=False, allow_nan=False)
    except RecursionError:  # _json_exact passed, json.dumps (on a deeper stack) did not
        del record["value"]
        record["value_msgpack_b64"] = _b64(msgpack.packb(value, use_bin_type=True))
        return json.dumps(record, ensure_ascii=False, allow_nan=False)


_KEY_FIELDS = ("key", "key_b64")
_VALUE_FIELDS = ("value", "value_b64", "value_msgpack_b64")


def _parse_dump_line(line: str, encode: Callable[[Any], bytes]) -> tuple[bytes, Any]:
    """Parse and check one line of the dump format; return ``(key bytes, value)``.

    Raises:
        ValueError: the line is not valid, or its key or value cannot be stored.
    """
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON ({exc})") from None
    except RecursionError:
        raise ValueError(
            "nests too deeply for Python's JSON parser (value_msgpack_b64 holds deep values)"
        ) from None
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    unknown = sorted(set(record) - set(_KEY_FIELDS) - set(_VALUE_FIELDS))
    if unknown:
        raise ValueError(f"unknown field {unknown[0]!r}")
    keys = [f for f in _KEY_FIELDS if f in record]
    values = [f for f in _VALUE_FIELDS if f in record]
    if len(keys) != 1:
        raise ValueError('expected exactly one of "key" and "key_b64"')
    if len(values) != 1:
        raise ValueError('expected exactly one of "value", "value_b64" and "value_msgpack_b64"')
    raw_key = record[keys[0]]
    if not isinstance(raw_key, str):
        raise ValueError(f'"{keys[0]}" must be a string')
    try:
        key = encode_key(_unb64(raw_key) if keys[0] == "key_b64" else raw_key)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"bad key: {exc}") from None
    field, value = values[0], record[values[0]]
    if field != "value":
        if not isinstance(value, str):
            raise ValueError(f'"{field}" must be a base64 string')
        value = _unb64(value)
        if field == "value_msgpack_b64":
            try:
                # The codec's limits: str/bytes map keys only, lengths within the data.
                value = msgpack.unpackb(value, raw=False, strict_map_key=True)
            except (ValueError, TypeError, msgpack.UnpackException) as exc:
                raise ValueError(
                    f'"value_msgpack_b64" is not valid msgpack: {exc or type(exc).__name__}'
                ) from None
    try:
        encode(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"bad value: {exc}") from None
    return key, value


def _unb64(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except ValueError as exc:
        raise ValueError(f"not valid base64: {exc}") from None


def _read_dump(stream: IO[str], encode: Callable[[Any], bytes]) -> list[tuple[bytes, Any]]:
    """Parse and check a whole dump before anything is written; a bad line names its number.

    ``stream`` decodes with ``surrogateescape``, so bytes that are not UTF-8
    reach the line's checks (as a bad key, value or JSON) with its number.
    """
    items: list[tuple[bytes, Any]] = []
    for number, line in enumerate(stream, 1):
        if not line.strip():
            continue
        try:
            items.append(_parse_dump_line(line, encode))
        except ValueError as exc:
            raise ValueError(f"line {number}: {exc}; nothing was written") from None
    return items


def _jsonable(value: Any) -> Any:
    """Make a value printable as JSON for ``get`` (bytes become text where they decode, else hex)."""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return value.hex()
    if isinstance(value, dict):
        return {str(_jsonable(k)): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return repr(value)  # a msgpack ExtType or Timestamp


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
        raise _UsageError(f"bad KEY: {exc}") from None
    return key


def _cmd_get(args: argparse.Namespace, target: _Target) -> int:
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
            raise _UsageError(
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


def _cmd_put(args: argparse.Namespace, target: _Target) -> int:
    key = _argv_key(args.key)
    value: Any
    if args.raw:
        if args.value is not None:
            raise _UsageError("with --raw the value is read from stdin; do not pass VALUE")
    elif args.value is None:
        raise _UsageError("put needs KEY and VALUE (a JSON value), or --raw to read the value from stdin")
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
        raise _UsageError(f"{what} is not valid JSON: {exc}") from None
    except RecursionError:
        raise _UsageError(f"{what} nests too deeply for Python's JSON parser") from None


def _cmd_del(args: argparse.Namespace, target: _Target) -> int:
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
            raise _UsageError(
                f"bad --prefix {text!r}: not UTF-8 and not bytes from the command line"
            ) from None


def _cmd_scan(args: argparse.Namespace, target: _Target) -> int:
    prefix = _argv_prefix(args.prefix)
    _require_data_dir(target)
    if args.limit == 0:
        return EXIT_OK
    with _opened(args, target, key_type=bytes) as kv:
        for n, (key, value) in enumerate(kv.scan(prefix=prefix), 1):
            print(_dump_line(key, value))
            if args.limit is not None and n >= args.limit:
                break
    return EXIT_OK


def _log_stats(kv: Any) -> dict[str, Any] | None:
    stats = getattr(kv.log, "stats", None)
    return dict(stats()) if callable(stats) else None


def _cmd_stats(args: argparse.Namespace, target: _Target) -> int:
    _require_data_dir(target)
    with _opened(args, target) as kv:
        stats = kv.stats()
        if "log_stats" not in stats:
            log_stats = _log_stats(kv)
            if log_stats is not None:
                stats["log_stats"] = log_stats
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


def _print_stats(stats: dict[str, Any], description: str, target: _Target) -> None:
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


def _cmd_dump(args: argparse.Namespace, target: _Target) -> int:
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
            bar = stack.enter_context(_count_bar("dump", total, delay=0.5))
            count = 0
            try:
                for key, value in kv.scan(prefix=prefix):
                    out.write(_dump_line(key, value))
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


def _cmd_load(args: argparse.Namespace, target: _Target) -> int:
    _check_not_a_file(target)
    encode = get_codec(_codec(args, target)).encode
    started = time.monotonic()
    # The whole input is parsed and checked before the store is even opened:
    # a bad line anywhere writes nothing.
    if args.file == "-":
        stdin = sys.stdin
        if hasattr(stdin, "buffer"):
            stdin = io.TextIOWrapper(stdin.buffer, encoding="utf-8", errors="surrogateescape")
        items = _read_dump(stdin, encode)
    else:
        with open(args.file, encoding="utf-8", errors="surrogateescape") as stream:
            items = _read_dump(stream, encode)
    with _opened(args, target) as kv:
        written = 0
        try:
            with _count_bar("load", len(items)) as bar:
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
        f"loaded {written:,} records in {seconds:.2f}s ({_rate(written, seconds)} records/s); "
        f"the store holds {entries:,} entries"
    )
    return EXIT_OK


def _cmd_compact(args: argparse.Namespace, target: _Target) -> int:
    if target.kind == "kafka":
        raise _UsageError(
            "compact works on the embedded log only; the broker's log cleaner compacts a Kafka topic"
        )
    _require_data_dir(target)
    from .log.local import LocalLog

    with _opened(args, target) as kv:
        if not isinstance(kv.log, LocalLog):
            raise _UsageError("compact works on the embedded log only")
        report = dict(kv.log.compact())
    if args.json:
        print(json.dumps(report, default=str))
    else:
        print("compacted the log")
        for name, value in report.items():
            print(f"  {name:<22} {_human(value)}")
    return EXIT_OK


def _cmd_verify(args: argparse.Namespace, target: _Target) -> int:
    from .verify import verify

    _require_data_dir(target)
    with _opened(args, target) as kv:
        bar = _ReplayBar("verify", delay=0.5)
        try:
            report = verify(kv, progress=bar, limit=args.show, scratch_dir=args.scratch)
            bar.finish()
        finally:
            bar.close()
    where = _offsets(report.checkpoint) if report.checkpoint else "the log start"
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


def _cmd_rewarm(args: argparse.Namespace, target: _Target) -> int:
    _require_data_dir(target)
    bar = _ReplayBar("rewarm")
    kv = None
    resumed = ""
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
                print(f"the cache is already at the end of the log ({_offsets(kv.stats()['checkpoint'])})")
                return EXIT_OK
            elif any(bar.first.values()):
                resumed = f", resumed from {_offsets(bar.first)}"
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
                result = kv.rewarm(progress=bar)
                bar.finish()
                records, seconds = result["records"], result["seconds"]
        entries = len(kv)
    except KeyboardInterrupt:
        with _signals_ignored():  # a second Ctrl-C must not cut the clean-up short
            bar.close()
            if kv is not None:
                kv.close()
            # The replayer commits every batch with its checkpoint in one LMDB
            # transaction, so whatever the interrupt cut short was rolled back:
            # the cache on disk is the log folded up to this checkpoint.
            checkpoint = _committed_checkpoint(target.cache_dir)
            where = _offsets(checkpoint, bar.target or None) if checkpoint else "the log start"
            print(
                f"kvlog: interrupted; the cache is consistent at {where}; "
                f"kvlog {target.argv()} rewarm --resume continues from there",
                file=sys.stderr,
            )
        return EXIT_INTERRUPTED
    finally:
        bar.close()
        if kv is not None:
            with _signals_ignored():
                kv.close()
    print(
        f"rewarmed {entries:,} entries from {records:,} records in {seconds:.2f}s "
        f"({_rate(records, seconds)} records/s){resumed}"
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


# -- demo ---------------------------------------------------------------------------

_STATUSES = ("pending", "paid", "shipped", "delivered", "cancelled")


def _demo_orders(count: int) -> Iterator[tuple[str, dict[str, Any]]]:
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


def _cmd_demo(args: argparse.Namespace) -> int:
    if args.data is not None or args.cache is not None or args.bootstrap_servers or args.topic:
        raise _UsageError("demo runs on its own embedded data directory; choose it with demo --dir DIR")
    if args.dir is not None:
        path = Path(args.dir)
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise _UsageError(f"demo --dir needs a new or empty directory; {path} is not empty")
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

    target = _Target("local", path)
    begun = time.monotonic()
    print(f"kvlog demo: {count:,} orders in an embedded kvlog database at {path} (no broker)")
    example = f"order:{min(42, count - 1):06d}"
    sample = dict(_demo_orders(min(count, 43)))[example]
    print(f"   e.g. {example} -> {json.dumps(sample)}")

    started = time.monotonic()
    codec = args.codec or DEFAULT_CODEC
    with KVLog(path, codec=codec, follow=False, timeout=args.timeout) as kv:
        with _count_bar("write", count) as bar:
            batch: list[tuple[str, Any]] = []
            for item in _demo_orders(count):
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
            f"{_rate(count, seconds)} records/s",
        )

        started = time.monotonic()
        for key, expected in _demo_orders(count):
            if kv[key] != expected:
                print(f"kvlog: demo: {key} reads back {kv[key]!r}, expected {expected!r}", file=sys.stderr)
                return EXIT_NOT_FOUND
        seconds = time.monotonic() - started
        _step(
            2,
            f"read all {count:,} keys back from the cache, each checked",
            seconds,
            f"{_rate(count, seconds)} reads/s",
        )

    started = time.monotonic()
    shutil.rmtree(target.cache_dir)
    _step(3, f"delete the cache directory {target.cache_dir}", time.monotonic() - started, "(the log stays)")

    started = time.monotonic()
    replay_bar = _ReplayBar("replay")
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
            f"{_rate(replayed, seconds)} records/s",
        )

        started = time.monotonic()
        if len(kv) != count:
            print(f"kvlog: demo: {len(kv):,} entries after the rebuild, expected {count:,}", file=sys.stderr)
            return EXIT_NOT_FOUND
        for (key, value), (expected_key, expected) in zip(
            kv.scan(prefix="order:"), _demo_orders(count), strict=True
        ):
            if key != expected_key or value != expected:
                print(f"kvlog: demo: {key} differs after the rebuild", file=sys.stderr)
                return EXIT_NOT_FOUND
        _step(5, f"check the rebuilt cache: all {count:,} orders identical", time.monotonic() - started)

        stats = kv.stats()
        log_stats = _log_stats(kv)
    print()
    print(f"entries      {stats['entries']:,}")
    print(f"checkpoint   {_offsets(stats['checkpoint'])}")
    print(f"cache size   {stats['bytes_on_disk'] / 1e6:,.1f} MB on disk ({target.cache_dir})")
    if log_stats:
        partitions = log_stats.get("partitions") or {}
        segments = sum(info.get("segments", 0) for info in partitions.values())
        size = sum(info.get("bytes", 0) for info in partitions.values())
        print(f"log          {segments:,} segment(s), {size / 1e6:,.1f} MB ({log_stats.get('path')})")
    print(f"done in {time.monotonic() - begun:.1f}s")
    if keep:
        print(f"try: kvlog {target.argv()} get {example}")
    return EXIT_OK


# -- main -----------------------------------------------------------------------------

_COMMANDS: dict[str, Callable[[argparse.Namespace, _Target], int]] = {
    "get": _cmd_get,
    "put": _cmd_put,
    "del": _cmd_del,
    "scan": _cmd_scan,
    "stats": _cmd_stats,
    "dump": _cmd_dump,
    "load": _cmd_load,
    "compact": _cmd_compact,
    "verify": _cmd_verify,
    "rewarm": _cmd_rewarm,
}


def _run(args: argparse.Namespace) -> int:
    if args.command == "broker":
        from . import devbroker

        argv = ["--port", str(args.port)] + (["--dir", args.dir] if args.dir else [])
        return devbroker.main(argv)
    if args.codec is not None:
        get_codec(args.codec)  # a bad name is a usage error before anything is opened
    with _interruptible():
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
    except _UsageError as exc:
        return _fail(str(exc))
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    try:
        return _run(args)
    except _UsageError as exc:
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
