"""``/epics``: the recorded PVs' values on the file's pulse-id axis.

::

    /epics/<PV name or alias>/value       the PV's type; strings and enums as strings,
                                          arrays as rows (padded; ``length`` says how far)
    /epics/<PV name or alias>/timestamp   float64 (N,), the EPICS timestamp in seconds
    /epics/<PV name or alias>/pulse_id    int64 (N,), the last pulse whose global
                                          timestamp is at or before the update's
    /epics/<PV name or alias>/severity    enum (NO_ALARM, MINOR, MAJOR, INVALID)
    /epics/<PV name or alias>/status      enum (EPICS alarm status, or DISCONNECTED)
    attributes: source (the PV name), units, description

Row 0 is the value current at the file's first pulse; its pulse_id is the first pulse's
even when its timestamp is older (the value was set before the file began), so the value
at pulse p is always the last row whose pulse_id <= p. Then every update up to the file's
last pulse. A PV not connected at the first pulse, or losing its connection, has a row of
severity INVALID and status DISCONNECTED (value NaN, 0 or ""). Rows reach the file at each
flush, up to the newest pulse written: nothing is done per message.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import h5py
import numpy as np

from ..recorder.history import (DISCONNECTED, INVALID, SEVERITY_NAMES, STATUS_NAMES,
                                PvHistory, PvInfo, Timed, Update)
from ..recorder.names import RecordedPv
from .rows import Rows

log = logging.getLogger(__name__)

EPICS_GROUP = "epics"
_CHUNK_ROWS = 64  # hundreds of PVs, most with few updates: small chunks waste little
_STRING = h5py.string_dtype("utf-8")
_SEVERITY = h5py.enum_dtype(SEVERITY_NAMES, basetype=np.uint8)
_STATUS = h5py.enum_dtype(STATUS_NAMES, basetype=np.uint8)
_UNKNOWN = PvInfo("float64", 1)  # the value of a PV never connected so far


def align(times_ns: np.ndarray, pulse_times_ns: np.ndarray,
          pulse_ids: np.ndarray) -> np.ndarray:
    """For each time, the pulse id of the last pulse at or before it (the first pulse
    for a time before every pulse). Pulse times are taken as never decreasing."""
    ordered = np.maximum.accumulate(pulse_times_ns)
    index = np.searchsorted(ordered, times_ns, side="right") - 1
    return pulse_ids[np.clip(index, 0, None)]


def first_rows(history: PvHistory, first_pulse_ns: int) -> tuple[list[Timed], int]:
    """Row 0 (the update current at the first pulse, or a DISCONNECTED row when none is
    known) and the number of the next update to write."""
    current = history.current_at(first_pulse_ns)
    if current is None:
        return [Timed(-1, first_pulse_ns, Update(None, first_pulse_ns, INVALID,
                                                 DISCONNECTED))], 0
    return [current], current.seq + 1


@dataclass(eq=False)
class _PvDatasets:
    pv: RecordedPv
    history: PvHistory
    group: h5py.Group
    info: PvInfo
    datasets: dict[str, Rows] = field(default_factory=dict)
    next_seq: int | None = None  # None: row 0 not written yet
    row_times: list[int] = field(default_factory=list)  # alignment time of each row
    row_seqs: list[int] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return len(self.row_times)

    def needs_value(self) -> bool:
        """The PV connected with a type its ``value`` dataset does not have (made when
        its type was unknown): it must be made anew, an object created."""
        info = self.history.info
        return info is not None and (self.info is _UNKNOWN or (info.dtype, info.count)
                                     != (self.info.dtype, self.info.count))


class EpicsRecording:
    """The ``/epics`` groups of one file, written at each flush."""

    def __init__(self, h5: h5py.File, pvs: Sequence[tuple[RecordedPv, PvHistory]]) -> None:
        group = h5.require_group(EPICS_GROUP)
        self._pvs = [self._create(group, pv, history) for pv, history in pvs]

    @staticmethod
    def _create(parent: h5py.Group, pv: RecordedPv, history: PvHistory) -> _PvDatasets:
        group = parent.create_group(pv.label)
        group.attrs["source"] = pv.name
        info = history.info or _UNKNOWN
        group.attrs["units"] = info.units
        group.attrs["description"] = info.description
        entry = _PvDatasets(pv, history, group, info)
        for name, dtype in (("timestamp", np.float64), ("pulse_id", np.int64),
                            ("severity", _SEVERITY), ("status", _STATUS)):
            entry.datasets[name] = _rows(group, name, dtype, ())
        _create_value(entry, info)
        return entry

    def not_connected(self) -> list[str]:
        return [entry.pv.name for entry in self._pvs if not entry.history.connected]

    def needs_objects(self) -> bool:
        return any(entry.needs_value() for entry in self._pvs)

    def write(self, pulse_ids: np.ndarray, pulse_times_ns: np.ndarray) -> None:
        """Add every update up to the last pulse (at least row 0 of each PV)."""
        if not len(pulse_ids):
            return
        for entry in self._pvs:
            if entry.needs_value():
                _recreate_value(entry)
            if entry.next_seq is None:
                timed, entry.next_seq = first_rows(entry.history, int(pulse_times_ns[0]))
            else:
                timed = []
            timed += entry.history.after(entry.next_seq, int(pulse_times_ns[-1]))
            if timed:
                _append(entry, timed, pulse_ids, pulse_times_ns)
                entry.next_seq = max(entry.next_seq, timed[-1].seq + 1)

    def truncate(self, last_pulse_ns: int | None) -> None:
        """Drop the rows past a pulse time (None: all): the file's rows were cut."""
        for entry in self._pvs:
            keep = 0 if last_pulse_ns is None else int(
                np.searchsorted(entry.row_times, last_pulse_ns, side="right"))
            if keep == entry.rows:
                continue
            entry.next_seq = None if keep == 0 else entry.row_seqs[keep - 1] + 1
            del entry.row_times[keep:], entry.row_seqs[keep:]
            for rows in entry.datasets.values():
                rows.resize(keep)

    def reattach(self, h5: h5py.File) -> None:
        """Take the datasets from ``h5``, the same file opened anew."""
        for entry in self._pvs:
            entry.group = h5[EPICS_GROUP][entry.pv.label]
            entry.datasets = {name: Rows(entry.group[name]) for name in entry.datasets}

    def finish(self) -> None:
        """Note in the file which PVs were not connected at its end."""
        for entry in self._pvs:
            entry.group.attrs["connected_at_end"] = entry.history.connected


def _rows(group: h5py.Group, name: str, dtype, row_shape: tuple[int, ...]) -> Rows:
    return Rows(group.create_dataset(name, shape=(0,) + row_shape, dtype=dtype,
                                     maxshape=(None,) + row_shape,
                                     chunks=(_CHUNK_ROWS,) + row_shape))


def _create_value(entry: _PvDatasets, info: PvInfo) -> None:
    entry.info = info
    dtype = _STRING if info.dtype == "string" else np.dtype(info.dtype)
    row_shape = (info.count,) if info.count > 1 and info.dtype != "string" else ()
    entry.datasets["value"] = _rows(entry.group, "value", dtype, row_shape)
    if row_shape:
        entry.datasets["length"] = _rows(entry.group, "length", np.int32, ())


def _recreate_value(entry: _PvDatasets) -> None:
    """A new ``value`` of the type the PV has now; the rows before keep their fill (they
    were of a PV never connected) or, after a change of type at the IOC, are lost."""
    info = entry.history.info
    assert info is not None
    if entry.info is not _UNKNOWN and entry.rows:
        log.warning("%s changed its type from %s[%d] to %s[%d]: its earlier values are "
                    "dropped from the file", entry.pv.name, entry.info.dtype,
                    entry.info.count, info.dtype, info.count)
    for name in ("value", "length"):
        if name in entry.datasets:
            del entry.group[name]
            del entry.datasets[name]
    _create_value(entry, info)
    entry.group.attrs["units"] = info.units
    entry.group.attrs["description"] = info.description
    if entry.rows:
        _write_values(entry, 0, [Update(None, 0, INVALID, DISCONNECTED)] * entry.rows)


def _append(entry: _PvDatasets, timed: list[Timed], pulse_ids: np.ndarray,
            pulse_times_ns: np.ndarray) -> None:
    first = entry.rows
    times = np.array([t.time_ns for t in timed], dtype=np.int64)
    updates = [t.update for t in timed]
    columns = {
        "timestamp": np.array([u.timestamp_ns for u in updates], dtype=np.float64) / 1e9,
        "pulse_id": align(times, pulse_times_ns, pulse_ids).astype(np.int64),
        "severity": np.array([u.severity for u in updates], dtype=np.uint8),
        "status": np.array([u.status for u in updates], dtype=np.uint8),
    }
    for name, values in columns.items():
        entry.datasets[name].write(first, values)
    _write_values(entry, first, updates)
    entry.row_times.extend(times.tolist())
    entry.row_seqs.extend(t.seq for t in timed)


def _write_values(entry: _PvDatasets, first: int, updates: list[Update]) -> None:
    value = entry.datasets["value"]
    if entry.info.dtype == "string":
        strings = np.array([u.value if isinstance(u.value, str) else "" for u in updates],
                           dtype=object)
        value.resize(first + len(strings))
        value.dataset[first:first + len(strings)] = strings
        return
    dtype = np.dtype(entry.info.dtype)
    fill = np.nan if dtype.kind == "f" else 0
    block = np.full((len(updates), entry.info.count), fill, dtype=dtype)
    lengths = np.zeros(len(updates), dtype=np.int32)
    for row, update in enumerate(updates):
        if isinstance(update.value, np.ndarray):
            # A changed element count is cut or padded: the row keeps its shape.
            values = update.value.reshape(-1)[:entry.info.count]
            block[row, :len(values)] = values
            lengths[row] = len(values)
    if "length" in entry.datasets:
        value.write(first, block)
        entry.datasets["length"].write(first, lengths)
    else:
        value.write(first, block[:, 0])
