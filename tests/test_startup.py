"""What the IOC and the group IOC check at start-up, end to end (the IOCs as subprocesses,
real Channel Access and PV Access clients and servers): a prefix some server already
answers for (another sfbw-ioc, EPICS's softIoc, a PV Access server) refuses the start
with exit status 78, unless allowed.
"""
from __future__ import annotations

import re
import subprocess
import time

import pytest
from p4p.nt import NTScalar
from p4p.server import Server, StaticProvider
from p4p.server.thread import SharedPV

from sfbw_ioc.serving.caprobe import read_pv
from sfbw_ioc.serving.duplicate import EXIT_DUPLICATE_PREFIX
from sfbw_ioc.testing.ioc import EPICS_BIN, IocProcess, SoftIoc, run_ioc, unique_prefix
from sfbw_ioc.testing.pva import PvaPorts

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
