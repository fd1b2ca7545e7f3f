"""The decisions of an acquisition, apart from the thread, the ring and the file that carry
them out: which messages of a batch go into the file, when the range is complete, when a
batch is gathered enough, what is missing, which commands are refused.

Nothing here reads a clock, sleeps, locks or touches a file (times are parameters), so
every transition is tested in milliseconds by tests/test_plan.py.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np

from ..stream.message import RawMessage
from ..stream.ring import typical_step
from ..vocabulary import AcquisitionError, Status

BATCH = 256  # messages taken from the ring per step
# ... and at most this many bytes of them: decoding and writing copy a batch two or
# three times, memory beyond the ring's budget (a 1 MiB-image flood peaked at 975 MiB).
BATCH_BYTES = 8 * 1024 * 1024
# A slow stream is written in batches gathered for this long (never past the stop
# pulse): decoding and writing channel by channel cost about as much for one message as
# for hundreds (1000 channels at 100 Hz: 114 % of a core message by message, 63 % so).
GATHER_S = 0.5
FLUSH_INTERVAL_S = 1.0  # a killed process loses at most this much written data
STOP_GRACE_S = 2.0  # a silent stream's expected pulse must pass the stop by this much


@dataclass(frozen=True, slots=True)
class Take:
    """What one batch of the ring gives the file."""

    consumed: int  # messages of the batch the cursor moves past
    rows: list[int]  # indices of the batch's messages that go into the file, in order
    done: str | None  # why the range is complete after them; None while it goes on


@dataclass(frozen=True, slots=True)
class Bounds:
    """Where an acquisition's range begins and ends, as the commands set it. Commands
    replace it (it is frozen), so that the acquisition thread works on one snapshot."""

    start_pulse_id: int | None  # None: START_NOW, every message from the cursor on
    stop_pulse_id: int | None = None
    stop_seq: int | None = None  # STOP_NOW: the last ring seq to write
    aborted: bool = False

    @property
    def stopped_early(self) -> bool:
        """An abort or STOP_NOW ends the range before its stop pulse on purpose."""
        return self.aborted or self.stop_seq is not None

    def stopping_at(self, stop_pulse_id: int, first_written: int | None) -> Bounds:
        """The bounds with a STOP_PULSE_ID; refused when before the start (the start
        pulse, or for START_NOW the first row written)."""
        first = self.start_pulse_id if self.start_pulse_id is not None else first_written
        if first is not None and stop_pulse_id < first:
            raise AcquisitionError(f"stop {stop_pulse_id} is before the start {first}")
        return replace(self, stop_pulse_id=stop_pulse_id)

    def stopping_now(self, last_seq: int) -> Bounds:
        """The bounds with a STOP_NOW: nothing after ring seq ``last_seq`` is written."""
        return replace(self, stop_seq=last_seq)

    def ending(self, newest_pulse_id: int | None) -> bool:
        """True once the end of the range is in the ring (``newest_pulse_id``: the
        ring's newest), where closing the file quickly matters more than batching."""
        if self.stop_seq is not None:
            return True
        return (self.stop_pulse_id is not None and newest_pulse_id is not None
                and newest_pulse_id >= self.stop_pulse_id)

    def take(self, pulse_ids: Sequence[int], first_seq: int) -> Take:
        """The messages of a batch (``pulse_ids`` in ring order from seq ``first_seq``)
        that belong to the range, and whether it is complete with them."""
        rows: list[int] = []
        consumed = 0
        done = None
        for index, pulse_id in enumerate(pulse_ids):
            if self.stop_seq is not None and first_seq + index > self.stop_seq:
                break
            if self.stop_pulse_id is not None and pulse_id > self.stop_pulse_id:
                done = f"the stream passed the stop pulse {self.stop_pulse_id}"
                break
            consumed = index + 1
            if self.start_pulse_id is None or pulse_id >= self.start_pulse_id:
                rows.append(index)
            # The stop pulse itself completes the range: waiting for the next message
            # would hold the file open for a whole period of a slow stream.
            if pulse_id == self.stop_pulse_id:
                done = f"reached the stop pulse {self.stop_pulse_id}"
                break
        if done is None and self.stop_seq is not None and first_seq + consumed > self.stop_seq:
            done = "stopped"
        return Take(consumed, rows, done)

    def written_past_stop(self, last_written: int | None) -> bool:
        """True when the last row written (``last_written``) is past the stop: the stop
        arrived after the rows, which must be cut."""
        return (self.stop_pulse_id is not None and last_written is not None
                and last_written > self.stop_pulse_id)

    def rows_before_stop(self, written: np.ndarray) -> int:
        """How many of the rows ``written`` (their pulse ids, in arrival order) come
        before the first one past the stop: the rows a late stop leaves."""
        past = written > self.stop_pulse_id
        return int(np.argmax(past)) if past.any() else len(written)

    def missing(self, written: np.ndarray, fallback_step: int, final: bool) -> int:
        """Pulses of the range not among ``written``; up to the stop pulse only once the
        file is complete (``final``), and never past an early end."""
        stop = self.stop_pulse_id if final and not self.stopped_early else None
        return count_missing(written, self.start_pulse_id, stop, fallback_step)

    def silent_past_stop(self, clock_pulse_id: int | None, clock_time: float, now: float,
                         pulse_rate: float) -> bool:
        """True when a stream that fell silent would have passed the stop pulse by
        ``STOP_GRACE_S``: its last pulse ``clock_pulse_id`` was seen at ``clock_time``
        and pulses come at ``pulse_rate`` per second."""
        if self.stop_pulse_id is None or clock_pulse_id is None:
            return False
        expected = clock_pulse_id + (now - clock_time) * pulse_rate
        return expected > self.stop_pulse_id + STOP_GRACE_S * pulse_rate


def refuse_start(starting: bool, running: Status | None, start_pulse_id: int | None,
                 pending_stop: int | None, newest_pulse_id: int | None = None) -> None:
    """AcquisitionError when a START cannot be taken: another one is opening its file,
    an acquisition runs (``running``: its status), or it is after the stop set while idle.
    A START_NOW (``start_pulse_id`` None) begins after the ring's newest pulse
    (``newest_pulse_id``), so it is after a stop on or before that pulse: its file
    could never get a row."""
    if starting:
        raise AcquisitionError("another START is being carried out")
    if running is not None:
        raise AcquisitionError(f"an acquisition is running ({running.state.name}, "
                               f"{running.file}): STOP or ABORT it first")
    if pending_stop is None:
        return
    if start_pulse_id is not None and pending_stop < start_pulse_id:
        raise AcquisitionError(
            f"start {start_pulse_id} is after the stop already set ({pending_stop})")
    if start_pulse_id is None and newest_pulse_id is not None and pending_stop <= newest_pulse_id:
        raise AcquisitionError(
            f"start now (the stream is at pulse {newest_pulse_id}) is after the stop "
            f"already set ({pending_stop})")


def stop_while_idle(stop_pulse_id: int | None) -> int:
    """The stop kept for the next START; a STOP_NOW has nothing to stop."""
    if stop_pulse_id is None:
        raise AcquisitionError("no acquisition is running: nothing to stop")
    return stop_pulse_id


def range_message(start_pulse_id: int | None, target: Path, oldest_pulse_id: int | None,
                  pulse_step: int) -> str:
    """What a START says of where the file begins (the buffer's oldest pulse is
    ``oldest_pulse_id``): a start older than the buffer is told, not faked."""
    if start_pulse_id is None:
        return f"writing {target} from the next message"
    if oldest_pulse_id is not None and oldest_pulse_id - start_pulse_id >= pulse_step:
        return (f"start {start_pulse_id} is older than the buffer: pulses "
                f"{start_pulse_id}..{oldest_pulse_id - 1} are gone, writing {target} "
                f"from {oldest_pulse_id}")
    return f"writing {target} from pulse {start_pulse_id}"


def keep_gathering(waiting: int, waiting_bytes: int, age: float, ending: bool) -> bool:
    """Wait for more messages while a batch is short and young: short in messages
    (``waiting`` in the ring) and in bytes (a paced stream of large images fills a
    batch's bytes long before its count), ``age`` seconds since the last batch, and
    never once the range is ``ending``."""
    return not (ending or waiting == 0 or waiting >= BATCH or age >= GATHER_S
                or waiting_bytes >= BATCH_BYTES)


def flush_due(last_flush: float, now: float) -> bool:
    return now - last_flush >= FLUSH_INTERVAL_S


def count_missing(pulse_ids: np.ndarray, start: int | None, stop: int | None,
                  fallback_step: int) -> int:
    """Pulses of the range [start, stop] that the stream's usual step says should have
    come but are not among ``pulse_ids`` (rows in arrival order). The step is the one
    the rows show, or ``fallback_step`` (the buffer's) when they show none."""
    if not len(pulse_ids):
        return 0
    step = typical_step(pulse_ids) or fallback_step
    gaps = np.diff(pulse_ids) // step - 1
    missing = int(gaps[gaps > 0].sum())
    if start is not None:
        missing += max(0, int(pulse_ids[0] - start) // step)
    if stop is not None:
        missing += max(0, int(stop - pulse_ids[-1]) // step)
    return missing


def runs_of_one_header(messages: Sequence[RawMessage]) -> list[list[RawMessage]]:
    """Consecutive messages grouped by data header: a new header object is a change
    (the receiver shares one object among the messages of a header)."""
    runs: list[list[RawMessage]] = []
    for message in messages:
        if runs and runs[-1][0].header is message.header:
            runs[-1].append(message)
        else:
            runs.append([message])
    return runs
