"""``pva://`` PVs without processes: p4p's normative-type values mapped into the updates
and the connection states a recorded PV's history takes."""
from __future__ import annotations

import h5py
import numpy as np
import pytest
from p4p.client.thread import Cancelled, Disconnected, RemoteError
from p4p.nt import NTEnum, NTScalar

from sfbw_ioc.hdf5.file import OutputFile
from sfbw_ioc.hdf5.options import OutputOptions
from sfbw_ioc.recorder.history import DISCONNECTED, INVALID, STATUS_NAMES, PvHistory
from sfbw_ioc.recorder.names import RecordedPv
from sfbw_ioc.recorder.pva import PvaChannel, dtype_of, info_of, status_of, update_of
from test_recorder import GENERAL, PULSE0, STEP, T0, write_rows


def stamped(nt, ns: int):
    nt.timeStamp.secondsPastEpoch, nt.timeStamp.nanoseconds = divmod(ns, 1_000_000_000)
    return nt


def scalar(code: str, value, ns: int = T0, severity: int = 0, status: int = 0,
           message: str = "NO_ALARM", units: str = "", description: str = ""):
    nt = stamped(NTScalar(code, display=True).wrap(value), ns)
    nt.alarm.severity, nt.alarm.status, nt.alarm.message = severity, status, message
    nt.display.units, nt.display.description = units, description
    return nt


def enum(index: int, ns: int = T0):
    return stamped(NTEnum().wrap({"index": index, "choices": ["Off", "On"]}), ns)


def test_a_scalar_keeps_its_type_units_description_alarm_and_time() -> None:
    value = scalar("d", 2.5, ns=1_800_000_000_250_000_000, severity=1, status=1, message="HIGH",
                   units="mm", description="a setpoint")
    info = info_of(value)
    assert (info.dtype, info.count, info.units, info.description) == (
        "float64", 1, "mm", "a setpoint")
    update = update_of(value, info.dtype)
    assert update.value.dtype == np.float64 and update.value.tolist() == [2.5]
    assert update.timestamp_ns == 1_800_000_000_250_000_000
    assert (update.severity, update.status) == (1, STATUS_NAMES["HIGH"])
    assert update_of(scalar("H", 7), "uint16").value.dtype == np.uint16


def test_strings_and_enums_are_strings() -> None:
    assert info_of(scalar("s", "x")).dtype == "string"
    assert update_of(scalar("s", "sample in"), "string").value == "sample in"
    assert info_of(enum(1)).dtype == "string" and info_of(enum(1)).count == 1
    assert update_of(enum(1), "string").value == "On"
    assert update_of(enum(5), "string").value == "5"  # past the choices: the index


def test_an_array_is_as_long_as_its_nelm_or_its_value() -> None:
    value = scalar("ai", [1, 2, 3])
    assert dtype_of(value) == ("int32", True)
    assert info_of(value, largest_count=8).count == 8
    assert info_of(value).count == 3
    assert info_of(scalar("ad", [])).count == 1
    assert update_of(scalar("ad", []), "float64").value.tolist() == []
    assert update_of(value, "int32").value.tolist() == [1, 2, 3]


@pytest.mark.parametrize("code", ["as", "v"])
def test_string_arrays_and_variants_cannot_be_recorded(code: str) -> None:
    assert dtype_of(NTScalar(code).wrap(["a"] if code == "as" else 1)) is None


@pytest.mark.parametrize("severity, status, message, expected", [
    (0, 0, "NO_ALARM", "NO_ALARM"),
    (0, 0, "", "NO_ALARM"),
    (2, 1, "HIHI", "HIHI"),  # QSRV: the EPICS status's name
    (2, 1, "lolo_alarm", "LOLO"),
    (2, 1, "over range", "READ"),  # else NTAlarm's status: DEVICE
    (3, 6, "", "UDF"),  # UNDEFINED
    (1, 0, "odd", "SOFT"),  # an alarm without a status
    (3, 99, "", "SOFT"),
    (3, 0, "DISCONNECTED", "SOFT"),  # the files' own, never a server's
])
def test_status_from_the_message_or_the_nearest(severity: int, status: int, message: str,
                                                expected: str) -> None:
    assert status_of(severity, status, message) == STATUS_NAMES[expected]


def test_severity_undefined_is_invalid() -> None:
    update = update_of(scalar("d", 1.0, severity=4, status=6), "float64")
    assert update.severity == INVALID


def rows_of(history: PvHistory) -> list[tuple]:
    return [(t.update.value if isinstance(t.update.value, str) else
             None if t.update.value is None else t.update.value.tolist(), t.update.status)
            for t in history.after(0, 2**62)]


def test_connections_and_losses_reach_the_history() -> None:
    history = PvHistory("pva://S:AO")
    asked = []
    channel = PvaChannel("S:AO", history, lambda name: asked.append(name) or 0)
    channel(Disconnected())  # p4p's first event of every monitor: not a loss
    assert rows_of(history) == [] and not history.connected
    channel(scalar("d", 1.0, units="mm"))
    channel(scalar("d", 2.0))
    assert history.connected and history.info.units == "mm"
    channel(Disconnected())
    channel(Cancelled())  # stopped: nothing more
    channel(scalar("ad", [4.0, 5.0]))  # reconnected, to an array now
    assert history.info.dtype == "float64" and history.info.count == 2
    channel(RemoteError("gone"))
    assert asked == ["S:AO"]
    assert rows_of(history) == [([1.0], 0), ([2.0], 0), (None, DISCONNECTED),
                                ([4.0, 5.0], 0), (None, DISCONNECTED)]


def test_an_unrecordable_pv_stays_not_connected() -> None:
    history = PvHistory("pva://S:NAMES")
    channel = PvaChannel("S:NAMES", history, lambda name: 0)
    channel(NTScalar("as").wrap(["a", "b"]))
    assert not history.connected and rows_of(history) == []


def test_pva_rows_in_a_file_under_the_name_without_prefix(tmp_path) -> None:
    history = PvHistory("pva://S:WAVE")
    channel = PvaChannel("S:WAVE", history, lambda name: 4)
    channel(scalar("ad", [1.0, 2.0], ns=T0 - STEP, units="V"))
    channel(scalar("ad", [3.0, 4.0, 5.0], ns=T0 + 2 * STEP))
    mode = PvHistory("pva://S:MODE")
    PvaChannel("S:MODE", mode, lambda name: 0)(enum(1, ns=T0 + STEP))
    pvs = ((RecordedPv("pva://S:WAVE"), history),
           (RecordedPv("pva://S:MODE", "mode"), mode))
    writer = OutputFile(tmp_path / "f.h5", GENERAL, options=OutputOptions(epics=pvs))
    write_rows(writer, 0, 5)
    with h5py.File(writer.close()) as f:
        wave = f["epics/S:WAVE"]
        assert wave.attrs["source"] == "pva://S:WAVE" and wave.attrs["units"] == "V"
        values = wave["value"][:]
        assert values.shape == (2, 4)  # NELM long
        assert values[0, :2].tolist() == [1, 2] and np.isnan(values[0, 2:]).all()
        assert values[1, :3].tolist() == [3, 4, 5]
        assert wave["length"][:].tolist() == [2, 3]
        assert wave["pulse_id"][:].tolist() == [PULSE0, PULSE0 + 2]
        assert f["epics/mode"].attrs["source"] == "pva://S:MODE"
        assert f["epics/mode/value"].asstr()[:].tolist() == ["", "On"]
