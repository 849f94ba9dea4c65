"""``kvlog serve`` over a Kafka topic: writes through the server reach the topic, and writes of
another producer reach the server's cache and wake its long-polls."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from http_helpers import LongPoll, Served, target_args

from kvlog import KVLog


def test_serve_over_kafka_reads_writes_and_wakes_long_polls(
    make_kv: Callable[..., KVLog], bootstrap: str, topic: str, tmp_path: Path
) -> None:
    other = make_kv()  # another producer and cache on the topic (creates it)
    other["k"] = {"from": "other"}
    target = target_args(cache=tmp_path / "served-cache", kafka=(bootstrap, topic))
    with Served(target, "--writable", log_dir=tmp_path) as server:
        assert server.client.get("/v1/keys/k").json() == {"from": "other"}
        assert server.client.put("/v1/keys/s", json=[1, 2]).status_code == 200
        other.sync()
        assert other["s"] == [1, 2]

        etag = server.client.get("/v1/keys/k").headers["etag"]
        poll = LongPoll(server, "k", etag)
        poll.wait_until_waiting()
        other["k"] = {"from": "other", "again": True}
        written = time.monotonic()
        response = poll.result()
        assert response.status_code == 200 and response.json() == {"from": "other", "again": True}
        assert poll.answered_at - written < 10  # woken by the follower's replay, not the 30 s timeout
        stats = server.client.get("/v1/stats").json()
        assert stats["log"]["kind"] == "kafka" and stats["total_lag"] == 0
        assert 'kvlog_lag{partition="0"} 0.0' in server.client.get("/metrics").text
