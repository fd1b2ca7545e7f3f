"""The control and state PVs of whatever writes a pulse range into a file: each writer of
the IOC (``writerpvs.WriterPVs``) and the group IOC (``group.SfbwGroupIOC``). Panels,
sequencers and the group drive both by the same names; the put hooks here turn a put into
a command, and the subclass says what the command does. Both also have the owner of the
files they start (``FileOwnerPVs``).
"""
from __future__ import annotations

import typing

from caproto import ChannelType
from caproto.server import PVGroup, pvproperty

from ..output import ownership
from ..vocabulary import State
from .kinds import command_pv, pulse_id_error, pulse_id_pv, text_pv


class AcquisitionPVs(PVGroup):
    """OUTPUT_FILE, USER, PROCESS, INSTRUMENT, the START/STOP/ABORT commands, STATE,
    MESSAGE and LAST_FILE, with their put hooks."""

    OUTPUT_FILE = text_pv("HDF5 file, relative to the output root", alarm_group="OUTPUT_FILE")
    USER = text_pv("Written to /general/user", max_length=256, alarm_group="USER")
    PROCESS = text_pv("Written to /general/process", max_length=256, alarm_group="PROCESS")
    INSTRUMENT = text_pv("Written to /general/instrument", max_length=256,
                         alarm_group="INSTRUMENT")
    START_PULSE_ID = pulse_id_pv("First pulse id to write", alarm_group="START_PULSE_ID")
    STOP_PULSE_ID = pulse_id_pv("Last pulse id to write", alarm_group="STOP_PULSE_ID")
    START_NOW = command_pv("Start with the next message")
    STOP_NOW = command_pv("Stop after the last message")
    ABORT = command_pv("Stop at once, close file")

    STATE = pvproperty(value="IDLE", dtype=ChannelType.ENUM,
                       enum_strings=tuple(state.name for state in State), record="mbbi",
                       read_only=True, alarm_group="state", doc="Acquisition state")
    MESSAGE = text_pv("Last event or error", read_only=True, alarm_group="state")
    LAST_FILE = text_pv("Last completed file", read_only=True, alarm_group="state")

    # ---- what the commands do: the subclass's ------------------------------------------

    async def check_output_file(self, value: str) -> None:
        """Refuse (``reject``) an OUTPUT_FILE that cannot be written."""
        raise NotImplementedError

    async def start(self, start_pulse_id: int | None) -> None:
        """Start at ``start_pulse_id`` (None: with the next message)."""
        raise NotImplementedError

    async def stop(self, stop_pulse_id: int | None) -> None:
        """Stop after ``stop_pulse_id`` (None: now); return once the file is closed."""
        raise NotImplementedError

    async def abort(self) -> None:
        """Stop at once; return once the file is closed."""
        raise NotImplementedError

    async def reject(self, reason: str) -> typing.NoReturn:
        """Fail the put with ``reason`` (told in MESSAGE)."""
        raise NotImplementedError

    # ---- the put hooks -----------------------------------------------------------------

    @OUTPUT_FILE.putter
    async def OUTPUT_FILE(self, instance, value: str) -> str:
        await self.check_output_file(value)
        return value

    @START_PULSE_ID.putter
    async def START_PULSE_ID(self, instance, value: float) -> float:
        await self.start(await self._pulse_id(value, "START_PULSE_ID"))
        return value

    @STOP_PULSE_ID.putter
    async def STOP_PULSE_ID(self, instance, value: float) -> float:
        await self.stop(await self._pulse_id(value, "STOP_PULSE_ID"))
        return value

    @START_NOW.putter
    async def START_NOW(self, instance, value: str) -> str:
        if value != "Done":
            await self.start(None)
        return "Done"

    @STOP_NOW.putter
    async def STOP_NOW(self, instance, value: str) -> str:
        if value != "Done":
            await self.stop(None)
        return "Done"

    @ABORT.putter
    async def ABORT(self, instance, value: str) -> str:
        if value != "Done":
            await self.abort()
        return "Done"

    async def _pulse_id(self, value: float, name: str) -> int:
        error = pulse_id_error(value, name)
        if error is not None:
            await self.reject(error)
        return int(value)


class FileOwnerPVs(PVGroup):
    """FILE_UID and FILE_GID: who the files and directories of the next START belong to.
    A put checks the range only: whether the IOC may give files to them is START's to
    say (the account may be created, or the IOC restarted with the capability,
    meanwhile)."""

    FILE_UID = pvproperty(value=ownership.KEEP, dtype=int, record="longout",
                          doc="Owner uid of new files; -1: IOC's", alarm_group="FILE_UID")
    FILE_GID = pvproperty(value=ownership.KEEP, dtype=int, record="longout",
                          doc="Group gid of new files; -1: IOC's", alarm_group="FILE_GID")

    async def reject(self, reason: str) -> typing.NoReturn:
        """Fail the put with ``reason`` (told in MESSAGE)."""
        raise NotImplementedError

    @FILE_UID.putter
    async def FILE_UID(self, instance, value: int) -> int:
        await self._check_id(value, "FILE_UID")
        return value

    @FILE_GID.putter
    async def FILE_GID(self, instance, value: int) -> int:
        await self._check_id(value, "FILE_GID")
        return value

    async def _check_id(self, value: int, name: str) -> None:
        try:
            ownership.check_id(value, name)
        except ownership.OwnershipError as error:
            await self.reject(str(error))
