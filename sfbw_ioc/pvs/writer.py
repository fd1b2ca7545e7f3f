"""The PVs of one writer (``W1:``, ``W2:``, ...) in front of its AcquisitionController:
acquisition control, file naming, channel selection, state and figures.

Every writer is the same caproto SubGroup; the IOC declares as many as ``--writers``.
Commands run in an executor (opening a file touches the disk) and give back a ticket;
every status the controller publishes comes through a thread-safe queue to one task,
which writes the PVs in order. A put waits for the status of its ticket to be written,
so that when its callback returns, every PV it changed reads its new value.
"""
from __future__ import annotations

import asyncio
import contextvars
import logging
import typing
from functools import partial
from typing import Any, Callable

from caproto import AlarmSeverity, AlarmStatus, ChannelType
from caproto.server import pvproperty

from ..acquisition import naming
from ..acquisition.controller import AcquisitionController
from ..acquisition.selection import ChannelSelection
from ..acquisition.status import AcquisitionFailed, Ticket
from ..output.root import taken_by
from ..vocabulary import AcquisitionError, State, Status
from .acquisition import AcquisitionPVs, FileOwnerPVs
from .kinds import PutRejected, pulse_id_pv, stat_pv, text_pv, write_if_changed
from .recording import RecordingPVs

log = logging.getLogger(__name__)

CHANNELS_LENGTH = 65536
# How far START looks for a file number whose file does not exist yet.
_NUMBERS_TRIED = 100_000
# Set for a put whose caller, in this process, wants to hear when its command is taken
# (the REST API answers a stop then, not when the file is closed): caproto runs the
# putter in the task that writes the PV, so this reaches the putter of that put only.
_ACCEPTED: contextvars.ContextVar[asyncio.Future | None] = contextvars.ContextVar(
    "sfbw_accepted", default=None)


class WriterPVs(RecordingPVs, AcquisitionPVs, FileOwnerPVs):
    """One writer: a file at a time, from a start to a stop pulse id."""

    # ---- file naming (areaDetector's) and channel selection --------------------------
    FILE_PATH = text_pv("Directory, relative to output root", alarm_group="FILE_PATH")
    FILE_NAME = text_pv("File name, before its number", max_length=256,
                         alarm_group="FILE_NAME")
    FILE_NUMBER = pvproperty(value=0, dtype=int, record="longout",
                             doc="Number of the next file", alarm_group="FILE_NUMBER")
    FILE_TEMPLATE = text_pv("printf of path, name, number", max_length=256,
                             value=naming.DEFAULT_TEMPLATE, alarm_group="FILE_TEMPLATE")
    AUTO_INCREMENT = pvproperty(value="Yes", dtype=ChannelType.ENUM, enum_strings=("No", "Yes"),
                                record="bo", doc="Next file number after each file",
                                alarm_group="AUTO_INCREMENT")
    CHANNELS = text_pv("Channels to write; empty: all", max_length=CHANNELS_LENGTH,
                        alarm_group="CHANNELS")

    # ---- figures of the current (or last) file ------------------------------------
    WRITTEN = stat_pv("Messages in current file")
    MISSING = stat_pv("Pulses missing in range")
    LOST = stat_pv("Messages lost by writer")
    FILE_BYTES = stat_pv("Size of current file", units="B")
    # MINOR from HIGH, MAJOR from HIHI (the ai record's fields, operator-settable): the
    # defaults leave the ring seconds of backlog before LOST begins at camera rates.
    WRITER_LAG = pvproperty(value=0.0, dtype=float, precision=2, units="s", record="ai",
                            read_only=True, upper_warning_limit=2.0, upper_alarm_limit=5.0,
                            alarm_group="WRITER_LAG", doc="Writer behind the stream")
    FILE_FIRST_PULSE_ID = pulse_id_pv("First pulse id in file", read_only=True,
                                      alarm_group="stats")
    FILE_LAST_PULSE_ID = pulse_id_pv("Last pulse id in file", read_only=True,
                                     alarm_group="stats")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.controller: AcquisitionController | None = None
        self._start_guard: asyncio.Lock | None = None
        self._published_version = -1
        self._published = asyncio.Condition()  # notified when a status was published
        self._published_message = ""
        # START holds it while it starts a file, so that the file's close is published
        # knowing whether the naming PVs named the file (FILE_NUMBER counts it then).
        self._publish_lock = asyncio.Lock()
        self._composed = False  # OUTPUT_FILE is the naming PVs' (not a direct put)
        self._running_composed = False  # ... and was so when the running file started
        self._counted_file = ""  # the last completed file FILE_NUMBER has counted

    def attach(self, controller: AcquisitionController, start_guard: asyncio.Lock) -> None:
        """Drive ``controller``; START holds ``start_guard``, which a change of stream
        takes too, so that no file starts on a stream being replaced."""
        self.controller = controller
        self._start_guard = start_guard

    @property
    def _control(self) -> AcquisitionController:
        assert self.controller is not None, "attach() the writer first"
        return self.controller

    # ---- the controller's status, published -------------------------------------------

    async def publish_statuses(self, async_lib: Any) -> None:
        """Publish every status of the controller, in order, for the IOC's life (the
        IOC's start-up runs it)."""
        loop = asyncio.get_running_loop()
        queue = async_lib.ThreadsafeQueue()

        def hand_over(status: Status) -> None:
            # After the server stopped (SIGTERM), the file being closed must not fail
            # because nobody is left to publish its status.
            try:
                loop.call_soon_threadsafe(queue.put, status)
            except RuntimeError:  # the loop is closed
                pass

        self._control.publish_to(hand_over)
        while True:
            status = await queue.async_get()
            async with self._publish_lock:
                await self._publish(status)
            async with self._published:
                self._published_version = status.version
                self._published.notify_all()

    async def _publish(self, status: Status) -> None:
        # The controller hands the statuses over in order, and this is the one place
        # that writes them: no older status is ever written over a newer one.
        if self.STATE.value != status.state.name:
            error = status.state is State.ERROR
            await self.STATE.write(
                status.state.name,
                status=AlarmStatus.STATE if error else AlarmStatus.NO_ALARM,
                severity=AlarmSeverity.MAJOR_ALARM if error else AlarmSeverity.NO_ALARM)
        # Only a new message of the controller's: the reason of a refused put, written
        # since, must not give way to an older one when another command succeeds.
        if status.message != self._published_message:
            self._published_message = status.message
            await write_if_changed(self.MESSAGE, status.message)
        await write_if_changed(self.LAST_FILE, status.last_file)
        await self._publish_figures(status)
        if status.last_file != self._counted_file:
            self._counted_file = status.last_file
            # Here, before the status counts as published: a STOP's put-callback
            # returns with the next name set.
            if self._running_composed and self.AUTO_INCREMENT.value == "Yes":
                await self._set_number(self.FILE_NUMBER.value + 1)

    async def _publish_lag(self, lag: float) -> None:
        data = self.WRITER_LAG
        if lag >= data.upper_alarm_limit > 0:
            severity = AlarmSeverity.MAJOR_ALARM
        elif lag >= data.upper_warning_limit > 0:
            severity = AlarmSeverity.MINOR_ALARM
        else:
            severity = AlarmSeverity.NO_ALARM
        if data.value != lag or data.severity != severity:
            await data.write(lag, severity=severity, status=(
                AlarmStatus.NO_ALARM if severity is AlarmSeverity.NO_ALARM
                else AlarmStatus.HIGH if severity is AlarmSeverity.MINOR_ALARM
                else AlarmStatus.HIHI))

    async def _publish_figures(self, status: Status) -> None:
        await write_if_changed(self.WRITTEN, status.written)
        await write_if_changed(self.MISSING, status.missing)
        await write_if_changed(self.LOST, status.lost)
        await write_if_changed(self.FILE_BYTES, status.file_bytes)
        await self._publish_lag(status.writer_lag)
        # 0 until the (current) file has a row
        await write_if_changed(self.FILE_FIRST_PULSE_ID, status.first_pulse_id or 0)
        await write_if_changed(self.FILE_LAST_PULSE_ID, status.last_pulse_id or 0)

    async def _until_published(self, status: Status) -> None:
        async with self._published:
            await self._published.wait_for(lambda: self._published_version >= status.version)

    # ---- control hooks ---------------------------------------------------------------

    async def check_output_file(self, value: str) -> None:
        await self._command(self._control.resolve_output, value)
        self._composed = False

    async def stop(self, stop_pulse_id: int | None) -> None:
        ticket = await self._command(self._control.stop, stop_pulse_id)
        await self._accepted(ticket)
        await self._until_closed(ticket)

    async def abort(self) -> None:
        ticket = await self._command(self._control.abort)
        await self._accepted(ticket)
        await self._until_closed(ticket)

    async def put_until_accepted(self, pv_name: str, value: Any) -> asyncio.Task:
        """Put ``value`` to the PV ``pv_name`` as a Channel Access client would, and
        return once the command it carries was accepted, with the put left running (a
        STOP's completes when the file is closed); a refusal raises here."""
        loop = asyncio.get_running_loop()
        accepted = loop.create_future()
        context = contextvars.copy_context()
        context.run(_ACCEPTED.set, accepted)
        put = loop.create_task(getattr(self, pv_name).write(value), context=context)
        await asyncio.wait((accepted, put), return_when=asyncio.FIRST_COMPLETED)
        if not accepted.done():
            put.result()  # refused, or completed without a command
        return put

    # ---- file naming hooks: each put composes OUTPUT_FILE anew -------------------------

    @FILE_PATH.putter
    async def FILE_PATH(self, instance, value: str) -> str:
        await self._compose(path=value)
        return value

    @FILE_NAME.putter
    async def FILE_NAME(self, instance, value: str) -> str:
        await self._compose(name=value)
        return value

    @FILE_NUMBER.putter
    async def FILE_NUMBER(self, instance, value: int) -> int:
        if value < 0:
            await self.reject(f"FILE_NUMBER must be 0 or more, not {value}")
        await self._compose(number=value)
        return value

    @FILE_TEMPLATE.putter
    async def FILE_TEMPLATE(self, instance, value: str) -> str:
        await self._compose(template=value)
        return value

    @AUTO_INCREMENT.putter
    async def AUTO_INCREMENT(self, instance, value: str) -> str:
        await self._compose()
        return value

    def _naming(self, **changes: Any) -> dict[str, Any]:
        """The naming PVs' values, with a put's value that is not stored yet."""
        return {"template": self.FILE_TEMPLATE.value, "path": self.FILE_PATH.value,
                "name": self.FILE_NAME.value, "number": self.FILE_NUMBER.value, **changes}

    async def _compose(self, **changes: Any) -> None:
        fields = self._naming(**changes)
        try:
            name = naming.compose(**fields)
        except naming.TemplateError as error:
            await self.reject(str(error))
        # Inside the root; an existing file is refused only by START (or skipped).
        await self._command(partial(self._control.resolve_output, must_be_new=False), name)
        await self.OUTPUT_FILE.write(name, verify_value=False)
        self._composed = True

    async def _set_number(self, number: int) -> None:
        """FILE_NUMBER and the OUTPUT_FILE it composes (template, path and name were
        checked when they were put: a number cannot lead out of the root)."""
        name = naming.compose(**self._naming(number=number))
        await self.FILE_NUMBER.write(number, verify_value=False)
        await self.OUTPUT_FILE.write(name, verify_value=False)

    def _first_free_number(self) -> int:
        """The first FILE_NUMBER from the current one whose file does not exist (nor its
        .partial): after a restart the numbers begin again, the files must not."""
        fields = self._naming()
        for number in range(fields["number"], fields["number"] + _NUMBERS_TRIED):
            target = self._control.resolve_output(
                naming.compose(**{**fields, "number": number}), must_be_new=False)
            if taken_by(target) is None:
                return number
        raise AcquisitionError(f"no free file number among the {_NUMBERS_TRIED} from "
                               f"{fields['number']}")

    # ---- helpers of the hooks ----------------------------------------------------------

    async def start(self, start_pulse_id: int | None) -> None:
        assert self._start_guard is not None
        async with self._start_guard:
            composed = self._composed
            if composed and self.AUTO_INCREMENT.value == "Yes":
                number = await self._command(self._first_free_number)
                if number != self.FILE_NUMBER.value:
                    await self._set_number(number)
            general = {"user": self.USER.value, "process": self.PROCESS.value,
                       "instrument": self.INSTRUMENT.value, "channels": self.CHANNELS.value}
            owner = self._control.owner.with_ids(self.FILE_UID.value, self.FILE_GID.value)
            async with self._publish_lock:
                ticket = await self._command(
                    self._control.start, start_pulse_id, self.OUTPUT_FILE.value, general,
                    ChannelSelection.parse(self.CHANNELS.value), owner)
                self._running_composed = composed
            await self._accepted(ticket)

    async def _command(self, function: Callable[..., Any], *args: Any) -> Any:
        """Run a controller command off the loop; a refusal fails the put with a reason."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(None, function, *args)
        except AcquisitionError as error:
            await self.reject(str(error))

    async def _accepted(self, ticket: Ticket) -> None:
        """Return once the status that shows the command taken is published; tell the
        caller of ``put_until_accepted``, if it is one."""
        await self._until_published(await asyncio.wrap_future(ticket.accepted))
        waiting = _ACCEPTED.get()
        if waiting is not None and not waiting.done():
            waiting.set_result(None)

    async def _until_closed(self, ticket: Ticket) -> None:
        """Hold a put-with-callback until the file is on disk and its status published
        (a failure fails the put)."""
        try:
            status = await asyncio.wrap_future(ticket.closed)
        except AcquisitionFailed as failure:
            await self._until_published(failure.status)
            raise PutRejected(str(failure)) from failure
        await self._until_published(status)

    async def reject(self, reason: str) -> typing.NoReturn:
        log.warning("put refused: %s", reason)
        await self.MESSAGE.write(reason)
        raise PutRejected(reason)
