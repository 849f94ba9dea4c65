"""kvlog's benchmarks: kvlog against its baselines and the tools users pick instead.

    python -m benchmarks [--keys 100000] [--runs 5] [--bootstrap-servers HOST:PORT]
                         [--only reads,replay,...] [--check] [--out benchmarks/results]

Starts a local single-node Kafka broker (KRaft) unless ``--bootstrap-servers``
is given, fills one compacted topic per value size, runs every workload, and
writes ``<out>/<timestamp>.json``, ``<timestamp>.md`` (the table) and PNG
charts. Every figure is the median of ``--runs`` samples (after a warm-up),
with min and max, and every comparison is a ratio to a baseline measured in
the same run on the same data.

Workloads (``--only`` takes these names):
  reads      point reads kv[k] vs raw py-lmdb, dict, diskcache, sqlitedict, Redis
  replay     cold replay vs a raw kafka-python consumer, a dict consumer, ktables
  restart    warm restart (0% and 1% new records) vs cold replay and ktables
  writes     single-write latency, batched throughput, cross-instance visibility
  footprint  resident memory of a reader process and bytes on disk
  embedded   the embedded log: writes and replay with each fsync policy

``--check`` exits 1 unless kvlog's point reads reach 0.7x raw py-lmdb in every
read case and its cold replay 0.8x the raw kafka-python consumer for every
value size. Otherwise the harness reports and does not judge.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks.harness import Context, Row, fill_ratios, machine_info

WORKLOADS = ("reads", "replay", "restart", "writes", "footprint", "embedded")
READ_GOAL = 0.7
REPLAY_GOAL = 0.8
RESULTS = Path(__file__).resolve().parent / "results"
README = Path(__file__).resolve().parent.parent / "README.md"


def _workload(name: str) -> Callable[[Context], list[Row]]:
    # Imported on use: a workload's optional packages are needed only when it runs.
    if name == "reads":
        from benchmarks import reads

        return reads.run
    if name == "replay":
        from benchmarks import replay

        return replay.run_cold
    if name == "restart":
        from benchmarks import replay

        return replay.run_restart
    if name == "writes":
        from benchmarks import writes

        return writes.run
    if name == "footprint":
        from benchmarks import footprint

        return footprint.run
    from benchmarks import embedded

    return embedded.run


def checks(rows: list[Row]) -> list[dict[str, Any]]:
    """The two goals of ``--check``, each judged on its worst case."""
    found = []
    for name, workload, baseline, goal in (
        ("point reads vs raw py-lmdb", "point reads", "raw py-lmdb", READ_GOAL),
        ("cold replay vs raw kafka-python consumer", "cold replay", "raw kafka-python consumer", REPLAY_GOAL),
    ):
        measured = [
            r for r in rows if r.workload == workload and r.subject == "kvlog" and r.baseline == baseline
        ]
        if not measured or any(r.ratio is None for r in measured):
            found.append(
                {"name": name, "goal": goal, "ratio": None, "passed": False, "detail": "not measured"}
            )
            continue
        worst = min(measured, key=lambda r: r.ratio or 0.0)
        found.append(
            {
                "name": name,
                "goal": goal,
                "ratio": round(worst.ratio or 0.0, 3),
                "passed": (worst.ratio or 0.0) >= goal,
                "detail": f"worst case: {worst.case} (cases: "
                + ", ".join(f"{r.case} {r.ratio:.2f}x" for r in measured)
                + ")",
            }
        )
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--keys", type=int, default=100_000, help="keys in the data set (default 100000)")
    parser.add_argument("--runs", type=int, default=5, help="samples per figure, after a warm-up (default 5)")
    parser.add_argument(
        "--reads", type=int, default=200_000, help="point reads per sample and subject (default 200000)"
    )
    parser.add_argument("--bootstrap-servers", help="a Kafka broker to use instead of starting one")
    parser.add_argument("--only", help=f"comma-separated workloads to run, of: {', '.join(WORKLOADS)}")
    parser.add_argument("--check", action="store_true", help="exit 1 if the two goals are missed")
    parser.add_argument(
        "--out", type=Path, default=RESULTS, help="results directory (default benchmarks/results)"
    )
    parser.add_argument("--workdir", type=Path, help="scratch directory (default: a temporary one)")
    parser.add_argument(
        "--readme",
        action="store_true",
        help="also rewrite the benchmark block of README.md with this run's table and chart",
    )
    parser.add_argument(
        "--no-install",
        action="store_true",
        help="never install a missing redis-server (by default, as root, it is installed with apt-get)",
    )
    args = parser.parse_args(argv)
    selected = WORKLOADS if not args.only else tuple(w.strip() for w in args.only.split(",") if w.strip())
    unknown = [w for w in selected if w not in WORKLOADS]
    if unknown:
        parser.error(f"unknown workload(s) {', '.join(unknown)}; choose from {', '.join(WORKLOADS)}")
    if args.keys < 1_000 or args.runs < 1 or args.reads < 1:
        parser.error("--keys must be at least 1000, --runs and --reads at least 1")
    if args.check and not {"reads", "replay"} <= set(selected):
        parser.error("--check needs the reads and replay workloads")

    started = datetime.now(UTC)
    clock = time.perf_counter()
    command = "python -m benchmarks " + shlex.join(sys.argv[1:] if argv is None else argv)
    rows: list[Row] = []
    with ExitStack() as stack:
        workdir = args.workdir or Path(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="kvlog-bench-"))
        )
        workdir.mkdir(parents=True, exist_ok=True)
        bootstrap = args.bootstrap_servers
        kafka_version = None
        if bootstrap is None and set(selected) - {"embedded"}:
            from devbroker import DEFAULT_KAFKA_VERSION, DevBroker

            print(f"starting a local Kafka {DEFAULT_KAFKA_VERSION} broker (KRaft, one node) ...", flush=True)
            broker = stack.enter_context(DevBroker(workdir / "broker"))
            bootstrap = broker.bootstrap_servers
            kafka_version = DEFAULT_KAFKA_VERSION
        ctx = Context(
            keys=args.keys,
            runs=args.runs,
            workdir=workdir,
            bootstrap_servers=bootstrap or "",
            reads=args.reads,
            install=not args.no_install,
        )
        machine = machine_info(kafka_version)
        print(
            f"kvlog benchmarks: {args.keys:,} keys, {args.runs} runs; {machine['cores']} cores, "
            f"{machine['python']}, {machine['cpu']}",
            flush=True,
        )
        for name in selected:
            print(f"[{name}]", flush=True)
            began = time.perf_counter()
            rows.extend(_workload(name)(ctx))
            print(f"[{name}] done in {time.perf_counter() - began:.0f} s", flush=True)

    fill_ratios(rows)
    found = checks(rows) if {"reads", "replay"} <= set(selected) else []
    results: dict[str, Any] = {
        "started": started.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "duration_seconds": round(time.perf_counter() - clock, 1),
        "command": command,
        "args": {"keys": args.keys, "runs": args.runs, "reads": args.reads, "workloads": list(selected)},
        "machine": machine,
        "rows": [row.to_json() for row in rows],
        "checks": found,
        "skipped": ctx.skipped,
        "notes": ctx.notes,
    }
    from benchmarks import report

    paths = report.write(results, args.out)
    if args.readme:
        report.update_readme(README, results, paths)
        paths["readme"] = README
    print()
    print(report.markdown(results))
    print("wrote " + ", ".join(str(p) for p in paths.values()), flush=True)
    if args.check:
        failed = [c for c in found if not c["passed"]]
        for c in found:
            verdict = "ok" if c["passed"] else "MISSED"
            print(f"check {verdict}: {c['name']}: {c['ratio']}x (goal {c['goal']}x); {c['detail']}")
        return 1 if failed else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
