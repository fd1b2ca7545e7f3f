"""What the IOC's log tells a user: no warnings at a normal start, a refused put in one
line with its reason, client connections only with -v; a bug keeps its traceback."""
from __future__ import annotations

import subprocess
import sys

import epics
import pytest

from sfbw_ioc.testing.ioc import EPICS_BIN, REPO, IocProcess, caput_binary, poll, unique_prefix

STOP_REASON = "STOP_PULSE_ID must be a whole number from 0 to 2**53, not -3.0"
RATE_REASON = "Cannot write data 20.0. Limits are set to 0.0 and 10.0."


@pytest.fixture(scope="module")
def ioc(tmp_path_factory, ca_ports):
    ioc = IocProcess(ca_ports(), unique_prefix("LOG"),
                     ["--simulate", "--output-root", str(tmp_path_factory.mktemp("out"))],
                     tmp_path_factory.mktemp("log") / "ioc.log")
    yield ioc
    assert ioc.stop() == 0, ioc.log()


def lines_with(ioc: IocProcess, text: str) -> list[str]:
    return [line for line in ioc.log().splitlines() if text in line]


def test_a_start_warns_of_nothing(ioc):
    start = ioc.log().partition("Server startup complete.")[0]
    assert "Asyncio server starting up" in start
    assert [line for line in start.splitlines() if "WARNING" in line] == []
    assert "considerable memory" not in start  # caproto on the backlog of big PVs


def test_a_refused_put_is_one_line_with_its_reason(ioc):
    """One put refused by the IOC's putter (PutRejected), one by caproto's limits."""
    assert caput_binary("-c", "--", ioc.pv("STOP_PULSE_ID"), "-3", ca_timeout=5).returncode == 1
    assert caput_binary("-c", ioc.pv("LIVE_RATE"), "20", ca_timeout=5).returncode == 1
    # The put fails once the server has logged why; the second line comes after the first.
    poll(lambda: lines_with(ioc, RATE_REASON), what="the refusal of LIVE_RATE logged")
    for reason in (STOP_REASON, RATE_REASON):
        [line] = lines_with(ioc, reason)
        assert " WARNING " in line and f"put refused: {reason}" in line
    assert ioc.text("MESSAGE") == STOP_REASON
    assert "Traceback" not in ioc.log()
    assert "Invalid write request" not in ioc.log()


def test_client_connections_are_not_logged(ioc):
    for _ in range(3):  # each a new connection, and its end
        result = subprocess.run([str(EPICS_BIN / "caget"), "-w", "5", ioc.pv("STATE")],
                                capture_output=True, text=True, timeout=30)
        assert result.returncode == 0 and "IDLE" in result.stdout, result.stderr
    assert epics.caget(ioc.pv("RECEIVED"), timeout=5) is not None
    # A refusal logged after the connections: whatever they logged is in the log by then.
    marker = "a live rate must be above 0 and at most 10 Hz, not 0"
    assert caput_binary("-c", ioc.pv("LIVE_RATE"), "0", ca_timeout=5).returncode == 1
    poll(lambda: lines_with(ioc, marker), what="the refusal of LIVE_RATE 0 logged")
    assert lines_with(ioc, "client at") == []


def test_an_exception_that_is_no_refusal_keeps_its_traceback():
    """caproto's server logs a failed put as below (log.exception on caproto.circ); with
    the IOC's logging, a PutRejected leaves it to the putter's line, anything else is a
    bug and shows its traceback."""
    code = (
        "import logging\n"
        "from sfbw_ioc.commandline import configure_logging\n"
        "from sfbw_ioc.pvs.kinds import PutRejected\n"
        "configure_logging(quiet=False)\n"
        "logging.getLogger('caproto.circ').addHandler(logging.StreamHandler())\n"
        "for error in (PutRejected('refused'), KeyError('a bug')):\n"
        "    try:\n"
        "        raise error\n"
        "    except Exception:\n"
        "        logging.getLogger('caproto.circ').exception(\n"
        "            'Invalid write request by %s (%s): %r', 'user', 'host', 'command')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("Traceback") == 1
    assert "KeyError: 'a bug'" in result.stderr
    assert "refused" not in result.stderr
