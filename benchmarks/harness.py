"""What every workload shares: the run context, samples and rows, the machine.

A workload is a function ``run(ctx: Context) -> list[Row]``. Each :class:`Row`
is one subject (kvlog, or what a user would pick instead) measured in one case
(say "uniform keys, 1 thread") ``ctx.runs`` times. A row names the subject of
the same workload and case it is compared with (its ``baseline``), so every
figure is also a ratio to something measured in the same run on the same data.
Ratios are always "speed relative to the baseline": above 1 is faster, whether
the unit is a rate (higher is better) or a time (lower is better).
"""

from __future__ import annotations

import gc
import math
import os
import platform
import random
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import msgpack

__all__ = ["Context", "Row", "Skipped", "machine_info", "repeat", "value_of_size", "zipf_indices"]


@dataclass
class Context:
    """Everything a workload needs, fixed for the whole run."""

    keys: int
    runs: int
    workdir: Path
    bootstrap_servers: str
    reads: int  # point reads per sample and subject
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

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def min(self) -> float:
        return min(self.samples)

    @property
    def max(self) -> float:
        return max(self.samples)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(median=self.median, min=self.min, max=self.max)
        return data


def fill_ratios(rows: list[Row]) -> None:
    """Set each row's ratio to its baseline row's (same workload and case).

    A ratio of speeds needs two positive figures: a row or baseline whose
    median is zero or negative (a latency measured from a point the event can
    precede, say) gets none.
    """
    index = {(r.workload, r.case, r.subject): r for r in rows}
    for row in rows:
        if row.baseline is None:
            continue
        base = index.get((row.workload, row.case, row.baseline))
        if base is None or base.median <= 0 or row.median <= 0:
            continue
        row.ratio = row.median / base.median if row.higher_is_better else base.median / row.median


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


def machine_info(kafka_version: str | None = None) -> dict[str, Any]:
    """Cores, memory, CPU, OS, Python and the versions of every package measured."""
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
    }
