"""One cold replay in a process of its own, for benchmarks/scale.py (which samples this process's memory).

    python -m benchmarks._scale_child '{"path": ..., "keys": N, "bootstrap_servers": ..., "topic": ...}'

Without ``bootstrap_servers`` the store is the embedded log of ``path``
(whose cache the parent deleted). Times ``KVLog(...)`` from the constructor
to its return and prints one JSON line: ``seconds``, ``entries`` (``len(kv)``)
and ``open_replay`` (its mode and the records it replayed). The clock starts
after the imports, as a replay in a running application would.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any


def main(argv: list[str]) -> int:
    spec: dict[str, Any] = json.loads(argv[0])
    from kvlog import KVLog

    started = time.perf_counter()
    if spec.get("bootstrap_servers"):
        kv = KVLog(
            spec["path"],
            bootstrap_servers=spec["bootstrap_servers"],
            topic=spec["topic"],
            create_topic=False,
            follow=False,
        )
    else:
        kv = KVLog(spec["path"])
    seconds = time.perf_counter() - started
    try:
        info = {k: v for k, v in dict(kv.open_replay).items() if isinstance(v, (int, float, str, type(None)))}
        entries = len(kv)
    finally:
        kv.close()
    print(json.dumps({"seconds": seconds, "entries": entries, "open_replay": info}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
