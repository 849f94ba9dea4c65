"""Workloads 2 and 3: cold replay (a cache built from nothing) and warm restart.

Cold replay: every subject starts from nothing and reads the whole topic. The
clock runs from creating the client to holding every key (KVLog: from the
constructor to its return, which is when the cache is current). Subjects run
interleaved, one sample each a round, the order reversed every other round
(a, b, c, c, b, a, ...), so a noisy moment of the machine does not land on one
of them only. Before every sample the garbage of the previous one is collected
and the disk is flushed (:func:`benchmarks.harness.settle`): the cache a kvlog
sample wrote and deleted is written back, or discarded, before the next
sample, not during it. The collector stays on inside the samples: both
clients allocate objects per record, and what collecting them costs is part
of consuming a topic in Python.

kvlog and the raw consumer, the pair ``--check`` judges, are measured back to
back in :data:`PAIR_ROUNDS` times as many rounds as the other subjects (which
take part in every :data:`PAIR_ROUNDS`-th round); their ratio is the median of
the per-round ratios. A cold replay is about a second of work whose speed
varies by several percent from one sample to the next on a shared machine, so
five of them do not pin a ratio down to a few percent; fifteen usually do, and
where they do not (a busy machine) the pair takes up to fifteen more rounds
while the median ratio's confidence interval is wider than +-3%.

- ``kvlog``: ``KVLog(fresh_dir, ...)`` -- replays into LMDB, ready when it returns.
- ``kvlog rewarm()``: ``kv.rewarm()`` on an open store (drops and replays).
- ``raw kafka-python consumer``: the floor of the client. A consumer with
  exactly the settings kvlog's reader uses (``read_committed``, large fetches),
  polling every record into nothing. This is the baseline of the --check goal.
- ``raw kafka-python consumer (defaults)``: the same loop with kafka-python's
  default fetch settings, to show what the settings are worth.
- ``dict consumer (hand-rolled)``: what users write first: consume the topic
  into a dict, decoding every value with msgpack.
- ``ktables``: ktables' ``KafkaTable`` (aiokafka), ready when ``start()`` returns.

Warm restart reopens a cache whose checkpoint is in place, with nothing new
in the topic or with 1% of the keys rewritten since; ktables has no
checkpoint, so its restart is a cold load.
"""

from __future__ import annotations

import random
import shutil
import time
from collections.abc import Callable
from typing import Any

import msgpack
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from benchmarks import ktables_bench, scale
from benchmarks.data import topic_for
from benchmarks.harness import Context, Row, Skipped, more_rounds, settle, turns, value_of_size
from kvlog import KVLog
from kvlog.log.kafka import _shorten_startup_backoff

__all__ = ["run_cold", "run_restart"]

SIZES = {100: "~100 B values", 1000: "~1 KB values"}
COLD = "cold replay"
RESTART = "restart (time to ready)"
RAW = "raw kafka-python consumer"
#: The pair of a check is measured in this many times ``ctx.runs`` rounds...
PAIR_ROUNDS = 3
#: ...and in more, up to this many times as many, while the median of its
#: per-round ratios is known less precisely than this (half the width of its
#: 95% confidence interval, relative: see benchmarks.harness.more_rounds).
PAIR_PRECISION = 0.03
PAIR_BUDGET = 2

# The settings of kvlog's KafkaReader (kvlog/log/kafka.py): the raw baseline
# reads with the same ones, so the ratio is what kvlog adds on top of the client.
KVLOG_READER_SETTINGS: dict[str, Any] = {
    "isolation_level": "read_committed",
    "max_poll_records": 100_000,
    "fetch_max_bytes": 64 * 1024 * 1024,
    "max_partition_fetch_bytes": 16 * 1024 * 1024,
    "retry_backoff_ms": 10,
}


def _end_offset(bootstrap: str, topic: str) -> int:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    try:
        tp = TopicPartition(topic, 0)
        return int(consumer.end_offsets([tp])[tp])
    finally:
        consumer.close()


def _consume(bootstrap: str, topic: str, end: int, into: dict[bytes, Any] | None, **settings: Any) -> float:
    """Seconds to read offsets [0, end) with a fresh consumer, into nothing or a dict."""
    started = time.perf_counter()
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False, **settings)
    # kvlog's clients skip kafka-python's 100 ms metadata backoff after
    # bootstrap; so does the baseline, or kvlog would win 100 ms for free.
    _shorten_startup_backoff(consumer)
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        consumer.seek(tp, 0)
        unpack = msgpack.unpackb
        while consumer.position(tp) < end:
            for records in consumer.poll(timeout_ms=1000).values():
                if into is None:
                    continue
                for record in records:
                    if record.value is None:
                        into.pop(record.key, None)
                    else:
                        into[record.key] = unpack(record.value)
        return time.perf_counter() - started
    finally:
        consumer.close()


def _kvlog_cold(ctx: Context, topic: str) -> float:
    path = ctx.subdir("replay-kvlog")
    try:
        started = time.perf_counter()
        kv = KVLog(
            path, bootstrap_servers=ctx.bootstrap_servers, topic=topic, create_topic=False, follow=False
        )
        seconds = time.perf_counter() - started
        entries = len(kv)
        kv.close()
    finally:
        shutil.rmtree(path, ignore_errors=True)
    if entries != ctx.keys:
        raise AssertionError(f"kvlog replayed {entries} keys, expected {ctx.keys}")
    return seconds


def _interleaved(
    ctx: Context,
    subjects: dict[str, Callable[[], float]],
    label: str,
    pair: tuple[str, str] | None = None,
    budget: int = PAIR_BUDGET,
) -> dict[str, tuple[list[float], list[int]]]:
    """Each subject's samples and the rounds they were taken in, after one warm-up round.

    Every subject takes ``ctx.runs`` samples, one a round, in the order of
    :func:`benchmarks.harness.turns`. The two subjects of ``pair``, given
    first in ``subjects``, take one in every round of ``PAIR_ROUNDS *
    ctx.runs``, back to back; the others then in every ``PAIR_ROUNDS``-th.
    After those, the pair alone takes more rounds, up to ``PAIR_BUDGET``
    times as many, while the median of its per-round ratios is less precise
    than ``PAIR_PRECISION``. Above :data:`benchmarks.scale.LARGE` keys, where
    a sample takes a minute, the pair takes ``ctx.runs`` rounds, no more, and
    there is no warm-up round: the topic was just written, and a sample long
    enough to amortise what a warm-up would pay for.
    """
    if pair is not None and tuple(subjects)[:2] != pair:
        raise ValueError(f"the pair {pair} must be the first two subjects")
    large = scale.is_large(ctx.keys)
    every = PAIR_ROUNDS if pair is not None and not large else 1
    budget = 1 if large else budget
    planned = ctx.runs * every
    samples: dict[str, tuple[list[float], list[int]]] = {name: ([], []) for name in subjects}
    round_ = 1 if large else 0
    while round_ <= planned or (
        pair is not None
        and all(name in samples for name in pair)
        and more_rounds(
            # Speed of the second relative to the first: their times the other way round.
            [a / b for a, b in zip(samples[pair[0]][0], samples[pair[1]][0], strict=True)],
            PAIR_PRECISION,
            round_ - 1,
            budget * planned,
        )
    ):
        # Round 0 warms up the broker's page cache, its JIT and the clients.
        due = [
            name
            for name in subjects
            if not round_
            or (pair is not None and name in pair)
            or (round_ <= planned and (round_ - 1) % every == 0)
        ]
        for name in turns(due, round_):
            if name not in subjects:
                continue
            settle()
            try:
                seconds = subjects[name]()
            except Skipped as exc:
                ctx.skip(label, name, str(exc))
                del subjects[name], samples[name]
                continue
            if round_:
                samples[name][0].append(seconds)
                samples[name][1].append(round_)
        round_ += 1
    if round_ - 1 > planned:
        print(
            f"  {label}: {round_ - 1} rounds of {' and '.join(pair or ())} (the ratio needed more)",
            flush=True,
        )
    return samples


#: Above benchmarks.scale.LARGE keys, only these subjects replay (the others take minutes a sample).
LARGE_SUBJECTS = (RAW, "kvlog")


def run_cold(ctx: Context) -> list[Row]:
    """Cold replay of the whole topic, for ~100 B and ~1 KB values; then replay at scale (benchmarks/scale.py).

    Above :data:`benchmarks.scale.LARGE` keys, only ~100 B values: ~1 KB
    values would take a topic of over 10 GB per 10M keys and as much again
    in every cache a sample builds, and minutes a sample.
    """
    rows: list[Row] = []
    for size, case in SIZES.items():
        if size > 100 and scale.is_large(ctx.keys):
            ctx.skip(
                COLD,
                case,
                f"above {scale.LARGE:,} keys only ~100 B values are replayed "
                f"(~1 KB values: {ctx.keys * size / 1e9:,.0f} GB of topic and as much per cache, minutes a sample)",
            )
            continue
        rows.extend(_cold_case(ctx, size, case))
    rows.extend(scale.run(ctx))
    return rows


def _cold_case(ctx: Context, size: int, case: str) -> list[Row]:
    bs = ctx.bootstrap_servers
    topic = topic_for(ctx, size)
    end = _end_offset(bs, topic)
    rewarm_path = ctx.subdir("replay-rewarm")
    # Opened at its first sample (the warm-up round): a subject skipped at scale costs no replay.
    rewarm_kv: list[KVLog] = []

    def rewarm() -> float:
        if not rewarm_kv:
            rewarm_kv.append(
                KVLog(rewarm_path, bootstrap_servers=bs, topic=topic, create_topic=False, follow=False)
            )
        started = time.perf_counter()
        rewarm_kv[0].rewarm()
        return time.perf_counter() - started

    def ktables() -> float:
        seconds, entries = ktables_bench.cold_load_seconds(bs, topic)
        if entries != ctx.keys:
            raise AssertionError(f"ktables loaded {entries} keys, expected {ctx.keys}")
        return seconds

    subjects: dict[str, Callable[[], float]] = {
        RAW: lambda: _consume(bs, topic, end, None, **KVLOG_READER_SETTINGS),
        "kvlog": lambda: _kvlog_cold(ctx, topic),
        "kvlog rewarm()": rewarm,
        f"{RAW} (defaults)": lambda: _consume(bs, topic, end, None),
        "dict consumer (hand-rolled)": lambda: _consume(bs, topic, end, {}),
        "ktables": ktables,
    }
    if scale.is_large(ctx.keys):
        for name in [n for n in subjects if n not in LARGE_SUBJECTS]:
            ctx.skip(
                COLD, name, f"above {scale.LARGE:,} keys only the checked pair replays (minutes a sample)"
            )
            del subjects[name]
    try:
        samples = _interleaved(ctx, subjects, COLD, pair=(RAW, "kvlog"))
    finally:
        for kv in rewarm_kv:
            kv.close()
        shutil.rmtree(rewarm_path, ignore_errors=True)
    rows = []
    for name, (seconds, rounds) in samples.items():
        rate = [end / s for s in seconds]
        row = Row(
            COLD, case, name, "records/s", rate, True, baseline=None if name == RAW else RAW, rounds=rounds
        )
        rows.append(row)
        print(f"  {COLD}: {name}, {case}: {row.median:,.0f} records/s (median of {len(rate)})", flush=True)
    return rows


def _rewrite(bootstrap: str, topic: str, ctx: Context, count: int, size: int, seed: int) -> None:
    """Overwrite ``count`` random existing keys with new values, as a writer would."""
    rng = random.Random(seed)
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True, linger_ms=5)
    try:
        for i in rng.sample(range(ctx.keys), count):
            producer.send(topic, key=ctx.key(i).encode(), value=msgpack.packb(value_of_size(i + seed, size)))
        producer.flush(timeout=60)
    finally:
        producer.close()


def run_restart(ctx: Context) -> list[Row]:
    """Time to ready: cold replay vs warm restart (0% and 1% new records) vs ktables."""
    size = 100
    topic = topic_for(ctx, size, tag="restart")
    bs = ctx.bootstrap_servers
    path = ctx.subdir("restart-kvlog")
    KVLog(path, bootstrap_servers=bs, topic=topic, create_topic=False, follow=False).close()
    new = max(1, ctx.keys // 100)
    rewrites = iter(range(1, 10_000))

    def warm() -> float:
        started = time.perf_counter()
        kv = KVLog(path, bootstrap_servers=bs, topic=topic, create_topic=False, follow=False)
        seconds = time.perf_counter() - started
        mode = kv.open_replay["mode"]
        kv.close()
        if mode != "warm":
            raise AssertionError(f"the reopened cache was not warm: {kv.open_replay}")
        return seconds

    def warm_after_new() -> float:
        _rewrite(bs, topic, ctx, new, size, seed=next(rewrites))
        return warm()

    def cold() -> float:
        return _kvlog_cold(ctx, topic)

    def ktables() -> float:
        return ktables_bench.cold_load_seconds(bs, topic)[0]

    rows: list[Row] = []
    case_0 = "0% new records"
    case_1 = f"1% new records ({new:,})"
    for case, subjects in (
        (
            case_0,
            {"kvlog warm restart": warm, "kvlog cold replay": cold, "ktables (always replays)": ktables},
        ),
        (
            case_1,
            {
                "kvlog warm restart": warm_after_new,
                "kvlog cold replay": cold,
                "ktables (always replays)": ktables,
            },
        ),
    ):
        subjects = dict(subjects)
        if scale.is_large(ctx.keys):
            ctx.skip(
                RESTART,
                f"ktables (always replays), {case}",
                f"above {scale.LARGE:,} keys: a cold load of every record into a dict, minutes a sample",
            )
            del subjects["ktables (always replays)"]
        samples = _interleaved(ctx, subjects, RESTART)
        for name, (seconds, rounds) in samples.items():
            baseline = None if name == "kvlog cold replay" else "kvlog cold replay"
            row = Row(RESTART, case, name, "s", seconds, False, baseline=baseline, rounds=rounds)
            rows.append(row)
            print(f"  {RESTART}: {name}, {case}: {row.median:.3f} s", flush=True)
    shutil.rmtree(path, ignore_errors=True)
    return rows
