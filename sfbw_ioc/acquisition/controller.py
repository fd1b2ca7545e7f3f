"""Acquisitions: the pulse range from the ring buffer into one HDF5 file.

``AcquisitionController`` is the whole interface the IOC sees: the commands ``start``,
``stop`` and ``abort``, each returning a ``Ticket`` (futures for "accepted" and
"closed"), and one published, versioned status: ``status()`` and ``publish_to``, which
hands every change over once and in order, the figures of the file included (after each
batch and each flush, never per message).

Its own thread (the acquisition thread) follows the ring with a cursor and carries out
what ``plan`` decides: it decodes the messages of the range and appends them to an
``OutputFile``. Commands only change fields under a lock and wake the thread; everything
that touches the disk runs in the acquisition thread, except opening the file in
``start``, which the IOC calls from an executor so that a bad path fails the put itself.
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

from ..hdf5.file import OutputFile
from ..hdf5.options import OutputOptions
from ..output.ownership import IOC_OWNER, Owner
from ..output.root import OutputPathError, OutputRoot
from ..stream.malformed import MalformedCounter
from ..stream.message import RawMessage
from ..stream.ring import RingBuffer
from ..vocabulary import AcquisitionError, State, Status
from .decode import append_decoded
from .opening import open_file, start_message
from .plan import (BATCH, BATCH_BYTES, GATHER_S, Bounds, flush_due, keep_gathering,
                   refuse_start, runs_of_one_header, stop_while_idle)
from .selection import ChannelSelection
from .status import AcquisitionFailed, PublishedStatus, Ticket, pending

log = logging.getLogger(__name__)

_WAIT_S = 0.1  # the acquisition thread's longest sleep: bounds the reaction to a silent stream


@dataclass(eq=False)
class _Acquisition:
    file: OutputFile
    cursor: int  # next ring seq to look at
    bounds: Bounds  # replaced by the commands, under the lock
    closed: Future[Status]
    selection: ChannelSelection | None = None  # None: every channel
    pulse_step: int = 1
    # The message clock for a stream that falls silent: last pulse seen and when.
    clock_pulse_id: int | None = None
    clock_time: float = 0.0
    last_flush: float = 0.0
    last_write: float = 0.0  # when the last batch was taken from the ring
    # Global timestamps of the rows, so that cutting rows past a late stop keeps the
    # last one's right.
    timestamps: array = field(default_factory=lambda: array("q"))


class AcquisitionController:
    """Owns the acquisition thread and at most one running acquisition."""

    def __init__(self, ring: RingBuffer, malformed: MalformedCounter, output_root: Path,
                 pulse_rate: float = 100.0, owner: Owner = IOC_OWNER,
                 name: str = "acquisition") -> None:
        self._ring = ring
        self._malformed = malformed
        self._root = OutputRoot(output_root)
        self.output_root = self._root.path
        self.owner = owner  # of every file unless a START names another (its modes stay)
        self._pulse_rate = pulse_rate
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._shutdown = threading.Event()
        self._active: _Acquisition | None = None
        self._pending_stop: int | None = None
        self._next_created: str | None = None
        self._starting = False  # a START is opening its file (without the lock)
        self._published = PublishedStatus()
        self.output_options = OutputOptions()  # of the next file: SWMR, the PVs recorded
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    # ---- commands (any thread) -------------------------------------------------------

    def start_thread(self) -> None:
        self._thread.start()

    def publish_to(self, listener: Callable[[Status], None]) -> None:
        """Hand every status to ``listener``: the current one at once, then each change,
        once and in order.

        It is called with a lock held, in the thread that made the change (the
        acquisition thread or a command's): it must only hand the status over (e.g. to
        a thread-safe queue), never block.
        """
        with self._lock:
            self._published.listen(listener)

    def start(self, start_pulse_id: int | None, output_file: str,
              general: Mapping[str, str], selection: ChannelSelection | None = None,
              owner: Owner | None = None) -> Ticket:
        """Begin an acquisition at ``start_pulse_id`` (None: with the next message),
        of the channels of ``selection`` (None: all), the file and its new directories
        belonging to ``owner`` (None: ``self.owner``).

        Opens the file; raises ``AcquisitionError`` with the reason when refused.
        """
        with self._lock:
            refuse_start(self._starting, self._running_status(), start_pulse_id,
                         self._pending_stop, self._ring.stats().newest_pulse_id)
            self._starting = True
            created = self._next_created
        # The disk is touched without the lock: status() must stay instant for the IOC.
        try:
            target = self.resolve_output(output_file)
            owner = owner or self.owner
            file = open_file(target, general, created, owner, self.output_options)
        finally:
            with self._lock:
                self._starting = False
        with self._lock:
            acquisition = self._new_acquisition(file, start_pulse_id, selection)
            self._pending_stop = None
            self._next_created = None
            self._active = acquisition
            message = start_message(self._ring, start_pulse_id, target, owner, selection,
                                    acquisition.pulse_step)
            status = self._published.publish(Status(
                State.WAITING, message, str(target), self._published.current.last_file,
                start_pulse_id=start_pulse_id, stop_pulse_id=acquisition.bounds.stop_pulse_id,
                start_time=time.time() if start_pulse_id is None else None))
        log.info("%s", message)
        self._wake.set()
        self._ring.wake_readers()
        return Ticket.at_once(status, acquisition.closed)

    def set_next_created(self, created: str) -> None:
        """Write ``created`` as /general/created of the next file started (instead of
        its opening time); no PV carries it, the REST API's parameters do."""
        with self._lock:
            self._next_created = created

    def stop(self, stop_pulse_id: int | None) -> Ticket:
        """Set the last pulse id to write (None: the last message received so far).

        When idle, a pulse id is kept for the next START, and nothing is to be closed.
        """
        with self._lock:
            acquisition = self._active
            if acquisition is None:
                self._pending_stop = stop_while_idle(stop_pulse_id)
                status = self._published.change(
                    stop_pulse_id=stop_pulse_id,
                    message=f"stop {stop_pulse_id} set for the next start")
                return Ticket.at_once(status)
            if stop_pulse_id is None:
                acquisition.bounds = acquisition.bounds.stopping_now(self._ring.next_seq - 1)
                status = self._published.change(stop_time=time.time(),
                                                message="stopping at now")
            else:
                acquisition.bounds = acquisition.bounds.stopping_at(
                    stop_pulse_id, self._published.current.first_pulse_id)
                status = self._published.change(stop_pulse_id=stop_pulse_id,
                                                message=f"stopping at {stop_pulse_id}")
        self._ring.wake_readers()
        return Ticket.at_once(status, acquisition.closed)

    def abort(self) -> Ticket:
        """Stop at once and close the file with what was written."""
        with self._lock:
            acquisition, status = self._active, self._published.current
            if acquisition is None:
                return Ticket.at_once(status)
            acquisition.bounds = replace(acquisition.bounds, aborted=True)
        self._ring.wake_readers()
        return Ticket.at_once(status, acquisition.closed)

    def status(self) -> Status:
        """The status last published."""
        with self._lock:
            return self._published.current

    def busy(self) -> bool:
        """True while an acquisition is being started or runs (WAITING to CLOSING)."""
        with self._lock:
            return self._starting or self._active is not None

    def shutdown(self, timeout: float = 30.0) -> None:
        """Complete a running acquisition with what has arrived, then end the thread."""
        with self._lock:
            if self._active is not None:
                self._active.bounds = self._active.bounds.stopping_now(self._ring.next_seq - 1)
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

    def _running_status(self) -> Status | None:
        return self._published.current if self._active is not None else None

    def _new_acquisition(self, file: OutputFile, start_pulse_id: int | None,
                         selection: ChannelSelection | None) -> _Acquisition:
        if start_pulse_id is None:
            cursor = self._ring.next_seq
        else:
            cursor = self._ring.find_start(start_pulse_id)
        now = time.monotonic()
        return _Acquisition(file, cursor, Bounds(start_pulse_id, self._pending_stop),
                            pending(), selection, pulse_step=self._ring.typical_pulse_step(),
                            clock_pulse_id=self._ring.stats().newest_pulse_id,
                            clock_time=now, last_flush=now)

    # ---- the acquisition thread ------------------------------------------------------

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
            except Exception as error:  # the thread must outlive any one file
                self._fail(acquisition, error)

    def _bounds(self, acquisition: _Acquisition) -> Bounds:
        with self._lock:
            return acquisition.bounds

    def _step(self, acquisition: _Acquisition) -> None:
        """Write what the ring has for the acquisition, or wait a little for more."""
        if self._bounds(acquisition).aborted:
            self._finish(acquisition, "aborted")
            return
        if self._gathering(acquisition):
            return
        result = self._ring.read(acquisition.cursor, BATCH, BATCH_BYTES)
        if result.lost:
            self._note_lost(result.lost)
        acquisition.cursor = result.first_seq
        done = self._write_batch(acquisition, result.messages)
        acquisition.last_write = time.monotonic()
        if done is not None:
            self._finish(acquisition, done)
            return
        if not result.messages:
            if self._bounds(acquisition).silent_past_stop(
                    acquisition.clock_pulse_id, acquisition.clock_time, time.monotonic(),
                    self._pulse_rate):
                self._finish(acquisition, "the stream is silent past the stop")
                return
            self._ring.wait_for(acquisition.cursor, _WAIT_S)
        self._flush_if_due(acquisition)

    def _gathering(self, acquisition: _Acquisition) -> bool:
        """Wait for a fuller batch while the plan says so; the wait ends early when the
        stop pulse arrives."""
        bounds = self._bounds(acquisition)
        ring = self._ring.stats()
        age = time.monotonic() - acquisition.last_write
        if not keep_gathering(ring.next_seq - acquisition.cursor,
                              self._ring.bytes_from(acquisition.cursor), age,
                              bounds.ending(ring.newest_pulse_id)):
            return False
        self._ring.wait_for_batch(acquisition.cursor, BATCH, BATCH_BYTES, GATHER_S - age,
                                  bounds.stop_pulse_id)
        return True

    def _write_batch(self, acquisition: _Acquisition, messages: list[RawMessage]) -> str | None:
        """Append the batch's messages of the range; say why when the range is complete."""
        bounds = self._bounds(acquisition)
        if bounds.written_past_stop(self.status().last_pulse_id):
            self._cut(acquisition, bounds)
            return f"the stream had passed the stop pulse {bounds.stop_pulse_id}"
        take = bounds.take([message.pulse_id for message in messages], acquisition.cursor)
        if take.consumed:
            acquisition.cursor += take.consumed
            acquisition.clock_pulse_id = messages[take.consumed - 1].pulse_id
            acquisition.clock_time = time.monotonic()
        rows = [messages[index] for index in take.rows]
        for run in runs_of_one_header(rows):
            append_decoded(acquisition.file, run, acquisition.selection, self._malformed)
            acquisition.timestamps.extend(message.global_timestamp_ns for message in run)
        if rows:
            self._publish_rows(acquisition, rows)
        return take.done

    def _publish_rows(self, acquisition: _Acquisition, rows: list[RawMessage]) -> None:
        """The figures after a batch's rows were appended: WRITING from the first row."""
        with self._lock:
            first = self._published.current.first_pulse_id
            self._published.change(state=State.WRITING, written=acquisition.file.rows,
                                   first_pulse_id=rows[0].pulse_id if first is None else first,
                                   last_pulse_id=rows[-1].pulse_id,
                                   last_timestamp_ns=acquisition.timestamps[-1])

    def _cut(self, acquisition: _Acquisition, bounds: Bounds) -> None:
        """Drop the rows past a stop that arrived after them."""
        written = acquisition.file.pulse_ids
        rows = bounds.rows_before_stop(written)
        acquisition.file.truncate(rows)
        del acquisition.timestamps[rows:]
        with self._lock:
            self._published.change(
                written=rows, first_pulse_id=int(written[0]) if rows else None,
                last_pulse_id=int(written[rows - 1]) if rows else None,
                last_timestamp_ns=acquisition.timestamps[-1] if rows else None)

    def _missing(self, acquisition: _Acquisition, final: bool) -> int:
        return self._bounds(acquisition).missing(acquisition.file.pulse_ids,
                                                 acquisition.pulse_step, final)

    def _note_lost(self, lost: int) -> None:
        with self._lock:
            total = self._published.current.lost + lost
            self._published.change(lost=total, message=(
                f"the writer fell behind: {total} messages left the buffer before they "
                f"were written"))
        log.error("writer fell behind: %d messages lost from the ring", lost)

    def _flush_if_due(self, acquisition: _Acquisition) -> None:
        now = time.monotonic()
        if not flush_due(acquisition.last_flush, now):
            return
        acquisition.file.flush()
        acquisition.last_flush = now
        file_bytes, missing = acquisition.file.file_bytes, self._missing(acquisition, False)
        with self._lock:
            self._published.change(file_bytes=file_bytes, missing=missing)

    def _finish(self, acquisition: _Acquisition, reason: str) -> None:
        missing = self._missing(acquisition, final=True)
        with self._lock:
            self._published.change(state=State.CLOSING, missing=missing)
        path = acquisition.file.close()
        rows, file_bytes = acquisition.file.rows, _size(path)
        with self._lock:
            current = self._published.current
            message = f"{reason}: wrote {rows} messages{_pulse_range(current)} to {path}"
            if current.lost:  # the final message must not hide the loss
                message += (f"; {current.lost} messages of the range were lost: "
                            f"the writer fell behind")
            self._active = None
            status = self._published.change(state=State.IDLE, message=message,
                                            last_file=str(path), written=rows,
                                            file_bytes=file_bytes)
        log.info("%s", message)
        acquisition.closed.set_result(status)

    def _fail(self, acquisition: _Acquisition, error: Exception) -> None:
        log.error("acquisition failed: %s", error, exc_info=not isinstance(error, OSError))
        partial = acquisition.file.abandon()
        message = f"writing failed: {error}; partial file left as {partial}"
        with self._lock:
            self._active = None
            status = self._published.change(state=State.ERROR, message=message,
                                            written=acquisition.file.rows)
        acquisition.closed.set_exception(AcquisitionFailed(status))


def _pulse_range(status: Status) -> str:
    if status.first_pulse_id is None:
        return ""
    return f" (pulses {status.first_pulse_id}..{status.last_pulse_id})"


def _size(path: Path) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0
