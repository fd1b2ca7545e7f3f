"""bsread codec: main header, data header, channel values (decode and encode).

The wire format is described in ../shared/bsread/README.md. This module is pure
(no sockets, no threads, no files) so that the receiver, the writer and the simulator
share one definition of the format.

Contract used by the rest of the package:
- ``parse_main_header(part) -> MainHeader`` (cheap: the receiver calls it per message).
- ``HeaderCache.get(main, part) -> DataHeader``: parses a data header only when its
  hash changes.
- ``check_structure(header, frames)``: cheap per-message plausibility check (part count,
  sizes of uncompressed values and of timestamps); raises ``MalformedMessage``.
- ``decode_values(header, frames) -> (values, errors)``: full decode of every channel;
  a channel whose value cannot be decoded is returned absent and its error listed.
- ``encode_message(...) -> list[bytes]``: the reference sender's format; ``Encoder`` does
  the same but serialises and hashes each distinct data header only once.
- ``wire_dtype(spec)`` and ``value_nbytes(spec)``: how a channel's value looks on the wire
  (e.g. to store bitshuffle_lz4 values as HDF5 chunks without decompressing them).

``MalformedMessage.kind`` is one of "main_header", "data_header", "data_header_hash",
"part_count", "timestamp_size", "value_size", "compression" (undecodable lz4 or
bitshuffle data) and "string" (not UTF-8).

Every decoder treats its input as hostile: sizes declared inside a message are checked
against the data header (or a fixed bound) before anything is allocated.
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import struct
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Collection, Iterator, Sequence

import bitshuffle
import lz4.block
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

_MAX_PULSE_ID = 1 << 63
# An LZ4 block spends at least one byte per 255 bytes of output, and the LZ4 encoder never
# grows its input by more than its compressBound; a size outside both cannot be genuine.
_LZ4_MAX_RATIO = 255
# The reference sender's bitshuffle block (bitshuffle's own default): 8 KiB.
_BSLZ4_BLOCK_BYTES = 8192
_BSLZ4_HEADER = struct.Struct(">QI")
_BSLZ4_BLOCK_PREFIX = struct.Struct(">I")
_TIMESTAMP = {"little": struct.Struct("<qq"), "big": struct.Struct(">qq")}
# bitshuffle only cares about element size; unsigned views keep byte order out of it.
_UINT = {1: np.dtype("u1"), 2: np.dtype("u2"), 4: np.dtype("u4"), 8: np.dtype("u8")}


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


# --- shared by decode and encode -------------------------------------------------------


@lru_cache(maxsize=None)
def _dtype(type_: str, encoding: str) -> np.dtype:
    return np.dtype(BSREAD_TYPES[type_]).newbyteorder("<" if encoding == "little" else ">")


def wire_dtype(spec: ChannelSpec) -> np.dtype:
    """The numpy dtype of the channel's bytes on the wire (uint8 for strings)."""
    return _dtype(spec.type, spec.encoding)


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


def _md5(part: Buffer) -> str:
    return hashlib.md5(part, usedforsecurity=False).hexdigest()


def _compress(raw: bytes, compression: str, itemsize: int, big_endian: bool) -> bytes:
    if compression == "lz4":
        prefix = len(raw).to_bytes(LZ4_HEADER_SIZE, "big" if big_endian else "little")
        return prefix + lz4.block.compress(raw, store_size=False)
    if compression == "bitshuffle_lz4":
        block = _BSLZ4_BLOCK_BYTES // itemsize
        body = bitshuffle.compress_lz4(np.frombuffer(raw, _UINT[itemsize]), block)
        return _BSLZ4_HEADER.pack(len(raw), block * itemsize) + body.tobytes()
    return raw


def _decompress(
    part: Buffer,
    compression: str,
    itemsize: int,
    expected: int | None,
    limit: int,
    big_endian: bool,
) -> Buffer:
    """Uncompressed bytes of ``part``: exactly ``expected`` bytes when that is known,
    else at most ``limit``."""
    if compression == "none":
        return part
    if compression == "lz4":
        return _lz4_decompress(memoryview(part), expected, limit, big_endian)
    if compression == "bitshuffle_lz4":
        return _bslz4_decompress(memoryview(part), itemsize, expected, limit)
    raise MalformedMessage("compression", f"unknown compression {compression!r}")


def _lz4_decompress(
    view: memoryview, expected: int | None, limit: int, big_endian: bool
) -> bytes:
    if len(view) < LZ4_HEADER_SIZE:
        raise MalformedMessage("value_size", f"{len(view)}-byte lz4 value has no size prefix")
    payload = view[LZ4_HEADER_SIZE:]
    # lz4.block.decompress allocates the whole output first: no more than LZ4 can give.
    if expected is not None and expected > _LZ4_MAX_RATIO * len(payload):
        raise MalformedMessage(
            "value_size", f"{len(payload)} bytes of lz4 cannot hold {expected} bytes"
        )
    sizes = _lz4_sizes(view[:LZ4_HEADER_SIZE], len(payload), expected, limit, big_endian)
    if not sizes:
        raise MalformedMessage(
            "value_size",
            f"lz4 size prefix {view[:LZ4_HEADER_SIZE].hex()} does not give "
            + (f"the expected {expected} bytes" if expected is not None else "a plausible size"),
        )
    failure = ""
    for size in sizes:
        try:
            raw = lz4.block.decompress(payload, uncompressed_size=size)
        except (lz4.block.LZ4BlockError, ValueError, OverflowError) as exc:
            failure = str(exc)
            continue
        # python-lz4 takes uncompressed_size as a capacity, not as a promise.
        if len(raw) == size:
            return raw
        failure = f"decompressed to {len(raw)} bytes, prefix says {size}"
    raise MalformedMessage("compression", f"lz4: {failure}")


def _lz4_sizes(
    prefix: memoryview, payload_len: int, expected: int | None, limit: int, big_endian: bool
) -> list[int]:
    """Readings of the lz4 size prefix worth trying, most likely first.

    The reference Python sender writes the prefix in the channel's byte order, PSI's C++
    sender always big-endian; the wrong reading almost always gives an impossible size.
    """
    orders = ("big", "little") if big_endian else ("little", "big")
    readings = dict.fromkeys(int.from_bytes(prefix, order) for order in orders)
    if expected is not None:
        return [size for size in readings if size == expected]
    return [
        size
        for size in readings
        if size <= limit
        and size <= _LZ4_MAX_RATIO * payload_len
        and payload_len <= size + size // 255 + 16
    ]


def _bslz4_decompress(
    view: memoryview, itemsize: int, expected: int | None, limit: int
) -> memoryview:
    """bitshuffle_lz4, i.e. the HDF5 bitshuffle filter's chunk format.

    Decoded block by block with the bounds-checked LZ4 decoder: bitshuffle's own
    decompress_lz4 trusts the block sizes in the data and crashes the process on a
    corrupt one.
    """
    nbytes, count, block = _bslz4_layout(view, itemsize, expected, limit)
    blocks = _bslz4_blocks(view, count, block, itemsize)  # checks the layout: before allocating
    shuffled = bytearray(nbytes)
    start = 0
    for raw in blocks:
        shuffled[start : start + len(raw)] = raw
        start += len(raw)
    # Elements past the last multiple of 8 are stored as they are, after the blocks.
    shuffled[start:] = view[len(view) - (nbytes - start) :]
    unshuffled = bitshuffle.bitunshuffle(np.frombuffer(shuffled, _UINT[itemsize]), block)
    return memoryview(unshuffled).cast("B")


def _bslz4_layout(
    view: memoryview, itemsize: int, expected: int | None, limit: int
) -> tuple[int, int, int]:
    """(uncompressed bytes, elements, block size in elements) from a checked header."""
    if len(view) < BSLZ4_HEADER_SIZE:
        raise MalformedMessage("value_size", f"{len(view)}-byte bitshuffle_lz4 value has no header")
    nbytes, block_bytes = _BSLZ4_HEADER.unpack_from(view)
    if expected is not None and nbytes != expected:
        raise MalformedMessage(
            "value_size", f"bitshuffle_lz4 declares {nbytes} bytes, expected {expected}"
        )
    if expected is None and nbytes > limit:
        raise MalformedMessage(
            "value_size", f"bitshuffle_lz4 declares {nbytes} bytes, limit {limit}"
        )
    if nbytes % itemsize or not block_bytes or block_bytes % (8 * itemsize):
        raise MalformedMessage(
            "compression", f"bitshuffle_lz4: {nbytes} bytes in blocks of {block_bytes} bytes "
            f"do not fit {itemsize}-byte elements"
        )
    count = nbytes // itemsize
    # A block longer than the value is the same layout as one block of the value's
    # whole multiple of 8 (and bitunshuffle wants the block size to fit a C int).
    block = min(block_bytes // itemsize, max(8, count - count % 8))
    return nbytes, count, block


def _bslz4_blocks(view: memoryview, count: int, block: int, itemsize: int) -> Iterator[bytes]:
    """Every LZ4 block decompressed with the bounds-checked decoder. The layout is checked
    right here (raising MalformedMessage), before the caller allocates anything; the
    blocks are decompressed one by one as the result is iterated."""
    for _ in _bslz4_spans(view, count, block, itemsize):  # a walk that keeps nothing
        pass
    return _bslz4_decompressed_blocks(view, _bslz4_spans(view, count, block, itemsize))


def _bslz4_decompressed_blocks(
    view: memoryview, spans: Iterator[tuple[int, int, int]]
) -> Iterator[bytes]:
    try:
        for begin, end, size in spans:
            raw = lz4.block.decompress(view[begin:end], uncompressed_size=size)
            if len(raw) != size:
                raise MalformedMessage("compression", "bitshuffle_lz4: short block")
            yield raw
    except lz4.block.LZ4BlockError as exc:
        raise MalformedMessage("compression", f"bitshuffle_lz4: {exc}") from None


def _bslz4_spans(
    view: memoryview, count: int, block: int, itemsize: int
) -> Iterator[tuple[int, int, int]]:
    """(start, end, uncompressed size) of every LZ4 block, checked to tile the value
    exactly (a generator: a message of many tiny blocks must not become a big list)."""
    pos = BSLZ4_HEADER_SIZE
    for elements in _bslz4_block_elements(count, block):
        if pos + _BSLZ4_BLOCK_PREFIX.size > len(view):
            raise MalformedMessage("value_size", "bitshuffle_lz4 value truncated")
        (length,) = _BSLZ4_BLOCK_PREFIX.unpack_from(view, pos)
        pos += _BSLZ4_BLOCK_PREFIX.size
        if pos + length > len(view):
            raise MalformedMessage("value_size", "bitshuffle_lz4 value truncated")
        if elements * itemsize > _LZ4_MAX_RATIO * length:
            raise MalformedMessage(
                "value_size",
                f"bitshuffle_lz4 block of {length} bytes cannot hold {elements * itemsize}",
            )
        yield pos, pos + length, elements * itemsize
        pos += length
    if pos + (count % 8) * itemsize != len(view):
        raise MalformedMessage(
            "value_size", f"bitshuffle_lz4 blocks end at byte {pos} of {len(view)}"
        )


def _bslz4_block_elements(count: int, block: int) -> Iterator[int]:
    full, rest = divmod(count, block)
    yield from itertools.repeat(block, full)
    if rest >= 8:
        yield rest - rest % 8


# --- main header -----------------------------------------------------------------------


def parse_main_header(part: Buffer) -> MainHeader:
    """Parse the first part of a message; raises MalformedMessage("main_header", ...)."""
    obj = _load_header(part, "main_header", MAX_MAIN_HEADER_BYTES, "bsr_m")
    pulse_id = obj.get("pulse_id")
    # type(), not isinstance(): JSON true would otherwise pass as pulse id 1.
    if type(pulse_id) is not int or not 0 <= pulse_id < _MAX_PULSE_ID:
        raise MalformedMessage("main_header", f"pulse_id {pulse_id!r} is not a 64-bit id")
    digest = obj.get("hash")
    if not isinstance(digest, str) or not digest:
        raise MalformedMessage("main_header", f"hash {digest!r} is not a string")
    compression = _compression(obj.get("dh_compression"), "main_header")
    timestamp_ns = _global_timestamp_ns(obj.get("global_timestamp"))
    return MainHeader(pulse_id, timestamp_ns, digest, compression)


def _load_header(part: Buffer, kind: str, limit: int, htype: str) -> dict[str, Any]:
    """A header's JSON object, bounded in size and checked to be of its ``htype``."""
    if len(part) > limit:
        raise MalformedMessage(kind, f"{len(part)} bytes, limit {limit}")
    obj = _load_json(part, kind)
    found = obj.get("htype")
    if not isinstance(found, str) or not found.startswith(htype):
        raise MalformedMessage(kind, f"htype {found!r} is not {htype}")
    return obj


def _load_json(part: Buffer, kind: str) -> dict[str, Any]:
    try:
        obj = json.loads(bytes(part))
    # UnicodeDecodeError is a ValueError; absurd nesting exhausts the recursion limit.
    except (ValueError, RecursionError) as exc:
        raise MalformedMessage(kind, f"not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise MalformedMessage(kind, "not a JSON object")
    return obj


def _global_timestamp_ns(stamp: Any) -> int:
    if stamp is None:
        return 0  # unknown; the pulse id still orders the message
    if not isinstance(stamp, dict):
        raise MalformedMessage("main_header", f"global_timestamp {stamp!r} is not an object")
    sec, ns = stamp.get("sec", 0), stamp.get("ns", 0)
    if type(sec) is not int or type(ns) is not int or sec < 0 or ns < 0:
        raise MalformedMessage("main_header", f"global_timestamp {stamp!r} is not sec/ns")
    return sec * NS_PER_SECOND + ns


def _compression(value: Any, kind: str) -> str:
    if value is None:
        return "none"
    if not isinstance(value, str) or value not in COMPRESSIONS:
        raise MalformedMessage(kind, f"unknown compression {value!r}")
    return value


# --- data header -----------------------------------------------------------------------


def parse_data_header(part: Buffer, compression: str) -> DataHeader:
    """Parse the second part of a message (``compression`` from the main header)."""
    return _parse_data_header(part, compression, _md5(part))


def _parse_data_header(part: Buffer, compression: str, digest: str) -> DataHeader:
    try:
        raw = _decompress(part, compression, 1, None, MAX_DATA_HEADER_BYTES, False)
    except MalformedMessage as exc:
        raise MalformedMessage("data_header", exc.detail) from None
    obj = _load_header(raw, "data_header", MAX_DATA_HEADER_BYTES, "bsr_d")
    channels = obj.get("channels")
    if not isinstance(channels, list):
        raise MalformedMessage("data_header", "channels is not a list")
    specs = tuple(map(_parse_channel, channels))
    if len({spec.name for spec in specs}) != len(specs):
        raise MalformedMessage("data_header", "duplicate channel names")
    return DataHeader(digest, specs)


def _parse_channel(obj: Any) -> ChannelSpec:
    if not isinstance(obj, dict):
        raise MalformedMessage("data_header", f"channel {obj!r} is not an object")
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        raise MalformedMessage("data_header", f"channel name {name!r} is not a string")
    if not _usable_name(name):
        raise MalformedMessage("data_header", f"channel name {name!r} cannot name an HDF5 group")
    try:
        spec = ChannelSpec(
            name,
            _channel_type(obj.get("type")),
            _channel_shape(obj.get("shape")),
            _channel_encoding(obj.get("encoding")),
            _compression(obj.get("compression"), "data_header"),
        )
    except MalformedMessage as exc:
        raise MalformedMessage("data_header", f"channel {name!r}: {exc.detail}") from None
    if (value_nbytes(spec) or 0) > MAX_VALUE_BYTES:
        raise MalformedMessage(
            "data_header", f"channel {name!r}: value of over {MAX_VALUE_BYTES} bytes"
        )
    return spec


def _usable_name(name: str) -> bool:
    """Names become HDF5 group names (with '/' escaped): UTF-8, no NUL, not '.'/'..'."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates, which json.loads lets through
        return False
    return "\0" not in name and name not in (".", "..")


def _channel_type(value: Any) -> str:
    return _one_of(value, BSREAD_TYPES, "float64", "type")


def _channel_shape(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(type(d) is int and d > 0 for d in value):
        raise MalformedMessage("data_header", f"shape {value!r} is not a list of sizes")
    if len(value) > MAX_SHAPE_DIMS:
        raise MalformedMessage("data_header", f"shape of {len(value)} dimensions")
    shape = tuple(reversed(value))  # the wire lists the fastest dimension first
    return () if shape == (1,) else shape


def _channel_encoding(value: Any) -> str:
    return _one_of(value, ENCODINGS, "little", "encoding")


def _one_of(value: Any, allowed: Collection[str], default: str, what: str) -> str:
    """A declared name, compared case-insensitively; ``default`` when not declared."""
    if value is None:
        return default
    name = value.lower() if isinstance(value, str) else None
    if name not in allowed:
        raise MalformedMessage("data_header", f"unknown {what} {value!r}")
    return name


class HeaderCache:
    """Data headers by hash: the sender repeats the header with every message, so it is
    parsed (and its hash checked) only when the hash was not seen recently.

    A few headers are kept, not one, because a stream can alternate between headers (a
    channel that has no value in every other pulse changes the declared type).
    """

    def __init__(self, size: int = 16) -> None:
        self._size = size
        self._headers: OrderedDict[tuple[str, str], DataHeader] = OrderedDict()
        self.parses = 0  # data headers actually parsed, for tests and statistics

    def get(self, main: MainHeader, part: Buffer) -> DataHeader:
        key = (main.hash, main.dh_compression)
        header = self._headers.get(key)
        if header is not None:
            self._headers.move_to_end(key)
            return header
        digest = _md5(part)
        if digest != main.hash:
            raise MalformedMessage(
                "data_header_hash", f"md5 {digest} != main header hash {main.hash!r}"
            )
        self.parses += 1
        header = _parse_data_header(part, main.dh_compression, digest)
        self._headers[key] = header
        if len(self._headers) > self._size:
            self._headers.popitem(last=False)
        return header


# --- values ----------------------------------------------------------------------------


def check_structure(header: DataHeader, frames: Sequence[Buffer]) -> None:
    """Cheap plausibility check of a whole message (no decompression).

    Raises MalformedMessage with kind "part_count", "timestamp_size" or "value_size".
    """
    _check_part_count(header, frames)
    lengths = list(map(len, frames))
    if lengths[2:] == header.usual_part_lengths:
        return
    checks = zip(header.value_part_sizes, lengths[2::2], lengths[3::2])
    for index, ((exact, minimum), value_len, stamp_len) in enumerate(checks):
        if stamp_len != TIMESTAMP_SIZE:
            if stamp_len or value_len:  # both empty = no value in this pulse
                raise MalformedMessage(
                    "timestamp_size",
                    f"{header.channels[index].name}: {stamp_len}-byte timestamp "
                    f"with a {value_len}-byte value",
                )
        elif value_len < minimum or (exact is not None and value_len != exact):
            raise MalformedMessage(
                "value_size",
                f"{header.channels[index].name}: {value_len} bytes, expected "
                + (f"{exact}" if exact is not None else f"at least {minimum}"),
            )


def _check_part_count(header: DataHeader, frames: Sequence[Buffer]) -> None:
    expected = 2 + 2 * len(header.channels)
    if len(frames) != expected:
        raise MalformedMessage("part_count", f"{len(frames)} parts, expected {expected}")


def decode_value(spec: ChannelSpec, value_part: Buffer, timestamp_part: Buffer) -> ChannelValue:
    """Decode one channel of one message; raises MalformedMessage."""
    if not len(value_part) and not len(timestamp_part):
        return ChannelValue(spec, None, 0)
    value = _decode_payload(spec, value_part)
    return ChannelValue(spec, value, _decode_timestamp(spec, timestamp_part))


def decode_values(
    header: DataHeader, frames: Sequence[Buffer]
) -> tuple[list[ChannelValue], list[MalformedMessage]]:
    """Decode every channel; a channel that cannot be decoded comes back absent and its
    error is listed. Never raises MalformedMessage."""
    try:
        _check_part_count(header, frames)
    except MalformedMessage as exc:
        return [ChannelValue(spec, None, 0) for spec in header.channels], [exc]
    values, errors = [], []
    for index, spec in enumerate(header.channels):
        try:
            values.append(decode_value(spec, frames[2 + 2 * index], frames[3 + 2 * index]))
        except MalformedMessage as exc:
            values.append(ChannelValue(spec, None, 0))
            errors.append(MalformedMessage(exc.kind, f"{spec.name}: {exc.detail}"))
    return values, errors


@dataclass(slots=True)
class Column:
    """One channel over a run of messages that share a data header (``n`` rows).

    ``values``: for numbers an ``(n, *shape)`` native-order array with zeros where
    absent; for strings a list of ``str`` (``""`` where absent); for a direct-chunk
    channel (``chunked``) a list of the wire's bitshuffle_lz4 values, checked, which are
    HDF5 bitshuffle-filter chunks as they are (``None`` where absent).
    """

    spec: ChannelSpec
    present: np.ndarray  # bool (n,)
    timestamps: np.ndarray  # int64 (n,), ns since the epoch, 0 where absent
    values: np.ndarray | list
    chunked: bool = False


def is_direct_chunk(spec: ChannelSpec) -> bool:
    """Images sent bitshuffle_lz4 go to HDF5 as they came, one image per chunk."""
    return (spec.compression == "bitshuffle_lz4" and len(spec.shape) >= 2
            and spec.type not in ("string", "bool") and spec.encoding == "little")


def decode_columns(
    header: DataHeader, messages: Sequence[Sequence[Buffer]], chunks_checked: bool = False
) -> tuple[list[Column], list[tuple[int, MalformedMessage]]]:
    """Decode a run of messages channel by channel: one numpy operation per channel for
    plain values instead of one per value. A value that cannot be decoded comes back
    absent and is listed with its row. Never raises MalformedMessage.

    ``chunks_checked``: the messages passed ``corrupt_chunks`` already (the receiver's),
    their images are not checked again."""
    errors: list[tuple[int, MalformedMessage]] = []
    rows = []
    for row, frames in enumerate(messages):
        try:
            _check_part_count(header, frames)
            rows.append(frames)
        except MalformedMessage as exc:
            errors.append((row, exc))
            rows.append([b""] * (2 + 2 * len(header.channels)))
    columns = [
        _decode_column(spec, [f[2 + 2 * i] for f in rows], [f[3 + 2 * i] for f in rows], errors,
                       chunks_checked)
        for i, spec in enumerate(header.channels)
    ]
    return columns, errors


def decode_uniform_columns(
    header: DataHeader, rows: np.ndarray, offsets: Sequence[int], chunks_checked: bool = False
) -> tuple[list[Column], list[tuple[int, MalformedMessage]]]:
    """decode_columns for a run whose messages have parts of the same lengths, stacked
    as ``rows``, an (n, bytes) uint8 array: channel i's value is in the columns
    ``offsets[2i]:offsets[2i + 1]`` and its timestamp in ``offsets[2i + 1]:offsets[2i + 2]``.

    A plain value becomes its column by slicing, with no work per message: the cost of
    a steady stream of scalars does not grow with its rate. Never raises MalformedMessage.
    """
    if len(offsets) != 2 * len(header.channels) + 1:
        raise ValueError(f"{len(offsets)} offsets for {len(header.channels)} channels")
    errors: list[tuple[int, MalformedMessage]] = []
    columns = []
    for index, spec in enumerate(header.channels):
        start, middle, end = offsets[2 * index : 2 * index + 3]
        values, stamps = rows[:, start:middle], rows[:, middle:end]
        if (spec.compression == "none" and middle - start == value_nbytes(spec)
                and end - middle == TIMESTAMP_SIZE):
            columns.append(Column(spec, np.ones(len(rows), bool),
                                  _as_timestamps(spec, stamps), _as_values(spec, values)))
        else:
            columns.append(_decode_column(
                spec, list(map(memoryview, values)), list(map(memoryview, stamps)), errors,
                chunks_checked))
    return columns, errors


def _decode_column(
    spec: ChannelSpec,
    value_parts: list[Buffer],
    stamp_parts: list[Buffer],
    errors: list[tuple[int, MalformedMessage]],
    chunks_checked: bool = False,
) -> Column:
    present = np.fromiter(map(len, value_parts), np.int64, len(value_parts)) > 0
    bad_rows: list[int] = []
    for row, (value, stamp) in enumerate(zip(value_parts, stamp_parts)):
        if len(stamp) != (TIMESTAMP_SIZE if len(value) else 0):
            bad_rows.append(row)
            errors.append((row, MalformedMessage(
                "timestamp_size", f"{spec.name}: {len(stamp)}-byte timestamp")))
    present[bad_rows] = False
    if is_direct_chunk(spec):
        values = [part if present[row] else None for row, part in enumerate(value_parts)]
        if not chunks_checked:
            _leave_out_corrupt_chunks(spec, values, present, errors)
        chunked = True
    elif spec.compression == "none" and spec.type != "string" and _all_sized(
            spec, value_parts, present):
        values, chunked = _joined_array(spec, value_parts, present), False
    else:
        values, chunked = _decoded_one_by_one(spec, value_parts, present, errors), False
    timestamps = _joined_timestamps(spec, stamp_parts, present)
    return Column(spec, present, timestamps, values, chunked)


def _all_sized(spec: ChannelSpec, parts: list[Buffer], present: np.ndarray) -> bool:
    size = value_nbytes(spec)
    return all(len(part) == size for part, ok in zip(parts, present) if ok)


def _joined_array(spec: ChannelSpec, parts: list[Buffer], present: np.ndarray) -> np.ndarray:
    return _as_values(spec, _joined(parts, present, value_nbytes(spec)))


def _joined_timestamps(spec: ChannelSpec, parts: list[Buffer], present: np.ndarray) -> np.ndarray:
    return _as_timestamps(spec, _joined(parts, present, TIMESTAMP_SIZE))


def _joined(parts: list[Buffer], present: np.ndarray, size: int) -> np.ndarray:
    """The parts as an (n, size) uint8 array, zeros where absent."""
    zero = bytes(size)
    joined = b"".join(part if ok else zero for part, ok in zip(parts, present))
    return np.frombuffer(joined, np.uint8).reshape(len(parts), size)


def _as_values(spec: ChannelSpec, raw: np.ndarray) -> np.ndarray:
    """(n, value bytes) uint8, wire order, to (n, *shape) values in native order."""
    dtype = wire_dtype(spec)
    array = raw.view(dtype).reshape((len(raw),) + spec.shape)
    if spec.type == "bool":
        return array.view(np.uint8).astype(bool)  # any non-zero byte is true, as in C
    return array if dtype.isnative else array.astype(dtype.newbyteorder("="))


def _as_timestamps(spec: ChannelSpec, raw: np.ndarray) -> np.ndarray:
    """(n, 16) uint8, wire order, to ns since the epoch."""
    pairs = raw.view(_dtype("int64", spec.encoding))
    return (pairs[:, 0] * NS_PER_SECOND + pairs[:, 1]).astype(np.int64)


def _decoded_one_by_one(
    spec: ChannelSpec, parts: list[Buffer], present: np.ndarray,
    errors: list[tuple[int, MalformedMessage]],
) -> np.ndarray | list:
    if spec.type == "string":
        values: np.ndarray | list = [""] * len(parts)
    else:
        values = np.zeros((len(parts),) + spec.shape, wire_dtype(spec).newbyteorder("="))
        if spec.type == "bool":
            values = values.astype(bool)
    for row in np.flatnonzero(present):
        try:
            values[row] = _decode_payload(spec, parts[row])
        except MalformedMessage as exc:
            present[row] = False
            errors.append((int(row), MalformedMessage(exc.kind, f"{spec.name}: {exc.detail}")))
    return values


def corrupt_chunks(
    header: DataHeader, frames: Sequence[Buffer]
) -> list[tuple[int, MalformedMessage]]:
    """(channel index, error) of each image of a message, stored as an HDF5 chunk (see
    is_direct_chunk), that does not decompress exactly: bitshuffle's decoder (HDF5's
    filter) trusts the block sizes in a chunk, so a corrupt one could crash whoever
    reads the file. The message must have passed check_structure."""
    bad = []
    for index in header.chunk_channels:
        error = _chunk_error(header.channels[index], frames[2 + 2 * index])
        if error is not None:
            bad.append((index, error))
    return bad


def _leave_out_corrupt_chunks(spec: ChannelSpec, chunks: list, present: np.ndarray,
                              errors: list[tuple[int, MalformedMessage]]) -> None:
    for row in np.flatnonzero(present):
        error = _chunk_error(spec, chunks[row])
        if error is not None:
            present[row], chunks[row] = False, None
            errors.append((int(row), error))


def _chunk_error(spec: ChannelSpec, part: Buffer) -> MalformedMessage | None:
    """Why an image value cannot be a chunk; None for a good one or no value."""
    view = memoryview(part)
    if not len(view):
        return None
    itemsize = wire_dtype(spec).itemsize
    try:
        _, count, block = _bslz4_layout(view, itemsize, value_nbytes(spec), MAX_VALUE_BYTES)
        # One walk: nothing is allocated here that the layout check would protect.
        for _ in _bslz4_decompressed_blocks(view, _bslz4_spans(view, count, block, itemsize)):
            pass
    except MalformedMessage as exc:
        return MalformedMessage(exc.kind, f"{spec.name}: {exc.detail}")
    return None


def _decode_payload(spec: ChannelSpec, part: Buffer) -> np.ndarray | str:
    dtype = wire_dtype(spec)
    expected = value_nbytes(spec)
    raw = _decompress(
        part, spec.compression, dtype.itemsize, expected, MAX_STRING_BYTES, spec.encoding == "big"
    )
    if expected is None:
        try:
            return bytes(raw).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise MalformedMessage("string", f"not UTF-8: {exc}") from None
    if len(raw) != expected:
        raise MalformedMessage("value_size", f"{len(raw)} bytes, expected {expected}")
    return _as_values(spec, np.frombuffer(raw, np.uint8).reshape(1, expected))[0, ...]


def _decode_timestamp(spec: ChannelSpec, part: Buffer) -> int:
    if len(part) != TIMESTAMP_SIZE:
        raise MalformedMessage("timestamp_size", f"{len(part)}-byte timestamp")
    sec, ns = _TIMESTAMP[spec.encoding].unpack(part)
    return sec * NS_PER_SECOND + ns


# --- encode ----------------------------------------------------------------------------


class Encoder:
    """Builds messages in the reference sender's format.

    The data header is serialised, compressed and hashed once per distinct declaration
    and reused, so a steady stream pays per message only for its main header and values.
    """

    def __init__(self, dh_compression: str = "none", cache_size: int = 16) -> None:
        if dh_compression not in COMPRESSIONS:
            raise ValueError(f"unknown data header compression {dh_compression!r}")
        self.dh_compression = dh_compression
        self._cache_size = cache_size
        self._headers: OrderedDict[tuple[ChannelSpec, ...], tuple[bytes, str]] = OrderedDict()

    def encode(
        self,
        pulse_id: int,
        global_timestamp_ns: int,
        channels: Sequence[tuple[ChannelSpec, Any, int]],
    ) -> list[bytes]:
        """``channels``: (spec, value or None, timestamp_ns) in data-header order."""
        declared = tuple(
            spec if value is not None else _absent_spec(spec) for spec, value, _ in channels
        )
        data_header, digest = self._data_header(declared)
        parts = [self._main_header(pulse_id, global_timestamp_ns, digest), data_header]
        for spec, value, timestamp_ns in channels:
            parts.extend(_encode_channel(spec, value, timestamp_ns))
        return parts

    def _main_header(self, pulse_id: int, global_timestamp_ns: int, digest: str) -> bytes:
        header: dict[str, Any] = {"htype": "bsr_m-1.1"}
        if self.dh_compression != "none":
            header["dh_compression"] = self.dh_compression
        sec, ns = divmod(global_timestamp_ns, NS_PER_SECOND)
        header.update(hash=digest, pulse_id=pulse_id, global_timestamp={"sec": sec, "ns": ns})
        return json.dumps(header).encode()

    def _data_header(self, specs: tuple[ChannelSpec, ...]) -> tuple[bytes, str]:
        cached = self._headers.get(specs)
        if cached is None:
            text = json.dumps({"htype": "bsr_d-1.1", "channels": list(map(_channel_json, specs))})
            part = _compress(text.encode(), self.dh_compression, 1, False)
            cached = self._headers[specs] = (part, _md5(part))
            if len(self._headers) > self._cache_size:
                self._headers.popitem(last=False)
        return cached


def encode_message(
    pulse_id: int,
    global_timestamp_ns: int,
    channels: Sequence[tuple[ChannelSpec, Any, int]],
    dh_compression: str = "none",
) -> list[bytes]:
    """One message in the reference sender's format; see Encoder for a stream."""
    return Encoder(dh_compression).encode(pulse_id, global_timestamp_ns, channels)


def _absent_spec(spec: ChannelSpec) -> ChannelSpec:
    # What the reference sender declares for a channel without a value.
    return dataclasses.replace(spec, type="float64", shape=())


def _channel_json(spec: ChannelSpec) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "name": spec.name,
        "type": spec.type,
        "shape": list(reversed(spec.shape)) or [1],
        "encoding": spec.encoding,
    }
    if spec.compression != "none":
        entry["compression"] = spec.compression
    return entry


def _encode_channel(spec: ChannelSpec, value: Any, timestamp_ns: int) -> tuple[bytes, bytes]:
    if value is None:
        return b"", b""
    itemsize = wire_dtype(spec).itemsize
    raw = _compress(_value_bytes(spec, value), spec.compression, itemsize, spec.encoding == "big")
    sec, ns = divmod(timestamp_ns, NS_PER_SECOND)
    return raw, _TIMESTAMP[spec.encoding].pack(sec, ns)


def _value_bytes(spec: ChannelSpec, value: Any) -> bytes:
    if spec.type == "string":
        if not isinstance(value, str):
            raise TypeError(f"{spec.name}: string channel given {type(value).__name__}")
        return value.encode()
    array = np.asarray(value, dtype=wire_dtype(spec))
    if array.shape != spec.shape:
        raise ValueError(f"{spec.name}: value of shape {array.shape}, declared {spec.shape}")
    return array.tobytes()
