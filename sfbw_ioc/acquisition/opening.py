"""What a START does before the acquisition thread takes over: the file opened for its
owner, and the message that tells the operator what it will hold."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

from ..hdf5.file import OutputFile
from ..hdf5.options import OutputOptions
from ..output.ownership import Owner, OwnershipError
from ..stream.ring import RingBuffer
from ..vocabulary import AcquisitionError
from .plan import range_message
from .selection import ChannelSelection


def open_file(target: Path, general: Mapping[str, str], created: str | None,
              owner: Owner, options: OutputOptions) -> OutputFile:
    """The new file at ``target`` (its .partial) for ``owner``, with ``options`` (SWMR,
    the PVs recorded); AcquisitionError with the reason when it cannot be."""
    try:
        owner.check()  # before anything is created
    except OwnershipError as error:
        raise AcquisitionError(str(error)) from error
    try:
        return OutputFile(target, general, created=created, owner=owner, options=options)
    except OSError as error:
        raise AcquisitionError(f"cannot create {target}: {error.strerror or error}") from error


def start_message(ring: RingBuffer, start_pulse_id: int | None, target: Path, owner: Owner,
                  selection: ChannelSelection | None, pulse_step: int) -> str:
    """Where the file begins, for whom, and which patterns of ``selection`` match no
    channel of the stream now (not refused: the channel may appear later, but the
    operator should know)."""
    given = owner.describe()
    text = range_message(start_pulse_id, target, ring.stats().oldest_pulse_id, pulse_step)
    return text + (f" for {given}" if given else "") + _selection_note(ring, selection)


def _selection_note(ring: RingBuffer, selection: ChannelSelection | None) -> str:
    if selection is None:
        return ""
    newest = ring.newest()
    names = [spec.name for spec in newest.header.channels] if newest is not None else []
    unmatched = selection.unmatched(names)
    if not unmatched:
        return ""
    return f"; no channel of the stream matches {', '.join(unmatched)}"
