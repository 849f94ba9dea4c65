"""What every workload shares: the run context, samples and rows, the machine.

A workload is a function ``run(ctx: Context) -> list[Row]``. Each :class:`Row`
is one subject (kvlog, or what a user would pick instead) measured in one case
(say "uniform keys, 1 thread") several times. A row names the subject of the
same workload and case it is compared with (its ``baseline``), so every figure
is also a ratio to something measured in the same run on the same data.
Ratios are always "speed relative to the baseline": above 1 is faster, whether
the unit is a rate (higher is better) or a time (lower is better).

Where a workload takes its samples in rounds, one sample per subject a round,
each row says which round each sample came from (``Row.rounds``). A row and
its baseline are then *paired*: their ratio is the median of the per-round
ratios (``Row.ratios``), so a slow moment of the machine, which lands on both
samples of a round, cancels out instead of moving one subject's median. The
spread of those per-round ratios (:func:`spread`) says how far one round may
stray; the confidence interval of their median, how far the ratio itself may.
"""

from __future__ import annotations

import gc
import hashlib
import math
import os
import platform
import random
import statistics
import subprocess
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import msgpack

__all__ = [
    "Context",
    "Row",
    "Skipped",
    "gc_paused",
    "machine_info",
    "more_rounds",
    "ratio_precision",
    "repeat",
    "settle",
    "spread",
    "turns",
    "value_of_size",
    "zipf_indices",
]


@dataclass
class Context:
    """Everything a workload needs, fixed for the whole run."""

    keys: int
    runs: int
    workdir: Path
    bootstrap_servers: str
    reads: int  # point reads per run and subject (see benchmarks/reads.py)
    seed: int = 42
    #: Whether a workload may install a missing system package (redis-server
    #: with apt-get, as root). Tests turn it off.
    install: bool = True
    #: Free-form messages a workload wants printed and kept with the results.
    notes: list[str] = field(default_factory=list)
    #: Subjects that could not be measured, and why (never silently dropped).
    skipped: list[dict[str, str]] = field(default_factory=list)

    def key(self, i: int) -> str:
        """The ``i``-th key of the data set, the same for every subject."""
        return f"order:{i:09d}"

    def subdir(self, name: str) -> Path:
        """A fresh directory under the run's work directory."""
        path = self.workdir / name
        n = 1
        while path.exists():
            n += 1
            path = self.workdir / f"{name}-{n}"
        path.mkdir(parents=True)
        return path

    def skip(self, workload: str, subject: str, why: str) -> None:
        """Record that ``subject`` was not measured in ``workload``, and why."""
        self.skipped.append({"workload": workload, "subject": subject, "why": why})
        print(f"  skipped {subject} ({workload}): {why}", flush=True)


class Skipped(Exception):
    """Raised by a subject that cannot run here (a missing server or package)."""


@dataclass
class Row:
    """One subject measured ``len(samples)`` times in one case of one workload."""

    workload: str  # e.g. "point reads"
    case: str  # e.g. "uniform keys, 1 thread"
    subject: str  # e.g. "kvlog", "raw py-lmdb"
    unit: str  # e.g. "reads/s", "records/s", "s", "µs", "MB"
    samples: list[float]
    higher_is_better: bool
    baseline: str | None = None  # the subject of the same workload and case to compare with
    note: str = ""
    ratio: float | None = None  # filled in by :func:`fill_ratios`
    #: The round each sample was taken in (same length as ``samples``), where
    #: the workload takes its samples in rounds of one sample per subject.
    rounds: list[int] | None = None
    #: The per-round ratios to the baseline (filled in by :func:`fill_ratios`
    #: when this row and its baseline share rounds); ``ratio`` is their median.
    ratios: list[float] | None = None

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def min(self) -> float:
        return min(self.samples)

    @property
    def max(self) -> float:
        return max(self.samples)

    @property
    def ratio_spread(self) -> dict[str, Any] | None:
        """:func:`spread` of the per-round ratios, if the row is paired with its baseline."""
        return spread(self.ratios) if self.ratios else None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(median=self.median, min=self.min, max=self.max, ratio_spread=self.ratio_spread)
        return data


def _speed_ratio(value: float, base: float, higher_is_better: bool) -> float:
    return value / base if higher_is_better else base / value


def fill_ratios(rows: list[Row]) -> None:
    """Set each row's ratio to its baseline row's (same workload and case).

    When both rows say which round each sample came from, the ratio is the
    median of the per-round ratios (kept in ``ratios``); otherwise it is the
    ratio of the two medians. A ratio of speeds needs two positive figures: a
    row or baseline whose median is zero or negative (a latency measured from
    a point the event can precede, say) gets none, and a round with such a
    sample gives no per-round ratio.
    """
    index = {(r.workload, r.case, r.subject): r for r in rows}
    for row in rows:
        row.ratio, row.ratios = None, None
        if row.baseline is None:
            continue
        base = index.get((row.workload, row.case, row.baseline))
        if base is None or base.median <= 0 or row.median <= 0:
            continue
        paired = _paired(row, base)
        if paired:
            row.ratios = [_speed_ratio(v, b, row.higher_is_better) for v, b in paired]
            row.ratio = statistics.median(row.ratios)
        else:
            row.ratio = _speed_ratio(row.median, base.median, row.higher_is_better)


def _paired(row: Row, base: Row) -> list[tuple[float, float]]:
    """The (row, baseline) samples taken in the same round, both positive, in round order."""
    if row.rounds is None or base.rounds is None:
        return []
    by_round = dict(zip(base.rounds, base.samples, strict=True))
    return [
        (value, by_round[r])
        for r, value in sorted(zip(row.rounds, row.samples, strict=True))
        if r in by_round and value > 0 and by_round[r] > 0
    ]


def spread(values: Sequence[float]) -> dict[str, Any]:
    """How a set of samples (per-round ratios, say) spreads around its median.

    ``n``, ``median``, ``min``, ``max``, the quartiles ``q1`` and ``q3`` (by
    nearest rank: values that were measured) and ``ci95``, a distribution-free
    95% confidence interval of the median from order statistics (the ranks
    n/2 -+ 0.98 sqrt(n)); with 7 values or fewer it is the whole range.
    """
    ordered = sorted(values)
    n = len(ordered)
    if not n:
        raise ValueError("spread() of no values")
    half = 0.98 * math.sqrt(n)
    low = max(0, math.floor(n / 2 - half))
    high = min(n - 1, math.ceil(n / 2 + half) - 1)
    return {
        "n": n,
        "median": statistics.median(ordered),
        "min": ordered[0],
        "q1": percentile(ordered, 0.25),
        "q3": percentile(ordered, 0.75),
        "max": ordered[-1],
        "ci95": [ordered[low], ordered[high]],
    }


def ratio_precision(ratios: Sequence[float]) -> float:
    """Half the width of the 95% confidence interval of the ratios' median, relative to it.

    0.02 means the median is known to about +-2%; infinite for no ratios. A
    workload takes more rounds while this is above what it wants (see
    :func:`more_rounds`), within a budget.
    """
    if not ratios:
        return math.inf
    found = spread(ratios)
    low, high = found["ci95"]
    return (high - low) / 2 / found["median"] if found["median"] > 0 else math.inf


def more_rounds(ratios: Sequence[float], target: float, taken: int, budget: int) -> bool:
    """Whether to take more rounds: the median ratio is less precise than ``target`` and ``taken < budget``.

    On a quiet machine the planned rounds are enough; on a busy one the
    per-round ratios scatter more, and more of them keep the median (the
    figure ``--check`` judges) from moving with the machine's load.
    """
    return taken < budget and ratio_precision(ratios) > target


@contextmanager
def gc_paused() -> Iterator[None]:
    """Collect, then keep the garbage collector off until the block ends.

    A collection lands in whichever sample happens to allocate the object that
    crosses a threshold, and can take longer than the sample itself: a timed
    loop whose subjects make no reference cycles measures more steadily without
    it. Every subject of a comparison must be timed alike, inside or outside.
    """
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def settle() -> None:
    """Let what earlier samples left behind finish before the next one starts.

    Collects garbage (so a sample starts with the collector's counters at zero
    and does not pay for the previous subject's objects) and flushes dirty
    pages to disk (an earlier sample's files, written or deleted, are not
    written back, or discarded, inside the next one).
    """
    gc.collect()
    os.sync()


def turns(names: Sequence[str], round_: int) -> list[str]:
    """The order subjects take their samples in round ``round_``: as given, then reversed, and so on.

    A subject measured right after another inherits its leftovers (a warm or
    cold CPU cache, the other's garbage, a disk still writing back): reversing
    the order every round gives each subject every position equally often, so
    no subject always follows the same one, and in a pair each goes first in
    half the rounds.
    """
    return list(names) if round_ % 2 == 0 else list(reversed(names))


def repeat(runs: int, measure: Callable[[], float], *, warmup: int = 0) -> list[float]:
    """Call ``measure`` ``warmup`` times and discard, then ``runs`` times and keep.

    The garbage collector runs between samples, not inside them.
    """
    samples = []
    for i in range(warmup + runs):
        gc.collect()
        value = measure()
        if i >= warmup:
            samples.append(value)
    return samples


def percentile(values: list[float], q: float) -> float:
    """The ``q``-quantile (0 to 1) of ``values`` by nearest rank: a value that was measured, never interpolated."""
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1))
    return ordered[rank]


def value_of_size(i: int, size: int) -> dict[str, Any]:
    """An order-like value whose msgpack encoding is about ``size`` bytes."""
    value: dict[str, Any] = {
        "customer": f"customer:{i % 10_000:05d}",
        "status": "paid",
        "total": (i % 99_991) / 100,
        "items": i % 17,
        "note": "",
    }
    value["note"] = "n" * max(0, size - len(msgpack.packb(value)) - 2)
    return value


def zipf_indices(n: int, count: int, *, s: float = 1.1, seed: int = 42) -> list[int]:
    """``count`` indices in ``range(n)`` drawn from a Zipf distribution (exponent ``s``).

    Rank 1 is the hottest key; ranks are scattered over the key space so hot
    keys are not neighbours in the B-tree.
    """
    rng = random.Random(seed)
    weights = [1.0 / (rank**s) for rank in range(1, n + 1)]
    cum: list[float] = []
    total = 0.0
    for w in weights:
        total += w
        cum.append(total)
    permutation = list(range(n))
    rng.shuffle(permutation)
    import bisect

    return [permutation[bisect.bisect_left(cum, rng.random() * total)] for _ in range(count)]


def uniform_indices(n: int, count: int, *, seed: int = 42) -> list[int]:
    """``count`` indices drawn uniformly from ``range(n)``."""
    rng = random.Random(seed)
    return [rng.randrange(n) for _ in range(count)]


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def source_info() -> dict[str, Any]:
    """Which kvlog was measured: the SHA-256 of its package's source files, and its checkout's commit.

    Runs are comparable only on the same code; a working tree edited between
    runs keeps its commit, so the files themselves are hashed.
    """
    import kvlog

    root = Path(kvlog.__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    info: dict[str, Any] = {"path": str(root), "sha256": digest.hexdigest()[:16]}
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--", "."],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return info
    info.update(commit=commit, modified=bool(dirty))
    return info


class LoadMeter:
    """How busy the machine was over a stretch of time: load average and CPU time used by anything.

    ``busy`` is the share of all cores' time that was not idle (from
    ``/proc/stat``), whoever used it: the harness, its broker and any other
    work of the machine. Comparing runs made under different load is comparing
    different machines; this says which runs are alike.
    """

    def __init__(self) -> None:
        self.loadavg = _loadavg()
        self._cpu = _cpu_times()

    def read(self) -> dict[str, Any]:
        """Load averages (1 min) at the start and now, and the busy share in between."""
        now = _cpu_times()
        result: dict[str, Any] = {"loadavg": [self.loadavg, _loadavg()], "busy": None}
        if self._cpu is not None and now is not None:
            total = now[0] - self._cpu[0]
            if total > 0:
                result["busy"] = round(1 - (now[1] - self._cpu[1]) / total, 3)
        return result


def _loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _cpu_times() -> tuple[int, int] | None:
    """All cores' jiffies: (total, idle + iowait), or None where /proc/stat is missing."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(x) for x in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return sum(fields[:8]), fields[3] + fields[4]


def machine_info(kafka_version: str | None = None) -> dict[str, Any]:
    """Cores, memory, CPU, OS, Python, the versions of every package measured, and kvlog's source."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = None
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        pass
    packages = [
        "kvlog",
        "kafka-python",
        "lmdb",
        "msgpack",
        "diskcache",
        "sqlitedict",
        "redis",
        "ktables",
        "aiokafka",
        "matplotlib",
    ]
    return {
        "cores": os.cpu_count(),
        "memory_bytes": memory,
        "cpu": cpu,
        "os": f"{platform.system()} {platform.release()}",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "kafka_broker": kafka_version,
        "packages": {name: _version(name) for name in packages},
        "kvlog_source": source_info(),
    }
