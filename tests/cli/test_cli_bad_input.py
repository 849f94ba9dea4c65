"""The ``kvlog`` command given bad input: one clear line on stderr, the documented exit code.

This is the README's row "The CLI with malformed JSON, ..." under Guarantees
and failure modes (Bad input).

Each case checks that stderr is exactly one ``kvlog: error: ...`` line (no
traceback), that the exit code is the one the CLI documents (2 for bad input
and failures), and that nothing was created or written that was not asked
for. Most run in-process through ``main(argv)``; ``TestEntryPoint`` runs the
real ``python -m kvlog`` in a subprocess.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest
from cli_helpers import (  # noqa: F401 (the fixture_* fixtures: pytest finds them in this module)
    Run,
    checkout_env,
    fixture_data,
    fixture_no_kafka_from_the_environment,
    fixture_run,
    one_error_line,
)

import kvlog.cli
from kvlog import Codec, KVLog
from kvlog.cli import main
from kvlog.codec import MAX_KEY_SIZE

#: The exit code the CLI documents for a usage error or a failure.
EXIT_ERROR = 2


def fails(capsys: pytest.CaptureFixture[str], code: int, *fragments: str) -> str:
    """Assert the last command exited with ``code`` (2: failure) and printed one error line naming ``fragments``."""
    captured = capsys.readouterr()
    assert code == EXIT_ERROR, f"exit {code}: {captured.err}"
    line = one_error_line(captured.err)
    for fragment in fragments:
        assert fragment in line, line
    assert captured.out == ""
    return line


def log_end(data: Path) -> dict[str, int]:
    """The embedded log's end offsets, through the CLI (``stats --json``)."""
    out = io.StringIO()
    stdout, sys.stdout = sys.stdout, out
    try:
        assert main(["--data", str(data), "stats", "--json"]) == 0
    finally:
        sys.stdout = stdout
    return dict(json.loads(out.getvalue())["end_offsets"])


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def nested_json(depth: int) -> str:
    return "[" * depth + "1" + "]" * depth


# -- malformed values and lines ---------------------------------------------------------


class TestMalformedInput:
    @pytest.mark.parametrize(
        ("value", "message"),
        [
            ("{not json", "VALUE is not valid JSON"),
            ("", "VALUE is not valid JSON"),
            ("[1,", "VALUE is not valid JSON"),
            ("'single quotes'", "VALUE is not valid JSON"),
            (nested_json(100_000), "VALUE nests too deeply"),
            (nested_json(990), "VALUE nests too deeply"),  # under msgpack's 1024, past Python's parser
            ("123456789012345678901234567890", "Integer value out of range"),
            ('{"a": "\\udcff"}', "surrogates not allowed"),
        ],
        ids=["unclosed", "empty", "truncated", "quotes", "deep", "990-deep", "int128", "surrogate"],
    )
    def test_a_bad_value_is_one_line_and_creates_nothing(
        self, run: Run, data: Path, value: str, message: str, capsys: pytest.CaptureFixture[str]
    ) -> None:
        fails(capsys, run("put", "k", value), message)
        assert not data.exists(), "a refused put must not create a database"

    def test_a_value_the_json_codec_refuses_is_one_line(
        self, data: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        for value in ("NaN", "[Infinity]"):
            code = main(["--data", str(data), "--codec", "json", "put", "k", value])
            fails(capsys, code, "cannot be stored with the json codec")
        assert not data.exists()

    def test_a_record_larger_than_the_log_takes_is_one_line_and_writes_nothing(
        self, run: Run, data: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        assert run("put", "seed", "1") == 0
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"x" * (1024 * 1024 + 1))))
        fails(capsys, run("put", "--raw", "big"), "larger than the log accepts")
        assert log_end(data) == {"0": 1}

    @pytest.mark.parametrize(
        ("line", "message"),
        [
            (b'{"key": "k", "value": "\xff"}', "bad value"),
            (b'{"key": "\xfe\xff", "value": 1}', "bad key"),
            (b"\xff\xfe not even JSON", "not valid JSON"),
            (b'{"key": "k", "value": ' + nested_json(100_000).encode() + b"}", "nests too deeply"),
            (
                b'{"key": "k", "value_msgpack_b64": "gQGhYQ=="}',  # {1: "a"}: an int map key
                "not allowed for map key",
            ),
            (b'{"key": "' + b"k" * (MAX_KEY_SIZE + 1) + b'", "value": 1}', "bad key"),
        ],
        ids=["value-not-utf8", "key-not-utf8", "garbage", "deep", "int-map-key", "long-key"],
    )
    def test_a_bad_load_line_names_its_number_and_writes_nothing(
        self,
        run: Run,
        data: Path,
        tmp_path: Path,
        line: bytes,
        message: str,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        assert run("put", "seed", "1") == 0
        dump = tmp_path / "bad.jsonl"
        dump.write_bytes(b'{"key": "a", "value": 1}\n' + line + b'\n{"key": "b", "value": 2}\n')
        fails(capsys, run("load", str(dump)), "line 2: ", message, "nothing was written")
        assert log_end(data) == {"0": 1}

    def test_a_bad_line_on_stdin_is_found_too(
        self, run: Run, data: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b'{"key": "a", "value": 1}\n\xff\n')))
        fails(capsys, run("load", "-"), "line 2: ", "nothing was written")
        assert not data.exists()


# -- keys -------------------------------------------------------------------------------


class TestKeys:
    @pytest.mark.parametrize(
        "key",
        ["k" * (MAX_KEY_SIZE + 1), "é" * (MAX_KEY_SIZE // 2 + 1), "k" * (MAX_KEY_SIZE - 1) + "é"],
        ids=["512-ascii", "256-two-byte", "510-plus-two-byte"],
    )
    @pytest.mark.parametrize("command", ["put", "get", "del"])
    def test_a_key_too_long_is_one_line_before_anything_is_opened(
        self, run: Run, data: Path, key: str, command: str, capsys: pytest.CaptureFixture[str]
    ) -> None:
        args = [command, key, "1"] if command == "put" else [command, key]
        fails(capsys, run(*args), "bad KEY", "the cache holds keys of at most 511 bytes")
        assert not data.exists()

    def test_the_longest_key_works(self, run: Run, capsys: pytest.CaptureFixture[str]) -> None:
        key = "k" * (MAX_KEY_SIZE - 2) + "é"  # 511 bytes
        assert run("put", key, "1") == 0
        assert run("get", key) == 0
        assert capsys.readouterr().out == "1\n"

    def test_key_bytes_that_are_not_utf8_name_a_bytes_key(
        self, run: Run, data: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """argv bytes \\xff arrive as the surrogate escape \\udcff; they name the bytes key b"\\xff"."""
        with KVLog(data, follow=False) as kv:
            kv[b"\xff"] = "raw"
        assert run("get", "\udcff") == 0
        assert json.loads(capsys.readouterr().out) == "raw"
        assert run("scan", "--prefix", "\udcff") == 0
        assert json.loads(capsys.readouterr().out) == {"key_b64": "/w==", "value": "raw"}
        assert run("del", "\udcff") == 0
        assert run("get", "\udcff") == 1
        assert capsys.readouterr().err == "kvlog: key not found: b'\\xff'\n"

    def test_a_surrogate_no_bytes_stand_for_is_one_line(
        self, run: Run, data: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        fails(capsys, run("put", "\ud800", "1"), "bad KEY", "cannot be encoded as UTF-8")
        fails(capsys, run("get", "a\ud800"), "bad KEY")
        assert not data.exists()

    def test_an_empty_key_is_one_line(self, run: Run, capsys: pytest.CaptureFixture[str]) -> None:
        fails(capsys, run("put", "", "1"), "bad KEY", "empty")


# -- options, codecs, timeouts --------------------------------------------------------------


class TestOptions:
    @pytest.mark.parametrize(
        ("argv", "message"),
        [
            (["--data"], "argument --data: expected one argument"),
            (["--codec"], "argument --codec: expected one argument"),
            (["load"], "the following arguments are required: FILE"),
            (["put"], "the following arguments are required: key"),
            (["scan", "--limit"], "argument --limit: expected one argument"),
            (["--codec", "yaml", "put", "k", "1"], "unknown codec 'yaml'"),
            (["--timeout", "inf", "get", "k"], "invalid positive number of seconds value: 'inf'"),
            (["--timeout", "nan", "get", "k"], "invalid positive number of seconds value: 'nan'"),
            (["--timeout", "0", "get", "k"], "invalid positive number of seconds value: '0'"),
            (["--timeout", "-1", "put", "k", "1"], "invalid positive number of seconds value: '-1'"),
            ([], "the following arguments are required: COMMAND"),
            (["no-such-command"], "invalid choice"),
            (["--data", "D", "--topic", "t", "stats"], "--data (the embedded log) cannot be combined"),
            (["--data", "D", "--bootstrap-servers", "h:1", "stats"], "cannot be combined"),
            (["--data", "D", "--cache", "C", "stats"], "--cache is for a Kafka topic"),
            (["--topic", "t", "stats"], "needs both --bootstrap-servers and --topic"),
            (["--bootstrap-servers", "h:1", "stats"], "needs both --bootstrap-servers and --topic"),
            (["--cache", "C", "stats"], "--cache needs --bootstrap-servers and --topic"),
            (["--codec", "nope", "get", "k"], "unknown codec 'nope'"),
            (["get"], "the following arguments are required: key"),
            (["put", "k"], "put needs KEY and VALUE"),
            (["put", "k", "{not json"], "VALUE is not valid JSON"),
            (["put", "--raw", "k", "v"], "with --raw the value is read from stdin"),
            (["scan", "--limit", "-1"], "invalid non-negative integer value"),
            (["demo", "--records", "0"], "invalid positive integer value"),
            (["--data", "D", "demo"], "demo runs on its own embedded data directory"),
            (["--timeout", "soon", "stats"], "invalid positive number of seconds value"),
        ],
        ids=lambda v: " ".join(v) if isinstance(v, list) else None,
    )
    def test_missing_or_bad_options_are_one_line(
        self,
        argv: list[str],
        message: str,
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        monkeypatch.chdir(tmp_path)
        fails(capsys, main(argv), message)
        assert list(tmp_path.iterdir()) == []

    def test_help_documents_the_exit_codes(self, capsys: pytest.CaptureFixture[str]) -> None:
        assert main(["--help"]) == 0
        help_text = " ".join(capsys.readouterr().out.split())
        assert (
            "Exit codes: 0 success, 1 key not found or differences found, 2 usage error or failure"
            in help_text
        )
        assert "130 interrupted, 141 stdout closed early" in help_text
        doc = " ".join((kvlog.cli.__doc__ or "").split())
        assert "Exit codes (also in ``kvlog --help``): 0 success, 1 key not found" in doc


class TestCodec:
    def test_the_recorded_codec_is_used_when_none_is_given(
        self, run: Run, data: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A json store read with the default codec: was msgpack, which read JSON ``1`` as 49 after a rebuild."""
        with KVLog(data, codec="json", follow=False) as kv:
            kv.update({"one": 1, "doc": {"a": [1, 2]}})
        assert run("get", "one") == 0
        captured = capsys.readouterr()
        assert captured.out == "1\n" and captured.err == "", "no rebuild warning, the right value"
        assert run("put", "two", "2") == 0
        with KVLog(data, codec="json", follow=False) as kv:
            assert kv.open_replay["rebuild_reason"] is None, "the CLI left the cache bound to json"
            assert dict(kv.items()) == {"one": 1, "doc": {"a": [1, 2]}, "two": 2}

    def test_another_codec_than_the_stores_is_refused_without_a_rebuild(
        self, data: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        with KVLog(data, follow=False) as kv:
            kv["one"] = 1
        for command in (["get", "one"], ["put", "x", "1"], ["scan"], ["dump"], ["stats"]):
            code = main(["--data", str(data), "--codec", "json", *command])
            fails(capsys, code, "holds msgpack values", "--codec json would rebuild its cache", "rewarm")
        with KVLog(data, follow=False) as kv:
            assert kv.open_replay["rebuild_reason"] is None and kv.open_replay["mode"] == "warm"
            assert kv.log.end_offsets() == {0: 1}

    def test_rewarm_rebuilds_the_cache_for_the_codec_given(
        self, data: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        with KVLog(data, codec="json", follow=False) as kv:
            kv["one"] = 1
        with KVLog(data, codec="msgpack", follow=False):  # an application that got the codec wrong
            pass
        assert main(["--data", str(data), "--codec", "json", "rewarm"]) == 0
        capsys.readouterr()
        assert main(["--data", str(data), "get", "one"]) == 0
        assert capsys.readouterr().out == "1\n"

    def test_a_store_with_a_codec_the_command_lacks_is_refused(
        self, run: Run, data: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        rot = Codec("rot13", lambda v: v.encode()[::-1], lambda b: b[::-1].decode())
        with KVLog(data, codec=rot, follow=False) as kv:
            kv["k"] = "v"
        fails(capsys, run("get", "k"), "built with the codec 'rot13'")
        with KVLog(data, codec=rot, follow=False) as kv:
            assert kv.open_replay["rebuild_reason"] is None, "the application's cache is left alone"


class TestDeepValues:
    def test_a_value_too_deep_to_print_is_one_line_and_dump_load_carry_it(
        self, run: Run, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        deep: Any = "leaf"
        for _ in range(1000):  # msgpack holds 1024 levels; Python's json reaches about 990
            deep = [deep]
        with KVLog(data, follow=False) as kv:
            kv["deep"] = deep
        fails(capsys, run("get", "deep"), "nests too deeply to print as JSON", "kvlog dump")
        dump = tmp_path / "dump.jsonl"
        assert run("dump", "-o", str(dump)) == 0
        capsys.readouterr()
        assert set(json.loads(dump.read_text())) == {"key", "value_msgpack_b64"}
        fresh = tmp_path / "fresh"
        assert main(["--data", str(fresh), "load", str(dump)]) == 0
        with KVLog(fresh, follow=False) as kv:
            assert msgpack.packb(kv["deep"]) == msgpack.packb(deep)


# -- directories -----------------------------------------------------------------------------


class TestDirectories:
    @pytest.mark.parametrize(
        "command",
        [["put", "k", "1"], ["get", "k"], ["del", "k"], ["scan"], ["stats"], ["load", "-"], ["rewarm"]],
    )
    def test_a_file_where_the_data_directory_should_be_is_one_line(
        self, tmp_path: Path, command: list[str], capsys: pytest.CaptureFixture[str]
    ) -> None:
        path = tmp_path / "a-file"
        path.write_text("not a directory")
        fails(capsys, main(["--data", str(path), *command]), f"--data {path} is not a directory")
        assert path.read_text() == "not a directory"

    def test_a_file_where_the_kafka_cache_should_be_is_one_line_before_connecting(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        path = tmp_path / "a-file"
        path.write_text("")
        servers = f"127.0.0.1:{closed_port()}"
        argv = ["--cache", str(path), "--bootstrap-servers", servers, "--topic", "t", "put", "k", "1"]
        fails(capsys, main(argv), f"--cache {path} is not a directory")

    def test_read_commands_refuse_a_missing_data_directory(
        self, run: Run, data: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        for command in (["get", "k"], ["del", "k"], ["scan"], ["stats"], ["dump"], ["verify"], ["rewarm"]):
            fails(capsys, run(*command), "no kvlog data directory")
        assert not data.exists()

    def test_an_unwritable_directory_is_one_line(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A data directory that cannot be created: by permissions where they bind, else on a read-only mount."""
        parent = tmp_path / "locked"
        parent.mkdir()
        if os.geteuid() != 0:
            parent.chmod(0o500)
            try:
                fails(capsys, main(["--data", str(parent / "data"), "put", "k", "1"]), "Permission denied")
            finally:
                parent.chmod(0o700)
            return
        # root writes through 0o500: mount a read-only tmpfs in a private mount
        # namespace (nothing outside the child sees it) and run the real command there.
        if shutil.which("unshare") is None:
            pytest.skip(
                "running as root, where permissions do not stop writes, and no unshare(1) for a read-only mount"
            )
        script = (
            f'mount -t tmpfs -o ro,size=1m tmpfs "{parent}" || exit 97; '
            f'exec "{sys.executable}" -m kvlog --data "{parent}/data" put k 1'
        )
        done = subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
            capture_output=True,
            env=checkout_env(),
            timeout=120,
        )
        if done.returncode == 97 or b"unshare failed" in done.stderr:
            pytest.skip(
                f"running as root and cannot mount a read-only tmpfs here: {done.stderr.decode().strip()}"
            )
        assert done.returncode == EXIT_ERROR, done.stderr.decode()
        line = one_error_line(done.stderr.decode())
        assert "Read-only file system" in line and f"{parent}/data" in line, line
        assert list(parent.iterdir()) == []


# -- an unreachable broker ------------------------------------------------------------------


class TestUnreachableBroker:
    @pytest.mark.parametrize("command", [["get", "k"], ["put", "k", "1"], ["stats"]])
    def test_an_unreachable_broker_is_one_line_within_the_timeout(
        self, tmp_path: Path, command: list[str], capsys: pytest.CaptureFixture[str]
    ) -> None:
        servers = f"127.0.0.1:{closed_port()}"
        started = time.monotonic()
        argv = [
            "--cache",
            str(tmp_path / "c"),
            "--bootstrap-servers",
            servers,
            "--topic",
            "t",
            "--timeout",
            "1",
        ]
        code = main([*argv, *command])
        elapsed = time.monotonic() - started
        fails(capsys, code, f"no Kafka broker answered at {servers} within 1s")
        assert elapsed < 15, f"took {elapsed:.1f}s with --timeout 1"


# -- the real entry point -----------------------------------------------------------------------


class TestEntryPoint:
    def kvlog(self, *argv: str | bytes, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [sys.executable, "-m", "kvlog", *argv],
            input=stdin,
            capture_output=True,
            env=checkout_env(),
            timeout=120,
        )

    def test_bad_input_through_python_m_kvlog(self, tmp_path: Path) -> None:
        data = str(tmp_path / "data")
        servers = f"127.0.0.1:{closed_port()}"
        cases: list[tuple[list[str | bytes], str]] = [
            (["--data", data, "put", "k", "{nope"], "VALUE is not valid JSON"),
            (["--data", data, "put", "k", nested_json(50_000)], "VALUE nests too deeply"),
            (["--data", data, "put", "k" * 600, "1"], "bad KEY"),
            (["--data", data, "--codec", "nope", "get", "k"], "unknown codec 'nope'"),
            (["--bootstrap-servers", servers, "--topic", "t", "--timeout", "inf", "get", "k"], "--timeout"),
            (
                ["--bootstrap-servers", servers, "--topic", "t", "--timeout", "1", "get", "k"],
                "no Kafka broker",
            ),
            (["--data", data, "get", "k"], "no kvlog data directory"),
        ]
        for argv, message in cases:
            done = self.kvlog(*argv)
            err = done.stderr.decode()
            assert done.returncode == EXIT_ERROR, (argv, err)
            assert done.stdout == b"", argv
            line = one_error_line(err)
            assert message in line, (argv, line)
        assert not Path(data).exists()

    def test_key_bytes_that_are_not_utf8_round_trip(self, tmp_path: Path) -> None:
        data = str(tmp_path / "data")
        assert self.kvlog("--data", data, "put", b"\xff\xfe", '"raw key"').returncode == 0
        got = self.kvlog("--data", data, "get", b"\xff\xfe")
        assert got.returncode == 0 and json.loads(got.stdout) == "raw key", got.stderr
        scan = self.kvlog("--data", data, "scan")
        assert json.loads(scan.stdout) == {"key_b64": "//4=", "value": "raw key"}
        missing = self.kvlog("--data", data, "get", b"\xfe")
        assert missing.returncode == 1 and missing.stderr == b"kvlog: key not found: b'\\xfe'\n"
