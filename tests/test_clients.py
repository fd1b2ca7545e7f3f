"""Many monitoring clients and one that never reads its socket, during a paced camera
acquisition (issue 26.2, the functional part; benchmarks/clients.py measures the timing):
nothing is lost, the file is exact, every well-behaved monitor sees every STATE
transition, and the IOC's memory stays bounded."""
from __future__ import annotations

import signal
import subprocess

import h5py
import hdf5plugin  # noqa: F401  (registers the bitshuffle filter for reading images)
import numpy as np
import pytest

from sfbw_ioc.testing.ioc import EPICS_BIN, IocProcess, poll, unique_prefix
from sfbw_ioc.testing.sources import BsreadSource, IncompressibleCamera, PacedSender

MONITORS = 10
ACQUISITIONS = 2
ROWS = 300  # 3 s at 100 Hz
# The ring's 1 GiB (touched at start) plus a generous margin; a backlog of 512 KiB
# frames kept for the stopped client without a cap would pass it within seconds.
RSS_LIMIT = 1800 * 2**20


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status
                    if line.startswith("VmRSS:"))


def camonitor(tmp_path, name: str, *pvs: str) -> tuple[subprocess.Popen, object]:
    path = tmp_path / f"{name}.txt"
    out = open(path, "wb")
    # Line-buffered: what it printed is in the file when it is read.
    process = subprocess.Popen(["stdbuf", "-oL", str(EPICS_BIN / "camonitor"), "-S", *pvs],
                               stdout=out, stderr=subprocess.STDOUT)
    return process, path


def states(path) -> list[str]:
    words = (line.split() for line in path.read_text(errors="replace").splitlines())
    return [w[3] for w in words if len(w) > 3 and w[0].endswith(":STATE")]


@pytest.fixture
def camera_ioc(tmp_path, ca_ports):
    source = BsreadSource()
    ioc = IocProcess(ca_ports(), unique_prefix("CLIENTS"),
                     ["--stream", source.address, "--output-root", str(tmp_path)],
                     tmp_path / "ioc.log")
    yield ioc, source
    source.close()
    assert ioc.stop() == 0, ioc.log()


def test_many_and_slow_clients(camera_ioc, tmp_path):
    ioc, source = camera_ioc
    camera = IncompressibleCamera((512, 512))  # 512 KiB frames
    sender = PacedSender(source, 40_000_000_000, rate_hz=100.0, frames=camera.frames)
    clients = []
    try:
        sender.start()
        ioc.put("IMAGE:NAME", camera.spec.name)
        ioc.put("IMAGE:RATE", 10.0)
        scalars = [ioc.pv(n) for n in ("STATE", "WRITTEN", "LAST_PULSE_ID", "MESSAGE")]
        monitors = [camonitor(tmp_path, f"m{i}", *scalars) for i in range(MONITORS)]
        slow, slow_out = camonitor(tmp_path, "slow", ioc.pv("IMAGE:ARRAY"))
        clients = [process for process, _ in monitors] + [slow]
        poll(lambda: all(states(path) == ["IDLE"] for _, path in monitors), timeout=30,
             what="every monitor's first STATE")
        poll(lambda: slow_out.stat().st_size > 0, timeout=30, what="the slow client's frame")
        slow.send_signal(signal.SIGSTOP)  # from now on it never reads its socket
        peak = 0
        for index in range(ACQUISITIONS):
            first = sender.next_pulse_id + 50
            name = f"clients-{index}.h5"
            ioc.put("OUTPUT_FILE", name)
            ioc.put("START_PULSE_ID", first)
            ioc.put("STOP_PULSE_ID", first + ROWS - 1)  # completes when the file is closed
            assert ioc.get("LOST") == 0
            assert ioc.get("WRITTEN") == ROWS
            with h5py.File(tmp_path / name, "r") as f:
                group = f["data"][camera.spec.name]
                assert np.array_equal(group["pulse_id"][:], np.arange(first, first + ROWS))
                assert group["is_data_present"][:].all()
                assert np.array_equal(group["data"][-1], camera.image_for(first + ROWS - 1))
            peak = max(peak, rss(ioc.pid))
        expected = ["IDLE"] + ["WAITING", "WRITING", "CLOSING", "IDLE"] * ACQUISITIONS
        poll(lambda: all(states(path) == expected for _, path in monitors), timeout=10,
             what=f"every monitor to see {expected}")
        assert peak < RSS_LIMIT, f"IOC RSS {peak / 2**20:.0f} MiB"
    finally:
        for process in clients:
            process.send_signal(signal.SIGCONT)
            process.terminate()
            process.wait(10)
        sender.finish()
