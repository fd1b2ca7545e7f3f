"""How the IOC uses glibc's allocator: images reused while they stream, free memory
given back to the system a few seconds later.

A ring of camera images allocates and frees one large block per message (two: ZeroMQ's
and the ring's). Served with mmap, every block is fresh memory that the kernel zeroes
and faults in page by page (23 % of the IOC's samples in ``clear_page``; the camera
benchmark with a full ring ran at 650 frames/s, 1445 from the heap). Served from the
heap, an evicted image's block is reused by the next one, already in memory. The heap
keeps what it freed, though (after a flood of 1 MiB images through a 200 MiB ring:
584 MiB instead of ~270 MiB), so a thread trims it periodically: while a stream runs,
little is free at any moment and trimming costs nothing.
"""
from __future__ import annotations

import ctypes
import logging
import threading

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Blocks above this are mmapped: a rare huge message must not stay in a heap.
LARGEST_HEAP_BLOCK = 32 * 2**20
TRIM_INTERVAL_S = 5.0


def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def tune_allocator() -> bool:
    """Serve blocks up to LARGEST_HEAP_BLOCK from the heap and never trim it on free;
    False when the C library is not glibc (nothing tuned, nothing to trim)."""
    libc = _glibc()
    if libc is None:
        return False
    # Fixed values: glibc's dynamic ones serve images with mmap until the first is freed,
    # and trim the heap's top on a free once it holds twice an image, which would return
    # and refetch images all the time.
    ok = (libc.mallopt(_M_MMAP_THRESHOLD, LARGEST_HEAP_BLOCK) == 1
          and libc.mallopt(_M_TRIM_THRESHOLD, 2 * LARGEST_HEAP_BLOCK) == 1)
    if not ok:
        log.warning("mallopt refused the allocator settings; images are served with mmap")
    return ok


class HeapTrimmer(threading.Thread):
    """Gives the heap's free memory back to the system every ``interval`` seconds."""

    def __init__(self, interval: float = TRIM_INTERVAL_S) -> None:
        super().__init__(name="heap-trimmer", daemon=True)
        self._interval = interval
        self._stop_event = threading.Event()
        self._libc = _glibc()

    def stop(self) -> None:
        self._stop_event.set()

    def run(self) -> None:
        if self._libc is None:
            return
        while not self._stop_event.wait(self._interval):
            self._libc.malloc_trim(0)  # every arena: its free pages are MADV_DONTNEED
