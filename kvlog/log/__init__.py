"""The logs a store can mirror, behind one interface.

:mod:`kvlog.log.base` defines the interface (:class:`Log`, :class:`LogReader`,
:class:`Record`); :mod:`kvlog.log.local` is the embedded log and
:mod:`kvlog.log.kafka` a compacted Kafka topic. The interface and
:class:`~kvlog.errors.PositionOutOfRangeError` are re-exported here.
"""

from __future__ import annotations

from ..errors import PositionOutOfRangeError
from .base import Log, LogReader, Record, oversize_record, partitions_changed_error

__all__ = [
    "Log",
    "LogReader",
    "PositionOutOfRangeError",
    "Record",
    "oversize_record",
    "partitions_changed_error",
]
