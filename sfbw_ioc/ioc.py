"""The PV layer: a caproto PVGroup in front of the receiver, the ring and the acquisitions.

The asyncio loop never touches the disk or the socket: commands go to the
``AcquisitionController`` through an executor, status changes come back through a
thread-safe queue, and statistics are sampled from plain counters twice a second.
"""
from __future__ import annotations

import asyncio
import logging
import time
import concurrent.futures
import typing
from dataclasses import dataclass
from typing import Any, Callable

from caproto import AlarmSeverity, AlarmStatus, ChannelType
from caproto.server import PVGroup, pvproperty

from .acquisition import AcquisitionController, AcquisitionError, State, Status
from .pvs import command_pv as _command_pv, pulse_id_error, pulse_id_pv as _pulse_id_pv
from .pvs import fill_record_fields, stat_pv as _stat_pv, text_pv as _text_pv, write_if_changed
from .receiver import MalformedCounter, Receiver
from .ring import RingBuffer

log = logging.getLogger(__name__)

STATS_PERIOD_S = 0.5


class PutRejected(Exception):
    """Raised from a putter so the client gets a put failure; the text is in MESSAGE."""


@dataclass(frozen=True, slots=True)
class Backend:
    """The threads behind the IOC (built by the CLI, or by tests)."""

    ring: RingBuffer
    receiver: Receiver
    malformed: MalformedCounter
    controller: AcquisitionController
    stream: str


class SfbwIOC(PVGroup):
    """SwissFEL bsread buffer and writer."""

    # ---- acquisition control ---------------------------------------------------------
    OUTPUT_FILE = _text_pv("HDF5 file, relative to the output root", alarm_group="OUTPUT_FILE")
    USER = _text_pv("Written to /general/user", max_length=256, alarm_group="USER")
    PROCESS = _text_pv("Written to /general/process", max_length=256,
                       alarm_group="PROCESS")
    INSTRUMENT = _text_pv("Written to /general/instrument", max_length=256,
                          alarm_group="INSTRUMENT")
    START_PULSE_ID = _pulse_id_pv("First pulse id to write", alarm_group="START_PULSE_ID")
    STOP_PULSE_ID = _pulse_id_pv("Last pulse id to write", alarm_group="STOP_PULSE_ID")
    START_NOW = _command_pv("Start with the next message")
    STOP_NOW = _command_pv("Stop after the last message")
    ABORT = _command_pv("Stop at once, close file")

    # ---- state -----------------------------------------------------------------------
    STATE = pvproperty(value="IDLE", dtype=ChannelType.ENUM,
                       enum_strings=tuple(state.name for state in State), record="mbbi",
                       read_only=True, alarm_group="state", doc="Acquisition state")
    MESSAGE = _text_pv("Last event or error", read_only=True, alarm_group="state")
    LAST_FILE = _text_pv("Last completed file", read_only=True, alarm_group="state")
    OUTPUT_ROOT = _text_pv("Directory files are written in", read_only=True,
                           alarm_group="state")
    STREAM = _text_pv("bsread stream address", read_only=True, alarm_group="state")

    # ---- statistics (sampled, never per message) -------------------------------------
    RECEIVED = _stat_pv("Messages received")
    RECEIVE_RATE = _stat_pv("Receive rate", units="Hz", precision=1)
    LAST_PULSE_ID = _stat_pv("Last pulse id received")
    MALFORMED = _stat_pv("Malformed messages")
    PULSE_ID_ANOMALIES = _stat_pv("Pulse id repeated or back")
    BUFFER_COUNT = _stat_pv("Messages in the buffer")
    BUFFER_BYTES = _stat_pv("Bytes in the buffer", units="B")
    BUFFER_OLDEST_PULSE_ID = _stat_pv("Oldest buffered pulse id")
    WRITTEN = _stat_pv("Messages in current file")
    MISSING = _stat_pv("Pulses missing in range")
    LOST = _stat_pv("Messages lost by writer")
    FILE_BYTES = _stat_pv("Size of current file", units="B")

    def __init__(self, *args: Any, backend: Backend, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.backend = backend
        self._rate_sample: tuple[float, int] | None = None
        self._published_version = -1
        self._publish_lock = asyncio.Lock()

    # ---- start-up: status changes from the writer thread -----------------------------

    @STATE.startup
    async def STATE(self, instance, async_lib) -> None:
        loop = asyncio.get_running_loop()
        queue = async_lib.ThreadsafeQueue()

        def on_change(status: Status) -> None:
            # After the server stopped (SIGTERM), the file being closed must not fail
            # because nobody is left to publish its status.
            try:
                loop.call_soon_threadsafe(queue.put, status)
            except RuntimeError:  # the loop is closed
                pass

        self.backend.controller.set_on_change(on_change)
        await self._fill_record_fields()
        await self.OUTPUT_ROOT.write(str(self.backend.controller.output_root))
        await self.STREAM.write(self.backend.stream)
        while True:
            await self._publish_status(await queue.async_get())

    async def _fill_record_fields(self) -> None:
        await fill_record_fields(self)

    async def _publish_status(self, status: Status) -> None:
        # Putters and the queue both publish; one at a time, and never an older status.
        async with self._publish_lock:
            if status.version < self._published_version:
                return
            self._published_version = status.version
            error = status.state is State.ERROR
            await self.STATE.write(
                status.state.name,
                status=AlarmStatus.STATE if error else AlarmStatus.NO_ALARM,
                severity=AlarmSeverity.MAJOR_ALARM if error else AlarmSeverity.NO_ALARM)
            await self._write_if_changed(self.MESSAGE, status.message)
            await self._write_if_changed(self.LAST_FILE, status.last_file)
            await self._publish_acquisition_figures(status)

    # ---- control hooks ---------------------------------------------------------------

    @OUTPUT_FILE.putter
    async def OUTPUT_FILE(self, instance, value: str) -> str:
        await self._command(self.backend.controller.resolve_output, value)
        return value

    @START_PULSE_ID.putter
    async def START_PULSE_ID(self, instance, value: float) -> float:
        await self._start(await self._pulse_id(value, "START_PULSE_ID"))
        return value

    @STOP_PULSE_ID.putter
    async def STOP_PULSE_ID(self, instance, value: float) -> float:
        done = await self._command(self.backend.controller.stop,
                                   await self._pulse_id(value, "STOP_PULSE_ID"))
        await self._until_closed(done)
        return value

    @START_NOW.putter
    async def START_NOW(self, instance, value: str) -> str:
        if value != "Done":
            await self._start(None)
        return "Done"

    @STOP_NOW.putter
    async def STOP_NOW(self, instance, value: str) -> str:
        if value != "Done":
            await self._until_closed(await self._command(self.backend.controller.stop, None))
        return "Done"

    @ABORT.putter
    async def ABORT(self, instance, value: str) -> str:
        if value != "Done":
            await self._until_closed(await self._command(self.backend.controller.abort))
        return "Done"

    async def _pulse_id(self, value: float, name: str) -> int:
        error = pulse_id_error(value, name)
        if error is not None:
            await self._reject(error)
        return int(value)

    async def _start(self, start_pulse_id: int | None) -> None:
        general = {"user": self.USER.value, "process": self.PROCESS.value,
                   "instrument": self.INSTRUMENT.value}
        await self._command(self.backend.controller.start, start_pulse_id,
                            self.OUTPUT_FILE.value, general)

    async def _command(self, function: Callable[..., Any], *args: Any) -> Any:
        """Run a controller command off the loop; a refusal fails the put with a reason."""
        loop = asyncio.get_running_loop()
        try:
            result = await loop.run_in_executor(None, function, *args)
        except AcquisitionError as error:
            await self._reject(str(error))
        # When the put completes, the state PVs already tell its outcome.
        await self._publish_status(self.backend.controller.status())
        return result

    async def _until_closed(self, done: concurrent.futures.Future) -> None:
        """Hold a put-with-callback until the file is on disk (a failure fails the put)."""
        try:
            await asyncio.wrap_future(done)
        except AcquisitionError as error:
            raise PutRejected(str(error)) from error
        finally:
            await self._publish_status(self.backend.controller.status())

    async def _reject(self, reason: str) -> typing.NoReturn:
        log.warning("put refused: %s", reason)
        await self.MESSAGE.write(reason)
        raise PutRejected(reason)

    # ---- statistics ------------------------------------------------------------------

    @RECEIVED.scan(period=STATS_PERIOD_S)
    async def RECEIVED(self, instance, async_lib) -> None:
        backend = self.backend
        received = backend.receiver.stats()
        ring = backend.ring.stats()
        await self._write_if_changed(self.RECEIVED, received.received)
        await self._write_if_changed(self.RECEIVE_RATE, self._rate(received.received))
        await self._write_if_changed(self.LAST_PULSE_ID, received.last_pulse_id or 0)
        await self._write_if_changed(self.MALFORMED, backend.malformed.total)
        await self._write_if_changed(self.PULSE_ID_ANOMALIES, received.pulse_id_anomalies)
        await self._write_if_changed(self.BUFFER_COUNT, ring.count)
        await self._write_if_changed(self.BUFFER_BYTES, ring.nbytes)
        await self._write_if_changed(self.BUFFER_OLDEST_PULSE_ID, ring.oldest_pulse_id or 0)
        await self._publish_acquisition_figures(backend.controller.status())

    async def _publish_acquisition_figures(self, status: Status) -> None:
        await self._write_if_changed(self.WRITTEN, status.written)
        await self._write_if_changed(self.MISSING, status.missing)
        await self._write_if_changed(self.LOST, status.lost)
        await self._write_if_changed(self.FILE_BYTES, status.file_bytes)

    def _rate(self, received: int) -> float:
        now = time.monotonic()
        previous, self._rate_sample = self._rate_sample, (now, received)
        if previous is None or now <= previous[0]:
            return 0.0
        return (received - previous[1]) / (now - previous[0])

    _write_if_changed = staticmethod(write_if_changed)
