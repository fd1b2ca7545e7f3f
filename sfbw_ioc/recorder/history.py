"""One PV's recent updates, as its monitor delivered them, for the files that record it.

Every update is numbered in arrival order; a file keeps the number of the next one it
has not written. Its alignment time is the EPICS timestamp, but never earlier than the
previous update's: the first value after a reconnection can carry an old timestamp (the
record has not processed since), and a file's rows must stay in pulse-id order.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass

import numpy as np
from caproto import AlarmSeverity, AlarmStatus

INVALID = int(AlarmSeverity.INVALID_ALARM)
# EPICS has no alarm status for a lost channel: the files name it after the last one.
DISCONNECTED = max(AlarmStatus) + 1
STATUS_NAMES = {**{status.name: int(status) for status in AlarmStatus},
                "DISCONNECTED": DISCONNECTED}
SEVERITY_NAMES = {"NO_ALARM": 0, "MINOR": 1, "MAJOR": 2, "INVALID": INVALID}
# Per PV: a 10 Hz scalar keeps ~3 hours, a 1000-element waveform at 10 Hz ~100 s.
DEFAULT_BUDGET_BYTES = 8 * 2**20
DEFAULT_MAX_UPDATES = 100_000
_UPDATE_OVERHEAD = 100  # bytes of Python objects per update, about


@dataclass(frozen=True, slots=True)
class PvInfo:
    """What a connected PV is: ``dtype`` of its values ("string" for strings and enums),
    its element count, and the fields a file records as attributes."""

    dtype: str
    count: int
    units: str = ""
    description: str = ""


@dataclass(frozen=True, slots=True)
class Update:
    """A monitor update; ``value`` None for the loss of the connection."""

    value: np.ndarray | str | None
    timestamp_ns: int  # the EPICS timestamp (the IOC's clock at the loss of a connection)
    severity: int
    status: int

    @classmethod
    def disconnected(cls) -> Update:
        return cls(None, time.time_ns(), INVALID, DISCONNECTED)

    @property
    def nbytes(self) -> int:
        value = self.value
        size = value.nbytes if isinstance(value, np.ndarray) else len(value or "")
        return size + _UPDATE_OVERHEAD


@dataclass(frozen=True, slots=True)
class Timed:
    """An update with its number and its alignment time."""

    seq: int
    time_ns: int
    update: Update


class PvHistory:
    """One PV's updates, the oldest dropped beyond a byte and a count budget (the newest
    is always kept: it is the current value). Thread-safe: the monitor adds, writers read."""

    def __init__(self, name: str, budget_bytes: int = DEFAULT_BUDGET_BYTES,
                 max_updates: int = DEFAULT_MAX_UPDATES) -> None:
        self.name = name
        self._budget = budget_bytes
        self._max = max_updates
        self._lock = threading.Lock()
        self._updates: deque[Timed] = deque()
        self._bytes = 0
        self._next_seq = 0
        self._info: PvInfo | None = None
        self._connected = False

    @property
    def info(self) -> PvInfo | None:
        """As of the last connection (None before the first)."""
        return self._info

    @property
    def connected(self) -> bool:
        return self._connected

    def connect(self, info: PvInfo) -> None:
        with self._lock:
            self._info, self._connected = info, True

    def disconnect(self) -> None:
        with self._lock:
            if not self._connected:
                return
            self._connected = False
        self.add(Update.disconnected())

    def add(self, update: Update) -> None:
        with self._lock:
            previous = self._updates[-1].time_ns if self._updates else update.timestamp_ns
            self._updates.append(Timed(self._next_seq, max(previous, update.timestamp_ns),
                                       update))
            self._next_seq += 1
            self._bytes += update.nbytes
            while len(self._updates) > 1 and (self._bytes > self._budget
                                              or len(self._updates) > self._max):
                self._bytes -= self._updates.popleft().update.nbytes

    def current_at(self, time_ns: int) -> Timed | None:
        """The update current at ``time_ns``: the last one aligned at or before it; None
        when there is none (not known yet then, or dropped from the history)."""
        with self._lock:
            current = None
            for timed in self._updates:
                if timed.time_ns > time_ns:
                    break
                current = timed
            return current

    def after(self, seq: int, until_ns: int) -> list[Timed]:
        """The updates from number ``seq`` on, aligned at or before ``until_ns``."""
        with self._lock:
            if not self._updates:
                return []
            start = max(0, seq - self._updates[0].seq)
            found = []
            for index in range(start, len(self._updates)):
                timed = self._updates[index]
                if timed.time_ns > until_ns:
                    break
                found.append(timed)
            return found

    @property
    def next_seq(self) -> int:
        with self._lock:
            return self._next_seq
