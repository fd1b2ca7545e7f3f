"""The group's master file (sfbw_ioc.group.master.write_master) over real member files
in the SwissFEL layout, read back through its external links with h5py."""
from __future__ import annotations

import logging
from datetime import datetime
from pathlib import Path

import h5py
import numpy as np
import pytest

from sfbw_ioc.group.master import (ABSENT, FAILED, WRITTEN, MasterSummary, MemberOutcome,
                                   write_master)

FIRST_PULSE_ID = 20_000_000_000
GENERAL = {"user": "p12345", "process": "alignment", "instrument": "Alvra"}


def write_member(path: Path, channels: dict[str, float], rows: int = 5) -> Path:
    """A member's file: every channel a scalar column, ``rows`` pulses from
    FIRST_PULSE_ID, the last one without data; its values start at the given one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pulse_ids = np.arange(FIRST_PULSE_ID, FIRST_PULSE_ID + rows, dtype=np.int64)
    present = np.ones(rows, dtype=np.uint8)
    present[-1] = 0
    with h5py.File(path, "x") as h5:
        general = h5.create_group("general")
        for key, value in {"created": "2024-05-01T12:00:00+02:00", **GENERAL}.items():
            general.create_dataset(key, data=value, dtype=h5py.string_dtype("utf-8"))
        for channel, first in channels.items():
            group = h5.create_group(f"data/{channel}")
            group["data"] = (first + np.arange(rows, dtype=np.float64)).reshape(rows, 1)
            group["pulse_id"] = pulse_ids
            group["is_data_present"] = present
            group["timestamp"] = pulse_ids * 10_000_000
    return path


def written(prefix: str, file: Path, figures: tuple[int, int, int] = (5, 0, 0)
            ) -> MemberOutcome:
    return MemberOutcome(prefix, prefix.rstrip(":"), WRITTEN, str(file), *figures)


def text(dataset: h5py.Dataset) -> str:
    return dataset.asstr()[()]


@pytest.fixture
def members(tmp_path):
    """Two members with channels of their own: A's values from 0, B's from 100."""
    a = write_member(tmp_path / "memberA/run/A.h5", {"A:T1": 0.0, "A:T2": 10.0})
    b = write_member(tmp_path / "memberB/run/B.h5", {"B:CAM": 100.0})
    return a, b


def test_general_holds_who_and_when(tmp_path, members):
    before = datetime.now().astimezone().replace(microsecond=0)
    master = write_master(tmp_path / "group/run.h5", GENERAL, [written("A:", members[0])])
    after = datetime.now().astimezone()
    with h5py.File(master.path, "r") as h5:
        created = datetime.fromisoformat(text(h5["general/created"]))
        assert created.tzinfo is not None and before <= created <= after
        assert {key: text(h5[f"general/{key}"]) for key in GENERAL} == GENERAL


@pytest.mark.parametrize("general", [{"user": "", "process": "", "instrument": ""}, {}])
def test_general_not_given(tmp_path, members, general):
    master = write_master(tmp_path / "group/run.h5", general, [written("A:", members[0])])
    with h5py.File(master.path, "r") as h5:
        assert [text(h5[f"general/{key}"]) for key in GENERAL] == ["not given"] * 3


def test_members_table_has_a_row_for_every_member(tmp_path, members):
    outcomes = [written("A:", members[0], (5, 2, 1)),
                MemberOutcome("C:", "C", FAILED, message="member C: failed: disconnected"),
                MemberOutcome("D:", "D", ABSENT, message="member D: not connected")]
    master = write_master(tmp_path / "group/run.h5", {}, outcomes)
    with h5py.File(master.path, "r") as h5:
        table = h5["general/members"][:]
        assert table.dtype.names == ("prefix", "file", "status", "written", "missing",
                                     "lost", "message")
        rows = [tuple(v.decode() if isinstance(v, bytes) else int(v) for v in row)
                for row in table]
        assert rows == [
            ("A:", str(members[0]), "written", 5, 2, 1, ""),
            ("C:", "", "failed", 0, 0, 0, "member C: failed: disconnected"),
            ("D:", "", "absent", 0, 0, 0, "member D: not connected")]
        assert list(h5["members"]) == ["A"]  # no file, no link


def test_members_are_linked_to_the_roots_of_their_files(tmp_path, members):
    master = write_master(tmp_path / "group/run.h5", {},
                          [written("A:", members[0]), written("B:", members[1])])
    with h5py.File(master.path, "r") as h5:
        for name, file in zip(("A", "B"), members):
            link = h5["members"].get(name, getlink=True)
            assert isinstance(link, h5py.ExternalLink)
            assert (link.filename, link.path) == (str(file), "/")
        assert text(h5["members/A/general/user"]) == "p12345"
        assert sorted(h5["members/B/data"]) == ["B:CAM"]


def test_data_links_read_every_members_channels(tmp_path, members):
    master = write_master(tmp_path / "group/run.h5", {},
                          [written("A:", members[0]), written("B:", members[1])])
    assert master == MasterSummary(tmp_path / "group/run.h5", 3, [])
    with h5py.File(master.path, "r") as h5:
        assert sorted(h5["data"]) == ["A:T1", "A:T2", "B:CAM"]
        link = h5["data"].get("B:CAM", getlink=True)
        assert (link.filename, link.path) == (str(members[1]), "/data/B:CAM")
        for channel, file in (("A:T1", members[0]), ("A:T2", members[0]),
                              ("B:CAM", members[1])):
            with h5py.File(file, "r") as member:
                for key in ("data", "pulse_id", "is_data_present", "timestamp"):
                    assert np.array_equal(h5[f"data/{channel}/{key}"][:],
                                          member[f"data/{channel}/{key}"][:]), (channel, key)
        assert h5["data/B:CAM/data"][:, 0].tolist() == [100.0, 101.0, 102.0, 103.0, 104.0]
        assert h5["data/A:T2/pulse_id"][0] == FIRST_PULSE_ID
        assert h5["data/A:T1/is_data_present"][:].tolist() == [1, 1, 1, 1, 0]


def test_a_channel_two_members_send_is_linked_from_the_first(tmp_path):
    first = write_member(tmp_path / "m1/run/A.h5", {"S:SHARED": 0.0, "A:OWN": 5.0})
    second = write_member(tmp_path / "m2/run/B.h5", {"S:SHARED": 100.0, "B:OWN": 50.0})
    master = write_master(tmp_path / "group/run.h5", {},
                          [written("A:", first), written("B:", second)])
    assert master.channels == 3
    assert master.duplicates == ["S:SHARED (B:)"]
    with h5py.File(master.path, "r") as h5:
        assert h5["data"].get("S:SHARED", getlink=True).filename == str(first)
        assert h5["data/S:SHARED/data"][0, 0] == 0.0
        assert h5["members/B/data/S:SHARED/data"][0, 0] == 100.0  # the other copy
        assert h5["data/B:OWN/data"][0, 0] == 50.0


def test_a_member_without_a_file_takes_no_channel(tmp_path, members):
    outcomes = [MemberOutcome("C:", "C", FAILED, message="member C: failed: gone"),
                written("A:", members[0])]
    master = write_master(tmp_path / "group/run.h5", {}, outcomes)
    with h5py.File(master.path, "r") as h5:
        assert sorted(h5["data"]) == ["A:T1", "A:T2"]
        assert h5["data"].get("A:T1", getlink=True).filename == str(members[0])


def test_a_member_file_without_data_is_linked_under_members_only(tmp_path, members):
    empty = tmp_path / "memberE/run/E.h5"
    empty.parent.mkdir(parents=True)
    with h5py.File(empty, "x") as h5:
        h5.create_group("general")
    master = write_master(tmp_path / "group/run.h5", {},
                          [written("E:", empty), written("B:", members[1])])
    assert master.channels == 1
    with h5py.File(master.path, "r") as h5:
        assert list(h5["members/E"]) == ["general"]
        assert list(h5["data"]) == ["B:CAM"]


@pytest.mark.parametrize("content", [b"not an HDF5 file", None], ids=["garbage", "missing"])
def test_an_unreadable_member_file_is_linked_under_members_only(tmp_path, members, caplog,
                                                                content):
    unreadable = tmp_path / "memberU/run/U.h5"
    if content is not None:
        unreadable.parent.mkdir(parents=True)
        unreadable.write_bytes(content)
    with caplog.at_level(logging.ERROR, logger="sfbw_ioc.group.master"):
        master = write_master(tmp_path / "group/run.h5", {},
                              [written("U:", unreadable), written("B:", members[1])])
    assert master.channels == 1
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and errors[0].startswith(f"cannot read {unreadable} of U:")
    with h5py.File(master.path, "r") as h5:
        link = h5["members"].get("U", getlink=True)
        assert (link.filename, link.path) == (str(unreadable), "/")
        assert list(h5["data"]) == ["B:CAM"]
        assert h5["general/members"][0]["status"].decode() == "written"


def test_the_master_goes_into_a_new_folder(tmp_path, members):
    path = tmp_path / "group/2024/05/run.h5"
    master = write_master(path, {}, [written("A:", members[0])])
    assert master.path == path and h5py.is_hdf5(path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["run.h5"]  # no .partial


def test_an_existing_master_is_never_overwritten(tmp_path, members):
    path = tmp_path / "group/run.h5"
    path.parent.mkdir()
    path.write_bytes(b"someone else's")
    with pytest.raises(FileExistsError):
        write_master(path, {}, [written("A:", members[0])])
    assert path.read_bytes() == b"someone else's"
    # What was written is not lost: it stays as the .partial, complete.
    with h5py.File(path.with_name("run.h5.partial"), "r") as h5:
        assert list(h5["data"]) == ["A:T1", "A:T2"]
