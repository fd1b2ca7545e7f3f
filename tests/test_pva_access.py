"""Access security over PV Access as EPICS enforces it: the same ACF file on EPICS's
softIocPVA -a and on this IOC, pvget, pvmonitor and pvput run as two Unix users the test
makes (one the file lets write, one it gives no access at all): the same answers.

EPICS's PVA server (QSRV: pva2pva's, which softIocPVA runs, and PVXS's alike) checks
only puts (asCheckPut): a user the file gives no READ still reads over PVA, while over
CA (caget, on the same IOCs) the same user cannot. A refused put changes nothing."""
from __future__ import annotations

import getpass
import subprocess
from pathlib import Path

import pytest

from other_users import SoftIoc, run_as, tools_for_everyone, unix_users
from pva_clients import TOOL_TIMEOUT_S, PvaPorts, pva_ioc
from sfbw_ioc.serving.caprobe import PROBE_USER
from sfbw_ioc.testing.ioc import ca_client_environment, unique_prefix

CONTROL_PV = "IMAGE:RATE"  # an ao in ASG CONTROL on both, harmless to change
STATUS_PV = "W1:WRITTEN"  # an ai in DEFAULT


@pytest.fixture(scope="module")
def users():
    """(writer, outsider)"""
    with unix_users() as names:
        yield names


@pytest.fixture(scope="module")
def tools():
    with tools_for_everyone(("pvget", "pvput", "pvmonitor", "caget"),
                            ("libCom.", "libca.", "libpvData.", "libpvAccess.",
                             "libpvAccessCA.")) as directory:
        yield directory


def acf_text(writer: str) -> str:
    """The writer reads and writes; the watchdog's self-check and this test's harness
    (this process's user, over CA and p4p) read; nobody else has any access."""
    return f"""\
UAG(operators) {{{writer}}}
UAG(harness) {{{PROBE_USER}, {getpass.getuser()}}}
ASG(DEFAULT) {{ RULE(1, READ) {{ UAG(operators) }} RULE(1, READ) {{ UAG(harness) }} }}
ASG(CONTROL) {{ RULE(1, WRITE) {{ UAG(operators) }} RULE(1, READ) {{ UAG(harness) }} }}
"""


class Served:
    """An IOC and the ports its clients need."""

    def __init__(self, ioc, ports: PvaPorts) -> None:
        self.ioc, self.ports = ioc, ports

    def pv(self, name: str) -> str:
        return self.ioc.pv(name)

    def environment(self) -> dict[str, str]:
        return {**ca_client_environment([self.ioc.port]), **self.ports.client_environment()}

    def value(self, name: str) -> float:
        with self.ports.context() as context:
            return float(context.get(self.pv(name)))


@pytest.fixture(scope="module")
def both_iocs(users, tmp_path_factory, ca_ports):
    writer, _ = users
    directory = tmp_path_factory.mktemp("pva-access")
    acf = directory / "sfbw.acf"
    acf.write_text(acf_text(writer))
    soft_ports, our_ports = PvaPorts(), PvaPorts()
    soft = SoftIoc(ca_ports(), unique_prefix("PAS"), acf, directory / "softiocpva.log",
                   binary="softIocPVA", environment=soft_ports.server_environment())
    ours = pva_ioc(ca_ports(), unique_prefix("PAS"),
                   ["--simulate", "--simulate-rate", "20", "--access-security", str(acf),
                    "--output-root", str(directory / "data")], directory / "ioc.log", our_ports)
    yield {"softIocPVA": Served(soft, soft_ports), "sfbw-ioc": Served(ours, our_ports)}
    ours.stop()
    soft.stop()


def tool(user: str, tools: Path, served: Served, name: str, *args: str,
         seconds: float | None = None) -> subprocess.CompletedProcess:
    return run_as(user, tools / name, args, served.environment(), seconds=seconds)


def get_outcome(result: subprocess.CompletedProcess, pv: str) -> str:
    if result.returncode == 0 and pv in result.stdout:
        return "value"
    return f"refused ({result.returncode}): {result.stdout.strip()} {result.stderr.strip()}"


def monitor_outcome(result: subprocess.CompletedProcess, pv: str) -> str:
    """What pvmonitor printed in its window (its first update comes at once)."""
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    return "updates" if lines and all(pv in line for line in lines) else (
        f"nothing: {result.stdout.strip()} {result.stderr.strip()}")


def put_outcome(result: subprocess.CompletedProcess) -> tuple[int, bool]:
    return result.returncode, "Put not permitted" in result.stdout + result.stderr


def caget_outcome(result: subprocess.CompletedProcess) -> str:
    return "no read access" if "no read access" in result.stdout else (
        "value" if result.returncode == 0 else result.stdout + result.stderr)


def outcomes(user: str, tools: Path, served: Served, new_rate: float) -> dict:
    wait = ("-w", str(TOOL_TIMEOUT_S))
    seen = {}
    for name in (STATUS_PV, CONTROL_PV):
        pv = served.pv(name)
        seen[f"pvget {name}"] = get_outcome(tool(user, tools, served, "pvget", *wait, pv), pv)
        seen[f"pvmonitor {name}"] = monitor_outcome(
            tool(user, tools, served, "pvmonitor", pv, seconds=2), pv)
    seen[f"pvput {CONTROL_PV}"] = put_outcome(
        tool(user, tools, served, "pvput", *wait, served.pv(CONTROL_PV), str(new_rate)))
    seen[f"caget {STATUS_PV}"] = caget_outcome(
        tool(user, tools, served, "caget", served.pv(STATUS_PV)))
    return seen


WRITER_SEES = {f"pvget {STATUS_PV}": "value", f"pvget {CONTROL_PV}": "value",
               f"pvmonitor {STATUS_PV}": "updates", f"pvmonitor {CONTROL_PV}": "updates",
               f"pvput {CONTROL_PV}": (0, False), f"caget {STATUS_PV}": "value"}
# No READ in the file: refused over CA, read over PVA (as QSRV does), no put.
OUTSIDER_SEES = {**WRITER_SEES, f"pvput {CONTROL_PV}": (1, True),
                 f"caget {STATUS_PV}": "no read access"}


def test_pva_answers_as_softiocpva_does(both_iocs, users, tools):
    """The writer's put takes; the outsider's is refused with QSRV's words and changes
    nothing, on both IOCs."""
    writer, outsider = users
    for name, served in both_iocs.items():
        assert outcomes(writer, tools, served, 7.0) == WRITER_SEES, name
        assert served.value(CONTROL_PV) == 7.0, name
        assert outcomes(outsider, tools, served, 9.0) == OUTSIDER_SEES, name
        assert served.value(CONTROL_PV) == 7.0, name
