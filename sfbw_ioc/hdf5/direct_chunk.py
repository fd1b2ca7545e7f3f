"""Direct-chunk writes that let the other threads run.

h5py holds the GIL through every HDF5 call. A camera image written with
``write_direct_chunk`` (80 us for 361 kB into the page cache, milliseconds when the
kernel throttles a writer) stops the receiver thread and the IOC's event loop for as
long: with one Python thread spinning beside it, each such write took 4.2 ms instead of
80 us (it waits for the interpreter's switch interval). ctypes releases the GIL around a
foreign call, so ``H5Dwrite_chunk`` is called through ctypes, on the very libhdf5 that
h5py loaded and under h5py's own lock (``phil``): HDF5 still sees one caller at a time,
as h5py guarantees it, and the rest of Python runs meanwhile (0.59 ms beside the spinner,
most of it getting the GIL back).

``chunk_writer()`` returns that way when it works here (checked with one chunk written
and read back through h5py), else h5py's ``write_direct_chunk``. A failed call is
repeated through h5py, so that a full disk raises h5py's own error.
"""
from __future__ import annotations

import ctypes
import functools
import logging
import os
from typing import Callable

import h5py
import numpy as np
from h5py._objects import phil  # h5py's lock around every HDF5 call

from ..bsread import Buffer

log = logging.getLogger(__name__)

ChunkWriter = Callable[[h5py.h5d.DatasetID, tuple[int, ...], Buffer], None]


def _h5py_write(dataset: h5py.h5d.DatasetID, offset: tuple[int, ...], chunk: Buffer) -> None:
    dataset.write_direct_chunk(offset, chunk)


def _libhdf5_candidates() -> list[str]:
    """The libhdf5 files this process has loaded (h5py's, seen in its memory map)."""
    candidates = []
    try:
        with open("/proc/self/maps", encoding="utf-8") as maps:
            for line in maps:
                path = line.split(maxsplit=5)[-1].strip()
                name = os.path.basename(path)
                if name.startswith("libhdf5") and not name.startswith("libhdf5_hl") \
                        and path not in candidates:
                    candidates.append(path)
    except OSError:
        pass
    return candidates


def _bind(path: str) -> Callable | None:
    """H5Dwrite_chunk of ``path`` when its version is h5py's, else None."""
    try:
        library = ctypes.CDLL(path)
        version = [ctypes.c_uint() for _ in range(3)]
        if library.H5get_libversion(*map(ctypes.byref, version)) < 0:
            return None
        if tuple(v.value for v in version) != h5py.version.hdf5_version_tuple[:3]:
            return None
        function = library.H5Dwrite_chunk
    except (OSError, AttributeError):
        return None
    # herr_t H5Dwrite_chunk(hid_t dset, hid_t dxpl, uint32_t filters,
    #                       const hsize_t *offset, size_t size, const void *buf)
    function.argtypes = [ctypes.c_int64, ctypes.c_int64, ctypes.c_uint32,
                         ctypes.POINTER(ctypes.c_uint64), ctypes.c_size_t, ctypes.c_void_p]
    function.restype = ctypes.c_int
    return function


def _call(function: Callable, dataset: h5py.h5d.DatasetID, offset: tuple[int, ...],
          chunk: Buffer) -> int:
    """H5Dwrite_chunk's status (negative: failed)."""
    data = np.frombuffer(chunk, np.uint8)  # its address; keeps the chunk alive
    with phil:
        return function(dataset.id, 0, 0, (ctypes.c_uint64 * len(offset))(*offset),
                        data.nbytes, data.ctypes.data)


def _ctypes_writer(function: Callable) -> ChunkWriter:
    def write(dataset: h5py.h5d.DatasetID, offset: tuple[int, ...], chunk: Buffer) -> None:
        if _call(function, dataset, offset, chunk) < 0:
            _h5py_write(dataset, offset, chunk)  # raises h5py's error, e.g. ENOSPC
    return write


def _works(function: Callable) -> bool:
    """One chunk through ``function`` into an in-memory file, read back by h5py."""
    chunk = os.urandom(4096)
    try:
        with h5py.File(f"sfbw-direct-chunk-check-{os.getpid()}", "w", driver="core",
                       backing_store=False) as file:
            dataset = file.create_dataset("d", (2, 4096), np.uint8, chunks=(1, 4096))
            return (_call(function, dataset.id, (1, 0), chunk) >= 0
                    and dataset.id.read_direct_chunk((1, 0))[1] == chunk)
    except (OSError, ValueError, RuntimeError):
        return False


@functools.cache
def chunk_writer() -> ChunkWriter:
    """The way to write a direct chunk: without the GIL when possible."""
    for path in _libhdf5_candidates():
        function = _bind(path)
        if function is not None and _works(function):
            log.info("direct chunks written through %s without the GIL", path)
            return _ctypes_writer(function)
    log.warning("libhdf5 not usable through ctypes; direct chunks hold the GIL (h5py)")
    return _h5py_write
