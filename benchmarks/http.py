"""Workload "http": point reads through ``kvlog serve``, and how fast its long-polls hear of a write.

Three servers on loopback, each one process, measured by the same client:

* **kvlog serve**: ``python -m kvlog --data DIR serve`` over an embedded
  database of ``--keys`` order-like values (~100 B of msgpack), answering
  ``GET /v1/keys/{key}`` with the value as JSON and its ETag;
* **the HTTP floor**: a bare Starlette route returning a dict of the same
  size, on uvicorn with the settings ``kvlog serve`` uses
  (``benchmarks/_http_floor.py``): what any Starlette app pays per request
  before doing any work of its own;
* **Redis GET** of the same msgpack bytes on a private ``redis-server``.

The client is this process: ``CONNECTIONS`` keep-alive connections driven by
one asyncio loop over raw sockets (a minimal HTTP/1.1 request, the response
read by its Content-Length; RESP for Redis), each sending its next request
when the last one answered, on uniformly drawn keys, for a fixed time per
sample. A sample's figures are its requests per second and the p50 and p99
of its requests' latencies. Subjects take turns round by round in an order
reversed every round (:func:`benchmarks.harness.turns`), so kvlog's ratios to
the floor and to Redis are medians of per-round ratios.

**Long-poll notification**: a client long-polls a key on ``kvlog serve``
(``?wait=`` with ``If-None-Match``); once the server counts it among its
waiting long-polls, this process writes the key with its own ``KVLog`` on the
same directory (a writer in another process, as far as the server knows) and
takes the time its write returned; the latency is from there to the client
having the whole answer. The server learns of the write by polling the cache
version (docs/design.md, "Serving over HTTP").

``--check`` goals: GET/s at least 0.8x the floor's; notification p50 at most 2 ms.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import msgpack

from benchmarks.harness import Context, Row, Skipped, more_rounds, percentile, turns, value_of_size
from benchmarks.processes import Goal

__all__ = ["GOALS", "run"]

WORKLOAD = "http"
CONNECTIONS = 8
KVLOG = "kvlog serve"
FLOOR = "bare Starlette route (HTTP floor)"
REDIS = "Redis GET"
CASE_RATE_FLOOR = f"GET/s, {CONNECTIONS} connections, vs the HTTP floor"
CASE_RATE_REDIS = f"GET/s, {CONNECTIONS} connections, vs Redis"
CASE_P50 = "GET latency p50"
CASE_P99 = "GET latency p99"
CASE_NOTIFY_P50 = "long-poll notification p50, from the write's return"
CASE_NOTIFY_P99 = "long-poll notification p99, from the write's return"
VALUE_SIZE = 100
#: How precisely the GET/s ratio to the floor should be known before the rounds stop (+-5%).
PRECISION = 0.05
#: Seconds a subject may take to start.
PATIENCE = 60.0

GOALS = (
    Goal(
        "GET/s through kvlog serve vs a bare Starlette route",
        WORKLOAD,
        (CASE_RATE_FLOOR,),
        KVLOG,
        0.8,
        explain="at least 0.8x the GET/s of a Starlette route returning a dict on the same uvicorn setup",
    ),
    Goal(
        "long-poll notification p50",
        WORKLOAD,
        (CASE_NOTIFY_P50,),
        KVLOG,
        2.0,
        unit="ms",
        explain="a long-poll answers within 2 ms (p50) of another process's write returning",
    ),
)


def _sizes(ctx: Context) -> tuple[float, int]:
    """Seconds per GET sample and notifications per round: smaller with a smaller ``--reads``."""
    scale = min(1.0, ctx.reads / 200_000)
    return max(0.2, 0.75 * scale), max(10, int(60 * scale))


# -- the servers -----------------------------------------------------------------


@contextmanager
def _process(argv: list[str], pattern: str, env: dict[str, str] | None = None) -> Iterator[str]:
    """A server process; yields the first match of ``pattern``'s group in its stdout (its port)."""
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # once the port is bound (or "" if it died)
        found = re.search(pattern, line)
        if not found:
            proc.kill()
            raise Skipped(f"{argv[2:4]} did not start: {line!r} {proc.communicate(timeout=10)[1][-500:]}")
        yield found.group(1)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(PATIENCE)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(PATIENCE)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def _env() -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("KVLOG_BOOTSTRAP_SERVERS", "KVLOG_TOPIC", "KVLOG_TOKEN")
    }
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _wait_for_port(port: int) -> None:
    deadline = time.monotonic() + PATIENCE
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise Skipped(f"nothing answers on port {port}") from None
            time.sleep(0.02)  # the polling interval of a deadline-bounded wait


# -- the client ------------------------------------------------------------------


async def _http_connection(
    port: int, paths: list[bytes], deadline: float, latencies: list[float], offset: int
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    clock = time.perf_counter
    i = offset
    try:
        while clock() < deadline:
            request = b"GET " + paths[i % len(paths)] + b" HTTP/1.1\r\nHost: bench\r\n\r\n"
            i += 1
            started = clock()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head[head.lower().index(b"content-length:") + 15 :].split(b"\r\n", 1)[0])
            body = await reader.readexactly(length)
            latencies.append(clock() - started)
            if not head.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"answered {head[:40]!r} {body[:200]!r}")
    finally:
        writer.close()


async def _redis_connection(
    port: int, keys: list[bytes], deadline: float, latencies: list[float], offset: int
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    clock = time.perf_counter
    i = offset
    try:
        while clock() < deadline:
            key = keys[i % len(keys)]
            i += 1
            started = clock()
            writer.write(b"*2\r\n$3\r\nGET\r\n$%d\r\n%s\r\n" % (len(key), key))
            header = await reader.readline()
            if not header.startswith(b"$") or header.startswith(b"$-1"):
                raise RuntimeError(f"redis answered {header!r}")
            await reader.readexactly(int(header[1:]) + 2)
            latencies.append(clock() - started)
    finally:
        writer.close()


def _load(
    connect: Callable[..., Any], port: int, items: list[bytes], seconds: float
) -> tuple[float, list[float]]:
    """Run ``CONNECTIONS`` connections for ``seconds``: (requests per second, latencies in seconds)."""

    async def main() -> tuple[float, list[float]]:
        latencies: list[list[float]] = [[] for _ in range(CONNECTIONS)]
        started = time.perf_counter()
        deadline = started + seconds
        step = len(items) // CONNECTIONS
        await asyncio.gather(
            *(connect(port, items, deadline, latencies[c], c * step) for c in range(CONNECTIONS))
        )
        elapsed = time.perf_counter() - started
        every = [x for per in latencies for x in per]
        return len(every) / elapsed, every

    return asyncio.run(main())


# -- long-poll notification -------------------------------------------------------


def _notification(client: Any, port: int, kv: Any, key: str, value: int) -> float:
    """One long-poll woken by ``kv[key] = value``: seconds from the write's return to the whole answer.

    ``client`` is an httpx client on the server, for the ETag and to see the long-poll waiting.
    """
    etag = client.get(f"/v1/keys/{key}").headers["etag"]
    answered: list[float] = []
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def waiter() -> None:
        sock.sendall(
            f"GET /v1/keys/{key}?wait=30 HTTP/1.1\r\nHost: bench\r\nIf-None-Match: {etag}\r\n\r\n".encode()
        )
        data = b""
        while b"\r\n\r\n" not in data:
            data += sock.recv(65536)
        head, _, body = data.partition(b"\r\n\r\n")
        length = int(head[head.lower().index(b"content-length:") + 15 :].split(b"\r\n", 1)[0])
        while len(body) < length:
            body += sock.recv(65536)
        answered.append(time.perf_counter())
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"the long-poll answered {head[:60]!r}")

    thread = threading.Thread(target=waiter)
    thread.start()
    deadline = time.monotonic() + PATIENCE
    while "kvlog_http_longpolls_waiting 1.0" not in client.get("/metrics").text:
        if time.monotonic() > deadline:
            raise RuntimeError("the long-poll never started waiting")
        time.sleep(0.001)  # the polling interval of a deadline-bounded wait
    kv[key] = value
    written = time.perf_counter()
    thread.join(PATIENCE)
    sock.close()
    if not answered:
        raise RuntimeError("the long-poll never answered")
    return answered[0] - written


# -- the workload -------------------------------------------------------------------


def run(ctx: Context) -> list[Row]:
    """GET/s and latency through kvlog serve, the HTTP floor and Redis; long-poll notification latency."""
    from kvlog import KVLog

    seconds, notifications = _sizes(ctx)
    data = ctx.subdir("http") / "data"
    values = [msgpack.packb(value_of_size(i, VALUE_SIZE)) for i in range(ctx.keys)]
    keys = [ctx.key(i) for i in range(ctx.keys)]
    with KVLog(data, fsync="never") as kv:  # loading only: the figures are reads
        for start in range(0, ctx.keys, 10_000):
            kv.update(
                (keys[i], value_of_size(i, VALUE_SIZE)) for i in range(start, min(ctx.keys, start + 10_000))
            )
    rng = random.Random(ctx.seed)
    order = [rng.randrange(ctx.keys) for _ in range(100_000)]
    paths = [f"/v1/keys/{keys[i]}".encode() for i in order]
    redis_keys = [keys[i].encode() for i in order]

    rows: list[Row] = []
    with ExitStack() as stack:
        env = _env()
        served = int(
            stack.enter_context(
                _process(
                    [sys.executable, "-m", "kvlog", "--data", str(data), "serve", "--port", "0"],
                    r"http://127\.0\.0\.1:(\d+)/",
                    env,
                )
            )
        )
        floor = int(
            stack.enter_context(
                _process([sys.executable, "-m", "benchmarks._http_floor"], r"listening (\d+)", env)
            )
        )
        subjects: dict[str, tuple[Callable[..., Any], int, list[bytes]]] = {
            KVLOG: (_http_connection, served, paths),
            FLOOR: (_http_connection, floor, paths),
        }
        try:
            from benchmarks.redis_server import RedisServer

            redis = stack.enter_context(RedisServer(install=ctx.install))
            loader = redis.client()
            for start in range(0, ctx.keys, 10_000):
                pipe = loader.pipeline(transaction=False)
                for i in range(start, min(ctx.keys, start + 10_000)):
                    pipe.set(keys[i], values[i])
                pipe.execute()
            subjects[REDIS] = (_redis_connection, redis.port, redis_keys)
        except Skipped as exc:
            ctx.skip(WORKLOAD, REDIS, str(exc))
        for _, port, _ in subjects.values():
            _wait_for_port(port)

        rates: dict[str, list[float]] = {name: [] for name in subjects}
        p50s: dict[str, list[float]] = {name: [] for name in subjects}
        p99s: dict[str, list[float]] = {name: [] for name in subjects}
        for connect, port, items in subjects.values():
            _load(connect, port, items, seconds / 2)  # warm-up: connections, the server's first requests
        # Rounds as planned, then more (up to twice as many) while the median of the
        # per-round ratios to the floor, which --check judges, is imprecise.
        planned = max(5, ctx.runs)
        rounds = 0
        while rounds < planned or more_rounds(
            [k / f for k, f in zip(rates[KVLOG], rates[FLOOR], strict=True)], PRECISION, rounds, 2 * planned
        ):
            for name in turns(list(subjects), rounds):
                connect, port, items = subjects[name]
                rate, latencies = _load(connect, port, items, seconds)
                rates[name].append(rate)
                p50s[name].append(percentile(latencies, 0.5) * 1000)
                p99s[name].append(percentile(latencies, 0.99) * 1000)
            rounds += 1
        numbered = list(range(1, rounds + 1))
        note = f"{CONNECTIONS} keep-alive connections from one asyncio client, {seconds:.1f} s a sample"

        def add(
            case: str, subject: str, unit: str, samples: list[float], higher: bool, baseline: str | None
        ) -> None:
            rows.append(
                Row(
                    WORKLOAD,
                    case,
                    subject,
                    unit,
                    samples,
                    higher,
                    baseline=baseline,
                    note=note,
                    rounds=numbered,
                )
            )
            print(f"  {case:<55} {subject:<36} {statistics.median(samples):>10,.3f} {unit}", flush=True)

        add(CASE_RATE_FLOOR, KVLOG, "GET/s", rates[KVLOG], True, FLOOR)
        add(CASE_RATE_FLOOR, FLOOR, "GET/s", rates[FLOOR], True, None)
        if REDIS in subjects:
            add(CASE_RATE_REDIS, KVLOG, "GET/s", rates[KVLOG], True, REDIS)
            add(CASE_RATE_REDIS, REDIS, "GET/s", rates[REDIS], True, None)
        for case, figures in ((CASE_P50, p50s), (CASE_P99, p99s)):
            for name in subjects:
                add(case, name, "ms", figures[name], False, FLOOR if name != FLOOR else None)

        # Long-poll notifications: the writer is this process, the server another.
        notify_p50: list[float] = []
        notify_p99: list[float] = []
        import httpx

        with (
            KVLog(data, fsync="always") as writer,
            httpx.Client(base_url=f"http://127.0.0.1:{served}") as client,
        ):
            _notification(client, served, writer, keys[0], -1)  # warm-up
            for round_ in range(planned):
                taken = [
                    _notification(client, served, writer, keys[0], round_ * notifications + n) * 1000
                    for n in range(notifications)
                ]
                notify_p50.append(percentile(taken, 0.5))
                notify_p99.append(percentile(taken, 0.99))
        note = f"{notifications} notifications a round; the writer is another process than the server"
        numbered = list(range(1, planned + 1))
        add(CASE_NOTIFY_P50, KVLOG, "ms", notify_p50, False, None)
        add(CASE_NOTIFY_P99, KVLOG, "ms", notify_p99, False, None)
    return rows
