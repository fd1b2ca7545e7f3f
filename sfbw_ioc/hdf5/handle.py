"""The HDF5 file itself: created through the descriptor its owner made, and, after a
failure, closed without letting HDF5 write into the file again."""
from __future__ import annotations

import errno
import logging
import os
import re
from pathlib import Path

import h5py

from ..output.ownership import Owner

log = logging.getLogger(__name__)

_ERRNO_IN_MESSAGE = re.compile(r"errno = (\d+)")


def create_h5(partial: Path, owner: Owner, swmr: bool) -> tuple[h5py.File, int | None]:
    """The new, empty ``partial``, already its owner's, opened by HDF5; for SWMR in the
    latest file format, and with a descriptor kept for reopening it.

    HDF5 opens the inode ``owner`` made, through its descriptor, not the name: the
    directory may belong to the new owner by now, who could have put a link to another
    file there (HDF5's truncating open would follow it with the IOC's rights)."""
    fd = owner.create_file(partial)
    kept = None
    try:
        kept = os.dup(fd) if swmr else None
        return h5py.File(f"/proc/self/fd/{fd}", "w", libver="latest" if swmr else None), kept
    except BaseException:
        if kept is not None:
            os.close(kept)
        partial.unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)


def os_error(message: str, path: Path) -> OSError:
    """h5py's error text as an OSError, with the errno HDF5 names in it (EIO if none)."""
    match = _ERRNO_IN_MESSAGE.search(message)
    if match is None:
        return OSError(errno.EIO, message, str(path))
    return OSError(int(match.group(1)), message, str(path))


def file_identity(stat: os.stat_result) -> tuple[int, int]:
    return stat.st_dev, stat.st_ino


def discard_pending_writes(fd: int, file_id: tuple[int, int], path: Path) -> None:
    """Point HDF5's descriptor ``fd`` of the file ``file_id`` at an anonymous in-memory
    file (Linux), so that what HDF5 still wants to write after a failure goes nowhere;
    never raises."""
    try:
        if file_identity(os.fstat(fd)) != file_id:
            return  # not HDF5's descriptor of our file any more
        scratch = os.memfd_create("sfbw-discard")
        try:
            os.dup2(scratch, fd)
        finally:
            os.close(scratch)
    except Exception:  # abandon() must not raise
        log.exception("cannot redirect the pending writes of %s", path)
