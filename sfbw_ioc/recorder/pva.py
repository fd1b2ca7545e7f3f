"""A PV Access monitor on every recorded ``pva://`` PV, feeding its history as the
Channel Access monitor does.

p4p's client context runs the connections; every PV's callbacks run in one work-queue
thread of this module (in arrival order, and apart from p4p's default queues, which the
IOC's own PVA server's handlers may use). A connection is described by its first value: the
normative type's ``display`` has the units and the description, so nothing is read but
an array's largest length (``NAME.NELM`` from an IOC's QSRV). p4p subscribes again by
itself after a reconnection.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import numpy as np
from p4p import Value
from p4p.client.thread import Cancelled, Context, Disconnected, Subscription
from p4p.util import ThreadedWorkQueue

from .history import INVALID, STATUS_NAMES, PvHistory, PvInfo, Update

log = logging.getLogger(__name__)

_NELM_TIMEOUT_S = 2.0
# PVData type codes of scalars and of arrays ("a" + code); enums are NTEnum structures.
_DTYPES = {"?": "bool", "b": "int8", "B": "uint8", "h": "int16", "H": "uint16",
           "i": "int32", "I": "uint32", "l": "int64", "L": "uint64", "f": "float32",
           "d": "float64", "s": "string"}
# NTAlarm's status (NO_STATUS, DEVICE, DRIVER, RECORD, DB, CONF, UNDEFINED, CLIENT) as the
# nearest EPICS alarm status, for a server whose message is not one (QSRV's are).
_NT_STATUS = ("NO_ALARM", "READ", "COMM", "SOFT", "LINK", "SOFT", "UDF", "COMM")


def _value_code(value: Value) -> str | None:
    """The type code of ``value.value``: "e" for an enum, None for no recordable type."""
    if "value" not in value:
        return None
    code = value.type()["value"]
    if isinstance(code, str):
        return code
    names = set(code.keys())
    return "e" if {"index", "choices"} <= names else None


def dtype_of(value: Value) -> tuple[str, bool] | None:
    """The dtype of the PV's values ("string" for strings and enums) and whether it is an
    array; None when it cannot be recorded."""
    code = _value_code(value)
    if code == "e":
        return "string", False
    if code is None:
        return None
    array = code.startswith("a")
    dtype = _DTYPES.get(code[1:] if array else code)
    if dtype is None or (array and dtype == "string"):
        return None  # string arrays, variants, unions: nothing to put in a row
    return dtype, array


def info_of(value: Value, largest_count: int = 0) -> PvInfo | None:
    """A first value's ``PvInfo`` (an array as long as ``largest_count``, when known, or
    as the value); None when it cannot be recorded."""
    found = dtype_of(value)
    if found is None:
        return None
    dtype, array = found
    count = max(largest_count, len(_elements(value, dtype)), 1) if array else 1
    units = description = ""
    if "display" in value:
        display = value.display
        units = display.get("units", "")
        description = display.get("description", "")
    return PvInfo(dtype, count, units, description)


def severity_of(severity: int) -> int:
    """NTAlarm's severity, whose 4 (UNDEFINED) EPICS has not: INVALID then."""
    return severity if 0 <= severity <= INVALID else INVALID


def status_of(severity: int, status: int, message: str) -> int:
    """The EPICS alarm status: the message when it names one, else NTAlarm's status's
    nearest (an alarm without any: SOFT)."""
    name = message.strip().upper()
    for candidate in (name, name.removesuffix("_ALARM")):  # "HIHI" or "HIHI_ALARM"
        if candidate in STATUS_NAMES and candidate != "DISCONNECTED":
            return STATUS_NAMES[candidate]
    nearest = _NT_STATUS[status] if 0 <= status < len(_NT_STATUS) else "SOFT"
    if severity and nearest == "NO_ALARM":
        nearest = "SOFT"
    return STATUS_NAMES[nearest]


def update_of(value: Value, dtype: str) -> Update:
    """A monitor value as an ``Update`` of a PV of ``dtype`` (the values copied)."""
    if dtype == "string":
        recorded: np.ndarray | str = _string_of(value)
    else:
        recorded = _elements(value, dtype)
    severity, status, message = 0, 0, ""
    if "alarm" in value:
        alarm = value.alarm
        severity, status, message = alarm.severity, alarm.status, alarm.get("message", "")
    if "timeStamp" in value:
        stamp = value.timeStamp
        timestamp_ns = stamp.secondsPastEpoch * 1_000_000_000 + stamp.nanoseconds
    else:  # a structure without a time: its arrival's
        timestamp_ns = time.time_ns()
    return Update(recorded, int(timestamp_ns), severity_of(severity),
                  status_of(severity, status, message))


def _elements(value: Value, dtype: str) -> np.ndarray:
    """The value as a 1-d array, copied (p4p gives None for an empty array)."""
    elements = value.value
    return np.array([] if elements is None else elements, dtype=dtype).reshape(-1)


def _string_of(value: Value) -> str:
    if _value_code(value) != "e":
        return str(value.value)
    index, choices = value.value.index, value.value.choices
    return choices[index] if 0 <= index < len(choices) else str(index)


class PvaChannel:
    """One ``pva://`` PV's monitor callback: its history, and its type while connected."""

    def __init__(self, channel: str, history: PvHistory,
                 largest_count: Callable[[str], int]) -> None:
        self._largest_count = largest_count
        self.channel = channel
        self.history = history
        self._dtype: str | None = None
        self._described = False  # since the last connection

    def __call__(self, event: Value | Exception) -> None:
        try:
            if isinstance(event, Exception):
                self._lost(event)
            else:
                self._update(event)
        except Exception:  # one PV must not end the recording of the others
            log.exception("cannot take the update of pva://%s", self.channel)

    def _update(self, value: Value) -> None:
        if not self._described:
            self._described = True
            self._dtype = self._describe(value)
        if self._dtype is not None:
            self.history.add(update_of(value, self._dtype))

    def _describe(self, value: Value) -> str | None:
        found = dtype_of(value)
        if found is None:
            log.error("recorded PV pva://%s has type %s, which cannot be recorded",
                      self.channel, value.getID())
            return None
        largest = self._largest_count(self.channel) if found[1] else 0
        info = info_of(value, largest)
        self.history.connect(info)
        log.info("recording pva://%s (%s[%d])", self.channel, info.dtype, info.count)
        return info.dtype

    def _lost(self, error: Exception) -> None:
        if isinstance(error, Cancelled):
            return  # closed by stop()
        if not isinstance(error, Disconnected):
            log.warning("the server of pva://%s refused or ended its monitor: %s",
                        self.channel, error)
        elif self._described:
            log.warning("recorded PV pva://%s disconnected", self.channel)
        self._described = False
        self.history.disconnect()


class PvaMonitor:
    """Keeps a PV Access monitor on each PV it was asked to watch, for as long as it runs.
    Not thread-safe: the ``Recorder`` calls it under its lock."""

    def __init__(self) -> None:
        self._context: Context | None = None
        self._queue = ThreadedWorkQueue(name="pva-recorder", daemon=True)
        self._subscriptions: list[Subscription] = []

    def watch(self, pvs: Sequence[tuple[str, PvHistory]]) -> None:
        """Monitor each (name without ``pva://``, history) of ``pvs``."""
        if self._context is None:
            # nt=False: the structures themselves, with alarm, timeStamp and display.
            self._context = Context("pva", nt=False)
            self._queue.start()
        names = ", ".join(channel for channel, _ in pvs[:10])
        log.info("monitoring %d PV Access PVs to record: %s", len(pvs),
                 names + (", ..." if len(pvs) > 10 else ""))
        for channel, history in pvs:
            callback = PvaChannel(channel, history, self.largest_count)
            self._subscriptions.append(self._context.monitor(
                channel, callback, notify_disconnect=True, queue=self._queue))

    def largest_count(self, channel: str) -> int:
        """An array PV's NELM when its server has the field (an IOC's QSRV), else 0."""
        context = self._context  # None once stopped
        if context is None or "." in channel:
            return 0
        try:
            return int(context.get(f"{channel}.NELM", timeout=_NELM_TIMEOUT_S).value)
        except Exception as error:  # a server without record fields: the value's length
            log.info("no NELM for pva://%s: %s", channel, error)
            return 0

    def stop(self) -> None:
        """End every monitor (the files being written keep the histories they have)."""
        context, self._context = self._context, None
        if context is None:
            return
        for subscription in self._subscriptions:
            subscription.close()
        self._subscriptions.clear()
        context.close()
        self._queue.stop()
