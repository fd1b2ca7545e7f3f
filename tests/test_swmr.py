"""Files readable while written (HDF5 SWMR), end to end: a reader in another process
follows a 100 Hz acquisition of images, scalars and waveforms; a killed IOC leaves a
file with every flushed row."""
from __future__ import annotations

import json
import signal
import subprocess
import sys

import h5py
import hdf5plugin  # noqa: F401
import pytest

from sfbw_ioc.testing.files import assert_rows
from sfbw_ioc.testing.ioc import REPO, IocProcess, poll, unique_prefix
from sfbw_ioc.testing.sources import BsreadSource, PacedSender

PULSE0 = 40_000_000_000


@pytest.fixture
def swmr_ioc(ca_ports, tmp_path):
    source = BsreadSource()
    ioc = IocProcess(ca_ports(), unique_prefix("SW"),
                     ["--stream", source.address, "--output-root", str(tmp_path / "data"),
                      "--swmr"], tmp_path / "ioc.log")
    yield ioc, source
    source.close()
    ioc.stop()


def start_swmr_file(ioc: IocProcess, source: BsreadSource, name: str) -> tuple[PacedSender, str]:
    assert ioc.text("W1:SWMR") == "Yes" and ioc.text("W2:SWMR") == "Yes"  # --swmr
    assert ioc.text("W1:ACTIVE_FILE") == ""
    sender = PacedSender(source, PULSE0, rate_hz=100.0)
    sender.start()
    poll(lambda: ioc.get("RECEIVED") > 10, what="messages")
    ioc.put("OUTPUT_FILE", name)
    ioc.put("START_NOW", 1)
    ioc.wait_for("W1:SWMR_ACTIVE", 1, timeout=10)
    active = ioc.text("W1:ACTIVE_FILE")
    assert active.endswith(f"{name}.partial")
    return sender, active


def test_a_reader_follows_the_file_while_it_is_written(swmr_ioc, tmp_path) -> None:
    ioc, source = swmr_ioc
    sender, active = start_swmr_file(ioc, source, "follow.h5")
    stop_file = tmp_path / "stop"
    reader = subprocess.Popen([sys.executable, str(REPO / "tests/swmr_reader.py"), active,
                               str(stop_file)], stdout=subprocess.PIPE, text=True,
                              cwd=REPO / "tests")
    try:
        poll(lambda: ioc.get("WRITTEN") >= 400, timeout=20, what="4 s written")
        ioc.put("STOP_NOW", 1)
        ioc.wait_for("STATE", 0)
        ioc.wait_for("W1:ACTIVE_FILE", "", as_string=True)
        assert ioc.text("W1:SWMR_ACTIVE") == "No"
        stop_file.touch()
        out, _ = reader.communicate(timeout=60)
    finally:
        sender.finish()
        if reader.poll() is None:
            reader.kill()
    assert reader.returncode == 0
    seen = json.loads(out)
    assert seen["errors"] == []
    lengths = seen["lengths"]
    assert lengths == sorted(lengths) and len(set(lengths)) >= 4  # it grew, while written
    final = tmp_path / "data" / "follow.h5"
    with h5py.File(final) as f:
        rows = f["data/T:F64/pulse_id"][:].tolist()
    assert lengths[-1] == len(rows) and seen["checked"] >= 3 * len(rows)
    assert_rows(final, rows)


def test_kill_9_leaves_every_flushed_row(swmr_ioc, tmp_path) -> None:
    ioc, source = swmr_ioc
    sender, active = start_swmr_file(ioc, source, "killed.h5")
    try:
        poll(lambda: ioc.get("WRITTEN") >= 300, timeout=20, what="3 s written")
        with h5py.File(active, "r", swmr=True) as f:
            flushed = f["data/T:F64/pulse_id"].shape[0]
        assert flushed > 0
    finally:
        sender.finish()  # before the kill: a send to a dead IOC would block the thread
    ioc.process.send_signal(signal.SIGKILL)
    ioc.process.wait(10)
    # A writer that died in SWMR mode leaves the file marked open: readers use swmr=True.
    with h5py.File(active, "r", swmr=True) as f:
        rows = f["data/T:F64/pulse_id"][:].tolist()
    assert len(rows) >= flushed
    assert rows == list(range(rows[0], rows[0] + len(rows)))
    assert_rows(active, rows, swmr=True)
