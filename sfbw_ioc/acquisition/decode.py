"""Ring messages into a file: decoded channel by channel, only the selected channels."""
from __future__ import annotations

from ..bsread import Column, MalformedMessage, decode_columns, decode_uniform_columns
from ..hdf5.file import OutputFile
from ..hdf5.layout import IMAGE_ROW_BYTES
from ..stream.malformed import MalformedCounter
from ..stream.message import RawMessage, stack_uniform
from .selection import ChannelSelection


def decode_run(run: list[RawMessage], selection: ChannelSelection | None,
               ) -> tuple[list[Column], list[tuple[int, MalformedMessage]]]:
    """Columns of the selected channels (None: all) of messages sharing a data header,
    and the malformed values met (row, error); sliced out of one array when every
    message has the same part lengths (a steady stream of plain values). The receiver
    checked the images on arrival."""
    header = run[0].header
    channels = None if selection is None else selection.indices(header)
    stacked = stack_uniform(run) if _small_values(run[0]) else None
    if stacked is None:
        return decode_columns(header, [message.frames for message in run],
                              chunks_checked=True, channels=channels)
    return decode_uniform_columns(header, *stacked, chunks_checked=True, channels=channels)


def _small_values(message: RawMessage) -> bool:
    """Stacking pays for many small parts (one array instead of a view per part); large
    values (images) are views of the ring's payloads on the other path, and stacking
    would copy every one of them once more."""
    return message.values_nbytes <= IMAGE_ROW_BYTES


def append_decoded(file: OutputFile, run: list[RawMessage], selection: ChannelSelection | None,
                   malformed: MalformedCounter) -> None:
    """Decode messages that share a data header and append them to ``file``; a
    malformed value is reported and written absent."""
    pulse_ids = [message.pulse_id for message in run]
    columns, errors = decode_run(run, selection)
    for row, error in errors:
        malformed.report(error, pulse_ids[row])
    file.append_columns(pulse_ids, columns, [message.global_timestamp_ns for message in run])
