"""The scale part of the harness: the ratio to the smaller replay, the memory sampler, the README's scale table.

Tiny sizes only: what is asserted is that each figure means what the report
says it means (a ratio within one run, the peak anonymous memory of the child
that replays, the latest run of each size in the README), not any figure.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest

from benchmarks import scale
from benchmarks.harness import Context, Row, fill_ratios, value_of_size

ROOT = Path(__file__).resolve().parents[2]

#: The checks a run of the replay and restart workloads adds (see benchmarks/scale.py).
SCALE_CHECKS = [
    "scale: cold replay from Kafka at this run's keys vs kvlog at 200 keys",
    "scale: cold replay from the embedded log at this run's keys vs kvlog at 200 keys",
    "scale: peak RssAnon of the replaying process",
    "scale: warm restart",
]


def _wait_for(condition: Any, timeout: float = 10.0) -> bool:
    """Poll ``condition()`` until it is true or ``timeout`` s have passed; its last value."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return bool(condition())
        time.sleep(0.002)
    return True


def test_the_baseline_is_100k_keys_or_a_tenth_of_a_smaller_run() -> None:
    assert scale.base_keys(10_000_000) == 100_000
    assert scale.base_keys(1_000_000) == 100_000
    assert scale.base_keys(100_000) == 10_000
    assert scale.base_keys(2_000) == 200
    assert scale.is_large(10_000_000) and not scale.is_large(1_000_000)


ALLOCATE = """
import mmap, sys
block = b"x" * {size}  # touched pages: anonymous memory
if {mapped}:  # a file's pages mapped and read, as LMDB's: resident, but not anonymous
    with open({path!r}, "rb") as f:
        pages = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        total = sum(pages[i] for i in range(0, len(pages), 4096))
sys.stdout.write("ready\\n")
sys.stdout.flush()
sys.stdin.read()  # until the parent closes it
"""


def _peak_of_child_holding(size: int, mapped: Path | None = None) -> tuple[float, int]:
    code = ALLOCATE.format(size=size, mapped=mapped is not None, path=str(mapped))
    with subprocess.Popen(
        [sys.executable, "-c", code],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as proc:
        assert proc.stdin is not None and proc.stdout is not None
        try:
            with scale.RssAnonSampler(proc.pid, interval=0.001) as sampler:
                assert proc.stdout.readline() == "ready\n"
                # The block is allocated; the sampler sees it within a few readings.
                seen = sampler.samples
                assert _wait_for(lambda: sampler.samples >= seen + 3)
                proc.stdin.close()
                assert proc.wait(timeout=30) == 0
            return sampler.peak_mb, sampler.samples
        finally:
            if proc.poll() is None:
                proc.kill()


def test_the_sampler_reports_a_childs_peak_anonymous_memory(tmp_path: Path) -> None:
    small, _ = _peak_of_child_holding(1_000)
    big, samples = _peak_of_child_holding(80_000_000)
    assert samples >= 3
    assert 0 < small < 40  # an interpreter holding nothing
    # The 80 MB block, on top of what the interpreter holds, and not much more.
    assert small + 75 <= big <= small + 100
    # 80 MB of a file mapped and read count in VmRSS, not in RssAnon.
    mapped = tmp_path / "mapped"
    mapped.write_bytes(b"m" * 80_000_000)
    assert _peak_of_child_holding(1_000, mapped)[0] < small + 10


def test_a_sampled_process_that_is_gone_reads_as_none() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    assert scale.rss_anon_bytes(proc.pid) is None


def test_an_embedded_replay_runs_in_a_child_whose_memory_is_sampled(tmp_path: Path) -> None:
    ctx = Context(keys=2_000, runs=1, workdir=tmp_path, bootstrap_servers="", reads=1)
    data = scale._embedded_log(ctx, ctx.keys)
    shutil.rmtree(data / "cache")
    out, peak = scale.replay_in_child({"path": str(data)})
    assert out["entries"] == 2_000
    assert out["open_replay"]["mode"] == "cold"
    assert out["seconds"] > 0
    assert 5 < peak < scale.MEMORY_GOAL_MB


def test_the_lmdb_floor_loads_every_pair(tmp_path: Path) -> None:
    import lmdb

    pairs = [(f"k{i:05d}".encode(), msgpack.packb(value_of_size(i, 100))) for i in range(3_000)]
    seconds = scale.lmdb_load_seconds(pairs, tmp_path / "floor")
    assert seconds > 0
    assert not (tmp_path / "floor").exists()  # removed afterwards
    # What it loads, checked on a copy that is kept.
    env = lmdb.open(str(tmp_path / "kept"), max_dbs=4, map_size=1 << 30)
    db = env.open_db(b"data")
    with env.begin(write=True, db=db) as txn:
        txn.cursor().putmulti(pairs)
    with env.begin(db=db) as txn:
        assert txn.stat(db)["entries"] == 3_000
    env.close()


def test_the_fetch_floor_steps_over_whole_batches_only() -> None:
    from kafka.record.memory_records import MemoryRecordsBuilder

    def batch(offset: int, count: int) -> bytes:
        builder = MemoryRecordsBuilder(magic=2, compression_type=0, batch_size=1 << 20, offset=offset)
        for i in range(count):
            builder.append(timestamp=None, key=f"k{i}".encode(), value=b"v" * 100, headers=[])
        builder.close()
        return bytes(builder.buffer())

    first, second, third = batch(0, 10), batch(10, 5), batch(15, 7)
    buffer = first + second + third[: len(third) // 2]  # a fetch ends inside a batch
    next_offset, _, used = scale.walk_batches(buffer)
    assert next_offset == 15
    assert used == len(first) + len(second)
    assert scale.walk_batches(first[:20]) == (None, -1, 0)


def _rows(ratio: float, peaks: list[float], restart: float) -> list[Row]:
    base = "kvlog at 100,000 keys"
    rows = []
    for case in (scale.CASE_KAFKA, scale.CASE_EMBEDDED):
        rows.append(
            Row(scale.WORKLOAD, case, base, "records/s", [100.0, 100.0, 100.0], True, rounds=[1, 2, 3])
        )
        rows.append(
            Row(
                scale.WORKLOAD,
                case,
                "kvlog",
                "records/s",
                [100.0 * ratio] * 3,
                True,
                baseline=base,
                rounds=[1, 2, 3],
            )
        )
    rows.append(Row(scale.WORKLOAD, scale.CASE_MEMORY_KAFKA, "kvlog", "MB", peaks, False))
    rows.append(Row(scale.WORKLOAD, scale.CASE_MEMORY_EMBEDDED, "kvlog", "MB", [40.0, 41.0], False))
    rows.append(Row(scale.WORKLOAD, scale.CASE_MEMORY_KAFKA, base, "MB", [400.0], False))  # not judged
    rows.append(Row(scale.RESTART_WORKLOAD, scale.RESTART_CASE, "kvlog warm restart", "s", [restart], False))
    fill_ratios(rows)
    return rows


def _verdicts(rows: list[Row], workloads: set[str]) -> dict[str, bool]:
    return {c["name"].split(" at ")[0]: c["passed"] for c in scale.checks(rows, workloads)}


def test_the_scale_checks_pass_within_their_goals() -> None:
    rows = _rows(ratio=0.86, peaks=[200.0, 240.0], restart=0.45)
    verdicts = _verdicts(rows, {"replay", "restart"})
    assert verdicts == {
        "scale: cold replay from Kafka": True,
        "scale: cold replay from the embedded log": True,
        "scale: peak RssAnon of the replaying process": True,
        "scale: warm restart": True,
    }
    ratio_check = scale.checks(rows, {"replay"})[0]
    assert ratio_check["ratio"] == pytest.approx(0.86)
    assert "kvlog at 100,000 keys" in ratio_check["name"]


def test_each_scale_check_fails_on_its_own() -> None:
    slow = _verdicts(_rows(ratio=0.84, peaks=[100.0], restart=0.1), {"replay", "restart"})
    assert [name for name, ok in slow.items() if not ok] == [
        "scale: cold replay from Kafka",
        "scale: cold replay from the embedded log",
    ]
    # One sample above the bound fails it, whatever the median: "throughout" the replays.
    fat = _verdicts(_rows(ratio=1.0, peaks=[100.0, 100.0, 251.0], restart=0.1), {"replay"})
    assert [name for name, ok in fat.items() if not ok] == ["scale: peak RssAnon of the replaying process"]
    slow_restart = _verdicts(_rows(ratio=1.0, peaks=[100.0], restart=0.51), {"restart"})
    assert slow_restart == {"scale: warm restart": False}


def test_a_scale_check_without_its_rows_fails() -> None:
    found = scale.checks([], {"replay", "restart"})
    assert len(found) == 4 and not any(c["passed"] for c in found)


def _results(keys: int, started: str, kafka_rate: float, *, scale_rows: bool = True) -> dict[str, Any]:
    rows = []
    if scale_rows:
        rows = _rows(ratio=0.9, peaks=[100.0 + keys / 1e6], restart=0.01 * (1 + keys / 1e6))
        for row in rows:
            if row.case == scale.CASE_KAFKA:
                row.samples = [kafka_rate * (1 if row.subject == "kvlog" else 1.1)] * 3
        fill_ratios(rows)
    rows.append(Row("writes", "batched", "kvlog", "records/s", [1.0], True))
    return {
        "started": started,
        "command": f"python -m benchmarks --keys {keys}",
        "args": {"keys": keys, "runs": 1},
        "rows": [row.to_json() for row in rows],
    }


def test_the_readme_scale_table_has_the_latest_run_of_each_size(tmp_path: Path) -> None:
    results = tmp_path / "results"
    results.mkdir()
    runs = [
        ("2026-12-01T10-00-00Z", _results(100_000, "2026-12-01T10:00:00Z", 111_111.0)),
        ("2026-12-02T10-00-00Z", _results(100_000, "2026-12-02T10:00:00Z", 222_222.0)),  # the latest 100k
        ("2026-12-01T11-00-00Z", _results(1_000_000, "2026-12-01T11:00:00Z", 333_333.0)),
        ("2026-12-01T12-00-00Z", _results(10_000_000, "2026-12-01T12:00:00Z", 444_444.0)),
        # Newer, but without scale rows: not a row of the table.
        ("2026-12-03T10-00-00Z", _results(100_000, "2026-12-03T10:00:00Z", 0.0, scale_rows=False)),
    ]
    for stem, data in runs:
        (results / f"{stem}.json").write_text(json.dumps(data))
        (results / f"{stem}.md").write_text("# report\n")
    (results / "broken.json").write_text("{not json")
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\nbefore\n\n{scale.SCALE_START}\nold table\n{scale.SCALE_END}\n\nafter\n")

    scale.update_readme(readme, results)

    text = readme.read_text()
    assert text.startswith("# title\n\nbefore\n\n") and text.endswith("\n\nafter\n")
    assert "old table" not in text
    table = [line for line in text.splitlines() if line.startswith("| ") and "keys" not in line.split("|")[1]]
    assert [line.split("|")[1].strip() for line in table] == ["100,000", "1,000,000", "10,000,000"]
    assert "222 k/s" in table[0] and "111 k/s" not in text
    assert "(results/2026-12-02T10-00-00Z.md)" in table[0]
    assert "333 k/s" in table[1] and "(results/2026-12-01T11-00-00Z.md)" in table[1]
    assert f"0.90{scale.TIMES}" in table[2] and "110 MB" in table[2] and "0.110 s" in table[2]
    chart = results / scale.CHART_NAME
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"(results/{scale.CHART_NAME})" in text
    # Rebuilding it again changes nothing: the block is replaced, not added to.
    scale.update_readme(readme, results)
    assert readme.read_text() == text


def test_a_readme_without_the_scale_block_is_refused(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("# nothing here\n")
    with pytest.raises(ValueError, match="scale block"):
        scale.update_readme(readme, tmp_path)


def test_check_takes_the_scale_goals_of_replay_or_restart_alone(capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks.__main__ import main

    with pytest.raises(SystemExit) as exc:
        main(["--check", "--only", "footprint"])
    assert exc.value.code == 2
    assert "replay or restart" in capsys.readouterr().err


def test_a_quick_checked_run_of_replay_and_restart_measures_scale(bootstrap: str, tmp_path: Path) -> None:
    out = tmp_path / "results"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks",
            "--keys",
            "2000",
            "--runs",
            "1",
            "--only",
            "replay,restart",
            "--check",
            "--bootstrap-servers",
            bootstrap,
            "--out",
            str(out),
            "--workdir",
            str(tmp_path / "work"),
            "--no-install",
            "--nice",
            "0",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    # --check may miss a goal at this size (its exit status); the run itself must not fail.
    assert proc.returncode in (0, 1), proc.stdout[-3000:] + proc.stderr[-3000:]
    (result_file,) = out.glob("*.json")
    results = json.loads(result_file.read_text())
    by_key = {(r["workload"], r["case"], r["subject"]): r for r in results["rows"]}
    base = "kvlog at 200 keys"
    for case in (scale.CASE_KAFKA, scale.CASE_EMBEDDED):
        row = by_key[(scale.WORKLOAD, case, "kvlog")]
        assert row["baseline"] == base and row["ratio"] and row["ratios"]
        assert by_key[(scale.WORKLOAD, case, base)]["median"] > 0
    for case in (scale.CASE_MEMORY_KAFKA, scale.CASE_MEMORY_EMBEDDED):
        assert 5 < by_key[(scale.WORKLOAD, case, "kvlog")]["max"] < scale.MEMORY_GOAL_MB
    for floor in (scale.FLOOR_LMDB, scale.FLOOR_FETCH, scale.FLOOR_SEGMENTS):
        assert by_key[(scale.FLOOR, scale.CASE_FLOOR, floor)]["median"] > 0
    assert [c["name"] for c in results["checks"]] == SCALE_CHECKS
    report = next(out.glob("*.md")).read_text()
    assert "## The physical floor" in report
    assert "## replay at scale" in report


@pytest.mark.parametrize("size", [10, 100, 300, 1_000])
def test_the_bulk_load_packs_the_values_of_the_data_set_byte_for_byte(size: int) -> None:
    from benchmarks.data import packed_value

    for i in [*range(0, 300_000, 1_009), 99_990, 99_991, 9_999_999]:
        assert packed_value(i, size) == msgpack.packb(value_of_size(i, size)), (i, size)


def test_a_bulk_load_batch_reads_back_as_written_with_a_valid_crc() -> None:
    from kafka.record.memory_records import MemoryRecords

    from benchmarks.data import encode_batch
    from kvlog.log.recordbatch import decode

    records = [(f"order:{i:09d}".encode(), b"v" * (i % 700)) for i in range(3_000)]
    data = encode_batch(records, 1_700_000_000_000)
    decoded = decode(data, 0, read_committed=True, aborted_transactions=None, check_crc=True)
    assert decoded.error is None
    assert list(decoded.offsets) == list(range(3_000)) and decoded.next_offset == 3_000
    assert list(decoded.keys) == [k for k, _ in records]
    assert list(decoded.values) == [v for _, v in records]
    batch = MemoryRecords(data).next_batch()
    assert batch.validate_crc()
    assert [(r.offset, r.timestamp) for r in batch][-1] == (2_999, 1_700_000_000_000)


def test_above_large_the_replay_pair_takes_runs_rounds_and_no_warm_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from benchmarks import replay

    monkeypatch.setattr(scale, "LARGE", 500)
    calls: list[str] = []
    noise = iter([1.0, 2.0, 0.5, 1.5, 0.7, 3.0] * 100)  # a scattered ratio: no extra rounds all the same

    def measure(name: str) -> float:
        calls.append(name)
        return next(noise) if name == "kvlog" else 1.0

    ctx = Context(keys=1_000, runs=2, workdir=tmp_path, bootstrap_servers="", reads=1, install=False)
    names = ("raw", "kvlog", "other")
    samples = replay._interleaved(
        ctx, {n: (lambda n=n: measure(n)) for n in names}, "test", pair=("raw", "kvlog")
    )
    assert {name: rounds for name, (_, rounds) in samples.items()} == {
        "raw": [1, 2],
        "kvlog": [1, 2],
        "other": [1, 2],
    }
    assert len(calls) == 6  # two rounds of three, no warm-up


def test_above_large_cold_replay_keeps_the_small_values_and_the_judged_pair_and_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from benchmarks import replay

    monkeypatch.setattr(scale, "LARGE", 500)
    monkeypatch.setattr(scale, "run", lambda ctx: [])
    monkeypatch.setattr(replay, "topic_for", lambda ctx, size, **kw: f"topic-{size}")
    monkeypatch.setattr(replay, "_end_offset", lambda bs, topic: 1_000)
    measured: list[tuple[str, ...]] = []

    def interleaved(ctx: Context, subjects: dict[str, Any], label: str, **kw: Any) -> dict[str, Any]:
        measured.append(tuple(subjects))
        return {name: ([1.0], [1]) for name in subjects}

    monkeypatch.setattr(replay, "_interleaved", interleaved)
    ctx = Context(keys=1_000, runs=1, workdir=tmp_path, bootstrap_servers="", reads=1, install=False)
    rows = replay.run_cold(ctx)
    assert measured == [(replay.RAW, "kvlog")]  # one case, the judged pair only
    assert {r.case for r in rows} == {"~100 B values"}
    skipped = {item["subject"]: item["why"] for item in ctx.skipped}
    assert set(skipped) == {
        "~1 KB values",
        "kvlog rewarm()",
        f"{replay.RAW} (defaults)",
        "dict consumer (hand-rolled)",
        "ktables",
    }
    assert all("above 500 keys" in why for why in skipped.values())
