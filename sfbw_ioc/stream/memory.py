"""How the IOC uses glibc's allocator: the ring's memory touched before the ring needs
it, images reused while they stream, free memory beyond that given back to the system.

A ring of camera images allocates and frees one large block per message (ZeroMQ's, which
the ring keeps). Served with mmap, every block is fresh memory that the kernel zeroes
and faults in page by page (23 % of the IOC's samples in ``clear_page``; the camera
benchmark with a full ring ran at 650 frames/s, 1445 from the heap). Served from the
heap, an evicted image's block is reused by the next one, already in memory.

Until the ring is full once, though, every message lands on memory the process never
touched: a page fault per 4 KiB (95 per 361 kB frame), and on a VM whose host backs
memory lazily (free page reporting) first-touch memory is ~20 times slower than reused
memory. A fresh IOC's first acquisition of camera frames ran at 0.67 of the speed of one
whose ring had been filled. So the keeper thread touches the memory the ring will hold
(``RingBuffer.expected_bytes``: its byte budget, or its message count times the size of
the messages it holds, whichever is less) as soon as the first messages show how large
they are, and leaves it free in the heap for the receiver. All threads share one
arena, so that what the keeper touched is what the receiver's allocations get.

Where Linux has MADV_POPULATE_WRITE (5.14 and later) the keeper takes the heap it needs,
gives it back at once and has the kernel fault the pages in, which writes nothing: the
reserve is free while it is touched, and a burst arriving meanwhile (the first
acquisition of a freshly started IOC) lands on it, touched or about to be. Elsewhere it
writes blocks it holds and frees them at the end; a burst meanwhile takes other fresh
memory: ZeroMQ's thread paid 0.26 ms of page faults per 361 kB frame instead of 0.08.

The heap keeps what it freed (after a flood of 1 MiB images through a 200 MiB ring:
584 MiB instead of ~270 MiB), so the keeper trims it periodically, all but the part of
the reserve that the ring has not filled yet: a flood's excess goes back.
"""
from __future__ import annotations

import ctypes
import logging
import threading
import time
from typing import Callable, Protocol

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
_NEVER = -1  # M_TRIM_THRESHOLD: free() never trims (malloc_trim still does)
# Blocks above this are mmapped: a rare huge message must not stay in a heap.
LARGEST_HEAP_BLOCK = 32 * 2**20
TRIM_INTERVAL_S = 5.0
# A freshly started IOC's first burst of frames (500 in 0.2 s) must find the reserve
# being made: it starts within this of the first messages.
RESERVE_POLL_S = 0.01
_RESERVE_BLOCK = 16 * 2**20  # below LARGEST_HEAP_BLOCK: served from the heap
_MADV_POPULATE_WRITE = 23
_PAGE = 4096


class Ring(Protocol):
    """What the keeper needs of sfbw_ioc.ring.RingBuffer."""

    def expected_bytes(self) -> int: ...

    def held_bytes(self) -> int: ...


def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    if not (hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim")):
        return None
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.malloc_trim.argtypes = [ctypes.c_size_t]
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc


def tune_allocator() -> bool:
    """Serve blocks up to LARGEST_HEAP_BLOCK from one heap shared by all threads, which
    free() never trims by itself; False when the C library is not glibc (nothing tuned,
    nothing to trim). Call before the threads start."""
    libc = _glibc()
    if libc is None:
        return False
    # Fixed values: glibc's dynamic ones serve images with mmap until the first is freed,
    # and trim the heap's top on a free once it holds twice an image, which would return
    # and refetch images all the time, and the reserve with them (the keeper trims).
    ok = (libc.mallopt(_M_MMAP_THRESHOLD, LARGEST_HEAP_BLOCK) == 1
          and libc.mallopt(_M_TRIM_THRESHOLD, _NEVER) == 1
          and libc.mallopt(_M_ARENA_MAX, 1) == 1)
    if not ok:
        log.warning("mallopt refused the allocator settings; images are served with mmap")
    return ok


def touch_heap(libc: ctypes.CDLL, room: Callable[[], int]) -> int:
    """Make heap memory for ``room()`` bytes resident, free for the next allocations:
    populated by the kernel where it can (``populate_heap``), else written
    (``write_heap``). Returns the bytes touched."""
    touched = populate_heap(libc, room)
    return write_heap(libc, room) if touched is None else touched


def populate_heap(libc: ctypes.CDLL, room: Callable[[], int]) -> int | None:
    """Take heap blocks for ``room()`` (asked before each), free them all at once (the
    heap keeps them: it never trims by itself), then fault their pages in block by block
    (``room()`` asked again before each: a ring that fills meanwhile needs less). None
    when the kernel has no MADV_POPULATE_WRITE."""
    blocks: list[int] = []
    while len(blocks) * _RESERVE_BLOCK < room():
        block = libc.malloc(_RESERVE_BLOCK)
        if not block:
            break
        blocks.append(block)
    for block in blocks:
        libc.free(block)
    touched = 0
    for block in blocks:
        if touched >= room():
            break
        start = -(-block // _PAGE) * _PAGE
        if libc.madvise(start, (block + _RESERVE_BLOCK - start) // _PAGE * _PAGE,
                        _MADV_POPULATE_WRITE) != 0:
            return None if touched == 0 else touched
        touched += _RESERVE_BLOCK
    return touched


def write_heap(libc: ctypes.CDLL, room: Callable[[], int]) -> int:
    """Take heap in blocks until they cover ``room()`` (asked before each block), write
    every page of them and free them all: they stay in the heap, in memory, for the
    next allocations. A block the room no longer needs is freed at once: a ring that
    fills meanwhile takes memory of its own, and holding both would double it.
    Returns the bytes held at the end."""
    blocks: list[int] = []
    try:
        while True:
            left = room()
            while blocks and (len(blocks) - 1) * _RESERVE_BLOCK >= left:
                libc.free(blocks.pop())
            if len(blocks) * _RESERVE_BLOCK >= left:
                return len(blocks) * _RESERVE_BLOCK
            block = libc.malloc(_RESERVE_BLOCK)
            if not block:
                return len(blocks) * _RESERVE_BLOCK
            blocks.append(block)
            ctypes.memset(block, 0, _RESERVE_BLOCK)
    finally:
        for block in blocks:
            libc.free(block)


class HeapTrimmer(threading.Thread):
    """Every ``interval`` seconds gives the heap's free memory back to the system, unless
    it is the reserve for ``ring`` (then it keeps that, touched ahead of the ring's
    first fill). Without a ring: every round trims."""

    def __init__(self, interval: float = TRIM_INTERVAL_S, ring: Ring | None = None) -> None:
        super().__init__(name="heap-trimmer", daemon=True)
        self._interval = interval
        self._ring = ring
        self._stop_event = threading.Event()
        self._libc = _glibc()
        # Bytes the heap holds for the ring, in the ring or free (touched by us).
        self._reserved = 0

    def stop(self) -> None:
        self._stop_event.set()

    def run(self) -> None:
        if self._libc is None:
            return
        period = RESERVE_POLL_S if self._ring is not None else self._interval
        next_trim = time.monotonic() + self._interval
        while not self._stop_event.wait(period):
            if self._ring is not None:
                self._reserve()
            if time.monotonic() >= next_trim:
                next_trim += self._interval
                self._trim_beyond_reserve()

    def _reserve(self) -> None:
        target = self._ring.expected_bytes()
        if target - max(self._reserved, self._ring.held_bytes()) < _RESERVE_BLOCK:
            return
        reserved = max(self._reserved, self._ring.held_bytes())
        last_held = [self._ring.held_bytes()]

        def room() -> int:
            held = self._ring.held_bytes()
            # A ring that grew by a block while we touched one outruns us (a flood): it
            # takes fresh memory anyway, and touching more would only add to it.
            outrun = held - last_held[0] >= _RESERVE_BLOCK
            last_held[0] = held
            if self._stop_event.is_set() or outrun:
                return 0
            return target - max(reserved, held)
        t = time.monotonic()
        touched = touch_heap(self._libc, room)
        # What the ring took meanwhile came out of the reserve (populated), or from
        # other memory (written: then this counts low, and a trim returns that much).
        self._reserved = max(reserved + touched, self._ring.held_bytes())
        if touched:
            log.info("memory for the ring: %d MiB touched in %.2f s (%d MiB reserved in "
                     "all)", touched >> 20, time.monotonic() - t, self._reserved >> 20)

    def _trim_beyond_reserve(self) -> None:
        held = self._ring.held_bytes() if self._ring is not None else 0
        keep = max(0, self._reserved - held)
        # Every free chunk inside the heap is returned (MADV_DONTNEED); the heap's top is
        # cut down to ``keep``, and the reserve is there: touch_heap took it from the top
        # and gave it back to it, and the ring takes what it fills from it.
        self._libc.malloc_trim(keep)
        self._reserved = held + keep
