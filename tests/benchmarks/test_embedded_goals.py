"""The embedded workload's goals: judged by ``--check`` on their own rows, from a run that pairs its samples.

No figure is asserted (the goals live in the benchmarks): what is asserted is
that each goal fails exactly when its ratio misses it, that ``--check
--only embedded`` is a valid run, and that the run takes its batched-write and
cold-replay samples in rounds, so that each ratio is a median of per-round
ratios with a spread.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from benchmarks import embedded as e
from benchmarks.__main__ import checks
from benchmarks.harness import Row, fill_ratios

ROOT = Path(__file__).resolve().parents[2]

EMBEDDED_CHECKS = [
    "embedded log: cold replay vs raw read + py-lmdb load",
    "embedded log: batched writes fsync=always vs raw append+fdatasync per batch",
]


def _rows(replay: float = 55.0, writes: float = 65.0) -> list[Row]:
    """The embedded workload's rows as it makes them, kvlog at ``replay``% and ``writes``% of its floors."""
    rounds = [1, 2, 3]
    rows = [
        Row(e.WORKLOAD, e.CASE_REPLAY, e.RAW_READ, "records/s", [1000.0] * 3, True, rounds=rounds),
        Row(e.WORKLOAD, e.CASE_REPLAY, e.RAW_LOAD, "records/s", [100.0, 50.0, 100.0], True, rounds=rounds),
        Row(
            e.WORKLOAD,
            e.CASE_REPLAY,
            e.KVLOG,
            "records/s",
            [replay, replay / 2, replay],  # the slow round 2 was slow for the floor too
            True,
            baseline=e.RAW_LOAD,
            rounds=rounds,
        ),
        Row(e.WORKLOAD, e.CASE_BATCHED, e.RAW_SYNC_BATCH, "records/s", [100.0] * 3, True, rounds=rounds),
        Row(e.WORKLOAD, e.CASE_BATCHED, e.RAW_NOSYNC, "records/s", [300.0] * 3, True, rounds=rounds),
    ]
    for policy, value in (("always", writes), ("interval", 10.0), ("never", 10.0)):
        baseline = e.RAW_SYNC_BATCH if policy == "always" else e.RAW_NOSYNC
        rows.append(
            Row(
                e.WORKLOAD,
                e.CASE_BATCHED,
                f"fsync={policy}",
                "records/s",
                [value] * 3,
                True,
                baseline,
                rounds=rounds,
            )
        )
    fill_ratios(rows)
    return rows


def test_each_embedded_goal_is_judged_on_its_row_and_fails_on_its_own() -> None:
    verdict = checks(_rows(), ["embedded"])
    assert [c["name"] for c in verdict] == EMBEDDED_CHECKS
    assert all(c["passed"] for c in verdict), verdict
    replay, writes = verdict
    assert (replay["goal"], replay["ratio"]) == (0.5, 0.55)
    assert replay["rows"] == [[e.WORKLOAD, e.CASE_REPLAY, e.KVLOG]]
    assert replay["spread"]["n"] == 3  # paired round by round
    assert (writes["goal"], writes["ratio"]) == (0.6, 0.65)
    assert writes["rows"] == [[e.WORKLOAD, e.CASE_BATCHED, "fsync=always"]]
    for rows, failed in ((_rows(replay=49.0), EMBEDDED_CHECKS[0]), (_rows(writes=59.0), EMBEDDED_CHECKS[1])):
        assert [c["name"] for c in checks(rows, ["embedded"]) if not c["passed"]] == [failed]
    missing = checks([r for r in _rows() if r.case != e.CASE_REPLAY], ["embedded"])
    assert missing[0]["passed"] is False and missing[0]["detail"] == "not measured"
    # The other workloads' goals come only when those workloads are judged.
    assert [c["name"] for c in checks(_rows(), ["processes", "embedded"])][-2:] == EMBEDDED_CHECKS
    assert "embedded log" not in " ".join(c["name"] for c in checks(_rows(), ["processes"]))


def test_a_quick_checked_run_of_the_embedded_workload_pairs_its_samples(tmp_path: Path) -> None:
    """``--check --only embedded`` with tiny sizes: the two checks, on rows paired round by round; no broker."""
    out = tmp_path / "results"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks",
            "--only",
            "embedded",
            "--keys",
            "2000",
            "--runs",
            "2",
            "--check",
            "--no-install",
            "--out",
            str(out),
            "--workdir",
            str(tmp_path / "work"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    # Exit status 1 is a missed goal: figures are not judged here, only the shape of the results.
    assert proc.returncode in (0, 1), proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "starting a local Kafka" not in proc.stdout
    (result_file,) = out.glob("*.json")
    results = json.loads(result_file.read_text())
    assert [c["name"] for c in results["checks"]] == EMBEDDED_CHECKS
    assert all(c["ratio"] is not None and c["spread"]["n"] == 2 for c in results["checks"])
    rows = {(r["case"], r["subject"]): r for r in results["rows"]}
    for case, subject in (
        (e.CASE_REPLAY, e.KVLOG),
        (e.CASE_BATCHED, "fsync=always"),
        (e.CASE_BATCHED, "fsync=never"),
    ):
        assert rows[(case, subject)]["rounds"] == [1, 2]
        assert len(rows[(case, subject)]["ratios"]) == 2
    assert not [note for note in results["notes"] if "cold replay replayed" in note]
