"""kvlog's benchmarks: kvlog against its baselines and the tools users pick instead.

    python -m benchmarks [--keys 100000] [--runs 5] [--bootstrap-servers HOST:PORT]
                         [--only reads,replay,...] [--check] [--out benchmarks/results]

Starts a local single-node Kafka broker (KRaft) unless ``--bootstrap-servers``
is given or only workloads of the embedded log run (``embedded``,
``processes``), fills one compacted topic per value size, runs every
workload, and writes ``<out>/<timestamp>.json``, ``<timestamp>.md`` (the
table) and PNG charts. Every figure is the median of its samples (``--runs``
of them after a warm-up; point reads take ``--runs`` x 20 short ones and the
pairs that ``--check`` judges in cold replay 3 x ``--runs``, and both take up
to 4x and 2x as many while the median ratio is imprecise), with min and max,
and every comparison is a ratio to a baseline measured in the same run on the
same data: where subjects take turns round by round, the median of the
per-round ratios. Each check reports how those ratios spread (quartiles,
min-max and a 95% confidence interval of their median), and the results
record how busy the machine was during each workload and a hash of the kvlog
source measured: compare runs made on the same code under similar load. Where
permitted the harness, its broker and its child processes run at niceness
-10 (``--nice``), ahead of whatever else the machine runs.

Workloads (``--only`` takes these names):
  reads      point reads kv[k] vs raw py-lmdb, dict, diskcache, sqlitedict, Redis
  replay     cold replay vs a raw kafka-python consumer, a dict consumer, ktables;
             then at scale: the run's keys vs 100,000 keys, the replaying
             process's peak RssAnon, the physical floor (benchmarks/scale.py)
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
  http       GET/s and p50/p99 through kvlog serve on loopback vs a bare
             Starlette route on the same uvicorn setup (the HTTP floor) and
             Redis GET; long-poll notification latency from another process's
             write (see benchmarks/http.py)

``--check`` exits 1 if a goal of the workloads that ran is missed. With the
reads and replay workloads (both, always together): kvlog's point reads reach
0.7x raw py-lmdb in every read case and its cold replay 1.2x the raw
kafka-python consumer and 1.2x ktables for every value size. With the processes workload: a
single write's p50 is at most 2.0x its raw floor's with fsync="never" and at
most 1.2x with fsync="always", and at most SQLite WAL synchronous=FULL's with
fsync="always"; the cross-process visibility p50 is at most 50 µs (worst
fsync policy); kvlog's read-only point reads reach 3x SQLite WAL's point
SELECT. With the embedded workload: kvlog's cold replay reaches 0.5x its floor
(reading the log files and loading the same records into LMDB by hand), and
update() with fsync="always" 0.6x writing the same records by hand with one
fdatasync per batch. With the writes workload (Kafka): a single write's p50
is at most 1.5x the raw producer's and its p99 at most 2x, a write is
visible in another instance at most as late as ktables' (p50), and update()
reaches 0.9x the raw producer. With the http workload: GET/s through
``kvlog serve`` at least 0.8x the HTTP floor's, and a long-poll's
notification p50 at most 2 ms. With the replay workload (alone too): its
cold replay of the run's keys reaches 0.85x the same run's replay of
100,000 keys, from Kafka and from the embedded log, and the replaying
process's RssAnon stays under 250 MB; with the restart workload: a warm
restart takes at most 0.5 s. ``--check`` needs the reads and replay
workloads, replay or restart, or processes, embedded, writes or http, or
any of them together. The goals' verdicts are in
the report whether or not ``--check`` is given; only ``--check`` turns a miss
into the exit status.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from benchmarks.harness import Context, LoadMeter, Row, fill_ratios, machine_info, spread

if TYPE_CHECKING:
    from benchmarks.processes import Goal

WORKLOADS = ("reads", "replay", "restart", "writes", "footprint", "embedded", "processes", "http")
#: Workloads with goals: the reads and replay goals are judged together, processes' and embedded's on their own.
PAIRED_CHECKS = ("reads", "replay")
#: Workloads whose module declares its own ``GOALS`` (see :func:`_goal_checks`), with the prefix of their names.
OWN_GOALS = {"processes": "processes", "embedded": "embedded log", "writes": "kafka writes", "http": "http"}
_EMBEDDED_PREFIX = OWN_GOALS["embedded"]
#: Workloads whose scale goals (benchmarks/scale.py) are judged whenever they ran, on their own.
SCALE_CHECKS = ("replay", "restart")
#: Workloads that need no Kafka broker.
EMBEDDED_ONLY = frozenset({"embedded", "processes", "http"})
#: The default of ``--nice``: on a machine that does other work, the measured
#: processes then run first whenever they are runnable (see _raise_priority).
DEFAULT_NICE = -10
READ_GOAL = 0.7
#: Cold replay from Kafka against the raw kafka-python consumer and against ktables, each value size.
REPLAY_GOAL = 1.2
KTABLES_REPLAY_GOAL = 1.2
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
    if name == "http":
        from benchmarks import http

        return http.run
    from benchmarks import embedded

    return embedded.run


#: Workloads of the processes module whose subjects take turns round by round
#: (one sample per subject a round, every subject in every round; see
#: benchmarks/processes.py), so that sample ``i`` of every row of a case comes
#: from the same round. That module does not say so in its rows
#: (``Row.rounds``); :func:`assume_rounds` does, for these workloads only.
ROUND_ROBIN_WORKLOADS = (
    "processes: single write",
    "processes: mixed load",
    "processes: read-only point reads",
)


def assume_rounds(rows: list[Row], workloads: Sequence[str] = ROUND_ROBIN_WORKLOADS) -> None:
    """Number the samples of rows without rounds, in ``workloads`` taken in rounds, by their position.

    Only where every row of the case has the same number of samples: a row
    missing a round would pair the wrong samples, so such a case stays unpaired.
    """
    cases: dict[tuple[str, str], list[Row]] = {}
    for row in rows:
        if row.workload in workloads:
            cases.setdefault((row.workload, row.case), []).append(row)
    for case_rows in cases.values():
        if len({len(r.samples) for r in case_rows}) != 1:
            continue
        for row in case_rows:
            if row.rounds is None:
                row.rounds = list(range(1, len(row.samples) + 1))


def checks(rows: list[Row], workloads: Sequence[str] = PAIRED_CHECKS) -> list[dict[str, Any]]:
    """The goals of ``--check`` for the workloads named, each judged on its worst case.

    ``reads`` and ``replay`` bring the two goals they share (both are listed
    when either is named); ``processes`` and ``embedded`` bring their own
    (:data:`benchmarks.processes.GOALS`, :data:`benchmarks.embedded.GOALS`).
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
        found.append(
            _ratio_check(
                "cold replay vs ktables",
                KTABLES_REPLAY_GOAL,
                _versus(rows, "cold replay", "kvlog", "ktables"),
            )
        )
    if "processes" in workloads:
        found.extend(_processes_checks(rows))
    if "embedded" in workloads:
        from benchmarks.embedded import GOALS

        found.extend(_goal_checks(rows, GOALS, _EMBEDDED_PREFIX))
    if "writes" in workloads:
        from benchmarks.writes import GOALS as WRITES_GOALS

        found.extend(_goal_checks(rows, WRITES_GOALS, OWN_GOALS["writes"]))
    if "http" in workloads:
        from benchmarks.http import GOALS as HTTP_GOALS

        found.extend(_goal_checks(rows, HTTP_GOALS, OWN_GOALS["http"]))
    return found


def _versus(rows: list[Row], workload: str, subject: str, baseline: str) -> list[Row]:
    """Copies of ``subject``'s rows of ``workload`` with ``baseline`` as their baseline, and their ratios to it.

    For a second comparison of the same samples (kvlog's cold replay is
    paired with the raw consumer; ktables takes part in fewer rounds): the
    ratio is the median of the per-round ratios over the rounds both took
    part in.
    """
    compared = []
    for row in rows:
        if row.workload != workload or row.subject != subject:
            continue
        base = next(
            (b for b in rows if b.workload == workload and b.case == row.case and b.subject == baseline), None
        )
        if base is None:
            continue
        pair = [replace(row, baseline=baseline), replace(base, baseline=None)]
        fill_ratios(pair)
        compared.append(pair[0])
    return compared


def _ratio_check(name: str, goal: float, measured: list[Row]) -> dict[str, Any]:
    """Whether every row's ratio reaches ``goal``; judged on the worst.

    ``spread`` is the worst case's :func:`benchmarks.harness.spread` of its
    per-round ratios (``None`` when its samples are not paired with the
    baseline's); ``cases`` has every case's ratio and spread.
    """
    if not measured or any(r.ratio is None for r in measured):
        return {
            "name": name,
            "goal": goal,
            "ratio": None,
            "spread": None,
            "passed": False,
            "detail": "not measured",
        }
    worst = min(measured, key=lambda r: r.ratio or 0.0)
    return {
        "name": name,
        "goal": goal,
        "ratio": round(worst.ratio or 0.0, 3),
        "spread": _rounded(worst.ratio_spread),
        "passed": (worst.ratio or 0.0) >= goal,
        "detail": f"worst case: {worst.case} (cases: "
        + ", ".join(f"{r.case} {r.ratio:.2f}x{_iqr_note(r)}" for r in measured)
        + ")",
        "cases": [
            {"case": r.case, "ratio": round(r.ratio or 0.0, 3), "spread": _rounded(r.ratio_spread)}
            for r in measured
        ],
    }


def _rounded(spread: dict[str, Any] | None) -> dict[str, Any] | None:
    if spread is None:
        return None
    return {k: [round(x, 3) for x in v] if isinstance(v, list) else round(v, 3) for k, v in spread.items()}


def _iqr_note(row: Row) -> str:
    spread = row.ratio_spread
    return f" [IQR {spread['q1']:.2f}-{spread['q3']:.2f}]" if spread else ""


def spread_text(spread: dict[str, Any] | None, unit: str = "x", what: str = "per-round ratios") -> str:
    """A check's spread in words: ``per-round ratios: IQR 0.750-0.800x, min-max ..., n=100; 95% CI ...``."""
    if not spread:
        return "unpaired samples: no per-round ratios"
    return (
        f"{what}: IQR {spread['q1']:.3f}-{spread['q3']:.3f}{unit}, "
        f"min-max {spread['min']:.3f}-{spread['max']:.3f}{unit}, n={spread['n']}; "
        f"95% CI of the median {spread['ci95'][0]:.3f}-{spread['ci95'][1]:.3f}{unit}"
    )


def _processes_checks(rows: list[Row]) -> list[dict[str, Any]]:
    """The processes workload's goals. Each check also names the rows it judges (``rows``)."""
    from benchmarks.processes import GOALS

    return _goal_checks(rows, GOALS, OWN_GOALS["processes"])


def _goal_checks(rows: list[Row], goals: Sequence[Goal], prefix: str) -> list[dict[str, Any]]:
    """The checks of a workload module's ``GOALS``, named ``"<prefix>: <goal>"``, each naming its ``rows``."""
    found = []
    for goal in goals:
        measured = [
            r
            for r in rows
            if r.workload == goal.workload and r.case in goal.cases and r.subject == goal.subject
        ]
        judged = [[r.workload, r.case, r.subject] for r in measured]
        name = f"{prefix}: {goal.name}"
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
                    "spread": None,
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
                # An absolute figure: the spread of the worst case's own samples.
                "spread": _rounded(spread(worst.samples)),
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


def _raise_priority(increment: int) -> int:
    """Change this process's niceness by ``increment``; return the niceness it runs at.

    A sample that shares a core with another program is slower by however
    much that program ran meanwhile, which has nothing to do with the subject
    measured and lands on some samples only. Run ahead of the machine's other
    work (a negative increment needs root or CAP_SYS_NICE), kvlog and its
    baselines alike get the cores whenever they want them. Children started
    afterwards (the broker, worker processes) inherit the niceness. Where it
    is not permitted the run goes on at the priority it has, and says so.
    """
    if increment:
        try:
            os.nice(increment)
        except OSError as exc:
            print(
                f"running at the priority inherited: --nice {increment} is not permitted ({exc})", flush=True
            )
    niceness = os.getpriority(os.PRIO_PROCESS, 0)
    if niceness:
        print(
            f"running at niceness {niceness} (--nice; the broker and child processes inherit it)", flush=True
        )
    return niceness


def _note_leftovers(ctx: Context, workload: str, threads: set[int], broker_pid: int | None) -> None:
    """Note threads and child processes a workload left running: they would compete with the next one.

    ``threads`` are the idents of the threads that ran before the first
    workload; the broker the harness started and multiprocessing's resource
    tracker (idle, it lives as long as this process) are expected.
    """
    extra_threads = [t.name for t in threading.enumerate() if t.ident not in threads]
    children = [f"{pid} ({name})" for pid, name in _child_processes() if pid != broker_pid]
    if extra_threads or children:
        what = []
        if extra_threads:
            what.append(f"{len(extra_threads)} thread(s) ({', '.join(extra_threads)})")
        if children:
            what.append(f"child process(es) {', '.join(children)}")
        message = f"after {workload}, still running: {'; '.join(what)}"
        ctx.notes.append(message)
        print(f"  {message}", flush=True)


def _child_processes() -> list[tuple[int, str]]:
    """This process's children (Linux: from /proc) but multiprocessing's resource tracker, as (pid, name)."""
    me = os.getpid()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        if ppid == me and b"multiprocessing.resource_tracker" not in cmdline:
            found.append((int(entry.name), name))
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--keys", type=int, default=100_000, help="keys in the data set (default 100000)")
    parser.add_argument(
        "--runs",
        type=int,
        default=5,
        help="samples per figure, after a warm-up (default 5; point reads take 20 short samples a run, "
        "the pair a cold-replay check judges 3 a run)",
    )
    parser.add_argument(
        "--reads",
        type=int,
        default=200_000,
        help="point reads per run and subject, in 20 samples (default 200000)",
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
    parser.add_argument(
        "--nice",
        type=int,
        default=DEFAULT_NICE,
        help=f"scheduling priority increment for the harness, its broker and its child processes "
        f"(default {DEFAULT_NICE}: ahead of other work of the machine, where permitted; 0 leaves it)",
    )
    args = parser.parse_args(argv)
    selected = WORKLOADS if not args.only else tuple(w.strip() for w in args.only.split(",") if w.strip())
    unknown = [w for w in selected if w not in WORKLOADS]
    if unknown:
        parser.error(f"unknown workload(s) {', '.join(unknown)}; choose from {', '.join(WORKLOADS)}")
    if args.keys < 1_000 or args.runs < 1 or args.reads < 1:
        parser.error("--keys must be at least 1000, --runs and --reads at least 1")
    paired = set(PAIRED_CHECKS) & set(selected)
    scaled = set(SCALE_CHECKS) & set(selected)
    if args.check and paired and paired != set(PAIRED_CHECKS) and not scaled:
        parser.error("--check judges the reads and replay goals together: run both workloads or neither")
    if args.check and not paired and not scaled and not set(OWN_GOALS) & set(selected):
        parser.error(
            "--check needs the reads and replay workloads, replay or restart (scale goals), "
            "or the processes, embedded, writes or http workload"
        )

    # Before anything starts: the broker, the workers and the children inherit it.
    niceness = _raise_priority(args.nice)
    started = datetime.now(UTC)
    clock = time.perf_counter()
    command = "python -m benchmarks " + shlex.join(sys.argv[1:] if argv is None else argv)
    rows: list[Row] = []
    load: dict[str, dict[str, Any]] = {}
    broker_pid: int | None = None
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
            broker_pid = broker.pid
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
        baseline_threads = {t.ident for t in threading.enumerate() if t.ident is not None}
        for name in selected:
            print(f"[{name}]", flush=True)
            began = time.perf_counter()
            meter = LoadMeter()
            rows.extend(_workload(name)(ctx))
            load[name] = meter.read()
            busy = load[name]["busy"]
            print(
                f"[{name}] done in {time.perf_counter() - began:.0f} s"
                + (f"; the machine's cores were {busy:.0%} busy" if busy is not None else ""),
                flush=True,
            )
            _note_leftovers(ctx, name, baseline_threads, broker_pid)

    assume_rounds(rows)
    fill_ratios(rows)
    # Goals are judged whenever their workloads ran (the reads and replay goals only together).
    judged = [w for w in selected if w in OWN_GOALS]
    if set(PAIRED_CHECKS) <= set(selected):
        judged[:0] = PAIRED_CHECKS
    found = checks(rows, judged) if judged else []
    if scaled:
        from benchmarks import scale

        found.extend(scale.checks(rows, scaled))
    results: dict[str, Any] = {
        "started": started.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "duration_seconds": round(time.perf_counter() - clock, 1),
        "command": command,
        "args": {
            "keys": args.keys,
            "runs": args.runs,
            "reads": args.reads,
            "workloads": list(selected),
            "nice": niceness,
        },
        "machine": machine,
        "rows": [row.to_json() for row in rows],
        "checks": found,
        "skipped": ctx.skipped,
        "notes": ctx.notes,
        "load": load,
    }
    from benchmarks import report

    paths = report.write(results, args.out)
    if args.readme:
        report.update_readme(README, results, paths)
        from benchmarks import scale

        scale.update_readme(README, args.out)  # every size's latest run, this one included
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
                spread_words = spread_text(c.get("spread"), f" {c['unit']}", "samples")
            else:
                figure = f"{c['ratio']}x (goal {c['goal']}x)"
                spread_words = spread_text(c.get("spread"))
            print(f"check {verdict}: {c['name']}: {figure}; {spread_words}; {c['detail']}")
        return 1 if failed else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
