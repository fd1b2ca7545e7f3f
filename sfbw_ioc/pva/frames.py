"""NTNDArray PVs of the live view, from the sampler's rounds (decoded off the loop):

    <prefix>IMAGE               the IMAGE:NAME camera's newest frame, in its own type and
                                full size (IMAGE:ARRAY is its binned float32 for CA)
    <prefix>IMAGE:COMPRESSED    the same frame as it sits in the ring: bitshuffle_lz4,
                                as areaDetector's NDPluginCodec makes "bslz4" (below)
    <prefix>LIVEn, LIVEn:COMPRESSED   the same for each live slot's value

uniqueId is the pulse id modulo 2**31 (an int32); the exact pulse id is the NTAttribute
``pulse_id``; dataTimeStamp and timeStamp are the message's global timestamp.

"bslz4" as NDPluginCodec and NDPluginPva (ntndArrayConverter) write it and areaDetector's
viewers read it: the value is ``bshuf_compress_lz4``'s output (the LZ4 blocks, without the
12-byte header of the HDF5 filter's chunk, which bsread sends) in ``ubyteValue``, decoded
with bitshuffle's default block size; ``codec.parameters`` is the uncompressed type's
pvData ScalarType code as an int32 (also for an uncompressed frame); ``compressedSize``
the value's bytes, ``uncompressedSize`` the frame's. A chunk in other blocks is served
uncompressed.
"""
from __future__ import annotations

import logging
from typing import Callable, Iterable

import numpy as np
from p4p import Value
from p4p.nt import NTNDArray
from p4p.server.asyncio import SharedPV

from ..bsread.compression import bitshuffle_lz4_blocks
from ..live.sampler import ChannelSample, ImageSample, Samples
from .ondemand import OnDemand
from .values import pva_stamp_from_epics

log = logging.getLogger(__name__)

CODEC = "bslz4"
_UNIQUE_ID_MODULUS = 2**31
_MINOR = 1
# pvData's ScalarType codes, which ntndArrayConverter puts in codec.parameters.
_SCALAR_TYPES = {"b1": 0, "i1": 1, "i2": 2, "i4": 3, "i8": 4, "u1": 5, "u2": 6, "u4": 7,
                 "u8": 8, "f4": 9, "f8": 10}
_UNION_MEMBERS = {"b1": "booleanValue", "i1": "byteValue", "i2": "shortValue",
                  "i4": "intValue", "i8": "longValue", "u1": "ubyteValue",
                  "u2": "ushortValue", "u4": "uintValue", "u8": "ulongValue",
                  "f4": "floatValue", "f8": "doubleValue"}
_TYPE = NTNDArray.buildType()

Sample = ChannelSample | ImageSample


def _key(dtype: np.dtype) -> str:
    return f"{dtype.kind}{dtype.itemsize}"


def ndarray_value(sample: Sample, packed: bool) -> Value:
    """``sample``'s value as an NTNDArray: decompressed, or (``packed``) as in the ring
    where it is bitshuffle_lz4 there."""
    full = sample.full
    assert full is not None
    shape = full.shape or (1,)
    fields = {
        "uniqueId": sample.pulse_id % _UNIQUE_ID_MODULUS,
        "dataTimeStamp": pva_stamp_from_epics(sample.stamp),
        "timeStamp": pva_stamp_from_epics(sample.stamp),
        "alarm": {"severity": 0, "status": 0, "message": ""},
        "dimension": [{"size": size, "offset": 0, "fullSize": size, "binning": 1,
                       "reverse": False} for size in reversed(shape)],
        # ColorMode an int32, as areaDetector's NDAttribute: 0 is mono.
        "attribute": [{"name": "pulse_id", "value": sample.pulse_id,
                       "descriptor": "bsread pulse id"},
                      *([{"name": "ColorMode", "value": ("i", 0)}] if full.ndim == 2 else [])],
        "uncompressedSize": full.nbytes,
    }
    blocks = _bslz4_blocks(sample) if packed else None
    codec = {"parameters": ("i", _SCALAR_TYPES[_key(full.dtype)])}
    if blocks is not None:
        chunk = np.frombuffer(blocks, dtype=np.uint8)
        fields.update(value=("ubyteValue", chunk), compressedSize=chunk.nbytes,
                      codec={"name": CODEC, **codec})
    else:
        fields.update(value=(_UNION_MEMBERS[_key(full.dtype)], full.reshape(-1)),
                      compressedSize=full.nbytes, codec={"name": "", **codec})
    return Value(_TYPE, fields)


def _bslz4_blocks(sample: Sample) -> memoryview | None:
    full = sample.full
    if sample.packed is None or full is None:
        return None
    return bitshuffle_lz4_blocks(sample.packed, full.dtype.itemsize, full.nbytes)


def _problem(problem: str) -> Value:
    return Value(_TYPE, {"alarm": {"severity": _MINOR, "status": 0, "message": problem}})


class _FramePV(OnDemand):
    """The newest shown sample as an NTNDArray, made when a client has the PV."""

    def __init__(self, packed: bool) -> None:
        super().__init__()
        self._packed = packed
        self._sample: Sample | None = None

    def current(self) -> Value:
        sample = self._sample
        if sample is None:
            return Value(_TYPE, {"codec": {"name": "", "parameters": ("i", 0)}})
        if sample.problem:
            return _problem(sample.problem)
        return ndarray_value(sample, self._packed)

    def show(self, sample: Sample) -> None:
        self._sample = sample
        self.post(self.current)


class FramePair:
    """One value served twice: decompressed at ``name``, as in the ring at
    ``name``:COMPRESSED. ``chosen`` is the channel its NAME PV names now."""

    def __init__(self, name: str, chosen: Callable[[], str]) -> None:
        self.name = name
        self._chosen = chosen
        self._plain, self._packed = _FramePV(packed=False), _FramePV(packed=True)

    def served(self) -> dict[str, SharedPV]:
        return {self.name: self._plain.shared, f"{self.name}:COMPRESSED": self._packed.shared}

    def publish(self, sample: Sample | None) -> None:
        # A sample of a channel no longer chosen (a NAME put since) is not shown.
        if sample is None or sample.name != self._chosen().strip():
            return
        if sample.problem or sample.full is not None:
            self._plain.show(sample)
            self._packed.show(sample)


class LiveFrames:
    """The NTNDArray PVs of the image and the slots, fed with each sampler round."""

    def __init__(self, image: FramePair, slots: Iterable[FramePair]) -> None:
        self._image = image
        self._slots = list(slots)

    def served(self) -> dict[str, SharedPV]:
        served = self._image.served()
        for slot in self._slots:
            served.update(slot.served())
        return served

    def on_samples(self, samples: Samples) -> None:
        try:
            if samples.image is not None:
                self._image.publish(samples.image)
            if samples.channels is not None:
                for slot, sample in zip(self._slots, samples.channels):
                    slot.publish(sample)
        except Exception:  # a frame PVA cannot carry must not end the CA live view
            log.exception("PV Access frames: publishing failed")
