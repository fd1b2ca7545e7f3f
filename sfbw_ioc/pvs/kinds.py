"""PV definitions shared by the IOC and the group IOC: one look for the same kind of PV."""
from __future__ import annotations

import math
from typing import Any

from caproto import MAX_SUBSCRIPTION_BACKLOG, ChannelType, SubscriptionType
from caproto.server import PVGroup, PvpropertyChar, PvpropertyData, pvproperty
from caproto.server.server import PvpropertyDouble, PvpropertyDoubleRO

PATH_LENGTH = 1024
# Pulse ids travel as float64 over Channel Access (it has no 64-bit integer): exact below
# 2**53. PV Access carries them as int64: a whole number put there is exact up to 2**63.
MAX_PULSE_ID = 2**53
# For a client that reads a monitor slower than the PV changes, caproto queues the
# updates, up to the PV's subscription backlog, and then drops the oldest. Its default
# of 1000 updates is 4 GiB per slow client of a 4 MiB image (caproto warns at start
# and cuts such backlogs by a rule of its own). A big PV is read for its newest value
# (a frame, a waveform on a display, a channel list): about this much is queued per slow
# client and PV, and such a client misses values in between, never the newest one.
SLOW_CLIENT_BYTES = 2**20


def subscription_backlog(update_bytes: int) -> int:
    """The backlog of a PV whose updates are up to ``update_bytes``: as many as fit in
    SLOW_CLIENT_BYTES, at least one; at most caproto's default, so that a small PV (a
    MESSAGE) keeps every update for a client that logs them."""
    return max(1, min(MAX_SUBSCRIPTION_BACKLOG, SLOW_CLIENT_BYTES // update_bytes))


MAX_INT64_PULSE_ID = 2**63


class WholeNumber:
    """Marks a float64 PV whose values are whole numbers (pulse ids, counters): the PV
    Access server serves it as int64, exact where float64 is not."""


class WholeNumberData(WholeNumber, PvpropertyDouble):
    pass


class WholeNumberDataRO(WholeNumber, PvpropertyDoubleRO):
    pass


def _whole_number_dtype(read_only: bool) -> type[PvpropertyDouble]:
    return WholeNumberDataRO if read_only else WholeNumberData


def pulse_id_pv(doc: str, read_only: bool = False, **kwargs: Any) -> pvproperty:
    return pvproperty(value=0.0, dtype=_whole_number_dtype(read_only), precision=0,
                      record="ai" if read_only else "ao", read_only=read_only, doc=doc,
                      **kwargs)


class TextData(PvpropertyChar):
    """A writable text PV (CHAR waveform) that takes the empty string: caproto 1.3 fails
    to convert a put of "" (its CHAR conversion hands numpy an empty str), and a client
    could then never clear a text such as CHANNELS or USER."""

    async def write_from_dbr(self, data, data_type, metadata, *, flags=0):
        if data_type == ChannelType.CHAR and not bytes(data).strip(b"\0"):
            flags |= SubscriptionType.DBE_LOG | SubscriptionType.DBE_VALUE
            return await self.write("", flags=flags)
        return await super().write_from_dbr(data, data_type, metadata, flags=flags)


def text_pv(doc: str, read_only: bool = False, max_length: int = PATH_LENGTH,
            value: str = "", **kwargs: Any) -> pvproperty:
    # A long text (a channel list of up to 256 KiB) changes on a put or with the stream's
    # channels, and is read whole: a few queued updates suffice.
    return pvproperty(value=value, dtype=ChannelType.CHAR if read_only else TextData,
                      max_length=max_length,
                      string_encoding="utf-8", record="waveform",
                      max_subscription_backlog=subscription_backlog(max_length),
                      read_only=read_only, doc=doc, **kwargs)


def command_pv(doc: str) -> pvproperty:
    return pvproperty(value="Done", dtype=ChannelType.ENUM, enum_strings=("Done", "Do"),
                      record="bo", doc=doc)


def stat_pv(doc: str, units: str = "", precision: int = 0) -> pvproperty:
    # float64 rather than LONG: counters and byte sizes outgrow int32 on a 24/7 IOC.
    dtype = _whole_number_dtype(read_only=True) if precision == 0 else float
    return pvproperty(value=0.0, dtype=dtype, precision=precision, units=units, record="ai",
                      read_only=True, alarm_group="stats", doc=doc)


def pulse_id_error(value: float | int, name: str) -> str | None:
    """Why ``value`` is not a pulse id (None when it is one): a float (Channel Access)
    must be below 2**53, where it is exact; an int (PV Access's int64) below 2**63."""
    if isinstance(value, int):
        if not 0 <= value < MAX_INT64_PULSE_ID:
            return f"{name} must be a whole number from 0 to 2**63, not {value}"
        return None
    if not math.isfinite(value) or value < 0 or value >= MAX_PULSE_ID or value != int(value):
        return f"{name} must be a whole number from 0 to 2**53, not {float(value)}"
    return None


async def fill_record_fields(group: PVGroup) -> None:
    """caproto links PREC to a PV's precision, but not DESC to its doc nor EGU to its
    units: archiver and alarm configurations read those fields."""
    for pv in {id(pv): pv for pv in group.pvdb.values()}.values():  # aliases once
        fields = pv.field_inst
        await fields.description.write(pv.__doc__ or "")
        if getattr(pv, "units", "") and hasattr(fields, "engineering_units"):
            await fields.engineering_units.write(pv.units)


async def write_if_changed(pv: PvpropertyData, value: Any) -> None:
    """Write ``value`` unless the PV has it already: no monitor update for nothing."""
    if pv.value != value:
        await pv.write(value)


class PutRejected(Exception):
    """Raised from a putter so the client gets a put failure; the text is in MESSAGE."""
