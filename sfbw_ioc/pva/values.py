"""A caproto PV as PV Access sees it: the normative type (NTScalar, NTScalarArray,
NTEnum with alarm, timeStamp, display and control) made from the PV's type and kind, its
value as a p4p ``Value``, and a put's ``Value`` as the value caproto's write takes.

Whole-number PVs (``kinds.WholeNumber``: pulse ids, counters) are float64 over Channel
Access and int64 here; text in CHAR waveforms is a string here.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from caproto import AlarmStatus, ChannelChar, ChannelData, ChannelType
from p4p import Type, Value
from p4p.nt import NTEnum, NTScalar

from ..pvs.kinds import WholeNumber

# The EPICS epoch (1990-01-01) in POSIX seconds: caproto stamps from it, PVA from 1970.
_EPICS_EPOCH_POSIX_S = 631_152_000
# PVA's alarm.status for an alarm a record raised (CA's status goes to alarm.message).
_PVA_RECORD_STATUS = 3
_CODES = {ChannelType.DOUBLE: "d", ChannelType.FLOAT: "f", ChannelType.LONG: "i",
          ChannelType.INT: "h", ChannelType.CHAR: "B", ChannelType.STRING: "s"}


def is_text(channel: ChannelData) -> bool:
    """A CHAR waveform carrying a string (caproto's ``dtype=str``/string_encoding)."""
    return isinstance(channel, ChannelChar)


def pva_stamp_from_epics(stamp: tuple[int, int]) -> dict[str, int]:
    """(seconds, nanoseconds) since the EPICS epoch -> a PVA time_t."""
    return {"secondsPastEpoch": stamp[0] + _EPICS_EPOCH_POSIX_S, "nanoseconds": stamp[1]}


def pva_stamp(channel: ChannelData) -> dict[str, int]:
    stamp = channel.epics_timestamp
    return pva_stamp_from_epics((stamp.secondsSinceEpoch, stamp.nanoSeconds))


def _alarm(channel: ChannelData) -> dict[str, Any]:
    status = int(channel.status)
    message = channel.alarm.alarm_string or (AlarmStatus(status).name if status else "")
    return {"severity": int(channel.severity),
            "status": _PVA_RECORD_STATUS if status else 0, "message": message}


class Shape:
    """How one caproto PV is carried over PVA, both ways."""

    def __init__(self, channel: ChannelData) -> None:
        self.enum = channel.data_type == ChannelType.ENUM
        self.text = is_text(channel)
        self.whole = isinstance(channel, WholeNumber)
        self.array = not (self.enum or self.text) and channel.max_length > 1
        self.numeric = not (self.enum or self.text
                            or channel.data_type == ChannelType.STRING)
        if self.enum:
            self.code = "i"
            self.type: Type = NTEnum.buildType(display=True)
            return
        self.code = "s" if self.text else "l" if self.whole else _CODES[channel.data_type]
        self.type = NTScalar.buildType(("a" if self.array else "") + self.code, display=True,
                                       control=self.numeric, form=self.numeric)

    # ---- caproto -> PVA -----------------------------------------------------------------

    def value(self, channel: ChannelData) -> Value:
        """The PV's value, alarm, time stamp and metadata, every field."""
        fields: dict[str, Any] = {"value": self._pva_value(channel.value, channel),
                                  "alarm": _alarm(channel), "timeStamp": pva_stamp(channel)}
        fields["display"] = self._display(channel)
        if self.numeric:
            fields["control"] = {"limitLow": self._limit(channel.lower_ctrl_limit),
                                 "limitHigh": self._limit(channel.upper_ctrl_limit)}
        return Value(self.type, fields)

    def _pva_value(self, value: Any, channel: ChannelData) -> Any:
        if self.enum:
            choices = list(channel.enum_strings)
            return {"index": choices.index(value) if value in choices else 0,
                    "choices": choices}
        if self.text:
            return str(value)
        if self.array:
            return np.asarray(value, dtype=np.dtype(self.code)).reshape(-1)
        # A whole number that came as float64 (a CA put) is exact below 2**53.
        return int(value) if self.whole or self.code in "ih" else value

    def _limit(self, limit: float) -> Any:
        return int(limit) if self.whole or self.code in "ihB" else float(limit)

    def _display(self, channel: ChannelData) -> dict[str, Any]:
        display: dict[str, Any] = {"description": channel.__doc__ or "",
                                   "units": getattr(channel, "units", "") or ""}
        if self.numeric or self.enum:
            display["limitLow"] = self._limit(getattr(channel, "lower_disp_limit", 0))
            display["limitHigh"] = self._limit(getattr(channel, "upper_disp_limit", 0))
        if self.numeric:
            display["precision"] = int(getattr(channel, "precision", 0) or 0)
        return display

    # ---- PVA -> caproto -----------------------------------------------------------------

    def put_value(self, channel: ChannelData, put: Value) -> Any:
        """What ``channel.write`` takes for a put of ``put`` (ValueError when it is not
        one of the PV's values)."""
        if self.enum:
            index = put["value.index"]
            choices = list(channel.enum_strings)
            if not 0 <= index < len(choices):
                raise ValueError(f"{index} is not an index of {choices}")
            return choices[index]
        value = put["value"]
        if self.text:
            return str(value)
        if self.array:
            return np.asarray(value)
        if self.whole:
            # An int (exact) when the client sent one; a float stays a float, so the
            # putter's checks see what was asked for.
            return int(value) if isinstance(value, (int, np.integer)) else float(value)
        return value
