"""What the IOC and the group IOC check at start-up, end to end (the IOCs as subprocesses,
real Channel Access and PV Access clients and servers, real files):

- a prefix some server already answers for (another sfbw-ioc, EPICS's softIoc, a PV
  Access server) refuses the start with exit status 78, unless allowed;
- ``.partial`` files left in the output root are counted (PARTIAL_FILES), logged, and
  never overwritten: a composed name that collides takes the next number, a name put
  verbatim is refused.
"""
from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import pytest
from p4p.nt import NTScalar
from p4p.server import Server, StaticProvider
from p4p.server.thread import SharedPV

from sfbw_ioc.serving.caprobe import read_pv
from sfbw_ioc.serving.duplicate import EXIT_DUPLICATE_PREFIX
from sfbw_ioc.testing.files import assert_rows
from sfbw_ioc.testing.ioc import (EPICS_BIN, IocProcess, SoftIoc, caput_binary, poll, run_ioc,
                                  unique_prefix)
from sfbw_ioc.testing.pva import PvaPorts
from sfbw_ioc.testing.sources import streaming_ioc

FIRST_PULSE_ID = 30_000_000_000
SEARCHED_NAME = "(STATE|MESSAGE|OUTPUT_FILE)"  # whichever the other server answers first
COMMANDS = {"sfbw-ioc": ("sfbw_ioc.cli", ["--simulate"]),
            "sfbw-group": ("sfbw_ioc.group.cli", ["--member", "ABSENT:"])}


def refusal(prefix: str, protocol: str, server: str) -> re.Pattern:
    """The CRITICAL line of a start refused for ``prefix``."""
    return re.compile(
        f"CRITICAL .*the prefix {re.escape(repr(prefix))} is served already: "
        f"{re.escape(prefix)}{SEARCHED_NAME} was found over {protocol} at {re.escape(server)}\\. "
        f".*--allow-duplicate-prefix serves anyway\\); exiting with status 78")


def caget(pv: str) -> str:
    """EPICS's own caget, terse; fails the test unless it exits 0."""
    result = subprocess.run([str(EPICS_BIN / "caget"), "-w", "2", "-t", pv],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout.strip()


# ---- a prefix served already ----------------------------------------------------------------

def test_a_second_ioc_with_a_running_ones_prefix_exits_and_the_first_serves_on(
        ca_ports, tmp_path):
    """Same prefix, same CA port, same search list: the second exits before it makes
    anything (its output root is not even created); the first still answers alone."""
    port, prefix = ca_ports(), unique_prefix("DUP")
    first = IocProcess(port, prefix, ["--simulate", "--output-root", str(tmp_path / "first")],
                       tmp_path / "first.log")
    try:
        began = time.monotonic()
        second = run_ioc(port, prefix, ["--simulate", "--output-root", str(tmp_path / "second")])
        print(f"refused after {time.monotonic() - began:.2f} s (process start included)")
        assert second.returncode == EXIT_DUPLICATE_PREFIX, second.stderr
        assert refusal(prefix, "Channel Access", f"127.0.0.1:{port}").search(second.stderr), \
            second.stderr
        assert not (tmp_path / "second").exists()
        assert first.process.poll() is None
        assert caget(first.pv("STATE")) == "IDLE"
        assert f"no other server answers for the prefix {prefix!r}" in first.log()
    finally:
        assert first.stop() == 0, first.log()


def test_allow_duplicate_prefix_serves_a_prefix_twice(ca_ports, tmp_path):
    prefix = unique_prefix("DUPA")
    first = IocProcess(ca_ports(), prefix, ["--simulate", "--output-root", str(tmp_path)],
                       tmp_path / "first.log")
    try:
        second = IocProcess(ca_ports(), prefix, ["--simulate", "--output-root", str(tmp_path),
                                                 "--allow-duplicate-prefix"],
                            tmp_path / "second.log")
        try:
            # The second's own server answers (a new connection to its port).
            assert list(read_pv(("127.0.0.1", second.port), prefix + "STATE", 5)) == [0]
            assert "no other server answers" not in second.log()  # not searched at all
        finally:
            assert second.stop() == 0, second.log()
    finally:
        assert first.stop() == 0, first.log()


@pytest.mark.parametrize("command", COMMANDS)
def test_a_softioc_record_with_the_prefix_refuses_the_start(ca_ports, tmp_path, command):
    """EPICS's softIoc, on a port of its own, serving one record <prefix>STATE: found by
    a Channel Access search on the search list, as any client would find it."""
    db = tmp_path / "state.db"
    db.write_text('record(mbbi, "$(P)STATE") {\n    field(ZRST, "IDLE")\n}\n')
    prefix = unique_prefix("DUPS")
    module, args = COMMANDS[command]
    soft = SoftIoc(ca_ports(), prefix, db, "STATE", tmp_path / "softioc.log")
    try:
        result = run_ioc(ca_ports(), prefix, [*args, "--output-root", str(tmp_path / "data")],
                         module=module)
    finally:
        soft.stop()
    assert result.returncode == EXIT_DUPLICATE_PREFIX, result.stderr
    assert refusal(prefix, "Channel Access", f"127.0.0.1:{soft.port}").search(result.stderr), \
        result.stderr
    assert f"{prefix}STATE was found" in result.stderr  # the only PV it has


def test_a_pv_access_server_of_the_prefix_refuses_the_start_unless_pva_is_off(
        ca_ports, tmp_path):
    """A server of <prefix>STATE over PV Access only (p4p, in this process): the IOC that
    would serve PV Access refuses; with --no-pva it searches Channel Access only and
    starts."""
    pva, prefix = PvaPorts(), unique_prefix("DUPP")
    provider = StaticProvider("duplicate")
    provider.add(prefix + "STATE", SharedPV(nt=NTScalar("i"), initial=0))
    clients = ["env", *(f"{name}={value}" for name, value in pva.client_environment().items())]
    args = ["--simulate", "--output-root", str(tmp_path)]
    with Server(providers=[provider], conf=pva.server_environment(), useenv=False):
        refused = run_ioc(ca_ports(), prefix, args, wrapper=clients)
        ca_only = IocProcess(ca_ports(), prefix, [*args, "--no-pva"], tmp_path / "ca-only.log",
                             wrapper=clients)
        assert ca_only.stop() == 0, ca_only.log()
    assert refused.returncode == EXIT_DUPLICATE_PREFIX, refused.stderr
    assert refusal(prefix, "PV Access", f"a server of the search list '127.0.0.1:{pva.port}'"
                   ).search(refused.stderr), refused.stderr
    assert (f"no other server answers for the prefix {prefix!r} (searched Channel Access for"
            in ca_only.log())


# ---- left-over .partial files ---------------------------------------------------------------

def left_over(path: Path, age_s: float) -> Path:
    """A .partial file as a killed acquisition leaves it, last written ``age_s`` ago."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89HDF\r\n\x1a\n cut off " + path.name.encode())
    mtime = time.time() - age_s
    os.utime(path, (mtime, mtime))
    return path


def warnings_about_leftovers(log: str) -> list[str]:
    return [line for line in log.splitlines()
            if " WARNING " in line and " left in " in line and ".partial" in line]


def test_left_over_partials_are_counted_logged_and_never_overwritten(ca_ports, tmp_path):
    """Composed names (FILE_PATH, FILE_NAME, FILE_NUMBER) skip a left-over as they skip
    any existing file: a scan goes on with the next number, as an operator who only
    STARTs and STOPs expects. A name put verbatim to OUTPUT_FILE is refused with the
    reason: whoever named it wants that file, and gets told why not."""
    root = tmp_path / "data"
    verbatim = left_over(root / "a.h5.partial", 3600)
    composed = left_over(root / "scan/step_0001.h5.partial", 60)  # the newest
    deep = left_over(root / "2024/06/run7/cam.h5.partial", 7200)
    (root / "scan/step_0000.h5").write_bytes(b"a complete file")
    contents = {path: path.read_bytes() for path in (verbatim, composed, deep)}
    with streaming_ioc(ca_ports(), "LEFT", root, tmp_path / "ioc.log") as (ioc, source):
        poll(lambda: caget(ioc.pv("PARTIAL_FILES")) == "3", what="PARTIAL_FILES 3 (caget)")
        assert ioc.get("PARTIAL_FILES") == 3  # pyepics
        assert ioc.text("PARTIAL_FILES_NEWEST") == str(composed)
        warnings = warnings_about_leftovers(ioc.log())
        assert len(warnings) == 1, ioc.log()
        assert f"3 .partial files left in {root}" in warnings[0]
        for name in ("a.h5.partial", "scan/step_0001.h5.partial", "2024/06/run7/cam.h5.partial"):
            assert name in warnings[0]

        ioc.put("FILE_PATH", "scan")
        ioc.put("FILE_NAME", "step")
        ioc.put("FILE_NUMBER", 1)
        assert ioc.text("OUTPUT_FILE") == "scan/step_0001.h5"
        ioc.put("START_PULSE_ID", FIRST_PULSE_ID)
        source.send_range(FIRST_PULSE_ID, FIRST_PULSE_ID + 10)
        ioc.put("STOP_PULSE_ID", FIRST_PULSE_ID + 9)  # put-callback: the file is closed
        assert ioc.text("LAST_FILE") == str(root / "scan/step_0002.h5")
        assert_rows(root / "scan/step_0002.h5", list(range(FIRST_PULSE_ID, FIRST_PULSE_ID + 10)))

        refused = caput_binary("-c", "-S", ioc.pv("OUTPUT_FILE"), "a.h5", ca_timeout=30)
        assert refused.returncode == 1, refused.stdout
        assert ioc.text("MESSAGE") == (
            f"{verbatim} exists already, a file that was not completed (its acquisition was "
            "cut off, or is still being written); files are never overwritten")
        assert not (root / "a.h5").exists()
        assert ioc.get("PARTIAL_FILES") == 3  # counted at start-up
    assert {path: path.read_bytes() for path in contents} == contents
    assert not (root / "scan/step_0001.h5").exists()


def test_the_group_counts_the_partials_of_its_own_root(ca_ports, tmp_path):
    """The master files are written as .partial too: a group IOC killed while writing
    one leaves it."""
    root = tmp_path / "masters"
    master = left_over(root / "run0007.h5.partial", 30)
    group = IocProcess(ca_ports(), unique_prefix("LEFTG"),
                       ["--member", "ABSENT:", "--output-root", str(root)],
                       tmp_path / "group.log", module="sfbw_ioc.group.cli")
    try:
        group.wait_for("PARTIAL_FILES", 1)
        assert group.text("PARTIAL_FILES_NEWEST") == str(master)
        assert len(warnings_about_leftovers(group.log())) == 1
    finally:
        assert group.stop() == 0, group.log()
