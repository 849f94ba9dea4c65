"""The ``kvlog`` command end to end, through the INSTALLED console script (``pip install -e .``)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cli_helpers import clean_env


@pytest.fixture
def kvlog_script() -> str:
    script = shutil.which("kvlog")
    if script is None:
        pytest.fail("the kvlog console script is not installed (pip install -e .)")
    return script


def kvlog(
    *argv: str, cwd: Path | None = None, env: dict[str, str] | None = None, stdin: bytes | None = None
) -> Any:
    return subprocess.run(
        list(argv), cwd=cwd, env=env or clean_env(), input=stdin, capture_output=True, timeout=120
    )


def test_demo_runs_on_the_embedded_log_and_cleans_up(kvlog_script: str, tmp_path: Path) -> None:
    done = kvlog(kvlog_script, "demo", "--records", "2000", cwd=tmp_path, env=clean_env(TMPDIR=str(tmp_path)))
    out, err = done.stdout.decode(), done.stderr.decode()
    assert done.returncode == 0, err
    assert "2,000 orders in an embedded kvlog database" in out
    for step in (
        r"1\. write 2,000 orders through the log .* [\d,]+ records/s",
        r"2\. read all 2,000 keys back from the cache, each checked .* [\d,]+ reads/s",
        r"3\. delete the cache directory ",
        r"4\. reopen: cold rebuild of the cache by replaying 2,000 records .* records/s",
        r"5\. check the rebuilt cache: all 2,000 orders identical",
        r"entries\s+2,000",
        r"done in [\d.]+s",
    ):
        assert re.search(step, out), (step, out)
    assert "replay: 100%" in err, "the cold rebuild shows its progress bar on stderr"
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == [], "the temporary data directory is removed, and ./data never made"


def test_demo_keeps_a_directory_it_was_given(kvlog_script: str, tmp_path: Path) -> None:
    target = tmp_path / "demo"
    done = kvlog(kvlog_script, "demo", "--records", "100", "--dir", str(target))
    assert done.returncode == 0, done.stderr.decode()
    assert f"try: kvlog --data {target} get order:000042" in done.stdout.decode()
    got = kvlog(kvlog_script, "--data", str(target), "get", "order:000042")
    assert got.returncode == 0, got.stderr.decode()
    assert set(json.loads(got.stdout)) == {"customer", "status", "total", "items"}


def test_put_get_round_trip_through_the_console_script(kvlog_script: str, tmp_path: Path) -> None:
    data = str(tmp_path / "data")
    put = kvlog(kvlog_script, "--data", data, "put", "order:42", '{"status": "paid", "total": 12.5}')
    assert put.returncode == 0, put.stderr.decode()
    got = kvlog(kvlog_script, "--data", data, "get", "order:42")
    assert got.returncode == 0, got.stderr.decode()
    assert json.loads(got.stdout) == {"status": "paid", "total": 12.5}
    blob = bytes(range(256))
    assert kvlog(kvlog_script, "--data", data, "put", "--raw", "blob", stdin=blob).returncode == 0
    assert kvlog(kvlog_script, "--data", data, "get", "--raw", "blob").stdout == blob
    missing = kvlog(kvlog_script, "--data", data, "get", "nope")
    assert missing.returncode == 1
    assert missing.stderr.decode() == "kvlog: key not found: nope\n"
    module = kvlog(sys.executable, "-m", "kvlog", "--data", data, "get", "order:42")
    assert module.returncode == 0 and json.loads(module.stdout)["total"] == 12.5, (
        "python -m kvlog is the same"
    )


def test_a_usage_error_is_one_line_without_traceback(kvlog_script: str, tmp_path: Path) -> None:
    done = kvlog(kvlog_script, "--data", str(tmp_path / "d"), "--topic", "orders", "get", "k")
    assert done.returncode == 2
    assert done.stderr.decode().count("\n") == 1 and done.stderr.startswith(b"kvlog: error: ")


def test_console_script_against_kafka(
    kvlog_script: str, bootstrap: str, topic: str, make_kv: Any, tmp_path: Path
) -> None:
    make_kv()["hello"] = "world"
    env = clean_env(KVLOG_BOOTSTRAP_SERVERS=bootstrap, KVLOG_TOPIC=topic)
    done = kvlog(kvlog_script, "--cache", str(tmp_path / "e2e"), "get", "hello", env=env)
    assert done.returncode == 0, done.stderr.decode()
    assert json.loads(done.stdout) == "world"
    module = kvlog(sys.executable, "-m", "kvlog", "--cache", str(tmp_path / "e2e"), "get", "nope", env=env)
    assert module.returncode == 1
