"""One HDF5 file per pulse range, in the SwissFEL layout (``hdf5.layout`` describes it).

A small open/append/flush/close interface (like areaDetector's NDFileHDF5) with the file
format behind it. Every channel has a row for every message (row-aligned), also where
the message had no value for it. The file is written as ``<target>.partial`` and only
appears under its final name once complete; an existing file is never overwritten.
``/epics`` holds the recorded PVs (``hdf5.epics``).

SWMR (``OutputOptions.swmr``): readers may open the file with
``h5py.File(path, "r", swmr=True)`` and see every row up to the last flush. SWMR starts
at the first flush that has rows, once the datasets of the channels announced so far
exist. HDF5 forbids new objects while it is on, so anything that needs one later (a new
channel, a changed type or shape, a PV's first connection, a truncation, the completion
at close) is done with SWMR off: the file is closed, reopened without SWMR, changed,
flushed and SWMR starts again. Nothing waits or is dropped; readers' handles stay valid
but show the new datasets only after reopening the file (a read during the change may
fail: reopen then). A file whose writer died with SWMR on opens with ``swmr=True`` (or
after ``h5clear -s``).
"""
from __future__ import annotations

import errno
import logging
import os
from array import array
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import h5py
import numpy as np

from ..bsread import ChannelValue, Column
from ..output.ownership import IOC_OWNER, Owner
from ..output.root import partial_path, publish, taken_by
from .channel import ChannelDatasets
from .epics import EpicsRecording
from .general import now, write_general
from .handle import create_h5, discard_pending_writes, file_identity, os_error
from .layout import BATCH_BYTES_LIMIT, Definition
from .options import OutputOptions
from .rows import Rows, row_dataset
from .values import check_value, column_bytes, one_row
from .writeback import WriteBehind

log = logging.getLogger(__name__)

class OutputFile:
    """Writes one HDF5 file, one row per appended message.

    ``append`` buffers; rows reach the file every ``batch_rows`` messages and on
    ``flush`` (call it at least once a second: a file last flushed is readable even if
    the process dies). Values are kept by reference until written: do not mutate them.
    HDF5 and OS failures raise ``OSError``; after one, only ``abandon`` is allowed.
    The file and the directories it needs are made with the modes and owner of
    ``owner`` (``Owner.check`` it first).
    """

    def __init__(self, target: Path, general: Mapping[str, str], *,
                 created: str | None = None, batch_rows: int = 256,
                 owner: Owner = IOC_OWNER, options: OutputOptions = OutputOptions()) -> None:
        if batch_rows < 1:
            raise ValueError(f"batch_rows must be positive, not {batch_rows}")
        self.target = Path(target)
        self.partial = partial_path(self.target)
        taken = taken_by(self.target)
        if taken is not None:
            raise FileExistsError(errno.EEXIST, "refusing to overwrite", str(taken))
        self._batch_rows = batch_rows
        self._rows = 0
        self._batch_start = 0
        self._buffered_bytes = 0
        self._pulse_ids = array("q")
        self._timestamps = array("q")  # the rows' global timestamps, ns
        self._options = options
        self._swmr_active = False
        self._channels: dict[str, ChannelDatasets] = {}
        self._failed = False
        self._path = self.partial
        self._h5: h5py.File | None
        self._h5, self._reopen_fd = create_h5(self.partial, owner, options.swmr)
        self._fd = self._h5.id.get_vfd_handle()
        self._write_behind = WriteBehind(self._h5.id, self._fd)
        self._file_id = file_identity(os.fstat(self._fd))
        try:
            with self._hdf5_errors("creation"):
                write_general(self._h5, general, created or now())
                self._data_group = self._h5.create_group("data")
                # Anonymous until the first channel's group links it as its pulse_id.
                self._pulse_id = row_dataset(self._h5, None, np.int64)
                self._epics = EpicsRecording(self._h5, options.epics) if options.epics else None
        except Exception:
            self._close_h5()
            self._forget_active()
            self.partial.unlink(missing_ok=True)
            raise
        options.active.set(str(self.partial), False)
        log.debug("writing %s", self.partial)

    @property
    def rows(self) -> int:
        """Messages appended so far."""
        return self._rows

    @property
    def file_bytes(self) -> int:
        """Current size of the file on disk (the .partial one until published)."""
        return os.stat(self._path).st_size

    def append(self, pulse_id: int, values: Sequence[ChannelValue],
               timestamp_ns: int | None = None) -> None:
        """Add one message (with its global timestamp) as one row of every channel
        known so far.

        A channel listed more than once in a message counts with its last entry."""
        self._require_usable()
        latest = {value.spec.name: value for value in values}
        for value in latest.values():
            if value.value is not None:
                check_value(value)  # a wrong value fails here, before any change
        self.append_columns([pulse_id], [one_row(value) for value in latest.values()],
                            None if timestamp_ns is None else [timestamp_ns])

    def append_columns(self, pulse_ids: Sequence[int], columns: Sequence[Column],
                       timestamps_ns: Sequence[int] | None = None) -> None:
        """Add ``len(pulse_ids)`` messages at once, given channel by channel, with their
        global timestamps (which place the recorded PVs' updates on the pulse ids).

        Every column has one entry per message; a column's spec is trusted for the
        rows where it is present (all share one data header)."""
        self._require_usable()
        n = len(pulse_ids)
        if any(len(column.present) != n for column in columns):
            raise ValueError(f"every column needs {n} rows")
        if timestamps_ns is not None and len(timestamps_ns) != n:
            raise ValueError(f"{n} pulse ids but {len(timestamps_ns)} timestamps")
        self._pulse_ids.extend(pulse_ids)  # OverflowError beyond int64, before any change
        self._timestamps.extend(timestamps_ns if timestamps_ns is not None else [0] * n)
        row = self._rows
        with self._hdf5_errors("write"):
            present = [(column, Definition.of_spec(column.spec))
                       for column in columns if column.present.any()]
            for column in columns:
                self._channel(column.spec.name)
            changed = [(self._channels[column.spec.name], definition)
                       for column, definition in present
                       if self._channels[column.spec.name].definition not in (None, definition)]
            with self._structure(bool(changed)):
                if changed:
                    self._write_batch()  # the rows before belong to the old definitions
                for channel, definition in changed:
                    channel.redefine(definition, row)
            for column, definition in present:
                channel = self._channels[column.spec.name]
                if channel.definition is None:
                    channel.definition = definition
                channel.buffer(row, column)
                self._buffered_bytes += column_bytes(column)
            self._rows += n
            if (self._rows - self._batch_start >= self._batch_rows
                    or self._buffered_bytes >= BATCH_BYTES_LIMIT):
                self._write_batch()

    @property
    def pulse_ids(self) -> np.ndarray:
        """The pulse id of every row so far (a copy)."""
        return np.array(self._pulse_ids, dtype=np.int64)

    def truncate(self, rows: int) -> None:
        """Drop every row from ``rows`` on, as if they had never been appended.

        A stop can arrive after the messages that follow it were written."""
        self._require_usable()
        if rows >= self._rows:
            return
        with self._hdf5_errors("truncate"), self._structure(True):
            self._write_batch()
            for channel in self._channels.values():
                channel.truncate(rows)
            self._pulse_id.resize(rows)
            if self._epics is not None:
                self._epics.truncate(self._timestamps[rows - 1] if rows else None)
        del self._pulse_ids[rows:]
        del self._timestamps[rows:]
        self._rows = self._batch_start = rows

    def flush(self) -> None:
        """Write the buffered rows and flush the file, so that it is readable as is."""
        self._require_usable()
        assert self._h5 is not None
        with self._hdf5_errors("flush"):
            self._write_batch()
            self._write_epics()
            self._h5.flush()
            self._write_behind.cycle()
            if self._options.swmr and not self._swmr_active and self._rows and self._channels:
                self._start_swmr()

    @property
    def swmr_active(self) -> bool:
        """True while readers may open the file with SWMR."""
        return self._swmr_active

    def not_connected(self) -> list[str]:
        """The recorded PVs not connected now."""
        return self._epics.not_connected() if self._epics is not None else []

    def close(self) -> Path:
        """Complete the file and publish it under ``target``; never overwrites.

        If ``target`` appeared meanwhile, raises ``FileExistsError`` and the
        ``.partial`` file stays (``abandon`` returns it)."""
        self._require_usable()
        assert self._h5 is not None
        with self._hdf5_errors("close"):
            self._complete()
            # Never closed twice: a second close after a failed one crashes HDF5.
            h5, self._h5 = self._h5, None
            h5.close()
        self._forget_active()
        # A link, not a rename: a reader's handle on the .partial name stays valid.
        publish(self.partial, self.target)
        self._path = self.target
        log.info("wrote %d rows to %s", self._rows, self.target)
        return self.target

    def abandon(self) -> Path:
        """Close as well as possible after an error, without publishing; never raises.

        Returns the ``.partial`` path."""
        if self._h5 is not None:
            if not self._failed:
                try:
                    self._complete()
                except Exception:
                    log.exception("cannot write the last rows of %s", self.partial)
                    self._failed = True
            self._close_h5()
            log.warning("abandoned %s after %d rows", self.partial, self._rows)
        self._forget_active()
        return self.partial

    def _complete(self) -> None:
        """Write everything; closing the file then has nothing left to write, which
        matters because a close that fails to write crashes HDF5 later (h5py#914)."""
        assert self._h5 is not None
        with self._structure(True):
            self._write_batch()
            self._write_epics()
            if self._epics is not None:
                self._epics.finish()
            for channel in self._channels.values():
                channel.finish(self._rows)
            self._h5.flush()
        self._swmr_active = False  # closing next: SWMR is not started again

    def _write_epics(self) -> None:
        if self._epics is None or not self._rows:
            return
        with self._structure(self._epics.needs_objects()):
            self._epics.write(self.pulse_ids, np.array(self._timestamps, dtype=np.int64))

    @contextmanager
    def _structure(self, needed: bool) -> Iterator[None]:
        """Let the block create, move or delete objects: with SWMR on, the file is
        reopened without it, and SWMR starts again after the block (see the module)."""
        if not (needed and self._swmr_active):
            yield
            return
        self._reopen_without_swmr()
        yield
        self._h5.flush()
        self._start_swmr()

    def _start_swmr(self) -> None:
        assert self._h5 is not None
        self._h5.swmr_mode = True
        self._swmr_active = True
        self._options.active.set(str(self.partial), True)
        log.debug("SWMR on for %s", self.partial)

    def _reopen_without_swmr(self) -> None:
        """Close the file and open it again, not SWMR, through the descriptor kept from
        its creation (not its name: see ``handle.create_h5``); every dataset is taken anew."""
        assert self._h5 is not None and self._reopen_fd is not None
        self._options.active.set(str(self.partial), False)
        self._h5.flush()
        self._write_behind.cycle()
        h5, self._h5 = self._h5, None
        self._swmr_active = False
        h5.close()
        # Readers hold shared locks on the file: the writer's lock would fail on them.
        self._h5 = h5py.File(f"/proc/self/fd/{self._reopen_fd}", "r+", libver="latest",
                             locking=False)
        self._fd = self._h5.id.get_vfd_handle()
        self._file_id = file_identity(os.fstat(self._fd))
        self._write_behind = WriteBehind(self._h5.id, self._fd)
        self._data_group = self._h5["data"]
        for channel in self._channels.values():
            channel.reattach(self._data_group, self._write_behind)
        self._pulse_id = Rows(next(iter(self._channels.values())).pulse_id_dataset())
        if self._epics is not None:
            self._epics.reattach(self._h5)

    def _forget_active(self) -> None:
        self._options.active.set("", False)
        if self._reopen_fd is not None:
            os.close(self._reopen_fd)
            self._reopen_fd = None

    def _channel(self, name: str) -> ChannelDatasets:
        channel = self._channels.get(name)
        if channel is None:
            # Known from this row on; earlier rows are back-filled as absent.
            channel = self._channels[name] = ChannelDatasets(name, self._data_group,
                                                      self._write_behind)
        return channel

    def _write_batch(self) -> None:
        start, end = self._batch_start, self._rows
        if end == start:
            return
        with self._structure(any(c.needs_objects for c in self._channels.values())):
            self._pulse_id.write(start, np.array(self._pulse_ids[start:end], dtype=np.int64))
            for channel in self._channels.values():
                channel.write(start, end, self._pulse_id)
        self._batch_start = end
        self._buffered_bytes = 0

    def _close_h5(self) -> None:
        """Close the HDF5 file without raising; after a failure, discard what HDF5
        still wants to write: a close that fails to write leaves HDF5 in a state
        that crashes the process later (h5py#914)."""
        assert self._h5 is not None
        if self._failed:
            discard_pending_writes(self._fd, self._file_id, self.partial)
        try:
            self._h5.close()
        except Exception:
            log.exception("cannot close %s", self.partial)
        self._h5 = None

    def _require_usable(self) -> None:
        if self._h5 is None:
            raise ValueError(f"{self.partial} is closed")
        if self._failed:
            raise OSError(errno.EIO, "an earlier write failed; only abandon() is allowed",
                          str(self.partial))

    @contextmanager
    def _hdf5_errors(self, action: str) -> Iterator[None]:
        """Mark the writer failed on any error; report h5py's RuntimeErrors (e.g. a
        failed flush) as OSError, with the errno from HDF5's message when it has one."""
        try:
            yield
        except Exception as exc:
            self._failed = True
            if isinstance(exc, RuntimeError):
                raise os_error(f"HDF5 {action} failed: {exc}", self.partial) from exc
            raise
