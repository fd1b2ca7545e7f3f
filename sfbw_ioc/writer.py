"""HDF5 file writer: one file per pulse range, in the SwissFEL layout.

A small open/append/flush/close interface (like areaDetector's NDFileHDF5) with the
file format behind it::

    /general/{created,user,process,instrument}   scalar UTF-8 strings
    /general/channels                 the channel selection as given (empty: all)
    /data/<channel>/data              one row per message; scalars as (N, 1)
    /data/<channel>/data(1), ...      earlier definitions after a type or shape change
    /data/<channel>/pulse_id          int64 (N,)
    /data/<channel>/is_data_present   uint8 (N,)
    /data/<channel>/timestamp         int64 (N,), ns since the epoch, 0 when absent

Every channel has a row for every message (row-aligned), also where the message had no
value for it. The file is written as ``<target>.partial`` and only appears under its
final name once complete; an existing file is never overwritten.
"""
from __future__ import annotations

import ctypes
import errno
import functools
import itertools
import logging
import math
import os
import re
from array import array
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import h5py
import hdf5plugin  # registers the bitshuffle filter with HDF5
import numpy as np

from sfbw_ioc.bsread import BSREAD_TYPES, ChannelSpec, ChannelValue, Column
from sfbw_ioc.ownership import IOC_OWNER, Owner

log = logging.getLogger(__name__)

GENERAL_KEYS = ("user", "process", "instrument")
NOT_GIVEN = "not given"

# Chunks of small values: big enough for efficient reads of whole files, small enough
# that the partly used last chunk of each dataset of a short file wastes little space.
CHUNK_TARGET_BYTES = 256 * 1024
# The flush once a second rewrites every dataset's partly filled last chunk: with 8192
# rows (64 KiB of float64) 1000 channels at 100 Hz wrote 142 MB/s for 1.7 MB/s of data;
# with 1024 rows (10 s at 100 Hz) 20 MB/s.
MAX_CHUNK_ROWS = 1024
# A row at least this big (or any value of >= 2 dimensions) is an image: one per chunk.
IMAGE_ROW_BYTES = 64 * 1024
# Rows are written early when the buffered values reach this size, to bound memory.
BATCH_BYTES_LIMIT = 64 * 1024 * 1024

# Direct-chunk writing of bitshuffle_lz4 wire values relies on exactly this filter.
IMAGE_FILTER = hdf5plugin.Bitshuffle(nelems=0, cname="lz4")

_STRING_DTYPE = h5py.string_dtype("utf-8")
_VLEN_BYTES = 16  # size of one variable-length reference in the file
_ERRNO_IN_MESSAGE = re.compile(r"errno = (\d+)")


@dataclass(frozen=True, slots=True)
class _Definition:
    """What one channel's ``data`` dataset holds: a bsread type and a numpy shape."""

    bsread_type: str
    shape: tuple[int, ...]

    @classmethod
    def of_spec(cls, spec: ChannelSpec) -> _Definition:
        """The definition of a channel's present values, as its data header declares."""
        if spec.type not in BSREAD_TYPES:
            raise ValueError(f"channel {spec.name!r} has unknown bsread type {spec.type!r}")
        return cls(spec.type, () if spec.type == "string" else spec.shape)

    @property
    def row_shape(self) -> tuple[int, ...]:
        return self.shape or (1,)

    @property
    def dtype(self) -> np.dtype:
        if self.bsread_type == "string":
            return _STRING_DTYPE
        if self.bsread_type == "bool":
            return np.dtype(np.uint8)  # HDF5 has no bool; the bsread_type attribute says so
        return np.dtype(BSREAD_TYPES[self.bsread_type])

    @property
    def fill(self) -> str | int:
        return "" if self.bsread_type == "string" else 0

    @property
    def row_bytes(self) -> int:
        item = _VLEN_BYTES if self.bsread_type == "string" else self.dtype.itemsize
        return item * math.prod(self.row_shape)

    def layout(self) -> dict[str, Any]:
        """Chunking and filter options for ``create_dataset``."""
        # A zero-length dimension cannot be chunked as fixed; let it be extendible.
        maxshape = (None,) + tuple(size or None for size in self.row_shape)
        chunk_shape = tuple(size or 1 for size in self.row_shape)
        if len(self.shape) >= 2 or self.row_bytes >= IMAGE_ROW_BYTES:
            options: dict[str, Any] = {"chunks": (1,) + chunk_shape}
            if len(self.shape) >= 2:
                options.update(IMAGE_FILTER)
        else:
            options = {"chunks": (_chunk_rows(self.row_bytes),) + chunk_shape}
        return {"maxshape": maxshape, **options}


PLACEHOLDER = _Definition("float64", ())  # the data of a channel never present in a file


def _row_dataset(group: h5py.Group, name: str | None, dtype: type) -> _Rows:
    return _Rows(group.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dtype,
                                      chunks=(_chunk_rows(np.dtype(dtype).itemsize),)))


@functools.lru_cache(maxsize=256)
def _memory_space(shape: tuple[int, ...]) -> h5py.h5s.SpaceID:
    return h5py.h5s.create_simple(shape)


class _Rows:
    """A dataset that grows by rows, written at HDF5's low level.

    h5py's high-level resize and slice assignment cost ~100 µs each, and asking HDF5 for
    a shape ~7 µs; a wide stream (1000 channels, three datasets each) makes thousands of
    writes per flush, so the length is kept here and rows go in at the low level.
    """

    __slots__ = ("dataset", "length", "_row_shape")

    def __init__(self, dataset: h5py.Dataset) -> None:
        self.dataset = dataset
        self.length = dataset.shape[0]
        self._row_shape = dataset.shape[1:]

    def resize(self, rows: int) -> None:
        if rows != self.length:
            self.dataset.id.set_extent((rows,) + self._row_shape)
            self.length = rows

    def write(self, first: int, rows: np.ndarray) -> None:
        """Write numeric ``rows`` from row ``first`` on, growing as needed."""
        rows = np.ascontiguousarray(rows)
        if self.length < first + len(rows):
            self.resize(first + len(rows))
        file_space = self.dataset.id.get_space()
        file_space.select_hyperslab((first,) + (0,) * (rows.ndim - 1), rows.shape)
        self.dataset.id.write(_memory_space(rows.shape), file_space, rows)


def _chunk_rows(row_bytes: int) -> int:
    return max(1, min(MAX_CHUNK_ROWS, CHUNK_TARGET_BYTES // max(1, row_bytes)))


def _check_value(value: ChannelValue) -> None:
    """A present value must be what its spec says: the spec defines its column."""
    definition = _Definition.of_spec(value.spec)
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


def _coalesced(pending: list[tuple[int, Column]]) -> list[tuple[int, Column]]:
    """Buffered columns that follow each other joined into one, except images stored as
    chunks: a write then costs a few numpy operations per channel, not per batch."""
    runs: list[list[tuple[int, Column]]] = []
    for row, column in pending:
        if runs and _follows(runs[-1][-1], row, column):
            runs[-1].append((row, column))
        else:
            runs.append([(row, column)])
    return [run[0] if len(run) == 1 else (run[0][0], _joined_columns([c for _, c in run]))
            for run in runs]


def _follows(previous: tuple[int, Column], row: int, column: Column) -> bool:
    previous_row, previous_column = previous
    return (not (column.chunked or previous_column.chunked)
            and previous_row + len(previous_column.present) == row)


def _joined_columns(columns: list[Column]) -> Column:
    values = columns[0].values
    joined = (list(itertools.chain.from_iterable(c.values for c in columns))
              if isinstance(values, list) else np.concatenate([c.values for c in columns]))
    return Column(columns[0].spec, np.concatenate([c.present for c in columns]),
                  np.concatenate([c.timestamps for c in columns]), joined)


class _WriteBehind:
    """Sends direct-chunk images to disk every WINDOW bytes (and at every flush), drops them
    from the page cache one window later: a camera's data stays cached only briefly.

    Left to the kernel, a camera writing hundreds of MB/s piles up dirty pages until the
    kernel throttles the writer mid-acquisition, and closing waits for all of them at
    once; every new cached page is also fresh memory, while dropped pages are reused.
    Image chunks are written once and never read back by the IOC; scalar chunks and
    HDF5's metadata are rewritten at every flush and stay cached (dropping them would
    make each rewrite read from disk).
    """

    WINDOW = 32 * 2**20
    _WRITE = 2  # SYNC_FILE_RANGE_WRITE: start writeback, do not wait
    _WAIT_WRITE_WAIT = 7  # WAIT_BEFORE | WRITE | WAIT_AFTER

    def __init__(self, file: h5py.h5f.FileID, fd: int) -> None:
        self._file = file
        self._fd = fd
        self._new: list[list[int]] = []  # [offset, end] of chunks written since a cycle
        self._new_bytes = 0
        self._started: list[list[int]] = []  # their writeback started at the last cycle
        self._sync_file_range = _sync_file_range()

    def write_chunk(self, dataset: h5py.h5d.DatasetID, coordinates: tuple[int, ...],
                    chunk: bytes | memoryview) -> None:
        """``write_direct_chunk``, noting where the chunk went: HDF5 puts a new chunk
        at the end of the file, so when the file grew by exactly its size it is there
        (asking HDF5 for a chunk's address walks the whole chunk index, every time).
        A chunk placed elsewhere, or next to new metadata, is left to the kernel."""
        end = self._file.get_filesize()
        dataset.write_direct_chunk(coordinates, chunk)
        if self._file.get_filesize() == end + len(chunk):
            self._written(end, len(chunk))

    def _written(self, offset: int, size: int) -> None:
        if self._new and self._new[-1][1] == offset:
            self._new[-1][1] = offset + size  # the next image, right behind: one range
        else:
            self._new.append([offset, offset + size])
        self._new_bytes += size
        if self._new_bytes >= self.WINDOW:
            self.cycle()

    def cycle(self) -> None:
        """Start writing back what is new; wait for, and drop, what was started before.

        Raises OSError when the disk failed to write (EIO, ENOSPC): the data is not
        safe. Any other refusal (a file system without the call) only ends the dropping."""
        if self._sync_file_range is not None:
            try:
                self._write_back_and_drop()
            except OSError as error:
                if error.errno in (errno.EIO, errno.ENOSPC, errno.EDQUOT):
                    raise
                log.warning("page cache not managed for this file: %s", error)
                self._sync_file_range = None
        self._started, self._new, self._new_bytes = self._new, [], 0

    def _write_back_and_drop(self) -> None:
        assert self._sync_file_range is not None
        for offset, end in self._new:
            self._sync_file_range(self._fd, offset, end - offset, self._WRITE)
        for offset, end in self._started:
            self._sync_file_range(self._fd, offset, end - offset, self._WAIT_WRITE_WAIT)
            # Whole pages only: the kernel keeps pages the range covers in part.
            os.posix_fadvise(self._fd, offset, end - offset, os.POSIX_FADV_DONTNEED)


def _sync_file_range() -> Callable[[int, int, int, int], None] | None:
    """Linux's sync_file_range, raising OSError; None where there is none."""
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]

    def sync_file_range(fd: int, offset: int, nbytes: int, flags: int) -> None:
        if function(fd, offset, nbytes, flags) != 0:
            number = ctypes.get_errno()
            raise OSError(number, os.strerror(number))

    return sync_file_range


class _Channel:
    """One channel's datasets, and its rows buffered since the last write."""

    def __init__(self, name: str, data_group: h5py.Group, write_behind: _WriteBehind) -> None:
        self.name = name
        self._write_behind = write_behind
        self.definition: _Definition | None = None
        self._data_group = data_group
        self._group: h5py.Group | None = None
        self._row_datasets: dict[str, _Rows] = {}
        self._data: _Rows | None = None
        self._definition_first_row = 0
        self._retired = 0
        # Columns buffered since the last write, with the row each begins at.
        self._pending: list[tuple[int, Column]] = []

    def redefine(self, definition: _Definition, row: int) -> None:
        """Start a new ``data`` at ``row``; the old one (fully written) moves aside."""
        assert self._data is not None and self._group is not None and not self._pending
        self._retired += 1
        self._data.dataset.attrs["last_row"] = row - 1
        self._group.move("data", f"data({self._retired})")
        self._data = None
        self.definition = definition
        self._definition_first_row = row

    def buffer(self, row: int, column: Column) -> None:
        if column.present.any():
            self._pending.append((row, column))

    def write(self, start: int, end: int, pulse_id: _Rows) -> None:
        """Write rows [start, end): the buffered values, absent everywhere else."""
        if self._group is None:
            self._create_group(pulse_id)
        self._pending = _coalesced(self._pending)
        present = np.zeros(end - start, dtype=np.uint8)
        timestamps = np.zeros(end - start, dtype=np.int64)
        for row, column in self._pending:
            rows = slice(row - start, row - start + len(column.present))
            present[rows] = column.present
            timestamps[rows] = column.timestamps

        # A new channel's earlier rows are absent: writing from ``start`` grows its
        # datasets over them, which read back as zeros.
        for key, rows in (("is_data_present", present), ("timestamp", timestamps)):
            self._row_datasets[key].write(start, rows)

        if self.definition is not None:
            self._write_data(end)
        self._pending.clear()

    def truncate(self, rows: int) -> None:
        """Drop rows from ``rows`` on (everything is written); definitions that began
        in the dropped rows are undone, bringing back the moved-aside dataset."""
        assert not self._pending
        if self._group is None:
            return
        while self._data is not None and self._definition_first_row >= rows:
            del self._group["data"]
            self._data = None
            self._restore_retired()
        for dataset in [*self._row_datasets.values(), self._data]:
            if dataset is not None and dataset.length > rows:
                dataset.resize(rows)

    def _restore_retired(self) -> None:
        if not self._retired:
            self.definition = None
            self._definition_first_row = 0
            return
        assert self._group is not None
        self._group.move(f"data({self._retired})", "data")
        self._retired -= 1
        self._data = _Rows(self._group["data"])
        attrs = self._data.dataset.attrs
        del attrs["last_row"]
        self._definition_first_row = int(attrs["first_row"])
        self.definition = _Definition(str(attrs["bsread_type"]),
                                      tuple(int(n) for n in attrs["shape"]))

    def finish(self, rows: int) -> None:
        """Give a channel that never had a value its all-zero placeholder data."""
        if self.definition is None:
            self.definition = PLACEHOLDER
            self._write_data(rows)

    def _create_group(self, pulse_id: _Rows) -> None:
        # '/' would nest groups; SwissFEL names use ':' only, so escaping is rare.
        self._group = self._data_group.create_group(self.name.replace("/", "%2F"))
        self._group.attrs["name"] = self.name
        # Rows are aligned, so every channel's pulse_id is the same: one dataset, hard
        # linked into each group, written once per batch instead of once per channel.
        self._group["pulse_id"] = pulse_id.dataset
        for key, dtype in (("is_data_present", np.uint8), ("timestamp", np.int64)):
            self._row_datasets[key] = _row_dataset(self._group, key, dtype)

    def _write_data(self, end: int) -> None:
        """Extend ``data`` to ``end`` rows; write the span of the buffered values only,
        so that absent rows outside it (e.g. missing images) allocate no chunks."""
        definition = self.definition
        assert definition is not None and self._group is not None
        if self._data is None:
            self._data = self._create_data(definition)
        self._data.resize(end)
        plain = [(row, column) for row, column in self._pending if not column.chunked]
        if plain:
            first, _, block = self._block(definition, plain)
            if definition.bsread_type == "string":
                self._data.dataset[first:first + len(block)] = block
            else:
                self._data.write(first, block)
        for row, column in self._pending:
            if column.chunked:
                self._write_chunks(row, column)

    def _write_chunks(self, first_row: int, column: Column) -> None:
        """The wire's bitshuffle_lz4 images, stored as they came: no decompression."""
        assert self._data is not None
        origin = (0,) * len(self.definition.row_shape)
        for index in np.flatnonzero(column.present):
            self._write_behind.write_chunk(self._data.dataset.id,
                                           (first_row + int(index),) + origin,
                                           column.values[index])

    def _create_data(self, definition: _Definition) -> _Rows:
        assert self._group is not None
        data = self._group.create_dataset(
            "data", shape=(0,) + definition.row_shape, dtype=definition.dtype,
            **definition.layout())
        data.attrs["bsread_type"] = definition.bsread_type
        data.attrs["shape"] = np.array(definition.shape, dtype=np.int64)
        data.attrs["first_row"] = self._definition_first_row
        return _Rows(data)

    @staticmethod
    def _block(definition: _Definition,
               pending: list[tuple[int, Column]]) -> tuple[int, int, np.ndarray]:
        """(first row, end row, values) spanning the buffered present values only, so
        that absent rows outside the span (e.g. missing images) allocate no chunks."""
        spans = [(row + int(np.argmax(c.present)),
                  row + len(c.present) - int(np.argmax(c.present[::-1])), row, c)
                 for row, c in pending]
        first, end = min(s[0] for s in spans), max(s[1] for s in spans)
        if len(spans) == 1 and spans[0][2] == first and spans[0][3].present.all():
            return first, end, _as_rows(definition, spans[0][3].values)  # the usual case
        dtype = object if definition.bsread_type == "string" else definition.dtype
        block = np.full((end - first,) + definition.row_shape, definition.fill, dtype=dtype)
        for _, _, row, column in spans:
            rows = np.flatnonzero(column.present)
            block[rows + row - first] = _as_rows(definition, column.values)[rows]
        return first, end, block


def _as_rows(definition: _Definition, values: np.ndarray | list) -> np.ndarray:
    """A column's values shaped as dataset rows (scalars as (n, 1))."""
    if definition.bsread_type == "string":
        return np.asarray(values, dtype=object).reshape(-1, 1)
    return np.asarray(values).astype(definition.dtype, copy=False).reshape(
        (-1,) + definition.row_shape)


class FileWriter:
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
        for path in (self.target, self.partial):
            if os.path.lexists(path):
                raise FileExistsError(errno.EEXIST, "refusing to overwrite", str(path))
        self._batch_rows = batch_rows
        self._rows = 0
        self._batch_start = 0
        self._buffered_bytes = 0
        self._pulse_ids = array("q")
        self._channels: dict[str, _Channel] = {}
        self._failed = False
        self._path = self.partial
        self._h5: h5py.File | None = _create_h5(self.partial, owner)
        self._fd = self._h5.id.get_vfd_handle()
        self._write_behind = _WriteBehind(self._h5.id, self._fd)
        self._file_id = _file_identity(os.fstat(self._fd))
        try:
            with self._hdf5_errors("creation"):
                _write_general(self._h5, general, created or _now())
                self._data_group = self._h5.create_group("data")
                # Anonymous until the first channel's group links it as its pulse_id.
                self._pulse_id = _row_dataset(self._h5, None, np.int64)
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
            present = [(column, _Definition.of_spec(column.spec))
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
        _fsync_path(self.partial)
        os.link(self.partial, self.target)  # unlike rename, fails if target exists
        self._path = self.target
        self.partial.unlink()
        _fsync_path(self.target.parent)
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

    def _channel(self, name: str) -> _Channel:
        channel = self._channels.get(name)
        if channel is None:
            # Known from this row on; earlier rows are back-filled as absent.
            channel = self._channels[name] = _Channel(name, self._data_group,
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


def partial_path(target: Path) -> Path:
    """Where the file for ``target`` is written until it is complete."""
    return target.with_name(target.name + ".partial")


def _write_general(h5: h5py.File, general: Mapping[str, str], created: str) -> None:
    group = h5.create_group("general")
    group.create_dataset("created", data=created, dtype=_STRING_DTYPE)
    for key in GENERAL_KEYS:
        group.create_dataset(key, data=general.get(key) or NOT_GIVEN, dtype=_STRING_DTYPE)
    if "channels" in general:  # the selection as given; empty: every channel
        group.create_dataset("channels", data=general["channels"], dtype=_STRING_DTYPE)


def _now() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")


def _os_error(message: str, path: Path) -> OSError:
    match = _ERRNO_IN_MESSAGE.search(message)
    if match is None:
        return OSError(errno.EIO, message, str(path))
    return OSError(int(match.group(1)), message, str(path))


def _file_identity(stat: os.stat_result) -> tuple[int, int]:
    return stat.st_dev, stat.st_ino


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
