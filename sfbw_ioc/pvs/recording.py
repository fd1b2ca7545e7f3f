"""A writer's PVs for what each file holds beyond the stream: the EPICS PVs recorded
under /epics (``RECORD_PVS``) and readability while written (``SWMR``), with what the
file being written is now (``ACTIVE_FILE``, ``SWMR_ACTIVE``).

A mixin of ``WriterPVs``: it drives the writer's ``controller`` and fails puts with its
``reject``. The settings are the controller's ``output_options``, taken at each START.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import typing

from caproto import ChannelType
from caproto.server import PVGroup, pvproperty

from ..hdf5.options import OutputOptions
from ..recorder.names import PvListError, parse_pv_text, pv_text
from .kinds import stat_pv, text_pv, write_if_changed

log = logging.getLogger(__name__)

RECORD_PVS_LENGTH = 65536
_NO_YES = ("No", "Yes")


class RecordingPVs(PVGroup):
    """RECORD_PVS, RECORD_PVS_NOT_CONNECTED, SWMR, ACTIVE_FILE and SWMR_ACTIVE."""

    RECORD_PVS = text_pv("EPICS PVs recorded in each file", max_length=RECORD_PVS_LENGTH,
                         alarm_group="RECORD_PVS")
    RECORD_PVS_NOT_CONNECTED = stat_pv("Recorded PVs not connected")
    SWMR = pvproperty(value="No", dtype=ChannelType.ENUM, enum_strings=_NO_YES, record="bo",
                      doc="Files readable while written", alarm_group="SWMR")
    ACTIVE_FILE = text_pv("File being written now", read_only=True, alarm_group="state")
    SWMR_ACTIVE = pvproperty(value="No", dtype=ChannelType.ENUM, enum_strings=_NO_YES,
                             record="bi", read_only=True, alarm_group="state",
                             doc="Readers may open ACTIVE_FILE")

    controller: typing.Any  # the writer's AcquisitionController
    _shown_file = ""  # ACTIVE_FILE when MESSAGE last told the PVs not connected

    @property
    def _options(self) -> OutputOptions:
        return self.controller.output_options

    def _set_options(self, **changes: typing.Any) -> None:
        self.controller.output_options = dataclasses.replace(self._options, **changes)

    @RECORD_PVS.startup
    async def RECORD_PVS(self, instance, async_lib) -> None:
        options = self._options
        await self.RECORD_PVS.write(pv_text(pv for pv, _ in options.epics), verify_value=False)
        await self.SWMR.write(_NO_YES[options.swmr], verify_value=False)

    @RECORD_PVS.putter
    async def RECORD_PVS(self, instance, value: str) -> str:
        if self.controller.busy():
            await self.reject("RECORD_PVS can only be changed while IDLE")
        try:
            pvs = parse_pv_text(value)
        except PvListError as error:
            await self.reject(f"RECORD_PVS refused: {error}")
        recorder = self._options.recorder
        if recorder is None:
            await self.reject("this IOC records no PVs")
        # Creating the first monitors opens caproto's client sockets: off the loop.
        loop = asyncio.get_running_loop()
        self._set_options(epics=await loop.run_in_executor(None, recorder.watch, pvs))
        log.info("recording %d PVs in the files of %s", len(pvs), self.prefix)
        return pv_text(pvs)

    @SWMR.putter
    async def SWMR(self, instance, value: str) -> str:
        self._set_options(swmr=value == "Yes")  # from the next file on
        return value

    @ACTIVE_FILE.scan(period=0.5)
    async def ACTIVE_FILE(self, instance, async_lib) -> None:
        options = self._options
        path, swmr = options.active.get()
        await write_if_changed(self.ACTIVE_FILE, path)
        await write_if_changed(self.SWMR_ACTIVE, _NO_YES[swmr])
        missing = [pv.name for pv, history in options.epics if not history.connected]
        count_changed = self.RECORD_PVS_NOT_CONNECTED.value != len(missing)
        await write_if_changed(self.RECORD_PVS_NOT_CONNECTED, len(missing))
        new_file = path != self._shown_file
        self._shown_file = path
        if missing and (count_changed or (new_file and path)):
            note = (f"{len(missing)} of {len(options.epics)} recorded PVs not connected: "
                    f"{', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}")
            message = self.MESSAGE.value
            await self.MESSAGE.write(f"{message}; {note}" if new_file and message else note)
