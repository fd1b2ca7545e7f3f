"""Kinds of PV the IOC's groups share (sfbw_ioc/ioc.py, sfbw_ioc/live.py): one
definition of what a text, pulse-id, command or statistics PV is."""
from __future__ import annotations

from typing import Any

from caproto import ChannelType, SubscriptionType
from caproto.server import PvpropertyChar, pvproperty

PATH_LENGTH = 1024


def _pulse_id_pv(doc: str, read_only: bool = False, **kwargs: Any) -> pvproperty:
    return pvproperty(value=0.0, dtype=float, precision=0, record="ai" if read_only else "ao",
                      read_only=read_only, doc=doc, **kwargs)


class TextData(PvpropertyChar):
    """A writable text PV (CHAR waveform) that takes the empty string: caproto 1.3 fails
    to convert a put of "" (its CHAR conversion hands numpy an empty str), and a client
    could then never clear a text such as CHANNELS or USER."""

    async def write_from_dbr(self, data, data_type, metadata, *, flags=0):
        if data_type == ChannelType.CHAR and not bytes(data).strip(b"\0"):
            flags |= SubscriptionType.DBE_LOG | SubscriptionType.DBE_VALUE
            return await self.write("", flags=flags)
        return await super().write_from_dbr(data, data_type, metadata, flags=flags)


def _text_pv(doc: str, read_only: bool = False, max_length: int = PATH_LENGTH,
             value: str = "", **kwargs: Any) -> pvproperty:
    return pvproperty(value=value, dtype=ChannelType.CHAR if read_only else TextData, max_length=max_length,
                      string_encoding="utf-8", record="waveform",
                      read_only=read_only, doc=doc, **kwargs)


def _command_pv(doc: str) -> pvproperty:
    return pvproperty(value="Done", dtype=ChannelType.ENUM, enum_strings=("Done", "Do"),
                      record="bo", doc=doc)


def _stat_pv(doc: str, units: str = "", precision: int = 0) -> pvproperty:
    # float64 rather than LONG: counters and byte sizes outgrow int32 on a 24/7 IOC.
    return pvproperty(value=0.0, dtype=float, precision=precision, units=units, record="ai",
                      read_only=True, alarm_group="stats", doc=doc)


class PutRejected(Exception):
    """Raised from a putter so the client gets a put failure; the text is in MESSAGE."""


async def write_if_changed(pv, value: Any) -> None:
    """Write ``value`` unless the PV has it already: no monitor update for nothing."""
    if pv.value != value:
        await pv.write(value)
