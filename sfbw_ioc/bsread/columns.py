"""Decoding a run of messages that share a data header into one ``Column`` per channel:
one numpy operation per channel instead of one per value, and for a run whose parts
all have the same lengths, plain columns that are slices of the stacked messages.

Images sent bitshuffle_lz4 (``is_direct_chunk``) stay as they came: their values are
HDF5 bitshuffle-filter chunks, checked here (or by ``corrupt_chunks`` on arrival) to
decompress exactly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .compression import check_bitshuffle_lz4
from .decode import as_timestamps, as_values, check_part_count, decode_payload
from .types import (MAX_VALUE_BYTES, TIMESTAMP_SIZE, Buffer, ChannelSpec, DataHeader,
                    MalformedMessage, is_direct_chunk, value_nbytes, wire_dtype)


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


def decode_columns(
    header: DataHeader, messages: Sequence[Sequence[Buffer]], chunks_checked: bool = False,
    channels: Sequence[int] | None = None,
) -> tuple[list[Column], list[tuple[int, MalformedMessage]]]:
    """Decode a run of messages channel by channel: one numpy operation per channel for
    plain values instead of one per value. A value that cannot be decoded comes back
    absent and is listed with its row. Never raises MalformedMessage.

    ``chunks_checked``: the messages passed ``corrupt_chunks`` already (the receiver's),
    their images are not checked again. ``channels``: the indices of the channels to
    decode, in header order (None: all); the others are not looked at."""
    errors: list[tuple[int, MalformedMessage]] = []
    rows = []
    for row, frames in enumerate(messages):
        try:
            check_part_count(header, frames)
            rows.append(frames)
        except MalformedMessage as exc:
            errors.append((row, exc))
            rows.append([b""] * (2 + 2 * len(header.channels)))
    columns = [
        _decode_column(header.channels[i], [f[2 + 2 * i] for f in rows],
                       [f[3 + 2 * i] for f in rows], errors, chunks_checked)
        for i in _selected(header, channels)
    ]
    return columns, errors


def decode_uniform_columns(
    header: DataHeader, rows: np.ndarray, offsets: Sequence[int], chunks_checked: bool = False,
    channels: Sequence[int] | None = None,
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
    for index in _selected(header, channels):
        spec = header.channels[index]
        start, middle, end = offsets[2 * index : 2 * index + 3]
        values, stamps = rows[:, start:middle], rows[:, middle:end]
        if (spec.compression == "none" and middle - start == value_nbytes(spec)
                and end - middle == TIMESTAMP_SIZE):
            columns.append(Column(spec, np.ones(len(rows), bool),
                                  as_timestamps(spec, stamps), as_values(spec, values)))
        else:
            columns.append(_decode_column(
                spec, list(map(memoryview, values)), list(map(memoryview, stamps)), errors,
                chunks_checked))
    return columns, errors


def _selected(header: DataHeader, channels: Sequence[int] | None) -> Sequence[int]:
    return range(len(header.channels)) if channels is None else channels


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
    return as_values(spec, _joined(parts, present, value_nbytes(spec)))


def _joined_timestamps(spec: ChannelSpec, parts: list[Buffer], present: np.ndarray) -> np.ndarray:
    return as_timestamps(spec, _joined(parts, present, TIMESTAMP_SIZE))


def _joined(parts: list[Buffer], present: np.ndarray, size: int) -> np.ndarray:
    """The parts as an (n, size) uint8 array, zeros where absent."""
    zero = bytes(size)
    joined = b"".join(part if ok else zero for part, ok in zip(parts, present))
    return np.frombuffer(joined, np.uint8).reshape(len(parts), size)


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
            values[row] = decode_payload(spec, parts[row])
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
    try:
        check_bitshuffle_lz4(view, wire_dtype(spec).itemsize, value_nbytes(spec), MAX_VALUE_BYTES)
    except MalformedMessage as exc:
        return MalformedMessage(exc.kind, f"{spec.name}: {exc.detail}")
    return None
