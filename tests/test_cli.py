"""The ``kvlog`` command, in-process through ``main(argv)`` and once through the installed script."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from kvlog.cli import main


@pytest.fixture
def cli(tmp_path: Path, bootstrap: str, topic: str, make_kv: Any) -> Any:
    make_kv("seed")  # creates the compacted topic; the command never creates topics

    def run(*args: str) -> int:
        return main(
            ["--cache", str(tmp_path / "cli"), "--bootstrap-servers", bootstrap, "--topic", topic, *args]
        )

    return run


def test_put_get_scan_del(cli: Any, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli("put", "order:1", '{"status": "paid"}') == 0
    assert cli("put", "order:2", "[1, 2]") == 0
    capsys.readouterr()
    assert cli("get", "order:1") == 0
    assert json.loads(capsys.readouterr().out) == {"status": "paid"}
    assert cli("scan", "--prefix", "order:") == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines == [{"key": "order:1", "value": {"status": "paid"}}, {"key": "order:2", "value": [1, 2]}]
    assert cli("scan", "--limit", "1") == 0
    assert len(capsys.readouterr().out.splitlines()) == 1
    assert cli("del", "order:1") == 0
    assert cli("get", "order:1") == 1
    assert "key not found: order:1" in capsys.readouterr().err


def test_stats_json_and_text(cli: Any, capsys: pytest.CaptureFixture[str]) -> None:
    cli("put", "k", "1")
    capsys.readouterr()
    assert cli("stats", "--json") == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["entries"] == 1 and stats["total_lag"] == 0
    assert cli("stats") == 0
    out = capsys.readouterr().out
    assert "entries      1" in out and "partition" in out


def test_rewarm_prints_a_summary(cli: Any, capsys: pytest.CaptureFixture[str]) -> None:
    cli("put", "a", "1")
    cli("put", "b", "2")
    capsys.readouterr()
    assert cli("rewarm") == 0
    captured = capsys.readouterr()
    assert "rewarmed 2 entries from 2 records" in captured.out
    assert "rewarm" in captured.err, "the progress bar goes to stderr"


def test_errors_are_one_line_with_exit_2(
    cli: Any, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert cli("put", "k", "{not json") == 2
    err = capsys.readouterr().err
    assert err.startswith("kvlog: VALUE is not valid JSON") and err.count("\n") == 1
    assert main(["--cache", str(tmp_path / "x"), "stats"]) == 2
    assert "--bootstrap-servers and --topic are required" in capsys.readouterr().err
    assert main(["no-such-command"]) == 2


def test_missing_topic_is_an_error_not_a_creation(
    bootstrap: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        ["--cache", str(tmp_path / "c"), "--bootstrap-servers", bootstrap, "--topic", "never-made", "stats"]
    )
    assert code == 2
    assert "does not exist" in capsys.readouterr().err


def test_console_script_end_to_end(bootstrap: str, topic: str, make_kv: Any, tmp_path: Path) -> None:
    make_kv()["hello"] = "world"
    script = shutil.which("kvlog") or pytest.fail(
        "the kvlog console script is not installed (pip install -e .)"
    )
    env = {
        "KVLOG_BOOTSTRAP_SERVERS": bootstrap,
        "KVLOG_TOPIC": topic,
        "PATH": str(Path(sys.executable).parent),
    }
    done = subprocess.run(
        [script, "--cache", str(tmp_path / "e2e"), "get", "hello"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == "world"
    module = subprocess.run(
        [sys.executable, "-m", "kvlog", "--cache", str(tmp_path / "e2e"), "get", "nope"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert module.returncode == 1
