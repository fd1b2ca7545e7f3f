"""The live view's sampler: a thread of its own that looks at the ring at ``LIVE_RATE`` Hz
(and ``IMAGE:RATE`` Hz for the image), decodes only the chosen channels of the newest
message and hands each round to a ``deliver`` callable. Nothing happens per message: a
frame stays compressed in the ring until it is sampled. Its PVs: ``pvs.live``.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..bsread import NS_PER_SECOND, Buffer, ChannelSpec, MalformedMessage, decode_value
from ..stream.message import RawMessage
from ..stream.ring import RingBuffer

log = logging.getLogger(__name__)

MAX_VALUE_ELEMENTS = 65_536
DEFAULT_IMAGE_MAX_PIXELS = 1_048_576
_NOT_CARRIED = "the stream does not carry it"
# The EPICS epoch (1990-01-01) in Unix seconds.
_EPICS_EPOCH_UNIX_S = 631_152_000



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
    # The value as sent (own type and shape, native byte order) and, when it came
    # bitshuffle_lz4-compressed, its chunk as it sits in the ring: for PV Access.
    full: np.ndarray | None = None
    packed: Buffer | None = None
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
    full: np.ndarray | None = None  # as ChannelSample's: the frame unbinned, own type
    packed: Buffer | None = None


def _stamp(unix_ns: int) -> Stamp:
    seconds, nanoseconds = divmod(unix_ns, NS_PER_SECOND)
    return int(seconds) - _EPICS_EPOCH_UNIX_S, int(nanoseconds)


def _channel_index(message: RawMessage, name: str) -> int | None:
    for index, spec in enumerate(message.header.channels):
        if spec.name == name:
            return index
    return None


def _value_parts(message: RawMessage, index: int):
    return message.part(2 + 2 * index), message.part(3 + 2 * index)


def _as_sent(spec: ChannelSpec, value: np.ndarray, part: Buffer
             ) -> tuple[np.ndarray, Buffer | None]:
    """The value in native byte order, and its compressed chunk when it has one that a
    client can decompress as it is (bitshuffle_lz4 of little-endian numbers)."""
    native = value.astype(value.dtype.newbyteorder("="), copy=False)
    packed = part if spec.compression == "bitshuffle_lz4" and spec.encoding == "little" \
        else None
    return native, packed


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
    full, packed = _as_sent(spec, np.asarray(decoded.value), message.part(2 + 2 * index))
    flat = full.reshape(-1)[:MAX_VALUE_ELEMENTS].astype(np.float64)
    return ChannelSample(name, present=True, value=flat, timestamp_s=timestamp_s,
                         full=full, packed=packed, **common)


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
    full, packed = _as_sent(spec, image, message.part(2 + 2 * index))
    return ImageSample(name, array=array.reshape(-1), width=array.shape[1],
                       height=array.shape[0], binning=factor, pulse_id=message.pulse_id,
                       stamp=_stamp(message.global_timestamp_ns), full=full, packed=packed)


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
