"""Channel values of one message: the cheap structure check the receiver runs on every
message, and the full decode of one channel or of all of them into native numpy values.

``as_values`` and ``as_timestamps`` turn wire bytes into native arrays; ``columns``
uses them for runs of messages.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .compression import decompress
from .types import (MAX_STRING_BYTES, NS_PER_SECOND, TIMESTAMP_SIZE, TIMESTAMP_STRUCTS, Buffer,
                    ChannelSpec, ChannelValue, DataHeader, MalformedMessage, numpy_dtype,
                    value_nbytes, wire_dtype)


def check_structure(header: DataHeader, frames: Sequence[Buffer]) -> None:
    """Cheap plausibility check of a whole message (no decompression).

    Raises MalformedMessage with kind "part_count", "timestamp_size" or "value_size".
    """
    check_part_count(header, frames)
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


def check_part_count(header: DataHeader, frames: Sequence[Buffer]) -> None:
    """Raise MalformedMessage("part_count", ...) unless there are two parts per channel."""
    expected = 2 + 2 * len(header.channels)
    if len(frames) != expected:
        raise MalformedMessage("part_count", f"{len(frames)} parts, expected {expected}")


def decode_value(spec: ChannelSpec, value_part: Buffer, timestamp_part: Buffer) -> ChannelValue:
    """Decode one channel of one message; raises MalformedMessage."""
    if not len(value_part) and not len(timestamp_part):
        return ChannelValue(spec, None, 0)
    value = decode_payload(spec, value_part)
    return ChannelValue(spec, value, _decode_timestamp(spec, timestamp_part))


def decode_values(
    header: DataHeader, frames: Sequence[Buffer]
) -> tuple[list[ChannelValue], list[MalformedMessage]]:
    """Decode every channel; a channel that cannot be decoded comes back absent and its
    error is listed. Never raises MalformedMessage."""
    try:
        check_part_count(header, frames)
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


def decode_payload(spec: ChannelSpec, part: Buffer) -> np.ndarray | str:
    """One value part (present, possibly compressed) as its native value; raises
    MalformedMessage."""
    dtype = wire_dtype(spec)
    expected = value_nbytes(spec)
    raw = decompress(
        part, spec.compression, dtype.itemsize, expected, MAX_STRING_BYTES, spec.encoding == "big"
    )
    if expected is None:
        try:
            return bytes(raw).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise MalformedMessage("string", f"not UTF-8: {exc}") from None
    if len(raw) != expected:
        raise MalformedMessage("value_size", f"{len(raw)} bytes, expected {expected}")
    return as_values(spec, np.frombuffer(raw, np.uint8).reshape(1, expected))[0, ...]


def _decode_timestamp(spec: ChannelSpec, part: Buffer) -> int:
    if len(part) != TIMESTAMP_SIZE:
        raise MalformedMessage("timestamp_size", f"{len(part)}-byte timestamp")
    sec, ns = TIMESTAMP_STRUCTS[spec.encoding].unpack(part)
    return sec * NS_PER_SECOND + ns


def as_values(spec: ChannelSpec, raw: np.ndarray) -> np.ndarray:
    """(n, value bytes) uint8, wire order, to (n, *shape) values in native order."""
    dtype = wire_dtype(spec)
    array = raw.view(dtype).reshape((len(raw),) + spec.shape)
    if spec.type == "bool":
        return array.view(np.uint8).astype(bool)  # any non-zero byte is true, as in C
    return array if dtype.isnative else array.astype(dtype.newbyteorder("="))


def as_timestamps(spec: ChannelSpec, raw: np.ndarray) -> np.ndarray:
    """(n, 16) uint8, wire order, to ns since the epoch."""
    pairs = raw.view(numpy_dtype("int64", spec.encoding))
    return (pairs[:, 0] * NS_PER_SECOND + pairs[:, 1]).astype(np.int64)
