"""Helpers shared by the tests of the ``kvlog`` command: fixtures, environments, error-line checks.

The fixtures (``data``, ``run`` and an autouse one that clears Kafka
settings from the environment) are imported into each test module that uses
them: pytest registers a fixture found in a test module's namespace, under the
name its decorator gives, so a test's ``run`` parameter does not shadow the
imported function.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

import kvlog
from kvlog.cli import main

#: ``run(*argv)``: the ``kvlog`` command on a test's data directory, returning its exit code.
Run = Callable[..., int]

_KAFKA_VARIABLES = ("KVLOG_BOOTSTRAP_SERVERS", "KVLOG_TOPIC")


@pytest.fixture(name="no_kafka_from_the_environment", autouse=True)
def fixture_no_kafka_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Kafka settings in the developer's environment would point the command at a topic."""
    for name in _KAFKA_VARIABLES:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(name="data")
def fixture_data(tmp_path: Path) -> Path:
    """An embedded data directory (not created: ``put``/``load`` create it)."""
    return tmp_path / "data"


@pytest.fixture(name="run")
def fixture_run(data: Path) -> Run:
    """``run("get", "k")`` is ``kvlog --data DATA get k``."""

    def run(*args: str) -> int:
        return main(["--data", str(data), *args])

    return run


def clean_env(**extra: str) -> dict[str, str]:
    """The test's environment for a ``kvlog`` subprocess: no Kafka settings, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in _KAFKA_VARIABLES}
    env.update(extra)
    return env


def checkout_env() -> dict[str, str]:
    """``clean_env()`` with this checkout's kvlog first on the path, for ``python -m kvlog``."""
    env = clean_env()
    root = str(Path(kvlog.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def one_line(err: str) -> str:
    """The one line a command printed on stderr; fails on a traceback or several lines."""
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1, err
    return lines[0]


def one_error_line(err: str) -> str:
    """The one line an expected failure prints; fails on a traceback, a warning or several lines."""
    line = one_line(err)
    assert line.startswith("kvlog: error: "), line
    return line
