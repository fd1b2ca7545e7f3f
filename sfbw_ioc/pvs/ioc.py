"""The PV layer: a caproto PVGroup in front of the receiver, the ring and the writers.

The IOC's own PVs are the stream's (address, channels, receiver and ring statistics)
and the live view's; each writer is a ``WriterPVs`` SubGroup (``W1:``, ``W2:``, ...).
Writer 1's PVs are also served without their ``W1:`` (the same PV under a second name,
an EPICS alias), so the unprefixed PVs of a one-writer IOC keep working.

The asyncio loop never touches the disk or the socket: commands go to the threads
through executors and futures, statistics are sampled from plain counters twice a second.
"""
from __future__ import annotations

import asyncio
import logging
import re
import time
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from caproto import AlarmSeverity, AlarmStatus, ChannelType
from caproto.server import SubGroup, pvproperty

from ..acquisition.controller import AcquisitionController
from ..bsread import DataHeader
from ..live.sampler import DEFAULT_IMAGE_MAX_PIXELS
from ..stream.forward import Forwarder
from ..stream.malformed import MalformedCounter
from ..stream.receiver import MODES, Receiver
from ..stream.ring import RingBuffer
from ..stream.silence import StreamStatus, stream_status
from .kinds import PutRejected, fill_record_fields, stat_pv, text_pv, write_if_changed
from .leftovers import LeftoverPVs
from .live import LiveImage, LiveSlot, LiveView, rate_pv
from .writer import WriterPVs

log = logging.getLogger(__name__)

STATS_PERIOD_S = 0.5
DEFAULT_WRITERS = 2
ALIASED_WRITER = "W1"  # served without its prefix as well
STREAM_CHANNELS_LENGTH = 262_144
_STREAM_ADDRESS = re.compile(r"tcp://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})")
_SWITCH_TIMEOUT_S = 5.0


@dataclass(frozen=True, slots=True)
class Backend:
    """The threads behind the IOC (built by the CLI, or by tests)."""

    ring: RingBuffer
    receiver: Receiver
    malformed: MalformedCounter
    controllers: tuple[AcquisitionController, ...]
    image_max_pixels: int = DEFAULT_IMAGE_MAX_PIXELS
    forwarder: Forwarder | None = None
    pulse_rate: float = 100.0  # pulses per second: the stream's pulse step in seconds


def check_stream_address(address: str) -> None:
    """ValueError unless ``address`` is tcp://host:port (ZeroMQ connects to it later,
    whether anybody serves it or not)."""
    match = _STREAM_ADDRESS.fullmatch(address)
    if match is None or not 0 < int(match[2]) < 65536:
        raise ValueError(f"{address!r} is not a stream address: tcp://host:port")


class SfbwIOC(LeftoverPVs):
    """SwissFEL bsread buffer and writer (its writers are added by ``ioc_class``)."""

    # ---- the stream ------------------------------------------------------------------
    OUTPUT_ROOT = text_pv("Directory files are written in", read_only=True,
                           alarm_group="state")
    STREAM = text_pv("bsread stream address", alarm_group="STREAM")
    STREAM_MODE = pvproperty(value="PULL", dtype=ChannelType.ENUM, enum_strings=("PULL", "SUB"),
                             record="mbbo", doc="ZeroMQ pattern of the stream",
                             alarm_group="STREAM_MODE")
    STREAM_CHANNELS = text_pv("Channels of the stream, a line each", read_only=True,
                               max_length=STREAM_CHANNELS_LENGTH, alarm_group="state")
    STREAM_CHANNEL_COUNT = stat_pv("Channels of the stream")

    # ---- statistics (sampled, never per message) -------------------------------------
    RECEIVED = stat_pv("Messages received")
    RECEIVE_RATE = stat_pv("Receive rate", units="Hz", precision=1)
    LAST_PULSE_ID = stat_pv("Last pulse id received")
    MALFORMED = stat_pv("Malformed messages")
    PULSE_ID_ANOMALIES = stat_pv("Pulse id repeated or back")
    BUFFER_COUNT = stat_pv("Messages in the buffer")
    BUFFER_BYTES = stat_pv("Bytes in the buffer", units="B")
    BUFFER_OLDEST_PULSE_ID = stat_pv("Oldest buffered pulse id")
    FORWARD_DROPPED = stat_pv("Messages not re-published")
    # --pulse-rate, for clients that turn a duration into pulse ids (the Bluesky device)
    PULSE_RATE = stat_pv("Pulse ids per second", units="Hz", precision=1)
    STREAM_STATUS = pvproperty(value="WAITING", dtype=ChannelType.ENUM,
                               enum_strings=tuple(s.name for s in StreamStatus),
                               record="mbbi", read_only=True, alarm_group="STREAM_STATUS",
                               doc="Stream heard, silent or unresolved")

    # ---- live view (sfbw_ioc/live.py) ------------------------------------------------
    LIVE1 = SubGroup(LiveSlot, prefix="LIVE1:")
    LIVE2 = SubGroup(LiveSlot, prefix="LIVE2:")
    LIVE3 = SubGroup(LiveSlot, prefix="LIVE3:")
    LIVE4 = SubGroup(LiveSlot, prefix="LIVE4:")
    LIVE5 = SubGroup(LiveSlot, prefix="LIVE5:")
    LIVE6 = SubGroup(LiveSlot, prefix="LIVE6:")
    LIVE7 = SubGroup(LiveSlot, prefix="LIVE7:")
    LIVE8 = SubGroup(LiveSlot, prefix="LIVE8:")
    IMAGE = SubGroup(LiveImage, prefix="IMAGE:")
    LIVE_RATE = rate_pv("Live channels sampling rate", 2.0, alarm_group="LIVE_RATE")

    def __init__(self, *args: Any, backend: Backend, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.backend = backend
        self.writers = [group for group in self.groups.values() if isinstance(group, WriterPVs)]
        if len(self.writers) != len(backend.controllers):
            raise ValueError(f"{len(self.writers)} writer groups for "
                             f"{len(backend.controllers)} controllers: use ioc_class()")
        self._stream_lock = asyncio.Lock()
        for writer, controller in zip(self.writers, backend.controllers):
            writer.attach(controller, self._stream_lock)
        self.first_writer: WriterPVs = self.groups[ALIASED_WRITER]
        self._alias_first_writer()
        self._rate_sample: tuple[float, int] | None = None
        self._shown_header: DataHeader | None = None
        self._stream_status = StreamStatus.WAITING
        slots = [self.LIVE1, self.LIVE2, self.LIVE3, self.LIVE4,
                 self.LIVE5, self.LIVE6, self.LIVE7, self.LIVE8]
        self.live = LiveView(backend.ring, slots, self.IMAGE, self.first_writer.MESSAGE.write,
                             backend.image_max_pixels)

    def leftovers_root(self) -> Path:
        return self.backend.controllers[0].output_root

    def _alias_first_writer(self) -> None:
        writer_prefix = self.first_writer.prefix
        for name, pv in list(self.first_writer.pvdb.items()):
            self.pvdb[self.prefix + name[len(writer_prefix):]] = pv

    # ---- start-up --------------------------------------------------------------------

    async def startup(self, async_lib: Any) -> None:
        """The IOC's own start-up (caproto's ``startup_hook``): each writer's statuses
        published and the live view sampled for the IOC's life, the record fields and
        the stream PVs filled in."""
        await asyncio.gather(*(writer.publish_statuses(async_lib) for writer in self.writers),
                             self._fill_in(), self.live.run(async_lib))

    async def _fill_in(self) -> None:
        await fill_record_fields(self)
        await self.OUTPUT_ROOT.write(str(self.backend.controllers[0].output_root))
        await self.PULSE_RATE.write(self.backend.pulse_rate)
        receiver = self.backend.receiver
        await self.STREAM.write(receiver.address, verify_value=False)
        await self.STREAM_MODE.write(receiver.mode.upper(), verify_value=False)

    @LIVE_RATE.putter
    async def LIVE_RATE(self, instance, value: float) -> float:
        return await self.live.set_rate(value)

    # ---- changing the stream ---------------------------------------------------------

    @STREAM.putter
    async def STREAM(self, instance, value: str) -> str:
        try:
            check_stream_address(value)
        except ValueError as error:
            await self._reject(str(error))
        await self._change_stream(value, self.STREAM_MODE.value)
        return value

    @STREAM_MODE.putter
    async def STREAM_MODE(self, instance, value: str) -> str:
        await self._change_stream(self.STREAM.value, value)
        return value

    async def _change_stream(self, address: str, mode: str) -> None:
        """Reconnect the receiver; refused while any writer is busy, since the ring is
        emptied (another stream's messages must never land in a file as this one's)."""
        async with self._stream_lock:
            busy = [writer.prefix.rstrip(":") for writer in self.writers
                    if writer.controller is not None and writer.controller.busy()]
            if busy:
                await self._reject(f"cannot change the stream while {', '.join(busy)} "
                                   f"{'is' if len(busy) == 1 else 'are'} acquiring: "
                                   "STOP or ABORT first")
            mode = mode.lower()
            if mode not in MODES:
                await self._reject(f"stream mode must be one of PULL, SUB, not {mode!r}")
            switched = self.backend.receiver.reconnect(address, mode)
            try:
                await asyncio.wait_for(asyncio.wrap_future(switched), _SWITCH_TIMEOUT_S)
            except asyncio.TimeoutError:
                await self._reject("the receiver did not take the new stream in time")
            self._shown_header = None
            await self._publish_stream_channels()
            message = f"stream changed to {address} ({mode}); the buffer was emptied"
            log.info("%s", message)
            await self.first_writer.MESSAGE.write(message)

    async def _reject(self, reason: str) -> typing.NoReturn:
        log.warning("put refused: %s", reason)
        await self.first_writer.MESSAGE.write(reason)
        raise PutRejected(reason)

    # ---- statistics ------------------------------------------------------------------

    @RECEIVED.scan(period=STATS_PERIOD_S)
    async def RECEIVED(self, instance, async_lib) -> None:
        backend = self.backend
        received = backend.receiver.stats()
        ring = backend.ring.stats()
        await write_if_changed(self.RECEIVED, received.received)
        await write_if_changed(self.RECEIVE_RATE, self._rate(received.received))
        await write_if_changed(self.LAST_PULSE_ID, received.last_pulse_id or 0)
        await write_if_changed(self.MALFORMED, backend.malformed.total)
        await write_if_changed(self.PULSE_ID_ANOMALIES, received.pulse_id_anomalies)
        await write_if_changed(self.BUFFER_COUNT, ring.count)
        await write_if_changed(self.BUFFER_BYTES, ring.nbytes)
        await write_if_changed(self.BUFFER_OLDEST_PULSE_ID, ring.oldest_pulse_id or 0)
        if backend.forwarder is not None:
            await write_if_changed(self.FORWARD_DROPPED, backend.forwarder.dropped)
        await self._publish_stream_status(received)
        await self._publish_stream_channels()

    async def _publish_stream_status(self, received) -> None:
        """STREAM_STATUS, MAJOR while silent or unresolved; the alarm told in MESSAGE and
        the log, its end in the log (MESSAGE keeps telling the operator's last command)."""
        backend = self.backend
        interval = backend.ring.typical_pulse_step() / backend.pulse_rate \
            if backend.ring.stats().count else None
        status, why = stream_status(time.monotonic(), received.last_arrival,
                                    received.listening_since, interval, received.unresolved)
        if status is self._stream_status:
            return
        self._stream_status = status
        alarm = status in (StreamStatus.SILENT, StreamStatus.UNRESOLVED)
        await self.STREAM_STATUS.write(
            status.name, status=AlarmStatus.COMM if alarm else AlarmStatus.NO_ALARM,
            severity=AlarmSeverity.MAJOR_ALARM if alarm else AlarmSeverity.NO_ALARM)
        message = f"stream {backend.receiver.address}: {why}"
        (log.warning if alarm else log.info)("%s", message)
        if alarm:
            await self.first_writer.MESSAGE.write(message)

    async def _publish_stream_channels(self) -> None:
        newest = self.backend.ring.newest()
        header = newest.header if newest is not None else None
        if header is self._shown_header:
            return
        self._shown_header = header
        names = [spec.name for spec in header.channels] if header is not None else []
        await write_if_changed(self.STREAM_CHANNELS, _lines_that_fit(names))
        await write_if_changed(self.STREAM_CHANNEL_COUNT, len(names))

    def _rate(self, received: int) -> float:
        now = time.monotonic()
        previous, self._rate_sample = self._rate_sample, (now, received)
        if previous is None or now <= previous[0]:
            return 0.0
        return (received - previous[1]) / (now - previous[0])


def ioc_class(writers: int = DEFAULT_WRITERS) -> type[SfbwIOC]:
    """The IOC with ``writers`` writer SubGroups ``W1:`` ... (declared, as every PV)."""
    if writers < 1:
        raise ValueError("the IOC needs at least one writer")
    groups = {f"W{n}": SubGroup(WriterPVs, prefix=f"W{n}:", doc=f"Writer {n}")
              for n in range(1, writers + 1)}
    return type("SfbwIOC", (SfbwIOC,), {"__module__": __name__,
                                        "__doc__": SfbwIOC.__doc__, **groups})


def _lines_that_fit(names: list[str]) -> str:
    """The names a line each, as many as fit the PV (whole lines only)."""
    text = "\n".join(names)
    if len(text.encode()) <= STREAM_CHANNELS_LENGTH:
        return text
    cut = text.encode()[:STREAM_CHANNELS_LENGTH].decode(errors="ignore")
    return cut[:cut.rfind("\n")]
