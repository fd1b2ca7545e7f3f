"""Acquisitions: the pulse range from the ring buffer into one HDF5 file.

``AcquisitionController`` is the whole interface the IOC sees: ``start``, ``stop``,
``abort``, ``status`` and an ``on_change`` callback. Its own thread (the writer thread)
follows the ring with a cursor, decodes the messages of the range and appends them to a
``OutputFile``. Commands only set fields under a lock and wake the thread; everything
that touches the disk runs in the writer thread, except opening the file in ``start``,
which the IOC calls from an executor so that a bad path fails the put itself.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from array import array
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from ..bsread import Column, MalformedMessage, decode_columns, decode_uniform_columns
from ..output.ownership import IOC_OWNER, Owner, OwnershipError
from ..output.root import OutputPathError, OutputRoot
from ..stream.malformed import MalformedCounter
from ..stream.message import RawMessage, stack_uniform
from ..stream.ring import RingBuffer, typical_step
from ..hdf5.file import OutputFile
from ..hdf5.options import OutputOptions
from ..vocabulary import AcquisitionError, State, Status
from .selection import ChannelSelection

log = logging.getLogger(__name__)

_BATCH = 256  # messages taken from the ring per writer step
# ... and at most this many bytes of them: decoding and writing copy a batch two or
# three times, memory beyond the ring's budget (a 1 MiB-image flood peaked at 975 MiB).
_BATCH_BYTES = 8 * 1024 * 1024
_FLUSH_INTERVAL_S = 1.0  # a killed process loses at most this much written data
_WAIT_S = 0.1  # writer thread's longest sleep: bounds the reaction to a silent stream
# A slow stream is written in batches gathered for this long (never past the stop
# pulse): decoding and writing channel by channel cost about as much for one message as
# for hundreds (1000 channels at 100 Hz: 114 % of a core message by message, 63 % so).
_GATHER_S = 0.5
STOP_GRACE_S = 2.0  # a silent stream's expected pulse must pass the stop by this much


@dataclass(eq=False)
class _Acquisition:
    writer: OutputFile
    cursor: int  # next ring seq to look at
    start_pulse_id: int | None  # None: START_NOW, everything from ``cursor`` on
    selection: ChannelSelection | None = None  # None: every channel
    stop_pulse_id: int | None = None
    stop_seq: int | None = None  # STOP_NOW: last ring seq to write
    aborted: bool = False
    stop_futures: list[Future] = field(default_factory=list)
    first_pulse_id: int | None = None
    last_pulse_id: int | None = None
    pulse_step: int = 1
    # The message clock for a stream that falls silent: last pulse seen and when.
    clock_pulse_id: int | None = None
    clock_time: float = 0.0
    last_flush: float = 0.0
    last_write: float = 0.0  # when the last batch was taken from the ring
    file_bytes: int = 0  # as of the last flush: status() must not stat the disk
    start_time: float | None = None
    stop_time: float | None = None
    # Global timestamps of the rows, so that cutting rows past a late stop keeps the
    # last one's right; ``last_timestamp_ns`` is what status() reads from other threads.
    timestamps: array = field(default_factory=lambda: array("q"))
    last_timestamp_ns: int | None = None


class AcquisitionController:
    """Owns the writer thread and at most one running acquisition."""

    def __init__(self, ring: RingBuffer, malformed: MalformedCounter, output_root: Path,
                 pulse_rate: float = 100.0, owner: Owner = IOC_OWNER) -> None:
        self._ring = ring
        self._malformed = malformed
        self._root = OutputRoot(output_root)
        self.output_root = self._root.path
        self.owner = owner  # of every file unless a START names another (its modes stay)
        self._pulse_rate = pulse_rate
        self._on_change: Callable[[Status], None] | None = None
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._shutdown = threading.Event()
        self._active: _Acquisition | None = None
        self._latest: _Acquisition | None = None  # running or last: its range is reported
        self._pending_stop: int | None = None
        self._next_created: str | None = None
        self._starting = False  # a START is opening its file (without the lock)
        self._status = Status()
        self.output_options = OutputOptions()  # of the next file: SWMR, the PVs recorded
        self._thread = threading.Thread(target=self._run, name="hdf5-writer", daemon=True)

    # ---- commands (any thread) -------------------------------------------------------

    def start_thread(self) -> None:
        self._thread.start()

    def set_on_change(self, callback: Callable[[Status], None]) -> None:
        """Call ``callback(status)`` on every change of state, message or last file.

        It runs in the caller's or the writer thread with a lock held: it must only
        hand the status over (e.g. to a thread-safe queue), never block.
        """
        with self._lock:
            self._on_change = callback

    def start(self, start_pulse_id: int | None, output_file: str,
              general: Mapping[str, str], selection: ChannelSelection | None = None,
              owner: Owner | None = None) -> Path:
        """Begin an acquisition at ``start_pulse_id`` (None: with the next message),
        of the channels of ``selection`` (None: all), the file and its new directories
        belonging to ``owner`` (None: ``self.owner``).

        Opens the file; raises ``AcquisitionError`` with the reason when refused.
        """
        with self._lock:
            self._check_can_start(start_pulse_id)
            self._starting = True
            created = self._next_created
        # The disk is touched without the lock: status() must stay instant for the IOC.
        try:
            target = self.resolve_output(output_file)
            owner = owner or self.owner
            writer = _open_writer(target, general, created, owner, self.output_options)
        finally:
            with self._lock:
                self._starting = False
        with self._lock:
            stop = self._pending_stop
            acquisition = self._new_acquisition(writer, start_pulse_id, stop, selection)
            self._pending_stop = None
            self._next_created = None
            self._active = self._latest = acquisition
            message = self._start_message(acquisition, target, owner)
            self._set_status(Status(State.WAITING, message, str(target),
                                    self._status.last_file,
                                    version=self._status.version))
        log.info("%s", message)
        self._wake.set()
        self._ring.wake_readers()
        return target

    def set_next_created(self, created: str) -> None:
        """Write ``created`` as /general/created of the next file started (instead of
        its opening time); no PV carries it, the REST API's parameters do."""
        with self._lock:
            self._next_created = created

    def _check_can_start(self, start_pulse_id: int | None) -> None:
        if self._starting:
            raise AcquisitionError("another START is being carried out")
        if self._active is not None:
            raise AcquisitionError(
                f"an acquisition is running ({self._status.state.name}, "
                f"{self._status.file}): STOP or ABORT it first")
        stop = self._pending_stop
        if start_pulse_id is not None and stop is not None and stop < start_pulse_id:
            raise AcquisitionError(
                f"start {start_pulse_id} is after the stop already set ({stop})")

    def stop(self, stop_pulse_id: int | None) -> Future:
        """Set the last pulse id to write (None: the last message received so far).

        The future resolves with the file's path once it is closed; when idle, a pulse
        id is kept for the next START and the future is already done.
        """
        future: Future = Future()
        with self._lock:
            acquisition = self._active
            if acquisition is None:
                if stop_pulse_id is None:
                    raise AcquisitionError("no acquisition is running: nothing to stop")
                self._pending_stop = stop_pulse_id
                self._set_status(replace(self._status,
                                         message=f"stop {stop_pulse_id} set for the next start"))
                future.set_result(None)
                return future
            if stop_pulse_id is None:
                acquisition.stop_seq = self._ring.next_seq - 1
                acquisition.stop_time = time.time()
                stop_text = "now"
            else:
                self._check_stop(acquisition, stop_pulse_id)
                acquisition.stop_pulse_id = stop_pulse_id
                stop_text = str(stop_pulse_id)
            acquisition.stop_futures.append(future)
            self._set_status(replace(self._status,
                                     message=f"stopping at {stop_text}"))
        self._ring.wake_readers()
        return future

    def abort(self) -> Future:
        """Stop at once and close the file with what was written."""
        future: Future = Future()
        with self._lock:
            acquisition = self._active
            if acquisition is None:
                future.set_result(None)
                return future
            acquisition.aborted = True
            acquisition.stop_futures.append(future)
        self._ring.wake_readers()
        return future

    def status(self) -> Status:
        """The current status, with the live figures of a running acquisition."""
        with self._lock:
            status, acquisition = self._status, self._active
            latest, pending_stop = self._latest, self._pending_stop
        if latest is not None:
            status = replace(status, **_range_of(latest))
        if acquisition is None:
            if pending_stop is not None:
                status = replace(status, stop_pulse_id=pending_stop)
            return status
        return replace(status, written=acquisition.writer.rows,
                       file_bytes=acquisition.file_bytes)

    def busy(self) -> bool:
        """True while an acquisition is being started or runs (WAITING to CLOSING)."""
        with self._lock:
            return self._starting or self._active is not None

    def shutdown(self, timeout: float = 30.0) -> None:
        """Complete a running acquisition with what has arrived, then end the thread."""
        with self._lock:
            if self._active is not None:
                self._active.stop_seq = self._ring.next_seq - 1
        self._shutdown.set()
        self._ring.wake_readers()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def resolve_output(self, output_file: str, must_be_new: bool = True) -> Path:
        """The absolute target for OUTPUT_FILE, refused when outside the root or (unless
        ``must_be_new`` is False) taken."""
        try:
            return self._root.resolve(output_file, must_be_new=must_be_new)
        except OutputPathError as error:
            raise AcquisitionError(str(error)) from error

    # ---- helpers of the commands (lock held) -----------------------------------------

    def _new_acquisition(self, writer: OutputFile, start_pulse_id: int | None,
                         stop_pulse_id: int | None,
                         selection: ChannelSelection | None) -> _Acquisition:
        if start_pulse_id is None:
            cursor = self._ring.next_seq
        else:
            cursor = self._ring.find_start(start_pulse_id)
        stats = self._ring.stats()
        return _Acquisition(writer, cursor, start_pulse_id, selection, stop_pulse_id,
                            pulse_step=self._ring.typical_pulse_step(),
                            clock_pulse_id=stats.newest_pulse_id, clock_time=time.monotonic(),
                            last_flush=time.monotonic(),
                            start_time=time.time() if start_pulse_id is None else None)

    def _start_message(self, acquisition: _Acquisition, target: Path, owner: Owner) -> str:
        given = owner.describe()
        return (self._range_message(acquisition, target) + (f" for {given}" if given else "")
                + self._selection_note(acquisition))

    def _range_message(self, acquisition: _Acquisition, target: Path) -> str:
        start = acquisition.start_pulse_id
        if start is None:
            return f"writing {target} from the next message"
        oldest = self._ring.stats().oldest_pulse_id
        if oldest is not None and oldest - start >= acquisition.pulse_step:
            return (f"start {start} is older than the buffer: pulses {start}..{oldest - 1} "
                    f"are gone, writing {target} from {oldest}")
        return f"writing {target} from pulse {start}"

    def _selection_note(self, acquisition: _Acquisition) -> str:
        """Patterns that match no channel of the stream now: not refused, the channel
        may appear later, but the operator should know."""
        if acquisition.selection is None:
            return ""
        newest = self._ring.newest()
        names = [spec.name for spec in newest.header.channels] if newest is not None else []
        unmatched = acquisition.selection.unmatched(names)
        if not unmatched:
            return ""
        return f"; no channel of the stream matches {', '.join(unmatched)}"

    @staticmethod
    def _check_stop(acquisition: _Acquisition, stop_pulse_id: int) -> None:
        first = acquisition.start_pulse_id
        if first is None:
            first = acquisition.first_pulse_id
        if first is not None and stop_pulse_id < first:
            raise AcquisitionError(f"stop {stop_pulse_id} is before the start {first}")

    def _set_status(self, status: Status) -> None:
        changed = (status.state, status.message, status.last_file) != (
            self._status.state, self._status.message, self._status.last_file)
        self._status = status = replace(status, version=self._status.version + 1)
        if changed and self._on_change is not None:
            self._on_change(status)

    # ---- the writer thread -----------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._lock:
                acquisition = self._active
            if acquisition is None:
                if self._shutdown.is_set():
                    return
                self._wake.wait(_WAIT_S)
                self._wake.clear()
                continue
            try:
                self._step(acquisition)
            except Exception as error:  # the writer thread must outlive any one file
                self._fail(acquisition, error)

    def _step(self, acquisition: _Acquisition) -> None:
        """Write what the ring has for the acquisition, or wait a little for more."""
        with self._lock:
            aborted = acquisition.aborted
        if aborted:
            self._finish(acquisition, "aborted")
            return
        if self._gathering(acquisition):
            return
        result = self._ring.read(acquisition.cursor, _BATCH, _BATCH_BYTES)
        if result.lost:
            self._note_lost(acquisition, result.lost)
        acquisition.cursor = result.first_seq
        done = self._write_batch(acquisition, result.messages)
        acquisition.last_write = time.monotonic()
        if done is not None:
            self._finish(acquisition, done)
            return
        if not result.messages:
            if self._stream_passed_stop_silently(acquisition):
                self._finish(acquisition, "the stream is silent past the stop")
                return
            self._ring.wait_for(acquisition.cursor, _WAIT_S)
        self._flush_if_due(acquisition)

    def _gathering(self, acquisition: _Acquisition) -> bool:
        """Wait for more messages while a batch is short and young: short in messages and
        in bytes (a paced stream of large images fills a batch's bytes long before its
        count), and never once the end of the range is in the ring, where closing the file
        quickly matters more (the wait ends when the stop pulse arrives)."""
        with self._lock:
            stop_pulse_id, stop_seq = acquisition.stop_pulse_id, acquisition.stop_seq
        ring = self._ring.stats()
        waiting = ring.next_seq - acquisition.cursor
        age = time.monotonic() - acquisition.last_write
        ending = stop_seq is not None or (
            stop_pulse_id is not None and ring.newest_pulse_id is not None
            and ring.newest_pulse_id >= stop_pulse_id)
        if (ending or waiting == 0 or waiting >= _BATCH or age >= _GATHER_S
                or self._ring.bytes_from(acquisition.cursor) >= _BATCH_BYTES):
            return False
        self._ring.wait_for_batch(acquisition.cursor, _BATCH, _BATCH_BYTES, _GATHER_S - age,
                                  stop_pulse_id)
        return True

    def _write_batch(self, acquisition: _Acquisition, messages: list[RawMessage]) -> str | None:
        """Append the batch's messages of the range; say why when the range is complete."""
        with self._lock:
            stop_pulse_id, stop_seq = acquisition.stop_pulse_id, acquisition.stop_seq
        if stop_pulse_id is not None and self._cut_after(acquisition, stop_pulse_id):
            return f"the stream had passed the stop pulse {stop_pulse_id}"
        selected: list[RawMessage] = []
        done = None
        for message in messages:
            if stop_seq is not None and acquisition.cursor > stop_seq:
                done = "stopped"
                break
            if stop_pulse_id is not None and message.pulse_id > stop_pulse_id:
                done = f"the stream passed the stop pulse {stop_pulse_id}"
                break
            acquisition.cursor += 1
            acquisition.clock_pulse_id = message.pulse_id
            acquisition.clock_time = time.monotonic()
            if acquisition.start_pulse_id is None or message.pulse_id >= acquisition.start_pulse_id:
                selected.append(message)
            # The stop pulse itself completes the range: waiting for the next message
            # would hold the file open for a whole period of a slow stream.
            if message.pulse_id == stop_pulse_id:
                done = f"reached the stop pulse {stop_pulse_id}"
                break
        for run in _runs_of_one_header(selected):
            self._append(acquisition, run)
        if done is None and stop_seq is not None and acquisition.cursor > stop_seq:
            done = "stopped"
        return done

    def _append(self, acquisition: _Acquisition, run: list[RawMessage]) -> None:
        """Decode messages that share a data header channel by channel, and append them."""
        pulse_ids = [message.pulse_id for message in run]
        columns, errors = _decode_run(run, acquisition.selection)
        for row, error in errors:
            self._malformed.report(error, pulse_ids[row])
        acquisition.writer.append_columns(pulse_ids, columns,
                                          [message.global_timestamp_ns for message in run])
        acquisition.timestamps.extend(message.global_timestamp_ns for message in run)
        if acquisition.first_pulse_id is None:
            acquisition.first_pulse_id = pulse_ids[0]
            with self._lock:
                self._set_status(replace(self._status, state=State.WRITING))
        acquisition.last_pulse_id = pulse_ids[-1]
        acquisition.last_timestamp_ns = acquisition.timestamps[-1]

    @staticmethod
    def _cut_after(acquisition: _Acquisition, stop_pulse_id: int) -> bool:
        """Drop rows past a stop that arrived after them; True when there were any."""
        if acquisition.last_pulse_id is None or acquisition.last_pulse_id <= stop_pulse_id:
            return False
        pulse_ids = acquisition.writer.pulse_ids
        rows = int(np.argmax(pulse_ids > stop_pulse_id))
        acquisition.writer.truncate(rows)
        del acquisition.timestamps[rows:]
        acquisition.last_pulse_id = int(pulse_ids[rows - 1]) if rows else None
        acquisition.last_timestamp_ns = acquisition.timestamps[-1] if rows else None
        if not rows:
            acquisition.first_pulse_id = None
        return True

    def _update_missing(self, acquisition: _Acquisition, final: bool = False) -> None:
        # An abort or STOP_NOW ends the range early on purpose: nothing is missing there.
        stopped_early = acquisition.aborted or acquisition.stop_seq is not None
        stop = acquisition.stop_pulse_id if final and not stopped_early else None
        missing = count_missing(acquisition.writer.pulse_ids, acquisition.start_pulse_id,
                                stop, acquisition.pulse_step)
        with self._lock:
            self._status = replace(self._status, missing=missing)

    def _stream_passed_stop_silently(self, acquisition: _Acquisition) -> bool:
        with self._lock:
            stop = acquisition.stop_pulse_id
        if stop is None or acquisition.clock_pulse_id is None:
            return False
        elapsed = time.monotonic() - acquisition.clock_time
        expected = acquisition.clock_pulse_id + elapsed * self._pulse_rate
        return expected > stop + STOP_GRACE_S * self._pulse_rate

    def _note_lost(self, acquisition: _Acquisition, lost: int) -> None:
        with self._lock:
            total = self._status.lost + lost
            self._set_status(replace(self._status, lost=total, message=(
                f"the writer fell behind: {total} messages left the buffer before they "
                f"were written")))
        log.error("writer fell behind: %d messages lost from the ring", lost)

    def _flush_if_due(self, acquisition: _Acquisition) -> None:
        now = time.monotonic()
        if now - acquisition.last_flush >= _FLUSH_INTERVAL_S:
            acquisition.writer.flush()
            acquisition.last_flush = now
            acquisition.file_bytes = acquisition.writer.file_bytes
            self._update_missing(acquisition)

    def _finish(self, acquisition: _Acquisition, reason: str) -> None:
        with self._lock:
            self._set_status(replace(self._status, state=State.CLOSING))
            futures = list(acquisition.stop_futures)
        self._update_missing(acquisition, final=True)
        path = acquisition.writer.close()
        rows = acquisition.writer.rows
        message = (f"{reason}: wrote {rows} messages"
                   f"{_pulse_range(acquisition)} to {path}")
        with self._lock:
            self._active = None
            if self._status.lost:  # the final message must not hide the loss
                message += (f"; {self._status.lost} messages of the range were lost: "
                            f"the writer fell behind")
            self._set_status(replace(self._status, state=State.IDLE, message=message,
                                     last_file=str(path), written=rows,
                                     file_bytes=_size(path)))
        log.info("%s", message)
        for future in futures:
            future.set_result(path)

    def _fail(self, acquisition: _Acquisition, error: Exception) -> None:
        log.error("acquisition failed: %s", error, exc_info=not isinstance(error, OSError))
        partial = acquisition.writer.abandon()
        message = f"writing failed: {error}; partial file left as {partial}"
        with self._lock:
            self._active = None
            futures = list(acquisition.stop_futures)
            self._set_status(replace(self._status, state=State.ERROR, message=message,
                                     written=acquisition.writer.rows))
        for future in futures:
            future.set_exception(AcquisitionError(message))


def _decode_run(run: list[RawMessage], selection: ChannelSelection | None,
                ) -> tuple[list[Column], list[tuple[int, MalformedMessage]]]:
    """Columns of the selected channels of messages sharing a data header; sliced out
    of one array when every message has the same part lengths (a steady stream of plain
    values). The receiver checked the images on arrival."""
    header = run[0].header
    channels = None if selection is None else selection.indices(header)
    stacked = stack_uniform(run)
    if stacked is None:
        return decode_columns(header, [message.frames for message in run],
                              chunks_checked=True, channels=channels)
    return decode_uniform_columns(header, *stacked, chunks_checked=True, channels=channels)


def _runs_of_one_header(messages: list[RawMessage]) -> list[list[RawMessage]]:
    """Consecutive messages grouped by data header (the receiver shares the object)."""
    runs: list[list[RawMessage]] = []
    for message in messages:
        if runs and runs[-1][0].header is message.header:
            runs[-1].append(message)
        else:
            runs.append([message])
    return runs


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


def _open_writer(target: Path, general: Mapping[str, str], created: str | None,
                 owner: Owner, options: OutputOptions) -> OutputFile:
    try:
        owner.check()  # before anything is created
    except OwnershipError as error:
        raise AcquisitionError(str(error)) from error
    try:
        return OutputFile(target, general, created=created, owner=owner, options=options)
    except OSError as error:
        raise AcquisitionError(f"cannot create {target}: {error.strerror or error}") from error


def _range_of(acquisition: _Acquisition) -> dict[str, int | float | None]:
    """The fields of ``Status`` that describe an acquisition's range, sampled from
    another thread than the writer's (each is one attribute read)."""
    return {"start_pulse_id": acquisition.start_pulse_id,
            "stop_pulse_id": acquisition.stop_pulse_id,
            "start_time": acquisition.start_time, "stop_time": acquisition.stop_time,
            "first_pulse_id": acquisition.first_pulse_id,
            "last_pulse_id": acquisition.last_pulse_id,
            "last_timestamp_ns": acquisition.last_timestamp_ns}


def _pulse_range(acquisition: _Acquisition) -> str:
    if acquisition.first_pulse_id is None:
        return ""
    return f" (pulses {acquisition.first_pulse_id}..{acquisition.last_pulse_id})"


def _size(path: Path) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0
