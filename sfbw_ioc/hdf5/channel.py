"""One channel's datasets in a file (``data``, ``is_data_present``, ``timestamp`` and the
shared ``pulse_id``), and its rows buffered since the last write."""
from __future__ import annotations

import itertools

import h5py
import numpy as np

from ..bsread import Column
from .layout import PLACEHOLDER, Definition
from .rows import Rows, row_dataset
from .writeback import WriteBehind


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

class ChannelDatasets:
    """One channel's datasets, and its rows buffered since the last write."""

    def __init__(self, name: str, data_group: h5py.Group, write_behind: WriteBehind) -> None:
        self.name = name
        # '/' would nest groups; SwissFEL names use ':' only, so escaping is rare.
        self._key = name.replace("/", "%2F")
        self._write_behind = write_behind
        self.definition: Definition | None = None
        self._data_group = data_group
        self._group: h5py.Group | None = None
        self.row_datasets: dict[str, Rows] = {}
        self._data: Rows | None = None
        self._definition_first_row = 0
        self._retired = 0
        # Columns buffered since the last write, with the row each begins at.
        self._pending: list[tuple[int, Column]] = []

    @property
    def needs_objects(self) -> bool:
        """The next write creates a group or dataset (SWMR must be off for it)."""
        return self._group is None or (self.definition is not None and self._data is None)

    def reattach(self, data_group: h5py.Group, write_behind: WriteBehind) -> None:
        """Take the datasets from ``data_group``, of the same file opened anew."""
        self._data_group, self._write_behind = data_group, write_behind
        if self._group is None:
            return
        self._group = data_group[self._key]
        self.row_datasets = {key: Rows(self._group[key]) for key in self.row_datasets}
        if self._data is not None:
            self._data = Rows(self._group["data"])

    def pulse_id_dataset(self) -> h5py.Dataset:
        assert self._group is not None
        return self._group["pulse_id"]

    def redefine(self, definition: Definition, row: int) -> None:
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

    def write(self, start: int, end: int, pulse_id: Rows) -> None:
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
            self.row_datasets[key].write(start, rows)

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
        for dataset in [*self.row_datasets.values(), self._data]:
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
        self._data = Rows(self._group["data"])
        attrs = self._data.dataset.attrs
        del attrs["last_row"]
        self._definition_first_row = int(attrs["first_row"])
        self.definition = Definition(str(attrs["bsread_type"]),
                                      tuple(int(n) for n in attrs["shape"]))

    def finish(self, rows: int) -> None:
        """Give a channel that never had a value its all-zero placeholder data."""
        if self.definition is None:
            self.definition = PLACEHOLDER
            self._write_data(rows)

    def _create_group(self, pulse_id: Rows) -> None:
        self._group = self._data_group.create_group(self._key)
        self._group.attrs["name"] = self.name
        # Rows are aligned, so every channel's pulse_id is the same: one dataset, hard
        # linked into each group, written once per batch instead of once per channel.
        self._group["pulse_id"] = pulse_id.dataset
        for key, dtype in (("is_data_present", np.uint8), ("timestamp", np.int64)):
            self.row_datasets[key] = row_dataset(self._group, key, dtype)

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

    def _create_data(self, definition: Definition) -> Rows:
        assert self._group is not None
        data = self._group.create_dataset(
            "data", shape=(0,) + definition.row_shape, dtype=definition.dtype,
            **definition.layout())
        data.attrs["bsread_type"] = definition.bsread_type
        data.attrs["shape"] = np.array(definition.shape, dtype=np.int64)
        data.attrs["first_row"] = self._definition_first_row
        return Rows(data)

    @staticmethod
    def _block(definition: Definition,
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


def _as_rows(definition: Definition, values: np.ndarray | list) -> np.ndarray:
    """A column's values shaped as dataset rows (scalars as (n, 1))."""
    if definition.bsread_type == "string":
        return np.asarray(values, dtype=object).reshape(-1, 1)
    return np.asarray(values).astype(definition.dtype, copy=False).reshape(
        (-1,) + definition.row_shape)
