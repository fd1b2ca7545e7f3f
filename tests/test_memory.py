"""The allocator policy (sfbw_ioc.memory): images are served from the heap and reused,
and the heap's free memory goes back to the system at the trimmer's next round."""
from __future__ import annotations

import subprocess
import sys
import textwrap

from harness import REPO

SCRIPT = textwrap.dedent("""
    import os, time
    from sfbw_ioc.memory import HeapTrimmer, tune_allocator

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
