"""The development broker's exception, and the log tails its messages carry."""

from __future__ import annotations

import os
import re
from pathlib import Path

_TAIL_LINES = 30
_ANSI_RE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class DevBrokerError(RuntimeError):
    """The development broker could not be fetched, started or stopped.

    The message is meant for humans: its first line is a summary, and any further lines name
    the missing tool or hold the tail of the relevant log, so the cause is visible without
    digging through files.
    """


def _tail_text(text: str, lines: int = _TAIL_LINES) -> str:
    """The last *lines* lines of *text*, without terminal escape codes."""
    # mvn colours its output even in batch mode; escape codes would garble error messages.
    text = _ANSI_RE.sub("", text)
    return "\n".join(text.rstrip().splitlines()[-lines:])


def _file_tail(path: Path, lines: int = _TAIL_LINES) -> str:
    """The last *lines* lines of the file at *path*, or a note that it is missing or empty."""
    try:
        with open(path, "rb") as f:
            # Only the end matters, and a broker log can be large.
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            data = f.read().decode(errors="replace")
    except FileNotFoundError:
        return "(file does not exist)"
    return _tail_text(data, lines) or "(empty)"
