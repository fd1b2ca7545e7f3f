"""The PV layer of ``sfbw-group``: one START, STOP and master file for many member IOCs.

The PVs are a member's control and state PVs; the work is the ``Coordinator``'s, and the
members are reached over Channel Access on this IOC's own loop (``member.Client``).
"""
from __future__ import annotations

import asyncio
import logging
import typing
from pathlib import Path
from typing import Any, Awaitable, Sequence

from caproto import AlarmSeverity, AlarmStatus, ChannelType
from caproto.server import PVGroup, pvproperty

from .acquisition import State
from .coordinator import Coordinator, GroupError
from .member import Client, Member
from .pvs import (command_pv, fill_record_fields, pulse_id_error, pulse_id_pv, text_pv,
                  write_if_changed)

log = logging.getLogger(__name__)

MEMBERS_LENGTH = 8192  # prefixes of ~100 members


class PutRejected(Exception):
    """Raised from a putter so the client gets a put failure; the text is in MESSAGE."""


class SfbwGroupIOC(PVGroup):
    """Drives many sfbw-ioc members as one acquisition with one master file."""

    OUTPUT_FILE = text_pv("Master HDF5 file, relative to the output root",
                          alarm_group="OUTPUT_FILE")
    USER = text_pv("Written to /general/user", max_length=256, alarm_group="USER")
    PROCESS = text_pv("Written to /general/process", max_length=256, alarm_group="PROCESS")
    INSTRUMENT = text_pv("Written to /general/instrument", max_length=256,
                         alarm_group="INSTRUMENT")
    START_PULSE_ID = pulse_id_pv("First pulse id on every member",
                                 alarm_group="START_PULSE_ID")
    STOP_PULSE_ID = pulse_id_pv("Last pulse id on every member", alarm_group="STOP_PULSE_ID")
    START_NOW = command_pv("Start all after the newest pulse")
    STOP_NOW = command_pv("Stop all at the newest pulse")
    ABORT = command_pv("Stop all at once, close files")

    STATE = pvproperty(value="IDLE", dtype=ChannelType.ENUM,
                       enum_strings=tuple(state.name for state in State), record="mbbi",
                       read_only=True, alarm_group="state", doc="Group acquisition state")
    MESSAGE = text_pv("Last event or error", read_only=True, alarm_group="state")
    LAST_FILE = text_pv("Last master file", read_only=True, alarm_group="state")
    MEMBERS = text_pv("Member prefixes, one a line", read_only=True,
                      max_length=MEMBERS_LENGTH, alarm_group="state")
    MEMBERS_CONNECTED = pvproperty(value=0, dtype=int, record="longin", read_only=True,
                                   alarm_group="state", doc="Members connected")

    def __init__(self, *args: Any, members: Sequence[str], output_root: Path,
                 allow_partial: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._member_prefixes = list(members)
        self._output_root = output_root
        self._allow_partial = allow_partial
        self.coordinator: Coordinator | None = None
        self._changed = asyncio.Event()
        self._publish_lock = asyncio.Lock()

    # ---- start-up: the client of the members, then status publishing -----------------

    @STATE.startup
    async def STATE(self, instance, async_lib) -> None:
        client = Client()
        coordinator = Coordinator([], self._output_root, self._allow_partial,
                                  self._changed.set)
        coordinator.members = [Member(client, prefix, coordinator.member_changed)
                               for prefix in self._member_prefixes]
        self.coordinator = coordinator
        await fill_record_fields(self)
        await self.MEMBERS.write("\n".join(self._member_prefixes))
        for member in coordinator.members:
            await member.connect()
        while True:
            await self._changed.wait()
            self._changed.clear()
            await self._publish()

    async def _publish(self) -> None:
        async with self._publish_lock:
            coordinator = self._require_coordinator()
            status = coordinator.status
            error = status.state is State.ERROR
            if self.STATE.value != status.state.name:
                await self.STATE.write(
                    status.state.name,
                    status=AlarmStatus.STATE if error else AlarmStatus.NO_ALARM,
                    severity=AlarmSeverity.MAJOR_ALARM if error else AlarmSeverity.NO_ALARM)
            await write_if_changed(self.MESSAGE, status.message)
            await write_if_changed(self.LAST_FILE, status.last_file)
            await write_if_changed(self.MEMBERS_CONNECTED, coordinator.connected_count())

    def _require_coordinator(self) -> Coordinator:
        if self.coordinator is None:
            raise PutRejected("the group IOC is still starting")
        return self.coordinator

    # ---- control hooks ---------------------------------------------------------------

    @OUTPUT_FILE.putter
    async def OUTPUT_FILE(self, instance, value: str) -> str:
        await self._command(self._require_coordinator().check_master(value))
        return value

    @START_PULSE_ID.putter
    async def START_PULSE_ID(self, instance, value: float) -> float:
        await self._start(await self._pulse_id(value, "START_PULSE_ID"))
        return value

    @STOP_PULSE_ID.putter
    async def STOP_PULSE_ID(self, instance, value: float) -> float:
        pulse_id = await self._pulse_id(value, "STOP_PULSE_ID")
        await self._command(self._require_coordinator().stop(pulse_id))
        return value

    @START_NOW.putter
    async def START_NOW(self, instance, value: str) -> str:
        if value != "Done":
            await self._start(None)
        return "Done"

    @STOP_NOW.putter
    async def STOP_NOW(self, instance, value: str) -> str:
        if value != "Done":
            await self._command(self._require_coordinator().stop(None))
        return "Done"

    @ABORT.putter
    async def ABORT(self, instance, value: str) -> str:
        if value != "Done":
            await self._command(self._require_coordinator().abort())
        return "Done"

    async def _start(self, start_pulse_id: int | None) -> None:
        general = {"user": self.USER.value, "process": self.PROCESS.value,
                   "instrument": self.INSTRUMENT.value}
        await self._command(self._require_coordinator().start(
            start_pulse_id, self.OUTPUT_FILE.value, general))

    async def _pulse_id(self, value: float, name: str) -> int:
        error = pulse_id_error(value, name)
        if error is not None:
            await self._reject(error)
        return int(value)

    async def _command(self, command: Awaitable[Any]) -> None:
        """Carry out a coordinator command; a refusal fails the put with its reason."""
        try:
            await command
        except GroupError as error:
            await self._reject(str(error))
        # When the put completes, the state PVs already tell its outcome.
        await self._publish()

    async def _reject(self, reason: str) -> typing.NoReturn:
        log.warning("put refused: %s", reason)
        self._require_coordinator().note(reason)
        await self._publish()
        raise PutRejected(reason)

