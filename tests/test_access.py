"""EPICS access security (``--access-security FILE``): the ACF parser on good and bad
texts, and the IOC as a subprocess with an ACF file, driven by the EPICS command-line
tools running as two Unix users the test creates (one may write, one may not), by
pyepics and by caproto's client."""
from __future__ import annotations

import getpass
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import epics
import pytest
from caproto import AccessRights
from caproto.sync import client as caproto_client

from other_users import SoftIoc, run_as, tools_for_everyone, unix_users
from sfbw_ioc.testing.ioc import (REPO, IocProcess, ca_client_environment, run_ioc,
                                  unique_prefix)
from sfbw_ioc.pvs import access
from sfbw_ioc.pvs.access import AccessConfigError, parse
from sfbw_ioc.serving.caprobe import PROBE_USER

CA_TIMEOUT = "5"
RW = AccessRights.READ | AccessRights.WRITE
READ = AccessRights.READ
NONE = AccessRights.NO_ACCESS


# ---- the parser ------------------------------------------------------------------------

GOOD = """\
# operators write from the control room; everybody else reads
UAG(operators) {alice, "bob smith"}
UAG(guests)
HAG(control_room) {CR-PC1, cr-pc2.psi.ch}
ASG(DEFAULT) {
    RULE(1, READ)
}
ASG(CONTROL) {
    RULE(1, WRITE, TRAPWRITE) {
        UAG(operators)
        HAG(control_room)
    }
    RULE(0, NONE) { UAG(guests) }   # level 0: applies to ASL 0 (all PVs here)
}
ASG(UNUSED)
"""


def test_good_file_parses_into_groups_and_rules() -> None:
    config = parse(GOOD)
    assert config.uags == {"operators": {"alice", "bob smith"}, "guests": frozenset()}
    assert config.hags == {"control_room": {"cr-pc1", "cr-pc2.psi.ch"}}
    assert set(config.asgs) == {"DEFAULT", "CONTROL", "UNUSED"}
    write, none = config.asgs["CONTROL"]
    assert (write.level, write.access, write.trap_write, write.line) == (1, access.Access.WRITE,
                                                                          True, 9)
    assert (write.uags, write.hags) == (("operators",), ("control_room",))
    assert (none.level, none.access, none.uags, none.hags) == (0, access.Access.NONE,
                                                               ("guests",), ())


def test_rights_follow_asLib() -> None:
    config = parse(GOOD)
    # UAG and HAG must both match; hosts compare case-insensitively, users exactly.
    assert config.rights("CONTROL", "cr-pc1", "alice") == RW
    assert config.rights("CONTROL", "Cr-Pc2.PSI.ch", "bob smith") == RW
    # A client no rule applies to has no access, not even READ.
    assert config.rights("CONTROL", "office-pc", "alice") == NONE
    assert config.rights("CONTROL", "cr-pc1", "Alice") == NONE
    assert config.rights("CONTROL", None, None) == NONE
    assert config.rights("DEFAULT", "cr-pc1", "alice") == READ
    # An ASG the file does not define follows DEFAULT.
    assert config.rights("ELSEWHERE", "cr-pc1", "alice") == READ
    # A rule applies when the PV's level is at most the rule's.
    assert config.rights("CONTROL", "cr-pc1", "alice", level=2) == NONE


def test_default_without_rules_gives_nobody_access() -> None:
    """asLib makes DEFAULT when the file has none: a PV in it is then nobody's."""
    config = parse("UAG(ops) {alice}\nASG(CONTROL) { RULE(1, WRITE) { UAG(ops) } }")
    assert config.rights("DEFAULT", "h", "alice") == NONE
    assert config.rights("CONTROL", "h", "alice") == RW


def test_most_permissive_rule_wins_and_none_takes_nothing_away() -> None:
    config = parse("UAG(ops) {alice}\nUAG(banned) {alice, eve}\n"
                   "ASG(CONTROL) { RULE(1, NONE) { UAG(banned) } RULE(1, WRITE) { UAG(ops) } "
                   "RULE(1, READ) { UAG(banned) } }")
    assert config.rights("CONTROL", "h", "alice") == RW
    assert config.rights("CONTROL", "h", "eve") == READ
    assert config.rights("CONTROL", "h", "mallory") == NONE


def test_rule_without_condition_applies_to_everybody() -> None:
    config = parse('ASG(DEFAULT) {RULE(1,WRITE)} ASG("CONTROL") {RULE(0,READ,NOTRAPWRITE)}')
    assert config.rights("DEFAULT", "any", "one") == RW
    assert config.rights("CONTROL", "any", "one") == READ


@pytest.mark.parametrize("text, line, reason", [
    ("", 1, "no UAG, HAG or ASG"),
    ("# only a comment\n", 2, "no UAG, HAG or ASG"),
    ("UAG(a) {b\n", 2, "expected ','"),
    ("UAG(a) {}\n", 1, "expected a name"),
    ("ASG(X) {\n  RULE(1, WRITE) { UAG(nobody) }\n}", 2, "no UAG named 'nobody'"),
    ("ASG(X) {\n  RULE(1, WRITE) {\n HAG(nowhere) } }", 3, "no HAG named 'nowhere'"),
    ("ASG(X) {\n RULE(x, WRITE) }", 2, "level must be an integer"),
    ("ASG(X) { RULE(-1, WRITE) }", 1, "level must be 0 or more"),
    ("ASG(X) { RULE(1, write) }", 1, "must be NONE, READ or WRITE, not 'write'"),
    ("ASG(X) { RULE(1, RPC) }", 1, "must be NONE, READ or WRITE"),
    ("ASG(X) { RULE(1, WRITE, LOG) }", 1, "TRAPWRITE or NOTRAPWRITE"),
    ("ASG(X) { RULE(1, WRITE) {} }", 1, "expected UAG or HAG"),
    ('ASG(X) {\n\n INPA("SOME:PV") }', 3, "INPA is not supported"),
    ('ASG(X) { RULE(1, WRITE) { CALC("A=1") } }', 1, "CALC is not supported"),
    ("UAG(a) {b}\nUAG(a) {c}", 2, "duplicate UAG 'a'"),
    ("ASG(DEFAULT)\nASG(DEFAULT)", 2, "duplicate ASG 'DEFAULT'"),
    ('UAG(a) {"b}\n', 1, "closing quote missing"),
    ("UAG(a) {b} @", 1, "invalid character '@'"),
    ("GROUP(a)", 1, "expected UAG, HAG or ASG, found 'GROUP'"),
    ("ASG(X) { RULE(1, WRITE) }\n}", 2, "expected UAG, HAG or ASG, found '}'"),
])
def test_bad_text_is_an_error_with_its_line(text: str, line: int, reason: str) -> None:
    with pytest.raises(AccessConfigError) as raised:
        parse(text)
    assert raised.value.line == line
    assert reason in str(raised.value)
    assert str(raised.value).startswith(f"line {line}: ")


def test_shipped_examples_parse_and_let_the_watchdog_read() -> None:
    for name in ("sfbw.acf", "sfbw-readers.acf"):
        config = access.load(REPO / "db" / name)
        assert {"CONTROL", "DEFAULT"} <= set(config.asgs)
        assert READ in config.rights("DEFAULT", "localhost", PROBE_USER)
    everybody = access.load(REPO / "db/sfbw.acf")
    assert everybody.rights("DEFAULT", "any-host", "anyone") == READ
    assert everybody.rights("CONTROL", "any-host", "anyone") == READ
    readers = access.load(REPO / "db/sfbw-readers.acf")
    assert readers.rights("DEFAULT", "any-host", "anyone") == NONE
    assert readers.rights("CONTROL", "any-host", "sfbwdaq") == RW


# ---- the IOC under an ACF, clients as other Unix users ---------------------------------

@pytest.fixture(scope="module")
def users():
    """(writer, reader)"""
    with unix_users() as names:
        yield names


@pytest.fixture(scope="module")
def tools():
    with tools_for_everyone(("caget", "caput", "cainfo", "camonitor"),
                            ("libca.", "libCom.")) as directory:
        yield directory


def acf_text(writer: str, reader: str, host: str) -> str:
    # The host in upper case: HAG hosts match case-insensitively.
    return f"""\
UAG(operators) {{{writer}}}
UAG(guests) {{{reader}}}
HAG(here) {{{host.upper()}}}
HAG(elsewhere) {{"no-such-host.example"}}
ASG(DEFAULT) {{ RULE(1, READ) }}
ASG(CONTROL) {{
    RULE(1, READ)
    RULE(1, WRITE) {{ UAG(operators) HAG(here) }}
    RULE(1, WRITE) {{ UAG(guests) HAG(elsewhere) }}
}}
"""


@pytest.fixture(scope="module")
def secured_ioc(users, tmp_path_factory, ca_ports):
    writer, reader = users
    directory = tmp_path_factory.mktemp("access")
    acf = directory / "sfbw.acf"
    acf.write_text(acf_text(writer, reader, socket.gethostname()))
    ioc = IocProcess(ca_ports(), unique_prefix("ACC"),
                     ["--simulate", "--simulate-rate", "20", "--access-security", str(acf),
                      "--output-root", str(directory / "data")], directory / "ioc.log")
    yield ioc
    ioc.stop()


def as_user(user: str, tools: Path, ioc: IocProcess, *command: str,
            hostname: str | None = None, seconds: float | None = None
            ) -> subprocess.CompletedProcess:
    """A CA tool of ``tools`` run as ``user`` against ``ioc`` (see other_users.run_as)."""
    tool, *args = command
    return run_as(user, tools / tool, args, ca_client_environment([ioc.port]),
                  hostname=hostname, seconds=seconds)


def access_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stderr
    return next(line for line in result.stdout.splitlines() if "Access:" in line).split(
        "Access:")[1].strip()


def test_writer_writes_reader_is_refused_and_nothing_changes(secured_ioc, users, tools):
    ioc, (writer, reader) = secured_ioc, users
    pv = ioc.pv("OUTPUT_FILE")
    put = as_user(writer, tools, ioc, "caput", "-c", "-S", "-w", CA_TIMEOUT, pv, "mine.h5")
    assert put.returncode == 0, put.stderr + put.stdout
    assert ioc.text("OUTPUT_FILE") == "mine.h5"
    assert access_line(as_user(writer, tools, ioc, "cainfo", pv)) == "read, write"

    assert access_line(as_user(reader, tools, ioc, "cainfo", pv)) == "read, no write"
    refused = as_user(reader, tools, ioc, "caput", "-c", "-S", "-w", CA_TIMEOUT, pv, "theirs.h5")
    assert refused.returncode == 1
    assert "Write access denied" in refused.stderr  # libca refuses before sending
    start = as_user(reader, tools, ioc, "caput", "-c", "-w", CA_TIMEOUT, ioc.pv("START_NOW"), "1")
    assert start.returncode == 1
    assert ioc.text("OUTPUT_FILE") == "mine.h5"
    assert ioc.get("STATE", as_string=True) == "IDLE"
    assert not list((Path(ioc.text("OUTPUT_ROOT"))).glob("*.h5*"))

    # Reads are not affected: the reader reads control and status PVs alike.
    got = as_user(reader, tools, ioc, "caget", "-t", "-S", pv)
    assert (got.returncode, got.stdout.strip()) == (0, "mine.h5")
    got = as_user(reader, tools, ioc, "caget", "-t", ioc.pv("STATE"))
    assert (got.returncode, got.stdout.strip()) == (0, "IDLE")


def test_record_fields_follow_their_record(secured_ioc, users, tools):
    """START_NOW.PROC would run the putter again: a field is in its record's ASG."""
    ioc, (writer, reader) = secured_ioc, users
    assert access_line(as_user(reader, tools, ioc, "cainfo", ioc.pv("START_NOW.PROC"))) == \
        "read, no write"
    assert access_line(as_user(writer, tools, ioc, "cainfo", ioc.pv("START_NOW.PROC"))) == \
        "read, write"
    # Read-only PVs stay read-only for the writer too.
    assert access_line(as_user(writer, tools, ioc, "cainfo", ioc.pv("STATE"))) == \
        "read, no write"


def test_host_decides_too(secured_ioc, users, tools):
    ioc, (writer, reader) = secured_ioc, users
    pv = ioc.pv("USER")
    # The writer from another host is not in HAG(here): read only.
    assert access_line(as_user(writer, tools, ioc, "cainfo", pv,
                               hostname="office-pc")) == "read, no write"
    # The reader may write from the host of HAG(elsewhere).
    put = as_user(reader, tools, ioc, "caput", "-c", "-S", "-w", CA_TIMEOUT, pv, "guest",
                  hostname="no-such-host.example")
    assert put.returncode == 0, put.stderr + put.stdout
    assert ioc.text("USER") == "guest"


def test_other_clients_see_no_write_access_and_the_server_refuses(secured_ioc):
    """This process's user (root) is in no UAG: pyepics reports it, and caproto's client,
    which writes regardless, is refused by the server."""
    ioc = secured_ioc
    channel = epics.PV(ioc.pv("PROCESS"))
    assert channel.wait_for_connection(timeout=5)
    assert (channel.read_access, channel.write_access) == (True, False)
    assert epics.PV(ioc.pv("RECEIVED")).wait_for_connection(timeout=5)
    before = ioc.text("PROCESS")
    with pytest.raises(caproto_client.ErrorResponseReceived):
        caproto_client.write(ioc.pv("PROCESS"), "intruder", notify=True, timeout=5)
    assert ioc.text("PROCESS") == before
    assert ioc.get("PROCESS", as_string=True, count=0) == before


# ---- READ as EPICS enforces it: the same file on EPICS's softIoc and on this IOC --------

def readers_acf(reader: str) -> str:
    """The file of the report: only UAG(readers) may read anything (nobody writes).
    The watchdog's self-check reads STATE as its own user, and this test's harness as
    this process's: they are readers too."""
    return f"""\
UAG(readers) {{{reader}, {PROBE_USER}, {getpass.getuser()}}}
ASG(DEFAULT) {{ RULE(1, READ) {{ UAG(readers) }} }}
ASG(CONTROL) {{ RULE(1, READ) {{ UAG(readers) }} }}
"""


@pytest.fixture(scope="module")
def readers_file(users, tmp_path_factory):
    _, reader = users
    path = tmp_path_factory.mktemp("readers") / "readers.acf"
    path.write_text(readers_acf(reader))
    return path


@pytest.fixture(scope="module")
def both_iocs(readers_file, tmp_path_factory, ca_ports):
    """softIoc and this IOC on the same file, each on a port of its own."""
    directory = readers_file.parent
    soft = SoftIoc(ca_ports(), unique_prefix("ASR"), readers_file, directory / "softioc.log")
    ours = IocProcess(ca_ports(), unique_prefix("ASR"),
                      ["--simulate", "--simulate-rate", "20", "--access-security",
                       str(readers_file), "--output-root", str(directory / "data")],
                      directory / "ioc.log")
    yield {"softIoc": soft, "sfbw-ioc": ours}
    ours.stop()
    soft.stop()


READ_PVS = ("W1:WRITTEN", "IMAGE:ARRAY", "OUTPUT_FILE")  # a scalar, the image, a control PV


def caget_outcome(result: subprocess.CompletedProcess) -> str:
    return "no read access" if "no read access" in result.stdout else (
        "value" if result.returncode == 0 and result.stdout.strip() else result.stdout)


def camonitor_outcome(user: str, tools: Path, ioc, name: str) -> str:
    """What camonitor prints within two seconds (its first update comes at once)."""
    result = as_user(user, tools, ioc, "camonitor", ioc.pv(name), seconds=2)
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    return "updates" if lines and all(ioc.pv(name) in line for line in lines) else (
        "nothing" if not lines else result.stdout)


def caput_outcome(user: str, tools: Path, ioc) -> tuple[int, bool, str]:
    result = as_user(user, tools, ioc, "caput", "-c", "-w", CA_TIMEOUT, "-S",
                     ioc.pv("OUTPUT_FILE"), "theirs.h5")
    old = next((line for line in result.stdout.splitlines() if line.startswith("Old")), "")
    return (result.returncode, "Write access denied" in result.stderr,
            "no read access" if "no read access" in old else "value")


CAPROTO_CLIENT = """
import json, sys, threading
from caproto.threading.client import Context
pv, = Context().get_pvs(sys.argv[1], timeout=5)
pv.wait_for_connection(timeout=5)
read = pv.read(data_type="time", timeout=5)
updates = []
def count(sub, response):  # caproto keeps a weak reference: no lambda
    updates.append(response.status.name)
pv.subscribe(data_type="time").add_callback(count)
done = threading.Event()
done.wait(2)  # the first update of a monitor comes at once; an observation window
print(json.dumps([read.status.name, len(read.data), updates]))
"""


def caproto_outcome(user: str, ioc, name: str) -> list:
    """A client that ignores the access rights it is told: what the server hands it."""
    env = {**os.environ, **ca_client_environment([ioc.port]), "USER": user, "LOGNAME": user}
    result = subprocess.run([sys.executable, "-c", CAPROTO_CLIENT, ioc.pv(name)], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def outcomes(user: str, tools: Path, ioc) -> dict:
    seen = {}
    for name in READ_PVS:
        seen[f"caget {name}"] = caget_outcome(as_user(user, tools, ioc, "caget", ioc.pv(name)))
        seen[f"camonitor {name}"] = camonitor_outcome(user, tools, ioc, name)
    seen["caput OUTPUT_FILE"] = caput_outcome(user, tools, ioc)
    for name in ("W1:WRITTEN", "IMAGE:ARRAY"):
        status, count, updates = caproto_outcome(user, ioc, name)
        # A refused read hands over no value, a refused subscription one refusal.
        granted = status == "ECA_NORMAL"
        seen[f"caproto {name}"] = (status, bool(updates) if granted else updates,
                                   None if granted else count)
    return seen


READER_SEES = {**{f"caget {name}": "value" for name in READ_PVS},
               **{f"camonitor {name}": "updates" for name in READ_PVS},
               "caput OUTPUT_FILE": (1, True, "value"),
               "caproto W1:WRITTEN": ("ECA_NORMAL", True, None),
               "caproto IMAGE:ARRAY": ("ECA_NORMAL", True, None)}
OUTSIDER_SEES = {**{f"caget {name}": "no read access" for name in READ_PVS},
                 **{f"camonitor {name}": "nothing" for name in READ_PVS},
                 "caput OUTPUT_FILE": (1, True, "no read access"),
                 "caproto W1:WRITTEN": ("ECA_NORDACCESS", ["ECA_NORDACCESS"], 0),
                 "caproto IMAGE:ARRAY": ("ECA_NORDACCESS", ["ECA_NORDACCESS"], 0)}


@pytest.mark.parametrize("role, expected", [("reader", READER_SEES),
                                            ("outsider", OUTSIDER_SEES)])
def test_read_rules_answer_as_softioc_does(both_iocs, users, tools, role, expected):
    """caget, camonitor and caput as a user in UAG(readers) and as one outside it, and a
    client that ignores its rights (caproto's): the same on softIoc and on this IOC."""
    outsider, reader = users
    user = reader if role == "reader" else outsider
    seen = {name: outcomes(user, tools, ioc) for name, ioc in both_iocs.items()}
    assert seen["softIoc"] == expected
    assert seen["sfbw-ioc"] == expected
    ours = both_iocs["sfbw-ioc"]
    assert ours.text("OUTPUT_FILE") != "theirs.h5"


def test_a_refused_monitor_gets_no_update_after_its_refusal(both_iocs, users):
    """RECEIVED changes twice a second: a reader sees it change, an outsider's
    subscription (by a client that ignores its rights) is answered once and never again."""
    outsider, reader = users
    ours = both_iocs["sfbw-ioc"]
    _, _, updates = caproto_outcome(reader, ours, "RECEIVED")
    assert len(updates) >= 3 and set(updates) == {"ECA_NORMAL"}
    assert caproto_outcome(outsider, ours, "RECEIVED") == ["ECA_NORDACCESS", 0,
                                                           ["ECA_NORDACCESS"]]


# ---- the group IOC under the same files ------------------------------------------------

def group_under(acf: Path, port: int, directory: Path) -> IocProcess:
    """sfbw-group with ``acf``; its member need not exist for its own PVs to be served."""
    return IocProcess(port, unique_prefix("ACG"),
                      ["--member", unique_prefix("ABSENT"), "--access-security", str(acf),
                       "--output-root", str(directory / "data")],
                      directory / f"{acf.stem}-group.log", module="sfbw_ioc.group.cli")


@pytest.fixture(scope="module")
def secured_group(users, tmp_path_factory, ca_ports):
    directory = tmp_path_factory.mktemp("group-access")
    acf = directory / "sfbw.acf"
    acf.write_text(acf_text(*users, socket.gethostname()))
    group = group_under(acf, ca_ports(), directory)
    yield group
    group.stop()


def test_group_writer_writes_reader_is_refused(secured_group, users, tools):
    group, (writer, reader) = secured_group, users
    pv = group.pv("USER")
    put = as_user(writer, tools, group, "caput", "-c", "-S", "-w", CA_TIMEOUT, pv, "p4242")
    assert put.returncode == 0, put.stderr + put.stdout
    assert group.text("USER") == "p4242"
    refused = as_user(reader, tools, group, "caput", "-c", "-S", "-w", CA_TIMEOUT, pv, "guest")
    assert refused.returncode == 1 and "Write access denied" in refused.stderr
    assert access_line(as_user(reader, tools, group, "cainfo", group.pv("FILE_UID"))) == \
        "read, no write"
    assert access_line(as_user(writer, tools, group, "cainfo", group.pv("STATE"))) == \
        "read, no write"
    assert group.text("USER") == "p4242"


def test_group_read_rules_answer_as_the_ioc_does(readers_file, users, tools, tmp_path,
                                                  ca_ports):
    """The file of the READ report on the group IOC: a reader reads and monitors, an
    outsider gets "no read access" and no update, also from a client ignoring its rights."""
    outsider, reader = users
    group = group_under(readers_file, ca_ports(), tmp_path)
    try:
        for user, value, monitor, caproto_status in (
                (reader, "value", "updates", "ECA_NORMAL"),
                (outsider, "no read access", "nothing", "ECA_NORDACCESS")):
            for name in ("STATE", "OUTPUT_FILE"):
                assert caget_outcome(as_user(user, tools, group, "caget",
                                             group.pv(name))) == value, (user, name)
                assert camonitor_outcome(user, tools, group, name) == monitor, (user, name)
            assert caproto_outcome(user, group, "MEMBERS_CONNECTED")[0] == caproto_status
    finally:
        group.stop()


# ---- start-up ----------------------------------------------------------------------------

IOC_COMMANDS = {"ioc": ("sfbw_ioc.cli", ["--simulate"]),
                "group": ("sfbw_ioc.group.cli", ["--member", "ABSENT:"])}


def run_cli(tmp_path: Path, port: int, *args: str, ioc: str = "ioc"
            ) -> subprocess.CompletedProcess:
    module, options = IOC_COMMANDS[ioc]
    return run_ioc(port, unique_prefix("ACB"),
                   [*options, "--output-root", str(tmp_path / "data"), *args], module=module)


@pytest.mark.parametrize("ioc", IOC_COMMANDS)
def test_file_that_does_not_parse_fails_start_up_with_its_line(tmp_path, ca_ports, ioc):
    acf = tmp_path / "bad.acf"
    acf.write_text("UAG(ops) {alice}\nASG(CONTROL) {\n    RULE(1, WRITE) { UAG(opps) }\n}\n")
    result = run_cli(tmp_path, ca_ports(), "--access-security", str(acf), ioc=ioc)
    assert result.returncode == 1
    assert "CRITICAL" in result.stderr
    assert f"{acf}: line 3: no UAG named 'opps' defined" in result.stderr


@pytest.mark.parametrize("ioc", IOC_COMMANDS)
def test_missing_file_fails_start_up(tmp_path, ca_ports, ioc):
    result = run_cli(tmp_path, ca_ports(), "--access-security", str(tmp_path / "none.acf"),
                     ioc=ioc)
    assert result.returncode == 1
    assert "CRITICAL" in result.stderr and "none.acf" in result.stderr


@pytest.mark.parametrize("ioc", IOC_COMMANDS)
def test_file_blinding_the_watchdog_fails_start_up(tmp_path, ca_ports, ioc):
    acf = tmp_path / "blind.acf"
    acf.write_text("ASG(DEFAULT) { RULE(1, NONE) }\n")
    result = run_cli(tmp_path, ca_ports(), "--access-security", str(acf), ioc=ioc)
    assert result.returncode == 1
    assert "watchdog" in result.stderr and "CRITICAL" in result.stderr
