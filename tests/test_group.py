"""sfbw-group end to end: three member IOCs on three real bsread sources with common
pulse ids, the group IOC as a subprocess driving them over Channel Access, member files
and the master's external links read back with h5py."""
from __future__ import annotations

from pathlib import Path

import epics
import h5py
import numpy as np
import pytest

from sfbw_ioc.testing.ioc import IocProcess, caput_binary, poll, unique_prefix
from sfbw_ioc.testing.sources import BsreadSource, CommonPulseStreams, member_channels
from sfbw_ioc.testing.files import assert_rows

FIRST_PULSE_ID = 20_000_000_000  # above 2**31, as at SwissFEL


@pytest.fixture(scope="module")
def setup(tmp_path_factory, ca_ports):
    logs = tmp_path_factory.mktemp("logs")
    sources = [BsreadSource() for _ in range(3)]
    streams = CommonPulseStreams(sources, FIRST_PULSE_ID)
    streams.start()
    members, roots = [], []
    for index, source in enumerate(sources):
        roots.append(tmp_path_factory.mktemp(f"member{index}"))
        members.append(IocProcess(ca_ports(), unique_prefix(f"GRPM{index}-"),
                                  ["--stream", source.address, "--output-root",
                                   str(roots[-1]), "--buffer-length", "1000"],
                                  logs / f"member{index}.log"))
    group_root = tmp_path_factory.mktemp("group")
    member_args = [arg for m in members for arg in ("--member", m.prefix)]
    group = IocProcess(ca_ports(), unique_prefix("GRP"),
                       [*member_args, "--output-root", str(group_root)],
                       logs / "group.log", module="sfbw_ioc.group.cli")
    group.wait_for("MEMBERS_CONNECTED", 3)
    yield group, members, roots, group_root, streams
    streams.halt()
    for ioc in (group, *members):
        ioc.stop()
    for source in sources:
        source.close()


@pytest.fixture
def group(setup):
    group = setup[0]
    yield group
    epics.caput(group.pv("ABORT"), 1, wait=True, timeout=30)


def newest_pulse(setup) -> int:
    """A pulse id every member has received, with 100 pulses before it in the rings."""
    _, members, *_ = setup
    poll(lambda: all(m.get("LAST_PULSE_ID") > FIRST_PULSE_ID + 100 for m in members),
         what="every member receiving")
    return int(min(m.get("LAST_PULSE_ID") for m in members))


def member_file(setup, index: int, stem: str) -> Path:
    _, members, roots, *_ = setup
    return roots[index] / stem / f"{members[index].prefix.rstrip(':')}.h5"


def acquire(group, name: str, start: int, stop: int) -> Path:
    group.put("OUTPUT_FILE", name)
    group.put("START_PULSE_ID", start)
    group.put("STOP_PULSE_ID", stop)  # put-callback: done when the master is written
    return Path(group.text("LAST_FILE"))


def assert_group_files(setup, master: Path, stem: str, pulse_ids: list[int],
                       members=(0, 1, 2)) -> None:
    """Every member's file exact, and the master's links read the same data."""
    with h5py.File(master, "r") as h5:
        table = h5["general/members"][:]
        for index in members:
            path = member_file(setup, index, stem)
            assert_rows(path, pulse_ids, channels=member_channels(index))
            row = table[index]
            assert row["file"].decode() == str(path)
            assert row["status"].decode() == "written"
            assert (row["written"], row["missing"], row["lost"]) == (len(pulse_ids), 0, 0)
            with h5py.File(path, "r") as member:
                for spec in member_channels(index):
                    linked, own = h5[f"data/{spec.name}"], member[f"data/{spec.name}"]
                    for key in ("data", "pulse_id", "is_data_present", "timestamp"):
                        assert np.array_equal(linked[key][:], own[key][:]), (spec.name, key)


def test_members_pv_lists_prefixes(setup):
    group, members, *_ = setup
    assert group.text("MEMBERS").split("\n") == [m.prefix for m in members]
    assert group.get("MEMBERS_CONNECTED") == 3


def test_acquisition_in_the_past(setup, group):
    newest = newest_pulse(setup)
    start, stop = newest - 80, newest - 20
    master = acquire(group, "past/run1.h5", start, stop)
    assert master == setup[3] / "past/run1.h5"
    assert group.get("STATE") == 0
    assert_group_files(setup, master, "past/run1", list(range(start, stop + 1)))
    with h5py.File(master, "r") as h5:
        assert h5["general/user"][()] == b"not given"


def test_acquisition_in_the_future(setup, group):
    group.put("USER", "p12345")
    newest = newest_pulse(setup)
    start, stop = newest + 30, newest + 90
    group.put("OUTPUT_FILE", "future.h5")
    group.put("START_PULSE_ID", start)
    group.wait_for("STATE", 2)  # WRITING once every member writes
    group.put("STOP_PULSE_ID", stop)
    master = Path(group.text("LAST_FILE"))
    assert_group_files(setup, master, "future", list(range(start, stop + 1)))
    with h5py.File(master, "r") as h5:
        assert h5["general/user"][()] == b"p12345"
        assert h5["members"][setup[1][0].prefix.rstrip(":")]["general/user"][()] == b"p12345"
    group.put("USER", "")


def test_start_now_stop_now(setup, group):
    group.put("OUTPUT_FILE", "now.h5")
    group.put("START_NOW", 1)
    group.wait_for("STATE", 2)
    group.put("STOP_NOW", 1)
    master = Path(group.text("LAST_FILE"))
    assert master.name == "now.h5"
    with h5py.File(member_file(setup, 0, "now"), "r") as first:
        pulse_ids = first["data/M0:T:F64/pulse_id"][:].tolist()
    assert len(pulse_ids) > 0
    assert pulse_ids == list(range(pulse_ids[0], pulse_ids[-1] + 1))
    assert_group_files(setup, master, "now", pulse_ids)  # the same pulses on every member


def test_stop_set_before_the_start(setup, group):
    newest = newest_pulse(setup)
    start, stop = newest + 20, newest + 50
    group.put("STOP_PULSE_ID", stop)  # idle: kept for the next START
    assert "for the next start" in group.text("MESSAGE")
    group.put("OUTPUT_FILE", "stop-first.h5")
    group.put("START_PULSE_ID", start)
    master = setup[3] / "stop-first.h5"
    group.wait_for("LAST_FILE", str(master), timeout=15, as_string=True)
    assert group.get("STATE") == 0
    assert_group_files(setup, master, "stop-first", list(range(start, stop + 1)))


def test_refused_start_changes_nothing(setup, group):
    newest = newest_pulse(setup)
    group.put("OUTPUT_FILE", "refused.h5")
    # A stop before the start is refused by the group before any member is asked.
    group.put("STOP_PULSE_ID", newest - 100)
    refused = caput_binary("-c", group.pv("START_PULSE_ID"), str(newest), ca_timeout=10)
    assert refused.returncode == 1
    assert "after the stop" in group.text("MESSAGE")
    assert all(m.get("STATE") == 0 for m in setup[1])


def test_member_refusing_its_file_refuses_the_start(setup, group):
    _, members, roots, group_root, _ = setup
    taken = member_file(setup, 1, "taken")
    taken.parent.mkdir(parents=True)
    taken.write_bytes(b"someone else's")
    group.put("OUTPUT_FILE", "taken.h5")
    assert caput_binary("-c", group.pv("START_NOW"), "1", ca_timeout=10).returncode == 1
    message = group.text("MESSAGE")
    assert members[1].prefix in message and "exists already" in message, message
    assert [m.get("STATE") for m in members] == [0, 0, 0]  # nothing started anywhere
    assert not member_file(setup, 0, "taken").exists()
    assert not (group_root / "taken.h5").exists()


def test_member_refusing_the_start_is_rolled_back(setup, group):
    _, members, *_ = setup
    newest = newest_pulse(setup)
    members[2].put("STOP_PULSE_ID", newest - 50)  # kept by member 2 for its next start
    group.put("OUTPUT_FILE", "rolled.h5")
    assert caput_binary("-c", group.pv("START_PULSE_ID"), str(newest - 20),
                        ca_timeout=10).returncode == 1
    message = group.text("MESSAGE")
    assert members[2].prefix in message and "after the stop" in message, message
    assert "rolled back" in message
    assert [m.get("STATE") for m in members] == [0, 0, 0]
    assert group.get("STATE") == 0
    assert not (setup[3] / "rolled.h5").exists()
    # Member 2's own stop is consumed by a start on it.
    members[2].put("OUTPUT_FILE", "own.h5")
    members[2].put("START_PULSE_ID", newest - 50)
    members[2].wait_for("STATE", 0, timeout=15)


def test_member_killed_during_acquisition(setup, group):
    _, members, *_ = setup
    newest = newest_pulse(setup)
    group.put("OUTPUT_FILE", "killed.h5")
    group.put("START_PULSE_ID", newest - 10)
    group.wait_for("STATE", 2)
    setup[4].silent.add(2)
    members[2].stop(sig=9)
    group.wait_for("STATE", 4)  # ERROR
    assert members[2].prefix in group.text("MESSAGE")
    stop = newest + 40
    assert caput_binary("-c", group.pv("STOP_PULSE_ID"), str(stop), ca_timeout=30).returncode == 1
    master = Path(group.text("LAST_FILE"))
    assert master.name == "killed.h5"
    assert group.get("MEMBERS_CONNECTED") == 2
    assert_group_files(setup, master, "killed", list(range(newest - 10, stop + 1)), (0, 1))
    with h5py.File(master, "r") as h5:
        row = h5["general/members"][2]
        assert row["status"].decode() == "failed" and row["file"].decode() == ""
        assert members[2].prefix in row["message"].decode()
        assert "M2:T:F64" not in h5["data"]


def test_member_gone_before_start_is_refused(setup, group):
    _, members, roots, group_root, _ = setup  # members[2] was killed by the test before
    group.put("OUTPUT_FILE", "gone.h5")
    result = caput_binary("-c", group.pv("START_NOW"), "1", ca_timeout=10)
    assert result.returncode == 1, result.stdout + result.stderr
    message = group.text("MESSAGE")
    assert members[2].prefix in message and "not connected" in message
    assert group.get("STATE") == 4 or group.get("STATE") == 0
    assert [m.get("STATE") for m in members[:2]] == [0, 0]  # nothing started anywhere
    assert not any((root / "gone").exists() for root in roots)
    assert not (group_root / "gone.h5").exists()


def test_allow_partial_starts_without_the_gone_member(setup, ca_ports, tmp_path):
    _, members, _, _, _ = setup  # members[2] is gone
    root = tmp_path / "partial-root"
    partial = IocProcess(ca_ports(), unique_prefix("GRPP"),
                         [*(a for m in members for a in ("--member", m.prefix)),
                          "--output-root", str(root), "--allow-partial"],
                         tmp_path / "partial.log", module="sfbw_ioc.group.cli")
    try:
        partial.wait_for("MEMBERS_CONNECTED", 2)
        newest = newest_pulse((None, members[:2]))
        start, stop = newest - 30, newest - 10
        master = acquire(partial, "partial.h5", start, stop)
        assert master == root / "partial.h5"
        assert partial.get("STATE") == 0
        assert_group_files(setup, master, "partial", list(range(start, stop + 1)), (0, 1))
        with h5py.File(master, "r") as h5:
            row = h5["general/members"][2]
            assert row["status"].decode() == "absent"
            assert members[2].prefix in row["message"].decode()
    finally:
        partial.stop()


def test_members_with_the_same_file_name_are_refused(tmp_path):
    from sfbw_ioc.group import cli as group_cli
    with pytest.raises(SystemExit) as exit_:
        group_cli.main(["--member", "X:CAM:", "--member", "X_CAM:",
                        "--output-root", str(tmp_path)])
    assert exit_.value.code == 2
