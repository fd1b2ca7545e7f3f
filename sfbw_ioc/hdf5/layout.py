"""What each channel's ``data`` dataset is: its type, row shape, chunks and filter.

The SwissFEL layout, as written by ``hdf5.file.OutputFile``::

    /general/{created,user,process,instrument}   scalar UTF-8 strings
    /general/channels                 the channel selection as given (empty: all)
    /data/<channel>/data              one row per message; scalars as (N, 1)
    /data/<channel>/data(1), ...      earlier definitions after a type or shape change
    /data/<channel>/pulse_id          int64 (N,)
    /data/<channel>/is_data_present   uint8 (N,)
    /data/<channel>/timestamp         int64 (N,), ns since the epoch, 0 when absent
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import h5py
import hdf5plugin  # registers the bitshuffle filter with HDF5
import numpy as np

from ..bsread import BSREAD_TYPES, ChannelSpec

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

STRING_DTYPE = h5py.string_dtype("utf-8")
_VLEN_BYTES = 16  # size of one variable-length reference in the file


@dataclass(frozen=True, slots=True)
class Definition:
    """What one channel's ``data`` dataset holds: a bsread type and a numpy shape."""

    bsread_type: str
    shape: tuple[int, ...]

    @classmethod
    def of_spec(cls, spec: ChannelSpec) -> Definition:
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
            return STRING_DTYPE
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
            options = {"chunks": (chunk_rows(self.row_bytes),) + chunk_shape}
        return {"maxshape": maxshape, **options}


PLACEHOLDER = Definition("float64", ())  # the data of a channel never present in a file

def chunk_rows(row_bytes: int) -> int:
    return max(1, min(MAX_CHUNK_ROWS, CHUNK_TARGET_BYTES // max(1, row_bytes)))
