"""One HDF5 file per pulse range, in the SwissFEL layout (``hdf5.layout`` describes it).

A small open/append/flush/close interface (like areaDetector's NDFileHDF5) with the file
format behind it. Every channel has a row for every message (row-aligned), also where
the message had no value for it. The file is written as ``<target>.partial`` and only
appears under its final name once complete; an existing file is never overwritten.
"""
from __future__ import annotations

import errno
import logging
import os
import re
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
from .general import now, write_general
from .layout import BATCH_BYTES_LIMIT, Definition
from .rows import row_dataset
from .writeback import WriteBehind

log = logging.getLogger(__name__)

_ERRNO_IN_MESSAGE = re.compile(r"errno = (\d+)")


def _check_value(value: ChannelValue) -> None:
    """A present value must be what its spec says: the spec defines its column."""
    definition = Definition.of_spec(value.spec)
    name = value.spec.name
    if definition.bsread_type == "string":
        if not isinstance(value.value, str):
            raise TypeError(f"string channel {name!r} carries a {type(value.value).__name__}")
        return
    if not isinstance(value.value, (np.ndarray, np.generic)):  # numpy scalars too
        raise TypeError(f"channel {name!r} carries a {type(value.value).__name__}")
    if value.value.shape != definition.shape:
        raise ValueError(f"channel {name!r}: a value of shape {value.value.shape} for a "
                         f"spec of shape {definition.shape}")


def _column_bytes(column: Column) -> int:
    if isinstance(column.values, np.ndarray):
        return column.values.nbytes
    return sum(len(value) for value in column.values if value is not None)


def _one_row(value: ChannelValue) -> Column:
    """A single message's value as a one-row column."""
    present = value.value is not None
    if value.spec.type == "string":
        values: np.ndarray | list = [value.value or ""]
    else:
        values = np.asarray(value.value if present else 0)[np.newaxis]
    return Column(value.spec, np.array([present]),
                  np.array([value.timestamp_ns if present else 0], dtype=np.int64), values)

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
                 owner: Owner = IOC_OWNER) -> None:
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
        self._channels: dict[str, ChannelDatasets] = {}
        self._failed = False
        self._path = self.partial
        self._h5: h5py.File | None = _create_h5(self.partial, owner)
        self._fd = self._h5.id.get_vfd_handle()
        self._write_behind = WriteBehind(self._h5.id, self._fd)
        self._file_id = _file_identity(os.fstat(self._fd))
        try:
            with self._hdf5_errors("creation"):
                write_general(self._h5, general, created or now())
                self._data_group = self._h5.create_group("data")
                # Anonymous until the first channel's group links it as its pulse_id.
                self._pulse_id = row_dataset(self._h5, None, np.int64)
        except Exception:
            self._close_h5()
            self.partial.unlink(missing_ok=True)
            raise
        log.debug("writing %s", self.partial)

    @property
    def rows(self) -> int:
        """Messages appended so far."""
        return self._rows

    @property
    def file_bytes(self) -> int:
        """Current size of the file on disk (the .partial one until published)."""
        return os.stat(self._path).st_size

    def append(self, pulse_id: int, values: Sequence[ChannelValue]) -> None:
        """Add one message as one row of every channel known so far.

        A channel listed more than once in a message counts with its last entry."""
        self._require_usable()
        latest = {value.spec.name: value for value in values}
        for value in latest.values():
            if value.value is not None:
                _check_value(value)  # a wrong value fails here, before any change
        self.append_columns([pulse_id], [_one_row(value) for value in latest.values()])

    def append_columns(self, pulse_ids: Sequence[int], columns: Sequence[Column]) -> None:
        """Add ``len(pulse_ids)`` messages at once, given channel by channel.

        Every column has one entry per message; a column's spec is trusted for the
        rows where it is present (all share one data header)."""
        self._require_usable()
        n = len(pulse_ids)
        if any(len(column.present) != n for column in columns):
            raise ValueError(f"every column needs {n} rows")
        self._pulse_ids.extend(pulse_ids)  # OverflowError beyond int64, before any change
        row = self._rows
        with self._hdf5_errors("write"):
            present = [(column, Definition.of_spec(column.spec))
                       for column in columns if column.present.any()]
            for column in columns:
                self._channel(column.spec.name)
            changed = [(self._channels[column.spec.name], definition)
                       for column, definition in present
                       if self._channels[column.spec.name].definition not in (None, definition)]
            if changed:
                self._write_batch()  # the rows before belong to the old definitions
            for channel, definition in changed:
                channel.redefine(definition, row)
            for column, definition in present:
                channel = self._channels[column.spec.name]
                if channel.definition is None:
                    channel.definition = definition
                channel.buffer(row, column)
                self._buffered_bytes += _column_bytes(column)
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
        with self._hdf5_errors("truncate"):
            self._write_batch()
            for channel in self._channels.values():
                channel.truncate(rows)
            self._pulse_id.resize(rows)
        del self._pulse_ids[rows:]
        self._rows = self._batch_start = rows

    def flush(self) -> None:
        """Write the buffered rows and flush the file, so that it is readable as is."""
        self._require_usable()
        assert self._h5 is not None
        with self._hdf5_errors("flush"):
            self._write_batch()
            self._h5.flush()
            self._write_behind.cycle()

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
        return self.partial

    def _complete(self) -> None:
        """Write everything; closing the file then has nothing left to write, which
        matters because a close that fails to write crashes HDF5 later (h5py#914)."""
        assert self._h5 is not None
        self._write_batch()
        for channel in self._channels.values():
            channel.finish(self._rows)
        self._h5.flush()

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
            self._redirect_writes_to_memory()
        try:
            self._h5.close()
        except Exception:
            log.exception("cannot close %s", self.partial)
        self._h5 = None

    def _redirect_writes_to_memory(self) -> None:
        """Point HDF5's file descriptor at an anonymous in-memory file (Linux)."""
        try:
            if _file_identity(os.fstat(self._fd)) != self._file_id:
                return  # not HDF5's descriptor of our file any more
            scratch = os.memfd_create("sfbw-discard")
            try:
                os.dup2(scratch, self._fd)
            finally:
                os.close(scratch)
        except Exception:  # abandon() must not raise
            log.exception("cannot redirect the pending writes of %s", self.partial)

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
                raise _os_error(f"HDF5 {action} failed: {exc}", self.partial) from exc
            raise


def _create_h5(partial: Path, owner: Owner) -> h5py.File:
    """The new, empty ``partial``, already its owner's, opened by HDF5.

    HDF5 opens the inode ``owner`` made, through its descriptor, not the name: the
    directory may belong to the new owner by now, who could have put a link to another
    file there (HDF5's truncating open would follow it with the IOC's rights)."""
    fd = owner.create_file(partial)
    try:
        return h5py.File(f"/proc/self/fd/{fd}", "w")
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)

def _os_error(message: str, path: Path) -> OSError:
    match = _ERRNO_IN_MESSAGE.search(message)
    if match is None:
        return OSError(errno.EIO, message, str(path))
    return OSError(int(match.group(1)), message, str(path))


def _file_identity(stat: os.stat_result) -> tuple[int, int]:
    return stat.st_dev, stat.st_ino
