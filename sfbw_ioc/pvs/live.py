"""The live view's PVs: chosen channels of the newest buffered message (``LIVEn:``) and a
camera frame (``IMAGE:``), written with the message's global timestamp.

The sampler thread (``live.sampler``) does the decoding; the loop only writes what it
hands over.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any, Awaitable, Callable, Sequence

from caproto import AlarmSeverity, AlarmStatus, ChannelType
from caproto.server import PVGroup, pvproperty

from ..live.sampler import (DEFAULT_IMAGE_MAX_PIXELS, MAX_VALUE_ELEMENTS, ChannelSample,
                            ImageSample, Sampler, Samples)
from ..stream.ring import RingBuffer
from .kinds import PutRejected, pulse_id_pv, subscription_backlog, text_pv

log = logging.getLogger(__name__)

MAX_RATE_HZ = 10.0
NAME_LENGTH = 256
TEXT_LENGTH = 1024
# IMAGE:ARRAY's element count (NELM) is fixed when the PV is defined, before the command
# line is read: --image-max-pixels may lower it. 4 MiB of float32: a client's
# EPICS_CA_MAX_ARRAY_BYTES must be at least that (libca's default is 16 kB).
IMAGE_ARRAY_LENGTH = DEFAULT_IMAGE_MAX_PIXELS

Report = Callable[[str], Awaitable[Any]]


def rate_pv(doc: str, default: float, **kwargs: Any) -> pvproperty:
    """A sampling rate in Hz, 0 < rate <= MAX_RATE_HZ (its putter: ``checked_rate``)."""
    return pvproperty(value=default, dtype=float, precision=1, units="Hz", record="ao",
                      lower_ctrl_limit=0.0, upper_ctrl_limit=MAX_RATE_HZ, doc=doc, **kwargs)


async def checked_rate(value: float, report: Report) -> float:
    """``value`` when it is a usable rate; else ``report`` why and raise PutRejected
    (0 would never sample, and caproto's control limits let it through)."""
    if not 0 < value <= MAX_RATE_HZ:
        reason = f"a live rate must be above 0 and at most {MAX_RATE_HZ:g} Hz, not {value:g}"
        log.warning("put refused: %s", reason)
        await report(reason)
        raise PutRejected(reason)
    return float(value)

# ---- the PVs --------------------------------------------------------------------------

async def _set_alarm(pv, problem: str | None) -> bool:
    """MINOR alarm on ``pv`` while there is a ``problem``; True when it just began."""
    severity = AlarmSeverity.MINOR_ALARM if problem else AlarmSeverity.NO_ALARM
    if pv.alarm.severity == severity:
        return False
    await pv.alarm.write(status=AlarmStatus.LINK if problem else AlarmStatus.NO_ALARM,
                         severity=severity)
    return problem is not None


class LiveSlot(PVGroup):
    """One channel of the stream, as ``LIVEn:``."""

    NAME = text_pv("Channel to show (empty: off)", max_length=NAME_LENGTH,
                    alarm_group="NAME")
    # Up to 512 KiB of float64 an update, at LIVE_RATE: two queued for a slow client.
    VALUE = pvproperty(value=[0.0], dtype=float, max_length=MAX_VALUE_ELEMENTS,
                       max_subscription_backlog=subscription_backlog(8 * MAX_VALUE_ELEMENTS),
                       record="waveform", read_only=True, alarm_group="VALUE",
                       doc="Value (a scalar: one element)")
    TEXT = text_pv("Value of a string channel", read_only=True, max_length=TEXT_LENGTH,
                    alarm_group="TEXT")
    PULSE_ID = pulse_id_pv("Pulse id of the value", read_only=True, alarm_group="PULSE_ID")
    TIMESTAMP = pvproperty(value=0.0, dtype=float, precision=6, units="s", record="ai",
                           read_only=True, alarm_group="TIMESTAMP",
                           doc="Channel timestamp, s since epoch")
    PRESENT = pvproperty(value="Absent", dtype=ChannelType.ENUM,
                         enum_strings=("Absent", "Present"), record="bo", read_only=True,
                         alarm_group="PRESENT", doc="In the newest message")

    def attach(self, sampler: Sampler, index: int, report: Report) -> None:
        self._sampler, self._index, self._report = sampler, index, report

    @NAME.putter
    async def NAME(self, instance, value: str) -> str:
        self._sampler.select(self._index, value.strip())
        return value

    async def publish(self, sample: ChannelSample | None) -> None:
        if _stale(sample, self.NAME):
            return
        if await _set_alarm(self.NAME, sample.problem if sample else None):
            await self._report(f"{self.NAME.pvname} {sample.name!r}: {sample.problem}")
        if sample is None or sample.problem:
            return
        stamp = sample.stamp
        if sample.value is not None:
            await self.VALUE.write(sample.value, timestamp=stamp)
        if sample.text is not None:
            await self.TEXT.write(_fit_utf8(sample.text, TEXT_LENGTH), timestamp=stamp)
        await self.PULSE_ID.write(sample.pulse_id, timestamp=stamp)
        await self.TIMESTAMP.write(sample.timestamp_s, timestamp=stamp)
        await self.PRESENT.write("Present" if sample.present else "Absent", timestamp=stamp)


class LiveImage(PVGroup):
    """The newest frame of a camera channel, as ``IMAGE:`` (areaDetector NDStdArrays
    style: the image as a waveform plus its sizes)."""

    NAME = text_pv("Camera channel to show (empty: off)", max_length=NAME_LENGTH,
                    alarm_group="NAME")
    # Up to 4 MiB of float32 a frame: a slow client gets the newest frame, none queued
    # behind it.
    ARRAY = pvproperty(value=[0.0], dtype=ChannelType.FLOAT, max_length=IMAGE_ARRAY_LENGTH,
                       max_subscription_backlog=subscription_backlog(4 * IMAGE_ARRAY_LENGTH),
                       record="waveform", read_only=True, alarm_group="ARRAY",
                       doc="Image, row after row")
    WIDTH = pvproperty(value=0, dtype=int, record="longin", read_only=True,
                       alarm_group="sizes", doc="Image width as published")
    HEIGHT = pvproperty(value=0, dtype=int, record="longin", read_only=True,
                        alarm_group="sizes", doc="Image height as published")
    BINNING = pvproperty(value=1, dtype=int, record="longin", read_only=True,
                         alarm_group="sizes", doc="Binning factor used to fit")
    PULSE_ID = pulse_id_pv("Pulse id of the image", read_only=True, alarm_group="sizes")
    RATE = rate_pv("Image publishing rate", 1.0, alarm_group="RATE")

    def attach(self, sampler: Sampler, report: Report) -> None:
        self._sampler, self._report = sampler, report

    @NAME.putter
    async def NAME(self, instance, value: str) -> str:
        self._sampler.select_image(value.strip())
        if not value.strip():  # off: no frame comes to clear an alarm
            await _set_alarm(self.NAME, None)
        return value

    @RATE.putter
    async def RATE(self, instance, value: float) -> float:
        self._sampler.set_rates(image_rate=await checked_rate(value, self._report))
        return value

    async def publish(self, sample: ImageSample) -> None:
        if _stale(sample, self.NAME):
            return
        if await _set_alarm(self.NAME, sample.problem):
            await self._report(f"{self.NAME.pvname} {sample.name!r}: {sample.problem}")
        if sample.problem:
            return
        stamp = sample.stamp
        # Sizes before the array: a client that redraws on the array sees its sizes.
        await self.WIDTH.write(sample.width, timestamp=stamp)
        await self.HEIGHT.write(sample.height, timestamp=stamp)
        await self.BINNING.write(sample.binning, timestamp=stamp)
        await self.PULSE_ID.write(sample.pulse_id, timestamp=stamp)
        await self.ARRAY.write(sample.array, timestamp=stamp)


def _stale(sample: ChannelSample | ImageSample | None, name_pv) -> bool:
    """A sample of a channel no longer chosen: sampled before a NAME put that changed or
    cleared it (a frame takes tens of ms to decode), and not to be shown after it."""
    return sample is not None and sample.name != name_pv.value.strip()


def _fit_utf8(text: str, max_bytes: int) -> str:
    """``text`` cut to at most ``max_bytes`` of UTF-8, never inside a character."""
    return text.encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore")


class LiveView:
    """Wires the slots and the image to one sampler; ``run`` publishes its rounds."""

    def __init__(self, ring: RingBuffer, slots: Sequence[LiveSlot], image: LiveImage,
                 report: Report, image_max_pixels: int = DEFAULT_IMAGE_MAX_PIXELS) -> None:
        self._slots = list(slots)
        self._image = image
        self._report = report
        self._queue: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._listeners: list[Callable[[Samples], None]] = []
        self._sampler = Sampler(ring, len(self._slots), image_max_pixels, self._hand_over)
        for index, slot in enumerate(self._slots):
            slot.attach(self._sampler, index, report)
        image.attach(self._sampler, report)

    def add_listener(self, listener: Callable[[Samples], None]) -> None:
        """Call ``listener`` (in the loop) with every round after its PVs are written:
        the PV Access server's frames come from the same samples."""
        self._listeners.append(listener)

    async def set_rate(self, value: float) -> float:
        """LIVE_RATE's putter: the slots' sampling rate; PutRejected when out of range."""
        self._sampler.set_rates(rate=await checked_rate(value, self._report))
        return value

    async def run(self, async_lib) -> None:
        """Start sampling and publish every round until the server stops (a start-up
        hook: the queue must be made in the loop)."""
        self._loop = asyncio.get_running_loop()
        self._queue = async_lib.ThreadsafeQueue()
        self._sampler.start()
        try:
            while True:
                await self._publish(await self._queue.async_get())
        finally:
            self._sampler.stop()

    def _hand_over(self, samples: Samples) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put, samples)
        except RuntimeError:  # the loop is closed: the IOC is stopping
            pass

    async def _publish(self, samples: Samples) -> None:
        if samples.channels is not None:
            for slot, sample in zip(self._slots, samples.channels):
                await slot.publish(sample)
        if samples.image is not None:
            await self._image.publish(samples.image)
        for listener in self._listeners:
            listener(samples)
