"""What the benchmarks share: this checkout's package on sys.path, the Channel Access
client environment, an IOC subprocess with PV helpers, and /proc figures of a process.

The IOC is used only through its command line and its PVs (sfbw_ioc.testing.ioc's
IocProcess); the test harness (sfbw_ioc.testing) is reused, not copied. Import this
module before sfbw_ioc: run as ``python benchmarks/X.py``, a benchmark would otherwise
import whichever sfbw_ioc is installed.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Iterable

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from sfbw_ioc.testing.ioc import (IocProcess, ca_client_environment, free_port,  # noqa: E402
                                  poll, unique_prefix)

_CLK_TCK = os.sysconf("SC_CLK_TCK")
MiB = 2**20


def ca_setup(n_ports: int) -> list[int]:
    """Pick ``n_ports`` free CA ports and point this process's CA client at all of them.

    Must run before the first pyepics call (libca reads EPICS_* once); one port per IOC
    this process will start.
    """
    ports = [free_port(udp_too=True) for _ in range(n_ports)]
    os.environ.update(ca_client_environment(ports))
    return ports


# ---- /proc ----------------------------------------------------------------------------

def rss_bytes(pid: int) -> int:
    """Resident set size of ``pid`` (VmRSS of /proc/PID/status)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` so far (all threads), from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK  # utime, stime


def machine_busy_seconds() -> float:
    """CPU time all CPUs of the machine have spent not idle so far (/proc/stat)."""
    with open("/proc/stat") as stat:
        fields = [int(v) for v in stat.readline().split()[1:]]
    idle, iowait = fields[3], fields[4]
    return (sum(fields[:8]) - idle - iowait) / _CLK_TCK


class CpuMeter:
    """CPU % of one core used by ``pid`` between ``start()`` and ``stop()``."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.start()

    def start(self) -> None:
        self._cpu0, self._wall0 = cpu_seconds(self.pid), time.monotonic()

    def percent(self) -> float:
        wall = time.monotonic() - self._wall0
        return 100.0 * (cpu_seconds(self.pid) - self._cpu0) / wall if wall > 0 else 0.0


# ---- the IOC --------------------------------------------------------------------------

class Ioc:
    """An sfbw-ioc subprocess (sfbw_ioc.testing.ioc.IocProcess) plus pyepics helpers for its PVs."""

    def __init__(self, port: int, args: list[str], log_path: Path, tag: str = "BENCH",
                 wrapper: Iterable[str] = ()) -> None:
        self.proc = IocProcess(port, unique_prefix(tag), args, log_path, wrapper=wrapper)
        self.pid = self.proc.process.pid

    def pv(self, name: str) -> str:
        return self.proc.pv(name)

    def get(self, name: str, timeout: float = 5.0):
        """A fresh read (not pyepics' monitor cache, which can lag a put)."""
        import epics
        value = epics.caget(self.pv(name), timeout=timeout, use_monitor=False)
        if value is None:
            raise RuntimeError(f"caget {self.pv(name)} timed out")
        return value

    def text(self, name: str, timeout: float = 5.0) -> str:
        """A CHAR-waveform string (count=0: the server's current length)."""
        import epics
        value = epics.caget(self.pv(name), timeout=timeout, use_monitor=False,
                            as_string=True, count=0)
        if value is None:
            raise RuntimeError(f"caget {self.pv(name)} timed out")
        return value

    def put(self, name: str, value, wait: bool = True, timeout: float = 30.0) -> None:
        import epics
        result = epics.caput(self.pv(name), value, wait=wait, timeout=timeout)
        if result != 1:
            raise RuntimeError(f"caput {self.pv(name)} {value!r} failed or timed out "
                               f"({result}); MESSAGE: {self._message()}")

    def put_callback(self, name: str, value, done: dict) -> None:
        """Put with completion callback, not waiting; ``done['t']`` = perf_counter()
        when the server reported completion."""
        import epics
        pv = epics.get_pv(self.pv(name), connect=True, timeout=5)

        def callback(**_):
            done["t"] = time.perf_counter()
        pv.put(value, use_complete=True, callback=callback)

    def _message(self) -> str:
        try:
            return self.text("MESSAGE", timeout=2)
        except Exception as error:  # only for error texts
            return f"<unreadable: {error}>"

    def wait(self, name: str, predicate, timeout: float = 10.0, interval: float = 0.05):
        return poll(lambda: predicate(self.get(name)), timeout, interval, what=name)

    def alive(self) -> bool:
        return self.proc.process.poll() is None

    def rss(self) -> int:
        return rss_bytes(self.pid)

    def cpu(self) -> float:
        return cpu_seconds(self.pid)

    def log(self) -> str:
        return self.proc.log()

    def stop(self) -> int:
        return self.proc.stop()
