"""kvlog's benchmarks: kvlog against its baselines and the tools users pick instead.

    python -m benchmarks [--keys 100000] [--runs 5] [--bootstrap-servers HOST:PORT]
                         [--only reads,replay,...] [--check] [--out benchmarks/results]

Starts a local single-node Kafka broker (KRaft) unless ``--bootstrap-servers``
is given or only workloads of the embedded log run (``embedded``,
``processes``), fills one compacted topic per value size, runs every
workload, and writes ``<out>/<timestamp>.json``, ``<timestamp>.md`` (the
table) and PNG charts. Every figure is the median of ``--runs`` samples
(after a warm-up), with min and max, and every comparison is a ratio to a
baseline measured in the same run on the same data.

Workloads (``--only`` takes these names):
  reads      point reads kv[k] vs raw py-lmdb, dict, diskcache, sqlitedict, Redis
  replay     cold replay vs a raw kafka-python consumer, a dict consumer, ktables
  restart    warm restart (0% and 1% new records) vs cold replay and ktables
  writes     single-write latency, batched throughput, cross-instance visibility
  footprint  resident memory of a reader process and bytes on disk
  embedded   the embedded log: writes and replay with each fsync policy
  processes  one embedded-log data directory shared by several processes:
             single-write p50 (fsync=never / always) vs the raw floor of the
             same work (pwrite of a frame + a py-lmdb commit) and vs SQLite WAL
             and diskcache; cross-process visibility (A's write returns, B
             spinning on kv.get sees it) vs raw py-lmdb; a 90% read / 10% write
             zipfian mixed load in 1, 2 and 4 processes vs SQLite WAL
             (synchronous=FULL and NORMAL) and diskcache; read-only point reads
             vs SQLite WAL's point SELECT (see benchmarks/processes.py)

``--check`` exits 1 if a goal of the workloads that ran is missed. With the
reads and replay workloads (both, always together): kvlog's point reads reach
0.7x raw py-lmdb in every read case and its cold replay 0.8x the raw
kafka-python consumer for every value size. With the processes workload: a
single write's p50 is at most 2.0x its raw floor's with fsync="never" and at
most 1.2x with fsync="always", and at most SQLite WAL synchronous=FULL's with
fsync="always"; the cross-process visibility p50 is at most 50 µs (worst
fsync policy); kvlog's read-only point reads reach 3x SQLite WAL's point
SELECT. ``--check`` needs the reads and replay workloads, or processes, or
all three. The goals' verdicts are in the report whether or not ``--check``
is given; only ``--check`` turns a miss into the exit status.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks.harness import Context, Row, fill_ratios, machine_info

WORKLOADS = ("reads", "replay", "restart", "writes", "footprint", "embedded", "processes")
#: Workloads with goals: the reads and replay goals are judged together, processes' on their own.
PAIRED_CHECKS = ("reads", "replay")
#: Workloads that need no Kafka broker.
EMBEDDED_ONLY = frozenset({"embedded", "processes"})
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
    if name == "processes":
        from benchmarks import processes

        return processes.run
    from benchmarks import embedded

    return embedded.run


def checks(rows: list[Row], workloads: Sequence[str] = PAIRED_CHECKS) -> list[dict[str, Any]]:
    """The goals of ``--check`` for the workloads named, each judged on its worst case.

    ``reads`` and ``replay`` bring the two goals they share (both are listed
    when either is named); ``processes`` brings its own (:data:`benchmarks.processes.GOALS`).
    """
    found = []
    if set(PAIRED_CHECKS) & set(workloads):
        for name, workload, baseline, goal in (
            ("point reads vs raw py-lmdb", "point reads", "raw py-lmdb", READ_GOAL),
            (
                "cold replay vs raw kafka-python consumer",
                "cold replay",
                "raw kafka-python consumer",
                REPLAY_GOAL,
            ),
        ):
            measured = [
                r for r in rows if r.workload == workload and r.subject == "kvlog" and r.baseline == baseline
            ]
            found.append(_ratio_check(name, goal, measured))
    if "processes" in workloads:
        found.extend(_processes_checks(rows))
    return found


def _ratio_check(name: str, goal: float, measured: list[Row]) -> dict[str, Any]:
    """Whether every row's ratio reaches ``goal``; judged on the worst."""
    if not measured or any(r.ratio is None for r in measured):
        return {"name": name, "goal": goal, "ratio": None, "passed": False, "detail": "not measured"}
    worst = min(measured, key=lambda r: r.ratio or 0.0)
    return {
        "name": name,
        "goal": goal,
        "ratio": round(worst.ratio or 0.0, 3),
        "passed": (worst.ratio or 0.0) >= goal,
        "detail": f"worst case: {worst.case} (cases: "
        + ", ".join(f"{r.case} {r.ratio:.2f}x" for r in measured)
        + ")",
    }


def _processes_checks(rows: list[Row]) -> list[dict[str, Any]]:
    """The processes workload's goals. Each check also names the rows it judges (``rows``)."""
    from benchmarks.processes import GOALS

    found = []
    for goal in GOALS:
        measured = [
            r
            for r in rows
            if r.workload == goal.workload and r.case in goal.cases and r.subject == goal.subject
        ]
        judged = [[r.workload, r.case, r.subject] for r in measured]
        name = f"processes: {goal.name}"
        if not goal.unit:
            check = _ratio_check(name, round(goal.goal, 3), measured)
            if check["ratio"] is not None:
                worst = min(measured, key=lambda r: r.ratio or 0.0)
                base = f"{worst.baseline} {fmt_figure(_baseline_median(rows, worst))} {worst.unit}"
                check["detail"] = (
                    f"{goal.explain}: {worst.subject} {fmt_figure(worst.median)} {worst.unit} vs {base}"
                )
            check["rows"] = judged
            found.append(check)
            continue
        if not measured:
            found.append(
                {
                    "name": name,
                    "goal": goal.goal,
                    "unit": goal.unit,
                    "measured": None,
                    "ratio": None,
                    "passed": False,
                    "detail": "not measured",
                    "rows": judged,
                }
            )
            continue
        worst = max(measured, key=lambda r: r.median)
        found.append(
            {
                "name": name,
                "goal": goal.goal,
                "unit": goal.unit,
                "measured": round(worst.median, 3),
                "ratio": None,
                "passed": worst.median <= goal.goal,
                "detail": f"{goal.explain}; worst case: {worst.case} (cases: "
                + ", ".join(f"{r.case} {fmt_figure(r.median)} {r.unit}" for r in measured)
                + ")",
                "rows": judged,
            }
        )
    return found


def _baseline_median(rows: list[Row], row: Row) -> float | None:
    for other in rows:
        if (other.workload, other.case, other.subject) == (row.workload, row.case, row.baseline):
            return other.median
    return None


def fmt_figure(value: float | None) -> str:
    if value is None:
        return "?"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


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
    parser.add_argument(
        "--check", action="store_true", help="exit 1 if a goal of the workloads run is missed"
    )
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
    paired = set(PAIRED_CHECKS) & set(selected)
    if args.check and paired and paired != set(PAIRED_CHECKS):
        parser.error("--check judges the reads and replay goals together: run both workloads or neither")
    if args.check and not paired and "processes" not in selected:
        parser.error("--check needs the reads and replay workloads, or the processes workload")

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
        if bootstrap is None and set(selected) - EMBEDDED_ONLY:
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
    # Goals are judged whenever their workloads ran (the reads and replay goals only together).
    judged = [w for w in selected if w == "processes"]
    if set(PAIRED_CHECKS) <= set(selected):
        judged[:0] = PAIRED_CHECKS
    found = checks(rows, judged) if judged else []
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
            if c.get("unit"):
                figure = f"{c['measured']} {c['unit']} (goal at most {c['goal']} {c['unit']})"
            else:
                figure = f"{c['ratio']}x (goal {c['goal']}x)"
            print(f"check {verdict}: {c['name']}: {figure}; {c['detail']}")
        return 1 if failed else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
