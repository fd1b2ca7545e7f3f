"""Files belong to the experiment's user: FILE_UID / FILE_GID, --file-mode / --dir-mode.

Unix accounts made by the test (removed afterwards): a group, a user in it (the IOC runs
as this user where it must be unprivileged) and another user (whom files are given to).
The IOC runs as root, as that user without CAP_CHOWN, and as that user with exactly the
capabilities the README's systemd unit gives it; owners and modes are read with os.stat.
"""
from __future__ import annotations

import grp
import itertools
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

from sfbw_ioc.testing.ioc import REPO, IocProcess, caput_binary, poll, unique_prefix
from sfbw_ioc.testing.sources import BsreadSource
from sfbw_ioc.testing.files import assert_rows
from sfbw_ioc.output.ownership import MAX_ID, Owner, OwnershipError

_bases = itertools.count(60_000_000_000, 100_000)


def _run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True)


@pytest.fixture(scope="module")
def accounts():
    """(group, member, other): names and ids of a group, a user in it, another user."""
    if os.geteuid() != 0 or not all(shutil.which(t) for t in ("useradd", "groupadd",
                                                              "setpriv")):
        pytest.skip("needs root with useradd, groupadd and setpriv to make Unix accounts "
                    "and run the IOC as one of them")
    tag = uuid.uuid4().hex[:6]
    group, member, other = f"sfbw{tag}g", f"sfbw{tag}m", f"sfbw{tag}o"
    made: list[tuple[str, str]] = []
    try:
        for command, name in (("groupadd", group), ("useradd", member), ("useradd", other)):
            options = ["--system"] if command == "groupadd" else [
                "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                *(["-G", group] if name == member else [])]
            result = _run(command, *options, name)
            if result.returncode != 0:
                pytest.skip(f"{command} {name} failed: {result.stderr.strip()}")
            made.append((command, name))
        yield {"group": grp.getgrnam(group).gr_gid, "member": pwd.getpwnam(member).pw_uid,
               "member_gid": pwd.getpwnam(member).pw_gid,
               "other": pwd.getpwnam(other).pw_uid, "member_name": member,
               "group_name": group}
    finally:
        for command, name in reversed(made):
            _run("userdel" if command == "useradd" else "groupdel", name)


def owner_of(path: Path) -> tuple[int, int, int]:
    """(uid, gid, permission bits incl. set-gid) of ``path``, not following links."""
    status = os.lstat(path)
    return status.st_uid, status.st_gid, stat.S_IMODE(status.st_mode)


def caput(ioc: IocProcess, name: str, value, *options: str) -> subprocess.CompletedProcess:
    """EPICS' caput -c: exit status 1 when the IOC refuses the put."""
    return caput_binary("-c", *options, "--", ioc.pv(name), str(value), ca_timeout=30)


def acquire(ioc: IocProcess, source: BsreadSource, output_file: str, uid: int, gid: int,
            writer: str = "", partial_owner: tuple[int, int, int] | None = None) -> Path:
    """One acquisition of 5 messages as uid:gid; the .partial's owner and mode are
    checked as soon as it exists, before any message is sent."""
    assert caput(ioc, writer + "FILE_UID", uid).returncode == 0
    assert caput(ioc, writer + "FILE_GID", gid).returncode == 0
    assert caput(ioc, writer + "OUTPUT_FILE", output_file, "-S").returncode == 0
    started = caput(ioc, writer + "START_NOW", 1)
    assert started.returncode == 0, started.stderr + ioc.text(writer + "MESSAGE")
    ioc.wait_for(writer + "STATE", 1)  # WAITING: the .partial exists, nothing written
    target = Path(ioc.text("OUTPUT_ROOT")) / output_file
    partial = target.with_name(target.name + ".partial")
    if partial_owner is not None:
        assert owner_of(partial) == partial_owner
    if uid != -1:
        assert f"for user {pwd.getpwuid(uid).pw_name} (uid {uid})" in ioc.text(
            writer + "MESSAGE")
    base = next(_bases)
    source.send_range(base, base + 4)
    poll(lambda: ioc.get(writer + "WRITTEN") == 5, what="5 messages written")
    ioc.put(writer + "STOP_NOW", 1)
    assert Path(ioc.text(writer + "LAST_FILE")) == target
    assert_rows(target, list(range(base, base + 5)))
    return target


@pytest.fixture
def started(tmp_path, ca_ports):
    """Start IOCs (as root, or behind a wrapper) on their own sources; stop them after."""
    running: list[tuple[IocProcess, BsreadSource]] = []

    def start(root: Path, *options: str, wrapper: tuple[str, ...] = ()):
        source = BsreadSource()
        ioc = IocProcess(ca_ports(), unique_prefix("OWN"),
                         ["--stream", source.address, "--output-root", str(root),
                          "--watchdog-seconds", "0", *options],
                         tmp_path / f"ioc{len(running)}.log", wrapper=wrapper)
        running.append((ioc, source))
        return ioc, source

    yield start
    for ioc, source in running:
        source.close()
        assert ioc.stop() == 0, ioc.log()


def as_user(name: str, *capabilities: str) -> tuple[str, ...]:
    """setpriv running a command as ``name`` (its groups too) with only these capabilities
    (ambient: kept across exec, as systemd's AmbientCapabilities= gives them)."""
    caps = ",".join(f"+{cap}" for cap in capabilities) or "-all"
    return ("setpriv", "--reuid", name, "--regid", name, "--init-groups",
            "--inh-caps", caps, "--ambient-caps", caps, "--")


@pytest.fixture
def user_root(accounts):
    """An output root the member user owns (pytest's tmp_path is root's only)."""
    root = Path(tempfile.mkdtemp(prefix="sfbw-owner-"))
    os.chown(root, accounts["member"], accounts["member_gid"])
    yield root
    shutil.rmtree(root)


# ---- the IOC as root --------------------------------------------------------------------

def test_root_ioc_gives_file_and_the_directories_it_made_to_the_user(
        accounts, started, tmp_path):
    root = tmp_path / "data"
    (root / "existing").mkdir(parents=True, mode=0o755)
    ioc, source = started(root)
    uid, gid = accounts["other"], accounts["group"]
    target = acquire(ioc, source, "existing/run1/scan/a.h5", uid, gid,
                     partial_owner=(uid, gid, 0o640))
    assert owner_of(target) == (uid, gid, 0o640)
    for made in (root / "existing/run1", root / "existing/run1/scan"):
        assert owner_of(made) == (uid, gid, 0o750)
    assert owner_of(root / "existing") == (0, 0, 0o755)  # existing ones are left alone
    assert not list(root.rglob("*.partial"))

    # The other writer still writes as the IOC, with the default modes.
    mine = acquire(ioc, source, "mine/b.h5", -1, -1, writer="W2:",
                   partial_owner=(0, 0, 0o640))
    assert owner_of(mine) == (0, 0, 0o640)
    assert owner_of(mine.parent) == (0, 0, 0o750)


def test_bad_ids_are_refused_and_nothing_is_created(accounts, started, tmp_path):
    root = tmp_path / "data"
    ioc, _ = started(root)
    assert caput(ioc, "FILE_UID", -2).returncode == 1
    assert "FILE_UID must be -1" in ioc.text("MESSAGE")
    assert ioc.get("W1:FILE_UID") == -1
    unknown = next(uid for uid in range(MAX_ID - 1, 0, -1) if not _has_user(uid))
    assert caput(ioc, "FILE_UID", unknown).returncode == 0  # checked at START
    assert caput(ioc, "OUTPUT_FILE", "new/x.h5", "-S").returncode == 0
    assert caput(ioc, "START_NOW", 1).returncode == 1
    assert f"FILE_UID {unknown}: no user has this uid" in ioc.text("MESSAGE")
    assert ioc.get("STATE", as_string=True) == "IDLE"
    assert not (root / "new").exists()


def _has_user(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
    except KeyError:
        return False
    return True


def test_modes_from_the_command_line(accounts, started, tmp_path):
    root = tmp_path / "data"
    ioc, source = started(root, "--file-mode", "0660", "--dir-mode", "2770")
    uid, gid = accounts["other"], accounts["group"]
    target = acquire(ioc, source, "shared/c.h5", uid, gid, partial_owner=(uid, gid, 0o660))
    assert owner_of(target) == (uid, gid, 0o660)
    assert owner_of(root / "shared") == (uid, gid, 0o2770)


# ---- the IOC as an unprivileged user ----------------------------------------------------

def test_ioc_without_cap_chown_refuses_another_owner_and_keeps_working(
        accounts, started, user_root):
    # CAP_DAC_READ_SEARCH only to reach Python and the repository below /root; no chown.
    ioc, source = started(user_root, wrapper=as_user(accounts["member_name"],
                                                     "dac_read_search"))
    assert caput(ioc, "FILE_UID", accounts["other"]).returncode == 0
    assert caput(ioc, "OUTPUT_FILE", "given/x.h5", "-S").returncode == 0
    assert caput(ioc, "START_NOW", 1).returncode == 1
    message = ioc.text("MESSAGE")
    assert "lacks CAP_CHOWN and CAP_DAC_OVERRIDE" in message, message
    assert ioc.get("STATE", as_string=True) == "IDLE"
    assert not (user_root / "given").exists()

    me, mine, group = accounts["member"], accounts["member_gid"], accounts["group"]
    own = acquire(ioc, source, "own/y.h5", -1, -1, partial_owner=(me, mine, 0o640))
    assert owner_of(own.parent) == (me, mine, 0o750)
    # A group of its own it may give without any capability (chown(2)'s rule).
    shared = acquire(ioc, source, "team/z.h5", -1, group, partial_owner=(me, group, 0o640))
    assert owner_of(shared.parent) == (me, group, 0o750)


def test_ioc_with_the_systemd_capabilities_gives_files_to_another_user(
        accounts, started, user_root):
    ioc, source = started(user_root, wrapper=as_user(accounts["member_name"],
                                                     "chown", "dac_override"))
    uid, gid = accounts["other"], accounts["group"]
    target = acquire(ioc, source, "p1/run/w.h5", uid, gid, partial_owner=(uid, gid, 0o640))
    assert owner_of(target) == (uid, gid, 0o640)
    assert owner_of(target.parent) == owner_of(target.parent.parent) == (uid, gid, 0o750)


# ---- the module itself, on the real file system -----------------------------------------

def test_check_names_the_missing_capabilities(accounts):
    """Owner.check in a process whose capabilities setpriv cut down (still uid 0)."""
    code = ("import sys; from sfbw_ioc.output.ownership import Owner\n"
            "try:\n    Owner(uid=int(sys.argv[1])).check()\n"
            "except ValueError as error:\n    print(error)\nelse:\n    print('allowed')")

    def check(*bounding: str) -> str:
        result = subprocess.run(["setpriv", "--bounding-set", ",".join(bounding), "--",
                                 sys.executable, "-c", code, str(accounts["other"])],
                                capture_output=True, text=True, cwd=REPO)
        assert result.returncode == 0, result.stderr
        return result.stdout.strip()

    assert "lacks CAP_CHOWN and CAP_DAC_OVERRIDE" in check("-chown", "-dac_override")
    only_chown = check("-dac_override")
    assert "lacks CAP_DAC_OVERRIDE" in only_chown and "CAP_CHOWN and" not in only_chown
    assert "AmbientCapabilities=CAP_CHOWN CAP_DAC_OVERRIDE" in only_chown
    assert check("-fowner") == "allowed"


def test_a_symbolic_link_in_the_path_is_never_followed(accounts, tmp_path):
    """The new owner may swap a directory given to them for a link elsewhere: the walk
    by descriptors refuses it instead of creating (as root) behind the link."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "run").symlink_to(elsewhere)
    owner = Owner(uid=accounts["other"], gid=accounts["group"])
    with pytest.raises(OSError):
        owner.create_file(tmp_path / "run" / "deeper" / "f.h5.partial")
    assert list(elsewhere.iterdir()) == []
    (tmp_path / "f.h5.partial").symlink_to(elsewhere / "victim")
    with pytest.raises(FileExistsError):
        owner.create_file(tmp_path / "f.h5.partial")
    assert not (elsewhere / "victim").exists()


def test_modes_out_of_range_are_refused():
    with pytest.raises(OwnershipError):
        Owner(file_mode=0o4640)
    with pytest.raises(OwnershipError):
        Owner(dir_mode=0o17777)
    with pytest.raises(OwnershipError, match="FILE_GID must be"):
        Owner(gid=-3).check()
