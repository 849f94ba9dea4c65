"""Terminal support for the ``kvlog`` command: Ctrl-C and SIGTERM handling, progress bars, rates and offsets.

Signals: a command runs :func:`interruptible` (SIGTERM unwinds like Ctrl-C)
and closes its store under :func:`signals_ignored`. Progress: tqdm bars on
stderr, :class:`ReplayBar` for a replay over log offsets, :func:`count_bar`
for a count of records. Not part of kvlog's library API.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any

__all__ = ["ReplayBar", "count_bar", "interruptible", "offsets", "rate", "signal_handlers", "signals_ignored"]


# -- signals --------------------------------------------------------------------


@contextlib.contextmanager
def signal_handlers(handler: Any) -> Iterator[None]:
    """Install ``handler`` for SIGINT and SIGTERM while inside; restore the previous ones after.

    A signal the process was started with ignored (SIGINT of a background job
    in a non-interactive shell) stays ignored. Outside the main thread, where
    handlers cannot be installed, nothing changes.
    """
    if threading.current_thread() is not threading.main_thread():  # signal.signal works only there
        yield
        return
    previous: dict[signal.Signals, Any] = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(signum) is signal.SIG_IGN:
            continue
        previous[signum] = signal.signal(signum, handler)
    try:
        yield
    finally:
        for restored, old in previous.items():
            signal.signal(restored, signal.SIG_DFL if old is None else old)


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def interruptible() -> contextlib.AbstractContextManager[None]:
    """SIGTERM, like Ctrl-C, raises KeyboardInterrupt: the command unwinds and closes its store."""
    return signal_handlers(_raise_interrupt)


def signals_ignored() -> contextlib.AbstractContextManager[None]:
    """Closing a store is not interrupted by a second Ctrl-C (it would leave the log lock behind)."""
    return signal_handlers(signal.SIG_IGN)


# -- progress -------------------------------------------------------------------


class ReplayBar:
    """A tqdm bar on stderr over log offsets, fed by the store's ``progress(applied, target)`` callbacks.

    Offsets have gaps after compaction, so the bar counts offsets, not records:
    its total is the distance from the first positions seen to the target,
    which is what makes the rate and the ETA honest. ``first``, ``applied`` and
    ``target`` keep the positions seen, for the command's summary.
    """

    def __init__(self, desc: str, *, delay: float = 0.0) -> None:
        self.desc = desc
        self.delay = delay
        self.first: dict[int, int] | None = None
        self.applied: dict[int, int] = {}
        self.target: dict[int, int] = {}
        self._bar: Any = None
        self._base = 0

    def __call__(self, applied: dict[int, int], target: dict[int, int]) -> None:
        self.applied, self.target = dict(applied), dict(target)
        if self.first is None:
            self.first = dict(applied)
            self._base = sum(applied.get(p, 0) for p in target)
            self._bar = count_bar(self.desc, self._total(), delay=self.delay)
        total = self._total()
        if total != self._bar.total:
            self._bar.total = total
        done = min(total, sum(applied.get(p, 0) for p in target) - self._base)
        self._bar.update(done - self._bar.n)

    def _total(self) -> int:
        return max(0, sum(self.target.values()) - self._base)

    def finish(self) -> None:
        """Fill the bar (the last callback comes before the last batch) and close it."""
        if self._bar is not None:
            self.applied = dict(self.target)
            self._bar.update(self._total() - self._bar.n)
        self.close()

    def close(self) -> None:
        """Close the bar, if it was shown; closing again does nothing."""
        if self._bar is not None:
            self._bar.close()


def count_bar(desc: str, total: int | None, *, delay: float = 0.0) -> Any:
    """A tqdm bar on stderr counting records (``total=None``: no total known), shown after ``delay`` seconds."""
    from tqdm import tqdm

    return tqdm(
        total=total,
        desc=desc,
        unit="rec",
        # 1.2M rather than 1234567; but 12, not 12.0
        unit_scale=total is None or total >= 1000,
        file=sys.stderr,
        delay=delay,
        dynamic_ncols=True,
    )


def rate(count: float, seconds: float) -> str:
    """``count / seconds`` for a summary line, ``1,234`` style; ``-`` when no time passed."""
    return f"{count / seconds:,.0f}" if seconds > 0 else "-"


def offsets(positions: dict[int, int], target: dict[int, int] | None = None) -> str:
    """``offset 5 of 9`` for one partition, ``offsets 0:5/9, 1:3/4`` for several."""
    if len(positions) == 1 and (target is None or len(target) == 1):
        ((p, position),) = positions.items()
        return f"offset {position}" + ("" if target is None else f" of {target.get(p, position)}")
    parts = [
        f"{p}:{position}" + ("" if target is None else f"/{target.get(p, position)}")
        for p, position in sorted(positions.items())
    ]
    return "offsets " + ", ".join(parts)
