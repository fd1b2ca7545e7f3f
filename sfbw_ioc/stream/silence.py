"""Whether the stream is heard: the decision behind STREAM_STATUS, apart from the clock
and the socket (times are parameters), so tests/test_silence.py checks it in milliseconds.
"""
from __future__ import annotations

import enum

# A stream is silent after this many of its own message intervals without a message,
# and never sooner than SILENT_MIN_S (a 100 Hz stream paused for a second is no fault,
# a 1 Hz camera needs 10 s) nor later than SILENT_MAX_S (a very slow source is still
# noticed dead within two minutes).
SILENT_PERIODS = 10
SILENT_MIN_S = 5.0
SILENT_MAX_S = 120.0


class StreamStatus(enum.IntEnum):
    RECEIVING = 0  # a message came within the threshold
    WAITING = 1  # listening, nothing yet, not for long
    SILENT = 2  # nothing for longer than the threshold
    UNRESOLVED = 3  # the stream's host name does not resolve


def silence_threshold(message_interval_s: float | None) -> float:
    """Seconds without a message after which a stream whose messages come every
    ``message_interval_s`` (None: not known yet) is silent."""
    if message_interval_s is None:
        return SILENT_MIN_S
    return min(SILENT_MAX_S, max(SILENT_MIN_S, SILENT_PERIODS * message_interval_s))


def stream_status(now: float, last_arrival: float | None, listening_since: float,
                  message_interval_s: float | None, unresolved: str | None
                  ) -> tuple[StreamStatus, str]:
    """The status and why: ``last_arrival`` is when the last message came (None: none
    since listening began at ``listening_since``), ``unresolved`` the resolver's error
    for the stream's host (None: it resolved)."""
    threshold = silence_threshold(message_interval_s)
    if last_arrival is not None and now - last_arrival <= threshold:
        return StreamStatus.RECEIVING, "receiving"
    if unresolved is not None:
        return StreamStatus.UNRESOLVED, f"the stream's host does not resolve: {unresolved}"
    since = last_arrival if last_arrival is not None else listening_since
    silent_for = now - since
    if silent_for <= threshold:
        return StreamStatus.WAITING, "waiting for the first message"
    what = "no message since" if last_arrival is not None else "no message at all in"
    return StreamStatus.SILENT, f"{what} {silent_for:.0f} s (silent after {threshold:.0f} s)"
