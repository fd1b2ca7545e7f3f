"""The recorded PVs without processes: the list, the history, the alignment to pulse ids,
and /epics in real files read back with h5py."""
from __future__ import annotations

import h5py
import numpy as np
import pytest

from sfbw_ioc.bsread import ChannelSpec, Column
from sfbw_ioc.hdf5.epics import align, first_rows
from sfbw_ioc.hdf5.file import OutputFile
from sfbw_ioc.hdf5.options import OutputOptions
from sfbw_ioc.recorder.history import DISCONNECTED, INVALID, PvHistory, PvInfo, Update
from sfbw_ioc.recorder.names import (PvListError, RecordedPv, parse_file, parse_pv_text,
                                     pv_text)

GENERAL = {"user": "tester", "process": "pytest", "instrument": "SF-TEST"}
PULSE0 = 10_000_000_000
T0 = 1_800_000_000_000_000_000  # ns: the first pulse's global timestamp
STEP = 10_000_000  # 100 Hz


# ---- the list -----------------------------------------------------------------------

def test_list_file_with_comments_and_aliases() -> None:
    text = "# beamline\nSAR-PHOTON:ENERGY  energy  # eV\n\n  SAR-MOT:X.RBV\nSAR-SHUTTER\n"
    assert parse_file(text) == (RecordedPv("SAR-PHOTON:ENERGY", "energy"),
                                RecordedPv("SAR-MOT:X.RBV"), RecordedPv("SAR-SHUTTER"))


@pytest.mark.parametrize("text, reason", [
    ("A B C", "at most an alias"),
    ("SAR:BA'D", "not a valid PV name"),
    ("pva://SAR/X", "not a valid PV name"),
    ("pva://", "not a valid PV name"),
    ("pva://S:X\nS:X", "listed twice"),  # one group name
    ("A\nA", "listed twice"),
    ("A x\nB x", "listed twice"),
    ("A ..", "cannot name a group"),
])
def test_list_file_refusals_say_why(text: str, reason: str) -> None:
    with pytest.raises(PvListError, match=reason):
        parse_file(text)


def test_a_pva_name_is_its_group_without_the_prefix() -> None:
    pvs = parse_file("pva://SAR:IMG\npva://SAR:X x\nSAR:X\n")
    assert [(pv.is_pva, pv.channel, pv.label) for pv in pvs] == [
        (True, "SAR:IMG", "SAR:IMG"), (True, "SAR:X", "x"), (False, "SAR:X", "SAR:X")]
    assert parse_pv_text(pv_text(pvs)) == pvs


def test_pv_text_names_separated_by_spaces_or_newlines_and_round_trips() -> None:
    pvs = parse_pv_text("A:X  B:Y=why\nC:Z\n")
    assert pvs == (RecordedPv("A:X"), RecordedPv("B:Y", "why"), RecordedPv("C:Z"))
    assert parse_pv_text(pv_text(pvs)) == pvs
    assert parse_pv_text("") == ()
    with pytest.raises(PvListError, match="not a valid PV name"):
        parse_pv_text("A:X B\"C")


# ---- the history and the alignment --------------------------------------------------

def value(x: float, ns: int, severity: int = 0) -> Update:
    return Update(np.array([x]), ns, severity, 0)


def test_alignment_times_never_go_back() -> None:
    history = PvHistory("P")
    history.add(value(1, T0))
    history.add(Update.disconnected())
    history.add(value(2, 631_152_000 * 10**9))  # reconnected: the record's old timestamp
    times = [timed.time_ns for timed in history.after(0, 2**62)]
    assert times == sorted(times) and times[2] == times[1]


def test_current_at_and_after() -> None:
    history = PvHistory("P")
    for n in range(5):
        history.add(value(n, T0 + n * 100))
    assert history.current_at(T0 - 1) is None
    assert history.current_at(T0 + 250).update.value[0] == 2
    assert history.current_at(T0 + 300).update.value[0] == 3
    assert [t.seq for t in history.after(3, T0 + 350)] == [3]
    assert [t.seq for t in history.after(1, T0 + 10**6)] == [1, 2, 3, 4]


def test_history_budget_drops_the_oldest_and_keeps_the_newest() -> None:
    history = PvHistory("P", budget_bytes=10_000, max_updates=1000)
    for n in range(1000):
        history.add(Update(np.zeros(100), T0 + n, 0, 0))  # 800 bytes each
    kept = history.after(0, 2**62)
    assert 1 <= len(kept) <= 12 and kept[-1].seq == 999
    big = PvHistory("Q", budget_bytes=10)
    big.add(Update(np.zeros(1000), T0, 0, 0))
    assert len(big.after(0, 2**62)) == 1


def test_align_takes_the_last_pulse_at_or_before() -> None:
    pulse_times = T0 + STEP * np.arange(5)
    ids = PULSE0 + np.arange(5)
    times = np.array([T0 - 5, T0, T0 + 1, T0 + STEP - 1, T0 + STEP, T0 + 100 * STEP])
    assert align(times, pulse_times, ids).tolist() == [PULSE0, PULSE0, PULSE0, PULSE0,
                                                       PULSE0 + 1, PULSE0 + 4]


def test_row_zero_is_disconnected_when_nothing_is_known_at_the_first_pulse() -> None:
    history = PvHistory("P")
    history.add(value(7, T0 + 5))
    rows, next_seq = first_rows(history, T0)
    assert rows[0].update.status == DISCONNECTED and rows[0].update.severity == INVALID
    assert next_seq == 0
    rows, next_seq = first_rows(history, T0 + 5)
    assert rows[0].update.value[0] == 7 and next_seq == 1


# ---- /epics in a file -----------------------------------------------------------------

def history_of(name: str, info: PvInfo | None, updates: list[Update]) -> PvHistory:
    history = PvHistory(name)
    if info is not None:
        history.connect(info)
    for update in updates:
        history.add(update)
    return history


def column(rows: int) -> Column:
    return Column(ChannelSpec("C:X", "float64", ()), np.ones(rows, dtype=bool),
                  np.zeros(rows, dtype=np.int64), np.arange(rows, dtype=np.float64))


def write_rows(writer: OutputFile, first: int, rows: int) -> None:
    ids = list(range(PULSE0 + first, PULSE0 + first + rows))
    writer.append_columns(ids, [column(rows)], [T0 + STEP * (p - PULSE0) for p in ids])


def test_epics_rows_on_the_pulse_axis(tmp_path) -> None:
    scalar = history_of("S:AO", PvInfo("float64", 1, "mm", "a setpoint"), [
        value(0.5, T0 - 10 * STEP), value(1.5, T0 + 3 * STEP + 1),
        value(2.5, T0 + 7 * STEP), value(9.9, T0 + 50 * STEP)])  # after the last pulse
    text = history_of("S:NOTE", PvInfo("string", 1), [Update("héllo", T0 + 2 * STEP, 0, 0)])
    wave = history_of("S:WAVE", PvInfo("int32", 4), [
        Update(np.array([1, 2, 3], dtype=np.int32), T0 - STEP, 1, 3)])
    never = history_of("S:NOPE", None, [])
    pvs = (RecordedPv("S:AO", "setpoint"), RecordedPv("S:NOTE"), RecordedPv("S:WAVE"),
           RecordedPv("S:NOPE"))
    options = OutputOptions(epics=tuple(zip(pvs, (scalar, text, wave, never))))
    writer = OutputFile(tmp_path / "f.h5", GENERAL, options=options)
    write_rows(writer, 0, 5)
    writer.flush()
    write_rows(writer, 5, 5)  # pulses up to T0 + 9 STEP
    path = writer.close()
    with h5py.File(path) as f:
        ao = f["epics/setpoint"]
        assert ao.attrs["source"] == "S:AO" and ao.attrs["units"] == "mm"
        assert ao.attrs["description"] == "a setpoint"
        assert ao["value"][:].tolist() == [0.5, 1.5, 2.5]
        assert ao["pulse_id"][:].tolist() == [PULSE0, PULSE0 + 3, PULSE0 + 7]
        assert ao["timestamp"][1] == pytest.approx((T0 + 3 * STEP + 1) / 1e9)
        assert f["epics/S:NOTE/value"].asstr()[:].tolist() == ["", "héllo"]
        assert f["epics/S:NOTE/status"][0] == DISCONNECTED  # nothing known at the start
        assert f["epics/S:NOTE/pulse_id"][:].tolist() == [PULSE0, PULSE0 + 2]
        assert f["epics/S:WAVE/value"][:].tolist() == [[1, 2, 3, 0]]
        assert f["epics/S:WAVE/length"][:].tolist() == [3]
        assert f["epics/S:WAVE/severity"][:].tolist() == [1]
        nope = f["epics/S:NOPE"]
        assert nope["severity"][:].tolist() == [INVALID]
        assert h5py.check_enum_dtype(nope["status"].dtype)["DISCONNECTED"] == DISCONNECTED
        assert np.isnan(nope["value"][0]) and not nope.attrs["connected_at_end"]


def test_a_pv_connecting_mid_file_gets_its_type(tmp_path) -> None:
    late = PvHistory("S:LATE")
    pv = RecordedPv("S:LATE")
    writer = OutputFile(tmp_path / "f.h5", GENERAL, options=OutputOptions(epics=((pv, late),)))
    write_rows(writer, 0, 3)
    writer.flush()
    late.connect(PvInfo("string", 1))
    late.add(Update("up", T0 + 4 * STEP, 0, 0))
    write_rows(writer, 3, 3)
    with h5py.File(writer.close()) as f:
        assert f["epics/S:LATE/value"].asstr()[:].tolist() == ["", "up"]
        assert f["epics/S:LATE/pulse_id"][:].tolist() == [PULSE0, PULSE0 + 4]


def test_truncate_drops_the_updates_past_the_new_end(tmp_path) -> None:
    history = history_of("S:AO", PvInfo("float64", 1), [
        value(1, T0), value(2, T0 + 6 * STEP)])
    options = OutputOptions(epics=((RecordedPv("S:AO"), history),))
    writer = OutputFile(tmp_path / "f.h5", GENERAL, options=options)
    write_rows(writer, 0, 10)
    writer.flush()
    writer.truncate(5)
    with h5py.File(writer.close()) as f:
        assert f["epics/S:AO/value"][:].tolist() == [1]
