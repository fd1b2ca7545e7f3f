"""Datasets that grow by rows, written at HDF5's low level."""
from __future__ import annotations

import functools

import h5py
import numpy as np

from .layout import chunk_rows


def row_dataset(group: h5py.Group, name: str | None, dtype: type) -> Rows:
    return Rows(group.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dtype,
                                      chunks=(chunk_rows(np.dtype(dtype).itemsize),)))


@functools.lru_cache(maxsize=256)
def _memory_space(shape: tuple[int, ...]) -> h5py.h5s.SpaceID:
    return h5py.h5s.create_simple(shape)


class Rows:
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
