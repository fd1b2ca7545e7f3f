"""Write-behind for direct-chunk images: written back early, then dropped from the page cache."""
from __future__ import annotations

import ctypes
import errno
import logging
import os
from typing import Callable

import h5py

from .direct_chunk import chunk_writer

log = logging.getLogger(__name__)


class WriteBehind:
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
        self._write_chunk = chunk_writer()

    def write_chunk(self, dataset: h5py.h5d.DatasetID, coordinates: tuple[int, ...],
                    chunk: bytes | memoryview) -> None:
        """A direct-chunk write (``direct_chunk``: without the GIL), noting where the
        chunk went: HDF5 puts a new chunk at the end of the file, so when the file grew
        by exactly its size it is there (asking HDF5 for a chunk's address walks the
        whole chunk index, every time). A chunk placed elsewhere, or next to new
        metadata, is left to the kernel."""
        end = self._file.get_filesize()
        self._write_chunk(dataset, coordinates, chunk)
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
