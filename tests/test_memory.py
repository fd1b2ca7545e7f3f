"""The allocator policy (sfbw_ioc.stream.memory): images are served from the heap and reused,
and the heap's free memory goes back to the system at the trimmer's next round."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from sfbw_ioc.testing.ioc import REPO

SCRIPT = textwrap.dedent("""
    import os, time
    from sfbw_ioc.stream.memory import HeapTrimmer, tune_allocator

    def rss_mib():
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") >> 20

    assert tune_allocator()
    base = rss_mib()
    images = [bytes([n % 256]) * (1 << 20) for n in range(300)]  # a ring of 1 MiB images
    kept = images[::10]  # what the ring still holds, spread over the heap
    del images
    freed = rss_mib()
    again = [bytes([n % 256]) * (1 << 20) for n in range(200)]  # reuse the freed blocks
    reused = rss_mib()
    del again
    trimmer = HeapTrimmer(interval=0.2)
    trimmer.start()
    deadline = time.monotonic() + 10
    while rss_mib() > base + 100 and time.monotonic() < deadline:
        time.sleep(0.05)
    trimmer.stop()
    print(base, freed, reused, rss_mib())
""")


def test_freed_images_are_reused_and_trimmed_back_to_the_system():
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                            cwd=REPO, timeout=60)
    assert result.returncode == 0, result.stderr
    base, freed, reused, trimmed = map(int, result.stdout.split())
    assert freed > base + 250  # freed blocks stay in the heap, ready for reuse...
    assert reused < freed + 20  # ...and the next images take them: no fresh memory
    assert trimmed < base + 100  # the trimmer returned them: 30 MiB kept, 270 freed


RESERVE_SCRIPT = textwrap.dedent("""
    import os, time
    from sfbw_ioc.bsread import ChannelSpec, HeaderCache, encode_message, parse_main_header
    from sfbw_ioc.stream.memory import HeapTrimmer, tune_allocator
    from sfbw_ioc.stream.message import RawMessage
    from sfbw_ioc.stream.ring import RingBuffer
    from sfbw_ioc.testing.ioc import poll
    import numpy as np

    def rss_mib():
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") >> 20

    assert tune_allocator()
    spec = ChannelSpec("T:WF", "uint8", (1 << 20,))  # 1 MiB messages, 100 in the ring
    frames = encode_message(1, 0, [(spec, np.zeros(1 << 20, np.uint8), 0)])
    header = HeaderCache().get(parse_main_header(frames[0]), frames[1])

    def message(pulse_id):  # a new 1 MiB block each, as received (the ring keeps it)
        return RawMessage.pack(pulse_id, 0, header, [*frames[:2], bytearray(frames[2]),
                                                     *frames[3:]])

    ring = RingBuffer(100, 2**30)
    trimmer = HeapTrimmer(interval=0.2, ring=ring)
    trimmer.start()
    base = rss_mib()
    ring.extend([message(p) for p in range(5)])  # the ring will take ~100 MiB
    poll(lambda: rss_mib() > base + 90, timeout=30, what="the ring's memory touched")
    reserved = rss_mib()
    lowest, window_end = reserved, time.monotonic() + 1.0  # five trimmer rounds
    while time.monotonic() < window_end:
        lowest = min(lowest, rss_mib())
        time.sleep(0.05)  # a sampling period
    for pulse_id in range(5, 150):  # filled, then evicting
        ring.append(message(pulse_id))
    filled = rss_mib()
    flood = [message(p) for p in range(300)]  # 300 MiB outside the ring's budget...
    del flood  # ...freed: more than the ring can still fill
    poll(lambda: rss_mib() < filled + 30, timeout=10, what="the excess trimmed")
    trimmer.stop()
    print(base, reserved, lowest, filled, rss_mib())
""")


def test_the_rings_memory_is_touched_ahead_kept_and_only_the_excess_trimmed():
    result = subprocess.run([sys.executable, "-c", RESERVE_SCRIPT], capture_output=True,
                            text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    base, reserved, lowest, filled, trimmed = map(int, result.stdout.split())
    assert reserved > base + 90  # touched once the first messages showed their size
    assert lowest > reserved - 10  # the trimmer keeps the reserve round after round
    assert filled < reserved + 20  # the ring fills on the touched memory: nothing fresh
    assert trimmed < filled + 30


TOUCH_SCRIPT = textwrap.dedent("""
    import ctypes, os, sys
    from sfbw_ioc.stream import memory

    def rss_mib():
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") >> 20

    assert memory.tune_allocator()
    libc = memory._glibc()
    base = rss_mib()
    touched = getattr(memory, sys.argv[1])(libc, lambda: 64 << 20)
    resident = rss_mib()
    blocks = [libc.malloc(16 << 20) for _ in range(4)]  # the ring's next allocations
    for block in blocks:
        ctypes.memset(block, 1, 16 << 20)
    print(touched >> 20, base, resident, rss_mib())
""")


@pytest.mark.parametrize("way", ["populate_heap", "write_heap"])
def test_touched_heap_is_resident_and_free_for_the_next_allocations(way):
    result = subprocess.run([sys.executable, "-c", TOUCH_SCRIPT, way], capture_output=True,
                            text=True, cwd=REPO, timeout=60)
    assert result.returncode == 0, result.stderr
    touched, base, resident, used = map(int, result.stdout.split())
    assert touched == 64
    assert resident > base + 60  # in memory...
    assert used < resident + 8  # ...and what is allocated next lands on it


def test_populating_leaves_memory_in_use_as_it_is():
    # The heap is populated while the receiver allocates from it: the kernel only faults
    # pages in, it writes nothing.
    script = textwrap.dedent("""
        import ctypes
        from sfbw_ioc.stream import memory
        libc = memory._glibc()
        in_use = libc.malloc(1 << 20)
        ctypes.memset(in_use, 9, 1 << 20)
        start = -(-in_use // 4096) * 4096
        assert libc.madvise(start, 1 << 19, memory._MADV_POPULATE_WRITE) == 0
        print(set(ctypes.string_at(in_use, 1 << 20)))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            cwd=REPO, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "{9}"
