"""The ``kvlog`` command in-process through ``main(argv)``: on the embedded log, and against a real Kafka topic.

The end-to-end runs through the installed console script are in ``test_cli_e2e.py``.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import selectors
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lmdb
import msgpack
import pytest
from cli_helpers import (  # noqa: F401 (the fixture_* fixtures: pytest finds them in this module)
    Run,
    checkout_env,
    clean_env,
    fixture_data,
    fixture_no_kafka_from_the_environment,
    fixture_run,
    one_error_line,
    one_line,
)
from ondisk import cache_env_dir

import kvlog
from kvlog import KVLog
from kvlog.cli import main
from kvlog.log.local import LocalLog
from kvlog.verify import verify


def raw_cache(data: Path) -> list[tuple[bytes, bytes]]:
    """Every (key, value) of the live LMDB cache of ``data``, as stored bytes (no store may be open)."""
    env = lmdb.open(str(cache_env_dir(data / "cache")), max_dbs=4, readonly=True, lock=False)
    try:
        table = env.open_db(b"data")
        with env.begin(db=table) as txn:
            return [(bytes(k), bytes(v)) for k, v in txn.cursor()]
    finally:
        env.close()


# -- queries ------------------------------------------------------------------------


class TestQueries:
    def test_put_get_scan_del(self, run: Run, capsys: pytest.CaptureFixture[str]) -> None:
        assert run("put", "order:1", '{"status": "paid"}') == 0
        assert run("put", "order:2", "[1, 2]") == 0
        assert run("put", "other", "null") == 0
        capsys.readouterr()
        assert run("get", "order:1") == 0
        assert json.loads(capsys.readouterr().out) == {"status": "paid"}
        assert run("get", "other") == 0
        assert capsys.readouterr().out == "null\n", "a stored None is a value, not an absence"
        assert run("scan", "--prefix", "order:") == 0
        lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert lines == [{"key": "order:1", "value": {"status": "paid"}}, {"key": "order:2", "value": [1, 2]}]
        assert run("scan", "--limit", "1") == 0
        assert len(capsys.readouterr().out.splitlines()) == 1
        assert run("del", "order:1") == 0
        assert run("get", "order:1") == 1
        assert one_line(capsys.readouterr().err) == "kvlog: key not found: order:1"
        assert run("del", "order:1") == 1
        assert "key not found" in capsys.readouterr().err

    def test_put_raw_reads_bytes_from_stdin_and_get_raw_writes_them(
        self, run: Run, monkeypatch: pytest.MonkeyPatch, capsysbinary: pytest.CaptureFixture[bytes]
    ) -> None:
        payload = bytes(range(256)) + b"\n\x00"
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(payload)))
        assert run("put", "--raw", "blob") == 0
        capsysbinary.readouterr()
        assert run("get", "--raw", "blob") == 0
        assert capsysbinary.readouterr().out == payload
        assert run("get", "blob") == 0, "without --raw, bytes are shown (as hex when not UTF-8)"
        assert json.loads(capsysbinary.readouterr().out) == payload.hex()

    def test_get_raw_of_a_structured_value_is_an_error(
        self, run: Run, capsys: pytest.CaptureFixture[str]
    ) -> None:
        run("put", "k", '{"a": 1}')
        capsys.readouterr()
        assert run("get", "--raw", "k") == 2
        assert "--raw prints bytes or str values" in one_error_line(capsys.readouterr().err)

    def test_read_commands_refuse_a_missing_data_directory(
        self, run: Run, data: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        for command in (["get", "k"], ["del", "k"], ["scan"], ["stats"], ["dump"], ["verify"], ["rewarm"]):
            assert run(*command) == 2, command
            assert "no kvlog data directory" in one_error_line(capsys.readouterr().err)
        assert not data.exists(), "a typo in --data must not create an empty database"

    def test_the_default_target_is_the_embedded_log_in_dot_data(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        monkeypatch.chdir(tmp_path)
        assert main(["put", "k", '"v"']) == 0
        assert (tmp_path / "data" / "log").is_dir() and (tmp_path / "data" / "cache").is_dir()
        assert main(["get", "k"]) == 0
        assert json.loads(capsys.readouterr().out) == "v"

    def test_explicit_data_wins_over_kafka_environment_variables(
        self, run: Run, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        monkeypatch.setenv("KVLOG_BOOTSTRAP_SERVERS", "127.0.0.1:1")
        monkeypatch.setenv("KVLOG_TOPIC", "orders")
        assert run("put", "k", "1") == 0, capsys.readouterr().err

    def test_stats_json_and_text(self, run: Run, capsys: pytest.CaptureFixture[str]) -> None:
        run("put", "k", "1")
        capsys.readouterr()
        assert run("stats", "--json") == 0
        stats = json.loads(capsys.readouterr().out)
        assert stats["entries"] == 1 and stats["total_lag"] == 0
        assert stats["checkpoint"] == stats["end_offsets"] == {"0": 1}
        assert stats["log"]["kind"] == "local"
        assert stats["log_stats"]["partitions"]["0"]["segments"] >= 1
        assert "dirty_ratio" in stats["log_stats"]["partitions"]["0"]
        assert run("stats") == 0
        out = capsys.readouterr().out
        assert "entries      1" in out and "embedded log at" in out
        assert re.search(r"^\s+0\s+1\s+1\s+0$", out, re.M), "partition, checkpoint, end offset, lag"
        assert "segments" in out and "dirty ratio" in out

    def test_commands_work_beside_an_open_store_and_both_see_each_others_writes(
        self, run: Run, data: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A data directory a service has open is no obstacle: the command reads and writes the same database."""
        with KVLog(data, follow=False) as kv:
            kv["k"] = 1
            capsys.readouterr()
            assert run("get", "k") == 0
            assert json.loads(capsys.readouterr().out) == 1
            assert run("put", "from-the-command", '"cli"') == 0
            assert kv["from-the-command"] == "cli"
            # The same from another process: the command's own log and cache handles.
            done = subprocess.run(
                [sys.executable, "-m", "kvlog", "--data", str(data), "put", "other-process", "2"],
                env=checkout_env(),
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert done.returncode == 0, done.stderr
            assert kv["other-process"] == 2
            kv["after"] = 3
            done = subprocess.run(
                [sys.executable, "-m", "kvlog", "--data", str(data), "get", "after"],
                env=checkout_env(),
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert (done.returncode, done.stdout) == (0, "3\n"), done.stderr


# -- dump and load ----------------------------------------------------------------

#: Values JSON cannot hold exactly, and keys that are not UTF-8: the dump format must carry them all.
AWKWARD = {
    "json:object": {"status": "paid", "total": 12.5, "lines": [1, 2, {"sku": "a"}]},
    "json:none": None,
    "json:unicode": "naïve ☃",
    "json:big": 2**63 - 1,
    "bytes:plain": b"\x00\xffraw bytes",
    "bytes:utf8": b"looks like text",
    "nested:bytes": {"blob": b"\x01\x02", "list": [b"\xfe"]},
    "nested:bytes-keys": {b"\x01": "one", "two": 2},
    "float:nan": math.nan,
    "float:inf": [math.inf, -math.inf],
    "ext": msgpack.ExtType(42, b"\x00\x01"),
    "tuple": (1, "a"),
    b"\xff\x00binary-key": "a key that is not UTF-8",
    b"bytes-key": b"a bytes key that is UTF-8 is the same key as the str",
}


class TestDumpLoad:
    def test_dump_then_load_into_a_fresh_directory_keeps_every_byte(
        self, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        with KVLog(data, follow=False) as kv:
            kv.update(AWKWARD)
        dump = tmp_path / "dump.jsonl"
        assert main(["--data", str(data), "dump", "-o", str(dump)]) == 0
        assert "dumped 14 entries" in capsys.readouterr().err
        lines = [json.loads(line) for line in dump.read_text("utf-8").splitlines()]
        fields = {line.get("key", line.get("key_b64")): set(line) for line in lines}
        assert fields["json:object"] == {"key", "value"}
        assert fields["bytes:plain"] == {"key", "value_b64"}
        assert fields["nested:bytes"] == fields["ext"] == {"key", "value_msgpack_b64"}
        assert {"key_b64", "value"} in fields.values(), "a key that is not UTF-8 is base64"

        fresh = tmp_path / "fresh"
        assert main(["--data", str(fresh), "load", str(dump)]) == 0
        assert "loaded 14 records" in capsys.readouterr().out
        assert raw_cache(fresh) == raw_cache(data), "the same key and value bytes, key by key"

    def test_dump_to_stdout_and_load_from_stdin(
        self,
        run: Run,
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        run("put", "a:1", '{"n": 1}')
        run("put", "a:2", '{"n": 2}')
        run("put", "b:1", '"other"')
        capsys.readouterr()
        assert run("dump", "--prefix", "a:") == 0
        dumped = capsys.readouterr().out
        assert [json.loads(line)["key"] for line in dumped.splitlines()] == ["a:1", "a:2"]
        monkeypatch.setattr(sys, "stdin", io.StringIO(dumped))
        assert main(["--data", str(tmp_path / "copy"), "load", "-"]) == 0
        capsys.readouterr()
        assert main(["--data", str(tmp_path / "copy"), "scan"]) == 0
        assert [json.loads(line) for line in capsys.readouterr().out.splitlines()] == [
            {"key": "a:1", "value": {"n": 1}},
            {"key": "a:2", "value": {"n": 2}},
        ]

    @pytest.mark.parametrize(
        ("bad", "message"),
        [
            ("{not json", "not valid JSON"),
            ("[1, 2]", "expected a JSON object"),
            ('{"key": "k"}', 'exactly one of "value"'),
            ('{"value": 1}', 'exactly one of "key"'),
            ('{"key": "k", "key_b64": "aw==", "value": 1}', 'exactly one of "key"'),
            ('{"key": "k", "value": 1, "colour": "red"}', "unknown field 'colour'"),
            ('{"key": "", "value": 1}', "bad key: keys must not be empty"),
            ('{"key": "' + "x" * 600 + '", "value": 1}', "bad key: key is 600 bytes long"),
            ('{"key": "k", "value_b64": "***"}', "not valid base64"),
            ('{"key": "k", "value_msgpack_b64": "wQ=="}', "not valid msgpack"),
            ('{"key": 7, "value": 1}', '"key" must be a string'),
        ],
    )
    def test_a_bad_line_names_its_number_and_writes_nothing(
        self, run: Run, data: Path, tmp_path: Path, bad: str, message: str, capsys: pytest.CaptureFixture[str]
    ) -> None:
        run("put", "before", "1")
        before = raw_cache(data)
        dump = tmp_path / "bad.jsonl"
        good = [json.dumps({"key": f"k{i}", "value": i}) for i in range(3)]
        dump.write_text("\n".join([*good, "", bad, *good]) + "\n", "utf-8")
        capsys.readouterr()
        assert run("load", str(dump)) == 2
        line = one_error_line(capsys.readouterr().err)
        assert line.startswith("kvlog: error: line 5: ") and message in line, line
        assert "nothing was written" in line
        assert raw_cache(data) == before
        assert run("stats", "--json") == 0
        assert json.loads(capsys.readouterr().out)["end_offsets"] == {"0": 1}, "nothing reached the log"

    def test_load_checks_values_against_the_codec_first(
        self, run: Run, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        dump = tmp_path / "d.jsonl"
        dump.write_text('{"key": "a", "value_b64": "AAE="}\n{"key": "b", "value": {"not": "bytes"}}\n')
        assert main(["--data", str(data), "--codec", "bytes", "load", str(dump)]) == 2
        assert "line 2: bad value" in one_error_line(capsys.readouterr().err)
        assert not data.exists(), "the store is not even opened before the whole input checked out"

    def test_load_of_a_missing_file_is_one_line(self, run: Run, capsys: pytest.CaptureFixture[str]) -> None:
        assert run("load", "/nonexistent/dump.jsonl") == 2
        assert "No such file" in one_error_line(capsys.readouterr().err)


# -- compact, verify, rewarm ----------------------------------------------------------


class TestMaintenance:
    def test_a_damaged_cache_is_set_aside_and_rebuilt_with_one_warning(
        self, run: Run, data: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        with KVLog(data) as kv:
            kv.update({f"k{i}": i for i in range(2000)})
        data_mdb = cache_env_dir(data / "cache") / "data.mdb"
        with open(data_mdb, "r+b") as f:  # cut the file short, as a bad copy or a full disk would
            f.truncate(data_mdb.stat().st_size // 2)
        capsys.readouterr()
        assert run("get", "k1") == 0
        captured = capsys.readouterr()
        assert captured.out.strip() == "1"
        warning = one_line(captured.err)
        assert warning.startswith("kvlog: warning: ")
        assert "damaged" in warning and "moved aside" in warning and "truncated" in warning
        assert [p.name.startswith("cache.corrupt-") for p in data.iterdir()].count(True) == 1
        assert run("verify") == 0
        capsys.readouterr()
        assert run("get", "k1999") == 0 and capsys.readouterr().out.strip() == "1999"

    def test_compact_rewrites_closed_segments_and_keeps_the_contents(
        self, run: Run, data: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        small = LocalLog(data / "log", segment_bytes=4096, background_compaction=False)
        with KVLog(data, log=small, follow=False) as kv:
            for round_ in range(20):
                kv.update({f"k{i}": {"round": round_, "pad": "x" * 50} for i in range(20)})
            kv.discard("k0")
            segments_before = small.stats()["partitions"][0]["segments"]
        capsys.readouterr()
        assert run("compact", "--json") == 0
        report = json.loads(capsys.readouterr().out)
        # The log's background compactor may have started on this dirty log
        # as the command opened it; either way, compact returns compacted.
        assert {"records_before", "records_after", "tombstones_dropped", "seconds"} <= set(report)
        assert run("stats", "--json") == 0
        assert (
            json.loads(capsys.readouterr().out)["log_stats"]["partitions"]["0"]["segments"] < segments_before
        )
        assert run("compact") == 0
        assert "records_before" in capsys.readouterr().out
        assert run("get", "k5") == 0
        assert json.loads(capsys.readouterr().out) == {"round": 19, "pad": "x" * 50}
        assert run("get", "k0") == 1
        assert run("verify") == 0, capsys.readouterr()
        assert run("rewarm") == 0, "a compacted log replays to the same cache"
        assert "rewarmed 19 entries" in capsys.readouterr().out

    def test_compact_on_kafka_is_a_usage_error(self, capsys: pytest.CaptureFixture[str]) -> None:
        assert main(["--bootstrap-servers", "127.0.0.1:1", "--topic", "orders", "compact"]) == 2
        line = one_error_line(capsys.readouterr().err)
        assert "the broker's log cleaner compacts a Kafka topic" in line

    def test_verify_passes_on_a_healthy_cache(self, run: Run, capsys: pytest.CaptureFixture[str]) -> None:
        for i in range(5):
            run("put", f"k{i}", str(i))
        run("del", "k0")
        capsys.readouterr()
        assert run("verify") == 0
        assert "verified 4 keys at offset 6" in capsys.readouterr().out

    def test_verify_reports_a_tampered_cache_key_by_key(
        self, run: Run, data: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        for i in range(5):
            run("put", f"order:{i}", json.dumps({"n": i}))
        # Damage the live cache behind kvlog's back, straight in LMDB.
        env = lmdb.open(str(cache_env_dir(data / "cache")), max_dbs=4)
        table = env.open_db(b"data")
        with env.begin(write=True, db=table) as txn:
            txn.put(b"order:2", msgpack.packb({"n": 999}))
            txn.delete(b"order:3")
            txn.put(b"ghost", msgpack.packb("boo"))
        env.close()
        capsys.readouterr()
        assert run("verify") == 1
        out = capsys.readouterr().out
        assert "1 missing in the cache, 1 extra in the cache, 1 with a different value" in out
        assert re.search(r"different value\s+order:2", out), out
        assert re.search(r"missing in cache\s+order:3", out), out
        assert re.search(r"extra in cache\s+ghost", out), out
        assert run("verify", "--show", "1") == 1
        out = capsys.readouterr().out
        assert "ghost" in out and "order:2" not in out and "and 2 more" in out
        assert run("rewarm") == 0
        assert run("verify") == 0, "rewarm repairs what verify found"

    def test_verify_compares_at_the_checkpoint_not_at_the_log_end(self, data: Path) -> None:
        with KVLog(data, follow=False) as kv:
            kv.update({"a": 1, "b": 2})
            # Records the cache has not applied yet (a store with follow=False
            # moves only when asked): not differences, they are past the checkpoint.
            kv.log.append([(b"a", msgpack.packb(100)), (b"c", msgpack.packb(3)), (b"b", None)], timeout=5)
            report = verify(kv)
            assert report.ok and report.checked == 2 and report.checkpoint == {0: 2}
            assert report.records == 2

    def test_rewarm_prints_progress_and_a_summary(self, run: Run, capsys: pytest.CaptureFixture[str]) -> None:
        run("put", "a", "1")
        run("put", "b", "2")
        run("put", "a", "3")
        capsys.readouterr()
        assert run("rewarm") == 0
        captured = capsys.readouterr()
        assert re.search(r"rewarmed 2 entries from 3 records in [\d.]+s \([\d,]+ records/s\)", captured.out)
        assert "rewarm: 100%" in captured.err, "the progress bar goes to stderr"
        assert run("rewarm", "--resume") == 0
        assert "already at the end of the log (offset 3)" in capsys.readouterr().out

    def test_rewarm_resume_rebuilds_a_lost_cache(
        self, run: Run, data: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        for i in range(3):
            run("put", f"k{i}", str(i))
        shutil.rmtree(data / "cache")
        capsys.readouterr()
        assert run("rewarm", "--resume") == 0
        assert "rewarmed 3 entries from 3 records" in capsys.readouterr().out


# -- the command line itself -------------------------------------------------------


class TestUsage:
    def test_kafka_settings_from_the_environment_must_come_in_pairs(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        monkeypatch.chdir(tmp_path)
        monkeypatch.setenv("KVLOG_TOPIC", "orders")
        assert main(["stats"]) == 2
        assert "KVLOG_BOOTSTRAP_SERVERS" in one_error_line(capsys.readouterr().err)

    def test_help_exits_0(self, capsys: pytest.CaptureFixture[str]) -> None:
        assert main(["--help"]) == 0
        out = capsys.readouterr().out
        for command in ("demo", "get", "put", "del", "scan", "stats", "dump", "load", "rewarm", "verify"):
            assert command in out

    def test_broker_without_the_source_checkout_is_one_line(self, tmp_path: Path) -> None:
        """An installed kvlog has no devbroker/ beside it: ``kvlog broker`` says where it ships, exit 2."""
        site = tmp_path / "site"
        package = Path(kvlog.__file__).parent
        shutil.copytree(package, site / "kvlog", ignore=shutil.ignore_patterns("__pycache__"))
        done = subprocess.run(
            [sys.executable, "-m", "kvlog", "broker"],
            cwd=site,
            env=clean_env(PYTHONPATH=str(site)),
            capture_output=True,
            timeout=120,
        )
        assert done.returncode == 2, done.stderr.decode()
        line = one_error_line(done.stderr.decode())
        assert "kvlog broker needs the development broker" in line and "python -m devbroker" in line, line
        assert done.stdout == b""


# -- an interrupted rewarm, in a real process ----------------------------------------

#: Enough records that a rewarm takes several batches: the signal lands mid-replay.
INTERRUPT_RECORDS = 300_000
#: Bytes of padding a value: the replay of INTERRUPT_RECORDS must last over a second (about ten
#: updates of the bar) for the signal to land in its middle. With 40 it took 0.12 s.
INTERRUPT_PAD = 1_000


@pytest.fixture(scope="module")
def big_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data directory holding INTERRUPT_RECORDS distinct keys, ``key:0000000`` at offset 0 and so on."""
    path = tmp_path_factory.mktemp("big") / "data"
    with KVLog(path, follow=False) as kv:
        for start in range(0, INTERRUPT_RECORDS, 50_000):
            kv.update(
                {f"key:{i:07d}": {"n": i, "pad": "p" * INTERRUPT_PAD} for i in range(start, start + 50_000)}
            )
    return path


def read_until(stream: Any, pattern: str, timeout: float) -> str:
    """Read ``stream`` (a pipe) until ``pattern`` appears; fail after ``timeout`` seconds."""
    seen = b""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as selector:
        selector.register(stream, selectors.EVENT_READ)
        while time.monotonic() < deadline:
            if selector.select(timeout=0.2):
                chunk = os.read(stream.fileno(), 65536)
                if not chunk:
                    pytest.fail(f"the stream closed before {pattern!r} appeared: {seen.decode()!r}")
                seen += chunk
                if re.search(pattern, seen.decode("utf-8", "replace")):
                    return seen.decode("utf-8", "replace")
    pytest.fail(f"{pattern!r} did not appear within {timeout}s: {seen.decode()!r}")


def interrupt_mid_replay(argv: list[str], signum: int) -> str:
    """Run ``kvlog ARGV`` in a process, send it ``signum`` once its bar shows a first batch; return its stderr.

    The command must exit 130 without a traceback.
    """
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvlog", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=checkout_env(),
    )
    try:
        # The bar shows a first batch applied (and not yet the end): interrupt mid-replay.
        seen = read_until(proc.stderr, r"rewarm:\s+([1-9]|[1-9]\d)%", timeout=120)
        proc.send_signal(signum)
        out, rest = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
    err = seen + rest.decode()
    assert proc.returncode == 130, (out, err)
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_an_interrupted_rewarm_abandons_the_new_cache_and_leaves_the_live_one_as_it_was(
    big_data: Path, tmp_path: Path, signum: int, capsys: pytest.CaptureFixture[str]
) -> None:
    """A rewarm builds beside the live cache: cut short, it is dropped, and readers never saw it."""
    data = tmp_path / "data"
    shutil.copytree(big_data, data)
    before = raw_cache(data)
    live = cache_env_dir(data / "cache")
    assert len(before) == INTERRUPT_RECORDS

    err = interrupt_mid_replay(["--data", str(data), "rewarm"], signum)
    match = re.search(
        r"the rewarm was abandoned and the live cache is unchanged \(consistent at offset (\d+) of (\d+)\); "
        r"(.*) starts it again",
        err,
    )
    assert match, err
    assert match[3] == f"kvlog --data {data} rewarm"
    assert int(match[1]) == int(match[2]) == INTERRUPT_RECORDS

    # The live cache is the one it was, whole; the partial one beside it is gone.
    assert cache_env_dir(data / "cache") == live
    assert sorted((data / "cache").glob("gen-*")) == [live]
    assert raw_cache(data) == before

    assert main(["--data", str(data), "rewarm"]) == 0
    assert f"rewarmed {INTERRUPT_RECORDS:,} entries" in capsys.readouterr().out
    assert main(["--data", str(data), "verify"]) == 0
    assert f"verified {INTERRUPT_RECORDS:,} keys" in capsys.readouterr().out


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_an_interrupted_rebuild_of_a_lost_cache_leaves_a_consistent_cache_that_resume_completes(
    big_data: Path, tmp_path: Path, signum: int, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without a live cache, ``rewarm --resume`` builds it in place: cut short, it is a prefix that resumes."""
    data = tmp_path / "data"
    shutil.copytree(big_data, data)
    shutil.rmtree(data / "cache")

    err = interrupt_mid_replay(["--data", str(data), "rewarm", "--resume"], signum)
    match = re.search(r"the cache is consistent at offset (\d+) of (\d+); (.*) continues", err)
    assert match, err
    assert match[3] == f"kvlog --data {data} rewarm --resume"
    checkpoint, end = int(match[1]), int(match[2])
    assert 0 < checkpoint < end == INTERRUPT_RECORDS

    # Consistent: the cache holds exactly the log folded up to the checkpoint
    # (distinct keys, key:i at offset i), nothing from a cut-short batch.
    cached = raw_cache(data)
    assert len(cached) == checkpoint
    assert cached[-1][0] == f"key:{checkpoint - 1:07d}".encode()

    assert main(["--data", str(data), "rewarm", "--resume"]) == 0
    out = capsys.readouterr().out
    assert f"rewarmed {INTERRUPT_RECORDS:,} entries" in out and f"resumed from offset {checkpoint}" in out
    assert main(["--data", str(data), "verify"]) == 0
    assert f"verified {INTERRUPT_RECORDS:,} keys" in capsys.readouterr().out


def test_rewarm_resume_continues_from_the_checkpoint(data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with KVLog(data, follow=False) as kv:
        for start in range(0, 150_000, 50_000):
            kv.update({f"key:{i:07d}": i for i in range(start, start + 50_000)})
    full = raw_cache(data)

    def interrupt_after_the_first_batch(applied: dict[int, int], target: dict[int, int]) -> None:
        if applied[0] > 0:
            raise KeyboardInterrupt

    # An interrupted rewarm leaves the live cache whole: there is nothing to resume.
    with KVLog(data, follow=False) as kv, pytest.raises(KeyboardInterrupt):
        kv.rewarm(progress=interrupt_after_the_first_batch)
    assert raw_cache(data) == full
    assert main(["--data", str(data), "rewarm", "--resume"]) == 0
    assert "already at the end of the log (offset 150000)" in capsys.readouterr().out

    # An interrupted rebuild of a lost cache leaves a prefix, which --resume continues.
    shutil.rmtree(data / "cache")
    with pytest.raises(KeyboardInterrupt):
        KVLog(data, follow=False, progress=interrupt_after_the_first_batch)
    checkpoint = len(raw_cache(data))
    assert 0 < checkpoint < 150_000
    assert main(["--data", str(data), "rewarm", "--resume"]) == 0
    captured = capsys.readouterr()
    assert f"resumed from offset {checkpoint}" in captured.out, captured
    assert f"from {150_000 - checkpoint:,} records" in captured.out
    assert raw_cache(data) == full


# -- against a real Kafka topic -------------------------------------------------------


@pytest.fixture
def cli(tmp_path: Path, bootstrap: str, topic: str, make_kv: Any) -> Iterator[Run]:
    make_kv("seed")  # creates the compacted topic; the command never creates topics

    def run(*args: str) -> int:
        return main(
            ["--cache", str(tmp_path / "cli"), "--bootstrap-servers", bootstrap, "--topic", topic, *args]
        )

    yield run


class TestKafka:
    def test_put_get_scan_del(self, cli: Run, capsys: pytest.CaptureFixture[str]) -> None:
        assert cli("put", "order:1", '{"status": "paid"}') == 0
        assert cli("put", "order:2", "[1, 2]") == 0
        capsys.readouterr()
        assert cli("get", "order:1") == 0
        assert json.loads(capsys.readouterr().out) == {"status": "paid"}
        assert cli("scan", "--prefix", "order:") == 0
        lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert lines == [{"key": "order:1", "value": {"status": "paid"}}, {"key": "order:2", "value": [1, 2]}]
        assert cli("del", "order:1") == 0
        assert cli("get", "order:1") == 1
        assert "key not found: order:1" in capsys.readouterr().err

    def test_settings_from_the_environment(
        self,
        bootstrap: str,
        topic: str,
        make_kv: Any,
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        make_kv()["hello"] = "world"
        monkeypatch.setenv("KVLOG_BOOTSTRAP_SERVERS", bootstrap)
        monkeypatch.setenv("KVLOG_TOPIC", topic)
        assert main(["--cache", str(tmp_path / "env"), "get", "hello"]) == 0
        assert json.loads(capsys.readouterr().out) == "world"

    def test_stats_json_and_text(self, cli: Run, capsys: pytest.CaptureFixture[str]) -> None:
        cli("put", "k", "1")
        capsys.readouterr()
        assert cli("stats", "--json") == 0
        stats = json.loads(capsys.readouterr().out)
        assert stats["entries"] == 1 and stats["total_lag"] == 0 and stats["log"]["kind"] == "kafka"
        assert cli("stats") == 0
        out = capsys.readouterr().out
        assert "entries      1" in out and "partition" in out and "kafka topic" in out

    def test_rewarm_and_verify(self, cli: Run, capsys: pytest.CaptureFixture[str]) -> None:
        cli("put", "a", "1")
        cli("put", "b", "2")
        capsys.readouterr()
        assert cli("rewarm") == 0
        captured = capsys.readouterr()
        assert "rewarmed 2 entries from 2 records" in captured.out
        assert "rewarm" in captured.err, "the progress bar goes to stderr"
        assert cli("verify") == 0
        assert "the cache matches the log" in capsys.readouterr().out

    def test_verify_ignores_what_another_producer_appends(self, make_kv: Any) -> None:
        mine = make_kv("mine", follow=False)
        mine.update({f"k{i}": i for i in range(50)})
        other = make_kv("other")
        other.update({f"k{i}": -i for i in range(25, 75)})
        other.discard("k1")
        report = verify(mine)
        assert report.ok, report.differences
        assert report.checked == 50 and report.checkpoint == {0: 50}

    def test_compact_is_refused(self, cli: Run, capsys: pytest.CaptureFixture[str]) -> None:
        assert cli("compact") == 2
        assert "the broker's log cleaner compacts a Kafka topic" in one_error_line(capsys.readouterr().err)

    def test_errors_are_one_line_with_exit_2(self, cli: Run, capsys: pytest.CaptureFixture[str]) -> None:
        assert cli("put", "k", "{not json") == 2
        assert one_error_line(capsys.readouterr().err).startswith("kvlog: error: VALUE is not valid JSON")

    def test_missing_topic_is_an_error_not_a_creation(
        self, bootstrap: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        code = main(
            [
                "--cache",
                str(tmp_path / "c"),
                "--bootstrap-servers",
                bootstrap,
                "--topic",
                "never-made",
                "stats",
            ]
        )
        assert code == 2
        assert "does not exist" in one_error_line(capsys.readouterr().err)
