"""Kinds of PV the IOC's groups share (sfbw_ioc/ioc.py, sfbw_ioc/live.py): one
definition of what a text, pulse-id, command or statistics PV is."""
from __future__ import annotations

from typing import Any

from caproto import ChannelType
from caproto.server import pvproperty

PATH_LENGTH = 1024


def _pulse_id_pv(doc: str, read_only: bool = False, **kwargs: Any) -> pvproperty:
    return pvproperty(value=0.0, dtype=float, precision=0, record="ai" if read_only else "ao",
                      read_only=read_only, doc=doc, **kwargs)


def _text_pv(doc: str, read_only: bool = False, max_length: int = PATH_LENGTH,
             value: str = "", **kwargs: Any) -> pvproperty:
    return pvproperty(value=value, dtype=ChannelType.CHAR, max_length=max_length,
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
