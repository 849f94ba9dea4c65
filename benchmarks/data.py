"""The data every subject reads: one compacted topic per value size, filled once.

The records are exactly what ``KVLog`` writes with its default codec (UTF-8
keys, msgpack values), produced with a plain kafka-python producer so filling
the topic is not part of any measurement. Every subject of a run (kvlog, the
raw consumer, the hand-rolled dict, ktables) reads the same topic.
"""

from __future__ import annotations

import struct
import time
import uuid
from collections.abc import Sequence
from typing import Any

import msgpack
from crc32c import crc32c
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic

from benchmarks.harness import Context, value_of_size

__all__ = ["encoded_values", "topic_for"]


def _end_offset(bootstrap_servers: str, topic: str) -> int:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap_servers, group_id=None, enable_auto_commit=False)
    try:
        tp = TopicPartition(topic, 0)
        return int(consumer.end_offsets([tp])[tp])
    finally:
        consumer.close()


_topics: dict[tuple[str, int, int, str], str] = {}


def encoded_values(ctx: Context, size: int) -> list[bytes]:
    """The msgpack value of every key, about ``size`` bytes each."""
    return [msgpack.packb(value_of_size(i, size)) for i in range(ctx.keys)]


def create_topic(bootstrap_servers: str, prefix: str, *, partitions: int = 1) -> str:
    """Create a fresh compacted topic and return its name."""
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    admin = KafkaAdminClient(bootstrap_servers=bootstrap_servers)
    try:
        admin.create_topics(
            [
                NewTopic(
                    name,
                    num_partitions=partitions,
                    replication_factor=1,
                    topic_configs={"cleanup.policy": "compact", "max.message.bytes": str(8 << 20)},
                )
            ]
        )
    finally:
        admin.close()
    return name


#: The bytes of records a batch of the bulk load holds (what the producer's ``batch_size`` was).
BATCH_BYTES = 1 << 20
#: Batches sent and not yet acknowledged, at most.
IN_FLIGHT = 16


def packed_value(i: int, size: int) -> bytes:
    """``msgpack.packb(value_of_size(i, size))``, byte for byte, packing once instead of twice.

    ``value_of_size`` packs the value with an empty note to size the note; the
    note is the map's last entry, so the packed value is that encoding with
    its empty string (its last byte) replaced by the note.
    """
    value: dict[str, Any] = {
        "customer": f"customer:{i % 10_000:05d}",
        "status": "paid",
        "total": (i % 99_991) / 100,
        "items": i % 17,
        "note": "",
    }
    empty = msgpack.packb(value)
    length = max(0, size - len(empty) - 2)
    if length < 32:
        header = bytes((0xA0 | length,))
    elif length < 256:
        header = bytes((0xD9, length))
    else:
        header = b"\xda" + length.to_bytes(2, "big")
    return empty[:-1] + header + b"n" * length


def _zigzag_varint(n: int) -> bytes:
    value = (n << 1) ^ (n >> 63)
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


_VARINTS: list[bytes] = []


def encode_batch(records: Sequence[tuple[bytes, bytes]], timestamp_ms: int) -> bytes:
    """One uncompressed record batch (message format v2) of ``records``, offsets from 0, no headers.

    What kafka-python's producer builds for the same records, without a
    Python call per field: each record is attributes 0, timestamp delta 0,
    its offset delta, key and value. Lengths and offset deltas are below
    65,536 here (checked), so their varints come from a table.
    """
    if not _VARINTS:
        _VARINTS.extend(_zigzag_varint(n) for n in range(1 << 16))
    varint = _VARINTS
    parts = []
    for delta, (key, value) in enumerate(records):
        body = b"".join(
            (b"\x00\x00", varint[delta], varint[len(key)], key, varint[len(value)], value, b"\x00")
        )
        parts.append(varint[len(body)])
        parts.append(body)
    count = len(records)
    after_crc = struct.pack(
        ">hiqqqhii", 0, count - 1, timestamp_ms, timestamp_ms, -1, -1, -1, count
    ) + b"".join(parts)
    # batchLength counts what follows it: partitionLeaderEpoch, magic, crc and the rest.
    return struct.pack(">qiibI", 0, 4 + 1 + 4 + len(after_crc), -1, 2, crc32c(after_crc)) + after_crc


class _BuiltRecords:
    """A record batch built beforehand, as kafka-python's producer holds a batch it is building (closed, full)."""

    producer_id = -1
    producer_epoch = -1
    base_sequence = -1

    def __init__(self, data: bytes, count: int) -> None:
        self._data, self._count = data, count

    def buffer(self) -> bytes:
        return self._data

    def next_offset(self) -> int:
        return self._count

    def size_in_bytes(self) -> int:
        return len(self._data)

    def is_full(self) -> bool:
        return True

    def close(self) -> None:
        pass

    def compression_rate(self) -> float:
        return 1.0


def _bulk_load(ctx: Context, topic: str, size: int) -> None:
    """Write ``ctx.key(i)`` -> ~``size`` B msgpack value for every key, in order, as fast as this process can.

    A bulk load: the leader's acknowledgement only (the broker has one
    replica), no retries (a retried batch could land twice or out of order;
    without retries a failed send fails the run instead). kafka-python's
    producer costs tens of microseconds a record in Python; here the batches
    are encoded by :func:`encode_batch` and handed to the producer's own
    sender whole, :data:`IN_FLIGHT` at most unacknowledged.
    """
    from kafka.producer.producer_batch import ProducerBatch

    producer = KafkaProducer(
        bootstrap_servers=ctx.bootstrap_servers,
        acks=1,
        enable_idempotence=False,
        retries=0,
        linger_ms=0,
        max_request_size=8 << 20,
    )
    try:
        tp = TopicPartition(topic, 0)
        producer.partitions_for(topic)  # the partition's leader, before the first batch
        accumulator, sender = producer._accumulator, producer._sender
        pending: list[Any] = []
        key = ctx.key
        batch: list[tuple[bytes, bytes]] = []
        batch_bytes = 0
        now_ms = int(time.time() * 1000)

        def send() -> None:
            built = ProducerBatch(tp, _BuiltRecords(encode_batch(batch, now_ms), len(batch)))
            with accumulator._tp_lock(tp):
                accumulator._batches[tp].append(built)
                accumulator._incomplete.add(built)
            sender.wakeup()
            pending.append(built.produce_future)
            while len(pending) > IN_FLIGHT:
                _acknowledged(pending.pop(0))

        for i in range(ctx.keys):
            record = (key(i).encode(), packed_value(i, size))
            if max(len(record[0]), len(record[1])) >= 1 << 15:
                raise ValueError("a bulk-loaded key or value must be under 32 KiB")
            batch.append(record)
            batch_bytes += len(record[0]) + len(record[1]) + 8
            if batch_bytes >= BATCH_BYTES or len(batch) >= (1 << 16) - 1:
                send()
                batch, batch_bytes = [], 0
        if batch:
            send()
        for future in pending:
            _acknowledged(future)
    finally:
        producer.close()


def _acknowledged(future: Any, timeout: float = 120.0) -> None:
    if not future.wait(timeout):
        raise RuntimeError(f"a batch of the bulk load was not acknowledged within {timeout:.0f} s")
    if future.failed():
        raise RuntimeError(f"a batch of the bulk load failed: {future.exception!r}")


def topic_for(ctx: Context, size: int, *, tag: str = "") -> str:
    """The topic holding ``ctx.keys`` keys with ~``size``-byte values (created on first use).

    Workloads that append to their topic pass a ``tag`` of their own, so the
    shared topics keep exactly one record a key.
    """
    cache_key = (ctx.bootstrap_servers, ctx.keys, size, tag)
    if cache_key in _topics:
        return _topics[cache_key]
    topic = create_topic(ctx.bootstrap_servers, f"bench-{tag or 'data'}-{size}b")
    print(f"  filling topic {topic}: {ctx.keys:,} keys, ~{size} B values", flush=True)
    started = time.perf_counter()
    _bulk_load(ctx, topic, size)
    # Every record once: with no retries nothing is written twice, so the end offset counts them.
    end = _end_offset(ctx.bootstrap_servers, topic)
    if end != ctx.keys:
        raise RuntimeError(f"{topic} holds {end} records after the load, expected {ctx.keys}")
    seconds = time.perf_counter() - started
    print(f"  filled {topic} in {seconds:.1f} s ({ctx.keys / seconds:,.0f} records/s)", flush=True)
    _topics[cache_key] = topic
    return topic
