"""Interactive queries over HTTP: a Starlette app over an open :class:`~kvlog.KVLog`.

``app(kv)`` returns an ASGI application; ``kvlog serve`` runs it on uvicorn,
and any Starlette or FastAPI service can mount it::

    from starlette.applications import Starlette
    from starlette.routing import Mount
    import kvlog.http

    kv = KVLog("./data")
    service = Starlette(routes=[Mount("/kv", app=kvlog.http.app(kv))])

Routes (every one answers errors as ``{"error": "..."}``):

- ``GET /v1/keys/{key}``: the value as JSON (``?raw``: the stored bytes), with
  an ``ETag`` of the stored bytes; ``If-None-Match`` gives 304; ``?wait=S``
  long-polls up to S seconds for a change;
- ``PUT /v1/keys/{key}``: the JSON body becomes the value (``writable`` only);
- ``DELETE /v1/keys/{key}``: a tombstone (``writable`` only);
- ``POST /v1/batch``: a JSON object of key -> value, with one ``kv.update``;
- ``GET /v1/scan``: JSON lines in key order (``prefix``, ``start``, ``stop``, ``limit``);
- ``GET /v1/stats``: ``kv.stats()`` as JSON;
- ``GET /healthz``: alive; ``GET /readyz``: 200 while the cache is within
  ``max_lag`` records of the log end;
- ``GET /metrics``: Prometheus text format (a registry of this app's own);
- ``GET /``: the operator console (static files shipped with kvlog).

How a long-poll learns of a write made by another process (another ``kvlog
serve``, ``kvlog put``, a worker) is in docs/design.md, "Serving over HTTP":
one watcher task per app polls :meth:`KVLog.cache_version` every
``poll_interval`` seconds while anybody waits, and re-reads only the waited
keys when it moved.

Needs the ``server`` extra: ``pip install 'kvlog[server]'``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import math
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from importlib import resources
from typing import Any
from urllib.parse import quote, unquote_to_bytes

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from ..codec import MAX_KEY_SIZE
from ..dumpfile import dump_line, jsonable
from ..errors import KVLogError, RecordTooLargeError
from ..store import UPDATE_BATCH, KVLog

__all__ = ["DEFAULT_MAX_LAG", "DEFAULT_POLL_INTERVAL", "MAX_WAIT", "app"]

#: ``max_lag`` when none is given: records the cache may be behind the log end and still be ready.
DEFAULT_MAX_LAG = 1000
#: Seconds between two looks at the cache's version while a long-poll waits (see ChangeWatcher).
DEFAULT_POLL_INTERVAL = 0.001
#: The longest ``?wait=`` accepted, in seconds.
MAX_WAIT = 300.0
#: Lines of a scan read per trip to the thread pool (one LMDB chunk read, then JSON).
SCAN_LINES_PER_CHUNK = 500
#: Keys whose first-seen time a server remembers (for the console's "seen at"), oldest forgotten first.
SEEN_KEYS = 10_000
#: Quarantined records the console shows.
QUARANTINED_SHOWN = 20

_JSON = "application/json"
_KEYS = b"/v1/keys/"
_MSGPACK = "application/msgpack"
_OCTETS = "application/octet-stream"


class HTTPError(Exception):
    """A request refused with ``status`` and a JSON ``{"error": message}``."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


class _Answer:
    """A response whose headers are bytes already: the point read's, cheaper than a Starlette Response.

    Starlette runs any ASGI callable an endpoint returns; this one sends the
    start and the body and nothing else.
    """

    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes = b"") -> None:
        self.status = status
        self.headers = headers
        self.body = body

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        headers = self.headers
        if self.status != 304:
            headers = [*headers, (b"content-length", str(len(self.body)).encode())]
        await send({"type": "http.response.start", "status": self.status, "headers": headers})
        await send({"type": "http.response.body", "body": self.body if scope["method"] != "HEAD" else b""})


def _header(request: Request, name: bytes) -> str | None:
    """A request header's value (latin-1), looked up in the raw list without building Headers."""
    for key, value in request.scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    body = json.dumps({"error": message}, ensure_ascii=False).encode()
    return Response(body, status_code=status, media_type=_JSON, headers=headers)


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    body = json.dumps(data, ensure_ascii=False, default=str).encode()
    return Response(body, status_code=status, media_type=_JSON, headers=headers)


def etag_of(stored: bytes) -> str:
    """The ETag of a stored value: a hash of its bytes, so every server of one database gives the same one."""
    return '"' + hashlib.blake2b(stored, digest_size=12).hexdigest() + '"'


def _etags(header: str) -> set[str]:
    """The entity tags of an ``If-None-Match`` header (weak ones compared as strong: GET only)."""
    tags = set()
    for part in header.split(","):
        part = part.strip()
        if part.startswith("W/"):
            part = part[2:]
        if part:
            tags.add(part)
    return tags


def _jsonable_body(value: Any) -> bytes:
    """A decoded value as JSON: as it is when JSON holds it, else as ``kvlog get`` prints it."""
    try:
        return json.dumps(value, ensure_ascii=False, allow_nan=False).encode()
    except (TypeError, ValueError):
        return json.dumps(jsonable(value), ensure_ascii=False).encode()


class ChangeWatcher:
    """Wakes long-polls when a waited key's value changes, whichever process wrote it.

    One per app. While at least one request waits, a task looks at
    :meth:`KVLog.cache_version` every ``interval`` seconds (a read of mapped
    memory, about a microsecond) and, only when it moved, reads each waited
    key once and wakes the waiters whose ETag no longer matches. Nothing runs
    while nobody waits. Reads are point reads of LMDB (microseconds), done on
    the event loop.
    """

    def __init__(self, kv: KVLog, interval: float, on_change: Callable[[bytes, str | None], object]) -> None:
        self._kv = kv
        self._interval = interval
        self._on_change = on_change
        self._waiting: dict[str, list[tuple[str | None, asyncio.Future[None]]]] = {}
        self._task: asyncio.Task[None] | None = None
        self._last: tuple[int, int] | None = None
        #: How many requests wait now, and how many were woken by a change since start.
        self.waiting = 0
        self.notified = 0

    def current_etag(self, key: str) -> str | None:
        stored = self._kv.get_stored(key)
        return None if stored is None else etag_of(stored)

    async def wait_change(self, key: str, etag: str | None, timeout: float) -> bool:
        """Wait until ``key``'s ETag is not ``etag`` (``None``: absent); False after ``timeout`` seconds."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        entry = (etag, future)
        self._waiting.setdefault(key, []).append(entry)
        self.waiting += 1
        try:
            if self._task is None:
                # The version is taken before the re-read below: a write after
                # the re-read moves it, and the task's first look sees that.
                self._last = self._kv.cache_version()
                self._task = asyncio.create_task(self._watch())
            # The value may have changed between the request's read and this registration.
            if self.current_etag(key) != etag:
                return True
            done, _ = await asyncio.wait((future,), timeout=timeout)
            return bool(done)
        finally:
            self.waiting -= 1
            waits = self._waiting.get(key)
            if waits is not None:
                waits.remove(entry)
                if not waits:
                    del self._waiting[key]

    async def _watch(self) -> None:
        try:
            while self._waiting:
                await asyncio.sleep(self._interval)
                version = self._kv.cache_version()
                if version == self._last:
                    continue
                self._last = version
                for key, waits in list(self._waiting.items()):
                    current = self.current_etag(key)
                    woken = False
                    for etag, future in waits:
                        if current != etag and not future.done():
                            future.set_result(None)
                            woken = True
                            self.notified += 1
                    if woken:
                        self._on_change(key.encode(), current)
        finally:
            self._task = None

    def wake_all(self) -> None:
        """Answer every waiting request now (shutdown)."""
        for waits in self._waiting.values():
            for _, future in waits:
                if not future.done():
                    future.set_result(None)


class _StatsCollector(Collector):
    """What ``kv.stats()`` says, as Prometheus metrics, read at each scrape."""

    def __init__(self, kv: KVLog) -> None:
        self._kv = kv

    def collect(self) -> Iterator[Any]:
        stats = self._kv.stats()
        gauge = GaugeMetricFamily
        counter = CounterMetricFamily
        yield gauge("kvlog_entries", "Keys in the cache.", value=stats["entries"])
        yield counter(
            "kvlog_records_replayed",
            "Records replay put into the cache since this server opened the store "
            "(rate() of it is the replay rate).",
            value=stats["records_replayed"],
        )
        yield counter(
            "kvlog_records_applied_by_writers",
            "Records this process's writes put into the cache themselves (Kafka).",
            value=stats["records_applied_by_writers"],
        )
        yield counter(
            "kvlog_records_quarantined",
            "Records replay set aside as unreadable since open.",
            value=stats["records_quarantined"],
        )
        yield counter(
            "kvlog_rebuilds", "Times the cache was rebuilt since open.", value=len(stats["rebuilds"])
        )
        open_replay = stats["open_replay"]
        yield gauge(
            "kvlog_open_replay_seconds", "Seconds the replay at open took.", value=open_replay["seconds"]
        )
        yield gauge("kvlog_open_replay_records", "Records replayed at open.", value=open_replay["records"])
        yield gauge("kvlog_cache_bytes", "Bytes of the cache on disk.", value=stats["bytes_on_disk"])
        yield gauge("kvlog_cache_map_size_bytes", "LMDB map size.", value=stats["map_size"])
        yield gauge("kvlog_following", "1 while the follower thread runs.", value=int(stats["following"]))
        for name, key, what in (
            ("kvlog_checkpoint", "checkpoint", "Next offset replay applies, per partition."),
            ("kvlog_end_offset", "end_offsets", "The log's end offset, per partition."),
            ("kvlog_lag", "lag", "Records the cache is behind the log end, per partition."),
        ):
            family = gauge(name, what, labels=["partition"])
            for partition, value in sorted((stats.get(key) or {}).items()):
                family.add_metric([str(partition)], value)
            yield family


class _HTTPCollector(Collector):
    """The HTTP counters of an app (plain integers the handlers add to), for its registry."""

    def __init__(self, service: _Service) -> None:
        self._service = service

    def collect(self) -> Iterator[Any]:
        service = self._service
        for name, value, what in (
            ("kvlog_http_reads", service.reads, "Key reads answered over HTTP (304s too)."),
            ("kvlog_http_writes", service.writes, "Records written over HTTP (PUT, DELETE, batch)."),
            ("kvlog_http_scanned", service.scanned, "Entries sent by scans."),
            (
                "kvlog_http_longpoll_notifications",
                service.notified,
                "Long-polls answered because the value changed.",
            ),
        ):
            yield CounterMetricFamily(name, what, value=value)
        yield GaugeMetricFamily(
            "kvlog_http_longpolls_waiting", "Long-polls waiting now.", value=service.watcher.waiting
        )


class _Service:
    """The state of one app: the store, its options, the watcher, the metrics."""

    def __init__(
        self, kv: KVLog, *, writable: bool, token: str | None, max_lag: int, poll_interval: float
    ) -> None:
        self.kv = kv
        self.writable = writable
        self.token = None if token is None else token.encode()
        self.max_lag = max_lag
        self.seen: OrderedDict[bytes, tuple[str | None, float]] = OrderedDict()
        self.watcher = ChangeWatcher(kv, poll_interval, self.note_seen)
        self.registry = CollectorRegistry()
        # Plain integers, read by _HTTPCollector at each scrape: an increment on the
        # hot path costs an add, not a Prometheus counter's lock.
        self.reads = 0
        self.writes = 0
        self.scanned = 0
        self.notified = 0
        self.registry.register(_HTTPCollector(self))
        self.registry.register(_StatsCollector(kv))
        limit = kv.log.max_record_bytes
        #: The largest record the log takes (key + stored value); None: no limit.
        self.record_limit = limit
        # A JSON body may be longer than the value it encodes (msgpack is
        # denser): read up to 4x the record limit, refuse past that unread.
        self.body_limit = 4 * (limit if limit is not None else 16 << 20) + 1024

    # -- helpers ---------------------------------------------------------------

    def note_seen(self, key: bytes, etag: str | None) -> float:
        """When this server first saw ``key`` with ``etag`` (now, if this is the first time)."""
        seen = self.seen.get(key)
        if seen is not None and seen[0] == etag:
            return seen[1]
        now = time.time()
        self.seen[key] = (etag, now)
        self.seen.move_to_end(key)
        if len(self.seen) > SEEN_KEYS:
            self.seen.popitem(last=False)
        return now

    def check_token(self, request: Request) -> None:
        if self.token is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.token):
            raise HTTPError(
                401,
                "this server needs Authorization: Bearer <token>"
                if not header
                else "the bearer token is not this server's",
                {"WWW-Authenticate": 'Bearer realm="kvlog"'},
            )

    def check_writable(self) -> None:
        if not self.writable:
            raise HTTPError(
                405,
                "this server is read-only: start kvlog serve with --writable to accept writes",
                {"Allow": "GET, HEAD"},
            )


def _check_params(request: Request, allowed: tuple[str, ...]) -> None:
    if not request.scope.get("query_string"):
        return  # no query string: nothing to parse (the common point read)
    unknown = sorted({name for name in request.query_params if name not in allowed})
    if unknown:
        accepted = ", ".join(allowed) if allowed else "none"
        raise HTTPError(400, f"unknown query parameter {', '.join(unknown)} (this route takes: {accepted})")


def _key_of(request: Request) -> str:
    """The key in the path, from the raw bytes the client sent: must be UTF-8 and fit the cache."""
    scope = request.scope
    raw = scope.get("raw_path")
    root = scope.get("root_path")
    prefix = quote(root).encode() + _KEYS if root else _KEYS
    if isinstance(raw, bytes) and raw.startswith(prefix):
        data = raw[len(prefix) :]
        if b"%" in data:
            data = unquote_to_bytes(data)
    else:  # a server that gives no raw path: the decoded one
        data = str(request.path_params["key"]).encode("utf-8", "surrogateescape")
    if not data:
        raise HTTPError(400, "the key is empty: GET /v1/keys/{key}")
    try:
        key = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise HTTPError(400, f"the key is not UTF-8 ({exc.reason} at byte {exc.start})") from None
    if len(data) > MAX_KEY_SIZE:
        raise HTTPError(
            400, f"the key is {len(data)} bytes long; the cache holds keys of at most {MAX_KEY_SIZE} bytes"
        )
    return key


def _wait_seconds(request: Request) -> float | None:
    if not request.scope.get("query_string"):
        return None
    text = request.query_params.get("wait")
    if text is None:
        return None
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not (0 < seconds <= MAX_WAIT):  # also refuses nan
        raise HTTPError(
            400, f"wait must be a number of seconds above 0 and at most {MAX_WAIT:g}, not {text!r}"
        )
    return seconds


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) once it passes ``limit`` bytes, without reading the rest."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise HTTPError(413, f"the body is {int(length)} bytes; this server reads at most {limit}")
    chunks = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPError(413, f"the body is over {limit} bytes; this server reads at most {limit}")
        chunks.append(chunk)
    return b"".join(chunks)


def _parse_json(body: bytes) -> Any:
    if not body:
        raise HTTPError(400, "the body is empty; send the value as JSON")
    try:
        return json.loads(body)
    except UnicodeDecodeError as exc:
        raise HTTPError(400, f"the body is not UTF-8 JSON: {exc.reason}") from None
    except json.JSONDecodeError as exc:
        raise HTTPError(400, f"the body is not valid JSON: {exc}") from None
    except RecursionError:
        raise HTTPError(400, "the body nests too deeply for Python's JSON parser") from None


def _write_error(exc: Exception) -> HTTPError:
    """What a refused or failed write answers."""
    if isinstance(exc, RecordTooLargeError):
        return HTTPError(413, str(exc))
    if isinstance(exc, KVLogError):
        retriable = bool(getattr(exc, "retriable", False))
        return HTTPError(503 if retriable else 500, str(exc), {"Retry-After": "1"} if retriable else None)
    return HTTPError(400, str(exc) or type(exc).__name__)


def app(
    kv: KVLog,
    *,
    writable: bool = False,
    token: str | None = None,
    max_lag: int = DEFAULT_MAX_LAG,
    poll_interval: float = DEFAULT_POLL_INTERVAL,
) -> Starlette:
    """Return a Starlette app serving ``kv`` over HTTP (see the module's routes).

    The app does not own ``kv``: close the store yourself after the server
    stops. It may be mounted under a path in a larger Starlette or FastAPI app.

    Args:
        kv: an open store. Its follower should run (``follow=True``, the
            default) so that records of other Kafka producers reach the cache.
        writable: accept ``PUT``, ``DELETE`` and ``POST /v1/batch`` (405 otherwise).
        token: require ``Authorization: Bearer <token>`` on every route but
            ``/healthz``, ``/readyz`` and the console's static files (401 otherwise).
        max_lag: ``/readyz`` answers 200 while the cache is at most this many
            records behind the log end, 503 beyond.
        poll_interval: seconds between two looks at the cache version while a
            long-poll waits (the latency of a notification is about half of it).
    """
    if max_lag < 0:
        raise ValueError("max_lag must be at least 0")
    if not 0 < poll_interval <= 1:
        raise ValueError("poll_interval must be above 0 and at most 1 second")
    service = _Service(kv, writable=writable, token=token, max_lag=max_lag, poll_interval=poll_interval)
    codec = kv.codec
    decode, encode = codec.decode, codec.encode
    get_stored = kv.get_stored
    raw_type = _MSGPACK if codec.name == "msgpack" else _OCTETS

    def guarded(
        handler: Callable[[Request], Awaitable[Response]], *, public: bool = False
    ) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            try:
                if not public:
                    service.check_token(request)
                return await handler(request)
            except HTTPError as exc:
                return _error(exc.status, exc.message, exc.headers)

        endpoint.__name__ = handler.__name__
        endpoint.__doc__ = handler.__doc__
        return endpoint

    # -- keys --------------------------------------------------------------------

    json_type = (b"content-type", _JSON.encode())
    stored_type = (b"content-type", raw_type.encode())

    def value_response(request: Request, key: str, stored: bytes | None, etag: str | None) -> Any:
        service.reads += 1
        if stored is None or etag is None:
            return _error(404, f"key not found: {key}")
        seen = service.note_seen(key.encode(), etag)
        # When this server first saw this value, as epoch seconds (the console shows it).
        headers = [(b"etag", etag.encode()), (b"x-kvlog-seen-at", b"%.3f" % seen)]
        if request.scope.get("query_string") and "raw" in request.query_params:
            headers.append(stored_type)
            return _Answer(200, headers, stored)
        try:
            value = decode(stored)
        except Exception as exc:  # noqa: BLE001 - a value the codec cannot read is the server's problem
            return _error(500, f"the stored value of {key} cannot be decoded: {exc}")
        headers.append(json_type)
        return _Answer(200, headers, _jsonable_body(value))

    async def get_key(request: Request) -> Any:
        """The value of a key; 304 if If-None-Match names its ETag; ?wait=S long-polls for a change."""
        _check_params(request, ("raw", "wait"))
        key = _key_of(request)
        wait = _wait_seconds(request)
        # A point read of LMDB takes microseconds, less than a trip to the thread
        # pool: it runs on the event loop (so do the watcher's re-reads).
        stored = get_stored(key)
        etag = None if stored is None else etag_of(stored)
        header = _header(request, b"if-none-match")
        tags = _etags(header) if header is not None else set()
        matches = etag is not None and (etag in tags or "*" in tags)
        if wait is not None and (header is None or matches):
            # Wait for an ETag other than the one the client holds (If-None-Match
            # names the current value) or, without If-None-Match, other than the
            # value's at request time (None: absent, so a creation answers). A
            # client holding another value than the current one is answered now.
            if not await service.watcher.wait_change(key, etag, wait):
                return _Answer(304, [(b"etag", etag.encode())] if etag else [])
            service.notified += 1
            stored = get_stored(key)
            etag = None if stored is None else etag_of(stored)
            return value_response(request, key, stored, etag)
        if matches:
            assert etag is not None
            service.reads += 1
            return _Answer(304, [(b"etag", etag.encode())])
        return value_response(request, key, stored, etag)

    async def put_key(request: Request) -> Response:
        """Write the JSON body as the key's value (writable servers only)."""
        service.check_writable()
        _check_params(request, ())
        key = _key_of(request)
        value = _parse_json(await _read_body(request, service.body_limit))
        try:
            stored = encode(value)
        except (TypeError, ValueError) as exc:
            raise HTTPError(400, f"the value cannot be stored: {exc}") from None
        limit = service.record_limit
        size = len(key.encode()) + len(stored)
        if limit is not None and size > limit:
            raise HTTPError(
                413,
                f"the record is {size} bytes; the log accepts at most {limit} (key + value); nothing was written",
            )
        try:
            # A write returns once durable in the log and applied to the cache
            # (an fdatasync, or a broker's acks=all): milliseconds that must not
            # hold the event loop, so it waits in a worker thread.
            await run_in_threadpool(kv.__setitem__, key, value)
        except Exception as exc:  # noqa: BLE001 - each kind is answered by _write_error
            raise _write_error(exc) from None
        service.writes += 1
        etag = etag_of(stored)
        service.note_seen(key.encode(), etag)
        return _json({"key": key, "etag": etag}, headers={"ETag": etag})

    async def delete_key(request: Request) -> Response:
        """Write a tombstone for the key (writable servers only); 404 if absent."""
        service.check_writable()
        _check_params(request, ())
        key = _key_of(request)

        def delete() -> bool:
            try:
                del kv[key]
            except KeyError:
                return False
            return True

        try:
            found = await run_in_threadpool(delete)
        except Exception as exc:  # noqa: BLE001
            raise _write_error(exc) from None
        if not found:
            raise HTTPError(404, f"key not found: {key}")
        service.writes += 1
        service.note_seen(key.encode(), None)
        return _json({"key": key, "deleted": True})

    async def batch(request: Request) -> Response:
        """Write a JSON object of key -> value with one kv.update: checked whole before anything is sent."""
        service.check_writable()
        _check_params(request, ())
        limit = service.body_limit * 16
        items = _parse_json(await _read_body(request, limit))
        if not isinstance(items, dict):
            raise HTTPError(
                400, f"the body must be a JSON object of key -> value, not {type(items).__name__}"
            )
        if not items:
            raise HTTPError(400, "the batch is empty")
        if len(items) > UPDATE_BATCH:
            raise HTTPError(
                413,
                f"the batch has {len(items)} keys; one batch writes at most {UPDATE_BATCH} (one log append)",
            )
        try:
            # kv.update encodes and checks every key, value and record size
            # before it appends anything: bad input writes nothing.
            await run_in_threadpool(kv.update, items)
        except Exception as exc:  # noqa: BLE001
            error = _write_error(exc)
            if error.status in (400, 413) and "nothing was written" not in error.message:
                # Refused by the checks update() makes before it sends anything.
                error.message += "; nothing was written"
            raise error from None
        service.writes += len(items)
        return _json({"written": len(items)})

    # -- scan, stats -----------------------------------------------------------

    async def scan(request: Request) -> Response:
        """Entries in key order as JSON lines (the dump format), streamed."""
        _check_params(request, ("prefix", "start", "stop", "limit"))
        params = request.query_params
        limit_text = params.get("limit")
        limit: int | None = None
        if limit_text is not None:
            if not limit_text.isdigit():
                raise HTTPError(400, f"limit must be a non-negative integer, not {limit_text!r}")
            limit = int(limit_text)
        options: dict[str, Any] = {}
        for name in ("prefix", "start", "stop"):
            text = params.get(name)
            if text is not None and text != "":
                if name != "prefix" and len(text.encode()) > MAX_KEY_SIZE:
                    raise HTTPError(400, f"{name} is longer than a key can be ({MAX_KEY_SIZE} bytes)")
                options[name] = text
        try:
            entries = kv.scan(options.pop("prefix", None), **options)
        except (TypeError, ValueError) as exc:
            raise HTTPError(400, str(exc)) from None

        def next_chunk(room: int) -> str:
            lines = []
            for key, value in entries:
                lines.append(dump_line(key.encode() if isinstance(key, str) else key, value))
                if len(lines) >= room:
                    break
            return "".join(line + "\n" for line in lines)

        async def body() -> AsyncIterator[bytes]:
            # Chunks of lines, each read in a worker thread: a scan of the whole
            # table never sits in memory and never holds the event loop.
            sent = 0
            while limit is None or sent < limit:
                room = SCAN_LINES_PER_CHUNK if limit is None else min(SCAN_LINES_PER_CHUNK, limit - sent)
                chunk = await run_in_threadpool(next_chunk, room)
                if not chunk:
                    return
                count = chunk.count("\n")
                sent += count
                service.scanned += count
                yield chunk.encode()
                if count < room:
                    return

        return StreamingResponse(body(), media_type="application/x-ndjson")

    async def stats(request: Request) -> Response:
        """kv.stats() as JSON, with the embedded log's own stats under log_stats."""
        _check_params(request, ())

        def read() -> dict[str, Any]:
            result = kv.stats()
            log_stats = getattr(kv.log, "stats", None)
            if callable(log_stats):
                result["log_stats"] = dict(log_stats())
            result["describe"] = kv.log.describe()
            result["quarantined"] = result["quarantined"][-QUARANTINED_SHOWN:]
            result["server"] = {
                "writable": service.writable,
                "max_lag": service.max_lag,
                "longpolls_waiting": service.watcher.waiting,
                "time": time.time(),
            }
            return result

        # stats() asks the log for its end offsets: a broker round trip on Kafka.
        return _json(await run_in_threadpool(read))

    # -- operations ------------------------------------------------------------

    async def healthz(request: Request) -> Response:
        """Alive: the process answers and the store is open."""
        if kv.closed:
            return _error(503, "the store is closed")
        return _json({"status": "ok"})

    async def readyz(request: Request) -> Response:
        """Ready while the cache is within max_lag records of the log end."""
        try:
            result = await run_in_threadpool(kv.stats)
        except Exception as exc:  # noqa: BLE001 - not ready, and why
            return _error(503, f"cannot read the store's state: {exc}")
        lag, total = result["lag"], result["total_lag"]
        if total is None:
            return _json({"ready": False, "error": "the log's end offsets cannot be read", "lag": None}, 503)
        ready = total <= service.max_lag
        return _json(
            {"ready": ready, "lag": lag, "total_lag": total, "max_lag": service.max_lag},
            200 if ready else 503,
        )

    async def metrics(request: Request) -> Response:
        """Prometheus text format: this app's registry (kv.stats() and the HTTP counters)."""
        _check_params(request, ())
        data = await run_in_threadpool(generate_latest, service.registry)
        return Response(data, media_type="text/plain; version=0.0.4; charset=utf-8")

    # -- the console -----------------------------------------------------------

    static = resources.files(__package__) / "static"
    files = {
        "": ("index.html", "text/html; charset=utf-8"),
        "console.js": ("console.js", "text/javascript; charset=utf-8"),
        "console.css": ("console.css", "text/css; charset=utf-8"),
    }
    contents = {path: ((static / name).read_bytes(), media) for path, (name, media) in files.items()}

    async def console(request: Request) -> Response:
        """The operator console's static files (no data in them: the page asks for the token)."""
        name = request.url.path.rsplit("/", 1)[-1]
        found = contents.get(name)
        if found is None:
            return _error(404, f"no such file: {name}")
        return Response(found[0], media_type=found[1], headers={"Cache-Control": "no-cache"})

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        yield
        service.watcher.wake_all()

    routes = [
        Route("/v1/keys/{key:path}", guarded(get_key), methods=["GET"]),
        Route("/v1/keys/{key:path}", guarded(put_key), methods=["PUT"]),
        Route("/v1/keys/{key:path}", guarded(delete_key), methods=["DELETE"]),
        Route("/v1/batch", guarded(batch), methods=["POST"]),
        Route("/v1/scan", guarded(scan), methods=["GET"]),
        Route("/v1/stats", guarded(stats), methods=["GET"]),
        Route("/metrics", guarded(metrics), methods=["GET"]),
        Route("/healthz", guarded(healthz, public=True), methods=["GET"]),
        Route("/readyz", guarded(readyz, public=True), methods=["GET"]),
        Route("/", guarded(console, public=True), methods=["GET"]),
        Route("/console.js", guarded(console, public=True), methods=["GET"]),
        Route("/console.css", guarded(console, public=True), methods=["GET"]),
    ]

    async def not_found(request: Request, exc: Exception) -> Response:
        return _error(404, f"no route {request.method} {request.url.path}")

    async def not_allowed(request: Request, exc: Exception) -> Response:
        return _error(405, f"{request.method} is not allowed on {request.url.path}")

    application = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={404: not_found, 405: not_allowed},
    )
    application.state.kvlog = service
    return application
