"""Cold replay vs warm restart of a KVLog over a real Kafka topic.

    python -m benchmarks.restart --keys 100000 [--bootstrap-servers HOST:PORT]

Writes ``--keys`` keys (~100-byte values) to a fresh compacted topic, then
opens a fresh cache (cold: replays everything), closes it, and opens it again
(warm: replays only what came after the checkpoint, here nothing), printing the
times, their ratio and the warm store's ``stats()``. Starts a local broker when
none is given.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import uuid
from pathlib import Path

from kvlog import KVLog


def run(bootstrap: str, keys: int, workdir: Path) -> dict[str, object]:
    topic = f"bench-restart-{uuid.uuid4().hex[:8]}"
    with KVLog(workdir / "writer", bootstrap_servers=bootstrap, topic=topic, follow=False) as writer:
        value = {"status": "paid", "total": 12.5, "note": "x" * 60}
        for start in range(0, keys, 10_000):
            writer.update({f"order:{i:08d}": value for i in range(start, min(keys, start + 10_000))})
    started = time.perf_counter()
    cold = KVLog(workdir / "reader", bootstrap_servers=bootstrap, topic=topic)
    cold_seconds = time.perf_counter() - started
    cold_stats = cold.stats()
    cold.close()
    started = time.perf_counter()
    warm = KVLog(workdir / "reader", bootstrap_servers=bootstrap, topic=topic)
    warm_seconds = time.perf_counter() - started
    warm_stats = warm.stats()
    warm.close()
    return {
        "keys": keys,
        "cold_open_seconds": round(cold_seconds, 3),
        "cold_records_per_second": round(cold_stats["open_replay"]["records"] / cold_seconds),
        "warm_open_seconds": round(warm_seconds, 3),
        "warm_vs_cold": round(warm_seconds / cold_seconds, 4),
        "warm_stats": warm_stats,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--keys", type=int, default=100_000)
    parser.add_argument("--bootstrap-servers", default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kvlog-bench-") as tmp:
        if args.bootstrap_servers:
            result = run(args.bootstrap_servers, args.keys, Path(tmp))
        else:
            from kvlog.devbroker import DevBroker

            with DevBroker(Path(tmp) / "broker") as broker:
                result = run(broker.bootstrap_servers, args.keys, Path(tmp))
    print(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
