"""ktables as a competitor: what a user of ``ktables.KafkaTable`` would get instead of kvlog.

ktables (on aiokafka) materializes a compacted topic into an in-memory dict in
an asyncio program. These synchronous wrappers run one event loop each
(``asyncio.run``) so any workload can call them, and raise
:class:`~benchmarks.harness.Skipped` when ktables is not installed.

* :func:`cold_load_seconds`: construct a table and wait for ``async with`` to
  return caught up. ktables keeps nothing between runs, so this is both its
  time-to-ready and its restart time (every start replays the whole topic).
* :func:`publish_to_visible_seconds`: ``await writer.set(k, v)`` until
  ``table.get(k)`` returns ``v`` in the same process (ktables has no
  read-your-writes; this is the broker round trip plus the reader's fetch).
* :func:`publish_to_visible_elsewhere_seconds`: the same, with the table in
  another process, as another instance of a service would hold it.

Both use ktables' defaults except where noted: ``catchup_timeout`` is raised
(its default, 30 s, would let a large topic come up "degraded", i.e. partial,
and the timing would stop early), and the writer is idempotent with
``acks="all"`` like kvlog's producer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import msgpack

from benchmarks.harness import Skipped, value_of_size

__all__ = ["cold_load_seconds", "publish_to_visible_elsewhere_seconds", "publish_to_visible_seconds"]

#: Long enough for any topic the benchmarks fill: the time is measured, not bounded.
CATCHUP_TIMEOUT = 3600.0
#: How long one publish may take to become visible before the sample fails.
VISIBLE_DEADLINE = 10.0


def _ktables() -> Any:
    try:
        import ktables
    except ImportError as exc:
        raise Skipped(f"ktables is not importable: {exc}") from exc
    return ktables


@contextmanager
def _quiet_logs() -> Iterator[None]:
    """Keep ktables' and aiokafka's INFO chatter out of the benchmark output (warnings still show)."""
    loggers = [logging.getLogger(name) for name in ("ktables", "aiokafka")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        if lg.getEffectiveLevel() < logging.WARNING:
            lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _decode(data: bytes) -> Any:
    # What kvlog's msgpack codec does on a read.
    return msgpack.unpackb(data, raw=False, strict_map_key=True)


def _encode(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)  # type: ignore[no-any-return]


def cold_load_seconds(bootstrap: str, topic: str, expected: int | None = None) -> tuple[float, int]:
    """Seconds from constructing a ``KafkaTable`` on ``topic`` to it being caught up, and its entries.

    Raises:
        Skipped: ktables is not installed.
        RuntimeError: the table did not come up ``caught_up``, or does not hold
            ``expected`` entries.
    """
    ktables = _ktables()

    async def load() -> tuple[float, int]:
        started = time.perf_counter()
        table = ktables.KafkaTable(
            connection=bootstrap, topic=topic, value_decoder=_decode, catchup_timeout=CATCHUP_TIMEOUT
        )
        async with table:
            seconds = time.perf_counter() - started
            status, entries = table.status, len(table)
        if status != "caught_up":
            raise RuntimeError(f"ktables table on {topic!r} came up {status!r}, not caught_up")
        if expected is not None and entries != expected:
            raise RuntimeError(f"ktables table on {topic!r} holds {entries:,} entries, expected {expected:,}")
        return seconds, entries

    with _quiet_logs():
        return asyncio.run(load())


def publish_to_visible_seconds(bootstrap: str, topic: str | None, samples: int) -> list[float]:
    """Per-write seconds from ``await writer.set(k, v)`` to ``table.get(k) == v``, ``samples`` times.

    ``topic`` is where the fresh keys are written: pass ``None`` for a new
    small topic, or one of the caller's own. A shared (untagged) data topic
    from :func:`benchmarks.data.topic_for` is refused, since the new keys
    would change what every other subject reads.

    One unmeasured write first (the idempotent producer's first send also
    fetches metadata and a producer id). The table is polled in a tight loop
    of ``await asyncio.sleep(0)``: each turn yields to the event loop, which is
    where the table's reader task applies records; nothing sleeps.

    Raises:
        Skipped: ktables is not installed.
        RuntimeError: the table did not come up, or a write was not visible
            within :data:`VISIBLE_DEADLINE` seconds.
    """
    ktables = _ktables()
    from benchmarks import data

    if topic is None:
        topic = data.create_topic(bootstrap, "bench-ktables-visible")
    else:
        # topic_for's cache: (servers, keys, size, tag) -> topic; an untagged one is shared.
        shared = {name for key, name in data._topics.items() if not key[3:] or not key[3]}
        if topic in shared:
            raise ValueError(f"{topic!r} is a shared data topic; pass None to write to a fresh one")
    prefix = f"visible:{uuid.uuid4().hex[:8]}"

    async def measure() -> list[float]:
        table = ktables.KafkaTable(
            connection=bootstrap, topic=topic, value_decoder=_decode, catchup_timeout=CATCHUP_TIMEOUT
        )
        writer = ktables.KafkaTableWriter(
            connection=bootstrap, topic=topic, value_encoder=_encode, enable_idempotence=True, acks="all"
        )
        latencies: list[float] = []
        async with table, writer:
            if table.status != "caught_up":
                raise RuntimeError(f"ktables table on {topic!r} came up {table.status!r}, not caught_up")
            for i in range(samples + 1):
                key, value = f"{prefix}:{i:06d}", value_of_size(i, 100)
                started = time.perf_counter()
                deadline = started + VISIBLE_DEADLINE
                await writer.set(key, value)
                while table.get(key) != value:
                    if time.perf_counter() > deadline:
                        raise RuntimeError(
                            f"ktables: {key!r} not visible {VISIBLE_DEADLINE:g}s after set() "
                            f"(table status {table.status!r})"
                        )
                    await asyncio.sleep(0)
                if i > 0:  # the first write warms the producer up
                    latencies.append(time.perf_counter() - started)
        return latencies

    with _quiet_logs():
        return asyncio.run(measure())


def _table_elsewhere(conn: Any, bootstrap: str, topic: str) -> None:
    """The other instance: a KafkaTable on ``topic``; per request, spin until it serves the value asked for."""
    ktables = _ktables()

    async def serve() -> None:
        table = ktables.KafkaTable(
            connection=bootstrap, topic=topic, value_decoder=_decode, catchup_timeout=CATCHUP_TIMEOUT
        )
        loop = asyncio.get_running_loop()
        async with table:
            conn.send(table.status)
            # The pipe is read in a thread: the loop stays free for the table's reader task.
            while (request := await loop.run_in_executor(None, conn.recv)) is not None:
                key, value = request
                conn.send("watching")
                deadline = time.perf_counter() + VISIBLE_DEADLINE
                while table.get(key) != value:
                    if time.perf_counter() > deadline:
                        conn.send(None)
                        return
                    await asyncio.sleep(0)  # each turn lets the table's reader task run; nothing sleeps
                conn.send(time.perf_counter())

    with _quiet_logs():
        asyncio.run(serve())


def publish_to_visible_elsewhere_seconds(bootstrap: str, topic: str, samples: int) -> list[float]:
    """Per-write seconds from ``await writer.set(k, v)`` to a ``KafkaTable`` in another process serving ``v``.

    ``topic`` must be a fresh one of the caller's. The table runs in a
    spawned process, polled in a loop of ``await asyncio.sleep(0)`` as in
    :func:`publish_to_visible_seconds`; the clock (``time.perf_counter``,
    the system's monotonic clock) is the same in both processes. One
    unmeasured write first.

    Raises:
        Skipped: ktables is not installed.
        RuntimeError: the table did not come up, or a write was not visible
            within :data:`VISIBLE_DEADLINE` seconds.
    """
    ktables = _ktables()
    import multiprocessing

    prefix = f"visible-elsewhere:{uuid.uuid4().hex[:8]}"
    ours, theirs = multiprocessing.get_context("spawn").Pipe()
    child = multiprocessing.get_context("spawn").Process(
        target=_table_elsewhere, args=(theirs, bootstrap, topic), daemon=True
    )
    child.start()
    try:
        if not ours.poll(60):
            raise RuntimeError("the ktables table in another process did not come up within 60 s")
        status = ours.recv()
        if status != "caught_up":
            raise RuntimeError(f"ktables table on {topic!r} came up {status!r}, not caught_up")

        async def measure() -> list[float]:
            writer = ktables.KafkaTableWriter(
                connection=bootstrap, topic=topic, value_encoder=_encode, enable_idempotence=True, acks="all"
            )
            latencies: list[float] = []
            async with writer:
                for i in range(samples + 1):
                    key, value = f"{prefix}:{i:06d}", value_of_size(i, 100)
                    ours.send((key, value))
                    if not ours.poll(VISIBLE_DEADLINE) or ours.recv() != "watching":
                        raise RuntimeError("the ktables table in another process stopped answering")
                    started = time.perf_counter()
                    await writer.set(key, value)
                    if not ours.poll(VISIBLE_DEADLINE + 5):
                        raise RuntimeError("the ktables table in another process stopped answering")
                    seen = ours.recv()
                    if seen is None:
                        raise RuntimeError(
                            f"ktables: {key!r} not visible in another process {VISIBLE_DEADLINE:g}s after set()"
                        )
                    if i > 0:  # the first write warms the producer up
                        latencies.append(seen - started)
            return latencies

        with _quiet_logs():
            return asyncio.run(measure())
    finally:
        with contextlib.suppress(OSError, BrokenPipeError):
            ours.send(None)
        child.join(10)
        if child.is_alive():
            child.kill()
            child.join()
