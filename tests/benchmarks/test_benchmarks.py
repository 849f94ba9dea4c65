"""The benchmark harness keeps working: ratios, the --check verdict, the report, one real run.

No figure is asserted here (performance goals live in the benchmarks, not in
tests); what is asserted is what a reader of the results relies on: a ratio
means "speed relative to the baseline" whatever the unit, ``--check`` fails
exactly when a goal is missed, and a run on a real broker produces the JSON,
the Markdown and the charts with every workload in them.
"""

from __future__ import annotations

import collections
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgpack
import pytest

from benchmarks.__main__ import checks
from benchmarks.harness import Row, fill_ratios, value_of_size, zipf_indices

ROOT = Path(__file__).resolve().parents[2]


def test_a_ratio_is_speed_relative_to_the_baseline_for_rates_and_times() -> None:
    rows = [
        Row("w", "rate", "base", "reads/s", [100.0, 110.0, 90.0], True),
        Row("w", "rate", "kvlog", "reads/s", [80.0, 70.0, 90.0], True, baseline="base"),
        Row("w", "time", "base", "s", [2.0, 2.0, 2.0], False),
        Row("w", "time", "kvlog", "s", [1.0, 1.0, 1.0], False, baseline="base"),
        Row("w", "time", "orphan", "s", [1.0], False, baseline="missing"),
    ]
    fill_ratios(rows)
    assert rows[1].ratio == pytest.approx(0.8)  # median 80 of median 100
    assert rows[3].ratio == pytest.approx(2.0)  # half the time: twice as fast
    assert rows[0].ratio is None and rows[4].ratio is None
    assert (rows[1].median, rows[1].min, rows[1].max) == (80.0, 70.0, 90.0)


def _goal_rows(read_ratio: float, replay_ratio: float) -> list[Row]:
    rows = []
    for case in ("uniform, 1 thread", "zipfian, 2 threads"):
        rows.append(Row("point reads", case, "raw py-lmdb", "reads/s", [100.0], True))
        rows.append(Row("point reads", case, "kvlog", "reads/s", [100.0], True, baseline="raw py-lmdb"))
    rows[-1].samples = [100.0 * read_ratio]  # only the worst case is below
    rows.append(Row("cold replay", "~100 B values", "raw kafka-python consumer", "records/s", [100.0], True))
    rows.append(
        Row(
            "cold replay",
            "~100 B values",
            "kvlog",
            "records/s",
            [100.0 * replay_ratio],
            True,
            baseline="raw kafka-python consumer",
        )
    )
    fill_ratios(rows)
    return rows


def test_check_judges_each_goal_on_its_worst_case() -> None:
    passed = checks(_goal_rows(0.71, 0.81))
    assert [c["passed"] for c in passed] == [True, True]
    failed = checks(_goal_rows(0.69, 0.81))
    assert [c["passed"] for c in failed] == [False, True]
    assert "zipfian, 2 threads" in failed[0]["detail"]
    assert checks(_goal_rows(0.9, 0.79))[1]["passed"] is False


def test_check_fails_a_goal_that_was_not_measured() -> None:
    rows = [r for r in _goal_rows(0.9, 0.9) if r.workload != "cold replay"]
    verdict = checks(rows)
    assert verdict[1] == {
        "name": "cold replay vs raw kafka-python consumer",
        "goal": 0.8,
        "ratio": None,
        "passed": False,
        "detail": "not measured",
    }


def test_values_have_the_size_asked_for() -> None:
    for size in (100, 1000):
        sizes = {len(msgpack.packb(value_of_size(i, size))) for i in (0, 7, 99_999, 123_456_789)}
        assert all(abs(s - size) <= 2 for s in sizes), sizes


def test_zipfian_keys_are_skewed_and_uniform_ones_are_not() -> None:
    draws = zipf_indices(10_000, 20_000)
    counts = collections.Counter(draws).most_common()
    assert counts[0][1] > 20_000 * 0.05  # the hottest key takes a large share
    assert len(counts) > 1_000  # and the tail is still visited
    assert all(0 <= i < 10_000 for i in draws)


def _fake_results(tmp_path: Path) -> dict[str, Any]:
    rows = _goal_rows(0.75, 0.9)
    rows.append(Row("footprint", "1,000 keys", "dict (hand-rolled consumer)", "MB", [50.0], False))
    rows.append(
        Row("footprint", "1,000 keys", "kvlog", "MB", [40.0], False, baseline="dict (hand-rolled consumer)")
    )
    fill_ratios(rows)
    return {
        "started": "2026-11-26T15:04:05Z",
        "duration_seconds": 12.5,
        "command": "python -m benchmarks --keys 1000",
        "args": {"keys": 1000, "runs": 1, "reads": 10, "workloads": ["reads", "replay", "footprint"]},
        "machine": {"cores": 2, "python": "CPython 3.11", "cpu": "test", "packages": {"kvlog": "0.1.0"}},
        "rows": [r.to_json() for r in rows],
        "checks": checks(rows),
        "skipped": [{"workload": "point reads", "subject": "Redis GET (loopback)", "why": "no redis-server"}],
        "notes": [],
    }


def test_the_report_has_a_table_per_workload_the_checks_and_what_was_skipped(tmp_path: Path) -> None:
    from benchmarks import report

    results = _fake_results(tmp_path)
    text = report.markdown(results)
    for workload in ("point reads", "cold replay", "footprint"):
        assert f"## {workload}" in text
    assert "0.75\u00d7 raw py-lmdb" in text and "1.25\u00d7 dict (hand-rolled consumer)" in text
    assert "no redis-server" in text
    assert "❌" not in text  # both goals met
    paths = report.write(results, tmp_path)
    assert json.loads(paths["json"].read_text())["rows"] == results["rows"]
    pngs = sorted(p for p in tmp_path.iterdir() if p.suffix == ".png")
    assert len(pngs) == 4  # one per workload and the summary
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)


def test_a_run_on_a_real_broker_measures_every_workload(bootstrap: str, tmp_path: Path) -> None:
    """A tiny end-to-end run: every workload produces rows, with ratios, and the files are written."""
    out = tmp_path / "results"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks",
            "--keys",
            "1000",
            "--runs",
            "1",
            "--reads",
            "2000",
            "--bootstrap-servers",
            bootstrap,
            "--out",
            str(out),
            "--workdir",
            str(tmp_path / "work"),
            "--no-install",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (result_file,) = out.glob("*.json")
    results = json.loads(result_file.read_text())
    workloads = {r["workload"] for r in results["rows"]}
    assert workloads == {
        "point reads",
        "cold replay",
        "restart (time to ready)",
        "writes",
        "footprint",
        "embedded log",
    }
    kvlog_rows = [r for r in results["rows"] if r["subject"] == "kvlog"]
    assert {r["workload"] for r in kvlog_rows} >= {"point reads", "cold replay", "footprint"}
    assert all(r["ratio"] is not None and r["ratio"] > 0 for r in kvlog_rows)
    assert [c["name"] for c in results["checks"]] == [
        "point reads vs raw py-lmdb",
        "cold replay vs raw kafka-python consumer",
    ]
    assert results["machine"]["cores"] and results["machine"]["packages"]["kvlog"]
    assert len(list(out.glob("*.png"))) == 7  # six workloads and the summary
    assert "## point reads" in next(out.glob("*.md")).read_text()


def test_readme_block_is_replaced_and_the_rest_is_kept(tmp_path: Path) -> None:
    from benchmarks import report

    readme = tmp_path / "README.md"
    readme.write_text(
        f"# title\n\nbefore\n\n{report.README_START}\nold table\n{report.README_END}\n\nafter\n"
    )
    results = _fake_results(tmp_path)
    paths = report.write(results, tmp_path / "results")
    report.update_readme(readme, results, paths)
    text = readme.read_text()
    assert text.startswith("# title\n\nbefore\n\n") and text.endswith("\n\nafter\n")
    assert "old table" not in text
    assert f"]({paths['summary'].relative_to(tmp_path).as_posix()})" in text
    assert "**point reads** (reads/s)" in text and "| uniform, 1 thread |" in text
    report.update_readme(readme, results, paths)  # idempotent: one block, not two
    assert readme.read_text() == text
    readme.write_text("no markers\n")
    with pytest.raises(ValueError, match="no benchmark block"):
        report.update_readme(readme, results, paths)
