"""The data every subject reads: one compacted topic per value size, filled once.

The records are exactly what ``KVLog`` writes with its default codec (UTF-8
keys, msgpack values), produced with a plain kafka-python producer so filling
the topic is not part of any measurement. Every subject of a run (kvlog, the
raw consumer, the hand-rolled dict, ktables) reads the same topic.
"""

from __future__ import annotations

import time
import uuid

import msgpack
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
    # A bulk load: the leader's acknowledgement only (the broker has one
    # replica), big batches, no retries (a retried batch could land twice or
    # out of order; without retries a failed send fails the run instead).
    producer = KafkaProducer(
        bootstrap_servers=ctx.bootstrap_servers,
        acks=1,
        enable_idempotence=False,
        retries=0,
        linger_ms=50,
        batch_size=1 << 20,
        max_request_size=8 << 20,
    )
    try:
        key, send, packb = ctx.key, producer.send, msgpack.packb
        for i in range(ctx.keys):
            send(topic, key=key(i).encode(), value=packb(value_of_size(i, size)))
        producer.flush(timeout=max(300, ctx.keys / 10_000))
    finally:
        producer.close()
    # Every record once: with no retries nothing is written twice, so the end offset counts them.
    end = _end_offset(ctx.bootstrap_servers, topic)
    if end != ctx.keys:
        raise RuntimeError(f"{topic} holds {end} records after the load, expected {ctx.keys}")
    seconds = time.perf_counter() - started
    print(f"  filled {topic} in {seconds:.1f} s ({ctx.keys / seconds:,.0f} records/s)", flush=True)
    _topics[cache_key] = topic
    return topic
