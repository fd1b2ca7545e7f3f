"""The bsread data model: type names, sizes, bounds, headers as parsed, channel values
and the one error every decoder raises.

Everything here is shared by the other modules of the package; it knows nothing of
JSON, compression or sockets. How a channel looks on the wire (``wire_dtype``,
``value_nbytes``, ``is_direct_chunk``) is derived from its ``ChannelSpec`` alone.
"""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np

# bsread type name -> numpy type code (byte order added from the channel's encoding).
BSREAD_TYPES: dict[str, str] = {
    "int8": "i1",
    "uint8": "u1",
    "int16": "i2",
    "uint16": "u2",
    "int32": "i4",
    "uint32": "u4",
    "int64": "i8",
    "uint64": "u8",
    "float32": "f4",
    "float64": "f8",
    "bool": "?",
    "string": "u1",
}
COMPRESSIONS = ("none", "lz4", "bitshuffle_lz4")
ENCODINGS = ("little", "big")

# Any object exporting a contiguous byte buffer: bytes, memoryview, zmq.Frame, ...
Buffer = Any

NS_PER_SECOND = 1_000_000_000
TIMESTAMP_SIZE = 16
LZ4_HEADER_SIZE = 4
BSLZ4_HEADER_SIZE = 12

# Bounds on what a (possibly lying) message can make us allocate. Values are also bounded
# by their declared shape; strings and data headers have no declared size.
MAX_VALUE_BYTES = 1 << 30
MAX_STRING_BYTES = 64 << 20
# Parsed JSON costs up to ~25 times its text (e.g. "[{},{},...]"), so header texts are
# bounded tightly: a real main header has ~150 bytes, a data header ~100 per channel
# (4 MiB: some 40,000 channels).
MAX_MAIN_HEADER_BYTES = 64 << 10
MAX_DATA_HEADER_BYTES = 4 << 20
# HDF5 datasets have at most 32 dimensions, and the writer adds one for the rows.
MAX_SHAPE_DIMS = 31

# A channel timestamp: seconds and nanoseconds, in the channel's byte order.
TIMESTAMP_STRUCTS = {"little": struct.Struct("<qq"), "big": struct.Struct(">qq")}


class MalformedMessage(ValueError):
    """A message (or one channel of it) that does not follow the protocol.

    ``kind`` is a short, stable category ("main_header", "data_header", "part_count",
    "value_size", "compression", ...) so that callers can count and log once per kind.
    """

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail


@dataclass(frozen=True, slots=True)
class MainHeader:
    pulse_id: int
    global_timestamp_ns: int
    hash: str
    dh_compression: str  # one of COMPRESSIONS


@dataclass(frozen=True, slots=True)
class ChannelSpec:
    """One channel as declared in a data header.

    ``shape`` is in numpy order (slowest dimension first), ``()`` for a scalar; the wire
    sends it fastest first and ``[1]`` (or nothing) for a scalar.
    """

    name: str
    type: str  # lower-case bsread type, a key of BSREAD_TYPES
    shape: tuple[int, ...]
    encoding: str = "little"
    compression: str = "none"


@dataclass(frozen=True, slots=True)
class DataHeader:
    hash: str
    channels: tuple[ChannelSpec, ...]
    # Per channel: (exact value-part size or None, minimum value-part size). Derived once
    # per header so that check_structure is a single pass over the part lengths.
    value_part_sizes: tuple[tuple[int | None, int], ...] = field(
        init=False, repr=False, compare=False
    )
    # The lengths of every value and timestamp part when all channels have an exact size
    # and are present, else None: a steady stream is then checked by one list comparison.
    usual_part_lengths: list[int] | None = field(init=False, repr=False, compare=False)
    # The channels whose values go to HDF5 as chunks (see is_direct_chunk).
    chunk_channels: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        sizes = tuple(map(_value_part_size, self.channels))
        object.__setattr__(self, "value_part_sizes", sizes)
        usual = None
        if all(exact is not None for exact, _ in sizes):
            usual = [n for exact, _ in sizes for n in (exact, TIMESTAMP_SIZE)]
        object.__setattr__(self, "usual_part_lengths", usual)
        object.__setattr__(self, "chunk_channels", tuple(
            index for index, spec in enumerate(self.channels) if is_direct_chunk(spec)))


@dataclass(slots=True)
class ChannelValue:
    """One decoded channel value of one message.

    ``value``: a numpy array in native byte order with the spec's numpy shape (``()``
    for scalars; bool as numpy bool), a ``str`` for string channels, or ``None`` when
    the message carried no value for the channel (then ``spec`` is only what the sender
    declared, which the reference sender sets to float64/[1]: do not trust it).
    Arrays may be read-only views sharing memory with the message's frames.
    ``timestamp_ns``: the channel's own timestamp in ns since the epoch, 0 when absent.
    """

    spec: ChannelSpec
    value: np.ndarray | str | None
    timestamp_ns: int


@lru_cache(maxsize=None)
def numpy_dtype(type_: str, encoding: str) -> np.dtype:
    """The numpy dtype of a bsread type in the given byte order ("little" or "big")."""
    return np.dtype(BSREAD_TYPES[type_]).newbyteorder("<" if encoding == "little" else ">")


def wire_dtype(spec: ChannelSpec) -> np.dtype:
    """The numpy dtype of the channel's bytes on the wire (uint8 for strings)."""
    return numpy_dtype(spec.type, spec.encoding)


def value_nbytes(spec: ChannelSpec) -> int | None:
    """Uncompressed size of one value in bytes; None for strings (their length varies)."""
    if spec.type == "string":
        return None
    return math.prod(spec.shape) * wire_dtype(spec).itemsize


def _value_part_size(spec: ChannelSpec) -> tuple[int | None, int]:
    if spec.compression == "lz4":
        return None, LZ4_HEADER_SIZE
    if spec.compression == "bitshuffle_lz4":
        return None, BSLZ4_HEADER_SIZE
    return value_nbytes(spec), 0


def is_direct_chunk(spec: ChannelSpec) -> bool:
    """Images sent bitshuffle_lz4 go to HDF5 as they came, one image per chunk."""
    return (spec.compression == "bitshuffle_lz4" and len(spec.shape) >= 2
            and spec.type not in ("string", "bool") and spec.encoding == "little")
