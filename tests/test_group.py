"""sfbw-group end to end: three member IOCs on three real bsread sources with common
pulse ids, the group IOC as a subprocess driving them over Channel Access, member files
and the master's external links read back with h5py."""
from __future__ import annotations

import itertools
import os
import pwd
import signal
import subprocess
from pathlib import Path

import epics
import h5py
import numpy as np
import pytest

from sfbw_ioc.testing.ioc import EPICS_BIN, IocProcess, caput_binary, poll, unique_prefix
from sfbw_ioc.testing.sources import BsreadSource, CommonPulseStreams, member_channels
from sfbw_ioc.testing.files import assert_rows
from sfbw_ioc.testing.pva import PvaPorts

FIRST_PULSE_ID = 20_000_000_000  # above 2**31, as at SwissFEL


@pytest.fixture(scope="module")
def setup(tmp_path_factory, ca_ports):
    logs = tmp_path_factory.mktemp("logs")
    sources = [BsreadSource() for _ in range(3)]
    streams = CommonPulseStreams(sources, FIRST_PULSE_ID)
    streams.start()
    roots = [tmp_path_factory.mktemp(f"member{index}") for index in range(len(sources))]
    lives = itertools.count()

    def start_member(index: int, port: int, prefix: str) -> IocProcess:
        """Member ``index`` on ``port`` and ``prefix`` (again, after a restart)."""
        return IocProcess(port, prefix, ["--stream", sources[index].address, "--output-root",
                                         str(roots[index]), "--buffer-length", "1000"],
                          logs / f"member{index}-{next(lives)}.log")

    members = [start_member(index, ca_ports(), unique_prefix(f"GRPM{index}-"))
               for index in range(len(sources))]
    group_root = tmp_path_factory.mktemp("group")
    member_args = [arg for m in members for arg in ("--member", m.prefix)]
    pva = PvaPorts()
    group = IocProcess(ca_ports(), unique_prefix("GRP"),
                       [*member_args, "--output-root", str(group_root)],
                       logs / "group.log", module="sfbw_ioc.group.cli",
                       wrapper=pva.server_wrapper())
    group.pva = pva
    group.wait_for("MEMBERS_CONNECTED", 3)
    yield group, members, roots, group_root, streams, start_member
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
    _, members, roots, group_root, *_ = setup
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


@pytest.fixture
def owner(group):
    """An account the member IOCs (root) may give files to; the group's FILE_UID and
    FILE_GID back to -1 afterwards."""
    if os.geteuid() != 0:
        pytest.skip("the member IOCs give files to another user only as root")
    yield pwd.getpwnam("nobody")
    group.put("FILE_UID", -1)
    group.put("FILE_GID", -1)


def owners(setup, stem: str) -> list[tuple[int, int]]:
    return [(stat.st_uid, stat.st_gid)
            for stat in (member_file(setup, index, stem).stat() for index in range(3))]


def test_file_owner_is_put_to_every_member_before_the_start(setup, group, owner):
    _, members, *_ = setup
    members[0].put("FILE_UID", owner.pw_uid)  # by hand: the group's -1 overrides it
    newest = newest_pulse(setup)
    acquire(group, "own/ioc.h5", newest - 40, newest - 30)
    assert owners(setup, "own/ioc") == [(0, 0)] * 3
    group.put("FILE_UID", owner.pw_uid)
    group.put("FILE_GID", owner.pw_gid)
    master = acquire(group, "own/theirs.h5", newest - 20, newest - 10)
    assert group.get("STATE") == 0, group.text("MESSAGE")
    assert owners(setup, "own/theirs") == [(owner.pw_uid, owner.pw_gid)] * 3
    assert [(m.get("FILE_UID"), m.get("FILE_GID")) for m in members] == \
        [(owner.pw_uid, owner.pw_gid)] * 3
    assert_group_files(setup, master, "own/theirs", list(range(newest - 20, newest - 9)))


def test_a_file_owner_a_member_refuses_refuses_the_start(setup, group, owner):
    _, members, _, group_root, *_ = setup
    unknown = next(uid for uid in range(2**31 - 2, 0, -1) if not _has_account(uid))
    group.put("FILE_UID", unknown)  # in range: the members' START says whether it exists
    group.put("OUTPUT_FILE", "nobodys.h5")
    assert caput_binary("-c", group.pv("START_NOW"), "1", ca_timeout=10).returncode == 1
    message = group.text("MESSAGE")
    assert f"FILE_UID {unknown}: no user has this uid" in message, message
    assert any(m.prefix in message for m in members), message
    assert [m.get("STATE") for m in members] == [0, 0, 0]
    assert not (group_root / "nobodys.h5").exists()
    assert not any(member_file(setup, index, "nobodys").exists() for index in range(3))


def test_a_file_owner_out_of_range_is_refused_by_the_group(setup, group):
    before = group.get("FILE_GID")
    assert caput_binary("-c", group.pv("FILE_GID"), "-2", ca_timeout=10).returncode == 1
    assert "FILE_GID must be -1" in group.text("MESSAGE")
    assert group.get("FILE_GID") == before


def _has_account(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
    except KeyError:
        return False
    return True


@pytest.mark.parametrize("when", ["writing", "stopping"])
def test_member_restarted_during_acquisition_is_named_and_the_next_one_works(setup, group,
                                                                             when):
    """Killed and started again on the same port and prefix while the group writes, or
    while the group's STOP waits for the stop pulse: the group names it, its acquisition
    ends (the STOP fails, the master lists the member as failed), and the next one has
    the restarted member in it."""
    _, members, *_, streams, start_member = setup
    newest = newest_pulse(setup)
    start, stop = newest - 10, newest + 300
    group.put("OUTPUT_FILE", f"restarted-{when}.h5")
    group.put("START_PULSE_ID", start)
    group.wait_for("STATE", 2)
    if when == "stopping":  # the STOP's put-callback waits for the files meanwhile
        stopping = subprocess.Popen([str(EPICS_BIN / "caput"), "-c", "-w", "30",
                                     group.pv("STOP_PULSE_ID"), str(stop)],
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True)
        group.wait_for("MESSAGE", f"stopping at {stop}", as_string=True)
    streams.silent.add(1)  # a PUSH without its receiver would block the other streams
    killed = members[1]
    killed.stop(sig=signal.SIGKILL)
    members[1] = start_member(1, killed.port, killed.prefix)
    streams.silent.discard(1)
    group.wait_for("MEMBERS_CONNECTED", 3)
    assert f"member {killed.prefix} failed" in group.text("MESSAGE")
    if when == "writing":
        assert group.get("STATE") == 4  # ERROR
        refused = caput_binary("-c", group.pv("STOP_PULSE_ID"), str(stop), ca_timeout=30)
        assert refused.returncode == 1
    else:
        assert stopping.wait(60) == 1, stopping.stdout.read()
    assert group.get("STATE") == 4
    master = Path(group.text("LAST_FILE"))
    assert master.name == f"restarted-{when}.h5"
    assert_group_files(setup, master, f"restarted-{when}", list(range(start, stop + 1)), (0, 2))
    with h5py.File(master, "r") as h5:
        row = h5["general/members"][1]
        assert row["status"].decode() == "failed" and row["file"].decode() == ""
        assert killed.prefix in row["message"].decode()

    poll(lambda: members[1].get("LAST_PULSE_ID") > 0, what="the restarted member receiving")
    newest = newest_pulse(setup)
    start, stop = newest + 20, newest + 60
    master = acquire(group, f"after-restart-{when}.h5", start, stop)
    assert group.get("STATE") == 0, group.text("MESSAGE")
    assert_group_files(setup, master, f"after-restart-{when}", list(range(start, stop + 1)))


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
    _, members, roots, group_root, *_ = setup  # members[2] was killed by the test before
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
    _, members, *_ = setup  # members[2] is gone
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


def test_the_group_serves_its_pvs_over_pva_too(setup):
    """The same PVs and values over PV Access as over Channel Access (p4p's client)."""
    group = setup[0]
    context = group.pva.context()
    try:
        # Earlier tests of this module restart members: the count may be below 3.
        connected = group.get("MEMBERS_CONNECTED")
        assert connected > 0
        poll(lambda: context.get(group.pv("MEMBERS_CONNECTED")) == group.get("MEMBERS_CONNECTED"),
             what="MEMBERS_CONNECTED the same over PVA and CA")
        assert context.get(group.pv("MEMBERS")).raw.value == group.text("MEMBERS")
        state = context.get(group.pv("STATE"))
        assert state.raw.value.choices[state.raw.value.index] == group.get("STATE", as_string=True)
    finally:
        context.close()
