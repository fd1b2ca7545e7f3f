"""A disk slower than the stream (issue 26.3): the output root is a FUSE file system whose
write() takes a 4 MiB/s device's time (sfbw_ioc.testing.slowfs) while a camera streams
10 MiB/s. The ring holds the backlog, WRITER_LAG shows it and goes into alarm, a STOP's
put-callback returns when the file is closed, the file holds exactly what LOST does not
count, and once the disk recovers the next acquisition is normal."""
from __future__ import annotations

import epics
import h5py
import hdf5plugin  # noqa: F401  (registers the bitshuffle filter for reading images)
import numpy as np
import pytest

from sfbw_ioc.testing.ioc import IocProcess, poll, unique_prefix
from sfbw_ioc.testing.slowfs import SlowFilesystem, available
from sfbw_ioc.testing.sources import BsreadSource, IncompressibleCamera, PacedSender

pytestmark = pytest.mark.skipif(available() is not None, reason=f"{available()}")

MiB = 2**20
_DISK_RATE = 4 * MiB  # bytes a second
_FRAME_RATE_HZ = 40  # 256 KiB frames: 10 MiB/s
_RING_BYTES = 48 * MiB  # 4.8 s of the stream
_MINOR, _MAJOR = 1, 2


@pytest.fixture
def slow_root(tmp_path):
    disk = SlowFilesystem(tmp_path / "backing", tmp_path / "output", tmp_path / "slowfs.log")
    yield disk
    disk.close()


@pytest.fixture
def setup(slow_root, tmp_path, ca_ports):
    source = BsreadSource()
    ioc = IocProcess(ca_ports(), unique_prefix("SLOWDISK"),
                     ["--stream", source.address, "--output-root", str(slow_root.mount),
                      "--buffer-bytes", str(_RING_BYTES)], tmp_path / "ioc.log")
    try:
        yield ioc, source, slow_root
    finally:
        source.close()
        assert ioc.stop() == 0, ioc.log()


def rows_of(path, camera: IncompressibleCamera) -> list[int]:
    """The file's pulse ids, every row's image checked against the one sent."""
    with h5py.File(path, "r") as f:
        group = f["data"][camera.spec.name]
        pulse_ids = group["pulse_id"][:].tolist()
        assert group["is_data_present"][:].all()
        for row, pulse_id in enumerate(pulse_ids):
            assert np.array_equal(group["data"][row], camera.image_for(pulse_id)), pulse_id
    return pulse_ids


def acquire(ioc: IocProcess, source: BsreadSource, camera: IncompressibleCamera, name: str,
            base: int, count: int, during=lambda: None) -> None:
    """START at ``base``, ``count`` paced frames, ``during`` while they are sent, then a
    STOP at the last one whose put-callback returns once the file is closed."""
    ioc.put("OUTPUT_FILE", name)
    ioc.put("START_PULSE_ID", base)
    sender = PacedSender(source, base, rate_hz=_FRAME_RATE_HZ, frames=camera.frames,
                         count=count)
    sender.start()
    try:
        during()
    finally:
        sender.join(count / _FRAME_RATE_HZ + 10)
    ioc.put("STOP_PULSE_ID", base + count - 1)  # put with callback (pyepics wait=True)
    assert ioc.text("STATE") == "IDLE"


def test_a_disk_slower_than_the_stream(setup):
    ioc, source, disk = setup
    camera = IncompressibleCamera((256, 512))
    ioc.put("WRITER_LAG.HIHI", 3.0)  # MAJOR from 3 s
    disk.set_rate(_DISK_RATE)
    base, count = 40_000_000_000, 12 * _FRAME_RATE_HZ

    # Every update, through a monitor: the lag is published per batch (2 s of this
    # disk), so it can pass from below HIGH to above HIHI in one step.
    updates: list[tuple[float, int]] = []
    monitor = epics.PV(ioc.pv("WRITER_LAG"), form="time", callback=lambda value, severity,
                       **_: updates.append((value, severity)))

    def lag_alarms() -> None:
        poll(lambda: any(severity == _MAJOR for _, severity in updates), timeout=20,
             what=f"WRITER_LAG in MAJOR (updates: {updates})")

    acquire(ioc, source, camera, "slow.h5", base, count, during=lag_alarms)
    monitor.disconnect()
    # While the lag grows (caproto may hand the closing 0 over before its alarm).
    assert all(severity == (_MAJOR if value >= 3 else _MINOR if value >= 2 else 0)
               for value, severity in updates if value), updates
    assert ioc.get("WRITER_LAG") == 0 and ioc.severity("WRITER_LAG") == 0
    lost, written = int(ioc.get("LOST")), int(ioc.get("WRITTEN"))
    assert lost > 0, "the ring never overflowed: the disk was not slower"
    rows = rows_of(disk.mount / "slow.h5", camera)
    assert written + lost == count and len(rows) == written
    assert rows == sorted(set(rows)) and set(rows) <= set(range(base, base + count))
    assert rows[-1] == base + count - 1  # the newest are never the ones dropped

    disk.set_rate(0)
    base += 100_000
    acquire(ioc, source, camera, "recovered.h5", base, 2 * _FRAME_RATE_HZ)
    assert ioc.get("LOST") == 0 and ioc.get("WRITTEN") == 2 * _FRAME_RATE_HZ
    assert ioc.get("WRITER_LAG") < 2.0 and ioc.severity("WRITER_LAG") == 0
    assert rows_of(disk.mount / "recovered.h5", camera) == list(
        range(base, base + 2 * _FRAME_RATE_HZ))
