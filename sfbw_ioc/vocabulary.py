"""The words every part of the package shares: an acquisition's states and status, a
refused command, the text written for what was not given.

It imports nothing of the package and nothing heavy, so that the group IOC, the REST
API and the PV layer can speak of acquisitions without loading the data path.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

# Written to /general/{user,process,instrument} for an empty value (the predecessor's).
NOT_GIVEN = "not given"


class State(enum.IntEnum):
    IDLE = 0
    WAITING = 1
    WRITING = 2
    CLOSING = 3
    ERROR = 4


class AcquisitionError(Exception):
    """A command that was refused; the text is meant for the operator."""


@dataclass(frozen=True, slots=True)
class Status:
    state: State = State.IDLE
    message: str = ""
    file: str = ""  # target of the running (or last) acquisition
    last_file: str = ""  # last completed file
    written: int = 0
    missing: int = 0
    lost: int = 0  # messages the ring dropped before the writer took them
    file_bytes: int = 0
    version: int = 0  # grows with every change: lets a consumer drop stale statuses
    # The range of the running (or last) acquisition, for the REST API's statistics
    # (None where unset). A stop set while idle shows as ``stop_pulse_id``.
    start_pulse_id: int | None = None
    stop_pulse_id: int | None = None
    start_time: float | None = None  # Unix time a START_NOW was accepted
    stop_time: float | None = None  # Unix time a STOP_NOW was accepted
    first_pulse_id: int | None = None  # first row written
    last_pulse_id: int | None = None  # last row written
    last_timestamp_ns: int | None = None  # its bsread global timestamp
    # Seconds since the oldest message the writer has yet to take arrived (0: none waits)
    writer_lag: float = 0.0
