"""The live view: chosen channels of the newest buffered message, and a camera frame, as PVs.

A sampler thread of its own looks at the ring at ``LIVE_RATE`` Hz (and ``IMAGE:RATE`` Hz
for the image), decodes only the chosen channels of the newest message and hands the
results to the event loop, which writes the PVs with the message's global timestamp. The
loop never decodes, and nothing happens per message: a frame stays compressed in the ring
until it is published.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Sequence

import numpy as np
from caproto import EPICS2UNIX_EPOCH, AlarmSeverity, AlarmStatus, ChannelType
from caproto.server import PVGroup, pvproperty

from .bsread import NS_PER_SECOND, ChannelSpec, MalformedMessage, decode_value
from .pvs import PutRejected, pulse_id_pv, text_pv
from .ring import RawMessage, RingBuffer

log = logging.getLogger(__name__)

MAX_RATE_HZ = 10.0
NAME_LENGTH = 256
TEXT_LENGTH = 1024
MAX_VALUE_ELEMENTS = 65_536
DEFAULT_IMAGE_MAX_PIXELS = 1_048_576
# IMAGE:ARRAY's element count (NELM) is fixed when the PV is defined, before the command
# line is read: --image-max-pixels may lower it. 4 MiB of float32: a client's
# EPICS_CA_MAX_ARRAY_BYTES must be at least that (libca's default is 16 kB).
IMAGE_ARRAY_LENGTH = DEFAULT_IMAGE_MAX_PIXELS
_NOT_CARRIED = "the stream does not carry it"

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
        await report(reason)
        raise PutRejected(reason)
    return float(value)


# ---- what the sampler finds (plain data, made in the sampler thread) ----------------

# A PV's timestamp as caproto takes it exactly: (seconds, nanoseconds) since the EPICS
# epoch (1990). A float of Unix seconds would lose the nanoseconds.
Stamp = tuple[int, int]


@dataclass(frozen=True, slots=True)
class ChannelSample:
    """One channel in the newest message. ``problem`` is set when the stream does not
    carry the channel (then only ``name`` means something)."""

    name: str
    problem: str | None = None
    present: bool = False
    value: np.ndarray | None = None  # float64, 1-D, at most MAX_VALUE_ELEMENTS
    text: str | None = None  # for a string channel
    pulse_id: int = 0
    timestamp_s: float = 0.0  # the channel's own, 0 when absent
    stamp: Stamp = (0, 0)  # the message's global timestamp


@dataclass(frozen=True, slots=True)
class ImageSample:
    """The newest frame of a channel, binned to fit, or the ``problem`` it has."""

    name: str
    problem: str | None = None
    array: np.ndarray | None = None  # float32, 1-D, row after row
    width: int = 0
    height: int = 0
    binning: int = 1
    pulse_id: int = 0
    stamp: Stamp = (0, 0)


def _stamp(unix_ns: int) -> Stamp:
    seconds, nanoseconds = divmod(unix_ns, NS_PER_SECOND)
    return int(seconds) - int(EPICS2UNIX_EPOCH), int(nanoseconds)


def _channel_index(message: RawMessage, name: str) -> int | None:
    for index, spec in enumerate(message.header.channels):
        if spec.name == name:
            return index
    return None


def _value_parts(message: RawMessage, index: int):
    return message.part(2 + 2 * index), message.part(3 + 2 * index)


def sample_channel(message: RawMessage, name: str) -> ChannelSample:
    """Decode channel ``name`` of ``message`` (only that one)."""
    index = _channel_index(message, name)
    if index is None:
        return ChannelSample(name, problem=_NOT_CARRIED)
    spec = message.header.channels[index]
    common = {"pulse_id": message.pulse_id, "stamp": _stamp(message.global_timestamp_ns)}
    try:
        decoded = decode_value(spec, *_value_parts(message, index))
    except MalformedMessage as error:
        log.debug("live view: %s in pulse %d: %s", name, message.pulse_id, error)
        return ChannelSample(name, **common)
    if decoded.value is None:
        return ChannelSample(name, **common)
    timestamp_s = decoded.timestamp_ns / NS_PER_SECOND
    if isinstance(decoded.value, str):
        return ChannelSample(name, present=True, text=decoded.value,
                             timestamp_s=timestamp_s, **common)
    flat = np.asarray(decoded.value, dtype=np.float64).reshape(-1)[:MAX_VALUE_ELEMENTS]
    return ChannelSample(name, present=True, value=flat, timestamp_s=timestamp_s, **common)


def binning_factor(height: int, width: int, max_pixels: int) -> int:
    """The smallest integer b with (height // b) * (width // b) <= max_pixels."""
    factor = 1
    while (height // factor) * (width // factor) > max_pixels:
        factor += 1
    return factor


def binned(image: np.ndarray, factor: int) -> np.ndarray:
    """``image`` (2-D) averaged over factor x factor blocks, as float32; rows and columns
    that do not fill a block are left out. Sums of 8- and 16-bit pixels are exact in
    uint32 (up to factor 256): rows first (contiguous), then along each row."""
    if factor == 1:
        return image.astype(np.float32)
    height, width = image.shape[0] // factor, image.shape[1] // factor
    small_int = image.dtype.kind in "ui" and image.dtype.itemsize <= 2 and factor <= 256
    total = np.int64 if small_int else np.float64
    rows = image[:height * factor, :width * factor].reshape(height, factor, -1).sum(
        axis=1, dtype=total)
    blocks = rows.reshape(height, width, factor).sum(axis=2, dtype=total)
    return (blocks / float(factor * factor)).astype(np.float32)


def _carries(name: str) -> Callable[[RawMessage], bool]:
    def carries(message: RawMessage) -> bool:
        index = _channel_index(message, name)
        return index is not None and len(message.part(2 + 2 * index)) > 0
    return carries


def _image_problem(spec: ChannelSpec) -> str | None:
    if spec.type in ("string", "bool") or len(spec.shape) != 2:
        return f"not an image ({spec.type}, shape {list(spec.shape)}): 2-D numbers only"
    return None


def sample_image(ring: RingBuffer, name: str, max_pixels: int) -> ImageSample | None:
    """The newest buffered frame of ``name``, decompressed and binned; None when the ring
    holds none (a camera slower than the stream: the last frame stays published)."""
    message = ring.newest(_carries(name))
    if message is None:
        newest = ring.newest()
        if newest is not None and _channel_index(newest, name) is None:
            return ImageSample(name, problem=_NOT_CARRIED)
        return None
    index = _channel_index(message, name)
    assert index is not None
    spec = message.header.channels[index]
    problem = _image_problem(spec)
    if problem is not None:
        return ImageSample(name, problem=problem)
    try:
        image = decode_value(spec, *_value_parts(message, index)).value
    except MalformedMessage as error:
        return ImageSample(name, problem=f"pulse {message.pulse_id}: {error}")
    factor = binning_factor(*image.shape, max_pixels)
    array = binned(image, factor)
    return ImageSample(name, array=array.reshape(-1), width=array.shape[1],
                       height=array.shape[0], binning=factor, pulse_id=message.pulse_id,
                       stamp=_stamp(message.global_timestamp_ns))


# ---- the sampler thread ---------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Samples:
    """One round of the sampler: per slot a sample or None (slot off); the image's."""

    channels: list[ChannelSample | None] | None
    image: ImageSample | None


class Sampler:
    """Thread: samples the ring's newest message at the slots' rate and the newest frame
    at the image's rate, and passes each round to ``deliver`` (never from the loop)."""

    def __init__(self, ring: RingBuffer, slots: int, max_pixels: int,
                 deliver: Callable[[Samples], None]) -> None:
        self._ring = ring
        self._max_pixels = max_pixels
        self._deliver = deliver
        self._lock = threading.Lock()
        self._names = [""] * slots
        self._image_name = ""
        self._rate = 2.0
        self._image_rate = 1.0
        self._changed = threading.Event()  # a selection or rate changed: sample now
        self._stopping = False
        self._last_message: RawMessage | None = None
        self._thread = threading.Thread(target=self._run, name="live-view", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        self._changed.set()
        self._thread.join(5)

    def select(self, slot: int, name: str) -> None:
        with self._lock:
            self._names[slot] = name
        self._changed.set()

    def select_image(self, name: str) -> None:
        with self._lock:
            self._image_name = name
        self._changed.set()

    def set_rates(self, rate: float | None = None, image_rate: float | None = None) -> None:
        with self._lock:
            self._rate = rate or self._rate
            self._image_rate = image_rate or self._image_rate
        self._changed.set()

    def _run(self) -> None:
        next_channels = next_image = time.monotonic()
        while not self._stopping:
            now = time.monotonic()
            changed = self._changed.is_set()
            self._changed.clear()
            with self._lock:
                names, image_name = list(self._names), self._image_name
                rate, image_rate = self._rate, self._image_rate
            if changed:
                next_channels = next_image = now
            try:
                channels = image = None
                if now >= next_channels:
                    next_channels = now + 1 / rate
                    channels = self._sample_channels(names, force=changed)
                if now >= next_image:
                    next_image = now + 1 / image_rate
                    image = self._sample_image(image_name)
                if channels is not None or image is not None:
                    self._deliver(Samples(channels, image))
            except Exception:  # the live view must never end the IOC
                log.exception("live view sampling failed")
            self._changed.wait(max(0.0, min(next_channels, next_image) - time.monotonic()))

    def _sample_channels(self, names: list[str], force: bool) -> list | None:
        message = self._ring.newest()
        if message is None or (message is self._last_message and not force):
            return None  # nothing new since the last round
        self._last_message = message
        return [sample_channel(message, name) if name else None for name in names]

    def _sample_image(self, name: str) -> ImageSample | None:
        return sample_image(self._ring, name, self._max_pixels) if name else None


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
    VALUE = pvproperty(value=[0.0], dtype=float, max_length=MAX_VALUE_ELEMENTS,
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
        await self.PULSE_ID.write(float(sample.pulse_id), timestamp=stamp)
        await self.TIMESTAMP.write(sample.timestamp_s, timestamp=stamp)
        await self.PRESENT.write("Present" if sample.present else "Absent", timestamp=stamp)


class LiveImage(PVGroup):
    """The newest frame of a camera channel, as ``IMAGE:`` (areaDetector NDStdArrays
    style: the image as a waveform plus its sizes)."""

    NAME = text_pv("Camera channel to show (empty: off)", max_length=NAME_LENGTH,
                    alarm_group="NAME")
    ARRAY = pvproperty(value=[0.0], dtype=ChannelType.FLOAT, max_length=IMAGE_ARRAY_LENGTH,
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
        await self.PULSE_ID.write(float(sample.pulse_id), timestamp=stamp)
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
        self._sampler = Sampler(ring, len(self._slots), image_max_pixels, self._hand_over)
        for index, slot in enumerate(self._slots):
            slot.attach(self._sampler, index, report)
        image.attach(self._sampler, report)

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
