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

from caproto import AlarmSeverity, AlarmStatus
from caproto.server import pvproperty

from ..pvs.acquisition import AcquisitionPVs, FileOwnerPVs
from ..pvs.kinds import PutRejected, fill_record_fields, text_pv, write_if_changed
from ..pvs.leftovers import LeftoverPVs
from ..vocabulary import State
from .coordinator import Coordinator, FileOwner, GroupError
from .member import Client, Member

log = logging.getLogger(__name__)

MEMBERS_LENGTH = 8192  # prefixes of ~100 members


class SfbwGroupIOC(AcquisitionPVs, FileOwnerPVs, LeftoverPVs):
    """Drives many sfbw-ioc members as one acquisition with one master file."""

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

    def leftovers_root(self) -> Path:
        return self._output_root

    # ---- start-up: the client of the members, then status publishing -----------------

    async def startup(self, async_lib: Any) -> None:
        """The group IOC's own start-up (caproto's ``startup_hook``): the client of the
        members, then status publishing until the server stops."""
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
            reason = "the group IOC is still starting"
            log.warning("put refused: %s", reason)
            raise PutRejected(reason)
        return self.coordinator

    # ---- control hooks ---------------------------------------------------------------

    async def check_output_file(self, value: str) -> None:
        await self._command(self._require_coordinator().check_master(value))

    async def start(self, start_pulse_id: int | None) -> None:
        general = {"user": self.USER.value, "process": self.PROCESS.value,
                   "instrument": self.INSTRUMENT.value}
        owner = FileOwner(self.FILE_UID.value, self.FILE_GID.value)
        await self._command(self._require_coordinator().start(
            start_pulse_id, self.OUTPUT_FILE.value, general, owner))

    async def stop(self, stop_pulse_id: int | None) -> None:
        await self._command(self._require_coordinator().stop(stop_pulse_id))

    async def abort(self) -> None:
        await self._command(self._require_coordinator().abort())

    async def _command(self, command: Awaitable[Any]) -> None:
        """Carry out a coordinator command; a refusal fails the put with its reason."""
        try:
            await command
        except GroupError as error:
            await self.reject(str(error))
        # When the put completes, the state PVs already tell its outcome.
        await self._publish()

    async def reject(self, reason: str) -> typing.NoReturn:
        log.warning("put refused: %s", reason)
        self._require_coordinator().note(reason)
        await self._publish()
        raise PutRejected(reason)

